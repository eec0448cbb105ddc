"""The record cache and the commit: each changed key written once per commit, in one write
per partition, and offsets committed only after the writes and dead letters are delivered.

A dict stands in for the table (as in tests/unit/core), a fake changelog records each write
and hands out delivery futures the test resolves itself, a fake committer records commits."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Mapping
from typing import Any

import pytest

from agents.cache import RecordCache
from agents.checkpoint import Checkpoint
from pipeline.core.store import decode_state, edge_id, parse_id, partition_id
from pipeline.core.window import WindowConfig
from pipeline.wire.events import Event, edge_key

CFG = WindowConfig(size_s=10.0, grace_s=5.0)
T0 = 1_700_000_000.0
EDGE = ("api", "db", "grpc")
TOPIC = "app-state-changelog"


class Changelog:
    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.writes: list[tuple[str, int, list[bytes]]] = []
        self.pending: list[asyncio.Future[Any]] = []
        self.auto = True

    async def write(self, topic: str, partition: int,
                    records: list[tuple[bytes, bytes | None]]) -> list[asyncio.Future[Any]]:
        self.writes.append((topic, partition, [k for k, _ in records]))
        self.log.append(f"write {partition}")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.auto:
            future.set_result(None)
        self.pending.append(future)
        return [future]


class Letters:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    async def settle(self, pending: list[Any]) -> None:
        self.log.append(f"letters {pending}")


class Committer:
    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.commits: list[dict[int, int]] = []
        self.refuse = False

    async def commit(self, offsets: Mapping[int, int]) -> None:
        if self.refuse:
            raise RuntimeError("CommitFailedError: rebalanced")
        self.commits.append(dict(offsets))
        self.log.append(f"commit {dict(offsets)}")


class Harness:
    def __init__(self, *, max_records: int = 100) -> None:
        self.log: list[str] = []
        self.table: dict[str, Any] = {}
        self.changelog = Changelog(self.log)
        self.committer = Committer(self.log)
        self.failures: list[BaseException] = []
        self.cache = RecordCache(CFG, self.table, self.changelog, TOPIC, max_records=max_records)

        async def failed(exc: BaseException) -> None:
            self.failures.append(exc)

        self.checkpoint = Checkpoint(self.cache, Letters(self.log), self.committer,
                                     on_failure=failed)

    def feed(self, partition: int, offsets: list[int], letters: list[Any] = ()) -> None:
        work = self.cache.open(partition)
        for offset in offsets:
            work.apply(offset, [Event("request", f"e{offset}", "c", *EDGE, T0 + 1)],
                       record_ts=T0 + 2, now=T0 + 2)
        self.cache.add(partition, len(offsets), offsets[-1] + 1, list(letters))


def test_a_key_changed_by_many_fetches_is_written_once_per_commit() -> None:
    h = Harness()

    async def go() -> None:
        h.feed(0, [1, 2])
        h.feed(0, [3])
        h.feed(0, [4, 5])
        assert h.changelog.writes == [] and h.table == {}  # gathering
        await h.checkpoint.commit()

    asyncio.run(go())
    (topic, partition, keys), = h.changelog.writes
    kinds = Counter(parse_id(k.decode())[0] for k in keys)
    assert (topic, partition, kinds) == (TOPIC, 0, Counter({"w": 1, "e": 1, "p": 1}))
    assert keys[-1] == partition_id(0).encode()  # the partition meta last
    window = next(v for k, v in h.table.items() if k.startswith("w"))
    assert (window.requests, window.offset) == (5, 5)
    assert h.committer.commits == [{0: 6}]  # the offset after the last record applied


def test_the_steps_run_in_order_letters_writes_deliveries_offsets() -> None:
    h = Harness()
    h.changelog.auto = False

    async def go() -> None:
        h.feed(0, [10, 11], letters=["dlq-a"])
        h.feed(3, [7], letters=["dlq-b"])
        commit = asyncio.ensure_future(h.checkpoint.commit())
        for _ in range(5):
            await asyncio.sleep(0)
        # the changes are in the table before delivery (what opens next builds on them),
        # but no offset is committed until every write is delivered
        assert h.log == ["letters ['dlq-a', 'dlq-b']", "write 0", "write 3"]
        assert {parse_id(k)[1] for k in h.table} == {0, 3}
        h.changelog.pending[0].set_result(None)
        await asyncio.sleep(0)
        assert h.committer.commits == []
        h.changelog.pending[1].set_result(None)
        await commit

    asyncio.run(go())
    assert h.log[-1] == "commit {0: 12, 3: 8}"
    assert h.checkpoint.committed == {0: 12, 3: 8}
    assert h.cache.unwritten() == 0


def test_a_failed_delivery_commits_nothing_and_stops_the_worker() -> None:
    h = Harness()
    h.changelog.auto = False

    async def go() -> None:
        h.feed(1, [4])
        commit = asyncio.ensure_future(h.checkpoint.commit())
        await asyncio.sleep(0.01)
        h.changelog.pending[0].set_exception(OSError("broker gone"))
        await commit
        h.feed(1, [5])
        await h.checkpoint.commit()  # after a failure nothing more is written

    asyncio.run(go())
    assert h.committer.commits == []
    assert [type(e) for e in h.failures] == [OSError]
    assert len(h.changelog.writes) == 1


def test_a_refused_commit_is_tried_again_with_the_next() -> None:
    h = Harness()

    async def go() -> None:
        h.feed(2, [1, 2])
        h.committer.refuse = True
        await h.checkpoint.commit()
        assert h.checkpoint.refused == 1 and h.checkpoint.committed == {}
        h.committer.refuse = False
        h.feed(0, [9])
        await h.checkpoint.commit()  # partition 2 wrote nothing new, and is committed now

    asyncio.run(go())
    assert h.committer.commits == [{2: 3, 0: 10}]


def test_nothing_to_write_commits_nothing() -> None:
    h = Harness()

    async def go() -> None:
        h.checkpoint.started({0: 5, 1: None})
        await h.checkpoint.commit()
        h.feed(0, [5])
        await h.checkpoint.commit()

    asyncio.run(go())
    assert h.committer.commits == [{0: 6}]
    assert h.checkpoint.committed == {0: 6, 1: -1}


def test_a_batch_waits_for_the_commit_under_way() -> None:
    """The agent applies under the checkpoint's lock: a commit never writes a half-applied
    batch, and a batch never lands in the cache between a commit's write-out and its end."""
    h = Harness()
    h.changelog.auto = False
    seen: list[str] = []

    async def agent() -> None:
        async with h.checkpoint.lock:
            seen.append("applying")
            h.feed(0, [2])

    async def go() -> None:
        h.feed(0, [1])
        commit = asyncio.ensure_future(h.checkpoint.commit())
        await asyncio.sleep(0)
        applying = asyncio.ensure_future(agent())
        await asyncio.sleep(0.01)
        assert seen == []  # the commit holds the lock until its offsets are committed
        h.changelog.pending[0].set_result(None)
        await commit
        await applying

    asyncio.run(go())
    assert seen == ["applying"]
    assert h.committer.commits == [{0: 2}] and h.cache.unwritten() == 1


