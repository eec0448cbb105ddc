"""The exporter's collectors over a dict store: merging, staleness, the cardinality cap,
and the worker's own metrics; exposition parsed back with prometheus-client's parser."""

from __future__ import annotations

import asyncio
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.core.batch import PartitionBatch
from pipeline.core.rollups import Rollups
from pipeline.core.window import WindowConfig
from pipeline.export.collectors import EdgeCollector, WorkerCollector, check_namespace
from pipeline.sink.writer import Sink
from pipeline.wire.events import Event
from tests.unit.sink.test_sink import Recorder

CFG = WindowConfig(size_s=10.0, grace_s=5.0)
T0 = 1_700_000_000.0


def feed(store: dict[str, Any], partition: int, offset: int, events: list[Event],
         now: float) -> None:
    """``now``: seconds of worker clock after the events' own time."""
    batch = PartitionBatch(partition, CFG, store)
    assert batch.apply(offset, events, record_ts=T0 + now, now=T0 + now) == []
    store.update(batch.changes())


def ev(edge: tuple[str, str, str], kind: str, ts: float, n: int, **opt: Any) -> Event:
    return Event(kind, f"i{n}", "c", *edge, ts, **opt)  # type: ignore[arg-type]


def scrape(*collectors: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry(auto_describe=False)
    for c in collectors:
        registry.register(c)
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def lab(edge: tuple[str, str, str], **extra: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted({"source_service": edge[0], "target_service": edge[1],
                         "protocol": edge[2], **extra}.items()))


A, B = ("web", "api", "http"), ("api", "db", "grpc")


def test_an_edge_on_two_partitions_is_added_up() -> None:
    store: dict[str, Any] = {}
    feed(store, 0, 1, [ev(A, "request", T0 + 1, 1), ev(A, "response", T0 + 2, 2,
                                                          latency_ms=3.0)], now=100.0)
    feed(store, 1, 1, [ev(A, "request", T0 + 1, 3), ev(A, "error", T0 + 2, 4,
                                                          error_type="reset", latency_ms=700.0)],
         now=100.0)
    got = scrape(EdgeCollector(Rollups(store, CFG, idle_close_s=1e9), namespace="x",
                               clock=lambda: T0 + 100.0))
    assert got[("x_communication_requests_total", lab(A))] == 2
    assert got[("x_communication_errors_total", lab(A, error_type="reset"))] == 1
    assert got[("x_communication_latency_seconds_bucket", lab(A, le="0.005"))] == 1
    assert got[("x_communication_latency_seconds_bucket", lab(A, le="0.5"))] == 1
    assert got[("x_communication_latency_seconds_bucket", lab(A, le="1.0"))] == 2
    assert got[("x_communication_latency_seconds_sum", lab(A))] == pytest.approx(0.703)
    # nothing closed yet: no window gauges
    assert not [k for k in got if k[0] == "x_communication_error_ratio"]


def test_stale_edges_leave_and_the_cap_counts_refused_edges() -> None:
    store: dict[str, Any] = {}
    feed(store, 0, 1, [ev(A, "request", T0 + 1, 1)], now=100.0)
    feed(store, 0, 2, [ev(B, "request", T0 + 2, 2)], now=200.0)
    clock = SimpleNamespace(now=250.0)
    collector = EdgeCollector(Rollups(store, CFG, idle_close_s=1e9), stale_s=200.0, max_edges=1,
                              clock=lambda: T0 + clock.now)
    got = scrape(collector)
    # both live; the cap keeps the most recent (B) and refuses A
    assert got[("commpipe_communication_requests_total", lab(B))] == 1
    assert ("commpipe_communication_requests_total", lab(A)) not in got
    assert got[("commpipe_exporter_edges_refused_total", ())] == 1
    clock.now = 420.0  # A silent for 320 s, B for 220 s: both stale
    got = scrape(collector)
    assert got[("commpipe_exporter_edges", ())] == 0
    assert got[("commpipe_exporter_edges_refused_total", ())] == 1  # a counter: never drops


def test_last_closed_window_gauges_and_circuit_states() -> None:
    store: dict[str, Any] = {}
    fails = [ev(A, "error", T0 + 1 + i / 10, i, error_type="x", latency_ms=10.0)
             for i in range(3)]
    feed(store, 0, 1, [*fails, ev(A, "circuit", T0 + 2, 9, circuit_state="half_open"),
                       ev(A, "response", T0 + 12, 10, latency_ms=20.0),
                       ev(A, "request", T0 + 30, 11)], now=100.0)
    got = scrape(EdgeCollector(Rollups(store, CFG, idle_close_s=1e9), clock=lambda: T0 + 100.0))
    p = "commpipe_communication"
    # T0 and T0+10 are closed (watermark T0+30); the newest closed one is T0+10
    assert got[(f"{p}_error_ratio", lab(A))] == 0.0
    assert got[(f"{p}_latency_quantile_seconds", lab(A, quantile="0.5"))] == pytest.approx(
        0.020, rel=0.01)
    states = Counter({k[1]: v for k, v in got.items() if k[0] == f"{p}_circuit_state"})
    assert states[lab(A, state="half_open", source="reported")] == 1
    assert states[lab(A, state="open", source="reported")] == 0
    # three failures opened the derived breaker; the response 10 s later probed it closed
    assert states[lab(A, state="closed", source="derived")] == 1
    assert sum(states.values()) == 2


def test_worker_metrics() -> None:
    store: dict[str, Any] = {}
    feed(store, 0, 1, [ev(A, "request", T0 + 1, 1), ev(A, "request", T0 + 30, 2)], now=1.0)
    recorder = Recorder("duckdb")
    sink = Sink(Rollups(store, CFG, idle_close_s=1e9), [recorder])
    asyncio.run(sink.flush())
    pipeline = SimpleNamespace(events_in=7, duplicates=4, batches=2, batch_records=5,
                               dead_letters=SimpleNamespace(counts=Counter(invalid_json=3)),
                               lag=lambda: {0: 4, 2: 0},
                               state_keys=lambda: {"window": 3, "edge": 1},
                               cache=SimpleNamespace(unwritten=lambda: 6, write_outs=9))
    got = scrape(WorkerCollector(pipeline, namespace="w", sink=sink))
    assert got[("w_events_consumed_total", ())] == 7
    assert got[("w_duplicate_events_total", ())] == 4
    assert got[("w_worker_batch_records_total", ())] == 5
    assert got[("w_worker_unwritten_records", ())] == 6
    assert got[("w_worker_write_outs_total", ())] == 9
    assert got[("w_dead_letters_total", (("reason", "invalid_json"),))] == 3
    assert got[("w_consumer_lag", (("partition", "0"),))] == 4
    assert got[("w_state_keys", (("kind", "window"),))] == 3
    assert got[("w_sink_flushes_total", (("database", "duckdb"),))] == 1
    assert got[("w_sink_windows_total", (("database", "duckdb"),))] == 1
    assert got[("w_sink_flush_failures_total", (("database", "duckdb"),))] == 0


@pytest.mark.parametrize("bad", ["", "1abc", "a-b", "a b"])
def test_bad_namespace(bad: str) -> None:
    with pytest.raises(ValueError, match="not a valid Prometheus name"):
        check_namespace(bad)
