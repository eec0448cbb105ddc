"""How the worker's consumer reads: how long a fetch waits, nothing before recovery, and
nothing fetched before a seek.

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

**No record fetched before a seek.** Faust fetches in its consumer thread and hands
each fetch's records to the event loop, which reads the group generation only once the
fetch has come back. A fetch that was in flight across a rebalance therefore reached the
streams after the rebalance had sought the partitions again (to the committed offsets, or
a changelog partition to where its recovery starts), as if it had been read from there.
On an input partition Faust then took the offsets between the committed one and the
stale record's for a gap, committed past them and dropped them when they came again: a
worker that kept a partition through a rebalance lost hundreds of records of it
(tests/integration/test_rebalance.py, on Apache Kafka). On a changelog partition the
recovery took the stale record's offset for the point it had read up to and skipped the
records before it (a standby that became active skipped its partition's changelog).
:func:`patch_consumers` counts the seeks of each partition (aiokafka's partition state
counts every seek and position reset; a new assignment brings new states) and notes, in
the consumer thread right after every fetch, where each partition's count stood;
:class:`FreshRecords` hands on a record only while its partition has not been sought since:
the consumer then reads it again from where it was sought to, and the stale records are
dropped. (A count, not the position: a fetch also moves the position.) Each message
handed on carries its partition's seek count at the fetch (``FETCH_MARK``), so that
agents/sequence.py can tell the records delivered before a seek of its own from those
read after it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

__all__ = ["FETCH_MARK", "FreshRecords", "ReadyPartitions", "check_recovered", "consumer_lag",
           "count_seeks", "fetch_mark", "fetched_since", "fresh_only", "input_positions",
           "patch_consumers",
           "positions_readable", "scheduler", "set_fetch_wait"]

log = logging.getLogger("commpipe.worker")

FETCH_MARK = "commpipe_fetch_mark"
"""Attribute of a handed-on record and its Faust message: ``(partition state, seeks)`` of
its partition when it was fetched (:func:`fetch_mark`)."""


def set_fetch_wait(consumer: Any, ms: int) -> None:
    """Make an unstarted ``aiokafka.AIOKafkaConsumer`` wait ``ms`` for data per fetch."""
    if not isinstance(getattr(consumer, "_fetch_max_wait_ms", None), int):
        raise RuntimeError(
            "this aiokafka has no AIOKafkaConsumer._fetch_max_wait_ms: "
            "COMMPIPE_WORKER_FETCH_WAIT_MS cannot be applied (pin aiokafka or update "
            "agents/consumer.py)")
    consumer._fetch_max_wait_ms = ms  # noqa: SLF001 - read by start(); no public knob


def positions_readable(consumer: Any) -> None:
    """Fail unless :class:`FreshRecords` can read the partition states of an unstarted
    ``aiokafka.AIOKafkaConsumer`` (a renamed attribute fails the worker at start)."""
    subscriptions = getattr(consumer, "_subscription", None)
    if not hasattr(type(subscriptions), "subscription"):
        raise RuntimeError(
            "this aiokafka has no AIOKafkaConsumer._subscription.subscription: records "
            "fetched before a seek could not be told apart (pin aiokafka or update "
            "agents/consumer.py)")


def _seeks(subscriptions: Any, tp: Any) -> tuple[Any, int]:
    """``(partition state, seeks so far)`` of ``tp`` in the consumer's current assignment."""
    subscription = subscriptions.subscription
    assignment = subscription.assignment if subscription is not None else None
    state = assignment.state_value(tp) if assignment is not None else None
    return state, getattr(state, "_commpipe_seeks", 0)


def fetch_mark(subscriptions: Any, tp: Any) -> tuple[Any, int]:
    """``tp``'s mark now: a record fetched from here on carries this one or a later one."""
    return _seeks(subscriptions, tp)


def fetched_since(message: Any, mark: tuple[Any, int]) -> bool:
    """True if ``message`` was fetched after the partition stood at ``mark``."""
    got = getattr(message, FETCH_MARK, None)
    return got is not None and got[0] is mark[0] and got[1] >= mark[1]


def count_seeks() -> None:
    """Make aiokafka's partition state count its seeks and position resets."""
    from aiokafka.consumer.subscription_state import TopicPartitionState as State

    if getattr(State, "_commpipe_counting", False):
        return
    seek, await_reset = State.seek, State.await_reset

    def counted(method: Callable[..., None]) -> Callable[..., None]:
        def run(self: Any, *args: Any) -> None:
            self._commpipe_seeks = getattr(self, "_commpipe_seeks", 0) + 1
            method(self, *args)
        return run

    State.seek = counted(seek)  # type: ignore[method-assign]
    State.await_reset = counted(await_reset)  # type: ignore[method-assign]
    State._commpipe_counting = True  # type: ignore[attr-defined]


