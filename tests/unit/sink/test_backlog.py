"""The bound on what the worker holds for a database that is away: pause the input past it
(and read again at half of it), or give up that database's copy of the oldest windows and
kept events, counted. Without databases: a Recorder target that fails on demand."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from pipeline.core.rollups import Rollups
from pipeline.core.store import detail_id
from pipeline.settings import Settings
from pipeline.sink.backlog import BacklogLimit
from pipeline.sink.writer import Sink, build_sink
from tests.unit.sink.test_sink import CFG, T0, Clock, Recorder, ev, feed, wid


def _sink(limit: BacklogLimit, *names: str) -> tuple[dict[str, Any], Sink, list[Recorder],
                                                     Clock]:
    store: dict[str, Any] = {}
    clock = Clock()
    targets = [Recorder(n) for n in names]
    sink = Sink(Rollups(store, CFG, idle_close_s=1e9, clock=lambda: 1e12), targets,
                backoff_max_s=1.0, clock=clock, backlog=limit)
    return store, sink, targets, clock


def _windows(store: dict[str, Any], first: int, n: int) -> None:
    """``n`` more windows of one edge, one request each at its end: the watermark closes all
    windows but the last (grace 5 s), and the newest closed one stays for the exporter."""
    for i in range(first, first + n):
        feed(store, 1 + i, [ev("request", T0 + 10 * i + 9, 100 + i)])


def _round(sink: Sink, store: dict[str, Any], clock: Clock) -> list[str]:
    done = asyncio.run(sink.flush())
    for key in done:
        del store[key]
    sink.forget(done)
    clock.now += 10.0  # every failing target is due again next round
    return done


def test_pause_past_the_bound_and_read_again_at_half_of_it(caplog: Any) -> None:
    store, sink, (a,), clock = _sink(BacklogLimit(6, "pause"), "a")
    a.down = True
    _windows(store, 0, 6)  # 5 closed windows wait: within the bound
    _round(sink, store, clock)
    assert (sink.backlog.windows, sink.holding()) == (5, False)
    _windows(store, 6, 2)  # 7 wait: past it
    with caplog.at_level(logging.WARNING, "commpipe.sink"):
        _round(sink, store, clock)
    assert (sink.backlog.windows, sink.holding(), sink.backlog.pauses) == (7, True, 1)
    assert "stops reading its input until 3 are left" in caplog.text
    a.down = False  # back: it stores all 7, and they leave the table (but the newest)
    done = _round(sink, store, clock)
    assert sorted(done) == sorted(wid(T0 + 10 * i) for i in range(6))
    assert (sink.backlog.windows, sink.holding()) == (0, False)
    assert [len(w) for w, _ in a.batches] == [7]


def test_pause_holds_while_the_backlog_is_above_half_the_bound() -> None:
    store, sink, (a,), clock = _sink(BacklogLimit(4, "pause"), "a")
    a.down = True
    _windows(store, 0, 6)  # 5 wait
    _round(sink, store, clock)
    assert sink.holding()
    a.down = False
    _round(sink, store, clock)  # stored: 0 wait
    _windows(store, 6, 3)  # 3 wait, a is up: stored in the same round
    a.down = True
    _round(sink, store, clock)
    assert (sink.backlog.windows, sink.holding()) == (3, False)


def test_drop_gives_up_the_away_database_copy_of_the_oldest_windows(caplog: Any) -> None:
    store, sink, (a, b), clock = _sink(BacklogLimit(4, "drop"), "a", "b")
    b.down = True
    _windows(store, 0, 6)  # 5 closed windows, 4 of them final (the newest closed one stays)
    feed(store, 100, [ev("error", T0 + 59.5, 900, error_type="x"),
                      ev("error", T0 + 59.6, 901, error_type="x")])  # in the open window
    with caplog.at_level(logging.WARNING, "commpipe.sink"):
        done = _round(sink, store, clock)
    # b lacks 4 final windows and 2 events: 6 > 4, down to 2: the 4 oldest windows go
    status = sink.status[1]
    assert (status.dropped_windows, status.dropped_events) == (4, 0)
    assert sorted(done) == sorted(wid(T0 + 10 * i) for i in range(4))
    assert "gave up its copy of 4 windows and 0 kept events" in caplog.text
    # a stored everything; b never gets the dropped windows, and the rest when it is back
    b.down = False
    done = _round(sink, store, clock)
    assert done == [detail_id(0, 100)]
    assert b.batches == [([(0, T0 + 40, 5)], ["id900", "id901"])]
    assert (status.dropped_windows, status.dropped_events) == (4, 0)
    assert status.abandoned == set()  # forgotten once deleted


def test_drop_never_touches_a_database_that_is_up() -> None:
    store, sink, (a,), clock = _sink(BacklogLimit(2, "drop"), "a")
    _windows(store, 0, 8)
    _round(sink, store, clock)
    assert sink.status[0].dropped_windows == 0
    assert [len(w) for w, _ in a.batches] == [7]


def test_events_are_dropped_whole_batches_oldest_first() -> None:
    store, sink, (a,), clock = _sink(BacklogLimit(3, "drop"), "a")
    a.down = True
    feed(store, 10, [ev("timeout", T0 + 1, 1, latency_ms=1.0),
                     ev("timeout", T0 + 2, 2, latency_ms=1.0)])
    feed(store, 11, [ev("timeout", T0 + 3, 3, latency_ms=1.0),
                     ev("timeout", T0 + 4, 4, latency_ms=1.0)])
    done = _round(sink, store, clock)  # 4 events > 3, down to 1: both batches go
    assert sorted(done) == sorted([detail_id(0, 10), detail_id(0, 11)])
    assert sink.status[0].dropped_events == 4


@pytest.mark.parametrize(("env", "want"), [({}, BacklogLimit(250_000, "pause")),
                                           ({"COMMPIPE_SINK_MAX_BACKLOG": "10",
                                             "COMMPIPE_SINK_BACKLOG_POLICY": "drop"},
                                            BacklogLimit(10, "drop"))])
def test_the_bound_comes_from_settings(env: dict[str, str], want: BacklogLimit,
                                       tmp_path: Any) -> None:
    sink = build_sink(Settings.from_env(env, duckdb_path=str(tmp_path / "x.duckdb")),
                      Rollups({}, CFG))
    assert sink.backlog.limit == want
