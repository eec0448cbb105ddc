"""Schema migrations for PostgreSQL and DuckDB: numbered SQL files, applied up or down.

A migration is a pair of files ``NNNN_name.up.sql`` / ``NNNN_name.down.sql`` in
``sql/postgres`` or ``sql/duckdb``. Each file runs as one script in one
transaction together with its row in ``commpipe_schema_migrations`` in the same
database, so a failing script leaves no trace. PostgreSQL migrations run under
a session advisory lock, so workers starting together migrate one at a time.

Rolling back never deletes data unasked: before any down script runs, all of them
are run once in a transaction that is rolled back, and the tables and columns they
would drop are compared with the catalogue; if any of those holds data, the call
names what (``3 rows of table communication_slo``, ``1 value of column
communication_events.attempt``) and changes nothing, unless ``allow_data_loss`` is
given (``commpipe migrate --yes``). A down script that would fail says so the same way.

The ``sql/`` directory is ``$COMMPIPE_SQL_DIR`` if set, else the repository
checkout's ``sql/`` (editable install), else the copy a wheel installs under
``<prefix>/share/commpipe/sql`` (``[tool.setuptools.data-files]``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from pipeline.errors import ConfigError, ServiceError
from pipeline.settings import redact_dsn, scrub_dsn

__all__ = ["Migration", "Step", "current_version_duckdb", "current_version_postgres",
           "ensure_latest", "latest", "migrate_duckdb", "migrate_postgres", "migrations",
           "sql_dir"]

Dialect = Literal["postgres", "duckdb"]
Direction = Literal["up", "down"]
SQL_DIR_ENV = "COMMPIPE_SQL_DIR"
TRACKING_TABLE = "commpipe_schema_migrations"
ADVISORY_LOCK_KEY = 0x636F6D6D70697065
"""``pg_advisory_lock`` key held while migrating PostgreSQL: b"commpipe" as a bigint."""

_FILE_NAME = re.compile(r"(\d{4})_([a-z0-9_]+)\.(up|down)\.sql")
_CREATE_TRACKING = (
    f"CREATE TABLE IF NOT EXISTS {TRACKING_TABLE} "
    "(version INTEGER PRIMARY KEY, name VARCHAR, applied_at TIMESTAMPTZ)"
)


@dataclass(frozen=True, order=True)
class Migration:
    """One numbered migration: its up and down script."""

    version: int
    name: str
    up: Path
    down: Path


@dataclass(frozen=True)
class Step:
    """One script a migrate call ran."""

    version: int
    name: str
    direction: Direction


class _Conn(Protocol):
    """What both a psycopg and a duckdb connection offer: ``execute`` returning rows."""

    def execute(self, query: Any, params: Any = None, /) -> Any: ...


@dataclass(frozen=True)
class _Db:
    """Per-dialect details: how to name the database in messages and the placeholder."""

    dialect: Dialect
    where: str
    param: str
    errors: tuple[type[BaseException], ...]
    dsn: str = ""
    """PostgreSQL: the DSN, whose password :func:`_cause` keeps out of messages."""


def sql_dir() -> Path:
    """The ``sql/`` directory: ``$COMMPIPE_SQL_DIR``, the checkout's, or the installed copy."""
    if os.environ.get(SQL_DIR_ENV):
        return Path(os.environ[SQL_DIR_ENV])
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and (checkout / "sql").is_dir():
        return checkout / "sql"
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        files = distribution("commpipe").files or []
    except PackageNotFoundError:
        files = []
    for f in files:
        if "share/commpipe/sql/" in f.as_posix():
            return Path(str(f.locate())).resolve().parents[1]
    raise ConfigError(f"cannot find commpipe's sql/ directory; set {SQL_DIR_ENV} to it")


