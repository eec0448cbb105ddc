"""The databases the sink writes: one :class:`Target` each, its transaction and its errors.

:class:`PostgresTarget` keeps one connection and runs each batch in one transaction under
an advisory lock (the merge step of sinks on several workers runs one at a time);
:class:`DuckDBTarget` opens the file for each transaction only, because DuckDB lets one
process open a file for writing and none read it meanwhile, and :func:`connect_duckdb`
(used by ``commpipe query``) waits out such a write instead of failing. Both run
:func:`pipeline.sink.transaction.write_batch`.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.core.rollups import WindowRow
from pipeline.core.slo import SloConfig
from pipeline.errors import ServiceError
from pipeline.settings import scrub_dsn
from pipeline.sink.rows import Judge
from pipeline.sink.sql import Dialect
from pipeline.sink.transaction import write_batch

__all__ = ["DuckDBTarget", "PostgresTarget", "Target", "connect_duckdb"]

log = logging.getLogger("commpipe.sink")

_DEFAULT_SLO = SloConfig()
_PG_LOCK = 0x636F6D6D  # "comm": serializes the merge step of sinks on several workers


class Target(ABC):
    """One database the sink writes (blocking calls, run in a thread)."""

    name: str
    dialect: Dialect
    slo: SloConfig | None = None
    """The objectives judged on each stored window (None: the defaults)."""
    _judge: Judge | None = None

    def judge(self) -> Judge:
        """Each edge's objectives under :attr:`slo`, looked up once per edge."""
        if self._judge is None or self._judge.config is not (self.slo or _DEFAULT_SLO):
            self._judge = Judge(self.slo or _DEFAULT_SLO)
        return self._judge

    @abstractmethod
    def write(self, windows: Sequence[WindowRow], events: Sequence[dict[str, Any]], *,
              lookback_s: float) -> int:
        """Store one batch in one transaction; raise on any failure (nothing half-done)."""

    def probe(self) -> None:  # noqa: B027 - optional hook
        """Raise if the database cannot be reached (asked, in a thread, before a target that
        failed last time gets its whole backlog sorted into batches)."""

    def describe(self, exc: BaseException) -> str:
        """``exc`` as a log line, without secrets."""
        return f"{type(exc).__name__}: {exc}".strip()

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


class PostgresTarget(Target):
    name = "postgres"
    dialect: Dialect = "postgres"

    def __init__(self, dsn: str, *, migrate: bool = True) -> None:
        self._dsn = dsn
        self._migrate = migrate
        self._conn: Any = None

    def _connect(self) -> Any:
        import psycopg

        from pipeline.sink import migrations

        migrations.ensure_latest("postgres", self._dsn, migrate=self._migrate)
        return psycopg.connect(self._dsn, connect_timeout=5, application_name="commpipe-sink")

    def write(self, windows: Sequence[WindowRow], events: Sequence[dict[str, Any]], *,
              lookback_s: float) -> int:
        if self._conn is None or self._conn.closed:
            self._conn = self._connect()
        conn = self._conn
        try:
            with conn.transaction(), conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_LOCK,))
                return write_batch(cur, "postgres", windows, events, lookback_s=lookback_s,
                                   judge=self.judge())
        except BaseException:
            self.close()
            raise

    def probe(self) -> None:
        if self._conn is None or self._conn.closed:  # a failed write closed it
            self._conn = self._connect()

    def describe(self, exc: BaseException) -> str:
        return scrub_dsn(super().describe(exc), self._dsn)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception as e:  # noqa: BLE001 - closing a broken connection
                log.debug("closing the PostgreSQL connection: %s", type(e).__name__)


def connect_duckdb(path: str | Path, *, read_only: bool = False, wait_s: float = 10.0) -> Any:
    """Open the DuckDB file, waiting up to ``wait_s`` while another process (the sink, a
    reader) holds it; then :class:`~pipeline.errors.ServiceError` naming the cause."""
    import duckdb

    deadline = time.monotonic() + wait_s
    delay = 0.01
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only)
        except duckdb.IOException as e:
            if "lock" not in str(e).lower():
                raise ServiceError(f"cannot open DuckDB file {path}: {e}") from None
            if time.monotonic() >= deadline:
                raise ServiceError(
                    f"DuckDB file {path} stayed locked by another process for {wait_s:g} s "
                    "(a long query or an open duckdb shell holds it; close it and retry)"
                ) from None
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


class DuckDBTarget(Target):
    name = "duckdb"
    dialect: Dialect = "duckdb"

    def __init__(self, path: str | Path, *, migrate: bool = True, wait_s: float = 2.0) -> None:
        self.path = Path(path)
        self._migrate = migrate
        self._wait_s = wait_s
        self._ready = False

    def write(self, windows: Sequence[WindowRow], events: Sequence[dict[str, Any]], *,
              lookback_s: float) -> int:
        if not self._ready:
            from pipeline.sink import migrations

            self.path.parent.mkdir(parents=True, exist_ok=True)
            migrations.ensure_latest("duckdb", self.path, migrate=self._migrate)
            self._ready = True
        con = connect_duckdb(self.path, wait_s=self._wait_s)
        try:
            con.execute("BEGIN TRANSACTION")
            try:
                n = write_batch(con, "duckdb", windows, events, lookback_s=lookback_s,
                                judge=self.judge())
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
            return n
        finally:
            con.close()
