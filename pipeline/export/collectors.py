"""The worker's own metrics for Prometheus, and the namespace rule every metric follows.

:class:`WorkerCollector` (a prometheus-client collector) reports the pipeline's health:
events consumed, dead letters by reason, batches, consumer lag, table keys, sink flushes
per database. Per-edge metrics are :mod:`pipeline.export.edges`'.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector


class WorkerStatus(Protocol):
    """What the worker collector reads of the worker (:class:`agents.app.Pipeline`)."""

    @property
    def events_in(self) -> int: ...
    @property
    def duplicates(self) -> int: ...
    @property
    def batches(self) -> int: ...
    @property
    def batch_records(self) -> int: ...
    @property
    def replayed(self) -> int: ...
    @property
    def unwritten(self) -> int: ...
    @property
    def write_outs(self) -> int: ...
    @property
    def dropped(self) -> int: ...
    @property
    def commits(self) -> int: ...
    @property
    def commit_refusals(self) -> int: ...
    @property
    def edges_expired(self) -> int: ...
    @property
    def dead_letter_counts(self) -> Mapping[str, int]: ...

    def lag(self) -> dict[int, int]: ...
    def state_keys(self) -> dict[str, int]: ...


class SinkStatus(Protocol):
    """What the worker collector reads of the sink (:class:`pipeline.sink.writer.Sink`):
    one status per database, with ``target.name``, ``flushes``, ``failures``, ``rows``
    and ``last_duration_s``."""

    status: Sequence[Any]

__all__ = ["SinkStatus", "WorkerCollector", "WorkerStatus", "check_namespace"]

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

    def __init__(self, worker: WorkerStatus, *, namespace: str = "commpipe",
                 sink: SinkStatus | None = None) -> None:
        self.worker = worker
        self.ns = check_namespace(namespace)
        self.sink = sink

    def collect(self) -> Iterator[Metric]:
        ns, w = self.ns, self.worker
        yield CounterMetricFamily(f"{ns}_events_consumed_total", "Valid events applied or "
                                  "counted late", value=w.events_in)
        yield CounterMetricFamily(f"{ns}_duplicate_events_total", "Events of records skipped "
                                  "as a producer's second copy", value=w.duplicates)
        yield CounterMetricFamily(f"{ns}_worker_batches_total", "Batches taken from Kafka "
                                  "(one per partition per fetch)", value=w.batches)
        yield CounterMetricFamily(f"{ns}_worker_batch_records_total", "Records in those batches",
                                  value=w.batch_records)
        yield CounterMetricFamily(f"{ns}_worker_replayed_records_total", "Input records read "
                                  "again after a restart and skipped whole (their partition "
                                  "had applied them)", value=w.replayed)
        yield CounterMetricFamily(f"{ns}_worker_dropped_records_total", "Input records fetched "
                                  "before their partition was (re)started, dropped unapplied "
                                  "and read again", value=w.dropped)
        yield GaugeMetricFamily(f"{ns}_worker_unwritten_records", "Records applied whose "
                                "changes wait in the worker's cache for the next commit",
                                value=w.unwritten)
        yield CounterMetricFamily(f"{ns}_worker_write_outs_total", "Commits that wrote "
                                  "changes out (each changed key once)", value=w.write_outs)
        yield CounterMetricFamily(f"{ns}_worker_commits_total", "Input offset commits",
                                  value=w.commits)
        yield CounterMetricFamily(f"{ns}_worker_commit_refusals_total", "Input offset commits "
                                  "the group refused (a rebalance, the broker away); their "
                                  "records are read again and skipped", value=w.commit_refusals)
        yield CounterMetricFamily(f"{ns}_worker_edges_expired_total", "Edges deleted from the "
                                  "table after COMMPIPE_EDGE_EXPIRE_S of silence",
                                  value=w.edges_expired)
        dead = CounterMetricFamily(f"{ns}_dead_letters_total", "Records and events sent to the "
                                   "dead-letter topic", labels=["reason"])
        for reason, n in sorted(w.dead_letter_counts.items()):
            dead.add_metric([reason], n)
        yield dead
        lag = GaugeMetricFamily(f"{ns}_consumer_lag", "Records behind the partition's end",
                                labels=["partition"])
        for partition, behind in sorted(w.lag().items()):
            lag.add_metric([str(partition)], behind)
        yield lag
        keys = GaugeMetricFamily(f"{ns}_state_keys", "Keys in the worker's table (all its "
                                 "partitions): window, edge, detail, partition", labels=["kind"])
        for kind, n in sorted(w.state_keys().items()):
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
