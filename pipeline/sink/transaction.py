"""One sink transaction: a batch of windows and kept events into one database.

:func:`write_batch` runs inside the caller's transaction, in this order:

1. error, timeout and retry events and the responses of retried calls ->
   ``communication_events`` (staged, then ``ON CONFLICT (event_id) DO NOTHING``: a
   replay inserts nothing twice), health events -> ``communication_health_checks``
   (the same), and ``recovered_at`` of unhealthy checks of the services just checked
   is recomputed (the first later healthy check);
2. each window's per-partition part -> ``communication_rollup_parts`` (upsert: the
   owner's replay overwrites its own row, never with an older version:
   ``source_offset`` decides);
3. for every window that is the only one of its (window, edge) in the batch, its
   ``communication_rollups`` row and its objectives (``communication_slo``), computed
   from the part alone (:mod:`pipeline.sink.rows`), upserted from staging;
4. the keys for which that was not the whole story (the batch had several parts of
   them, the database holds another partition's part, or a newer version of this one)
   are merged from every stored part (counts added, sketches merged) and upserted over
   step 3's rows; a window only gains objectives as it grows, so these overwrite every
   row step 3 wrote for them;
5. ``communication_patterns`` of the touched edges is recomputed from the rollups of its
   last ``lookback_s`` seconds (:func:`pipeline.sink.sql.pattern_values`).

Every step is a recomputation or an idempotent insert, so running a batch twice
leaves the databases as running it once, and both databases get the same rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import orjson

from pipeline.core.rollups import WindowRow
from pipeline.core.slo import SloConfig
from pipeline.core.window import WindowStats
from pipeline.sink import sql as q
from pipeline.sink.rows import Judge, prepare
from pipeline.sink.staging import Columns, stage_duckdb, stage_postgres, unstage_duckdb

__all__ = ["write_batch"]

DEFAULT_SLO = SloConfig()
Edge = tuple[str, str, str]


def write_batch(cur: Any, dialect: q.Dialect, windows: Sequence[WindowRow],
                details: Iterable[dict[str, Any]], *, lookback_s: float,
                slo: SloConfig | None = None, judge: Judge | None = None) -> int:
    """Write one batch inside the caller's transaction (see the module docstring);
    returns the number of ``communication_rollups`` rows written. ``judge`` caches each
    edge's objectives across batches (made from ``slo`` when not given)."""
    def run(sql: str, params: Sequence[Any] | None = None) -> None:
        cur.execute(q.dialect_sql(sql, dialect), params)

    staged: list[str] = []

    def stage(name: str, columns: Columns, rows: Sequence[Sequence[Any]]) -> None:
        if dialect == "postgres":
            stage_postgres(cur, name, columns, rows)
        else:
            stage_duckdb(cur, name, columns, rows)
            staged.append(name)

    try:
        touched = _details(run, stage, details)
        merged = 0
        if windows:
            merged = _windows(cur, run, stage, windows,
                              judge or Judge(slo or DEFAULT_SLO))
            touched |= {w.edge for w in windows}
        if touched:
            run(q.PATTERN_SUMS, [*q._columns(sorted(touched), 3), lookback_s])
            patterns = [q.pattern_values(r) for r in cur.fetchall()]
            if patterns:
                run(q.UPSERT_PATTERNS, q._columns(patterns, len(q._PATTERNS)))
    finally:
        if staged:
            unstage_duckdb(cur, staged)
    return merged


def _details(run: Callable[..., None], stage: Callable[..., None],
             details: Iterable[dict[str, Any]]) -> set[Edge]:
    """Step 1; returns the edges whose ``last_health_check`` may have moved."""
    unique = {e["event_id"]: e for e in details}  # one event twice in a batch: once
    events = [q._event_row(e) for e in unique.values() if e["kind"] != "health"]
    checks = [q._check_row(e) for e in unique.values() if e["kind"] == "health"]
    if events:
        stage(q.STAGE_EVENTS, q._EVENTS, events)
        run(q.STAGED_EVENTS)
    if checks:
        run(q.INSERT_CHECKS, q._columns(checks, len(q._CHECKS)))
        healthy = [c[8] for c in checks if c[5] == "healthy"]
        run(q.RECOVERIES, [sorted({c[1] for c in checks}), min(healthy, default=4102444800.0)])
    return {(e["source_service"], e["target_service"], e["protocol"])
            for e in unique.values() if e["kind"] == "health"}


def _windows(cur: Any, run: Callable[..., None], stage: Callable[..., None],
             windows: Sequence[WindowRow], judge: Judge) -> int:
    """Steps 2 to 4; returns the number of (window, edge) rows written."""
    prepared = prepare(windows, judge)
    stage(q.STAGE_PARTS, q._PARTS, prepared.parts)
    run(q.STAGED_PARTS)
    if prepared.rollups:
        stage(q.STAGE_ROLLUPS, q._ROLLUPS, prepared.rollups)
        run(q.STAGED_ROLLUPS)
    if prepared.slo:
        stage(q.STAGE_SLO, q._SLO, prepared.slo)
        run(q.STAGED_SLO)
    run(q.SHARED_KEYS)
    shared = prepared.shared | {(float(r[0]), r[1], r[2], r[3]) for r in cur.fetchall()}
    if shared:
        _merge(cur, run, sorted(shared), judge)
    return len(prepared.rollups) + len(prepared.shared)


def _merge(cur: Any, run: Callable[..., None], keys: list[tuple[float, str, str, str]],
           judge: Judge) -> None:
    """Step 4: every stored part of ``keys``, merged into their rollup and objectives."""
    run(q.READ_PARTS, q._columns(keys, 4))
    totals: dict[tuple[float, Edge], tuple[WindowStats, int]] = {}
    for source, target, protocol, stats in cur.fetchall():
        part = WindowStats.from_json(stats if isinstance(stats, dict) else orjson.loads(stats))
        key = (part.window_start, (source, target, protocol))
        total, n = totals.get(key, (None, 0))
        if total is None:
            total = WindowStats(part.window_start, part.window_end)
        total.merge(part)
        totals[key] = (total, n + 1)
    ordered = sorted(totals.items())
    rows = [q.rollup_values(start, total.window_end, edge, total, n)
            for (start, edge), (total, n) in ordered]
    if rows:
        run(q.UPSERT_ROLLUPS, q._columns(rows, len(q._ROLLUPS)))
    judged = [row for (start, edge), (total, _) in ordered
              for row in judge.rows(start, total.window_end, edge, total)]
    if judged:
        run(q.UPSERT_SLO, q._columns(judged, len(q._SLO)))
