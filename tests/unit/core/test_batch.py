"""Windowed per-edge aggregates over a dict store: counts, lateness, replay exactness."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from pipeline.core.batch import PartitionBatch
from pipeline.core.circuit import Breaker, StateTrack
from pipeline.core.details import DetailBatch
from pipeline.core.edge import EdgeMeta, PartitionMeta
from pipeline.core.sketch import GAMMA, LatencySketch
from pipeline.core.store import (
    decode_state,
    edge_id,
    encode_state,
    parse_id,
    partition_id,
    window_id,
)
from pipeline.core.window import WindowConfig, WindowStats
from pipeline.wire.events import Event, edge_key

CFG = WindowConfig(size_s=10.0, grace_s=5.0, max_future_s=300.0)
SIZE, GRACE, FUTURE = 10.0, 5.0, 300.0
T0 = 1_700_000_000.0  # a multiple of the window size
EDGES = [("api", "db", "grpc"), ("api", "cache", "http"), ("web", "api", "http")]
Record = tuple[int, list[Event], float]  # (offset, events, the record's Kafka timestamp)
REPLAY_LATER_S = 7_200.0
"""How much later than the first run a replay runs (worker clock): longer than every
horizon, so that a decision taken from the clock instead of the record would differ."""


def ev(kind: str, ts: float, edge: tuple[str, str, str] = EDGES[0], n: int = 0,
       **optional: Any) -> Event:
    src, dst, proto = edge
    return Event(kind, f"e{n}-{kind}-{ts}", f"c{n}", src, dst, proto, ts, **optional)  # type: ignore[arg-type]


# --- stores -------------------------------------------------------------------------------

def _copy(value: Any) -> Any:
    return decode_state(encode_state(value))


def persist(store: dict[str, Any], changes: Sequence[tuple[str, Any]], *, copy: bool) -> None:
    for key, value in changes:
        store[key] = _copy(value) if copy else value


def run(records: Sequence[Record], store: dict[str, Any], *,
        batch_sizes: Sequence[int] | None = None, partition: int = 0, copy: bool = False,
        late_by: float = 0.0) -> list[tuple[Event, str]]:
    """Apply records in batches (one PartitionBatch each), persisting every batch's changes;
    the worker's clock reads ``late_by`` seconds after each record's timestamp."""
    refused: list[tuple[Event, str]] = []
    sizes = list(batch_sizes or [len(records)])
    i = 0
    while i < len(records):
        n = sizes.pop(0) if sizes else len(records) - i
        batch = PartitionBatch(partition, CFG, store)
        for offset, events, ts in records[i:i + n]:
            refused += batch.apply(offset, events, record_ts=ts, now=ts + late_by)
        persist(store, batch.changes(), copy=copy)
        i += n
    return refused


def dump(store: dict[str, Any], *, clock: bool = True) -> dict[str, Any]:
    """The aggregates, and the set of kept detail events: which batch key holds a detail
    event depends on batch boundaries and replays, and need not be the same. Without
    ``clock``, the one field the worker's clock sets (``last_seen``, which counts nothing)
    is left out, to compare a replay run later with the first run."""
    out: dict[str, Any] = {k: v.to_json() for k, v in store.items() if parse_id(k)[0] != "d"}
    if not clock:
        out = {k: {f: x for f, x in v.items() if f != "last_seen"} for k, v in out.items()}
    out["details"] = sorted({orjson.dumps(e, option=orjson.OPT_SORT_KEYS).decode()
                             for k, v in store.items() if parse_id(k)[0] == "d"
                             for e in v.events})
    return out


# --- an independent model of the documented rules ------------------------------------------

@dataclass
class MWin:
    start: float
    requests: int = 0
    responses: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    timeouts: int = 0
    retries: int = 0
    backoff: float = 0.0
    payload: int = 0
    late: int = 0
    health: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    transitions: dict[str, int] = field(default_factory=dict)
    derived_state: str = "closed"
    reported_state: str | None = None
    first_ts: float | None = None
    last_ts: float | None = None


@dataclass
class MTrack:
    state: str
    since: float
    entered: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def move(self, new: str, ts: float) -> bool:
        at = max(ts, self.since)
        if new == self.state:
            return False
        self.seconds[self.state] = self.seconds.get(self.state, 0.0) + (at - self.since)
        self.entered[new] = self.entered.get(new, 0) + 1
        self.state, self.since = new, at
        return True


@dataclass
class MEdge:
    late: int = 0
    last_ts: float | None = None
    derived: MTrack | None = None
    failures: int = 0
    oks: int = 0
    reported: MTrack | None = None


def _inc(d: dict[str, int], k: str, n: int = 1) -> None:
    d[k] = d.get(k, 0) + n


def model(records: Sequence[Record]) -> tuple[dict[tuple[str, float], MWin], dict[str, MEdge],
                                              float, list[Event]]:
    """Windows, edges, watermark and refused events, by the rules the docstrings state."""
    wm = -math.inf
    wins: dict[tuple[str, float], MWin] = {}
    edges: dict[str, MEdge] = {}
    refused: list[Event] = []

    def win(edge: str, start: float) -> MWin:
        return wins.setdefault((edge, start), MWin(start))

    for _, events, now in records:
        for e in events:
            if e.ts > now + FUTURE:
                refused.append(e)
                continue
            edge = e.edge
            m = edges.setdefault(edge, MEdge())
            wm = max(wm, e.ts)
            start = math.floor(e.ts / SIZE) * SIZE
            if start + SIZE + GRACE <= wm:
                win(edge, math.floor(wm / SIZE) * SIZE).late += 1
                m.late += 1
                continue
            w = win(edge, start)
            k = e.kind
            if k == "request":
                w.requests += 1
            elif k == "response":
                w.responses += 1
            elif k == "error":
                _inc(w.errors, e.error_type)
            elif k == "timeout":
                w.timeouts += 1
            elif k == "retry":
                w.retries += 1
                w.backoff += e.backoff_ms
            elif k == "health":
                _inc(w.health, e.health_status)
            if k in ("response", "error", "timeout") and e.latency_ms is not None:
                w.latencies.append(e.latency_ms)
            if e.payload_size is not None:
                w.payload += e.payload_size
            w.first_ts = e.ts if w.first_ts is None else min(w.first_ts, e.ts)
            w.last_ts = e.ts if w.last_ts is None else max(w.last_ts, e.ts)
            # reported circuit state
            if k == "circuit":
                if m.reported is None:
                    m.reported = MTrack("closed", e.ts)
                if m.reported.move(e.circuit_state, e.ts):
                    _inc(w.transitions, f"reported:{e.circuit_state}")
            # derived breaker (threshold 3, recovery 1 s, 1 probe)
            if m.derived is None:
                m.derived = MTrack("closed", e.ts)
            d = m.derived
            outcome = {"response": True, "error": False, "timeout": False}.get(k)
            skip = False
            if d.state == "open":
                if e.ts < d.since + 1.0:
                    skip = True
                else:
                    d.move("half_open", d.since + 1.0)
                    _inc(w.transitions, "derived:half_open")
                    m.oks = 0
            if not skip and outcome is not None:
                if d.state == "closed":
                    m.failures = 0 if outcome else m.failures + 1
                    if m.failures >= 3:
                        if d.move("open", e.ts):
                            _inc(w.transitions, "derived:open")
                        m.failures = 0
                elif outcome:
                    m.oks += 1
                    if m.oks >= 1 and d.move("closed", e.ts):
                        _inc(w.transitions, "derived:closed")
                        m.failures = 0
                else:
                    if d.move("open", e.ts):
                        _inc(w.transitions, "derived:open")
                    m.oks = 0
            w.derived_state = d.state
            if m.reported is not None:
                w.reported_state = m.reported.state
            m.last_ts = e.ts if m.last_ts is None else max(m.last_ts, e.ts)
    return wins, edges, wm, refused


# --- a seeded stream ----------------------------------------------------------------------

def make_records(seed: int, n: int = 140, start_offset: int = 0) -> list[Record]:
    r = random.Random(seed)
    kinds = ["request", "response", "error", "timeout", "retry", "health", "circuit"]
    weights = [5, 4, 3, 2, 2, 1, 1]
    records: list[Record] = []
    k = 0
    offset = start_offset - 1
    for i in range(n):
        offset += r.choice([1, 1, 1, 2])  # increasing; gaps are allowed
        base = T0 + i * 0.5
        now = base + 2.0
        edge = r.choice(EDGES)
        events = []
        for _ in range(r.randint(1, 4)):
            k += 1
            roll = r.random()
            if roll < 0.05:  # far behind: late once the watermark has moved on
                ts = base - r.choice([16.0, 20.25, 27.5])
            elif roll < 0.07:  # too far in the future
                ts = now + FUTURE + r.choice([0.25, 60.0])
            else:
                ts = base + r.choice([-3.0, -1.5, -0.25, 0.0, 0.0, 0.25, 0.75])
            kind = r.choices(kinds, weights)[0]
            opt: dict[str, Any] = {}
            if kind in ("response", "error", "timeout"):
                opt["latency_ms"] = r.lognormvariate(3.0, 1.0)
            if kind == "request" and r.random() < 0.3:
                opt["latency_ms"] = 999.0  # not an outcome: must stay out of the sketch
            if kind in ("request", "response") and r.random() < 0.7:
                opt["payload_size"] = r.randint(0, 5000)
            if kind == "response" and r.random() < 0.2:  # one try of a retried call
                opt["attempt"] = r.randint(1, 3)
            if kind == "error":
                opt["error_type"] = r.choice(["conn_refused", "http_5xx", "reset"])
            if kind == "retry":
                opt["backoff_ms"] = r.choice([10.0, 25.5, 100.0, 0.125])
                opt["attempt"] = r.randint(1, 4)
            if kind == "health":
                opt["health_status"] = r.choice(["healthy", "degraded", "unhealthy"])
            if kind == "circuit":
                opt["circuit_state"] = r.choice(["closed", "open", "half_open"])
            events.append(ev(kind, ts, edge, k, **opt))
        records.append((offset, events, now))
    return records


def _expected_bins(values: list[float]) -> dict[int, int]:
    bins: dict[int, int] = {}
    for v in values:
        _inc(bins, math.ceil(math.log(v) / math.log(GAMMA)))  # type: ignore[arg-type]
    return bins


def check_against_model(store: dict[str, Any], records: Sequence[Record], partition: int = 0
                        ) -> None:
    wins, edges, wm, _ = model(records)
    want_keys = ({window_id(partition, e, s) for e, s in wins}
                 | {edge_id(partition, e) for e in edges} | {partition_id(partition)})
    got_keys = {k for k in store if parse_id(k)[1] == partition and parse_id(k)[0] != "d"}
    assert got_keys == want_keys
    # every error, timeout, retry and health event and every response of a retried call
    # (attempt > 1) that was not refused is kept for the sink, once
    # per distinct event (a replay may write it again under another key; the sink dedups)
    refused = {id(e) for e in model(records)[3]}
    want_details = sorted(e.to_wire()["event_id"] for _, events, _ in records for e in events
                          if (e.kind in ("error", "timeout", "retry", "health")
                              or (e.kind == "response" and (e.attempt or 0) > 1))
                          and id(e) not in refused)
    kept = [v for k, v in store.items() if parse_id(k)[:2] == ("d", partition)]
    assert all(isinstance(v, DetailBatch) for v in kept)
    assert sorted({e["event_id"] for v in kept for e in v.events}) == sorted(set(want_details))
    for (edge, start), w in wins.items():
        s = store[window_id(partition, edge, start)]
        assert isinstance(s, WindowStats)
        assert (s.window_start, s.window_end) == (start, start + SIZE)
        assert s.requests == w.requests
        assert s.responses == w.responses
        assert s.errors == w.errors
        assert s.timeouts == w.timeouts
        assert s.retries == w.retries
        assert s.retry_backoff_ms == w.backoff
        assert s.payload_bytes == w.payload
        assert s.late_events == w.late
        assert s.health == w.health
        assert s.latency.count == len(w.latencies)
        total = 0.0
        for v in w.latencies:
            total += v
        assert s.latency.sum == total
        if w.latencies:
            assert (s.latency.min, s.latency.max) == (min(w.latencies), max(w.latencies))
        assert s.latency.bins == _expected_bins(w.latencies)
        assert (s.first_ts, s.last_ts) == (w.first_ts, w.last_ts)
        assert s.transitions == w.transitions
        assert s.derived_state == w.derived_state
        assert s.reported_state == w.reported_state
        failed = sum(w.errors.values()) + w.timeouts
        assert s.error_count == sum(w.errors.values())
        assert s.error_rate == failed / max(w.responses + failed, 1)
    accepted = [e for _, events, _ in records for e in events if id(e) not in refused]
    bounds = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
    for edge, m in edges.items():
        em = store[edge_id(partition, edge)]
        assert isinstance(em, EdgeMeta)
        assert em.late_events == m.late
        mine = [e for e in accepted if e.edge == edge]  # late events too: totals take all
        kinds = [e.kind for e in mine]
        t = em.totals
        assert (t.events, t.requests, t.responses, t.timeouts, t.retries) == (
            len(mine), kinds.count("request"), kinds.count("response"), kinds.count("timeout"),
            kinds.count("retry"))
        errors: dict[str, int] = {}
        for e in mine:
            if e.kind == "error":
                errors[e.error_type] = errors.get(e.error_type, 0) + 1  # type: ignore[index]
        assert t.errors == errors
        lat = [e.latency_ms for e in mine
               if e.kind in ("response", "error", "timeout") and e.latency_ms is not None]
        cumulative = [sum(1 for v in lat if v / 1000.0 <= b) for b in bounds]
        assert list(itertools.accumulate(t.buckets))[:-1] == cumulative
        assert t.latency_count == len(lat)
        assert t.latency_sum_ms == pytest.approx(sum(lat))
        assert em.last_ts == m.last_ts
        if m.derived is None:
            assert em.derived.track.since is None
        else:
            t = em.derived.track
            assert (t.state, t.since, t.entered, t.seconds) == (
                m.derived.state, m.derived.since, m.derived.entered, m.derived.seconds)
        if m.reported is None:
            assert em.reported is None
        else:
            t = em.reported
            assert (t.state, t.since, t.entered, t.seconds) == (
                m.reported.state, m.reported.since, m.reported.entered, m.reported.seconds)
    meta = store[partition_id(partition)]
    assert isinstance(meta, PartitionMeta)
    assert meta.watermark == wm
    assert meta.offset == records[-1][0]
    assert meta.last_seen == records[-1][2]


SEEDS = [1, 2, 3]


def test_stream_exercises_every_rule() -> None:
    """Guard for the generated data: late, refused, every kind and all states occur."""
    records = make_records(1)
    wins, edges, _, refused = model(records)
    kinds = {e.kind for _, evs, _ in records for e in evs}
    assert kinds == {"request", "response", "error", "timeout", "retry", "health", "circuit"}
    assert sum(w.late for w in wins.values()) >= 5
    assert len(refused) >= 3
    assert len({s for _, s in wins}) >= 6 and len(edges) == 3
    assert any("derived:open" in w.transitions for w in wins.values())
    assert any("reported:open" in w.transitions for w in wins.values())


@pytest.mark.parametrize("seed", SEEDS)
def test_window_stats_match_independent_computation(seed: int) -> None:
    records = make_records(seed)
    store: dict[str, Any] = {}
    refused = run(records, store, batch_sizes=[25] * 10)
    check_against_model(store, records)
    _, _, _, want_refused = model(records)
    assert [e for e, _ in refused] == want_refused
    assert all(reason.startswith("ts:") for _, reason in refused)


@pytest.mark.parametrize("seed", SEEDS)
def test_changelog_copies_give_the_same_state(seed: int) -> None:
    records = make_records(seed)
    direct: dict[str, Any] = {}
    copied: dict[str, Any] = {}
    run(records, direct, batch_sizes=[9] * 20)
    run(records, copied, batch_sizes=[9] * 20, copy=True)
    assert dump(copied) == dump(direct)
    check_against_model(copied, records)


def test_latency_only_from_response_error_timeout() -> None:
    store: dict[str, Any] = {}
    events = [ev("request", T0 + 1, latency_ms=500.0), ev("response", T0 + 2, latency_ms=10.0),
              ev("error", T0 + 3, latency_ms=20.0, error_type="x"),
              ev("timeout", T0 + 4, latency_ms=30.0), ev("retry", T0 + 5, latency_ms=40.0,
                                                        backoff_ms=5.0),
              ev("health", T0 + 6, latency_ms=50.0, health_status="healthy"),
              ev("circuit", T0 + 7, latency_ms=60.0, circuit_state="closed"),
              ev("response", T0 + 8)]
    run([(0, events, T0)], store)
    s = store[window_id(0, edge_key(*EDGES[0]), T0)]
    assert (s.latency.count, s.latency.sum, s.latency.min, s.latency.max) == (3, 60.0, 10.0, 30.0)
    assert (s.requests, s.responses, s.errors, s.timeouts, s.retries) == (1, 2, {"x": 1}, 1, 1)
    assert s.retry_backoff_ms == 5.0 and s.health == {"healthy": 1}
    assert s.reported_state == "closed" and "reported:closed" not in s.transitions
    assert s.error_rate == 2 / 4


def test_error_rate_without_outcomes_is_zero() -> None:
    store: dict[str, Any] = {}
    run([(0, [ev("request", T0 + 1)], T0)], store)
    s = store[window_id(0, edge_key(*EDGES[0]), T0)]
    assert s.error_rate == 0.0 and s.error_count == 0


# --- lateness and the future ----------------------------------------------------------------

def test_late_event_counted_in_watermark_window_not_its_own() -> None:
    e0 = edge_key(*EDGES[0])
    store: dict[str, Any] = {}
    records = [
        (0, [ev("request", T0 + 1.0), ev("response", T0 + 2.0, latency_ms=5.0)], T0),
        (1, [ev("request", T0 + 14.75)], T0),          # watermark 14.75 < 10 + 5
        (2, [ev("request", T0 + 5.0)], T0),            # still on time: added to window 0
        (3, [ev("request", T0 + 15.0)], T0),           # watermark reaches end + grace
        (4, [ev("request", T0 + 6.0, payload_size=7),  # late: window 0 is closed
             ev("error", T0 + 9.9, error_type="x")], T0),
    ]
    run(records, store)
    w0 = store[window_id(0, e0, T0)]
    w1 = store[window_id(0, e0, T0 + 10)]
    assert (w0.requests, w0.responses, w0.errors, w0.payload_bytes, w0.late_events) == (
        2, 1, {}, 0, 0)
    assert (w0.first_ts, w0.last_ts) == (T0 + 1.0, T0 + 5.0)
    assert (w1.requests, w1.late_events, w1.errors) == (2, 2, {})
    assert store[edge_id(0, e0)].late_events == 2
    assert store[partition_id(0)].watermark == T0 + 15.0


def test_late_event_of_other_edge_creates_its_watermark_window() -> None:
    e0, e1 = edge_key(*EDGES[0]), edge_key(*EDGES[1])
    store: dict[str, Any] = {}
    records = [(0, [ev("request", T0 + 1.0, EDGES[1])], T0),
               (1, [ev("request", T0 + 42.0)], T0),
               (2, [ev("response", T0 + 3.0, EDGES[1], latency_ms=1.0)], T0)]
    batch = PartitionBatch(0, CFG, store)
    for off, events, now in records:
        batch.apply(off, events, record_ts=now, now=now)
    assert batch.late == 1
    persist(store, batch.changes(), copy=False)
    w = store[window_id(0, e1, T0 + 40)]
    assert (w.late_events, w.requests, w.responses, w.first_ts, w.last_ts) == (1, 0, 0, None, None)
    assert store[window_id(0, e1, T0)].responses == 0
    assert store[edge_id(0, e1)].late_events == 1
    assert store[edge_id(0, e1)].last_ts == T0 + 1.0  # late events do not move last_ts
    assert store[edge_id(0, e0)].late_events == 0


def test_future_events_refused_and_not_counted() -> None:
    store: dict[str, Any] = {}
    now = T0 + 100.0
    too_far = ev("request", now + FUTURE + 0.5, n=1)
    at_limit = ev("request", now + FUTURE, n=2)
    normal = ev("response", now, n=3, latency_ms=1.0)
    batch = PartitionBatch(0, CFG, store)
    refused = batch.apply(7, [too_far, normal, at_limit], record_ts=now, now=now)
    assert [e for e, _ in refused] == [too_far]
    reason = refused[0][1]
    assert reason.startswith("ts:")
    assert batch.applied == 2
    persist(store, batch.changes(), copy=False)
    e0 = edge_key(*EDGES[0])
    assert store[partition_id(0)].watermark == now + FUTURE
    assert store[partition_id(0)].offset == 7
    # too_far and at_limit fall in the same window: only at_limit is counted there
    w = store[window_id(0, e0, T0 + 400.0)]
    assert (w.requests, w.first_ts, w.last_ts) == (1, now + FUTURE, now + FUTURE)
    assert store[edge_id(0, e0)].last_ts == now + FUTURE


def test_the_horizon_is_the_records_timestamp_not_the_clock() -> None:
    """A worker running an hour behind (or a replay) refuses what the first run refused,
    and a record without a timestamp is measured from the newest one seen before it."""
    sent = T0 + 50.0
    ahead = ev("request", sent + FUTURE + 3.0, n=1)
    near = ev("request", sent + FUTURE - 3.0, n=2)
    for clock in (sent, sent + 3_600.0, sent - 3_600.0):
        batch = PartitionBatch(0, CFG, {})
        refused = batch.apply(1, [ahead, near], record_ts=sent, now=clock)
        assert [e for e, _ in refused] == [ahead]
        assert refused[0][1] == "ts: 303 s ahead of its record's timestamp (at most 300 s accepted)"
        # no timestamp (-1 from an old client, or None): the partition's newest so far
        assert [e for e, _ in batch.apply(2, [ahead, near], record_ts=-0.001, now=clock)
                ] == [ahead]
        assert [e for e, _ in batch.apply(3, [ahead], record_ts=None, now=clock)] == [ahead]
        assert batch.meta.record_ts == sent
    # a partition that never saw a timestamp has no horizon to measure from
    assert PartitionBatch(0, CFG, {}).apply(1, [ahead], record_ts=None, now=sent) == []


def test_record_of_only_future_events_advances_offset_only() -> None:
    store: dict[str, Any] = {}
    now = T0
    batch = PartitionBatch(2, CFG, store)
    refused = batch.apply(3, [ev("request", now + 1000.0)], record_ts=now, now=now)
    assert len(refused) == 1 and refused[0][1].startswith("ts:")
    persist(store, batch.changes(), copy=False)
    assert set(store) == {partition_id(2)}
    meta = store[partition_id(2)]
    assert (meta.watermark, meta.offset, meta.last_seen) == (-math.inf, 3, now)


# --- transitions ------------------------------------------------------------------------------

def test_derived_and_reported_transitions_per_window() -> None:
    A, B = EDGES[0], EDGES[1]
    a, b = edge_key(*A), edge_key(*B)
    events = [
        ev("circuit", T0 + 0.25, B, circuit_state="closed"),   # first report = initial state
        ev("request", T0 + 2.0, B),
        ev("error", T0 + 0.5, A, error_type="x"), ev("timeout", T0 + 1.0, A),
        ev("error", T0 + 2.0, A, error_type="x"),              # derived open at 2.0
        ev("response", T0 + 2.5, A),                           # open: ignored by breaker
        ev("circuit", T0 + 3.0, A, circuit_state="open"),      # reported open; half_open @3.0
        ev("response", T0 + 12.0, A),                          # closed at 12.0
        ev("circuit", T0 + 13.0, A, circuit_state="closed"),   # reported closed
        ev("error", T0 + 14.0, A, error_type="y"), ev("error", T0 + 14.5, A, error_type="y"),
        ev("timeout", T0 + 15.0, A),                           # derived open at 15.0
        ev("response", T0 + 30.0, A),                          # half_open @16.0, closed @30.0
    ]
    store: dict[str, Any] = {}
    run([(i, [e], T0) for i, e in enumerate(events)], store)
    w0, w10, w30 = (store[window_id(0, a, T0 + s)] for s in (0, 10, 30))
    assert w0.transitions == {"derived:open": 1, "reported:open": 1, "derived:half_open": 1}
    assert (w0.derived_state, w0.reported_state) == ("half_open", "open")
    assert w10.transitions == {"derived:closed": 1, "reported:closed": 1, "derived:open": 1}
    assert (w10.derived_state, w10.reported_state) == ("open", "closed")
    assert w30.transitions == {"derived:half_open": 1, "derived:closed": 1}
    assert (w30.derived_state, w30.reported_state) == ("closed", "closed")
    em = store[edge_id(0, a)]
    t = em.derived.track
    assert (t.state, t.since) == ("closed", T0 + 30.0)
    assert t.entered == {"open": 2, "half_open": 2, "closed": 2}
    assert t.seconds == {"closed": 4.5, "open": 2.0, "half_open": 23.0}
    r = em.reported
    assert (r.state, r.since, r.entered, r.seconds) == (
        "closed", T0 + 13.0, {"open": 1, "closed": 1}, {"closed": 0.0, "open": 10.0})
    wb = store[window_id(0, b, T0)]
    assert wb.transitions == {}
    assert (wb.reported_state, wb.derived_state) == ("closed", "closed")
    assert store[edge_id(0, b)].reported.entered == {}
    # an edge that never reports keeps reported_state None
    assert store[edge_id(0, a)].reported is not None
    store2: dict[str, Any] = {}
    run([(0, [ev("error", T0 + 1, A, error_type="x")], T0)], store2)
    assert store2[window_id(0, a, T0)].reported_state is None
    assert store2[edge_id(0, a)].reported is None


# --- replay exactness -------------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
def test_reapplying_persisted_records_changes_nothing(seed: int) -> None:
    records = make_records(seed)
    store: dict[str, Any] = {}
    run(records, store, batch_sizes=[40] * 5, copy=True)
    before = dump(store)
    batch = PartitionBatch(0, CFG, store)
    replay = records[-60:]
    for off, events, now in replay:
        assert batch.apply(off, events, record_ts=now + 999.0, now=now + 999.0) == []
    assert batch.skipped == sum(len(events) for _, events, _ in replay)
    assert (batch.applied, batch.late) == (0, 0)
    assert [k for k, _ in batch.changes()] == [partition_id(0)]
    persist(store, batch.changes(), copy=True)
    assert dump(store) == before


def _crash_cases(seed: int) -> list[tuple[int, int]]:
    """(batch start, batch length) of the batch that crashes, for a seeded stream."""
    return [(0, 30), (30, 50), (80, 35), (115, 25)]


@pytest.mark.parametrize("seed", SEEDS)
def test_crash_after_any_prefix_of_changes_replays_exactly(seed: int) -> None:
    records = make_records(seed)
    for start, length in _crash_cases(seed):
        before = records[:start]
        crashed = records[start:start + length]
        after = records[start + length:]
        base: dict[str, Any] = {}
        run(before, base, batch_sizes=[start], copy=True)
        # PartitionBatch mutates the values it reads: every run starts on its own copies
        want = {k: _copy(v) for k, v in base.items()}
        run(crashed, want, copy=True)
        run(after, want, copy=True)

        work = {k: _copy(v) for k, v in base.items()}
        batch = PartitionBatch(0, CFG, work)
        for off, events, now in crashed:
            batch.apply(off, events, record_ts=now, now=now)
        changes = batch.changes()
        kinds = [parse_id(k)[0] for k, _ in changes]
        # windows, edges, details, partition meta last
        assert kinds == sorted(kinds, key="wedp".index)
        persisted = [(k, _copy(v)) for k, v in changes]  # what each write would have been
        want_counts = dump(want, clock=False)
        for cut in range(len(persisted) + 1):
            store = {k: _copy(v) for k, v in base.items()}
            persist(store, persisted[:cut], copy=True)
            # the replay runs later (a restart, or a worker behind): it must decide from
            # the records, as the first run did, not from the clock
            refused = run(crashed, store, copy=True, late_by=REPLAY_LATER_S)
            refused += run(after, store, copy=True, late_by=REPLAY_LATER_S)
            assert dump(store, clock=False) == want_counts, (start, cut, len(persisted))
            # every future event of the records replayed is refused again (a persisted
            # partition meta means the crashed batch is skipped whole)
            replayed = (crashed if cut < len(persisted) else []) + after
            assert sorted(e.event_id for e, _ in refused) == sorted(
                e.event_id for _, evs, ts in replayed for e in evs if e.ts > ts + FUTURE)
        check_against_model(want, records)


@pytest.mark.parametrize("seed", SEEDS)
def test_batch_boundaries_do_not_matter(seed: int) -> None:
    records = make_records(seed)
    one: dict[str, Any] = {}
    run(records, one)
    want = dump(one)
    r = random.Random(seed * 31)
    splits = [[1] * len(records), [7] * 30, [r.randint(1, 20) for _ in range(60)]]
    for sizes in splits:
        store: dict[str, Any] = {}
        run(records, store, batch_sizes=sizes, copy=True)
        assert dump(store) == want


def test_replay_of_one_record_inside_a_batch_is_skipped_per_key() -> None:
    """A record delivered twice within one batch (at-least-once) is counted once."""
    records = make_records(4, n=30)
    store: dict[str, Any] = {}
    run(records, store)
    want = dump(store)
    store2: dict[str, Any] = {}
    batch = PartitionBatch(0, CFG, store2)
    duplicated = 0
    for i, (off, events, now) in enumerate(records):
        batch.apply(off, events, record_ts=now, now=now)
        if i % 5 == 4:
            for off2, events2, now2 in records[i - 3:i + 1]:
                assert batch.apply(off2, events2, record_ts=now2, now=now2) == []
                duplicated += len(events2)
    assert batch.skipped == duplicated
    persist(store2, batch.changes(), copy=True)
    assert dump(store2) == want


# --- partitions, ids and encoding --------------------------------------------------------------

def test_partition_isolation() -> None:
    records = make_records(5, n=60)
    store: dict[str, Any] = {}
    run(records, store, partition=0)
    run(records[:30], store, partition=1)
    e = edge_key(*EDGES[0])
    assert edge_id(0, e) in store and edge_id(1, e) in store
    assert store[edge_id(0, e)] is not store[edge_id(1, e)]
    assert {partition_id(0), partition_id(1)} <= set(store)
    check_against_model(store, records, partition=0)
    check_against_model(store, records[:30], partition=1)
    p0 = {k for k in store if parse_id(k)[1] == 0}
    p1 = {k for k in store if parse_id(k)[1] == 1}
    assert p0.isdisjoint(p1) and p0 | p1 == set(store)


def test_ids_parse_back() -> None:
    e = edge_key("a-svc", "b_svc", "grpc")
    assert parse_id(window_id(3, e, 1_700_000_010.0)) == ("w", 3, e, 1_700_000_010.0)
    assert parse_id(window_id(0, e, 0.5)) == ("w", 0, e, 0.5)
    assert parse_id(edge_id(12, e)) == ("e", 12, e, None)
    assert parse_id(partition_id(7)) == ("p", 7, None, None)
    assert len({window_id(0, e, 10.0), window_id(1, e, 10.0), window_id(0, e, 20.0),
                edge_id(0, e), edge_id(1, e), partition_id(0), partition_id(1)}) == 7


def _full_window() -> WindowStats:
    s = WindowStats(T0, T0 + 10, requests=3, responses=2, errors={"x": 1, "y": 2}, timeouts=1,
                    retries=2, retry_backoff_ms=12.5, payload_bytes=900, late_events=4,
                    health={"healthy": 2}, reported_state="open", derived_state="half_open",
                    transitions={"derived:open": 1, "reported:open": 1}, first_ts=T0 + 0.5,
                    last_ts=T0 + 9.75, offset=42)
    s.latency.add_many([0.0, 1.5, 20.0, 3000.0])
    return s


@pytest.mark.parametrize("value", [
    _full_window(),
    WindowStats(T0, T0 + 10),
    EdgeMeta(),
    EdgeMeta(StateTrack("open", T0 + 2, {"open": 1}, {"closed": 2.0}),
             Breaker(StateTrack("half_open", T0 + 3, {"open": 1, "half_open": 1},
                                {"closed": 1.0, "open": 1.0}), 2, 1),
             late_events=5, last_ts=T0 + 4, offset=9),
    PartitionMeta(),
    PartitionMeta(T0 + 99.25, T0 + 100.0, 17),
], ids=["window-full", "window-empty", "edge-empty", "edge-full", "partition-empty",
        "partition-full"])
def test_encode_decode_round_trip(value: Any) -> None:
    data = encode_state(value)
    assert isinstance(data, bytes)
    back = decode_state(data)
    assert type(back) is type(value)
    assert back == value
    assert back.to_json() == value.to_json()
    assert encode_state(back) == data
    assert back is not value


def test_decoded_window_keeps_exact_sketch() -> None:
    s = _full_window()
    back = decode_state(encode_state(s))
    assert isinstance(back, WindowStats) and isinstance(back.latency, LatencySketch)
    assert back.latency.bins == s.latency.bins and back.latency.zero == 1
    assert back.latency.quantile(0.5) == s.latency.quantile(0.5)
    assert back.error_rate == (3 + 1) / (2 + 3 + 1)


def test_int_window_size_gives_canonical_window_keys() -> None:
    """``WindowConfig(size_s=10)`` (an int, valid for a ``float`` field) must key a window
    exactly as ``size_s=10.0`` does, and ``window_id`` must invert ``parse_id``."""
    int_cfg = WindowConfig(size_s=10, grace_s=5, max_future_s=300)
    store: dict[str, Any] = {}
    batch = PartitionBatch(0, int_cfg, store)
    batch.apply(0, [ev("request", T0 + 3.5)], record_ts=T0, now=T0)
    keys = [k for k, v in batch.changes() if isinstance(v, WindowStats)]
    assert len(keys) == 1
    (key,) = keys
    assert window_id(*parse_id(key)[1:]) == key  # type: ignore[arg-type]
    assert key == window_id(0, edge_key(*EDGES[0]), T0)


def test_detail_events_split_into_values_under_a_changelog_record() -> None:
    """Thousands of error events in one batch (one record holding 1,000) become values of at
    most DETAIL_CHUNK_EVENTS events and DETAIL_CHUNK_BYTES each, under distinct keys, in
    order; with every field at its longest (4-byte characters) each stays under 1 MiB."""
    from pipeline.core.details import DETAIL_CHUNK_BYTES, DETAIL_CHUNK_EVENTS

    small = {"latency_ms": 1.0, "error_type": "e"}
    big = {"method": "\U0001F600" * 200, "error_message": "\U0001F600" * 1024,
           "status_code": 599, "error_type": "e" * 100, "trace_id": "a" * 32,
           "span_id": "b" * 16, "payload_size": 2**40, "latency_ms": 86_400_000.0}
    batch = PartitionBatch(0, CFG, {})
    sent = []
    for offset, count, fields in ((5, 1_000, small), (6, 10, small), (9, 450, big)):
        events = [Event("error", f"{offset}x{i}", "c" * 128, "s" * 100, "t" * 100,
                        "p" * 32, T0, **fields) for i in range(count)]  # type: ignore[arg-type]
        batch.apply(offset, events, record_ts=T0, now=T0)
        sent += [e.event_id for e in events]
    kept = [(k, v) for k, v in batch.changes() if parse_id(k)[0] == "d"]
    assert [e["event_id"] for _, v in kept for e in v.events] == sent
    assert len({k for k, _ in kept}) == len(kept)
    assert all(len(v.events) <= DETAIL_CHUNK_EVENTS for _, v in kept)
    assert [len(v.events) for _, v in kept][:2] == [DETAIL_CHUNK_EVENTS] * 2  # small ones
    sizes = [len(orjson.dumps(v.events)) for _, v in kept]
    assert max(sizes) <= DETAIL_CHUNK_BYTES + len(kept[-1][1].events) + 2
    assert max(len(encode_state(v)) for _, v in kept) < 1024 * 1024 * 3 // 4
    assert len(kept) >= 3 + 450 * 6_000 // DETAIL_CHUNK_BYTES - 1
