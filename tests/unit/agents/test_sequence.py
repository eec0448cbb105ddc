"""Records reach the table in offset order, each once; nothing unapplied is committed.

The gate tests run Faust's own ``Consumer.ack`` and ``Consumer._new_offset`` (what its
commits are made of) on a stand-in for the consumer's state; the sequence tests feed
:class:`agents.sequence.InputSequence` events as Faust's stream hands them on."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

from faust.transport.consumer import Consumer
from faust.types.tuples import TP, ConsumerMessage
from intervaltree import IntervalTree

from agents.acks import Acks, gate_acks
from agents.consumer import FETCH_MARK
from agents.sequence import SEEKS_BEFORE_ABSENT, InputSequence, blind_read_offsets, count_absent

TOPIC = "comm.events"
TP0 = TP(TOPIC, 0)


def faust_consumer(committed: int | None) -> Any:
    """Faust's consumer bookkeeping, with its real ``ack`` and ``_new_offset``."""
    state = SimpleNamespace(
        _acked=defaultdict(list), _acked_index=defaultdict(set), _gap=defaultdict(IntervalTree),
        _committed_offset=defaultdict(lambda: None, {TP0: committed}), _n_acked=0,
        _unacked_messages=set(), _waiting_for_ack=None,
        app=SimpleNamespace(topics=SimpleNamespace(acks_enabled_for=lambda topic: True)))
    state.unacked = state._unacked_messages
    state.ack = lambda message: Consumer.ack(state, message)  # type: ignore[arg-type]
    state.new_offset = lambda: Consumer._new_offset(state, TP0)  # type: ignore[arg-type]
    return state


def delivered(offset: int, mark: tuple[Any, int] | None = None) -> Any:
    """A record as the conductor hands it to the one stream (one reference)."""
    message = ConsumerMessage(TOPIC, 0, offset, 0.0, 0, [], b"k", b"v", None, tp=TP0)
    message.incref()
    setattr(message, FETCH_MARK, mark)
    return SimpleNamespace(message=message)


def run_the_stream(consumer: Any, applied: list[int], skipped: list[int]) -> None:
    """``applied`` go through Acks (held, delivered, released); ``skipped`` are what Faust's
    stream skips and acknowledges (read while the flow was stopped)."""
    async def scenario() -> None:
        async def stop(exc: BaseException) -> None:
            raise AssertionError(exc)

        acks = Acks(lambda: consumer, stop)
        for offset in sorted(applied + skipped):
            event = delivered(offset)
            if offset in skipped:
                event.message.ack(consumer)  # the stream's skip: no one applied it
                continue
            acks.hold([event])
            event.message.ack(consumer)      # take_events' own ack
            done = asyncio.get_running_loop().create_future()
            done.set_result(None)
            acks.release_when([event], [done])
        await acks.drain()

    asyncio.run(scenario())


def test_without_the_gate_a_skipped_record_is_committed_past() -> None:
    # How record 170 was lost: 161-169 applied, 170 skipped by the stream, 171 applied.
    consumer = faust_consumer(committed=161)
    run_the_stream(consumer, applied=[*range(161, 170), 171], skipped=[170])
    assert consumer.new_offset() == 172


def test_with_the_gate_the_commit_stops_at_the_record_nobody_applied() -> None:
    consumer = faust_consumer(committed=161)
    gate_acks(consumer, TOPIC)
    run_the_stream(consumer, applied=list(range(161, 170)), skipped=[170])
    assert consumer.new_offset() == 170
    assert consumer.unacked == set()  # not waited for at a stop: nobody holds it
    # Nor can a later applied one carry the commit past it (the sequence seeks back first)
    assert consumer.new_offset() is None


def test_the_gate_leaves_other_topics_alone() -> None:
    consumer = faust_consumer(committed=None)
    gate_acks(consumer, "another")
    run_the_stream(consumer, applied=[], skipped=[0, 1])
    assert consumer.new_offset() == 2


