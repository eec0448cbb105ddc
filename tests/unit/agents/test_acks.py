"""A taken batch stays uncommittable until its changelog writes are delivered.

Faust acknowledges a ``take_events`` batch in a ``finally`` (whatever happened inside
the agent), through ``Message.ack(consumer)``; the consumer commits what reached it.
These tests use Faust's own message class and an event loop, with a consumer that
records what it was given to commit (Faust's consumer would commit exactly those)."""

from __future__ import annotations

import asyncio
from typing import Any

from faust.types.tuples import ConsumerMessage

from agents.acks import Acks


class Committable:
    """What Faust's consumer does with a final ack: the offset may be committed."""

    def __init__(self) -> None:
        self.offsets: list[int] = []

    def ack(self, message: Any) -> bool:
        self.offsets.append(message.offset)
        return True


class Event:
    def __init__(self, offset: int) -> None:
        self.message = ConsumerMessage("t", 0, offset, 0.0, 0, [], b"k", b"v", None)
        self.message.incref()  # the conductor's reference, for the one stream


def stream_ack(events: list[Event], consumer: Committable) -> None:
    """What take_events' ``finally`` does to every event of the batch."""
    for event in events:
        event.message.ack(consumer)


def test_the_streams_own_ack_commits_nothing_until_the_writes_land() -> None:
    async def scenario() -> tuple[list[int], list[int], list[int]]:
        consumer = Committable()
        failures: list[BaseException] = []

        async def stop(exc: BaseException) -> None:
            failures.append(exc)

        acks = Acks(lambda: consumer, stop)
        batch = [Event(7), Event(8)]
        acks.hold(batch)
        write: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        acks.release_when(batch, [write])
        stream_ack(batch, consumer)      # the agent's batch ended (or raised)
        await asyncio.sleep(0.01)
        before = list(consumer.offsets)  # nothing may be committed yet
        write.set_result(None)           # the changelog write is delivered
        await acks.drain()
        after = list(consumer.offsets)
        assert failures == [] and acks.held == 0
        return before, after, [e.message.refcount for e in batch]

    before, after, refs = asyncio.run(scenario())
    assert before == []
    assert after == [7, 8]
    assert refs == [0, 0]


def test_a_failed_write_commits_nothing_and_stops_the_worker() -> None:
    async def scenario() -> tuple[list[int], list[str], int]:
        consumer = Committable()
        failures: list[str] = []

        async def stop(exc: BaseException) -> None:
            failures.append(str(exc))

        acks = Acks(lambda: consumer, stop)
        batch = [Event(3)]
        acks.hold(batch)
        ok: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        bad: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ok.set_result(None)
        bad.set_exception(ConnectionError("changelog partition away"))
        acks.release_when(batch, [ok, bad])
        stream_ack(batch, consumer)
        await acks.drain()
        return consumer.offsets, failures, acks.held

    offsets, failures, held = asyncio.run(scenario())
    assert offsets == []
    assert failures == ["changelog partition away"]
    assert held == 1


def test_fausts_commit_passes_one_unacknowledged_record() -> None:
    # Why releases must acknowledge in order: with offset 10 the next to commit, and 11
    # acknowledged before 10, Faust's consumer would commit 12 (past 10), and before a
    # partition's first commit it passes any number of unacknowledged records.
    from collections import defaultdict
    from types import SimpleNamespace

    from faust.transport.consumer import Consumer
    from intervaltree import IntervalTree

    def new_offset(committed: int | None, acked: list[int]) -> int | None:
        tp = ("t", 0)
        fake = SimpleNamespace(_acked={tp: list(acked)}, _gap=defaultdict(IntervalTree),
                               _committed_offset=defaultdict(lambda: None, {tp: committed}),
                               _acked_index={tp: set(acked)})
        return Consumer._new_offset(fake, tp)  # type: ignore[arg-type]

    assert new_offset(10, [10, 11]) == 12
    assert new_offset(10, [12, 13]) is None  # two missing: it waits
    assert new_offset(10, [11]) == 12        # one missing: it commits past 10
    assert new_offset(None, [15, 16]) == 17  # no commit yet: past anything


def test_a_partitions_releases_acknowledge_in_the_order_asked() -> None:
    # A release with nothing to write (its records were only dead-lettered) comes after
    # one whose changelog write is still on its way: it must wait for it.
    async def scenario() -> tuple[list[int], list[int]]:
        consumer = Committable()

        async def stop(exc: BaseException) -> None:
            raise AssertionError(exc)

        acks = Acks(lambda: consumer, stop)
        first, second = [Event(10)], [Event(11)]
        acks.hold(first + second)
        write: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        acks.release_when(first, [write])
        acks.release_when(second, [])
        stream_ack(first + second, consumer)
        await asyncio.sleep(0.01)
        before = list(consumer.offsets)
        write.set_result(None)
        await acks.drain()
        return before, list(consumer.offsets)

    before, after = asyncio.run(scenario())
    assert before == []
    assert after == [10, 11]


def test_a_failed_earlier_release_keeps_the_later_ones_unacknowledged() -> None:
    async def scenario() -> tuple[list[int], int]:
        consumer = Committable()
        failures: list[str] = []

        async def stop(exc: BaseException) -> None:
            failures.append(str(exc))

        acks = Acks(lambda: consumer, stop)
        first, second = [Event(10)], [Event(11)]
        acks.hold(first + second)
        write: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        acks.release_when(first, [write])
        acks.release_when(second, [])
        write.set_exception(RuntimeError("broker refused it"))
        await acks.drain()
        return list(consumer.offsets), len(failures)

    assert asyncio.run(scenario()) == ([], 1)


def test_a_recovery_missing_acknowledged_writes_stops_the_worker() -> None:
    # Records are acknowledged only once the changelog holds their partition meta, so the
    # committed offset (the next to read) is at most the recovered meta's offset + 1.
    import pytest

    from agents.consumer import check_recovered

    check_recovered(2, applied=99, committed=100)   # everything up to 99 recovered
    check_recovered(2, applied=120, committed=100)  # acknowledged later than applied
    check_recovered(2, applied=-1, committed=None)  # the group never committed
    with pytest.raises(RuntimeError, match="up to offset 99, but the group committed 105"):
        check_recovered(2, applied=99, committed=105)
