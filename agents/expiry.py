"""What leaves the worker's memory: silent edges (COMMPIPE_EDGE_EXPIRE_S), and the state of
partitions it no longer owns.

**Silent edges.** An edge's value stays after the sink stored and deleted its windows, so
that its counters go on; with edge names that churn (pods, versions in names) the table
would grow without bound, and every scrape and sink round scans it all. A timer deletes
the edges :func:`pipeline.core.expiry.expired_edges` names (silent past the bound, every
window of theirs stored and closed, under the partition meta's floor: no replay brings
them back) with those windows, of the partitions this worker owns, through
:meth:`agents.app.Pipeline.delete` (tombstones in the changelog, in order with the
worker's other writes).

It leaves out an edge that an open batch of the record cache has changed (agents/cache.py):
those changes are not in the table yet, and their records not acknowledged. Deleting the
edge under them would make the result depend on a crash: written out, the batch would
bring the edge back with its old totals; killed before, the replay would start it from
zero. Untouched, a record that arrives later starts the edge from zero either way.

**Partitions given away.** The worker writes its table's data itself (agents/app.py), and
Faust's in-memory store forgets, at the end of a recovery, only the keys it read from the
changelog: the keys this worker wrote of a partition that went to another worker stayed in
its memory for good (and came back stale if the partition did, past the changelog's
compaction of their tombstones). :func:`drop_unowned` deletes them once a recovery is
done.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, MutableMapping
from typing import Any

from pipeline.core.dedup import PRODUCER_HORIZON_S
from pipeline.core.expiry import expired_edges
from pipeline.core.store import parse_id

__all__ = ["EdgeExpiry", "drop_unowned", "expiry_interval"]

log = logging.getLogger("commpipe.worker")


def expiry_interval(silent_s: float) -> float:
    """How often the timer looks: a quarter of the bound, between 0.5 s and a minute."""
    return min(60.0, max(0.5, silent_s / 4))


def drop_unowned(data: MutableMapping[str, Any], owned: Iterable[int]) -> list[str]:
    """Delete from ``data`` (the table's) every key of a partition not in ``owned``; the
    deleted keys. (Memory only: the changelog is the owner's.)"""
    mine = set(owned)
    gone = [key for key in data if parse_id(key)[1] not in mine]
    for key in gone:
        del data[key]
    return gone


class EdgeExpiry:
    """Deletes silent edges of owned partitions (see the module docstring)."""

    def __init__(self, *, silent_s: float, items: Callable[[], Iterable[tuple[str, Any]]],
                 touched: Callable[[], set[str]], removable: Callable[[str, Any], bool],
                 delete: Callable[[list[str]], Any], busy: Callable[[], bool],
                 clock: Callable[[], float] = time.time) -> None:
        """``items``: the table's items of the partitions this worker owns now
        (:meth:`pipeline.core.rollups.Rollups.owned_items`)."""
        self.silent_s = silent_s
        self._removable = removable
        self._items = items
        self._busy = busy
        self._touched = touched
        self._delete = delete
        self._clock = clock
        self.expired = 0
        """Edges deleted so far."""
        if 0 < silent_s < PRODUCER_HORIZON_S:
            log.warning("worker: COMMPIPE_EDGE_EXPIRE_S is %g s, under the producer horizon "
                        "(%g s): a shim's copy of a record of an edge expired meanwhile would "
                        "count again", silent_s, PRODUCER_HORIZON_S)

    async def run_once(self) -> list[str]:
        """Delete the edges that are due now (none while a rebalance or recovery is under
        way: the table may be partly restored); their keys."""
        if self.silent_s <= 0 or self._busy():
            return []
        touched = self._touched()
        keys: list[str] = []
        edges, edge_out = 0, False
        for key in expired_edges(self._items(), now=self._clock(), silent_s=self.silent_s,
                                 removable=self._removable):
            if key[0] == "e":  # an edge key, followed by those of its windows
                edge_out = key in touched
                edges += not edge_out
            if not edge_out:
                keys.append(key)
        if keys:
            await self._delete(keys)  # removes them from the table before it first waits
            self.expired += edges
            log.info("worker: %d edges silent for %g s or more left the table", edges,
                     self.silent_s)
        return keys
