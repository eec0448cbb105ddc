"""The worker's input, a fetch at a time: one batch per partition per fetch, no per-record work.

Faust reads every assigned partition in its consumer thread (aiokafka's fetcher) and hands
each record on alone: a message object, four tasks and an ``asyncio.wait`` per record, a
queue hop to the stream, an acknowledgement (~150 µs of CPU each). The input topic's
records skip all of that. :meth:`Intake.fetch` wraps the thread's fetch: right after it
returns, still in the consumer thread, the input topic's records are taken out of the
result (the changelog's and the leader topic's go on to Faust), each partition's records
become one :class:`InputBatch` marked with the group generation and the partition's seek
token, and the fetch's batches reach the event loop in one callback, into a queue of the
intake's own that the aggregating task reads (:meth:`Intake.take`).

**A batch is applied only while its partition is started.** A partition starts once its
table is recovered in the current generation (:meth:`Intake.start`): the worker seeks it,
in the consumer thread, to the first offset its recovered state has not applied, and notes
the mark that records fetched from then on carry. At the hand-over a batch whose mark is
not its partition's started mark is dropped: it was fetched before that seek, in an older
generation, or the partition was revoked since. Nothing dropped is lost: every drop comes
before a seek to the first unapplied offset (the next start, here or at the partition's
next owner), so the consumer reads it again. Faust's own seeks (to the committed offsets,
at every recovery) only ever move a position back to where the state has applied
everything before it: what they read again, the state skips by its per-key offsets.

The queue is the intake's, not a Faust channel's: Faust clears its channels' queues when
it resumes after a recovery, which may come after the worker's start seek, and a batch
cleared then would never be read again.

**Back-pressure.** While more than ``max_records`` records (or ``max_bytes`` of values) wait
in the queue, or while :attr:`Intake.hold` is set (the sink's backlog is past its bound),
fetches leave the input partitions out: their records wait in the fetcher's buffer and in
Kafka, and no position moves.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["HOLD_POLL_S", "InputBatch", "Intake", "RecoveryLost", "check_recovered"]

log = logging.getLogger("commpipe.worker")

HOLD_POLL_S = 0.05
"""How long a fetch waits while the input is held: how soon reading resumes."""


class RecoveryLost(RuntimeError):
    """The group committed input offsets past what the recovered state has applied."""


def check_recovered(partition: int, applied: int, committed: int | None) -> None:
    """Raise :class:`RecoveryLost` when ``committed`` (the group's next offset to read) is
    past ``applied`` + 1 (the recovered state's highest applied offset).

    Offsets are committed only after the changelog writes covering them were delivered
    (agents/checkpoint.py), so a recovery that holds less lost writes the broker
    acknowledged; going on would lose their counts for good. A restart recovers again."""
    if committed is not None and committed > applied + 1:
        raise RecoveryLost(
            f"the table recovered for input partition {partition} has applied records up "
            f"to offset {applied}, but the group committed {committed}: changelog writes "
            "the broker acknowledged are missing from the recovery")


@dataclass(slots=True)
class InputBatch:
    """One partition's records of one fetch, in offset order (aiokafka ``ConsumerRecord``)."""

    partition: int
    records: list[Any]
    mark: tuple[int, int]
    """``(generation, seek token)`` when the records were fetched."""
    nbytes: int = 0
    epoch: int = field(default=0, compare=False)
    """The queue's epoch at the hand-over (what the waiting counts belong to)."""


class Intake:
    """The input path (see the module docstring). ``generation()`` reads the group
    generation (Faust sets it in the consumer thread at each assignment)."""

    def __init__(self, topic: str, generation: Callable[[], int], *, max_records: int,
                 max_bytes: int) -> None:
        self.topic = topic
        self._generation = generation
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.hold = False
        """Set by the worker while the sink's backlog is past its bound."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[list[InputBatch]] = asyncio.Queue()
        self._thread_loop: asyncio.AbstractEventLoop | None = None
        self._consumer: Any = None
        # Written in the consumer thread only (seeks), read at the hand-over:
        self._tokens: dict[int, int] = {}
        self._started: dict[int, tuple[int, int]] = {}
        # The queue's contents, counted on the event loop:
        self._epoch = 0
        self._waiting_records = 0
        self._waiting_bytes = 0
        self.fetches = 0
        """Fetches that brought input records."""
        self.dropped = 0
        """Records dropped at the hand-over (fetched before a seek, or not started)."""

    # --- the event loop -------------------------------------------------------------------

    def attach(self, consumer: Any, loop: asyncio.AbstractEventLoop) -> None:
        """The worker's aiokafka consumer, in the consumer thread before it starts;
        ``loop``: the event loop the batches go to."""
        self._consumer = consumer
        self._thread_loop = asyncio.get_running_loop()
        self._loop = loop

    async def next(self) -> list[InputBatch]:
        """The next fetch's batches, as the consumer thread handed them over."""
        return await self._queue.get()

    def take(self, batches: Iterable[InputBatch]) -> list[InputBatch]:
        """The batches (of one fetch) to apply now: those of a started partition, fetched
        after its start. The others are counted in :attr:`dropped`."""
        fresh: list[InputBatch] = []
        started = self._started
        generation = self._generation()
        for batch in batches:
            if batch.epoch == self._epoch:
                self._waiting_records -= len(batch.records)
                self._waiting_bytes -= batch.nbytes
            mark = started.get(batch.partition)
            if mark is not None and mark == batch.mark and mark[0] == generation:
                fresh.append(batch)
            else:
                self.dropped += len(batch.records)
                log.info("worker: dropped %d records of %s/%s from offset %s: fetched before "
                         "the partition was (re)started", len(batch.records), self.topic,
                         batch.partition, batch.records[0].offset)
        return fresh

    def _deliver(self, batches: list[InputBatch]) -> None:
        epoch = self._epoch
        for batch in batches:
            batch.epoch = epoch
            self._waiting_records += len(batch.records)
            self._waiting_bytes += batch.nbytes
        self._queue.put_nowait(batches)

    def stop_all(self) -> None:
        """A revocation or a stop began: no batch is applied until the next :meth:`start`,
        and what waits in the queue no longer holds the input back."""
        self._started.clear()
        self._epoch += 1
        self._waiting_records = self._waiting_bytes = 0

    def waiting(self) -> int:
        """Records handed over and not yet taken."""
        return max(self._waiting_records, 0)

    def started(self) -> set[int]:
        """Partitions whose batches are applied now."""
        return set(self._started)

    async def start(self, targets: Mapping[int, int]) -> dict[int, int | None]:
        """Start ``targets`` (``{partition: first offset to read}``, each past everything the
        recovered state holds) in the consumer thread: seek each there and note its mark.
        Returns the group's committed offset of each (None: never committed). Raises
        :class:`RecoveryLost` (and starts nothing) when one is past its target; starts
        nothing when the generation moved on meanwhile (a later recovery will)."""
        generation = self._generation()
        return await self._in_thread(self._start(dict(targets), generation))

    async def _start(self, targets: dict[int, int], generation: int) -> dict[int, int | None]:
        from aiokafka import TopicPartition

        consumer = self._consumer
        tps = {p: TopicPartition(self.topic, p) for p in targets}
        committed = {p: await consumer.committed(tp) for p, tp in tps.items()}
        for p, offset in targets.items():
            check_recovered(p, offset - 1, committed[p])
        if self._generation() != generation:
            return committed
        # From here on nothing else runs in this thread: each seek and its mark are one step
        # against the thread's fetches.
        for p, tp in tps.items():
            consumer.seek(tp, max(targets[p], 0))
            token = self._tokens[p] = self._tokens.get(p, 0) + 1
            self._started[p] = (generation, token)
        return committed

    async def commit(self, offsets: Mapping[int, int]) -> None:
        """Commit ``{partition: next offset to read}`` for the group, in the consumer thread
        (aiokafka's errors propagate: ``CommitFailedError`` after a rebalance)."""
        from aiokafka import TopicPartition

        wanted = {TopicPartition(self.topic, p): offset for p, offset in offsets.items()}
        await self._in_thread(self._consumer.commit(wanted))

    def highwater(self, partition: int) -> int | None:
        """The partition's end offset as of the latest fetch (None: not known yet)."""
        from aiokafka import TopicPartition

        if self._consumer is None:
            return None
        return self._consumer.highwater(TopicPartition(self.topic, partition))

    async def _in_thread(self, coro: Awaitable[Any]) -> Any:
        if self._thread_loop is None:
            raise RuntimeError("the consumer thread has not fetched yet")
        future = asyncio.run_coroutine_threadsafe(coro, self._thread_loop)  # type: ignore[arg-type]
        return await asyncio.wrap_future(future)

    # --- the consumer thread --------------------------------------------------------------

    def holding(self) -> bool:
        """True while fetches leave the input out (back-pressure; read in the thread)."""
        return (self.hold or self._waiting_records >= self.max_records
                or self._waiting_bytes >= self.max_bytes)

    async def fetch(self, original: Callable[..., Awaitable[Any]], thread: Any, consumer: Any,
                    active_partitions: Any, timeout: float | None,
                    max_records: int | None) -> Any:
        """Faust's fetch (``original``), with the input topic's records taken out of its
        result and handed over as batches. Runs in the consumer thread."""
        if active_partitions and self.holding():
            active_partitions = {tp for tp in active_partitions if tp.topic != self.topic}
            timeout = HOLD_POLL_S if timeout is None else min(timeout, HOLD_POLL_S)
            if not active_partitions:  # an empty set would fetch every partition
                await asyncio.sleep(timeout)
                return {}
        records = await original(thread, consumer, active_partitions, timeout=timeout,
                                 max_records=max_records)
        # Still in the consumer thread, with no await since the fetch returned: no seek can
        # have come in between, so each batch's mark is the one its records were read under.
        if records:
            self._split(records)
        return records

    def _split(self, records: dict[Any, list[Any]]) -> None:
        mine = [tp for tp in records if tp.topic == self.topic]
        if not mine:
            return
        generation = self._generation()
        tokens = self._tokens
        batches = []
        for tp in mine:
            got = records.pop(tp)
            p = tp.partition
            batches.append(InputBatch(p, got, (generation, tokens.get(p, 0)),
                                      sum(r.serialized_value_size for r in got)))
        self.fetches += 1
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._deliver, batches)