class FreshRecords(dict):  # type: ignore[type-arg]
    """One fetch's records (``{tp: [records]}``), with each partition's seek count right
    after the fetch, noted in the consumer thread (see the module docstring)."""

    def __init__(self, records: Any, subscriptions: Any) -> None:
        super().__init__(records)
        self.subscriptions = subscriptions
        self.seeks = {tp: _seeks(subscriptions, tp) for tp in self}

    def fresh(self, tp: Any) -> bool:
        """True while ``tp`` was neither sought nor reassigned since the fetch."""
        return _seeks(self.subscriptions, tp) == self.seeks.get(tp)


def fresh_only(records: Any, iterator: Any) -> Any:
    """``iterator``'s ``(tp, record)`` pairs, without those of a partition sought since
    ``records`` were fetched (and every later one of that partition)."""
    if not isinstance(records, FreshRecords):
        yield from iterator
        return
    stale: set[Any] = set()
    for tp, record in iterator:
        if tp in stale:
            continue
        if not records.fresh(tp):
            stale.add(tp)
            log.info("worker: dropped records of %s/%s fetched before it was sought "
                     "again (offset %s on)", tp.topic, tp.partition, record.offset)
            continue
        setattr(record, FETCH_MARK, records.seeks[tp])
        yield tp, record


def scheduler() -> type:
    """Faust's round-robin ``ConsumerScheduler``, handing on fresh records only."""
    from faust.transport.utils import DefaultSchedulingStrategy

    class FreshScheduler(DefaultSchedulingStrategy):
        def iterate(self, records: Any) -> Any:
            return fresh_only(records, super().iterate(records))

    return FreshScheduler


def patch_consumers() -> None:
    """Let each Faust app set up the worker consumers its aiokafka driver builds (an app
    with a ``setup_consumer(aiokafka_consumer)`` method is called with each one), and
    make every fetch return :class:`FreshRecords` (and aiokafka count seeks)."""
    from faust.transport.drivers import aiokafka as driver

    count_seeks()
    cls = driver.AIOKafkaConsumerThread
    if getattr(cls, "_commpipe_original", None) is not None:
        return
    original = cls._create_worker_consumer
    original_fetch = cls._fetch_records

    def create(self: Any, transport: Any) -> Any:
        consumer = original(self, transport)
        setup: Callable[[Any], None] | None = getattr(self.app, "setup_consumer", None)
        if setup is not None:
            setup(consumer)
        return consumer

    async def fetch(self: Any, consumer: Any, active_partitions: Any,
                    timeout: float | None = None, max_records: int | None = None) -> Any:
        records = await original_fetch(self, consumer, active_partitions, timeout=timeout,
                                       max_records=max_records)
        # still in the consumer thread: nothing can have sought since the fetch
        return FreshRecords(records, consumer._subscription) if records else records  # noqa: SLF001

    to_message = driver.Consumer._to_message

    def marked(self: Any, tp: Any, record: Any) -> Any:
        message = to_message(self, tp, record)
        setattr(message, FETCH_MARK, getattr(record, FETCH_MARK, None))
        return message

    cls._commpipe_original = original  # type: ignore[attr-defined]
    cls._create_worker_consumer = create  # type: ignore[method-assign]
    cls._fetch_records = fetch  # type: ignore[method-assign]
    driver.Consumer._to_message = marked  # type: ignore[method-assign]


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


def consumer_lag(app: Any, topic: str) -> dict[int, int]:
    """Kafka's consumer lag of each input partition ``app`` owns, as ``kafka-consumer-groups
    --describe`` reports it: the partition's end offset (the high watermark of the latest
    fetch) minus the group's committed offset there (0 before any commit)."""
    out: dict[int, int] = {}
    consumer = app.consumer
    for tp in app.assignor.assigned_actives():
        if tp.topic != topic:
            continue
        try:
            high = consumer.highwater(tp)
        except Exception:  # noqa: BLE001 - not known yet (before the first fetch)
            continue
        # what this worker last committed for tp (Kafka's meaning: the next offset to
        # read), or read back from Kafka at assignment; Faust keeps no public one
        committed = consumer._committed_offset.get(tp)  # noqa: SLF001
        if high is not None:
            out[tp.partition] = max(high - (committed or 0), 0)
    return out


def input_positions(consumer: Any, topic: str) -> dict[Any, int | None]:
    """The position (next offset to fetch) of each of ``topic``'s partitions an unstarted
    or running ``aiokafka.AIOKafkaConsumer`` holds (None: not known yet). Read from the
    event loop: each is one attribute of aiokafka's partition state."""
    subscription = consumer._subscription.subscription  # noqa: SLF001 - no public view
    assignment = subscription.assignment if subscription is not None else None
    if assignment is None:
        return {}
    out: dict[Any, int | None] = {}
    for tp in assignment.tps:
        if tp.topic == topic:
            state = assignment.state_value(tp)
            out[tp] = state.position if state.has_valid_position else None
    return out
