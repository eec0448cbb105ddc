"""The worker's record cache: a changed key is written at most once per interval.

Writing every changed key to the table and its changelog once per batch made the
changelog the worker's main cost when records are small (a fleet's shims send 1-3
events per record): one Kafka record per window, edge and partition meta per batch of
a few hundred records. As Kafka Streams' record cache does, each input partition's
changes now gather in one :class:`~pipeline.core.batch.PartitionBatch` that lives across
batches, and are written out (each key once, the partition meta last) when it is
``interval_s`` old, when it holds ``max_records`` records, or at once while the worker
is giving its partitions up (a rebalance or a stop).

Nothing about exactness changes: the records behind the changes stay unacknowledged
until the write-out is delivered (:mod:`agents.acks`), so a crash loses only changes
whose records are read again; the state's per-key offsets skip what had been written.
The sink and ``/metrics`` read the table, so they see changes once written (at most
``interval_s`` later).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.core.batch import PartitionBatch
from pipeline.core.window import WindowConfig

__all__ = ["RecordCache"]


@dataclass
class _Open:
    work: PartitionBatch
    since: float
    records: list[Any] = field(default_factory=list)
    letters: list[Any] = field(default_factory=list)


class RecordCache:
    """Open partition batches, and when each is written out (see the module docstring).

    ``put(changes)`` sets changes in the table; ``send(partition, changes)`` hands them
    to the changelog's producer, returning their delivery futures; ``settle(letters)`` waits
    for dead letters to be delivered, and comes first: a replay skips what the changelog
    says was applied, so it would never send them again; ``release(records, writes)``
    acknowledges the records once the writes are
    delivered. A write-out puts its changes in the table at once, before it may wait:
    the next batch of the partition opens on the table, and must see them. Sends run one
    at a time (:meth:`send`, also for the sink's tombstones), so that the changelog gets
    each partition's writes in the order they were made (its partition meta after the
    values it covers).
    """

    def __init__(self, config: WindowConfig, store: Mapping[str, Any], *, interval_s: float,
                 max_records: int,
                 put: Callable[[list[tuple[str, Any]]], None],
                 send: Callable[[int, list[tuple[str, Any]]], Awaitable[list[Any]]],
                 settle: Callable[[list[Any]], Awaitable[None]],
                 release: Callable[[list[Any], list[Any]], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._store = store
        self.interval_s = interval_s
        self.max_records = max_records
        self._put = put
        self._send = send
        self._settle = settle
        self._release = release
        self._clock = clock
        self._open: dict[int, _Open] = {}
        self._busy: set[int] = set()
        self._writing = asyncio.Lock()
        self.urgent = False
        """Write out after every batch (while the worker gives its partitions up)."""
        self.write_outs = 0
        self.records_written = 0

    def open(self, partition: int) -> PartitionBatch:
        """The partition's open batch, for the caller to apply records to; the partition is
        busy (never written out under it) until :meth:`add`."""
        entry = self._open.get(partition)
        if entry is None:
            entry = self._open[partition] = _Open(
                PartitionBatch(partition, self.config, self._store), self._clock())
        self._busy.add(partition)
        return entry.work

    async def add(self, partition: int, records: list[Any], letters: list[Any]) -> None:
        """``records`` (and their dead letters) were applied to the open batch; write it out
        if it is due."""
        entry = self._open[partition]
        entry.records.extend(records)
        entry.letters.extend(letters)
        self._busy.discard(partition)
        if self.urgent or len(entry.records) >= self.max_records or \
                self._clock() - entry.since >= self.interval_s:
            await self.write_out(partition)

    def abandon(self, partition: int) -> None:
        """The caller failed halfway through applying (the worker stops): the open batch is
        dropped unwritten, since a record applied in part would count twice on replay; its
        records stay unacknowledged, so a restart reads them all again."""
        self._busy.discard(partition)
        self._open.pop(partition, None)

    async def write_out(self, partition: int) -> None:
        entry = self._open.pop(partition, None)
        if entry is None:
            return
        self.write_outs += 1
        self.records_written += len(entry.records)
        changes = entry.work.changes()
        self._put(changes)  # before any wait: a batch opened meanwhile builds on them
        async with self._writing:
            await self._settle(entry.letters)
            writes = await self._send(partition, changes)
        self._release(entry.records, writes)

    async def send(self, partition: int, changes: list[tuple[str, Any]]) -> list[Any]:
        """Hand ``changes`` to the changelog after every send begun before (in order)."""
        async with self._writing:
            return await self._send(partition, changes)

    async def write_out_due(self) -> None:
        """Write out every open batch that is due and not being applied to (a timer)."""
        now = self._clock()
        for partition, entry in list(self._open.items()):
            if partition not in self._busy and (self.urgent or
                                                now - entry.since >= self.interval_s):
                await self.write_out(partition)

    async def write_out_all(self) -> None:
        """Write out everything not being applied to now, and from now on every batch at
        once (the busy ones are written when their batch ends), until :meth:`relax`."""
        self.urgent = True
        for partition in [p for p in self._open if p not in self._busy]:
            await self.write_out(partition)

    def relax(self) -> None:
        """Cache again (partitions are assigned and recovered)."""
        self.urgent = False

    def touched_edges(self) -> set[str]:
        """Keys of the edges whose changes wait in an open batch (not in the table yet)."""
        return {key for entry in self._open.values() for key in entry.work.touched_edges()}

    def unwritten(self) -> int:
        """Records whose changes are not written out yet."""
        return sum(len(e.records) for e in self._open.values())