def test_full_when_a_partition_holds_max_records() -> None:
    h = Harness(max_records=3)
    h.feed(0, [1, 2])
    assert not h.checkpoint.due()
    h.feed(0, [3])
    assert h.checkpoint.due()


def test_an_abandoned_batch_is_neither_written_nor_committed() -> None:
    h = Harness()

    async def go() -> None:
        h.feed(0, [1])
        h.feed(1, [1])
        h.cache.abandon(0)
        await h.checkpoint.commit()

    asyncio.run(go())
    assert [w[1] for w in h.changelog.writes] == [1]
    assert h.committer.commits == [{1: 2}]


def test_the_written_values_decode_to_the_table_values() -> None:
    h = Harness()
    h.feed(0, [1, 2])
    records: list[tuple[bytes, bytes | None]] = []

    async def capture(topic: str, partition: int, got: list[Any]) -> list[Any]:
        records.extend(got)
        return []

    h.changelog.write = capture  # type: ignore[method-assign]
    asyncio.run(h.checkpoint.commit())
    assert {k.decode(): decode_state(v).to_json() for k, v in records} == {
        k: v.to_json() for k, v in h.table.items()}


@pytest.mark.parametrize("n", [0, 1])
def test_touched_edges_are_those_of_open_batches(n: int) -> None:
    h = Harness()
    if n:
        h.feed(0, [1])
    assert h.cache.touched_edges() == ({edge_id(0, edge_key(*EDGE))} if n else set())
