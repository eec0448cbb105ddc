"""The exporter over a dict store: merging, staleness, the series cap, counters that never
decrease, and the worker's own metrics; exposition parsed back with prometheus-client's
parser (and, where promtool is installed, checked by it)."""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.core.batch import PartitionBatch
from pipeline.core.rollups import Rollups
from pipeline.core.store import partition_id
from pipeline.core.window import WindowConfig
from pipeline.export.collectors import WorkerCollector, check_namespace
from pipeline.export.edges import EdgeExporter
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


Scraped = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Scraped:
    out: Scraped = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in out, key  # no duplicate series
            out[key] = s.value
    return out


def scrape(source: Any) -> Scraped:
    """One scrape of an EdgeExporter or a prometheus-client collector."""
    if isinstance(source, EdgeExporter):
        return parse(source.scrape().decode())
    registry = CollectorRegistry(auto_describe=False)
    registry.register(source)
    return parse(generate_latest(registry).decode())


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
    got = scrape(EdgeExporter(Rollups(store, CFG, idle_close_s=1e9), namespace="x",
                               clock=lambda: T0 + 100.0))
    assert got[("x_communication_requests_total", lab(A))] == 2
    assert got[("x_communication_errors_total", lab(A, error_type="reset"))] == 1
    assert got[("x_communication_latency_seconds_bucket", lab(A, le="0.005"))] == 1
    assert got[("x_communication_latency_seconds_bucket", lab(A, le="0.5"))] == 1
    assert got[("x_communication_latency_seconds_bucket", lab(A, le="1.0"))] == 2
    assert got[("x_communication_latency_seconds_sum", lab(A))] == pytest.approx(0.703)
    # nothing closed yet: no window gauges
    assert not [k for k in got if k[0] == "x_communication_error_ratio"]


# an edge with one request: 5 counters, 10 bounds + +Inf + _count + _sum, 3 derived states
BARE_EDGE_SERIES = 5 + (10 + 3) + 3


def edge_series(got: Scraped) -> int:
    return sum(1 for _, labels in got if dict(labels).get("source_service"))


def test_stale_edges_leave_and_the_cap_counts_series_and_refusals(
        caplog: pytest.LogCaptureFixture) -> None:
    C = ("batch", "api", "http")
    store: dict[str, Any] = {}
    feed(store, 0, 1, [ev(A, "request", T0 + 1, 1)], now=100.0)
    feed(store, 0, 2, [ev(B, "request", T0 + 2, 2)], now=200.0)
    clock = SimpleNamespace(now=250.0)
    exporter = EdgeExporter(Rollups(store, CFG, idle_close_s=1e9), stale_s=200.0,
                            max_series=BARE_EDGE_SERIES + 5, clock=lambda: T0 + clock.now)
    got = scrape(exporter)
    # both live, room for one edge's series: the most recent (B) is kept, A refused
    assert got[("commpipe_communication_requests_total", lab(B))] == 1
    assert ("commpipe_communication_requests_total", lab(A)) not in got
    assert edge_series(got) == got[("commpipe_exporter_series", ())] == BARE_EDGE_SERIES
    assert got[("commpipe_exporter_edges_refused", ())] == 1
    assert got[("commpipe_exporter_edges_refused_total", ())] == 1
    got = scrape(exporter)  # the same edge refused again is not a new refusal
    assert got[("commpipe_exporter_edges_refused_total", ())] == 1
    # a newer edge does not push out the one reported: it is refused too
    feed(store, 0, 3, [ev(C, "request", T0 + 3, 3)], now=240.0)
    got = scrape(exporter)
    assert ("commpipe_communication_requests_total", lab(B)) in got
    assert got[("commpipe_exporter_edges_refused", ())] == 2
    assert got[("commpipe_exporter_edges_refused_total", ())] == 2
    clock.now = 401.0  # A silent 301 s, B 201 s: both stale; C (161 s) takes the room
    got = scrape(exporter)
    assert got[("commpipe_communication_requests_total", lab(C))] == 1
    assert got[("commpipe_exporter_edges", ())] == 1
    assert got[("commpipe_exporter_edges_refused", ())] == 0
    assert got[("commpipe_exporter_edges_refused_total", ())] == 2  # a counter: never drops
    clock.now = 500.0
    got = scrape(exporter)
    assert got[("commpipe_exporter_edges", ())] == 0
    assert edge_series(got) == 0
    refusals = [r.getMessage() for r in caplog.records if "left out of /metrics" in r.message]
    assert refusals == [
        f"exporter: edge web -> api (http) left out of /metrics: its {BARE_EDGE_SERIES} series "
        f"would pass COMMPIPE_METRICS_MAX_SERIES={BARE_EDGE_SERIES + 5}",
        f"exporter: edge batch -> api (http) left out of /metrics: its {BARE_EDGE_SERIES} "
        f"series would pass COMMPIPE_METRICS_MAX_SERIES={BARE_EDGE_SERIES + 5}"]