def test_fausts_drain_loop_knows_no_read_offset_of_the_input() -> None:
    consumer = faust_consumer(committed=10)
    consumer._read_offset = defaultdict(lambda: None, {TP("other", 0): 4})
    blind_read_offsets(consumer, TOPIC)
    consumer._read_offset[TP0] = 300  # a delivery in flight across a seek back to 11
    consumer._read_offset[TP("other", 0)] = 5
    # the drain loop hands on what it reads (no drop behind 300, no gap after it)...
    assert consumer._read_offset[TP0] is None
    # ...of the input only
    assert consumer._read_offset[TP("other", 0)] == 5


def test_offsets_not_in_kafka_let_the_commit_pass_exactly_them() -> None:
    consumer = faust_consumer(committed=10)
    gate_acks(consumer, TOPIC)
    count_absent(consumer, TP0, 10, 13)  # 10, 11, 12: transaction markers
    run_the_stream(consumer, applied=[13, 14], skipped=[])
    assert consumer.new_offset() == 15


class Broker:
    """The partition's seek count, as the consumer's fetches mark records with it."""

    def __init__(self) -> None:
        self.state = object()
        self.seeks = 0
        self.sought: list[int] = []

    def mark(self) -> tuple[Any, int]:
        return (self.state, self.seeks)

    async def seek(self, tp: Any, offset: int) -> None:
        self.seeks += 1
        self.sought.append(offset)
        await asyncio.sleep(0)  # the call's way back: the consumer may fetch meanwhile


class Worker:
    """An InputSequence restarted as at a recovery (Faust sought ``committed``)."""

    def __init__(self, committed: int | None, quiet_s: float = 5.0) -> None:
        self.broker = Broker()
        self.absent: list[tuple[int, int]] = []
        self.seq = InputSequence(committed=lambda tp: committed,
                                 mark=lambda tp: self.broker.mark(), seek=self.broker.seek,
                                 absent=lambda tp, s, e: self.absent.append((s, e)),
                                 quiet_s=quiet_s)
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self.seq.restart([TP0]))

    def admit(self, offsets: list[int], mark: tuple[Any, int] | None = None) -> list[int]:
        """``offsets`` delivered now (fetched at ``mark``, by default since the last seek)."""
        batch = [delivered(o, mark or self.broker.mark()) for o in offsets]
        kept = self.loop.run_until_complete(self.seq.admit(batch))
        return [e.message.offset for e in kept]

    def close(self) -> None:
        self.loop.close()


def test_a_recovery_reads_again_from_its_own_seek_to_the_committed_offset() -> None:
    w = Worker(committed=40)
    assert w.broker.sought == [40]
    before_it = (w.broker.state, 0)  # fetched after Faust's seek, before ours
    assert w.admit([40, 41], mark=before_it) == []
    assert w.admit([40, 41, 42]) == [40, 41, 42]
    assert w.admit([43]) == [43]
    assert w.broker.sought == [40] and w.seq.repeats == 2
    w.close()


def test_nothing_passes_between_a_revocation_and_the_restart() -> None:
    w = Worker(committed=5)
    assert w.admit([5]) == [5]
    w.seq.forget()
    assert w.admit([6]) == []
    w.loop.run_until_complete(w.seq.restart([TP0]))
    # from the committed offset again: 5 is a replay, for the state's per-key offsets to skip
    assert w.admit([5, 6]) == [5, 6]
    w.close()


def test_a_missing_record_is_read_again_before_any_after_it() -> None:
    w = Worker(committed=161)
    stale_mark = w.broker.mark()
    assert w.admit([*range(161, 170), 171, 172]) == list(range(161, 170))
    assert w.broker.sought == [161, 170] and w.seq.reseeks == 1
    # what the stream still had, delivered before the seek: dropped
    assert w.admit([173, 174], mark=stale_mark) == []
    # read again after the seek
    assert w.admit([170, 171, 172, 173]) == [170, 171, 172, 173]
    assert w.seq.repeats == 3  # 172 (behind 171, which asked for the seek), 173 and 174
    assert w.broker.sought == [161, 170]
    w.close()


