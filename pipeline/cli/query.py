"""SQL against the sink's databases, for ``commpipe query``, ``health``, ``trace`` and
``patterns``.

DuckDB is opened only for the query (read-only unless ``write``); while the
sink holds the file for one of its short writes,
:func:`~pipeline.sink.connect_duckdb` waits instead of failing with DuckDB's
lock error. PostgreSQL queries run in a read-only transaction unless
``write``. Values travel as parameters (``%s`` placeholders, PostgreSQL style:
DuckDB's become ``?`` when there are values). ``min_version``
checks the schema first, so an old database gets "run `commpipe migrate`"
rather than a missing column. Errors are
:class:`~pipeline.errors.CommpipeError` with the database's own message and no
secrets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, ServiceError
from pipeline.settings import Settings, redact_dsn, scrub_dsn

__all__ = ["HEALTH_SQL", "Result", "Statement", "execute_duckdb", "execute_postgres",
           "query_duckdb", "query_postgres"]

HEALTH_SQL = "SELECT * FROM analyze_communication_health()"
_VERSION_SQL = "SELECT coalesce(max(version), 0) FROM commpipe_schema_migrations"

Statement = tuple[str, Sequence[Any]]
"""One parameterised statement: SQL with ``%s`` placeholders and its values."""


@dataclass(frozen=True)
class Result:
    columns: list[str]
    rows: list[tuple[Any, ...]]


def _check_version(run: Any, where: str, min_version: int | None,
                   missing: type[BaseException]) -> None:
    if min_version is None:
        return
    try:
        have = int(run(_VERSION_SQL)[0][0])
    except missing:  # no tracking table: not migrated at all
        have = 0
    if have < min_version:
        raise ConfigError(f"{where} has schema version {have}; this needs {min_version} or "
                          "later: run `commpipe migrate`")


def execute_duckdb(path: str | Path, statements: Sequence[Statement], *, write: bool = False,
                   min_version: int | None = None, wait_s: float = 10.0) -> list[Result]:
    """Run ``statements`` on the DuckDB file in one transaction; one :class:`Result` each."""
    import duckdb

    from pipeline.sink.writer import connect_duckdb

    if not Path(path).exists():
        raise ConfigError(f"no DuckDB file at {path}: the sink creates it (run the worker or "
                          "`commpipe migrate`), or set COMMPIPE_DUCKDB_PATH")
    con = connect_duckdb(path, read_only=not write, wait_s=wait_s)
    try:
        _check_version(lambda sql: con.execute(sql).fetchall(), f"DuckDB file {path}",
                       min_version, duckdb.CatalogException)
        con.execute("BEGIN TRANSACTION")
        results = []
        for sql, params in statements:
            # the user's own SQL (no values) is run exactly as written
            cur = (con.execute(sql.replace("%s", "?"), list(params)) if params
                   else con.execute(sql))
            columns = [d[0] for d in cur.description or []]
            results.append(Result(columns, cur.fetchall() if columns else []))
        con.execute("COMMIT")
        return results
    except duckdb.Error as e:
        raise ServiceError(f"DuckDB: {e}") from None
    finally:
        con.close()


def query_duckdb(path: str | Path, sql: str, params: Sequence[Any] = (), *,
                 min_version: int | None = None, wait_s: float = 10.0) -> Result:
    """Run ``sql`` on the DuckDB file (read-only)."""
    return execute_duckdb(path, [(sql, params)], min_version=min_version, wait_s=wait_s)[0]


def execute_postgres(settings: Settings, statements: Sequence[Statement], *,
                     write: bool = False, min_version: int | None = None) -> list[Result]:
    """Run ``statements`` on PostgreSQL (``COMMPIPE_POSTGRES_DSN``) in one transaction."""
    import psycopg

    dsn = settings.postgres_conninfo()
    if not dsn:
        raise ConfigError("COMMPIPE_POSTGRES_DSN is not set (`commpipe postgres` prints one)")
    where = f"PostgreSQL ({redact_dsn(dsn)})"
    try:
        with psycopg.connect(dsn, connect_timeout=5) as conn:
            conn.read_only = not write
            _check_version(lambda sql: conn.execute(sql).fetchall(), where, min_version,
                           psycopg.errors.UndefinedTable)
            conn.rollback()  # a failed version read must not poison the transaction below
            results = []
            with conn.transaction():
                for sql, params in statements:
                    cur = conn.execute(sql, list(params) or None)  # type: ignore[arg-type]
                    columns = [d.name for d in cur.description or []]
                    results.append(Result(columns, cur.fetchall() if columns else []))
            return results
    except psycopg.Error as e:
        raise ServiceError(f"{where}: {scrub_dsn(str(e).strip(), dsn)}") from None


def query_postgres(settings: Settings, sql: str, params: Sequence[Any] = (), *,
                   min_version: int | None = None) -> Result:
    """Run ``sql`` on PostgreSQL (``COMMPIPE_POSTGRES_DSN``) in a read-only transaction."""
    return execute_postgres(settings, [(sql, params)], min_version=min_version)[0]
