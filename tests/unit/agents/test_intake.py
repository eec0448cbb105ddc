"""The input path without Kafka: a real second thread runs the "consumer thread" loop, a
fake aiokafka consumer answers seeks, committed offsets and commits, and the fetch Faust
would make is a function returning records the test chooses."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiokafka import TopicPartition

from agents.intake import InputBatch, Intake, RecoveryLost, check_recovered

TOPIC = "events"


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    serialized_value_size: int = 10


class Consumer:
    """What the intake calls of an aiokafka consumer (in its own thread)."""

    def __init__(self) -> None:
        self.sought: list[tuple[int, int]] = []
        self.committed_offsets: dict[int, int | None] = {}
        self.commits: list[dict[int, int]] = []
        self.thread: set[str] = set()

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.thread.add(threading.current_thread().name)
        self.sought.append((tp.partition, offset))

    async def committed(self, tp: TopicPartition) -> int | None:
        return self.committed_offsets.get(tp.partition)

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.thread.add(threading.current_thread().name)
        self.commits.append({tp.partition: n for tp, n in offsets.items()})

    def highwater(self, tp: TopicPartition) -> int:
        return 100 + tp.partition


class ConsumerThread:
    """A thread running its own event loop, as Faust's consumer thread does."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="consumer")
        self.thread.start()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(5)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def thread() -> Iterator[ConsumerThread]:
    t = ConsumerThread()
    yield t
    t.close()


class World:
    def __init__(self, thread: ConsumerThread, *, max_records: int = 1000) -> None:
        self.generation = 1
        self.thread = thread
        self.consumer = Consumer()
        self.intake = Intake(TOPIC, lambda: self.generation, max_records=max_records,
                             max_bytes=10_000)
        self.fetched: list[Any] = []  # what the fake fetch was asked for

    async def attach(self) -> None:
        loop = asyncio.get_running_loop()

        async def attach() -> None:
            self.intake.attach(self.consumer, loop)

        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(attach(), self.thread.loop))

    async def fetch(self, records: dict[TopicPartition, list[Record]], *,
                    active: set[TopicPartition] | None = None) -> dict[Any, Any]:
        """One fetch through the intake, in the consumer thread; what Faust gets back."""
        async def original(thread: Any, consumer: Any, active_partitions: Any, *,
                           timeout: float | None, max_records: int | None) -> dict[Any, Any]:
            self.fetched.append((set(active_partitions), timeout))
            return {tp: list(rs) for tp, rs in records.items()
                    if tp in active_partitions}

        active = active if active is not None else set(records)
        coro = self.intake.fetch(original, None, self.consumer, active, 1.0, 500)
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.thread.loop))

    async def handed_over(self) -> list[InputBatch]:
        return await asyncio.wait_for(self.intake.next(), 5)


def tp(p: int, topic: str = TOPIC) -> TopicPartition:
    return TopicPartition(topic, p)


def records(p: int, offsets: range, topic: str = TOPIC) -> list[Record]:
    return [Record(topic, p, o) for o in offsets]


def test_the_input_topic_leaves_the_fetch_and_the_rest_goes_to_faust(thread: ConsumerThread
                                                                   ) -> None:
    w = World(thread)

    async def go() -> None:
        await w.attach()
        await w.intake.start({0: 0, 1: 0})
        changelog = tp(0, "app-state-changelog")
        rest = await w.fetch({tp(0): records(0, range(0, 3)), tp(1): records(1, range(0, 2)),
                              changelog: records(0, range(5, 7), changelog.topic)})
        assert list(rest) == [changelog] and [r.offset for r in rest[changelog]] == [5, 6]
        batches = w.intake.take(await w.handed_over())
        assert [(b.partition, [r.offset for r in b.records]) for b in batches] == [
            (0, [0, 1, 2]), (1, [0, 1])]
        assert w.intake.waiting() == 0 and w.intake.dropped == 0

    asyncio.run(go())


def test_start_seeks_in_the_consumer_thread_and_returns_the_committed_offsets(
        thread: ConsumerThread) -> None:
    w = World(thread)
    w.consumer.committed_offsets = {0: 40, 2: None}

    async def go() -> dict[int, int | None]:
        await w.attach()
        return await w.intake.start({0: 41, 2: 0})

    assert asyncio.run(go()) == {0: 40, 2: None}
    assert w.consumer.sought == [(0, 41), (2, 0)]
    assert w.consumer.thread == {"consumer"}
    assert w.intake.started() == {0, 2}


def test_a_fetch_from_before_a_start_is_dropped(thread: ConsumerThread) -> None:
    """Records fetched before the partition's (re)start carry the old mark: dropped, and the
    start's seek reads them again."""
    w = World(thread)

    async def go() -> None:
        await w.attach()
        await w.intake.start({0: 0})
        await w.fetch({tp(0): records(0, range(0, 5))})
        stale = await w.handed_over()
        await w.intake.start({0: 3})  # sought again before the batch was taken
        await w.fetch({tp(0): records(0, range(3, 6))})
        fresh = await w.handed_over()
        assert w.intake.take(stale) == []
        assert [r.offset for b in w.intake.take(fresh) for r in b.records] == [3, 4, 5]
        assert w.intake.dropped == 5

    asyncio.run(go())


