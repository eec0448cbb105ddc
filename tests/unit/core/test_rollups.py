"""Rollups over a hand-built dict store: closing rules, merging across partitions, circuits."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from pipeline.core.circuit import Breaker, StateTrack
from pipeline.core.details import DetailBatch
from pipeline.core.edge import EdgeMeta, PartitionMeta
from pipeline.core.rollups import CircuitView, Rollups, WindowRow
from pipeline.core.sketch import GAMMA
from pipeline.core.store import detail_id, edge_id, parse_id, partition_id, window_id
from pipeline.core.window import WindowConfig, WindowStats
from pipeline.wire.events import edge_key

CFG = WindowConfig(size_s=10.0, grace_s=5.0, max_future_s=300.0)
T0 = 1_700_000_000.0
A = ("api", "db", "grpc")
B = ("web", "api", "http")
IDLE = 30.0


def _stats(start: float, *, latencies: tuple[float, ...] = (), **kw: Any) -> WindowStats:
    s = WindowStats(start, start + 10.0, **kw)
    for v in latencies:
        s.latency.add(v)
    return s


def _bins(values: list[float]) -> dict[int, int]:
    out: dict[int, int] = {}
    for v in values:
        b = math.ceil(math.log(v) / math.log(GAMMA))
        out[b] = out.get(b, 0) + 1
    return out


# Windows by (partition, edge, start offset from T0).
WINDOWS = {
    (0, A, 0.0): dict(requests=3, errors={"x": 1}, latencies=(1.0, 2.0, 4.0), first_ts=T0 + 1,
                      last_ts=T0 + 9, derived_state="open"),
    (0, A, 10.0): dict(requests=1, last_ts=T0 + 11, first_ts=T0 + 11),
    (0, A, 20.0): dict(requests=2, responses=2, latencies=(3.0, 5.0), first_ts=T0 + 21,
                       last_ts=T0 + 24.5, derived_state="open", reported_state="open"),
    (0, B, 20.0): dict(requests=1, responses=1, latencies=(16.0,), payload_bytes=10,
                       health={"healthy": 1}, first_ts=T0 + 22, last_ts=T0 + 23,
                       transitions={"derived:open": 1}, derived_state="open"),
    (1, A, 0.0): dict(requests=5, errors={"x": 2, "y": 1}, timeouts=2, latencies=(8.0, 0.5),
                      retries=1, retry_backoff_ms=2.5, late_events=1, health={"degraded": 2},
                      transitions={"derived:open": 1, "reported:open": 1}, first_ts=T0 + 0.5,
                      last_ts=T0 + 9.5, derived_state="half_open", reported_state="open"),
    (1, A, 10.0): dict(responses=4, latencies=(7.0, 7.0, 9.0, 0.25), first_ts=T0 + 12,
                       last_ts=T0 + 13.5),
    (1, B, 20.0): dict(requests=4, responses=3, latencies=(2.0, 32.0, 64.0), payload_bytes=5,
                       health={"healthy": 2, "unhealthy": 1}, first_ts=T0 + 20.5,
                       last_ts=T0 + 29, transitions={"derived:open": 2, "derived:closed": 1},
                       derived_state="closed", reported_state="closed"),
    (2, B, 0.0): dict(requests=9, first_ts=T0 + 1, last_ts=T0 + 2),  # partition without meta
}
# Partition metas: watermark (event time) and last_seen (worker clock).
METAS = {0: (T0 + 25.0, 1000.0), 1: (T0 + 14.5, 2000.0)}


def build_store() -> dict[str, Any]:
    store: dict[str, Any] = {}
    for (p, edge, off), fields in WINDOWS.items():
        store[window_id(p, edge_key(*edge), T0 + off)] = _stats(T0 + off, **fields)
    for p, (wm, seen) in METAS.items():
        store[partition_id(p)] = PartitionMeta(wm, seen, 100 + p)
    return store


def expected_closed(now: float, since: float = -math.inf) -> list[tuple[int, tuple, float]]:
    """Independent statement of the closing rules, sorted by (start, edge, partition)."""
    out = []
    for (p, edge, off) in WINDOWS:
        end = T0 + off + 10.0
        if p not in METAS or end <= since:
            continue
        wm, seen = METAS[p]
        if end + 5.0 <= wm or now - seen >= IDLE:
            out.append((T0 + off, edge, p))
    return sorted(out)


def rows_key(rows: list[WindowRow]) -> list[tuple[float, tuple, int]]:
    return [(r.window_start, r.edge, r.partition) for r in rows]


def make(store: dict[str, Any], clock: float = 0.0) -> Rollups:
    return Rollups(store, CFG, idle_close_s=IDLE, clock=lambda: clock)


def test_windows_lists_every_window_sorted() -> None:
    rows = make(build_store()).windows()
    assert rows_key(rows) == sorted((T0 + off, e, p) for (p, e, off) in WINDOWS)
    for r in rows:
        assert (r.source_service, r.target_service, r.protocol) == r.edge
        assert r.window_end == r.window_start + 10.0
        assert r.stats.requests == WINDOWS[(r.partition, r.edge, r.window_start - T0)].get(
            "requests", 0)


@pytest.mark.parametrize("now", [0.0, 1029.999, 1030.0, 2029.999, 2030.0, 1e9])
def test_closed_windows_watermark_and_idle_rules(now: float) -> None:
    rollups = make(build_store())
    got = rows_key(rollups.closed_windows(now=now))
    assert got == expected_closed(now)


@pytest.mark.parametrize("now", [0.0, 1029.999, 1030.0, 2029.999, 2030.0, 1e9])
def test_closed_items_are_the_closed_windows_by_key(now: float) -> None:
    """The sink's unsorted scan holds the same windows, under their store keys."""
    store = build_store()
    rollups = make(store)
    items = rollups.closed_items(now=now)
    assert sorted((w.window_start, parse_id(k)[2], p) for k, p, w in items) == sorted(
        (start, edge_key(*edge), p) for start, edge, p in expected_closed(now))
    assert all(store[k] is w for k, _, w in items)