def migrations(dialect: Dialect) -> list[Migration]:
    """The dialect's migrations, by version; :class:`ConfigError` for an incomplete set."""
    if dialect not in ("postgres", "duckdb"):
        raise ConfigError(f"unknown SQL dialect {dialect!r}; use 'postgres' or 'duckdb'")
    root = sql_dir() / dialect
    if not root.is_dir():
        raise ConfigError(f"no migrations directory {root}; set {SQL_DIR_ENV} to commpipe's sql/")
    names: dict[int, str] = {}
    files: dict[int, dict[str, Path]] = {}
    for path in sorted(root.glob("*.sql")):
        m = _FILE_NAME.fullmatch(path.name)
        if not m or int(m[1]) == 0:
            raise ConfigError(f"{path}: not a migration file name "
                              "(NNNN_name.up.sql / NNNN_name.down.sql, NNNN > 0)")
        version, name = int(m[1]), m[2]
        if names.setdefault(version, name) != name:
            raise ConfigError(f"{root}: duplicate migration version {m[1]} "
                              f"({m[1]}_{names[version]} and {m[1]}_{name})")
        files.setdefault(version, {})[m[3]] = path
    result = []
    for version in sorted(files):
        stem = f"{version:04d}_{names[version]}"
        for direction in ("up", "down"):
            if direction not in files[version]:
                raise ConfigError(f"{root}: migration {stem} has no {stem}.{direction}.sql")
        result.append(Migration(version, names[version], files[version]["up"],
                                files[version]["down"]))
    return result


def latest(dialect: Dialect) -> int:
    """The highest migration version of ``dialect`` (0 if there are none)."""
    return max((m.version for m in migrations(dialect)), default=0)


def _cause(e: BaseException, db: _Db) -> str:
    """The driver's message, without DSN passwords."""
    return scrub_dsn(" ".join(str(e).split()), db.dsn)


@contextmanager
def _driver_errors(db: _Db, what: str) -> Iterator[None]:
    """Turn a driver error into a :class:`ServiceError` saying what failed, without passwords."""
    try:
        yield
    except db.errors as e:
        raise ServiceError(f"{what} failed on {db.where}: {_cause(e, db)}") from e


def _current(conn: _Conn) -> int:
    """Highest applied version; 0 when the tracking table does not exist yet."""
    exists = conn.execute(
        "SELECT count(*) FROM information_schema.tables "
        f"WHERE table_schema = current_schema() AND table_name = '{TRACKING_TABLE}'"
    ).fetchone()[0]
    if not exists:
        return 0
    return int(conn.execute(f"SELECT coalesce(max(version), 0) FROM {TRACKING_TABLE}")
               .fetchone()[0])


def _apply(conn: _Conn, db: _Db, m: Migration, direction: Direction) -> None:
    """Run one script and record it, in one transaction; roll back and raise on failure."""
    path = m.up if direction == "up" else m.down
    p = db.param
    try:
        script = path.read_text(encoding="utf-8")
        conn.execute("BEGIN")
        conn.execute(script)
        if direction == "up":
            conn.execute(f"INSERT INTO {TRACKING_TABLE} (version, name, applied_at) "
                         f"VALUES ({p}, {p}, now())", (m.version, m.name))
        else:
            conn.execute(f"DELETE FROM {TRACKING_TABLE} WHERE version = {p}", (m.version,))
        conn.execute("COMMIT")
    except (OSError, *db.errors) as e:
        try:
            conn.execute("ROLLBACK")
        except Exception:  # noqa: BLE001 - the connection may be gone; the error below says why
            pass
        raise ServiceError(f"migration {path} ({direction}) failed on {db.where}, nothing of "
                           f"it was applied: {_cause(e, db)}") from e


def _tables(conn: _Conn) -> set[str]:
    return {t for (t,) in conn.execute(
        "SELECT table_name FROM information_schema.tables "
        "WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'").fetchall()}


def _columns(conn: _Conn) -> set[tuple[str, str]]:
    return {(t, c) for t, c in conn.execute(
        "SELECT table_name, column_name FROM information_schema.columns "
        "WHERE table_schema = current_schema()").fetchall()}


