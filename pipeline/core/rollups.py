"""The read side of the aggregates: what the sink and the exporter use, never Faust itself.

:class:`Rollups` reads any mapping laid out as :mod:`pipeline.core.store`
describes (the worker's Faust table, or a dict in tests) and answers:

- :meth:`Rollups.closed_windows`: windows that will not change any more,
  per partition (each row has exactly one owner, the sink's upsert key);
- :meth:`Rollups.merged` / :meth:`Rollups.live_window`: the same window merged
  across partitions (counts added, sketches merged), as users read it;
- :meth:`Rollups.circuit`: reported and derived circuit state of an edge.

A window is closed when the partition's watermark has passed its end by the
grace period, or when the partition has delivered nothing for ``idle_close_s``
seconds of worker time (so the last windows of a quiet stream still reach the
databases). An idle-closed window that later receives events changes again;
its row is then written again (upserts make that exact).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.core.details import DetailBatch
from pipeline.core.edge import EdgeMeta, PartitionMeta
from pipeline.core.store import SEP, parse_id, partition_id
from pipeline.core.window import WindowConfig, WindowStats
from pipeline.wire.events import edge_key, split_edge_key

__all__ = ["CircuitView", "Rollups", "WindowRow"]


@dataclass(frozen=True, slots=True)
class WindowRow:
    """One window of one edge as owned by one source partition."""

    partition: int
    source_service: str
    target_service: str
    protocol: str
    window_start: float
    window_end: float
    stats: WindowStats

    @property
    def edge(self) -> tuple[str, str, str]:
        return self.source_service, self.target_service, self.protocol


@dataclass(frozen=True, slots=True)
class CircuitView:
    reported: str | None
    """Last state reported by ``circuit`` events; None when the edge reports none."""
    derived: str
    """State of the breaker machine run over the edge's outcomes."""
    reported_entered: dict[str, int]
    derived_entered: dict[str, int]
    derived_seconds: dict[str, float]
    """Seconds spent in each derived state, up to the edge's last event."""