def test_closed_windows_watermark_rule_exact_boundaries() -> None:
    rollups = make(build_store())
    # partition 0, watermark T0+25: end T0+10 and T0+20 closed (20 + 5 <= 25), T0+30 not
    got = rows_key(rollups.closed_windows(now=0.0))
    assert got == [(T0, A, 0), (T0 + 10, A, 0)]
    # partition 1, watermark T0+14.5: T0+10 + 5 > 14.5: nothing closed yet
    assert rollups.is_closed(1, T0 + 10, now=0.0) is False
    assert rollups.is_closed(1, T0 + 9.5, now=0.0) is True
    assert rollups.is_closed(0, T0 + 20, now=0.0) is True
    assert rollups.is_closed(0, T0 + 20.25, now=0.0) is False


def test_idle_rule_closes_every_window_of_the_quiet_partition() -> None:
    rollups = make(build_store())
    got = rows_key(rollups.closed_windows(now=2030.0))
    assert got == sorted([(T0, A, 0), (T0 + 10, A, 0), (T0 + 20, A, 0), (T0 + 20, B, 0),
                          (T0, A, 1), (T0 + 10, A, 1), (T0 + 20, B, 1)])
    assert (T0, B, 2) not in got  # no partition meta: never closed


def test_closed_windows_uses_clock_when_now_not_given() -> None:
    store = build_store()
    assert rows_key(make(store, clock=1030.0).closed_windows()) == expected_closed(1030.0)
    assert rows_key(make(store, clock=0.0).closed_windows()) == expected_closed(0.0)
    assert expected_closed(1030.0) != expected_closed(0.0)


@pytest.mark.parametrize("since", [-math.inf, T0 + 9.99, T0 + 10.0, T0 + 20.0, T0 + 29.0,
                                   T0 + 30.0])
def test_closed_windows_since_filter(since: float) -> None:
    rollups = make(build_store())
    got = rows_key(rollups.closed_windows(since, now=5000.0))
    assert got == expected_closed(5000.0, since)
    assert all(start + 10.0 > since for start, _, _ in got)


