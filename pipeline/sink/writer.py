"""The sink: closed windows and kept events, from the worker's table to PostgreSQL and DuckDB.

Each worker runs one :class:`Sink` for the partitions it owns. Every round
(:meth:`Sink.flush`) it asks :class:`~pipeline.core.rollups.Rollups` for closed
windows and kept events (errors, timeouts, retries, health checks, the responses of
retried calls), and gives each target (:mod:`pipeline.sink.targets`) what that
target has not stored yet, in transactions of at most ``batch_rows`` windows
(:func:`pipeline.sink.transaction.write_batch`). Targets are independent: PostgreSQL
being away delays only PostgreSQL, which retries with exponential backoff
(0.5 s doubling up to ``backoff_max_s``) and catches up from the table, where
everything waits until every target has it. Only then, and only for windows
the watermark has closed for good, does :meth:`Sink.flush` return keys the
worker deletes from its table. What waits is bounded (:mod:`pipeline.sink.backlog`):
past ``COMMPIPE_SINK_MAX_BACKLOG`` the worker stops reading (:meth:`Sink.holding`), or
the away database's copy of the oldest windows is given up and counted.

Exactness: what a target has stored is remembered per key with the source
offset it had; a window that changes again (closed for idleness, then more
events) is written again. After a crash the memory is empty, everything still
in the table is written again, and the upserts make that a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.core.details import DetailBatch
from pipeline.core.rollups import Rollups, WindowRow
from pipeline.core.slo import SloConfig, load_config
from pipeline.core.store import SEP, parse_id
from pipeline.core.window import WindowStats
from pipeline.settings import Settings
from pipeline.sink.backlog import Backlog, BacklogLimit
from pipeline.sink.targets import DuckDBTarget, PostgresTarget, Target, connect_duckdb
from pipeline.wire.events import split_edge_key

__all__ = ["DuckDBTarget", "PostgresTarget", "Sink", "Target", "TargetStatus", "build_sink",
           "connect_duckdb"]

log = logging.getLogger("commpipe.sink")

SCAN_LONG_S = 0.05
"""A round's table scans longer than this make the next rounds wait (:meth:`Sink.flush`)."""
SCAN_REST = 4.0

Closed = tuple[str, int, WindowStats, int]
"""A closed window as one round sees it: key, partition, stats, offset when read."""


@dataclass
class TargetStatus:
    """What one target has stored, and how its flushes go (read by the exporter)."""

    target: Target
    stored: dict[str, int] = field(default_factory=dict)
    """Window key -> source offset of the version stored."""
    stored_details: dict[str, int] = field(default_factory=dict)
    """Detail key -> events of the version stored (a replay can put a key again with more
    events: that version is stored too; the events table keeps each event once)."""
    flushes: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    rows: int = 0
    events: int = 0
    last_duration_s: float = 0.0
    last_error: str | None = None
    retry_at: float = 0.0
    abandoned: set[str] = field(default_factory=set)
    """Keys given up for this target (``drop`` policy): they may leave without it."""
    dropped_windows: int = 0
    dropped_events: int = 0

    def has(self, key: str, offset: int) -> bool:
        return self.stored.get(key) == offset or key in self.abandoned

    def has_detail(self, key: str, batch: DetailBatch) -> bool:
        return self.stored_details.get(key) == len(batch.events) or key in self.abandoned