class Rollups:
    """Read-only views over the aggregate store (see the module docstring)."""

    def __init__(self, store: Mapping[str, Any], config: WindowConfig, *,
                 idle_close_s: float = 30.0, clock: Callable[[], float] = time.time,
                 owned: Callable[[int], bool] | None = None) -> None:
        """``owned(partition)`` tells whether this process owns a source partition now; a
        worker's table also holds standby copies of other workers' partitions, which
        must not be reported twice (default: every partition in the store is owned)."""
        self._store = store
        self.config = config
        self.idle_close_s = idle_close_s
        self._clock = clock
        self._owned = owned

    def owned_items(self) -> list[tuple[str, Any]]:
        """The store's items of the source partitions owned now (a list: a snapshot)."""
        items = list(self.data().items())  # a snapshot: the worker keeps writing
        return items if self._owned is None else self._mine(items)

    def _mine(self, items: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
        """``items`` of the partitions owned now. owned() asks the assignor each time: once
        per partition, not once per key (at 10,000 edges the sink's scans spent most of the
        worker's time there)."""
        owned, mine = self._owned, {}
        assert owned is not None
        out = []
        for k, v in items:
            partition = k.split(SEP, 2)[1]
            ok = mine.get(partition)
            if ok is None:
                ok = mine[partition] = owned(int(partition))
            if ok:
                out.append((k, v))
        return out

    def data(self) -> Mapping[str, Any]:
        """The store's plain mapping: a table's store, then its dict, read without their
        per-key hooks."""
        store = self._store
        while isinstance(getattr(store, "data", None), Mapping):
            store = store.data
        return store

    def owns(self, partition: int) -> bool:
        """Whether this process owns source ``partition`` now (see ``owned``)."""
        return self._owned is None or self._owned(partition)

    def offset_of(self, key: str) -> int | None:
        """The source offset of the version the store holds now under ``key`` (None: none)."""
        value = self.data().get(key)  # the table's get runs Faust's hooks: ~2 us a key
        return None if value is None else value.offset

    def partition_meta(self, partition: int) -> PartitionMeta | None:
        return self.data().get(partition_id(partition))

    def is_closed(self, partition: int, window_end: float, *, now: float | None = None) -> bool:
        meta = self.partition_meta(partition)
        if meta is None:
            return False
        if self.is_final(partition, window_end):
            return True
        now = self._clock() if now is None else now
        return meta.last_seen is not None and now - meta.last_seen >= self.idle_close_s

    def is_final(self, partition: int, window_end: float) -> bool:
        """Closed by the watermark: no event can change this window any more (late events
        go to the window holding the watermark), so once stored it may leave the table."""
        meta = self.partition_meta(partition)
        return meta is not None and window_end + self.config.grace_s <= meta.watermark

    def edges(self) -> list[tuple[int, tuple[str, str, str], EdgeMeta]]:
        """``(partition, edge, meta)`` of every owned edge state."""
        out = []
        for key, value in self.owned_items():
            if isinstance(value, EdgeMeta):
                _, partition, edge, _ = parse_id(key)
                out.append((partition, split_edge_key(edge), value))  # type: ignore[arg-type]
        return out

    def details(self) -> list[tuple[str, DetailBatch]]:
        """Kept events (``aggregate.keeps_detail``) of owned partitions, as ``(key, batch)``."""
        kept = [(k, v) for k, v in self.data().items()
                if k[0] == "d" and isinstance(v, DetailBatch)]
        if self._owned is not None:
            kept = self._mine(kept)
        return sorted(kept, key=lambda kv: (parse_id(kv[0])[1], kv[1].offset))

    def windows(self) -> list[WindowRow]:
        """Every window held now, closed or not, sorted by (start, edge, partition)."""
        rows = []
        for key, value in self.owned_items():
            if isinstance(value, WindowStats):
                _, partition, edge, start = parse_id(key)
                source, target, protocol = split_edge_key(edge)  # type: ignore[arg-type]
                rows.append(WindowRow(partition, source, target, protocol, value.window_start,
                                      value.window_end, value))
        rows.sort(key=lambda r: (r.window_start, r.edge, r.partition))
        return rows

    def closed_windows(self, since: float = -math.inf, *, now: float | None = None
                       ) -> list[WindowRow]:
        """Closed windows whose end is after ``since`` (epoch seconds), one row per partition."""
        now = self._clock() if now is None else now
        return [r for r in self.windows()
                if r.window_end > since and self.is_closed(r.partition, r.window_end, now=now)]

    def closed_items(self, *, now: float | None = None) -> list[tuple[str, int, WindowStats]]:
        """``(key, partition, stats)`` of every closed window, in no order: the same windows
        as :meth:`closed_windows`, for a caller (the sink) that scans them all every round and
        needs a :class:`WindowRow` only for the few a database still lacks."""
        now = self._clock() if now is None else now
        grace = self.config.grace_s
        store = self.data()
        owned = self._owned
        # per partition as keys write it: (partition, watermark, closed for idleness), or
        # None when it is not owned (or has no state yet: nothing is closed)
        by_partition: dict[str, tuple[int, float, bool] | None] = {}
        out = []
        for key, value in store.items():  # no await below: the table cannot change
            if key[0] != "w":
                continue
            p = key.split(SEP, 2)[1]
            if p in by_partition:
                state = by_partition[p]
            else:
                partition = int(p)
                meta = store.get(partition_id(partition))
                state = by_partition[p] = None if meta is None or (
                    owned is not None and not owned(partition)) else (
                    partition, meta.watermark,
                    meta.last_seen is not None and now - meta.last_seen >= self.idle_close_s)
            if state is None or not isinstance(value, WindowStats):
                continue
            if state[2] or value.window_end + grace <= state[1]:
                out.append((key, state[0], value))
        return out

    @staticmethod
    def merged(rows: Iterable[WindowRow]) -> dict[tuple[float, tuple[str, str, str]], WindowStats]:
        """Merge per-partition rows into one value per (window_start, edge)."""
        out: dict[tuple[float, tuple[str, str, str]], WindowStats] = {}
        for row in rows:
            key = (row.window_start, row.edge)
            total = out.get(key)
            if total is None:
                total = out[key] = WindowStats(row.window_start, row.window_end)
            total.merge(row.stats)
        return out

    def live_window(self, source_service: str, target_service: str, protocol: str
                    ) -> WindowStats | None:
        """The edge's newest window, merged across partitions; None for an unknown edge."""
        edge = (source_service, target_service, protocol)
        rows = [r for r in self.windows() if r.edge == edge]
        if not rows:
            return None
        newest = max(r.window_start for r in rows)
        return self.merged(r for r in rows if r.window_start == newest)[(newest, edge)]

    def circuit(self, source_service: str, target_service: str, protocol: str
                ) -> CircuitView | None:
        """Circuit state of an edge (from the partition that saw it last)."""
        edge = edge_key(source_service, target_service, protocol)
        metas = [v for k, v in self.owned_items()
                 if isinstance(v, EdgeMeta) and parse_id(k)[2] == edge]
        if not metas:
            return None
        meta = max(metas, key=lambda m: m.last_ts or -math.inf)
        reported = meta.reported
        track = meta.derived.track
        return CircuitView(
            reported=reported.state if reported else None, derived=track.state,
            reported_entered=dict(reported.entered) if reported else {},
            derived_entered=dict(track.entered),
            derived_seconds={s: track.seconds_in(s, meta.last_ts)
                             for s in ("closed", "open", "half_open")})
