"""Input records are acknowledged only once everything they changed is in Kafka.

Faust commits the input offsets of the records its streams acknowledged, and a
``take_events`` stream acknowledges each batch whatever happened to it (the acks
are in a ``finally``: an exception or a cancellation inside the agent acks the
whole batch), and before a commit Faust flushes its producer for at most 0.1 s
without progress. Either way a committed offset could pass records whose changelog
writes never landed, and a crash then lost them.

So the worker holds a reference to each record's message while it works on it
(:meth:`Acks.hold`), writes the changelog itself with one delivery future per
value, and drops the reference only when every future of the batch has
succeeded (:meth:`Acks.release_when`). Until then no commit can pass the record;
after a crash it is read again and skipped per key by the offsets the state
holds. A changelog write that fails for good stops the worker (``on_failure``):
a restart reads the records again from the last commit.

Releases of one partition acknowledge in the order they were asked for: a later
one whose writes land first (one with no changelog writes at all, say, records
that were only dead-lettered) waits for the earlier ones. Faust commits from the
first run of consecutive acknowledged offsets, and it lets that run start one past
an unacknowledged record (``Consumer._new_offset`` checks ``min(acked) -
committed > 1``, and nothing at all before a partition's first commit): a record
acknowledged out of order let the commit pass the one before it, and a crash then
lost it (the chaos test, one record short on one partition).

**Only released records count.** Faust also acknowledges records nobody applied: a
stream that reads a record while the flow is stopped (a rebalance beginning) or from an
older generation skips it *and acknowledges it*; ``take_events`` acknowledges every
record of its batch, applied or not. A record skipped so, between records that were
applied, closed the run of acknowledged offsets, Faust committed past it, and after the
next seek to the committed offset it was never read again (the chaos and rebalance
tests: one record, or a run of ~20, missing around a restart or a rebalance).
:func:`gate_acks` makes the consumer count a record of the input topic as done only
once :class:`Acks` released it; any other final acknowledgement of one leaves it
uncommitted (and no longer waited for: nobody holds it), to be read again after a seek
(agents/sequence.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

__all__ = ["Acks", "gate_acks"]

RELEASED = "_commpipe_released"
"""Set on a message when :class:`Acks` releases it (its writes are delivered)."""

log = logging.getLogger("commpipe.worker")


class Acks:
    """Holds records back from Faust's commits until their writes are delivered."""

    def __init__(self, consumer: Callable[[], Any],
                 on_failure: Callable[[BaseException], Awaitable[None]]) -> None:
        self._consumer = consumer
        self._on_failure = on_failure
        self._tasks: set[asyncio.Task[bool]] = set()
        self._last: dict[Any, asyncio.Task[bool]] = {}
        """Per topic partition, the latest release asked for."""
        self.held = 0
        """Records held now (their writes not yet delivered)."""

    def hold(self, records: Sequence[Any]) -> None:
        """Keep ``records`` (stream events) unacknowledged past the stream's own ack."""
        for record in records:
            record.message.incref()
        self.held += len(records)

    def release_when(self, records: Sequence[Any], writes: Sequence[Awaitable[Any]]) -> None:
        """Acknowledge ``records`` (of one topic partition) once every one of ``writes``
        succeeded and every earlier release of their partition has acknowledged; without
        blocking the caller. (Their dead letters are delivered before the writes are
        sent: agents/cache.py.)"""
        tp = records[0].message.tp if records else None
        before = self._last.get(tp)
        task = asyncio.ensure_future(self._release(records, list(writes), before))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if tp is not None:
            self._last[tp] = task
            task.add_done_callback(lambda t: self._last.pop(tp, None) if
                                   self._last.get(tp) is t else None)

    async def _release(self, records: Sequence[Any], writes: list[Awaitable[Any]],
                       before: asyncio.Task[bool] | None) -> bool:
        """True once ``records`` are acknowledged; False if they never will be (a write
        failed, here or in an earlier release of the partition: the worker stops)."""
        results = await asyncio.gather(*writes, return_exceptions=True)
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        if failed is not None:
            if isinstance(failed, asyncio.CancelledError):
                raise failed
            log.critical("worker: a changelog write failed (%s: %s); stopping, so that a "
                         "restart reads its records again", type(failed).__name__, failed)
            await self._on_failure(failed)
            return False
        if before is not None and not await before:
            return False
        consumer = self._consumer()
        for record in records:
            setattr(record.message, RELEASED, True)
            record.message.ack(consumer)
        self.held -= len(records)
        return True

    async def drain(self) -> None:
        """Wait for every release under way (tests, and a clean stop)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def gate_acks(consumer: Any, topic: str) -> None:
    """Make Faust's ``consumer`` take a final acknowledgement of a ``topic`` record only
    after :class:`Acks` released it (see the module docstring)."""
    if getattr(consumer, "_commpipe_gated", None) == topic:
        return
    original = consumer.ack

    def ack(message: Any) -> bool:
        if message.topic == topic and not getattr(message, RELEASED, False):
            consumer.unacked.discard(message)  # nobody holds it: a stop need not wait for it
            return False
        return bool(original(message))

    consumer.ack = ack
    consumer._commpipe_gated = topic  # noqa: SLF001