def _count(conn: _Conn, db: _Db, table: str, column: str | None = None) -> int:
    """Rows of ``table``, or values (not NULL) of its ``column``."""
    if db.dialect == "postgres":
        from psycopg import sql

        query: Any = sql.SQL("SELECT count({}) FROM {}").format(
            sql.Identifier(column) if column else sql.SQL("*"), sql.Identifier(table))
    else:
        def quote(name: str) -> str:
            return '"' + name.replace('"', '""') + '"'

        query = f"SELECT count({quote(column) if column else '*'}) FROM {quote(table)}"
    return int(conn.execute(query).fetchone()[0])


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _what_downs_delete(conn: _Conn, db: _Db, downs: list[Migration], target: int) -> list[str]:
    """Run the down scripts in a transaction that is rolled back and say what data the
    tables and columns they drop hold; :class:`ServiceError` if one of them fails."""
    tables, columns = _tables(conn), _columns(conn)
    conn.execute("BEGIN")
    try:
        for m in downs:
            try:
                conn.execute(m.down.read_text(encoding="utf-8"))
            except (OSError, *db.errors) as e:
                raise ServiceError(f"migrating {db.where} down to version {target} would fail "
                                   f"at {m.down}: {_cause(e, db)}; nothing was changed") from e
        gone_tables = tables - _tables(conn) - {TRACKING_TABLE}
        gone_columns = {(t, c) for t, c in columns - _columns(conn) if t not in gone_tables}
    finally:
        conn.execute("ROLLBACK")
    lost = []
    for table in sorted(gone_tables):
        if n := _count(conn, db, table):
            lost.append(f"{_plural(n, 'row', 'rows')} of table {table}")
    for table, column in sorted(gone_columns):
        if n := _count(conn, db, table, column):
            lost.append(f"{_plural(n, 'value', 'values')} of column {table}.{column}")
    return lost


def _migrate(conn: _Conn, db: _Db, to: int | None, allow_data_loss: bool = False
             ) -> list[Step]:
    """Bring the connected database to version ``to`` (default: the latest)."""
    known = {m.version: m for m in migrations(db.dialect)}
    top = max(known, default=0)
    if to is not None and not 0 <= to <= top:
        raise ConfigError(f"cannot migrate {db.dialect} to version {to}: versions are 0..{top}")
    conn.execute(_CREATE_TRACKING)
    applied = {int(v) for (v,) in conn.execute(f"SELECT version FROM {TRACKING_TABLE}").fetchall()}
    if to is None and max(applied, default=0) > top:
        raise ConfigError(f"{db.where} is at schema version {max(applied)}, newer than this "
                          f"commpipe's latest ({top}); upgrade commpipe")
    target = top if to is None else to
    unknown = sorted(v for v in applied if v > target and v not in known)
    if unknown:
        raise ConfigError(f"{db.where}: applied version(s) {unknown} have no migration files in "
                          f"{sql_dir() / db.dialect}; cannot migrate down")
    plan: list[tuple[Migration, Direction]] = [
        (known[v], "down") for v in sorted(applied, reverse=True) if v > target
    ] + [(known[v], "up") for v in sorted(known) if v <= target and v not in applied]
    downs = [m for m, direction in plan if direction == "down"]
    if downs and not allow_data_loss:
        with _driver_errors(db, "checking what rolling back would delete"):
            lost = _what_downs_delete(conn, db, downs, target)
        if lost:
            raise ConfigError(
                f"migrating {db.where} down to version {target} would delete "
                f"{', '.join(lost)}; nothing was changed. Back them up if you need them, "
                "then run again with --yes to delete them")
    steps = []
    for m, direction in plan:
        _apply(conn, db, m, direction)
        steps.append(Step(m.version, m.name, direction))
    return steps


