"""``commpipe health``: the health analysis and the objectives missed lately, as a gate.

:func:`report` reads one database: ``analyze_communication_health()`` (a score
per service), the ``communication_slo`` rows that failed in the lookback,
grouped per edge and objective, and how many rollup windows ended in the
lookback. A report fails when a service scores under ``fail_under``, any
objective failed, or nothing was checked: no window in the lookback (an empty
database, a stopped worker) must not pass a gate. No database configured, or
one without the schema, fails too (:data:`NOTHING_TO_CHECK`, "run `commpipe
migrate`").
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from pipeline.cli import query as q
from pipeline.settings import Settings

__all__ = ["MISSES_SQL", "NOTHING_TO_CHECK", "SCHEMA_VERSION", "WINDOWS_SQL", "Report",
           "report"]

SCHEMA_VERSION = 4
"""The migration that created ``communication_slo``."""

MISSES_SQL = """
SELECT source_service, target_service, protocol, objective, count(*) AS windows_missed,
       min(threshold) AS threshold, max(miss) AS worst_miss,
       extract(epoch FROM max(window_end)) AS last_window_end
FROM communication_slo
WHERE NOT ok AND window_end > to_timestamp(%s)
GROUP BY source_service, target_service, protocol, objective
ORDER BY source_service, target_service, protocol, objective
"""
WINDOWS_SQL = "SELECT count(*) FROM communication_rollups WHERE window_end > to_timestamp(%s)"
NOTHING_TO_CHECK = ("no database to check: set COMMPIPE_POSTGRES_DSN and/or "
                    "COMMPIPE_DUCKDB_PATH (a gate that checked nothing must not pass)")


@dataclass
class Report:
    database: str
    health: q.Result
    misses: q.Result
    fail_under: float | None
    windows: int = 0
    """Rollup windows that ended in the lookback: what the report is about."""
    low: list[tuple[str, float]] = field(default_factory=list)
    """Services scoring under ``fail_under``: (service, score)."""
    problems: list[str] = field(default_factory=list)
    """Why nothing could be judged (no windows in the lookback)."""

    @property
    def ok(self) -> bool:
        return not self.low and not self.misses.rows and not self.problems

    def to_json(self) -> dict[str, Any]:
        def rows(result: q.Result) -> list[dict[str, Any]]:
            return [{c: _plain(v) for c, v in zip(result.columns, row, strict=True)}
                    for row in result.rows]

        return {"database": self.database, "ok": self.ok, "fail_under": self.fail_under,
                "windows_checked": self.windows, "problems": self.problems,
                "services_under": [{"service": s, "score": v} for s, v in self.low],
                "health": rows(self.health), "slo_misses": rows(self.misses)}


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return float(value) if hasattr(value, "as_tuple") else str(value)  # Decimal -> float


def report(settings: Settings, database: str, *, since_s: float, since: str,
           fail_under: float | None) -> Report:
    """The report of ``database`` (``postgres`` or ``duckdb``) over the last ``since_s``
    seconds (``since``: the same as the user wrote it, for messages)."""
    params = [time.time() - since_s]
    statements = [(q.HEALTH_SQL, ()), (MISSES_SQL, params), (WINDOWS_SQL, params)]
    if database == "postgres":
        health, misses, windows = q.execute_postgres(settings, statements,
                                                     min_version=SCHEMA_VERSION)
    else:
        health, misses, windows = q.execute_duckdb(settings.duckdb_path, statements,
                                                   min_version=SCHEMA_VERSION)
    out = Report(database, health, misses, fail_under, windows=int(windows.rows[0][0]))
    if not out.windows:
        out.problems.append(f"no rollups in the last {since}: nothing was checked (is a "
                            "worker writing to this database?)")
    if fail_under is not None:
        at = health.columns.index("communication_score")
        out.low = [(str(row[0]), float(row[at])) for row in health.rows
                   if float(row[at]) < fail_under]
    return out
