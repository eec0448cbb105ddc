"""SQL against the sink's databases, for ``commpipe query``, ``health``, ``trace`` and
``patterns``.

Unless ``write`` (``commpipe patterns load``), a query cannot write anywhere, whatever
its text; this is made impossible by the databases, not by reading the SQL:

- PostgreSQL: the session is read-only (``default_transaction_read_only``), the
  transaction is ``READ ONLY`` and has run a query before the user's statement (so
  ``SET TRANSACTION READ WRITE`` cannot lift it), and, when the connecting role may
  (a superuser, or a member), it runs as the predefined role ``pg_read_all_data``,
  which has no superuser powers (no ``COPY ... TO`` a server file, no ``lo_export``).
  Each statement runs as ``DECLARE ... CURSOR FOR <statement>`` sent as one
  prepared statement: the server accepts exactly one ``SELECT``, ``WITH ... SELECT``,
  ``VALUES`` or ``TABLE`` there, and no data-modifying ``WITH``.
- DuckDB: the file is opened read-only, access to any other file (``ATTACH``,
  ``COPY``, ``EXPORT``, ``read_csv`` ...) is turned off and the configuration locked,
  so no statement can turn it back on; one statement per query.

DuckDB is opened only for the query; while the sink holds the file for one of its
short writes, :func:`~pipeline.sink.connect_duckdb` waits instead of failing with
DuckDB's lock error. Values travel as parameters (``%s`` placeholders, PostgreSQL
style: DuckDB's become ``?`` when there are values). ``min_version`` checks the
schema first, so an old database gets "run `commpipe migrate`" rather than a
missing column. Errors are :class:`~pipeline.errors.CommpipeError`, one line with
the database's own message and no secrets.
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
_READ_ONLY = ("commpipe query runs one read-only query: SELECT, WITH ... SELECT, VALUES "
              "or TABLE")
_READER_ROLE = "pg_read_all_data"
_CAN_READ_AS = (f"SELECT current_schemas(false), CASE WHEN EXISTS (SELECT 1 FROM pg_roles "
                f"WHERE rolname = '{_READER_ROLE}') THEN pg_has_role('{_READER_ROLE}', "
                "'MEMBER') ELSE false END")

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


def _one_line(text: str) -> str:
    """A driver's message as one line, without the quoted-SQL context (``LINE 1: ...``)."""
    return " ".join(text.split("\nLINE ", 1)[0].split())


def _no_sql(statements: Sequence[Statement]) -> None:
    if any(not sql.strip() for sql, _ in statements):
        raise ConfigError('no SQL given: pass one query, e.g. commpipe query '
                          '"SELECT * FROM communication_rollups LIMIT 5"')


def _no_other_files(con: Any) -> None:
    """Turn off DuckDB's access to any other file and lock the configuration. Readers in one
    process share the file's database instance, and a second one finds it done already;
    either way it is checked before anything else runs."""
    import duckdb

    try:
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    except duckdb.InvalidInputException:  # locked by another reader of this process
        pass
    state = con.execute("SELECT current_setting('enable_external_access'), "
                        "current_setting('lock_configuration')").fetchone()
    if tuple(state) != (False, True):
        raise ServiceError("DuckDB: could not turn off access to other files for a "
                           "read-only query; nothing was run")


def execute_duckdb(path: str | Path, statements: Sequence[Statement], *, write: bool = False,
                   min_version: int | None = None, wait_s: float = 10.0) -> list[Result]:
    """Run ``statements`` on the DuckDB file in one transaction; one :class:`Result` each.
    Without ``write`` nothing can be written, to this file or any other (module docstring)."""
    import duckdb

    from pipeline.sink.writer import connect_duckdb

    _no_sql(statements)
    if not str(path):
        raise ConfigError("COMMPIPE_DUCKDB_PATH is empty, so there is no DuckDB file to read "
                          "(the DuckDB sink is off): set it to the sink's file, or use "
                          "--postgres")
    if Path(path).is_dir():
        raise ConfigError(f"{path} is a directory, not a DuckDB file: set "
                          "COMMPIPE_DUCKDB_PATH to the file the sink writes")
    if not Path(path).exists():
        raise ConfigError(f"no DuckDB file at {path}: the sink creates it (run the worker or "
                          "`commpipe migrate`), or set COMMPIPE_DUCKDB_PATH")
    con = connect_duckdb(path, read_only=not write, wait_s=wait_s)
    try:
        if not write:
            _no_other_files(con)
            for sql, _ in statements:
                count = len(con.extract_statements(sql))
                if count != 1:
                    raise ConfigError(
                        f"commpipe query runs one statement; this SQL holds {count} (run them "
                        "one at a time)" if count else "no SQL statement given (only "
                        "comments or semicolons)")
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
        hint = ("; commpipe query reads this DuckDB file only, and only reads it"
                if not write and isinstance(e, duckdb.PermissionException) else "")
        raise ServiceError(f"DuckDB: {_one_line(str(e))}{hint}") from None
    finally:
        con.close()


