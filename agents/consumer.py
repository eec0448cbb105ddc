"""How the worker's consumer reads: how long a fetch waits, and nothing before recovery.

**Fetch wait.** Faust builds its consumer with a fixed ``fetch_max_wait_ms`` of
1,500 ms, and aiokafka sends no other fetch meanwhile, so a worker catching up
stalled up to 1.5 s at a time. :func:`set_fetch_wait` sets the consumer's value
before it starts (aiokafka has no public setter; a renamed attribute fails the
worker at start instead of silently doing nothing).

**Nothing before recovery.** At a worker's first assignment Faust pauses the new
partitions but leaves its flow running, so records the consumer fetched from the
committed offsets in the meantime reached the stream before the table was
recovered: applied on top of nothing, they were counted alone and made every
earlier record of their keys look like a replay. :class:`ReadyPartitions` stops
the flow at the start of every assignment (Faust resumes it once the table is
recovered and the consumer has sought the committed offsets again), and tells
which partitions may be applied: those the table has recovered since the last
revocation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

__all__ = ["ReadyPartitions", "check_recovered", "patch_consumers", "set_fetch_wait"]

log = logging.getLogger("commpipe.worker")


def set_fetch_wait(consumer: Any, ms: int) -> None:
    """Make an unstarted ``aiokafka.AIOKafkaConsumer`` wait ``ms`` for data per fetch."""
    if not isinstance(getattr(consumer, "_fetch_max_wait_ms", None), int):
        raise RuntimeError(
            "this aiokafka has no AIOKafkaConsumer._fetch_max_wait_ms: "
            "COMMPIPE_WORKER_FETCH_WAIT_MS cannot be applied (pin aiokafka or update "
            "agents/consumer.py)")
    consumer._fetch_max_wait_ms = ms  # noqa: SLF001 - read by start(); no public knob


def patch_consumers() -> None:
    """Let each Faust app set up the worker consumers its aiokafka driver builds: an app
    with a ``setup_consumer(aiokafka_consumer)`` method is called with each one."""
    from faust.transport.drivers import aiokafka as driver

    cls = driver.AIOKafkaConsumerThread
    if getattr(cls, "_commpipe_original", None) is not None:
        return
    original = cls._create_worker_consumer

    def create(self: Any, transport: Any) -> Any:
        consumer = original(self, transport)
        setup: Callable[[Any], None] | None = getattr(self.app, "setup_consumer", None)
        if setup is not None:
            setup(consumer)
        return consumer

    cls._commpipe_original = original  # type: ignore[attr-defined]
    cls._create_worker_consumer = create  # type: ignore[method-assign]


class ReadyPartitions:
    """The input partitions whose records may be applied now (see the module docstring)."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self._ready: set[int] = set()
        self.unchecked: set[int] = set()
        """Ready partitions whose recovered state is not yet held against the group's
        committed offset (:func:`check_recovered`)."""

    def assigning(self, consumer: Any) -> None:
        """An assignment begins: no record reaches a stream until recovery resumes it."""
        consumer.stop_flow()
        self._ready.clear()

    def recovered(self, assignment: Any) -> None:
        """The table is recovered for ``assignment`` (the consumer's TPs)."""
        self._ready = {tp.partition for tp in assignment if tp.topic == self.topic}
        self.unchecked = set(self._ready)

    def revoked(self) -> None:
        self._ready.clear()
        self.unchecked.clear()

    def __contains__(self, partition: int) -> bool:
        return partition in self._ready


def check_recovered(partition: int, applied: int, committed: int | None) -> None:
    """Raise when the group committed input past what the recovered state has applied.

    A record is acknowledged only once the changelog holds its partition meta, whose
    offset covers it, so the committed offset (the next record to read) is at most the
    recovered meta's offset + 1. Past it, changelog writes that the broker acknowledged
    are missing from the recovery, and going on would lose their counts for good (the
    records in between are never read again); a restart recovers again."""
    if committed is not None and committed > applied + 1:
        raise RuntimeError(
            f"the table recovered for input partition {partition} has applied records up to "
            f"offset {applied}, but the group committed {committed}: changelog writes the "
            "broker acknowledged are missing from the recovery")
