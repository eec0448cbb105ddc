"""The sink: closed windows and kept events, from the worker's table to PostgreSQL and DuckDB.

Each worker runs one :class:`Sink` for the partitions it owns. Every round
(:meth:`Sink.flush`) it asks :class:`~pipeline.core.rollups.Rollups` for closed
windows and kept events (errors, timeouts, retries, health checks, the responses of
retried calls), and gives each target what that
target has not stored yet, in transactions of at most ``batch_rows`` rows
(:func:`pipeline.sink.sql.write_batch`). Targets are independent: PostgreSQL
being away delays only PostgreSQL, which retries with exponential backoff
(0.5 s doubling up to ``backoff_max_s``) and catches up from the table, where
everything waits until every target has it. Only then, and only for windows
the watermark has closed for good, does :meth:`Sink.flush` return keys the
worker deletes from its table.

Exactness: what a target has stored is remembered per key with the source
offset it had; a window that changes again (closed for idleness, then more
events) is written again. After a crash the memory is empty, everything still
in the table is written again, and the upserts make that a no-op.

DuckDB allows one process to open a file for writing and none to read it
meanwhile, so :class:`DuckDBTarget` opens the file for each transaction only
(milliseconds) and :func:`connect_duckdb` (used by ``commpipe query``) waits
out a write in progress instead of failing.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.details import DetailBatch
from pipeline.core.rollups import Rollups, WindowRow
from pipeline.core.slo import SloConfig, load_config
from pipeline.core.store import window_id
from pipeline.errors import ServiceError
from pipeline.settings import Settings, scrub_dsn
from pipeline.sink.sql import Dialect, write_batch
from pipeline.wire.events import edge_key

__all__ = ["DuckDBTarget", "PostgresTarget", "Sink", "Target", "TargetStatus", "build_sink",
           "connect_duckdb"]

log = logging.getLogger("commpipe.sink")

_PG_LOCK = 0x636F6D6D  # "comm": serializes the merge step of sinks on several workers


class Target(ABC):
    """One database the sink writes (blocking calls, run in a thread)."""

    name: str
    dialect: Dialect
    slo: SloConfig | None = None
    """The objectives judged on each stored window (None: the defaults)."""

    @abstractmethod
    def write(self, windows: Sequence[WindowRow], events: Sequence[dict[str, Any]], *,
              lookback_s: float) -> int:
        """Store one batch in one transaction; raise on any failure (nothing half-done)."""

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
                                   slo=self.slo)
        except BaseException:
            self.close()
            raise

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
                                slo=self.slo)
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
            return n
        finally:
            con.close()


@dataclass
class TargetStatus:
    """What one target has stored, and how its flushes go (read by the exporter)."""

    target: Target
    stored: dict[str, int] = field(default_factory=dict)
    """Window key -> source offset of the version stored."""
    stored_details: set[str] = field(default_factory=set)
    flushes: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    rows: int = 0
    events: int = 0
    last_duration_s: float = 0.0
    last_error: str | None = None
    retry_at: float = 0.0


class Sink:
    """Flush rounds over the owned part of the table (see the module docstring)."""

    def __init__(self, rollups: Rollups, targets: Sequence[Target], *, batch_rows: int = 5000,
                 lookback_s: float = 300.0, backoff_max_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic, retain_s: float = 0.0) -> None:
        self.rollups = rollups
        self.retain_s = retain_s
        """Event time a final window stays in the table past its close (no database: the
        only thing that removes it)."""
        self.status = [TargetStatus(t) for t in targets]
        self.batch_rows = batch_rows
        self.lookback_s = lookback_s
        self.backoff_max_s = backoff_max_s
        self._clock = clock

    async def flush(self) -> list[str]:
        """One round for every target not waiting out a failure; returns the table keys
        every target has stored that can no longer change (for the worker to delete at once,
        before it awaits anything: the answer holds for the table as it is on return)."""
        windows = [(window_id(r.partition, edge_key(*r.edge), r.window_start), r)
                   for r in self.rollups.closed_windows()]
        details = self.rollups.details()
        now = self._clock()
        due = [s for s in self.status if s.retry_at <= now]
        await asyncio.gather(*(self._flush_target(s, windows, details) for s in due))
        # each edge's newest closed window stays: the exporter reports from it
        newest: dict[tuple[int, tuple[str, str, str]], float] = {}
        for _, r in windows:
            key = (r.partition, r.edge)
            newest[key] = max(newest.get(key, -math.inf), r.window_start)
        # Judged on the table as it is now, after the last await: the agent kept applying
        # records while the databases wrote, so a window may hold a newer version than the
        # one stored (the caller deletes these keys before it awaits anything).
        done = [k for k, r in windows
                if self.rollups.offset_of(k) == r.stats.offset
                and self.rollups.is_final(r.partition, r.window_end + self.retain_s)
                and r.window_start < newest[(r.partition, r.edge)]
                and all(s.stored.get(k) == r.stats.offset for s in self.status)]
        done += [k for k, _ in details if all(k in s.stored_details for s in self.status)]
        return done

    def forget(self, keys: Sequence[str]) -> None:
        """The worker deleted ``keys`` from its table: stop tracking them."""
        for s in self.status:
            for key in keys:
                s.stored.pop(key, None)
                s.stored_details.discard(key)

    async def _flush_target(self, status: TargetStatus, windows: list[tuple[str, WindowRow]],
                            details: list[tuple[str, DetailBatch]]) -> None:
        present = {k for k, _ in windows}
        status.stored = {k: v for k, v in status.stored.items() if k in present}
        todo_w = [(k, r) for k, r in windows if status.stored.get(k) != r.stats.offset]
        todo_d = [(k, d) for k, d in details if k not in status.stored_details]
        for chunk_d, chunk_w in _chunks(todo_d, todo_w, self.batch_rows):
            events = [e for _, d in chunk_d for e in d.events]
            started = time.perf_counter()
            try:
                await asyncio.to_thread(status.target.write, [r for _, r in chunk_w], events,
                                        lookback_s=self.lookback_s)
            except Exception as e:  # noqa: BLE001 - any failure: keep everything, retry later
                self._failed(status, e, len(todo_w), len(todo_d))
                return
            status.last_duration_s = time.perf_counter() - started
            for k, r in chunk_w:
                status.stored[k] = r.stats.offset
            status.stored_details.update(k for k, _ in chunk_d)
            status.flushes += 1
            status.rows += len(chunk_w)
            status.events += len(events)
            if status.consecutive_failures:
                log.warning("sink %s: stored again after %d failed attempts",
                            status.target.name, status.consecutive_failures)
            status.consecutive_failures = 0
            status.last_error = None

    def _failed(self, status: TargetStatus, exc: Exception, windows: int, batches: int) -> None:
        status.failures += 1
        status.consecutive_failures += 1
        delay = min(0.5 * 2 ** (status.consecutive_failures - 1), self.backoff_max_s)
        status.retry_at = self._clock() + delay
        status.last_error = status.target.describe(exc)
        log.warning("sink %s: flush failed (%s); %d windows and %d event batches wait in the "
                    "table, retrying in %.1f s", status.target.name, status.last_error,
                    windows, batches, delay)

    def close(self) -> None:
        for s in self.status:
            s.target.close()


def _chunks(details: list[tuple[str, DetailBatch]], windows: list[tuple[str, WindowRow]],
            size: int) -> list[tuple[list[tuple[str, DetailBatch]], list[tuple[str, WindowRow]]]]:
    """Transactions of at most ``size`` windows and about ``size`` events (a detail batch
    is never split: it is stored, and remembered, whole)."""
    out: list[tuple[list[Any], list[Any]]] = []
    current: list[tuple[str, DetailBatch]] = []
    n = 0
    for item in details:
        if current and n + len(item[1].events) > size:
            out.append((current, []))
            current, n = [], 0
        current.append(item)
        n += len(item[1].events)
    for i in range(0, len(windows), size):
        out.append((current, windows[i:i + size]))
        current = []
    if current:
        out.append((current, []))
    return out


def build_sink(settings: Settings, rollups: Rollups, slo: SloConfig | None = None) -> Sink:
    """The sink ``settings`` ask for. With neither database it stores nothing and only
    drops windows ``retain_without_sink_s`` of event time behind the watermark (and kept
    events at once), so a metrics-only worker's memory stays bounded."""
    targets: list[Target] = []
    dsn = settings.postgres_conninfo()
    if dsn:
        targets.append(PostgresTarget(dsn, migrate=settings.sink_auto_migrate))
    if settings.duckdb_path:
        targets.append(DuckDBTarget(settings.duckdb_path, migrate=settings.sink_auto_migrate))
    if not targets:
        log.warning("sink: no database configured (COMMPIPE_POSTGRES_DSN, "
                    "COMMPIPE_DUCKDB_PATH): closed windows are dropped %g s after they close",
                    settings.retain_without_sink_s)
        return Sink(rollups, [], retain_s=settings.retain_without_sink_s)
    slo = slo or load_config(settings.slo_file)
    for target in targets:
        target.slo = slo
    return Sink(rollups, targets, batch_rows=settings.sink_batch_rows,
                lookback_s=settings.patterns_lookback_s, backoff_max_s=settings.sink_backoff_max_s)