def test_counters_never_decrease_when_a_partition_of_the_edge_is_revoked() -> None:
    """An edge on two partitions (a producer with another partitioner): losing one keeps
    its last totals in the counters; getting it back goes on from its state."""
    store: dict[str, Any] = {}
    feed(store, 0, 1, [ev(A, "request", T0 + 1, 1), ev(A, "request", T0 + 1, 2)], now=1.0)
    feed(store, 1, 1, [ev(A, "request", T0 + 1, 3),
                       ev(A, "response", T0 + 2, 4, latency_ms=3.0)], now=1.0)
    owned = {0, 1}
    exporter = EdgeExporter(Rollups(store, CFG, idle_close_s=1e9, owned=owned.__contains__),
                            clock=lambda: T0 + 2.0)
    requests = ("commpipe_communication_requests_total", lab(A))
    bucket = ("commpipe_communication_latency_seconds_bucket", lab(A, le="0.005"))
    got = scrape(exporter)
    assert (got[requests], got[bucket]) == (3, 1)
    exporter.retire({1})  # partition 1 moves to another worker (the revoke hook)
    owned.discard(1)
    key = next(k for k in store if k.startswith("e\x1e1"))
    left = store.pop(key)  # and leaves this worker's memory
    got = scrape(exporter)
    assert (got[requests], got[bucket]) == (3, 1)
    feed(store, 0, 2, [ev(A, "request", T0 + 2, 5)], now=2.0)
    assert scrape(exporter)[requests] == 4
    store[key] = left  # the other worker's state, as the changelog gives it back
    feed(store, 1, 2, [ev(A, "request", T0 + 2, 6)], now=2.0)  # written while elsewhere
    owned.add(1)  # and back, with its state: it replaces the retired totals
    got = scrape(exporter)
    assert (got[requests], got[bucket]) == (5, 1)
    assert exporter._retired == {}  # noqa: SLF001 - forgotten once superseded
    assert not [k for k in got if k[0].startswith("commpipe_communication_latency_quantile")
                and k[0].endswith(("_count", "_sum"))]  # a window's count is no counter


def test_retired_totals_of_an_edge_that_went_stale_are_forgotten() -> None:
    store: dict[str, Any] = {}
    feed(store, 0, 1, [ev(A, "request", T0 + 1, 1)], now=1.0)
    feed(store, 1, 1, [ev(A, "request", T0 + 1, 2)], now=1.0)
    owned, clock = {0, 1}, SimpleNamespace(now=2.0)
    exporter = EdgeExporter(Rollups(store, CFG, idle_close_s=1e9, owned=owned.__contains__),
                            stale_s=100.0, clock=lambda: T0 + clock.now)
    exporter.retire([1])
    owned.discard(1)
    requests = ("commpipe_communication_requests_total", lab(A))
    assert scrape(exporter)[requests] == 2
    clock.now = 200.0  # silent 199 s: stale
    assert requests not in scrape(exporter)
    assert exporter._retired == {}  # noqa: SLF001
    feed(store, 0, 2, [ev(A, "request", T0 + 200, 3)], now=200.0)
    assert scrape(exporter)[requests] == 2  # partition 0's own: 2 requests


