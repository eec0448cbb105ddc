"""The worker's record cache: each changed key is written once per commit, not once per event.

As Kafka Streams' record cache does, each input partition's changes gather in one
:class:`~pipeline.core.batch.PartitionBatch` that lives across fetches. A write-out
(:meth:`RecordCache.write_out`, the first step of every commit: agents/checkpoint.py) puts
every open batch's changes in the table at once, each changed key once, and hands them to
the changelog in bulk, one write per partition in the order windows, edges, kept events,
partition meta. The sink and ``/metrics`` read the table, so they see changes once written
out (at most a commit interval later).

A partition's records are never applied twice into one open batch, and a batch that fails
halfway is dropped unwritten (:meth:`RecordCache.abandon`): a record applied in part would
count twice on replay.
"""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from pipeline.core.batch import PartitionBatch
from pipeline.core.store import State, encode_state
from pipeline.core.window import WindowConfig

__all__ = ["Changelog", "RecordCache", "WriteOut"]


class Changelog(Protocol):
    """Where a write-out's records go: one partition's records, in order, as few batches."""

    async def write(self, topic: str, partition: int,
                    records: list[tuple[bytes, bytes | None]]) -> list[asyncio.Future[Any]]: ...


@dataclass
class _Open:
    work: PartitionBatch
    records: int = 0
    next_offset: int = -1
    letters: list[Any] = field(default_factory=list)


@dataclass
class WriteOut:
    """What one write-out handed to Kafka."""

    next_offsets: dict[int, int]
    """Per partition, the offset after the last record the written changes cover."""
    deliveries: list[asyncio.Future[Any]]
    """The changelog batches' delivery futures."""
    records: int = 0
    """Input records whose changes these are."""


class RecordCache:
    """Open partition batches over ``table`` (the table's data: a dict-like keyed as
    :mod:`pipeline.core.store` describes), written out to ``changelog``'s ``topic``."""

    def __init__(self, config: WindowConfig, table: MutableMapping[str, Any],
                 changelog: Changelog, topic: str, *, max_records: int) -> None:
        self.config = config
        self._table = table
        self._changelog = changelog
        self._topic = topic
        self.max_records = max_records
        """Most records of one partition an open batch takes before it must be written out
        (:data:`pipeline.settings.MAX_UNWRITTEN_RECORDS`)."""
        self._open: dict[int, _Open] = {}
        self.write_outs = 0
        self.records_written = 0

    def open(self, partition: int) -> PartitionBatch:
        """The partition's open batch, for the caller to apply records to."""
        entry = self._open.get(partition)
        if entry is None:
            entry = self._open[partition] = _Open(
                PartitionBatch(partition, self.config, self._table))
        return entry.work

    def add(self, partition: int, records: int, next_offset: int, letters: list[Any]) -> None:
        """``records`` records up to ``next_offset`` - 1 were applied to the open batch, with
        these dead letters (delivered before the changes are written: checkpoint.py)."""
        entry = self._open[partition]
        entry.records += records
        entry.next_offset = next_offset
        entry.letters.extend(letters)

    def full(self) -> bool:
        """True when some open batch must be written out before it takes more records."""
        return any(e.records >= self.max_records for e in self._open.values())

    def abandon(self, partition: int) -> None:
        """Drop the partition's open batch unwritten (applying to it failed halfway)."""
        self._open.pop(partition, None)

    def letters(self) -> list[Any]:
        """The dead letters of every open batch (to deliver before :meth:`write_out`)."""
        return [letter for entry in self._open.values() for letter in entry.letters]

    async def write_out(self) -> WriteOut:
        """Put every open batch's changes in the table, hand them to the changelog, and
        forget the batches (the next fetch opens on the table)."""
        out = WriteOut({}, [])
        opened, self._open = self._open, {}
        for partition, entry in opened.items():
            changes = entry.work.changes()
            self._table.update(changes)  # before any wait: what opens next builds on them
            out.deliveries += await self._changelog.write(
                self._topic, partition, _encoded(changes))
            out.next_offsets[partition] = entry.next_offset
            out.records += entry.records
        if opened:
            self.write_outs += 1
            self.records_written += out.records
        return out

    def touched_edges(self) -> set[str]:
        """Keys of the edges whose changes wait in an open batch (not in the table yet)."""
        return {key for entry in self._open.values() for key in entry.work.touched_edges()}

    def unwritten(self) -> int:
        """Records whose changes are not written out yet."""
        return sum(e.records for e in self._open.values())


def _encoded(changes: list[tuple[str, State | None]]) -> list[tuple[bytes, bytes | None]]:
    return [(key.encode(), None if value is None else encode_state(value))
            for key, value in changes]
