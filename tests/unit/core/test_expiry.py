"""Silent edges leave the table, and no replay brings back what they held."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline.core.batch import PartitionBatch
from pipeline.core.expiry import expired_edges
from pipeline.core.store import edge_id
from pipeline.core.window import WindowConfig
from pipeline.wire.events import Event, edge_key

CFG = WindowConfig(size_s=10.0, grace_s=5.0, max_future_s=300.0)
T0 = 1_700_000_000.0
OLD, HOT = ("api", "old", "http"), ("api", "hot", "http")
DAY = 86_400.0


def ev(edge: tuple[str, str, str], ts: float, n: int) -> Event:
    return Event("request", f"e{n}", f"c{n}", *edge, ts)


def apply(store: dict[str, Any], records: list[tuple[int, Event]], *, now: float) -> None:
    """One batch per record, its changes written in order (as the worker does)."""
    for offset, event in records:
        batch = PartitionBatch(0, CFG, store)
        batch.apply(offset, [event], record_ts=event.ts, now=now)
        store.update(batch.changes())


def windows_gone(store: dict[str, Any]) -> None:
    """What the sink does once every database holds them."""
    for key in [k for k in store if k.startswith("w")]:
        del store[key]


def requests(store: dict[str, Any], edge: tuple[str, str, str]) -> int | None:
    meta = store.get(edge_id(0, edge_key(*edge)))
    return None if meta is None else meta.totals.requests


def test_only_silent_edges_without_windows_under_the_floor_expire() -> None:
    store: dict[str, Any] = {}
    apply(store, [(0, ev(OLD, T0, 0)), (1, ev(OLD, T0 + 1, 1))], now=0.0)
    apply(store, [(2, ev(HOT, T0 + 2, 2))], now=DAY)
    windows_gone(store)
    assert expired_edges(store.items(), now=DAY + 1, silent_s=DAY) == [edge_id(0, edge_key(*OLD))]
    assert expired_edges(store.items(), now=DAY - 1, silent_s=DAY) == []  # not silent yet
    later = dict(store)
    apply(later, [(3, ev(HOT, T0 + 3, 3))], now=DAY)
    # HOT is silent two days on, but a window of it is left; OLD has none, but the
    # partition meta the table holds is behind OLD's offset (its write not yet there)
    later[edge_id(0, edge_key(*OLD))].offset = 5
    assert expired_edges(later.items(), now=3 * DAY, silent_s=DAY) == []
    windows_gone(later)
    assert expired_edges(later.items(), now=3 * DAY, silent_s=DAY) == [
        edge_id(0, edge_key(*HOT))]


def test_a_replay_after_the_deletion_brings_nothing_back() -> None:
    store: dict[str, Any] = {}
    records = [(0, ev(OLD, T0, 0)), (1, ev(OLD, T0 + 1, 1)), (2, ev(HOT, T0 + 2, 2))]
    apply(store, records[:2], now=0.0)
    apply(store, records[2:], now=DAY)
    windows_gone(store)
    for key in expired_edges(store.items(), now=DAY + 1, silent_s=DAY):
        del store[key]  # the worker's tombstone
    assert requests(store, OLD) is None and requests(store, HOT) == 1
    apply(store, records, now=2 * DAY)  # a restart reads everything again
    assert requests(store, OLD) is None and requests(store, HOT) == 1
    apply(store, [(3, ev(OLD, T0 + 3, 3))], now=2 * DAY)  # the edge speaks again: from zero
    assert requests(store, OLD) == 1


def test_a_silence_must_be_positive() -> None:
    with pytest.raises(ValueError, match="> 0"):
        expired_edges([], now=0.0, silent_s=0.0)


def test_an_edge_leaves_with_its_windows_once_each_may_leave() -> None:
    store: dict[str, Any] = {}
    apply(store, [(0, ev(OLD, T0, 0)), (1, ev(OLD, T0 + 11, 1))], now=0.0)
    windows = sorted(k for k in store if k.startswith("w"))
    assert len(windows) == 2
    edge = edge_id(0, edge_key(*OLD))
    # the sink keeps an edge's newest stored window for the exporter: it goes with the edge
    assert expired_edges(store.items(), now=DAY, silent_s=DAY,
                         removable=lambda key, window: True) == [edge, *windows]
    # one window not stored yet: the edge and both windows stay
    assert expired_edges(store.items(), now=DAY, silent_s=DAY,
                         removable=lambda key, window: key != windows[1]) == []