def query_duckdb(path: str | Path, sql: str, params: Sequence[Any] = (), *,
                 min_version: int | None = None, wait_s: float = 10.0) -> Result:
    """Run ``sql`` on the DuckDB file (read-only)."""
    return execute_duckdb(path, [(sql, params)], min_version=min_version, wait_s=wait_s)[0]


def _read_only_session(dsn: str) -> str:
    """``dsn`` with ``default_transaction_read_only=on`` added to its ``options``."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    options = str(conninfo_to_dict(dsn).get("options") or "")
    return make_conninfo(dsn, options=f"{options} -c default_transaction_read_only=on".strip())


def _reader(conn: Any) -> None:
    """First query of the read-only transaction (after it, ``SET TRANSACTION READ WRITE`` is
    refused); then, if this role may, become ``pg_read_all_data`` for the rest of it, with
    the schemas the connecting role sees ("$user" would name the new role's)."""
    from psycopg import sql

    schemas, can = conn.execute(_CAN_READ_AS).fetchone()
    if can:
        conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(_READER_ROLE)))
        if schemas:
            conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(
                sql.SQL(", ").join(map(sql.Identifier, schemas))))


def _cursor_rows(conn: Any, i: int, statement: str, params: Sequence[Any]) -> Result:
    """Run one statement as a server-side cursor: the server accepts only a query there."""
    from psycopg import sql

    name = sql.Identifier(f"commpipe_query_{i}")
    conn.execute(sql.SQL("DECLARE {} NO SCROLL CURSOR FOR {}").format(name, sql.SQL(statement)),
                 list(params) or None, prepare=True)
    cur = conn.execute(sql.SQL("FETCH ALL FROM {}").format(name))
    columns = [d.name for d in cur.description or []]
    rows = cur.fetchall() if columns else []
    conn.execute(sql.SQL("CLOSE {}").format(name))
    return Result(columns, rows)


def _postgres_error(e: Exception, dsn: str, read_only: bool) -> str:
    import psycopg

    diag = getattr(e, "diag", None)
    text = diag.message_primary if diag is not None and diag.message_primary else str(e)
    text = _one_line(scrub_dsn(text, dsn))
    refusals = (psycopg.errors.SyntaxError, psycopg.errors.ReadOnlySqlTransaction,
                psycopg.errors.InsufficientPrivilege, psycopg.errors.FeatureNotSupported)
    if read_only and isinstance(e, refusals):
        text = f"{text}; {_READ_ONLY}"
    return text


def execute_postgres(settings: Settings, statements: Sequence[Statement], *,
                     write: bool = False, min_version: int | None = None) -> list[Result]:
    """Run ``statements`` on PostgreSQL (``COMMPIPE_POSTGRES_DSN``) in one transaction.
    Without ``write`` each must be one query, and nothing can be written (module docstring)."""
    import psycopg

    dsn = settings.postgres_conninfo()
    if not dsn:
        raise ConfigError("COMMPIPE_POSTGRES_DSN is not set (`commpipe postgres` prints one)")
    _no_sql(statements)
    where = f"PostgreSQL ({redact_dsn(dsn)})"
    try:
        with psycopg.connect(dsn if write else _read_only_session(dsn),
                             connect_timeout=5) as conn:
            conn.read_only = not write
            _check_version(lambda sql: conn.execute(sql).fetchall(), where, min_version,
                           psycopg.errors.UndefinedTable)
            conn.rollback()  # a failed version read must not poison the transaction below
            results = []
            with conn.transaction():
                if not write:
                    _reader(conn)
                for i, (sql, params) in enumerate(statements):
                    if not write:
                        results.append(_cursor_rows(conn, i, sql, params))
                        continue
                    cur = conn.execute(sql, list(params) or None)  # type: ignore[arg-type]
                    columns = [d.name for d in cur.description or []]
                    results.append(Result(columns, cur.fetchall() if columns else []))
            return results
    except psycopg.Error as e:
        raise ServiceError(f"{where}: {_postgres_error(e, dsn, not write)}") from None


def query_postgres(settings: Settings, sql: str, params: Sequence[Any] = (), *,
                   min_version: int | None = None) -> Result:
    """Run ``sql`` on PostgreSQL (``COMMPIPE_POSTGRES_DSN``) in a read-only transaction."""
    return execute_postgres(settings, [(sql, params)], min_version=min_version)[0]
