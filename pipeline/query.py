"""Read-only SQL against the sink's databases, for ``commpipe query`` and ``commpipe health``.

DuckDB is opened read-only and only for the query; while the sink holds the
file for one of its short writes, :func:`~pipeline.sink.connect_duckdb` waits
instead of failing with DuckDB's lock error. PostgreSQL queries run in a
read-only transaction. Errors are :class:`~pipeline.errors.CommpipeError`
with the database's own message and no secrets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, ServiceError
from pipeline.settings import Settings, redact_dsn, scrub_dsn

__all__ = ["HEALTH_SQL", "Result", "query_duckdb", "query_postgres"]

HEALTH_SQL = "SELECT * FROM analyze_communication_health()"


@dataclass(frozen=True)
class Result:
    columns: list[str]
    rows: list[tuple[Any, ...]]


def query_duckdb(path: str | Path, sql: str, *, wait_s: float = 10.0) -> Result:
    """Run ``sql`` on the DuckDB file (read-only)."""
    import duckdb

    from pipeline.sink import connect_duckdb

    if not Path(path).exists():
        raise ConfigError(f"no DuckDB file at {path}: the sink creates it (run the worker or "
                          "`commpipe migrate`), or set COMMPIPE_DUCKDB_PATH")
    con = connect_duckdb(path, read_only=True, wait_s=wait_s)
    try:
        cur = con.execute(sql)
        columns = [d[0] for d in cur.description or []]
        return Result(columns, cur.fetchall() if columns else [])
    except duckdb.Error as e:
        raise ServiceError(f"DuckDB: {e}") from None
    finally:
        con.close()


def query_postgres(settings: Settings, sql: str) -> Result:
    """Run ``sql`` on PostgreSQL (``COMMPIPE_POSTGRES_DSN``) in a read-only transaction."""
    import psycopg

    dsn = settings.postgres_conninfo()
    if not dsn:
        raise ConfigError("COMMPIPE_POSTGRES_DSN is not set (`commpipe postgres` prints one)")
    try:
        with psycopg.connect(dsn, connect_timeout=5) as conn:
            conn.read_only = True
            cur = conn.execute(sql)  # type: ignore[arg-type] - the user's own SQL
            columns = [d.name for d in cur.description or []]
            return Result(columns, cur.fetchall() if columns else [])
    except psycopg.Error as e:
        raise ServiceError(f"PostgreSQL ({redact_dsn(dsn)}): "
                           f"{scrub_dsn(str(e).strip(), dsn)}") from None