def test_a_record_delivered_twice_is_applied_once() -> None:
    w = Worker(committed=5)
    assert w.admit([5, 6, 7]) == [5, 6, 7]
    assert w.admit([6, 7, 8]) == [8]
    assert w.broker.sought == [5]
    w.close()


def test_offsets_still_missing_after_the_seeks_are_not_in_kafka() -> None:
    w = Worker(committed=10)
    assert w.admit([10, 13, 14]) == [10]
    assert w.broker.sought == [10, 11]
    for _ in range(SEEKS_BEFORE_ABSENT - 1):  # each seek there answered by 13 first
        assert w.admit([13, 14]) == []
    assert w.broker.sought == [10] + [11] * SEEKS_BEFORE_ABSENT
    assert w.absent == []
    assert w.admit([13, 14, 15]) == [13, 14, 15]
    assert w.absent == [(11, 13)] and w.seq.absent == 2
    w.close()


def test_no_commit_yet_starts_at_zero_and_at_the_first_offset_kafka_has() -> None:
    w = Worker(committed=None)
    assert w.broker.sought == [0]
    for _ in range(SEEKS_BEFORE_ABSENT - 1):
        assert w.admit([3, 4]) == []
    assert w.admit([3, 4]) == [3, 4]  # 0..2 removed by retention
    assert w.absent == [(0, 3)] and w.broker.sought == [0] * SEEKS_BEFORE_ABSENT
    w.close()


def test_a_record_lost_on_its_way_after_the_seek_is_read_again() -> None:
    # The cluster test on Apache Kafka: a restart sought partition 2 to its committed offset
    # 677; the first record that reached the agent after that seek was 678 (677 went
    # missing between the consumer and the agent), and 677 was taken for an offset not in
    # Kafka ("offsets 677..677 are not in Kafka"): its two events were never counted.
    w = Worker(committed=677)
    assert w.admit([678, 679]) == []
    assert w.broker.sought == [677, 677] and w.seq.reseeks == 1
    assert w.admit([677, 678, 679]) == [677, 678, 679]
    assert w.absent == [] and w.seq.absent == 0
    # the count starts again at the next seek back
    assert w.admit([681]) == []
    assert w.admit([680, 681]) == [680, 681]
    assert w.absent == []
    w.close()


def test_a_seek_asked_for_before_a_revocation_is_not_made_after_it() -> None:
    w = Worker(committed=20)

    async def scenario() -> list[int]:
        batch = [delivered(o, w.broker.mark()) for o in (20, 22)]
        admitting = asyncio.ensure_future(w.seq.admit(batch))
        await asyncio.sleep(0)   # its seek back to 21 waits for the lock...
        w.seq.forget()           # ...while the partitions are revoked
        return [e.message.offset for e in await admitting]

    async def hold_lock_then(test: Any) -> list[int]:
        async with w.seq._lock:
            task = asyncio.ensure_future(test())
            await asyncio.sleep(0.01)
        return await task

    assert w.loop.run_until_complete(hold_lock_then(scenario)) == [20]
    assert w.broker.sought == [20]
    w.close()


def test_records_fetched_after_the_seek_count_before_its_call_has_returned() -> None:
    # The rebalance test on Kafka: the record at the committed offset arrived while the
    # restart's seek call was still on its way back, was dropped as fetched before it, and
    # the next one was taken for a gap ("offsets 1537..1537 are not in Kafka").
    w = Worker(committed=1)
    assert w.admit([1, 2]) == [1, 2]

    async def scenario() -> list[int]:
        w.seq.forget()
        restart = asyncio.ensure_future(w.seq.restart([TP0]))
        await asyncio.sleep(0)  # the seek is made; its call has not returned yet
        batch = [delivered(o, w.broker.mark()) for o in (1, 2, 3)]
        kept = await w.seq.admit(batch)
        await restart
        return [e.message.offset for e in kept]

    assert w.loop.run_until_complete(scenario()) == [1, 2, 3]
    assert w.absent == [] and w.broker.sought == [1, 1]
    w.close()


