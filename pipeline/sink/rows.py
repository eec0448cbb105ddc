"""The values the sink writes for one batch of windows, computed once per window.

For each window the sink stores its per-partition part (``communication_rollup_parts``),
and, when that part is the window's only one, the window's ``communication_rollups`` row
and its objectives (``communication_slo``) straight from it: no read-back, no merge (the
shim's case, where every edge lives on one partition). :func:`prepare` builds the three
kinds of rows in one pass; the SQL (:mod:`pipeline.sink.transaction`) decides which keys
had another part after all and merges those from the database.

The values equal what :func:`pipeline.sink.sql.rollup_values` and
:func:`pipeline.core.slo.evaluate` give (tests/unit/sink/test_rows.py holds them equal);
they are only computed faster: four quantiles in one walk over the sorted buckets, the
part serialised by orjson from the dataclass, each edge's objectives looked up once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from pipeline.core.rollups import WindowRow
from pipeline.core.sketch import LatencySketch, value_of
from pipeline.core.slo import Objectives, SloConfig, evaluate
from pipeline.core.window import WindowStats

__all__ = ["Prepared", "part_json", "prepare", "quantiles"]

Edge = tuple[str, str, str]
QUANTILES = (0.5, 0.9, 0.95, 0.99)
_P95 = QUANTILES.index(0.95)
_EMPTY = "{}"


def _sketch(value: Any) -> Any:
    if isinstance(value, LatencySketch):
        return value.to_json()
    raise TypeError(f"cannot serialise {type(value).__name__} in a window")


def part_json(stats: WindowStats, sketch: bytes | None = None) -> str:
    """The part's ``stats`` column: :meth:`WindowStats.to_json` as JSON text (orjson reads
    the dataclass' fields itself; the sketch goes through its own ``to_json``, or is
    ``sketch``, its JSON made already)."""
    if sketch is None:
        return orjson.dumps(stats, default=_sketch).decode()
    made = orjson.Fragment(sketch)
    return orjson.dumps(stats, default=lambda v: made if v is stats.latency else _sketch(v)
                        ).decode()


def _json(value: dict[str, Any]) -> str:
    return orjson.dumps(value).decode() if value else _EMPTY


def quantiles(sketch: LatencySketch) -> tuple[float | None, ...]:
    """``sketch.quantile(q)`` for q in 0.5, 0.9, 0.95, 0.99, in one walk over the buckets
    (the same arithmetic, so the same floats)."""
    count = sketch.count
    if not count:
        return (None, None, None, None)
    lo, hi = sketch.min, sketch.max
    ranks = [q * (count - 1) for q in QUANTILES]
    out: list[float] = []
    seen = sketch.zero
    i = 0
    while i < 4 and seen > ranks[i]:
        out.append(0.0)
        i += 1
    if i < 4:
        bins = sketch.bins
        for b in sorted(bins):
            seen += bins[b]
            if seen > ranks[i]:
                v = min(max(value_of(b), lo), hi)
                while i < 4 and seen > ranks[i]:
                    out.append(v)
                    i += 1
                if i == 4:
                    break
        while i < 4:  # unreachable when counts are consistent (quantile() returns max)
            out.append(hi)
            i += 1
    return tuple(out)


def rollup_row(start: float, end: float, edge: Edge, stats: WindowStats,
               partitions: int, q: tuple[float | None, ...] | None = None,
               sketch_json: bytes | None = None) -> tuple[Any, ...]:
    """One ``communication_rollups`` row, as :func:`pipeline.sink.sql.rollup_values`
    (``q``: :func:`quantiles` of its sketch, ``sketch_json`` its JSON, if the caller has
    them)."""
    sketch = stats.latency
    has = sketch.count > 0
    errors = stats.errors
    failed = sum(errors.values()) + stats.timeouts if errors else stats.timeouts
    outcomes = stats.responses + failed
    return (start, end, *edge, stats.requests, stats.responses, failed - stats.timeouts,
            stats.timeouts, stats.retries, stats.retry_backoff_ms, stats.late_events,
            stats.payload_bytes, sketch.count, sketch.sum, sketch.min if has else None,
            *(quantiles(sketch) if q is None else q), sketch.max if has else None,
            failed / max(outcomes, 1), stats.reported_state or stats.derived_state,
            stats.derived_state, _json(errors), _json(stats.health), _json(stats.transitions),
            (orjson.dumps(sketch.to_json()) if sketch_json is None else sketch_json).decode(),
            partitions)


@dataclass
class Prepared:
    """The rows of one batch: every part, and the rollup and objective rows of the keys
    that only one part of this batch has (``shared`` lists the others, to be merged)."""

    parts: list[tuple[Any, ...]] = field(default_factory=list)
    rollups: list[tuple[Any, ...]] = field(default_factory=list)
    slo: list[tuple[Any, ...]] = field(default_factory=list)
    shared: set[tuple[float, str, str, str]] = field(default_factory=set)


class Judge:
    """Each edge's objectives from an :class:`SloConfig`, looked up once per edge."""

    def __init__(self, config: SloConfig) -> None:
        self.config = config
        self._by_edge: dict[Edge, Objectives] = {}

    def rows(self, start: float, end: float, edge: Edge, stats: WindowStats, *,
             p95: float | None = None) -> list[tuple[Any, ...]]:
        """The ``communication_slo`` rows of one (merged) window (``p95``: its sketch's, if
        the caller has it)."""
        objectives = self._by_edge.get(edge)
        if objectives is None:
            objectives = self._by_edge[edge] = self.config.for_edge(edge)
        return [(start, end, *edge, *r) for r in evaluate(edge, stats, objectives, p95=p95)]


def prepare(windows: Sequence[WindowRow], judge: Judge) -> Prepared:
    """Parts for every window; rollup and objective rows for the keys with one part here."""
    out = Prepared()
    counts: dict[tuple[float, str, str, str], int] = {}
    for w in windows:
        key = (w.window_start, w.source_service, w.target_service, w.protocol)
        counts[key] = counts.get(key, 0) + 1
    out.shared = {k for k, n in counts.items() if n > 1}
    parts, rollups, slo, shared = out.parts, out.rollups, out.slo, out.shared
    for w in windows:
        stats = w.stats
        edge = (w.source_service, w.target_service, w.protocol)
        start, end = w.window_start, w.window_end
        sketch = orjson.dumps(stats.latency.to_json())  # once, for the part and the rollup
        parts.append((start, *edge, w.partition, end, stats.offset, part_json(stats, sketch)))
        if shared and (start, *edge) in shared:
            continue
        q = quantiles(stats.latency)
        rollups.append(rollup_row(start, end, edge, stats, 1, q, sketch))
        slo.extend(judge.rows(start, end, edge, stats, p95=q[_P95]))
    return out
