"""The sink's bookkeeping without databases: what each target is given, retries with
backoff, what may leave the table. (The SQL itself runs against the real databases in
tests/integration/test_sink.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from pipeline.core.batch import PartitionBatch
from pipeline.core.rollups import Rollups, WindowRow
from pipeline.core.store import detail_id, parse_id, window_id
from pipeline.core.window import WindowConfig
from pipeline.settings import Settings
from pipeline.sink.writer import PostgresTarget, Sink, Target, build_sink
from pipeline.wire.events import Event, edge_key

CFG = WindowConfig(size_s=10.0, grace_s=5.0)
T0 = 1_700_000_000.0
EDGE = ("api", "db", "grpc")


class Recorder(Target):
    """Remembers every batch; fails while ``down`` is set."""

    dialect = "duckdb"

    def __init__(self, name: str) -> None:
        self.name = name
        self.down = False
        self.batches: list[tuple[list[tuple[int, float, int]], list[str]]] = []

    def write(self, windows: Sequence[WindowRow], events: Sequence[dict[str, Any]], *,
              lookback_s: float) -> int:
        if self.down:
            raise ConnectionError("database away")
        self.batches.append(([(w.partition, w.window_start, w.stats.offset) for w in windows],
                             [e["event_id"] for e in events]))
        return len(windows)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def feed(store: dict[str, Any], offset: int, events: list[Event], partition: int = 0) -> None:
    batch = PartitionBatch(partition, CFG, store)
    batch.apply(offset, events, record_ts=1e12, now=1e12)
    store.update(batch.changes())


def ev(kind: str, ts: float, n: int, **optional: Any) -> Event:
    return Event(kind, f"id{n}", f"c{n}", *EDGE, ts, **optional)  # type: ignore[arg-type]


def make(*names: str, batch_rows: int = 100) -> tuple[dict[str, Any], Sink, list[Recorder],
                                                      Clock]:
    store: dict[str, Any] = {}
    clock = Clock()
    targets = [Recorder(n) for n in names]
    rollups = Rollups(store, CFG, idle_close_s=1e9, clock=lambda: 1e12)
    sink = Sink(rollups, targets, batch_rows=batch_rows, backoff_max_s=4.0, clock=clock)
    return store, sink, targets, clock


def wid(start: float, partition: int = 0) -> str:
    return window_id(partition, edge_key(*EDGE), start)


def test_only_closed_windows_are_given_and_only_final_stored_ones_leave() -> None:
    store, sink, (a, b), _ = make("a", "b")
    # windows at T0, T0+10, T0+20; watermark T0+26: T0 and T0+10 are final (20 + 5 <= 26),
    # T0+20 is open; T0+10, the edge's newest closed window, stays for the exporter
    feed(store, 1, [ev("request", T0 + 1, 1), ev("error", T0 + 2, 2, error_type="x"),
                    ev("request", T0 + 11, 3), ev("request", T0 + 26, 4)])
    done = asyncio.run(sink.flush())
    assert a.batches == b.batches == [([(0, T0, 1), (0, T0 + 10, 1)], ["id2"])]
    assert sorted(done) == sorted([wid(T0), detail_id(0, 1)])
    # nothing new: nothing written, the same keys still leave
    assert sorted(asyncio.run(sink.flush())) == sorted(done)
    assert len(a.batches) == 1


def test_removable_is_the_flush_rule_without_keeping_the_newest_window() -> None:
    store, sink, _, _ = make("a", "b")
    feed(store, 1, [ev("request", T0 + 1, 1), ev("request", T0 + 11, 3),
                    ev("request", T0 + 26, 4)])
    assert not sink.removable(wid(T0), store[wid(T0)])  # final, but stored nowhere yet
    asyncio.run(sink.flush())
    # T0 and T0+10 final and stored by both; T0+10 (the newest) stays in flush's answer
    assert sink.removable(wid(T0), store[wid(T0)])
    assert sink.removable(wid(T0 + 10), store[wid(T0 + 10)])
    assert not sink.removable(wid(T0 + 20), store[wid(T0 + 20)])  # open
    sink.status[1].stored.pop(wid(T0 + 10))  # one database lacks this version
    assert not sink.removable(wid(T0 + 10), store[wid(T0 + 10)])


def test_a_changed_window_is_written_again() -> None:
    store, sink, (a,), _ = make("a")
    feed(store, 1, [ev("request", T0 + 1, 1)])
    sink.rollups.idle_close_s = 0.0  # idle-closed: flushed before the watermark passes
    asyncio.run(sink.flush())
    feed(store, 2, [ev("request", T0 + 2, 2)])
    asyncio.run(sink.flush())
    assert [w for batch, _ in a.batches for w in batch] == [(0, T0, 1), (0, T0, 2)]


def test_a_failing_target_backs_off_and_catches_up_and_holds_back_deletes() -> None:
    store, sink, (a, b), clock = make("a", "b")
    feed(store, 1, [ev("request", T0 + 1, 1), ev("request", T0 + 11, 3),
                    ev("request", T0 + 30, 2)])
    b.down = True
    delays = []
    for _ in range(5):
        assert asyncio.run(sink.flush()) == []  # b lacks it: nothing leaves the table
        delays.append(sink.status[1].retry_at - clock.now)
        clock.now = sink.status[1].retry_at
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert sink.status[1].failures == 5
    assert "ConnectionError: database away" in (sink.status[1].last_error or "")
    assert len(a.batches) == 1  # a stored it once and was not asked again
    b.down = False
    assert asyncio.run(sink.flush()) == [wid(T0)]
    assert b.batches == [([(0, T0, 1), (0, T0 + 10, 1)], [])]
    assert (sink.status[1].consecutive_failures, sink.status[1].last_error) == (0, None)


def test_not_due_target_is_skipped_until_its_retry_time() -> None:
    store, sink, (a,), clock = make("a")
    feed(store, 1, [ev("request", T0 + 1, 1), ev("request", T0 + 30, 2)])
    a.down = True
    asyncio.run(sink.flush())
    a.down = False
    clock.now = 0.4  # retry at 0.5
    asyncio.run(sink.flush())
    assert a.batches == []
    clock.now = 0.5
    asyncio.run(sink.flush())
    assert a.batches == [([(0, T0, 1)], [])]


def test_batches_hold_at_most_batch_rows_windows_and_whole_detail_batches() -> None:
    store, sink, (a,), _ = make("a", batch_rows=2)
    for i in range(5):
        feed(store, 1 + i, [ev("timeout", T0 + i * 10 + 1, 10 + i, latency_ms=1.0),
                            ev("timeout", T0 + i * 10 + 2, 20 + i, latency_ms=1.0),
                            ev("timeout", T0 + i * 10 + 3, 30 + i, latency_ms=1.0)])
    feed(store, 6, [ev("request", T0 + 100, 99)])
    asyncio.run(sink.flush())
    windows = [len(w) for w, _ in a.batches]
    events = [len(e) for _, e in a.batches]
    assert sum(windows) == 5 and max(windows) == 2
    # five detail batches of 3 events each: never split, so 3 per transaction
    assert sum(events) == 15 and set(events) <= {0, 3}
    assert sorted(e for _, ids in a.batches for e in ids) == sorted(
        f"id{n}" for i in range(5) for n in (10 + i, 20 + i, 30 + i))


def test_forget_drops_deleted_keys() -> None:
    store, sink, (a,), _ = make("a")
    feed(store, 1, [ev("request", T0 + 1, 1), ev("request", T0 + 11, 3),
                    ev("request", T0 + 30, 2)])
    done = asyncio.run(sink.flush())
    assert done == [wid(T0)]
    for key in done:
        del store[key]
    sink.forget(done)
    assert sink.status[0].stored == {wid(T0 + 10): 1}
    asyncio.run(sink.flush())
    assert len(a.batches) == 1


@pytest.mark.parametrize("dsn", ["postgresql://app:s3cret@db:5432/x",
                                 "host=db user=app password=s3cret dbname=x"])
def test_postgres_errors_never_show_the_password(dsn: str) -> None:
    target = PostgresTarget(dsn)
    text = target.describe(RuntimeError(f"connection to {dsn} failed (s3cret rejected)"))
    assert "s3cret" not in text
    assert "***" in text and "failed" in text


def test_build_sink_follows_settings(tmp_path: Any) -> None:
    rollups = Rollups({}, CFG)
    bare = build_sink(Settings.from_env({}, duckdb_path=""), rollups)
    assert (bare.status, bare.retain_s) == ([], 3_600.0)
    sink = build_sink(Settings.from_env({"COMMPIPE_POSTGRES_DSN": "postgresql://u@h/d"},
                                        duckdb_path=str(tmp_path / "x.duckdb")), rollups)
    assert sink is not None
    assert [s.target.name for s in sink.status] == ["postgres", "duckdb"]


def test_without_a_database_windows_leave_after_the_retention() -> None:
    """No target: nothing is stored, kept events go at once, and a final window leaves only
    when the watermark is retain_s past its close (each edge's newest closed one stays)."""
    store: dict[str, Any] = {}
    feed(store, 1, [ev("error", T0 + 1, 1, error_type="x"), ev("request", T0 + 11, 2),
                    ev("request", T0 + 41, 3)])
    rollups = Rollups(store, CFG, idle_close_s=1e9, clock=lambda: 1e12)
    sink = Sink(rollups, [], retain_s=100.0)
    done = asyncio.run(sink.flush())
    assert [parse_id(k)[0] for k in done] == ["d"]  # the kept error event only
    feed(store, 2, [ev("request", T0 + 10 + 100 + CFG.grace_s, 4)])
    done = asyncio.run(sink.flush())
    assert sorted(k for k in done if parse_id(k)[0] == "w") == [wid(T0)]  # T0 + 10 stays


def test_a_window_changed_during_the_write_does_not_leave_the_table() -> None:
    """The write runs in a thread while the agent keeps applying records: a window closed
    for idleness gets a late-but-within-grace event, then the watermark passes it. The
    version the databases got is not the table's any more, so it must not be deleted."""
    store: dict[str, Any] = {}
    gate = asyncio.Event()
    blocking = [True]

    class Slow(Recorder):
        def write(self, windows: Sequence[WindowRow], events: Sequence[dict[str, Any]], *,
                  lookback_s: float) -> int:
            n = super().write(windows, events, lookback_s=lookback_s)
            if blocking[0]:
                asyncio.run_coroutine_threadsafe(gate.wait(), loop).result(5)
            return n

    slow = Slow("slow")
    rollups = Rollups(store, CFG, idle_close_s=0.0, clock=lambda: 1e12)
    sink = Sink(rollups, [slow], backoff_max_s=4.0, clock=Clock())
    # W0 and W1, idle-closed at once; W1 is the edge's newest (it stays for the exporter)
    feed(store, 1, [ev("request", T0 + 1, 1), ev("request", T0 + 11, 4)])

    async def scenario() -> list[str]:
        flushing = asyncio.create_task(sink.flush())
        while not slow.batches:  # the write of W0 (offset 1) is under way
            await asyncio.sleep(0.001)
        feed(store, 2, [ev("request", T0 + 2, 2)])   # W0 changes (within grace)
        feed(store, 3, [ev("request", T0 + 45, 3)])  # the watermark passes W0 for good
        gate.set()
        return await flushing

    loop = asyncio.new_event_loop()
    try:
        done = loop.run_until_complete(scenario())
    finally:
        loop.close()
    assert slow.batches[0][0] == [(0, T0, 1), (0, T0 + 10, 1)]
    assert store[wid(T0)].requests == 2 and store[wid(T0)].offset == 2
    assert wid(T0) not in done
    # the next round stores the version the table holds, and only then may it leave
    blocking[0] = False
    assert wid(T0) in asyncio.run(sink.flush())
    assert slow.batches[1][0][0] == (0, T0, 2)


def test_a_detail_key_put_again_with_more_events_is_stored_again_before_it_leaves() -> None:
    """A replay after a crash can put a detail key again holding more events than the
    version a database stored (the replay's open batch reaches further). The grown version
    must be stored too (the events table keeps each event once), and the key may leave
    the table only once the version in the table is the one every database has."""
    store, sink, (rec,), _ = make("duck")
    key = detail_id(0, 10)
    first = PartitionBatch(0, CFG, store)
    first.apply(10, [ev("error", T0 + 1, n, error_type="e") for n in (1, 2, 3)],
                record_ts=1e12, now=1e12)
    (detail,) = [(k, v) for k, v in first.changes() if k.startswith("d")]
    assert detail[0] == key
    store[key] = detail[1]
    assert asyncio.run(sink.flush()) == [key]  # stored, and may leave
    replay = PartitionBatch(0, CFG, {})
    replay.apply(10, [ev("error", T0 + 1, n, error_type="e") for n in (1, 2, 3, 4, 5)],
                 record_ts=1e12, now=1e12)
    store[key] = next(v for k, v in replay.changes() if k == key)  # the same key, grown
    assert asyncio.run(sink.flush()) == [key]
    assert [ids for _, ids in rec.batches] == [["id1", "id2", "id3"],
                                               ["id1", "id2", "id3", "id4", "id5"]]


def test_a_detail_key_that_grows_during_the_write_does_not_leave_the_table() -> None:
    store: dict[str, Any] = {}
    gate = asyncio.Event()
    key = detail_id(0, 10)

    class Slow(Recorder):
        def write(self, windows: Sequence[WindowRow], events: Sequence[dict[str, Any]], *,
                  lookback_s: float) -> int:
            n = super().write(windows, events, lookback_s=lookback_s)
            asyncio.run_coroutine_threadsafe(gate.wait(), loop).result(5)
            return n

    slow = Slow("slow")
    sink = Sink(Rollups(store, CFG, idle_close_s=1e9, clock=lambda: 1e12), [slow],
                backoff_max_s=4.0, clock=Clock())
    batch = PartitionBatch(0, CFG, store)
    batch.apply(10, [ev("error", T0 + 1, n, error_type="e") for n in (1, 2)],
                record_ts=1e12, now=1e12)
    store.update(batch.changes())

    async def scenario() -> list[str]:
        flushing = asyncio.create_task(sink.flush())
        while not slow.batches:
            await asyncio.sleep(0.001)
        grown = PartitionBatch(0, CFG, {})
        grown.apply(10, [ev("error", T0 + 1, n, error_type="e") for n in (1, 2, 3)],
                    record_ts=1e12, now=1e12)
        store[key] = next(v for k, v in grown.changes() if k == key)
        gate.set()
        return await flushing

    loop = asyncio.new_event_loop()
    try:
        done = loop.run_until_complete(scenario())
    finally:
        loop.close()
    assert key not in done