def test_merged_adds_counts_and_merges_sketches() -> None:
    store = build_store()
    before = {k: v.to_json() for k, v in store.items()}
    rows = make(store).windows()
    merged = Rollups.merged(rows)
    assert set(merged) == {(T0 + off, e) for (_, e, off) in WINDOWS}
    m = merged[(T0, A)]
    p0, p1 = WINDOWS[(0, A, 0.0)], WINDOWS[(1, A, 0.0)]
    assert (m.window_start, m.window_end) == (T0, T0 + 10)
    assert m.requests == 3 + 5
    assert m.errors == {"x": 3, "y": 1}
    assert (m.timeouts, m.retries, m.retry_backoff_ms, m.late_events) == (2, 1, 2.5, 1)
    assert m.health == {"degraded": 2}
    assert m.transitions == {"derived:open": 1, "reported:open": 1}
    values = list(p0["latencies"]) + list(p1["latencies"])
    assert (m.latency.count, m.latency.sum, m.latency.min, m.latency.max) == (
        len(values), sum(values), min(values), max(values))
    assert m.latency.bins == _bins(values)
    assert (m.first_ts, m.last_ts) == (T0 + 0.5, T0 + 9.5)
    assert (m.derived_state, m.reported_state) == ("half_open", "open")  # from later last_ts
    assert m.error_rate == (3 + 1 + 2) / max(0 + 3 + 1 + 2, 1)
    m2 = merged[(T0 + 20, B)]
    assert (m2.requests, m2.responses, m2.payload_bytes) == (5, 4, 15)
    assert m2.health == {"healthy": 3, "unhealthy": 1}
    assert m2.transitions == {"derived:open": 3, "derived:closed": 1}
    assert m2.latency.bins == _bins([16.0, 2.0, 32.0, 64.0])
    assert (m2.first_ts, m2.last_ts) == (T0 + 20.5, T0 + 29)
    assert (m2.derived_state, m2.reported_state) == ("closed", "closed")
    # merging reads the rows, never writes them
    assert {k: v.to_json() for k, v in store.items()} == before


def test_merged_state_comes_from_latest_row_whatever_the_order() -> None:
    early = _stats(T0, requests=1, first_ts=T0 + 1, last_ts=T0 + 2, derived_state="open",
                   reported_state="open")
    late = _stats(T0, requests=2, first_ts=T0 + 3, last_ts=T0 + 8, derived_state="closed",
                  reported_state="half_open")
    rows_a = [WindowRow(0, *A, T0, T0 + 10, early), WindowRow(1, *A, T0, T0 + 10, late)]
    for rows in (rows_a, rows_a[::-1]):
        m = Rollups.merged(rows)[(T0, A)]
        assert (m.requests, m.first_ts, m.last_ts) == (3, T0 + 1, T0 + 8)
        assert (m.derived_state, m.reported_state) == ("closed", "half_open")


def test_merged_random_partitions_match_sum() -> None:
    r = random.Random(17)
    rows = []
    want_req: dict[float, int] = {}
    want_lat: dict[float, list[float]] = {}
    for p in range(4):
        for w in range(5):
            start = T0 + 10.0 * w
            lat = [r.choice([0.5, 1.0, 2.25, 40.0, 1e4]) for _ in range(r.randint(0, 6))]
            n = r.randint(0, 50)
            rows.append(WindowRow(p, *A, start, start + 10, _stats(start, requests=n,
                                                                   latencies=tuple(lat))))
            want_req[start] = want_req.get(start, 0) + n
            want_lat.setdefault(start, []).extend(lat)
    merged = Rollups.merged(rows)
    assert set(merged) == {(s, A) for s in want_req}
    for s, n in want_req.items():
        m = merged[(s, A)]
        assert m.requests == n
        assert m.latency.count == len(want_lat[s])
        assert m.latency.sum == sum(want_lat[s])  # dyadic values: exact in any order
        assert m.latency.bins == _bins(want_lat[s])


def test_live_window_newest_merged_across_partitions() -> None:
    store = build_store()
    before = {k: v.to_json() for k, v in store.items()}
    rollups = make(store)
    live_b = rollups.live_window(*B)
    assert live_b is not None
    assert (live_b.window_start, live_b.requests, live_b.responses) == (T0 + 20, 5, 4)
    assert live_b.latency.bins == _bins([16.0, 2.0, 32.0, 64.0])
    live_a = rollups.live_window(*A)
    assert live_a is not None
    assert (live_a.window_start, live_a.requests, live_a.responses) == (T0 + 20, 2, 2)
    assert (live_a.latency.count, live_a.latency.sum) == (2, 8.0)
    assert rollups.live_window("nobody", "db", "grpc") is None
    assert rollups.live_window("api", "db", "http") is None
    assert {k: v.to_json() for k, v in store.items()} == before


def test_live_window_prefers_newer_partition_window() -> None:
    store = {window_id(0, edge_key(*A), T0): _stats(T0, requests=1),
             window_id(3, edge_key(*A), T0 + 10): _stats(T0 + 10, requests=7)}
    live = make(store).live_window(*A)
    assert live is not None and (live.window_start, live.requests) == (T0 + 10, 7)


