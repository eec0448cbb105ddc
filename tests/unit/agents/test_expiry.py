"""The worker's expiry timer and the state of partitions given away (agents/expiry.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from agents.expiry import EdgeExpiry, drop_unowned, expiry_interval
from pipeline.core.batch import PartitionBatch
from pipeline.core.rollups import Rollups
from pipeline.core.store import edge_id, parse_id, partition_id, window_id
from pipeline.core.window import WindowConfig
from pipeline.wire.events import Event, edge_key

CFG = WindowConfig(size_s=10.0, grace_s=5.0, max_future_s=300.0)
T0 = 1_700_000_000.0
A, B = ("api", "a", "http"), ("api", "b", "http")


def feed(store: dict[str, Any], partition: int, offset: int, edge: tuple[str, str, str],
         *, now: float) -> PartitionBatch:
    batch = PartitionBatch(partition, CFG, store)
    batch.apply(offset, [Event("request", f"e{offset}", f"c{offset}", *edge, T0 + offset)],
                record_ts=T0 + offset, now=now)
    return batch


def written(store: dict[str, Any], batch: PartitionBatch) -> None:
    store.update(batch.changes())


class Worker:
    def __init__(self, store: dict[str, Any], *, owned: set[int], now: float,
                 touched: set[str] | None = None, busy: bool = False,
                 stored: bool = True) -> None:
        """``stored``: whether the databases hold the windows (``removable`` for each)."""
        self.store = store
        self.deleted: list[str] = []

        async def delete(keys: list[str]) -> None:
            for key in keys:
                del store[key]
            self.deleted.extend(keys)

        rollups = Rollups(store, CFG, idle_close_s=1e9, owned=owned.__contains__)
        self.expiry = EdgeExpiry(silent_s=100.0, items=rollups.owned_items,
                                 touched=lambda: touched or set(),
                                 removable=lambda key, window: stored,
                                 delete=delete, busy=lambda: busy, clock=lambda: now)

    def run(self) -> list[str]:
        return asyncio.run(self.expiry.run_once())


def test_silent_edges_of_owned_partitions_leave_and_are_counted() -> None:
    store: dict[str, Any] = {}
    written(store, feed(store, 0, 0, A, now=0.0))
    written(store, feed(store, 1, 0, A, now=0.0))  # another partition's part of the edge
    written(store, feed(store, 0, 1, B, now=150.0))
    w = Worker(store, owned={0}, now=200.0)
    a_window = window_id(0, edge_key(*A), T0)
    assert a_window in store
    assert w.run() == [edge_id(0, edge_key(*A)), a_window]  # its window goes with it
    assert edge_id(1, edge_key(*A)) in store and edge_id(0, edge_key(*B)) in store
    assert w.expiry.expired == 1
    assert w.run() == [] and w.expiry.expired == 1


def test_an_edge_with_a_window_the_databases_lack_stays() -> None:
    store: dict[str, Any] = {}
    written(store, feed(store, 0, 0, A, now=0.0))
    assert Worker(store, owned={0}, now=200.0, stored=False).run() == []
    assert edge_id(0, edge_key(*A)) in store


def test_an_edge_with_changes_in_the_cache_stays() -> None:
    store: dict[str, Any] = {}
    written(store, feed(store, 0, 0, A, now=0.0))
    open_batch = feed(store, 0, 1, A, now=200.0)  # applied, not written out yet
    touched = open_batch.touched_edges()
    assert touched == {edge_id(0, edge_key(*A))}
    assert Worker(store, owned={0}, now=200.0, touched=touched).run() == []
    written(store, open_batch)
    assert store[edge_id(0, edge_key(*A))].totals.requests == 2


def test_nothing_leaves_while_a_rebalance_or_recovery_is_under_way() -> None:
    store: dict[str, Any] = {}
    written(store, feed(store, 0, 0, A, now=0.0))
    assert Worker(store, owned={0}, now=200.0, busy=True).run() == []
    assert edge_id(0, edge_key(*A)) in store


def test_a_partition_given_away_leaves_the_memory() -> None:
    store: dict[str, Any] = {}
    for partition in (0, 1, 2):
        store.update(feed(store, partition, 0, A, now=0.0).changes())
    gone = drop_unowned(store, iter([0, 2]))
    assert {parse_id(key)[1] for key in gone} == {1}
    assert partition_id(1) in gone and edge_id(1, edge_key(*A)) in gone
    assert all(edge_id(p, edge_key(*A)) in store for p in (0, 2))
    assert partition_id(1) not in store and len(gone) == 3  # window, edge, partition meta


def test_the_timer_looks_a_quarter_of_the_bound_apart() -> None:
    assert expiry_interval(86_400.0) == 60.0
    assert expiry_interval(8.0) == 2.0
    assert expiry_interval(1.0) == 0.5
