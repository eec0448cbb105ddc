"""The record cache: each changed key written once per interval, records released after.

A dict stands in for the table (as in tests/unit/core), ``send`` records what reaches
the changelog, ``release`` what would be acknowledged."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from agents.cache import RecordCache
from pipeline.core.store import parse_id, partition_id
from pipeline.core.window import WindowConfig
from pipeline.wire.events import Event

CFG = WindowConfig(size_s=10.0, grace_s=5.0)
T0 = 1_700_000_000.0
EDGE = ("api", "db", "grpc")


def run(coro: Any) -> Any:
    return asyncio.run(coro)


class Harness:
    def __init__(self, *, interval_s: float = 1.0, max_records: int = 100) -> None:
        self.now = 0.0
        self.store: dict[str, Any] = {}
        self.writes: list[tuple[int, list[str]]] = []
        self.released: list[list[int]] = []
        self.settled: list[list[Any]] = []
        self.order: list[str] = []
        self.cache = RecordCache(CFG, self.store, interval_s=interval_s,
                                 max_records=max_records, put=self.store.update,
                                 send=self.send, settle=self.settle, release=self.release,
                                 clock=lambda: self.now)

    async def send(self, partition: int, changes: list[tuple[str, Any]]) -> list[Any]:
        self.writes.append((partition, [k for k, _ in changes]))
        self.order.append("changes")
        return [f"delivery of {k}" for k, _ in changes]

    async def settle(self, letters: list[Any]) -> None:
        self.settled.append(list(letters))
        self.order.append("letters")

    def release(self, records: list[Any], writes: list[Any]) -> None:
        assert len(writes) == len(self.writes[-1][1])  # every write of the write-out
        self.released.append(list(records))

    def feed(self, partition: int, offsets: list[int]) -> None:
        work = self.cache.open(partition)
        for offset in offsets:
            work.apply(offset, [Event("request", f"e{offset}", "c", *EDGE, T0 + 1)],
                       record_ts=T0 + 2, now=T0 + 2)
        run(self.cache.add(partition, offsets, []))


def test_a_key_changed_by_many_batches_is_written_once_per_interval() -> None:
    h = Harness(interval_s=1.0)
    h.feed(0, [1, 2])
    h.now = 0.4
    h.feed(0, [3])
    h.now = 0.9
    h.feed(0, [4, 5])
    assert h.writes == [] and h.released == []  # gathering
    h.now = 1.0
    run(h.cache.write_out_due())
    (partition, keys), = h.writes
    kinds = Counter(parse_id(k)[0] for k in keys)
    assert (partition, kinds) == (0, Counter({"w": 1, "e": 1, "p": 1}))
    assert keys[-1] == partition_id(0)  # the partition meta last
    assert h.released == [[1, 2, 3, 4, 5]]
    window = next(v for k, v in h.store.items() if k.startswith("w"))
    assert (window.requests, window.offset) == (5, 5)


def test_write_out_when_full_or_when_a_batch_ends_past_the_interval() -> None:
    h = Harness(interval_s=1.0, max_records=3)
    h.feed(0, [1, 2])
    h.feed(0, [3])  # three records: full
    assert h.released == [[1, 2, 3]]
    h.feed(0, [4])
    h.now = 5.0
    h.feed(0, [5])  # the open batch is 5 s old when this batch ends
    assert h.released == [[1, 2, 3], [4, 5]]


def test_partitions_are_written_apart_and_a_busy_one_waits_for_its_batch() -> None:
    h = Harness(interval_s=1.0)
    h.feed(0, [1])
    h.feed(1, [1])
    work = h.cache.open(1)  # the agent is applying a batch of partition 1 (awaiting)
    h.now = 2.0
    run(h.cache.write_out_due())
    assert [p for p, _ in h.writes] == [0]
    work.apply(2, [Event("request", "e2", "c", *EDGE, T0 + 1)], record_ts=T0, now=T0)
    run(h.cache.add(1, [2], []))  # its batch ends: due, so written with what it just applied
    assert [p for p, _ in h.writes] == [0, 1]
    assert h.released == [[1], [1, 2]]


def test_while_giving_partitions_up_every_batch_is_written_at_once() -> None:
    h = Harness(interval_s=60.0)
    h.feed(0, [1])
    work = h.cache.open(1)
    run(h.cache.write_out_all())  # a rebalance began while partition 1 was being applied
    assert h.released == [[1]]
    work.apply(1, [Event("request", "e1", "c", *EDGE, T0 + 1)], record_ts=T0, now=T0)
    run(h.cache.add(1, [1], []))
    h.feed(0, [2])
    assert h.released == [[1], [1], [2]]
    h.cache.relax()
    h.feed(0, [3])
    assert h.released == [[1], [1], [2]] and h.cache.unwritten() == 1


def test_a_batch_that_failed_halfway_is_never_written() -> None:
    h = Harness(interval_s=0.0)
    h.feed(0, [1])
    work = h.cache.open(0)
    work.apply(2, [Event("request", "e2", "c", *EDGE, T0 + 1)], record_ts=T0, now=T0)
    h.cache.abandon(0)  # the worker stops: nothing of it may reach the table
    run(h.cache.write_out_all())
    assert h.released == [[1]]
    assert h.store[partition_id(0)].offset == 1


def test_a_batch_opened_while_a_write_out_waits_to_send_builds_on_its_changes() -> None:
    # The broker is slow: a write-out of partition 0 waits for an earlier send while the
    # next batch of partition 0 opens. Built on a table without the waiting changes, the
    # new batch's write-out would overwrite them (found by the broker-away test: 10-40
    # events per edge missing from the changelog, no error anywhere).
    async def scenario() -> None:
        h = Harness(interval_s=0.0)
        gate = asyncio.Event()
        sent = h.send

        async def slow_send(partition: int, changes: list[tuple[str, Any]]) -> list[Any]:
            await gate.wait()
            return await sent(partition, changes)

        h.cache._send = slow_send  # noqa: SLF001 - the producer, slowed down
        ends = []
        for offsets in ([1, 2], [3]):
            work = h.cache.open(0)
            for offset in offsets:
                work.apply(offset, [Event("request", f"e{offset}", "c", *EDGE, T0 + 1)],
                           record_ts=T0 + 2, now=T0 + 2)
            ends.append(asyncio.ensure_future(h.cache.add(0, offsets, [])))
            await asyncio.sleep(0)  # the first write-out now waits in its send
        gate.set()
        await asyncio.gather(*ends)
        assert h.released == [[1, 2], [3]]
        window = next(v for k, v in h.store.items() if k.startswith("w"))
        assert (window.requests, window.offset) == (3, 3)
        assert h.store[partition_id(0)].offset == 3

    run(scenario())


def test_dead_letters_are_delivered_before_the_changes_that_would_skip_their_record() -> None:
    # A replay skips a record the changelog says was applied, and would never send its
    # dead letters again: they must be in Kafka before the changes are sent (a chaos run
    # ended one dead letter short, its record's changes written, the letter not).
    h = Harness(interval_s=0.0)
    work = h.cache.open(0)
    work.apply(1, [Event("request", "e1", "c", *EDGE, T0 + 1)], record_ts=T0 + 2, now=T0 + 2)
    run(h.cache.add(0, [1], ["letter of record 1"]))
    assert h.settled == [["letter of record 1"]]
    assert h.order == ["letters", "changes"]
