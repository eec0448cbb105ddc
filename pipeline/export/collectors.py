"""The worker's own metrics for Prometheus, and the namespace rule every metric follows.

:class:`WorkerCollector` (a prometheus-client collector) reports the pipeline's health:
events consumed, dead letters by reason, batches, consumer lag, table keys, sink flushes
per database. Per-edge metrics are :mod:`pipeline.export.edges`'.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector


class SinkStatus(Protocol):
    """What the worker collector reads of the sink (:class:`pipeline.sink.writer.Sink`):
    one status per database, with ``target.name``, ``flushes``, ``failures``, ``rows``
    and ``last_duration_s``."""

    status: Sequence[Any]

__all__ = ["WorkerCollector", "check_namespace"]

EDGE_LABELS = ["source_service", "target_service", "protocol"]
QUANTILES = (0.5, 0.9, 0.95, 0.99)
STATES = ("closed", "open", "half_open")
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def check_namespace(namespace: str) -> str:
    if not _NAME.fullmatch(namespace):
        raise ValueError(f"metrics namespace {namespace!r} is not a valid Prometheus name "
                         "prefix ([a-zA-Z_:][a-zA-Z0-9_:]*)")
    return namespace


class WorkerCollector(Collector):
    """The worker's own health, from counters the worker keeps anyway."""

    def __init__(self, pipeline: Any, *, namespace: str = "commpipe",
                 sink: SinkStatus | None = None) -> None:
        self.pipeline = pipeline
        self.ns = check_namespace(namespace)
        self.sink = sink

    def collect(self) -> Iterator[Metric]:
        ns, pl = self.ns, self.pipeline
        yield CounterMetricFamily(f"{ns}_events_consumed_total", "Valid events applied or "
                                  "counted late", value=pl.events_in)
        yield CounterMetricFamily(f"{ns}_duplicate_events_total", "Events of records skipped "
                                  "as a producer's second copy", value=pl.duplicates)
        yield CounterMetricFamily(f"{ns}_worker_batches_total", "Batches taken from Kafka",
                                  value=pl.batches)
        yield CounterMetricFamily(f"{ns}_worker_batch_records_total", "Records in those batches",
                                  value=pl.batch_records)
        yield GaugeMetricFamily(f"{ns}_worker_unwritten_records", "Records applied whose "
                                "changes wait in the worker's cache, not yet written (nor "
                                "acknowledged)", value=pl.cache.unwritten())
        yield CounterMetricFamily(f"{ns}_worker_write_outs_total", "Times the cache wrote a "
                                  "partition's changes out (each changed key once)",
                                  value=pl.cache.write_outs)
        seq = pl.sequence
        yield CounterMetricFamily(f"{ns}_worker_input_reseeks_total", "Times an input "
                                  "partition was sought back to a record that had not reached "
                                  "the worker", value=seq.reseeks)
        yield CounterMetricFamily(f"{ns}_worker_input_repeats_total", "Input records dropped "
                                  "unapplied: delivered twice, or before a seek back",
                                  value=seq.repeats)
        yield CounterMetricFamily(f"{ns}_worker_input_absent_offsets_total", "Input offsets "
                                  "found not to be in Kafka (transaction markers, retention)",
                                  value=seq.absent)
        yield CounterMetricFamily(f"{ns}_worker_edges_expired_total", "Edges deleted from the "
                                  "table after COMMPIPE_EDGE_EXPIRE_S of silence",
                                  value=pl.expiry.expired)
        dead = CounterMetricFamily(f"{ns}_dead_letters_total", "Records and events sent to the "
                                   "dead-letter topic", labels=["reason"])
        for reason, n in sorted(pl.dead_letters.counts.items()):
            dead.add_metric([reason], n)
        yield dead
        lag = GaugeMetricFamily(f"{ns}_consumer_lag", "Records behind the partition's end",
                                labels=["partition"])
        for partition, behind in sorted(pl.lag().items()):
            lag.add_metric([str(partition)], behind)
        yield lag
        keys = GaugeMetricFamily(f"{ns}_state_keys", "Keys in the worker's table (all its "
                                 "partitions): window, edge, detail, partition", labels=["kind"])
        for kind, n in sorted(pl.state_keys().items()):
            keys.add_metric([kind], n)
        yield keys
        if self.sink is None:
            return
        families = {
            "flushes": CounterMetricFamily(f"{ns}_sink_flushes_total", "Sink transactions",
                                           labels=["database"]),
            "failures": CounterMetricFamily(f"{ns}_sink_flush_failures_total",
                                            "Failed sink transactions", labels=["database"]),
            "rows": CounterMetricFamily(f"{ns}_sink_windows_total", "Window rows stored",
                                        labels=["database"]),
            "last_duration_s": GaugeMetricFamily(f"{ns}_sink_flush_duration_seconds",
                                                 "Duration of the last sink transaction",
                                                 labels=["database"]),
        }
        dropped = CounterMetricFamily(f"{ns}_sink_dropped_total", "Windows and kept events a "
                                      "database's copy was given up for (backlog policy drop)",
                                      labels=["database", "kind"])
        for status in self.sink.status:
            for attr, family in families.items():
                family.add_metric([status.target.name], getattr(status, attr))
            for kind in ("windows", "events"):
                dropped.add_metric([status.target.name, kind],
                                   getattr(status, f"dropped_{kind}", 0))
        yield from families.values()
        yield dropped
        backlog = getattr(self.sink, "backlog", None)
        if backlog is not None:
            waiting = GaugeMetricFamily(f"{ns}_sink_backlog", "Closed windows and kept events "
                                        "some database has not stored yet", labels=["kind"])
            waiting.add_metric(["windows"], backlog.windows)
            waiting.add_metric(["events"], backlog.events)
            yield waiting
            yield GaugeMetricFamily(f"{ns}_sink_input_paused", "1 while the worker reads no "
                                    "input because the sink's backlog is past its bound",
                                    value=int(backlog.paused))
