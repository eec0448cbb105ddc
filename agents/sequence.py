"""Each input partition's records reach the table in offset order, each once.

Faust can lose a record on its way from the consumer to the agent: its stream skips a
record read while the flow is stopped or from an older generation; its drain loop
marks a record read even when the delivery was cancelled by a flow stop; its
``getmany`` breaks off a fetch when the flow stops. With acknowledgements gated
(agents/acks.py) such a record is never committed past, but the agent would go on with
the records after it, and when the record came again (after a restart) its counts
would be refused as a replay (the per-key offsets are past it). So the agent must not
go past it either.

:class:`InputSequence` keeps, per input partition, the offset the next record must
have: at each recovery the group's committed offset (0 if none), then one past each
record applied. At each recovery, once Faust has sought the committed offsets, the worker
seeks there again itself (Faust seeks while its flow runs, and records reach the agent
before its seek returns: only a seek of our own tells which records came after it), and
no record of a partition passes between a revocation or recovery and that seek.

- A record at that offset is applied.
- A record behind it was applied already in this assignment (delivered twice): dropped.
- A record past it means records in between went missing: the partition is sought back
  to the expected offset, and records are dropped (neither applied nor acknowledged)
  until the first one fetched after that seek, told apart by the seek count each
  record carries (agents/consumer.py).
- If that first record is still past the expected offset, the partition is sought there
  again, up to :data:`SEEKS_BEFORE_ABSENT` seeks in all: the consumer can lose the first
  record it fetches after a seek on its way to the agent (seen on Apache Kafka, the record
  at the committed offset, once in a few hundred restarts), and one more seek reads it.
  Only if it is still past after those seeks are the offsets in between taken as not in
  Kafka (transaction markers, or retention removed them): they are counted as done for
  Faust's commits, and reading goes on from that record.

A record lost on its way with no later record behind it would wait, unapplied and
uncommitted, for the partition's next record: :meth:`InputSequence.stalled` names the
partitions whose consumer has read past the expected offset while nothing reached the
agent for a while, and the worker seeks them back (a timer).

Faust's drain loop keeps, per partition, the offset it last handed on, drops any record
behind it as read already, and takes offsets it jumped over for a gap that its commits
may pass (``Consumer._add_gap``, the record after the gap included) before anything
applied them. A delivery in flight across a seek set that offset back past the seek when
it finished: the records from the seek on were then dropped as read (the rebalance test:
~200 records of a partition, each time a worker took it back). For the input topic the
drain loop knows no such offset (:func:`blind_read_offsets`): it hands every record on,
and this module alone decides what is a repeat, what is missing and what is absent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from agents.consumer import FETCH_MARK, fetched_since

__all__ = ["SEEKS_BEFORE_ABSENT", "UNSTALL_QUIET_S", "InputSequence", "blind_read_offsets",
           "count_absent", "follow_seeks"]

log = logging.getLogger("commpipe.worker")

SEEKS_BEFORE_ABSENT = 3
"""Seeks to a partition's expected offset, each answered by a later record first, before
the offsets in between are taken as not in Kafka."""

UNSTALL_QUIET_S = 5.0
"""How long a partition read past its expected offset goes without a record applied
before the worker seeks it back (:meth:`InputSequence.stalled`)."""

_PENDING = object()
"""The partition's seek is asked for but not yet done."""


class _ReadOffsets(defaultdict):  # type: ignore[type-arg]
    """Faust's per-partition "read up to" offsets, unknown for one topic."""

    def __init__(self, topic: str, offsets: Any) -> None:
        super().__init__(lambda: None, offsets)
        self.topic = topic

    def __getitem__(self, tp: Any) -> Any:
        return None if tp.topic == self.topic else super().__getitem__(tp)


def blind_read_offsets(consumer: Any, topic: str) -> None:
    """Make Faust's drain loop pass every record of the input topic on, in the order the
    consumer fetched it: no read offset, so no gap and no drop (see the module docstring);
    what is a repeat and what is missing is :class:`InputSequence`'s to decide."""
    if isinstance(consumer._read_offset, _ReadOffsets):  # noqa: SLF001
        return
    consumer._read_offset = _ReadOffsets(topic, consumer._read_offset)  # noqa: SLF001


def follow_seeks(consumer: Any, topic: str, sequence: InputSequence) -> None:
    """After each of Faust's seeks to the committed offsets (``Consumer.perform_seek``, at
    every recovery), restart ``sequence`` on ``topic``'s assigned partitions."""
    if getattr(consumer, "_commpipe_follows", None) is sequence:
        return
    original = consumer.perform_seek

    async def perform_seek() -> None:
        try:
            await original()
        finally:
            await sequence.restart(sorted(tp for tp in consumer.assignment()
                                          if tp.topic == topic))

    consumer.perform_seek = perform_seek
    consumer._commpipe_follows = sequence  # noqa: SLF001


