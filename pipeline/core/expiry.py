"""Which edges' state may leave the worker's memory: silent past a bound, exactly.

An edge's value (``e|partition|edge``: totals, circuit state, producer numbering) stays
after its windows are stored and deleted, so that its counters go on. With edge names
that churn (pods, versions in names) the table would grow without bound, and every scrape
and sink round scans it all. :func:`expired_edges` names the edge keys that may be
deleted, each:

- **silent**: its ``last_seen`` (the worker's clock when a record last touched it) is at
  least ``silent_s`` old;
- **without windows**: none of its windows is left in the table (the sink stored and
  deleted them, or they aged out);
- **under the floor**: its offset is at or below that of the partition meta the table
  holds. Every record that touched it is then at or below that offset, so a replay skips
  each of them whole (:class:`~pipeline.core.batch.PartitionBatch`'s floor): no replay
  can bring the edge back with counts it already had, and none has to repeat the deletion.
  (The clock may decide here because a replay never asks.)

A record of the edge that arrives later starts it again from zero: a new series, and a
counter reset for Prometheus. A copy of an old record that a shim sends again after the
bound counts again: the producer horizon's promise
(:data:`~pipeline.core.dedup.PRODUCER_HORIZON_S`), so ``silent_s`` must not be shorter.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pipeline.core.dedup import PRODUCER_HORIZON_S
from pipeline.core.edge import EdgeMeta, PartitionMeta
from pipeline.core.store import parse_id

__all__ = ["expired_edges"]


def expired_edges(items: Iterable[tuple[str, Any]], *, now: float,
                  silent_s: float) -> list[str]:
    """The edge keys among ``items`` (a table's ``(key, value)`` pairs) that may be deleted
    at ``now`` (the worker's clock; see the module docstring)."""
    if silent_s < PRODUCER_HORIZON_S:
        raise ValueError(f"edges may expire after {PRODUCER_HORIZON_S:g} s of silence at the "
                         f"earliest (the producer horizon), not {silent_s:g} s")
    floors: dict[int, int] = {}
    with_windows: set[tuple[int, str | None]] = set()
    edges: list[tuple[str, int, str | None, EdgeMeta]] = []
    for key, value in items:
        kind, partition, edge, _ = parse_id(key)
        if kind == "w":
            with_windows.add((partition, edge))
        elif kind == "e" and isinstance(value, EdgeMeta):
            edges.append((key, partition, edge, value))
        elif kind == "p" and isinstance(value, PartitionMeta):
            floors[partition] = value.offset
    return [key for key, partition, edge, meta in edges
            if meta.last_seen is not None and now - meta.last_seen >= silent_s
            and (partition, edge) not in with_windows
            and partition in floors and meta.offset <= floors[partition]]