def test_the_exposition_passes_promtool(tmp_path: Any) -> None:
    import shutil
    import subprocess

    store: dict[str, Any] = {}
    feed(store, 0, 1, [ev(A, "error", T0 + 1, 1, error_type="x", latency_ms=10.0),
                       ev(A, "circuit", T0 + 2, 2, circuit_state="open"),
                       ev(A, "retry", T0 + 3, 3, attempt=1, backoff_ms=10.0),
                       ev(A, "response", T0 + 12, 4, latency_ms=20.0),
                       ev(B, "request", T0 + 30, 5)], now=100.0)
    text = EdgeExporter(Rollups(store, CFG, idle_close_s=1e9), clock=lambda: T0 + 100.0
                        ).scrape()
    tool = shutil.which("promtool")
    if tool is None:
        pytest.fail("promtool is needed: apt-get install -y prometheus (.ci/run does)")
    done = subprocess.run([tool, "check", "metrics"], input=text, capture_output=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert b"slo_ok" in text and b'source="reported"' in text


def test_last_closed_window_gauges_and_circuit_states() -> None:
    store: dict[str, Any] = {}
    fails = [ev(A, "error", T0 + 1 + i / 10, i, error_type="x", latency_ms=10.0)
             for i in range(3)]
    feed(store, 0, 1, [*fails, ev(A, "circuit", T0 + 2, 9, circuit_state="half_open"),
                       ev(A, "response", T0 + 12, 10, latency_ms=20.0),
                       ev(A, "request", T0 + 30, 11)], now=100.0)
    got = scrape(EdgeExporter(Rollups(store, CFG, idle_close_s=1e9), clock=lambda: T0 + 100.0))
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


def ratio_and_p50(got: Scraped, edge: tuple[str, str, str]) -> tuple[float, float] | None:
    p = "commpipe_communication"
    if (f"{p}_error_ratio", lab(edge)) not in got:
        return None
    return (got[(f"{p}_error_ratio", lab(edge))],
            got[(f"{p}_latency_quantile_seconds", lab(edge, quantile="0.5"))])


def test_the_last_closed_window_is_found_however_far_back_or_misaligned() -> None:
    """The exporter looks windows up by their slot from the watermark down (PROBES slots),
    then by a pass over the table: every case below reports the same window either way."""
    store: dict[str, Any] = {}
    quiet, new, late = ("q", "x", "http"), ("n", "x", "http"), ("l", "x", "http")
    # quiet: one error (40 ms) at T0+1, then silence while B runs to T0+95: its only window,
    # 9 slots behind the watermark, is the last closed one
    feed(store, 0, 1, [ev(quiet, "error", T0 + 1, 1, error_type="x", latency_ms=40.0)],
         now=100.0)
    # late: a response at T0+52 (window T0+50), then, once B has moved the watermark to
    # T0+95, one 50 s late, counted in the watermark's window (T0+90, open): the last
    # closed window stays T0+50
    feed(store, 0, 2, [ev(late, "response", T0 + 52, 2, latency_ms=9.0)], now=100.0)
    feed(store, 0, 3, [ev(B, "response", T0 + 95, 3, latency_ms=5.0)], now=100.0)
    feed(store, 0, 4, [ev(late, "response", T0 + 45, 4, latency_ms=1.0)], now=100.0)
    # new: events in the open window only (nothing of it closed)
    feed(store, 0, 5, [ev(new, "response", T0 + 93, 5, latency_ms=7.0)], now=100.0)
    # on partition 1, a window stored under another size (the worker ran with 7 s
    # windows; its start, T0+71, is no slot of the 10 s windows), then 10 s windows again
    odd = WindowConfig(size_s=7.0, grace_s=5.0)
    C = ("o", "x", "http")
    batch = PartitionBatch(1, odd, store)
    batch.apply(1, [ev(C, "error", T0 + 71.5, 6, error_type="y", latency_ms=30.0)],
                record_ts=T0 + 100, now=T0 + 100)
    store.update(batch.changes())
    feed(store, 1, 2, [ev(A, "request", T0 + 95, 7)], now=100.0)

    def report(idle_s: float) -> Scraped:
        return scrape(EdgeExporter(Rollups(store, CFG, idle_close_s=idle_s),
                                   clock=lambda: T0 + 100.0))

    got = report(1e9)
    assert ratio_and_p50(got, quiet) == (1.0, pytest.approx(0.040, rel=0.01))
    assert ratio_and_p50(got, new) is None
    assert ratio_and_p50(got, late) == (0.0, pytest.approx(0.009, rel=0.01))
    assert ratio_and_p50(got, C) == (1.0, pytest.approx(0.030, rel=0.01))
    assert ratio_and_p50(got, B) is None  # its only window, T0+90, is open
    # closed for idleness, every window is closed: each edge's newest counts
    got = report(0.0)
    assert ratio_and_p50(got, new) == (0.0, pytest.approx(0.007, rel=0.01))
    assert ratio_and_p50(got, B) == (0.0, pytest.approx(0.005, rel=0.01))
    assert ratio_and_p50(got, C) == (1.0, pytest.approx(0.030, rel=0.01))
    p = "commpipe_communication"
    # the late event's window holds no latency: a ratio of 0 outcomes, no quantiles
    assert got[(f"{p}_error_ratio", lab(late))] == 0.0
    assert (f"{p}_latency_quantile_seconds", lab(late, quantile="0.5")) not in got


def test_a_partition_without_event_time_renders() -> None:
    """A partition state that has no watermark yet (-inf) has nothing closed by it, and its
    windows are no slot of anything: the render looks for them, and does not fail."""
    store: dict[str, Any] = {}
    feed(store, 0, 1, [ev(A, "response", T0 + 1, 1, latency_ms=4.0)], now=100.0)
    store[partition_id(0)].watermark = -math.inf

    def report(idle_s: float) -> Scraped:
        return scrape(EdgeExporter(Rollups(store, CFG, idle_close_s=idle_s),
                                   clock=lambda: T0 + 100.0))

    assert ratio_and_p50(report(1e9), A) is None
    assert ratio_and_p50(report(0.0), A) == (0.0, pytest.approx(0.004, rel=0.01))


def test_worker_metrics() -> None:
    store: dict[str, Any] = {}
    feed(store, 0, 1, [ev(A, "request", T0 + 1, 1), ev(A, "request", T0 + 30, 2)], now=1.0)
    recorder = Recorder("duckdb")
    sink = Sink(Rollups(store, CFG, idle_close_s=1e9), [recorder])
    asyncio.run(sink.flush())
    worker = SimpleNamespace(events_in=7, duplicates=4, batches=2, batch_records=5,
                             replayed=13, dropped=11, unwritten=6, write_outs=9, commits=8,
                             commit_refusals=1, edges_expired=12,
                             dead_letter_counts=Counter(invalid_json=3),
                             lag=lambda: {0: 4, 2: 0},
                             state_keys=lambda: {"window": 3, "edge": 1})
    got = scrape(WorkerCollector(worker, namespace="w", sink=sink))
    assert got[("w_events_consumed_total", ())] == 7
    assert got[("w_duplicate_events_total", ())] == 4
    assert got[("w_worker_batch_records_total", ())] == 5
    assert got[("w_worker_unwritten_records", ())] == 6
    assert got[("w_worker_write_outs_total", ())] == 9
    assert got[("w_worker_batches_total", ())] == 2
    assert got[("w_worker_replayed_records_total", ())] == 13
    assert got[("w_worker_dropped_records_total", ())] == 11
    assert got[("w_worker_commits_total", ())] == 8
    assert got[("w_worker_commit_refusals_total", ())] == 1
    assert got[("w_worker_edges_expired_total", ())] == 12
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


def test_a_partition_back_with_older_state_than_it_left_with_keeps_the_counters() -> None:
    """Recovery never gives back less than was applied, but if it did, the counters hold."""
    store: dict[str, Any] = {}
    feed(store, 0, 1, [ev(A, "request", T0 + 1, 1)], now=1.0)
    feed(store, 1, 1, [ev(A, "request", T0 + 1, 2)], now=1.0)
    key = next(k for k in store if k.startswith("e\x1e1"))
    older = store[key]
    feed(store, 1, 2, [ev(A, "request", T0 + 1, 3)], now=1.0)
    owned = {0, 1}
    exporter = EdgeExporter(Rollups(store, CFG, idle_close_s=1e9, owned=owned.__contains__),
                            clock=lambda: T0 + 2.0)
    requests = ("commpipe_communication_requests_total", lab(A))
    assert scrape(exporter)[requests] == 3
    exporter.retire([1])
    store[key] = older  # back with one request, not two
    assert scrape(exporter)[requests] == 3
    assert set(exporter._retired[A]) == {1}  # noqa: SLF001 - kept while it is behind
