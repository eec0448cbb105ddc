"""Live aggregates for Prometheus, read from the worker's table at scrape time.

:class:`EdgeCollector` is a prometheus-client custom collector: every scrape
reads the edges this worker owns through :class:`~pipeline.core.rollups.Rollups`
(no second copy of the state) and reports, per edge
(``source_service``, ``target_service``, ``protocol``):

- counters since the edge's state began: ``<ns>_communication_requests_total``,
  ``..._responses_total``, ``..._errors_total{error_type}``, ``..._timeouts_total``,
  ``..._retries_total``, ``..._late_events_total``;
- ``<ns>_communication_latency_seconds``: histogram (responses, errors, timeouts);
- over the edge's last closed window: ``..._latency_quantile_seconds{quantile}`` (a
  summary: its ``_count`` and ``_sum`` are that window's) and ``..._error_ratio`` (0-1);
- ``..._circuit_state{state, source}``: 1 for the current state, 0 for the others,
  ``source`` = ``reported`` (circuit events, if the edge sends any) or ``derived``.

An edge whose partition is split over workers is merged the same way as in SQL
(counts added). Edges without events for ``stale_s`` (worker clock) leave the
output; at most ``max_edges`` are reported (the most recent), the others are
counted in ``<ns>_exporter_edges_refused_total``.

:class:`WorkerCollector` adds the pipeline's own health: events consumed, dead
letters by reason, batches, consumer lag, sink flushes per database.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    Sample,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from pipeline.core.rollups import Rollups
from pipeline.core.slo import SloConfig, evaluate
from pipeline.core.totals import LATENCY_BUCKETS_S, EdgeTotals


class SinkStatus(Protocol):
    """What the worker collector reads of the sink (:class:`pipeline.sink.writer.Sink`):
    one status per database, with ``target.name``, ``flushes``, ``failures``, ``rows``
    and ``last_duration_s``."""

    status: Sequence[Any]

__all__ = ["EdgeCollector", "WorkerCollector", "check_namespace"]

EDGE_LABELS = ["source_service", "target_service", "protocol"]
QUANTILES = (0.5, 0.9, 0.95, 0.99)
STATES = ("closed", "open", "half_open")
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def check_namespace(namespace: str) -> str:
    if not _NAME.fullmatch(namespace):
        raise ValueError(f"metrics namespace {namespace!r} is not a valid Prometheus name "
                         "prefix ([a-zA-Z_:][a-zA-Z0-9_:]*)")
    return namespace


class EdgeCollector(Collector):
    """Per-edge metrics (see the module docstring)."""

    def __init__(self, rollups: Rollups, *, namespace: str = "commpipe",
                 stale_s: float = 300.0, max_edges: int = 10_000,
                 clock: Callable[[], float] = time.time, slo: SloConfig | None = None) -> None:
        self.rollups = rollups
        self.slo = slo or SloConfig()
        self.ns = check_namespace(namespace)
        self.stale_s = stale_s
        self.max_edges = max_edges
        self._clock = clock
        self.refused: set[tuple[str, str, str]] = set()

    def _edges(self) -> list[tuple[tuple[str, str, str], EdgeTotals, Any, int, float]]:
        """(edge, merged totals, newest EdgeMeta, late events, last_seen) of live edges."""
        by_edge: dict[tuple[str, str, str], list[Any]] = {}
        for _, edge, meta in self.rollups.edges():
            by_edge.setdefault(edge, []).append(meta)
        now = self._clock()
        live = []
        for edge, metas in by_edge.items():
            seen = max((m.last_seen for m in metas if m.last_seen is not None),
                       default=math.inf)  # state written before last_seen existed: keep
            if seen != math.inf and now - seen > self.stale_s:
                continue
            totals = EdgeTotals()
            for m in metas:
                totals.merge(m.totals)
            newest = max(metas, key=lambda m: m.last_ts or -math.inf)
            live.append((edge, totals, newest, sum(m.late_events for m in metas), seen))
        live.sort(key=lambda e: (-e[4], e[0]))
        self.refused.update(e[0] for e in live[self.max_edges:])
        return sorted(live[:self.max_edges], key=lambda e: e[0])

    def collect(self) -> Iterator[Metric]:
        p = f"{self.ns}_communication"
        counters = {name: CounterMetricFamily(f"{p}_{name}_total", text, labels=EDGE_LABELS)
                    for name, text in (("requests", "Requests sent"),
                                       ("responses", "Responses received"),
                                       ("timeouts", "Calls that timed out"),
                                       ("retries", "Retries"),
                                       ("late_events", "Events past their window's grace"))}
        errors = CounterMetricFamily(f"{p}_errors_total", "Failed calls by error type",
                                     labels=[*EDGE_LABELS, "error_type"])
        latency = HistogramMetricFamily(f"{p}_latency_seconds",
                                        "Call latency (responses, errors, timeouts)",
                                        labels=EDGE_LABELS)
        # a summary, as Prometheus wants for a quantile label; its _count and _sum are the
        # last closed window's (the running totals are the histogram's)
        quantiles = SummaryMetricFamily(f"{p}_latency_quantile_seconds",
                                        "Latency quantiles (1 %) over the last closed window",
                                        labels=EDGE_LABELS)
        ratio = GaugeMetricFamily(f"{p}_error_ratio", "(errors + timeouts) / outcomes over the "
                                  "last closed window", labels=EDGE_LABELS)
        circuit = GaugeMetricFamily(f"{p}_circuit_state", "1 for the circuit's current state",
                                    labels=[*EDGE_LABELS, "state", "source"])
        slo_ok = GaugeMetricFamily(f"{self.ns}_slo_ok", "1 when the objective held over the "
                                   "last closed window", labels=[*EDGE_LABELS, "objective"])
        slo_measured = GaugeMetricFamily(
            f"{self.ns}_slo_measured", "The objective's measure over the last closed window "
            "(ms, or a 0-1 ratio for delivery_success)", labels=[*EDGE_LABELS, "objective"])
        slo_threshold = GaugeMetricFamily(
            f"{self.ns}_slo_threshold", "The objective's threshold (same unit as measured)",
            labels=[*EDGE_LABELS, "objective"])
        edges = self._edges()
        for edge, t, meta, late, _ in edges:
            labels = list(edge)
            for name, value in (("requests", t.requests), ("responses", t.responses),
                                ("timeouts", t.timeouts), ("retries", t.retries),
                                ("late_events", late)):
                counters[name].add_metric(labels, value)
            for error_type, n in sorted(t.errors.items()):
                errors.add_metric([*labels, error_type], n)
            cumulative, buckets = 0, []
            for bound, n in zip((*LATENCY_BUCKETS_S, math.inf), t.buckets, strict=True):
                cumulative += n
                buckets.append(("+Inf" if bound == math.inf else repr(bound), cumulative))
            latency.add_metric(labels, buckets, t.latency_sum_ms / 1000.0)
            track = meta.derived.track
            for source, state in (("reported", meta.reported.state if meta.reported else None),
                                  ("derived", track.state)):
                if state is not None:
                    for s in STATES:
                        circuit.add_metric([*labels, s, source], 1.0 if s == state else 0.0)
        for edge, stats in self._last_closed(edge for edge, *_ in edges):
            sketch = stats.latency
            if sketch.count:
                quantiles.add_metric(list(edge), sketch.count, sketch.sum / 1000.0)
                quantiles.samples.extend(  # add_metric takes no quantiles
                    Sample(quantiles.name, {**dict(zip(EDGE_LABELS, edge, strict=True)),
                                            "quantile": repr(q)}, sketch.quantile(q) / 1000.0)
                    for q in QUANTILES)
            ratio.add_metric(list(edge), stats.error_rate)
            for result in evaluate(edge, stats, self.slo.for_edge(edge)):
                labels = [*edge, result.objective]
                slo_ok.add_metric(labels, 1.0 if result.ok else 0.0)
                slo_measured.add_metric(labels, result.measured)
                slo_threshold.add_metric(labels, result.threshold)
        yield from counters.values()
        yield from (errors, latency, quantiles, ratio, circuit, slo_ok, slo_measured,
                    slo_threshold)
        yield GaugeMetricFamily(f"{self.ns}_exporter_edges", "Edges reported",
                                value=len(edges))
        yield CounterMetricFamily(f"{self.ns}_exporter_edges_refused_total",
                                  "Edges left out over the cardinality cap",
                                  value=len(self.refused))

    def _last_closed(self, live: Iterator[tuple[str, str, str]]) -> list[tuple[Any, Any]]:
        wanted = set(live)
        newest: dict[tuple[str, str, str], float] = {}
        closed = [r for r in self.rollups.closed_windows() if r.edge in wanted]
        for r in closed:
            newest[r.edge] = max(newest.get(r.edge, -math.inf), r.window_start)
        merged = Rollups.merged(r for r in closed if r.window_start == newest[r.edge])
        return sorted((edge, stats) for (_, edge), stats in merged.items())


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
