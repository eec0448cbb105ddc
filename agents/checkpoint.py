"""The worker's commit, in one place: what makes a record count once, whatever happens.

:meth:`Checkpoint.commit` runs five steps, as Quix Streams' ``Checkpoint.commit`` and Kafka
Streams' commit do, while no batch is being applied (:attr:`Checkpoint.lock`):

1. deliver the dead letters of the records applied since the last commit (a replay skips
   what the changelog says was applied, so it would never send them again);
2. write out the record cache: every changed key into the table, and into its changelog
   partition in bulk (agents/cache.py);
3. wait until every changelog batch is delivered (``acks=all``);
4. commit each partition's input offset: the highest offset applied + 1;
5. forget: the cache is empty, the committed offsets are the new floor.

It runs every ``interval_s`` (a timer), as soon as an open batch holds too many records,
when partitions are revoked, and when the worker stops. A record's offset is committed only
after everything it changed is in Kafka, so a crash at any step loses nothing: the records
after the last commit are read again, and the state's per-key offsets skip what the
changelog already holds (a kill between steps 3 and 4 reads again records that are all
skipped). A delivery that fails for good stops the worker (``on_failure``); a commit the
group refuses (a rebalance took the partition) is only logged: the partition's next owner
reads from the last commit, and skips the same way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from agents.cache import RecordCache

__all__ = ["Checkpoint", "OffsetCommitter"]

log = logging.getLogger("commpipe.worker")


class OffsetCommitter(Protocol):
    async def commit(self, offsets: Mapping[int, int]) -> None: ...


class Letters(Protocol):
    async def settle(self, pending: list[Any]) -> None: ...


class Checkpoint:
    """Commits the worker's progress (see the module docstring)."""

    def __init__(self, cache: RecordCache, letters: Letters, committer: OffsetCommitter, *,
                 on_failure: Callable[[BaseException], Awaitable[None]]) -> None:
        self.cache = cache
        self._letters = letters
        self._committer = committer
        self._on_failure = on_failure
        self.lock = asyncio.Lock()
        """Held while a batch is applied and while a commit runs."""
        self.committed: dict[int, int] = {}
        """Per input partition, the group's committed offset (the next offset to read), as
        read at its start or committed here since."""
        self._uncommitted: dict[int, int] = {}
        """Offsets written out and delivered whose commit has not succeeded yet."""
        self.failed: BaseException | None = None
        """Set once a delivery failed: nothing is committed any more (the worker stops)."""
        self.commits = 0
        self.refused = 0
        self.last_s = 0.0
        """How long the last commit took (seconds)."""

    async def commit(self) -> None:
        """One commit, once the batch being applied (if any) is done."""
        async with self.lock:
            await self.commit_held()

    async def commit_held(self) -> None:
        """One commit; the caller holds :attr:`lock`."""
        if self.failed is not None:
            return
        began = time.perf_counter()
        cache = self.cache
        try:
            await self._letters.settle(cache.letters())  # 1
            written = await cache.write_out()  # 2
            if written.deliveries:
                await asyncio.gather(*written.deliveries)  # 3
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failed delivery: the worker must stop
            self.failed = exc
            log.critical("worker: a changelog write failed (%s: %s); stopping, so that a "
                         "restart reads its records again", type(exc).__name__, exc)
            await self._on_failure(exc)
            return
        uncommitted = self._uncommitted
        uncommitted.update(written.next_offsets)
        offsets = {p: n for p, n in uncommitted.items() if n > self.committed.get(p, -1)}
        if offsets:
            try:
                await self._committer.commit(offsets)  # 4
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - refused after a rebalance, broker away
                self.refused += 1
                log.warning("worker: the group did not take the commit of %s (%s: %s); the "
                            "records after the last commit are read again, and skipped",
                            _listed(offsets), type(exc).__name__, exc)
            else:
                self.committed.update(offsets)  # 5
                uncommitted.clear()
                self.commits += 1
        self.last_s = time.perf_counter() - began

    def started(self, committed: Mapping[int, int | None]) -> None:
        """Partitions started reading with these committed offsets (None: never)."""
        self.committed.update({p: -1 if n is None else n for p, n in committed.items()})

    def forget(self) -> None:
        """After the last commit of an assignment: nothing of it is committed any more."""
        self.committed.clear()
        self._uncommitted.clear()

    def due(self) -> bool:
        """True when an open batch must be written out before it takes more."""
        return self.cache.full()


def _listed(offsets: Mapping[int, int]) -> str:
    return ", ".join(f"partition {p} at {n}" for p, n in sorted(offsets.items()))