def count_absent(consumer: Any, tp: Any, start: int, end: int) -> None:
    """Let Faust's commits pass offsets ``start``..``end - 1`` of ``tp``: not in Kafka."""
    gap = consumer._gap[tp]  # noqa: SLF001 - merged into the acked offsets at commit
    gap.addi(start, end)
    gap.merge_overlaps()


def _seeks_of(message: Any) -> Any:
    mark = getattr(message, FETCH_MARK, None)
    return mark[1] if mark else None


class InputSequence:
    """Which records of a batch the agent may apply (see the module docstring)."""

    def __init__(self, *, committed: Callable[[Any], int | None],
                 mark: Callable[[Any], tuple[Any, int]],
                 seek: Callable[[Any, int], Awaitable[None]],
                 absent: Callable[[Any, int, int], None],
                 quiet_s: float = UNSTALL_QUIET_S) -> None:
        self._committed = committed
        """The group's committed offset of a partition (Faust's, after its seek)."""
        self._mark = mark
        """A partition's fetch mark now (agents/consumer.py)."""
        self._seek = seek
        """Seek a partition (one seek: its fetch mark goes up by one)."""
        self._absent = absent
        self.quiet_s = quiet_s
        """How long a partition read past its expected offset may go without a record
        applied before :meth:`unstall` seeks it back."""
        self._next: dict[int, int] = {}
        self._seeking: dict[int, Any] = {}
        self._sought: dict[int, int] = {}
        """Per partition, seeks made to its expected offset that a later record, or no
        record at all, answered."""
        self._moved: dict[int, float] = {}
        """Per partition, when a record of it was last applied or it was last sought."""
        self._applying: float | None = None
        """Since when the agent applies a batch (:meth:`applying`, :meth:`applied`)."""
        self._generation = 0
        """Bumped by :meth:`forget`: a seek asked for before it is not made after it."""
        self._lock = asyncio.Lock()
        """One seek at a time, each noted before the next is made."""
        self.reseeks = 0
        """Seeks back to a missing record."""
        self.repeats = 0
        """Records dropped unapplied: delivered twice, before a seek back, or between a
        revocation or recovery and the restart."""
        self.absent = 0
        """Offsets found not to be in Kafka."""

    def forget(self) -> None:
        """A recovery or a revocation: no partition's records pass until :meth:`restart`."""
        self._generation += 1
        self._next.clear()
        self._seeking.clear()
        self._sought.clear()
        self._moved.clear()

    async def restart(self, tps: Sequence[Any]) -> None:
        """Faust sought ``tps`` (its input partitions) to the committed offsets: read each
        again from there, from a seek of our own. (Records reach the agent before Faust's
        seek has returned, and Faust seeks while the flow runs: only a seek made here
        tells which records were fetched after it.)"""
        self.forget()
        generation = self._generation
        for tp in tps:
            self._next[tp.partition] = self._committed(tp) or 0
            self._seeking[tp.partition] = _PENDING
        for tp in tps:
            await self._seek_to(tp, self._next[tp.partition], generation)
            log.info("worker: reading %s/%s from offset %s", tp.topic, tp.partition,
                     self._next[tp.partition])

    async def _seek_to(self, tp: Any, offset: int, generation: int) -> None:
        async with self._lock:
            if generation == self._generation:
                # The mark records fetched after the seek will carry, noted before it: the
                # consumer may fetch and hand records on before the seek's call returns,
                # and those are the ones to apply (a mark noted after it dropped them).
                state, seeks = self._mark(tp)
                self._seeking[tp.partition] = (state, seeks + 1)
                self._moved[tp.partition] = time.monotonic()
                await self._seek(tp, offset)

    def applying(self) -> None:
        """The agent begins a batch: records waiting behind it are not missing, however
        long it takes (a broker away holds its writes)."""
        self._applying = time.monotonic()

    def applied(self) -> None:
        """The agent finished its batch. If that took a while, the quiet time of every
        partition starts again now: their records had to wait behind it."""
        began, self._applying = self._applying, None
        now = time.monotonic()
        if began is not None and now - began >= self.quiet_s / 2:
            for partition in self._next:
                self._moved[partition] = now

    def stalled(self, positions: Mapping[Any, int | None], *, now: float | None = None
                ) -> list[Any]:
        """The partitions (of ``positions``: each's consumer position, the next offset it
        will fetch) that the consumer has read past the expected offset, while no record of
        theirs was applied, nor were they sought, for :attr:`quiet_s` while the agent waited
        for records: a record went missing with none behind it to show the gap (or, after a
        seek, none came at all)."""
        if self._applying is not None:
            return []
        now = time.monotonic() if now is None else now
        return [tp for tp, position in positions.items()
                if position is not None and tp.partition in self._next
                and self._seeking.get(tp.partition) is not _PENDING
                and position > self._next[tp.partition]
                and now - self._moved.get(tp.partition, now) >= self.quiet_s]

    async def unstall(self, positions: Mapping[Any, int | None]) -> int:
        """Seek each :meth:`stalled` partition back to its expected offset; how many. After
        :data:`SEEKS_BEFORE_ABSENT` such seeks with no record coming, the offsets up to the
        position are not in Kafka (a transaction marker last in the partition, say)."""
        generation = self._generation
        stalled = self.stalled(positions)
        for tp in stalled:
            partition, expected, position = tp.partition, self._next[tp.partition], positions[tp]
            assert position is not None
            sought = self._sought[partition] = self._sought.get(partition, 0) + 1
            if sought > SEEKS_BEFORE_ABSENT:
                log.warning("worker: offsets %s..%s of %s/%s are not in Kafka (read past by "
                            "the consumer, %s seeks there brought no record); going on from "
                            "%s", expected, position - 1, tp.topic, partition,
                            SEEKS_BEFORE_ABSENT, position)
                self._absent(tp, expected, position)
                self.absent += position - expected
                self._next[partition] = position
                self._sought.pop(partition)
                self._seeking.pop(partition, None)
                continue
            log.warning("worker: %s/%s was read up to offset %s, but offset %s never reached "
                        "the worker; seeking back to it (%s of %s)", tp.topic, partition,
                        position, expected, sought, SEEKS_BEFORE_ABSENT)
            self._seeking[partition] = _PENDING
            self.reseeks += 1
            try:
                await self._seek_to(tp, expected, generation)
            except Exception as exc:  # noqa: BLE001 - revoked meanwhile, or the seek timed out
                log.warning("worker: seeking %s/%s back failed (%s: %s); trying again later",
                            tp.topic, partition, type(exc).__name__, exc)
                if self._generation == generation:
                    self._seeking.pop(partition, None)  # read on as before; due again later
        return len(stalled)

    async def admit(self, batch: Sequence[Any]) -> list[Any]:
        """The events of ``batch`` to apply, in order; seeks back where one is missing."""
        out: list[Any] = []
        seeks: dict[Any, int] = {}
        generation = self._generation
        for event in batch:
            message = event.message
            verdict = self._admit(message)
            if verdict is None:
                seeks[message.tp] = self._next[message.partition]
            elif verdict:
                out.append(event)
        for tp, offset in seeks.items():
            await self._seek_to(tp, offset, generation)
        return out

    def _admit(self, message: Any) -> bool | None:
        """True: apply it; False: drop it; None: drop it and seek back."""
        partition, offset = message.partition, message.offset
        expected = self._next.get(partition)
        if expected is None:  # not started: Faust's seek to the committed offset is under way
            self.repeats += 1
            return False
        seeking = self._seeking.get(partition)
        if seeking is not None:
            if seeking is _PENDING or not fetched_since(message, seeking):
                self.repeats += 1
                return False
            del self._seeking[partition]
            if offset > expected:  # still past it after the seek
                sought = self._sought[partition] = self._sought.get(partition, 0) + 1
                if sought < SEEKS_BEFORE_ABSENT:
                    log.warning("worker: the first record of %s/%s fetched after seeking to "
                                "offset %s is %s (fetched at seek %s, the seek was %s); "
                                "seeking there again (%s of %s)", message.topic, partition,
                                expected, offset, _seeks_of(message), seeking[1], sought + 1,
                                SEEKS_BEFORE_ABSENT)
                    self._seeking[partition] = _PENDING
                    self.reseeks += 1
                    return None
                log.warning("worker: offsets %s..%s of %s/%s are not in Kafka (transaction "
                            "markers, or removed by retention; %s seeks there found %s "
                            "first); going on from %s", expected, offset - 1, message.topic,
                            partition, sought, offset, offset)
                self._absent(message.tp, expected, offset)
                self.absent += offset - expected
                expected = offset
            self._sought.pop(partition, None)
        if offset == expected:
            self._next[partition] = offset + 1
            self._moved[partition] = time.monotonic()
            return True
        if offset < expected:
            self.repeats += 1
            return False
        log.info("worker: %s/%s expected offset %s and got %s; seeking back to it",
                 message.topic, partition, expected, offset)
        self._seeking[partition] = _PENDING
        self.reseeks += 1
        return None
