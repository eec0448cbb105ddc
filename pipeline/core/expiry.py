"""Which edges' state may leave the worker's memory: silent past a bound, exactly.

An edge's value (``e|partition|edge``: totals, circuit state, producer numbering) stays
after its windows are stored and deleted, so that its counters go on. With edge names
that churn (pods, versions in names) the table would grow without bound, and every scrape
and sink round scans it all. :func:`expired_edges` names the edge keys that may be
deleted, with the windows of theirs still in the table, each edge:

- **silent**: its ``last_seen`` (the worker's clock when a record last touched it) is at
  least ``silent_s`` old;
- **done with its windows**: each of its windows left in the table is one that may leave
  it (``removable``: stored by every database and closed by the watermark; the sink keeps
  an edge's newest such window for the exporter, and it goes with the edge);
- **under the floor**: its offset is at or below that of the partition meta the table
  holds. Every record that touched it is then at or below that offset, so a replay skips
  each of them whole (:class:`~pipeline.core.batch.PartitionBatch`'s floor): no replay
  can bring the edge back with counts it already had, and none has to repeat the deletion.
  (The clock may decide here because a replay never asks.)

A record of the edge that arrives later starts it again from zero: a new series, and a
counter reset for Prometheus. A copy of an old record that a shim sends again after the
bound counts again, as past the producer horizon
(:data:`~pipeline.core.dedup.PRODUCER_HORIZON_S`): a bound shorter than that horizon
shortens the promise to itself (the worker warns at start).

The worker leaves out the edges its cache has changes of, not yet written (see
agents/expiry.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from pipeline.core.edge import EdgeMeta, PartitionMeta
from pipeline.core.store import parse_id

__all__ = ["expired_edges"]


def expired_edges(items: Iterable[tuple[str, Any]], *, now: float, silent_s: float,
                  removable: Callable[[str, Any], bool] = lambda key, window: False
                  ) -> list[str]:
    """The keys among ``items`` (a table's ``(key, value)`` pairs) that may be deleted at
    ``now`` (the worker's clock): each expired edge's key, and the keys of its windows
    (``removable(key, window)`` tells whether a window may leave the table; see the module
    docstring)."""
    if not silent_s > 0:
        raise ValueError(f"edges expire after a silence > 0 s, not {silent_s:g} s")
    floors: dict[int, int] = {}
    windows: dict[tuple[int, str | None], list[str]] = {}
    kept: set[tuple[int, str | None]] = set()
    edges: list[tuple[str, int, str | None, EdgeMeta]] = []
    for key, value in items:
        kind, partition, edge, _ = parse_id(key)
        if kind == "w":
            windows.setdefault((partition, edge), []).append(key)
            if not removable(key, value):
                kept.add((partition, edge))
        elif kind == "e" and isinstance(value, EdgeMeta):
            edges.append((key, partition, edge, value))
        elif kind == "p" and isinstance(value, PartitionMeta):
            floors[partition] = value.offset
    out: list[str] = []
    for key, partition, edge, meta in edges:
        if (meta.last_seen is not None and now - meta.last_seen >= silent_s
                and (partition, edge) not in kept
                and partition in floors and meta.offset <= floors[partition]):
            out.append(key)
            out.extend(windows.get((partition, edge), ()))
    return out