def _edge_meta(last_ts: float | None, derived: StateTrack, reported: StateTrack | None
               ) -> EdgeMeta:
    return EdgeMeta(reported, Breaker(derived), 0, last_ts, 5)


def test_circuit_from_partition_with_latest_last_ts() -> None:
    store = build_store()
    a, b = edge_key(*A), edge_key(*B)
    store[edge_id(0, a)] = _edge_meta(
        T0 + 5, StateTrack("open", T0 + 4, {"open": 1}, {"closed": 3.0}), None)
    store[edge_id(1, a)] = _edge_meta(
        T0 + 9, StateTrack("closed", T0 + 7, {"open": 1, "half_open": 1, "closed": 1},
                           {"closed": 3.0, "open": 2.0, "half_open": 1.0}),
        StateTrack("open", T0 + 2, {"open": 1}, {"closed": 1.0}))
    store[edge_id(2, a)] = _edge_meta(None, StateTrack(), None)  # only late events seen
    # an edge whose key ends like A's but is another edge: must not be picked
    store[edge_id(0, edge_key("xapi", "db", "grpc"))] = _edge_meta(
        T0 + 99, StateTrack("half_open", T0 + 98), None)
    store[edge_id(0, b)] = _edge_meta(T0 + 50, StateTrack("closed", T0 + 1), None)
    view = make(store).circuit(*A)
    assert view == CircuitView(
        reported="open", derived="closed", reported_entered={"open": 1},
        derived_entered={"open": 1, "half_open": 1, "closed": 1},
        derived_seconds={"closed": 3.0 + (9.0 - 7.0), "open": 2.0, "half_open": 1.0})
    vb = make(store).circuit(*B)
    assert vb == CircuitView(reported=None, derived="closed", reported_entered={},
                             derived_entered={}, derived_seconds={"closed": 49.0, "open": 0.0,
                                                                  "half_open": 0.0})
    assert make(store).circuit("nobody", "db", "grpc") is None
    assert make(store).circuit("api", "db", "http") is None


def test_circuit_open_edge_seconds_up_to_last_event() -> None:
    a = edge_key(*A)
    store = {edge_id(0, a): _edge_meta(
        T0 + 12.5, StateTrack("open", T0 + 10, {"open": 2, "half_open": 1, "closed": 1},
                              {"closed": 6.0, "open": 1.5, "half_open": 0.5}), None)}
    view = make(store).circuit(*A)
    assert view is not None
    assert view.derived == "open"
    assert view.derived_seconds == {"closed": 6.0, "open": 1.5 + 2.5, "half_open": 0.5}


def test_partition_meta_lookup() -> None:
    store = build_store()
    rollups = make(store)
    meta = rollups.partition_meta(0)
    assert meta is not None and (meta.watermark, meta.last_seen) == METAS[0]
    assert rollups.partition_meta(2) is None
    assert rollups.is_closed(2, T0, now=1e12) is False


def test_only_owned_partitions_are_reported() -> None:
    """A worker's table also holds standby copies of other workers' partitions."""
    rollups = Rollups(build_store(), CFG, idle_close_s=IDLE, clock=lambda: 0.0,
                      owned=lambda partition: partition == 1)
    assert rows_key(rollups.windows()) == sorted(
        (T0 + off, e, p) for (p, e, off) in WINDOWS if p == 1)
    assert {r.partition for r in rollups.closed_windows(now=10_000.0)} == {1}
    assert {p for _, p, _ in rollups.closed_items(now=10_000.0)} == {1}


def test_kept_events_of_owned_partitions_by_partition_and_offset() -> None:
    store = build_store()
    batches = {(p, off): DetailBatch(events=[{"event_id": f"{p}.{off}"}], offset=off)
               for p, off in ((1, 9), (0, 3), (1, 2), (2, 1), (0, 12))}
    for (p, off), batch in batches.items():
        store[detail_id(p, off)] = batch
    every = Rollups(store, CFG, idle_close_s=IDLE, clock=lambda: 0.0)
    assert every.details() == [(detail_id(p, off), batches[p, off])
                               for p, off in ((0, 3), (0, 12), (1, 2), (1, 9), (2, 1))]
    asked: list[int] = []
    mine = Rollups(store, CFG, idle_close_s=IDLE, clock=lambda: 0.0,
                   owned=lambda partition: asked.append(partition) or partition != 1)
    assert mine.details() == [(detail_id(p, off), batches[p, off])
                              for p, off in ((0, 3), (0, 12), (2, 1))]
    assert sorted(asked) == [0, 1, 2]  # once per partition