def test_nothing_is_taken_between_a_revocation_and_the_next_start(thread: ConsumerThread
                                                                 ) -> None:
    w = World(thread)

    async def go() -> None:
        await w.attach()
        await w.intake.start({0: 0, 1: 0})
        await w.fetch({tp(0): records(0, range(0, 2)), tp(1): records(1, range(0, 2))})
        waiting = await w.handed_over()
        w.intake.stop_all()  # the revocation began
        assert w.intake.take(waiting) == []
        await w.fetch({tp(1): records(1, range(2, 4))})
        assert w.intake.take(await w.handed_over()) == []
        assert w.intake.started() == set()

    asyncio.run(go())


def test_a_new_generation_drops_what_the_old_one_fetched(thread: ConsumerThread) -> None:
    w = World(thread)

    async def go() -> None:
        await w.attach()
        await w.intake.start({0: 0})
        await w.fetch({tp(0): records(0, range(0, 2))})
        w.generation = 2  # a rebalance: Faust sets the new generation in the thread
        assert w.intake.take(await w.handed_over()) == []
        # a start asked for in generation 1 that finds generation 2 starts nothing
        await w.intake._in_thread(w.intake._start({0: 2}, 1))  # noqa: SLF001
        assert w.intake.started() == {0} and w.consumer.sought == [(0, 0)]

    asyncio.run(go())


def test_a_committed_offset_past_the_recovered_state_stops_the_start(thread: ConsumerThread
                                                                    ) -> None:
    w = World(thread)
    w.consumer.committed_offsets = {1: 50}

    async def go() -> None:
        await w.attach()
        with pytest.raises(RecoveryLost, match="applied records up to offset 44, but the "
                                               "group committed 50"):
            await w.intake.start({0: 0, 1: 45})

    asyncio.run(go())
    assert w.consumer.sought == [] and w.intake.started() == set()


def test_check_recovered() -> None:
    check_recovered(0, 9, 10)
    check_recovered(0, 9, None)
    check_recovered(0, 9, 3)
    with pytest.raises(RecoveryLost):
        check_recovered(0, 9, 11)


def test_back_pressure_leaves_the_input_out_until_the_agent_takes(thread: ConsumerThread
                                                                ) -> None:
    w = World(thread, max_records=4)
    changelog = tp(0, "app-state-changelog")

    async def go() -> None:
        await w.attach()
        await w.intake.start({0: 0})
        await w.fetch({tp(0): records(0, range(0, 4))})
        waiting = await w.handed_over()
        assert w.intake.waiting() == 4 and w.intake.holding()
        rest = await w.fetch({tp(0): records(0, range(4, 8)),
                              changelog: records(0, range(0, 1), changelog.topic)})
        assert list(rest) == [changelog]  # the input stayed in the fetcher's buffer
        assert w.fetched[-1] == ({changelog}, 0.05)
        assert await w.fetch({tp(0): records(0, range(4, 8))}) == {}  # only the input: none
        w.intake.take(waiting)
        assert not w.intake.holding()
        await w.fetch({tp(0): records(0, range(4, 8))})
        got = w.intake.take(await w.handed_over())
        assert [r.offset for b in got for r in b.records] == [4, 5, 6, 7]
        w.intake.hold = True  # the sink's backlog
        assert w.intake.holding()

    asyncio.run(go())


def test_a_revocation_forgets_what_waits(thread: ConsumerThread) -> None:
    """What waited when the revocation began no longer holds the input back, and taking it
    later does not count it twice."""
    w = World(thread, max_records=3)

    async def go() -> None:
        await w.attach()
        await w.intake.start({0: 0})
        await w.fetch({tp(0): records(0, range(0, 3))})
        waiting = await w.handed_over()
        assert w.intake.holding()
        w.intake.stop_all()
        assert not w.intake.holding()
        await w.intake.start({0: 0})
        await w.fetch({tp(0): records(0, range(0, 2))})
        fresh = await w.handed_over()
        w.intake.take(waiting)
        assert w.intake.waiting() == 2
        w.intake.take(fresh)
        assert w.intake.waiting() == 0

    asyncio.run(go())


def test_commit_runs_in_the_consumer_thread(thread: ConsumerThread) -> None:
    w = World(thread)

    async def go() -> None:
        await w.attach()
        await w.intake.commit({0: 12, 3: 4})

    asyncio.run(go())
    assert w.consumer.commits == [{0: 12, 3: 4}]
    assert w.consumer.thread == {"consumer"}
    assert w.intake.highwater(2) == 102