class Sink:
    """Flush rounds over the owned part of the table (see the module docstring)."""

    def __init__(self, rollups: Rollups, targets: Sequence[Target], *, batch_rows: int = 50_000,
                 lookback_s: float = 300.0, backoff_max_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic, retain_s: float = 0.0,
                 backlog: BacklogLimit | None = None) -> None:
        self.rollups = rollups
        self.retain_s = retain_s
        """Event time a final window stays in the table past its close (no database: the
        only thing that removes it)."""
        self.status = [TargetStatus(t) for t in targets]
        self.batch_rows = batch_rows
        self.lookback_s = lookback_s
        self.backoff_max_s = backoff_max_s
        self.backlog = Backlog(backlog)
        self._clock = clock
        self._rest_until = 0.0
        """``time.monotonic()`` before which :meth:`flush` skips its round (see there)."""

    async def flush(self) -> list[str]:
        """One round for every target not waiting out a failure; returns the table keys
        every target has stored that can no longer change (for the worker to delete at once,
        before it awaits anything: the answer holds for the table as it is on return)."""
        # Every round scans the whole table in the event loop: ~50 us per closed window, so
        # with a database away and its backlog in the table, rounds every second would
        # leave the worker no time to read (measured: 20,000 windows waiting, 1 s per round,
        # the worker read 205 windows/s). After a long scan the next rounds are skipped for
        # SCAN_REST times its length, so scanning takes at most ~1/(1 + SCAN_REST) of the
        # loop; small tables are never skipped.
        if time.monotonic() < self._rest_until:
            return []
        began = time.perf_counter()
        windows: list[Closed] = [(k, p, w, w.offset) for k, p, w in self.rollups.closed_items()]
        details = self.rollups.details()
        now = self._clock()
        due = [s for s in self.status if s.retry_at <= now]
        scanned = time.perf_counter() - began
        await asyncio.gather(*(self._flush_target(s, windows, details) for s in due))
        began = time.perf_counter()
        # each edge's newest closed window stays: the exporter reports from it
        newest: dict[str, float] = {}
        heads = [k.rpartition(SEP)[0] for k, _, _, _ in windows]
        for edge, (_, _, w, _) in zip(heads, windows, strict=True):
            if w.window_start > newest.get(edge, -math.inf):
                newest[edge] = w.window_start
        # Judged on the table as it is now, after the last await: the agent kept applying
        # records while the databases wrote, so a window may hold a newer version than the
        # one stored (the caller deletes these keys before it awaits anything). Final as
        # Rollups.is_final(p, end + retain_s) says, with each partition's state read once.
        store = self.rollups.data()
        grace, retain = self.rollups.config.grace_s, self.retain_s
        marks = {p: self.rollups.partition_meta(p) for p in {p for _, p, _, _ in windows}}
        watermark = {p: -math.inf if m is None else m.watermark for p, m in marks.items()}
        final = []
        for edge, (k, p, w, off) in zip(heads, windows, strict=True):
            if (w.window_end + retain) + grace <= watermark[p] and \
                    w.window_start < newest[edge]:
                value = store.get(k)
                if value is not None and value.offset == off:
                    final.append((k, off))
        self._bound(windows, final, details)
        done = [k for k, off in final if all(s.has(k, off) for s in self.status)]
        for k, _ in details:  # the version in the table now, as for windows above
            value = store.get(k)
            if value is not None and all(s.has_detail(k, value) for s in self.status):
                done.append(k)
        scanned += time.perf_counter() - began
        if scanned > SCAN_LONG_S:
            self._rest_until = time.monotonic() + SCAN_REST * scanned
        return done

    def holding(self) -> bool:
        """True while the worker should stop reading its input: past the backlog bound with
        the ``pause`` policy, until the backlog is down to half of it."""
        return self.backlog.holding()

    def removable(self, key: str, window: WindowStats) -> bool:
        """True when ``window`` (the table's, under ``key``) may leave the table: every
        database stored this version of it, and no event can change it any more (the rule
        :meth:`flush` deletes by, without keeping an edge's newest window: for an edge that
        leaves the table, agents/expiry.py)."""
        return (self.rollups.is_final(parse_id(key)[1], window.window_end + self.retain_s)
                and all(s.has(key, window.offset) for s in self.status))

    def forget(self, keys: Sequence[str]) -> None:
        """The worker deleted ``keys`` from its table: stop tracking them."""
        for s in self.status:
            for key in keys:
                s.stored.pop(key, None)
                s.stored_details.pop(key, None)
                s.abandoned.discard(key)

    def _bound(self, windows: list[Closed], final: list[tuple[str, int]],
               details: list[tuple[str, DetailBatch]]) -> None:
        """Count what some target lacks; with ``drop``, give up a failing target's copy of
        the oldest final windows and kept events past the bound."""
        if not self.status:  # nothing to store: nothing lacking
            self.backlog.update(0, 0)
            return
        lacking_w = {k for k, _, _, off in windows if not all(s.has(k, off) for s in self.status)}
        lacking_d = sum(len(d.events) for k, d in details
                        if not all(s.has_detail(k, d) for s in self.status))
        self.backlog.update(len(lacking_w), lacking_d)
        limit = self.backlog.limit
        if limit.policy != "drop" or not limit.max_items:
            return
        for s in self.status:
            if not s.consecutive_failures:
                continue  # up and catching up: it will store them
            mine_w = [(k, off) for k, off in final if not s.has(k, off)]
            mine_d = [(k, d) for k, d in details if not s.has_detail(k, d)]
            excess = len(mine_w) + sum(len(d.events) for _, d in mine_d) - limit.max_items
            if excess <= 0:
                continue
            excess += limit.max_items - limit.low_water
            windows_before, events_before = s.dropped_windows, s.dropped_events
            by_age = {k: w.window_end for k, _, w, _ in windows}
            for k, _ in sorted(mine_w, key=lambda kv: by_age[kv[0]]):
                if excess <= 0:
                    break
                s.abandoned.add(k)
                s.dropped_windows += 1
                excess -= 1
            for k, d in mine_d:  # oldest first (Rollups.details orders by offset)
                if excess <= 0:
                    break
                s.abandoned.add(k)
                s.dropped_events += len(d.events)
                excess -= len(d.events)
            log.warning("sink %s: away with more than %d windows and kept events waiting "
                        "(COMMPIPE_SINK_MAX_BACKLOG); gave up its copy of %d windows and %d "
                        "kept events (COMMPIPE_SINK_BACKLOG_POLICY=drop; %d and %d so far)",
                        s.target.name, limit.max_items, s.dropped_windows - windows_before,
                        s.dropped_events - events_before, s.dropped_windows, s.dropped_events)

    async def _flush_target(self, status: TargetStatus, windows: list[Closed],
                            details: list[tuple[str, DetailBatch]]) -> None:
        if status.consecutive_failures:
            # away last time: find out cheaply before sorting and building every row
            try:
                await asyncio.to_thread(status.target.probe)
            except Exception as e:  # noqa: BLE001 - still away: keep everything, retry later
                lacking = sum(1 for k, _, _, off in windows if not status.has(k, off))
                self._failed(status, e, lacking,
                             sum(1 for k, d in details if not status.has_detail(k, d)))
                return
        present = {k for k, _, _, _ in windows}
        status.stored = {k: v for k, v in status.stored.items() if k in present}
        todo_w = sorted(_row(k, p, w, off) for k, p, w, off in windows
                        if not status.has(k, off))
        todo_d = [(k, d) for k, d in details if not status.has_detail(k, d)]
        for chunk_d, chunk_w in _chunks(todo_d, [(k, (r, off)) for _, k, r, off in todo_w],
                                        self.batch_rows):
            events = [e for _, d in chunk_d for e in d.events]
            started = time.perf_counter()
            try:
                await asyncio.to_thread(status.target.write, [r for _, (r, _) in chunk_w],
                                        events, lookback_s=self.lookback_s)
            except Exception as e:  # noqa: BLE001 - any failure: keep everything, retry later
                self._failed(status, e, len(todo_w), len(todo_d))
                return
            status.last_duration_s = time.perf_counter() - started
            for k, (_, off) in chunk_w:
                status.stored[k] = off
            status.stored_details.update((k, len(d.events)) for k, d in chunk_d)
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


def _row(key: str, partition: int, stats: WindowStats, offset: int
         ) -> tuple[tuple[float, tuple[str, str, str], int], str, WindowRow, int]:
    """A window a target lacks, as a row, with its sort key (start, edge, partition)."""
    edge = split_edge_key(parse_id(key)[2])  # type: ignore[arg-type]
    row = WindowRow(partition, *edge, stats.window_start, stats.window_end, stats)
    return (stats.window_start, edge, partition), key, row, offset


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
        return Sink(rollups, [], retain_s=settings.retain_without_sink_s,
                    backlog=BacklogLimit(0))
    slo = slo or load_config(settings.slo_file)
    for target in targets:
        target.slo = slo
    return Sink(rollups, targets, batch_rows=settings.sink_batch_rows,
                lookback_s=settings.patterns_lookback_s, backoff_max_s=settings.sink_backoff_max_s,
                backlog=BacklogLimit(settings.sink_max_backlog, settings.sink_backlog_policy))