def test_a_record_lost_with_none_behind_it_is_read_again() -> None:
    # 12 was fetched (the consumer's position is 13) but never reached the agent, and no
    # later record came to show the gap: once the partition has been quiet, seek back.
    w = Worker(committed=10, quiet_s=0.0)
    assert w.admit([10, 11]) == [10, 11]
    assert w.seq.stalled({TP0: 12}) == []  # read up to where it applied: nothing missing
    assert w.seq.stalled({TP0: 13}) == [TP0]
    assert w.loop.run_until_complete(w.seq.unstall({TP0: 13})) == 1
    assert w.broker.sought == [10, 12] and w.seq.reseeks == 1
    assert w.admit([12]) == [12]
    assert w.seq.stalled({TP0: 13}) == [] and w.absent == []
    w.close()


def test_a_busy_or_just_moved_partition_is_not_stalled() -> None:
    w = Worker(committed=10)  # quiet_s 5
    assert w.admit([10]) == [10]
    moved = time.monotonic()
    assert w.seq.stalled({TP0: 20}, now=moved + 1) == []   # applied a record 1 s ago
    assert w.seq.stalled({TP0: 20}, now=moved + 6) == [TP0]
    assert w.seq.stalled({TP0: None}, now=moved + 6) == []  # position not known
    w.seq.forget()
    assert w.seq.stalled({TP0: 20}, now=moved + 6) == []   # not started
    w.close()


def test_offsets_read_past_that_no_seek_brings_are_not_in_kafka() -> None:
    # a transaction marker last in the partition: the consumer's position is past it, and
    # no record ever comes
    w = Worker(committed=10, quiet_s=0.0)
    assert w.admit([10]) == [10]
    for _ in range(SEEKS_BEFORE_ABSENT):
        assert w.loop.run_until_complete(w.seq.unstall({TP0: 12})) == 1
    assert w.broker.sought == [10] + [11] * SEEKS_BEFORE_ABSENT and w.absent == []
    assert w.loop.run_until_complete(w.seq.unstall({TP0: 12})) == 1
    assert w.absent == [(11, 12)] and w.seq.absent == 1
    assert w.seq.stalled({TP0: 12}) == []
    assert w.admit([12]) == [12]
    w.close()


def test_a_failed_seek_back_leaves_the_partition_readable_and_due_again() -> None:
    w = Worker(committed=10, quiet_s=0.0)
    assert w.admit([10]) == [10]

    async def refused(tp: Any, offset: int) -> None:
        raise RuntimeError("partition not assigned")

    w.seq._seek = refused
    assert w.loop.run_until_complete(w.seq.unstall({TP0: 12})) == 1
    assert w.admit([11]) == [11]  # not held back by a seek that never happened
    w.close()


def test_records_waiting_behind_a_long_batch_are_not_missing() -> None:
    # the broker-away test on Tansu: the agent held in a batch for 30 s while its writes
    # waited, with the partitions read ahead of it
    w = Worker(committed=10, quiet_s=0.2)
    assert w.admit([10]) == [10]
    w.seq.applying()
    time.sleep(0.25)
    assert w.seq.stalled({TP0: 20}) == []  # the agent is busy
    w.seq.applied()  # a long batch: the quiet time starts again
    assert w.seq.stalled({TP0: 20}) == []
    assert w.seq.stalled({TP0: 20}, now=time.monotonic() + 0.2) == [TP0]
    w.close()


def test_short_batches_of_other_partitions_do_not_hide_a_stalled_one() -> None:
    w = Worker(committed=10, quiet_s=0.2)
    assert w.admit([10]) == [10]
    for _ in range(5):
        w.seq.applying()
        w.seq.applied()
    assert w.seq.stalled({TP0: 20}, now=time.monotonic() + 0.2) == [TP0]
    w.close()