@contextmanager
def _postgres(dsn: str) -> Iterator[tuple[_Conn, _Db]]:
    """An autocommit psycopg connection to ``dsn``; :class:`ServiceError` if unreachable."""
    import psycopg

    db = _Db("postgres", f"PostgreSQL {redact_dsn(dsn)}", "%s", (psycopg.Error,), dsn)
    timeout = {} if "connect_timeout" in dsn else {"connect_timeout": 10}
    try:
        conn = psycopg.connect(dsn, autocommit=True, **timeout)
    except psycopg.Error as e:
        leaked = scrub_dsn(str(e), dsn) != str(e)  # then keep the driver's text out, too
        raise ServiceError(f"cannot reach {db.where} (migrations in {sql_dir() / 'postgres'}): "
                           f"{_cause(e, db)}") from (None if leaked else e)
    with conn:
        yield conn, db


@contextmanager
def _duckdb(path: str | Path) -> Iterator[tuple[_Conn, _Db]]:
    """A duckdb connection to the file; :class:`ServiceError` if another process holds it."""
    import duckdb

    where = f"DuckDB file {path}"
    if str(path) != ":memory:":
        folder = Path(path).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create the folder {folder} for {where} "
                              f"({e.strerror or type(e).__name__}): set COMMPIPE_DUCKDB_PATH to "
                              "a file in a folder that exists or can be created") from e
    try:
        conn = duckdb.connect(str(path))
    except duckdb.Error as e:
        if "lock" in str(e).lower():
            raise ServiceError(f"cannot migrate {where}: another process holds it open "
                               f"(stop that process, then migrate): {e}") from e
        raise ServiceError(f"cannot open {where} to migrate it: {e}") from e
    try:
        yield conn, _Db("duckdb", where, "?", (duckdb.Error,))
    finally:
        conn.close()


def migrate_postgres(dsn: str, *, to: int | None = None, allow_data_loss: bool = False
                     ) -> list[Step]:
    """Bring PostgreSQL to version ``to`` (default latest) under the advisory lock; rolling
    back drops data only with ``allow_data_loss`` (else :class:`ConfigError` says what)."""
    with _postgres(dsn) as (conn, db), _driver_errors(db, "migrating"):
        # held until the session ends (when this block closes the connection)
        conn.execute("SELECT pg_advisory_lock(%s)", (ADVISORY_LOCK_KEY,))
        return _migrate(conn, db, to, allow_data_loss)


def migrate_duckdb(path: str | Path, *, to: int | None = None, allow_data_loss: bool = False
                   ) -> list[Step]:
    """Bring the DuckDB file at ``path`` to version ``to`` (default latest); rolling back
    drops data only with ``allow_data_loss``."""
    with _duckdb(path) as (conn, db), _driver_errors(db, "migrating"):
        return _migrate(conn, db, to, allow_data_loss)


def current_version_postgres(dsn: str) -> int:
    """Highest applied migration version in PostgreSQL (0 for a fresh database)."""
    with _postgres(dsn) as (conn, db), _driver_errors(db, "reading the schema version"):
        return _current(conn)


def current_version_duckdb(path: str | Path) -> int:
    """Highest applied migration version in the DuckDB file (0 if fresh or missing)."""
    if str(path) != ":memory:" and not Path(path).exists():
        return 0
    with _duckdb(path) as (conn, db), _driver_errors(db, "reading the schema version"):
        return _current(conn)


def ensure_latest(dialect: Dialect, target: str | Path, *, migrate: bool) -> None:
    """Bring ``target`` (a PostgreSQL DSN or a DuckDB path) to the latest version; with
    ``migrate`` off, raise :class:`ServiceError` instead when it is behind."""
    postgres = dialect == "postgres"
    if migrate:
        if postgres:
            migrate_postgres(str(target))
        else:
            migrate_duckdb(target)
        return
    have = current_version_postgres(str(target)) if postgres else current_version_duckdb(target)
    want = latest(dialect)
    if have < want:
        where = f"PostgreSQL {redact_dsn(str(target))}" if postgres else f"DuckDB file {target}"
        raise ServiceError(f"{where} has schema version {have}, the sink needs {want}: "
                           "run `commpipe migrate`")
