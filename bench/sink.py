"""Sink: rollup rows/s into PostgreSQL and into DuckDB, beside a plain ``executemany``.

Closed windows of 1,000 edges are built the way the worker builds them
(:class:`pipeline.core.batch.PartitionBatch` over requests, responses with latencies
and retries, read back through :class:`pipeline.core.rollups.Rollups`), then one
:meth:`pipeline.sink.Sink.flush` per database stores them all, as the worker's sink
does: transactions of ``COMMPIPE_SINK_BATCH_ROWS`` (5,000) windows, each upserting
the per-partition parts, reading them back, merging them into
``communication_rollups`` and recomputing ``communication_patterns``.

Baseline, same run, fresh database: ``executemany`` of a plain ``INSERT`` of the same
``communication_rollups`` rows (one statement per row), the way a first attempt writes.
DuckDB's ``executemany`` manages ~200 rows/s, so its baseline writes only the first
``DUCK_BASELINE`` rows (and PostgreSQL's the first ``PG_BASELINE``); rates are per row.
Target (issue 7): >= 100,000 rows/s into each database.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.common import Context, Row, edge_names
from pipeline.core.batch import PartitionBatch
from pipeline.core.rollups import Rollups, WindowRow
from pipeline.core.window import WindowConfig
from pipeline.settings import Settings
from pipeline.sink import migrations
from pipeline.sink.sql import _ROLLUPS, dialect_sql, rollup_values
from pipeline.sink.writer import DuckDBTarget, PostgresTarget, Sink, Target
from pipeline.wire.events import Event

NAME = "sink"
EDGES = 1_000
CONFIG = WindowConfig(size_s=10.0, grace_s=0.0)
KINDS = ("request", "response", "request", "response", "retry")


def closed_windows(rows: int, seed_offset: int = 0) -> Rollups:
    """A store holding ``rows`` closed windows (``rows / EDGES`` of each edge) and one open
    window per edge, as the worker's table would, behind :class:`Rollups`."""
    store: dict[str, Any] = {}
    names = edge_names(EDGES)
    t0 = 1_763_900_000.0 + seed_offset * 1e6
    offset = 0
    for w in range(rows // EDGES + 1):  # the last window stays open: it closes the others
        batch = PartitionBatch(0, CONFIG, store)
        for e, (source, target, protocol) in enumerate(names):
            offset += 1
            ts = t0 + w * CONFIG.size_s + e * 0.001
            events = [Event(kind, f"e{offset}x{i}", f"c{offset}", source, target, protocol,
                            ts + i * 0.01, latency_ms=None if kind != "response" else 3.0 + e % 50,
                            attempt=1 if kind == "retry" else None,
                            backoff_ms=50.0 if kind == "retry" else None)
                      for i, kind in enumerate(KINDS)]
            batch.apply(offset, events, record_ts=t0 + 1e6, now=t0 + 1e6)
        store.update(batch.changes())
    rollups = Rollups(store, CONFIG, idle_close_s=1e12, clock=lambda: t0)
    assert len(rollups.closed_windows()) == rows // EDGES * EDGES
    return rollups


def sink_rate(target: Target, rollups: Rollups) -> float:
    """Rows/s of one sink round storing every closed window (the worker's own path)."""
    sink = Sink(rollups, [target], batch_rows=Settings().sink_batch_rows)
    started = time.perf_counter()
    asyncio.run(sink.flush())
    elapsed = time.perf_counter() - started
    status = sink.status[0]
    wanted = len(rollups.closed_windows())
    if status.rows != wanted:
        raise RuntimeError(f"sink {target.name} stored {status.rows} of {wanted} windows: "
                           f"{status.last_error}")
    return wanted / elapsed


def insert_sql(dialect: str) -> str:
    values = ", ".join("to_timestamp(%s)" if how == "ts" else "%s::{json}" if how == "json"
                       else "%s" for _, _, how in _ROLLUPS)
    sql = (f"INSERT INTO communication_rollups ({', '.join(c for c, _, _ in _ROLLUPS)}) "
           f"VALUES ({values})")
    return dialect_sql(sql, dialect)  # type: ignore[arg-type]


def executemany_rate(dialect: str, where: str, windows: list[WindowRow]) -> float:
    rows = [rollup_values(w.window_start, w.window_end, w.edge, w.stats, 1) for w in windows]
    sql = insert_sql(dialect)
    if dialect == "postgres":
        import psycopg

        with psycopg.connect(where) as conn:
            started = time.perf_counter()
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(sql, rows)
            return len(rows) / (time.perf_counter() - started)
    import duckdb

    con = duckdb.connect(where)
    try:
        started = time.perf_counter()
        con.execute("BEGIN TRANSACTION")
        con.executemany(sql, rows)
        con.execute("COMMIT")
        return len(rows) / (time.perf_counter() - started)
    finally:
        con.close()


def run(ctx: Context) -> list[Row]:
    n = ctx.size(50_000, 10_000)
    pg_base, duck_base = ctx.size(20_000, 5_000), ctx.size(1_000, 200)
    rollups = closed_windows(n)
    windows = rollups.closed_windows()
    warm = closed_windows(EDGES, seed_offset=1)  # connect, check the schema, warm caches
    pg_ours, pg_plain = ctx.postgres_database(), ctx.postgres_database()
    duck_ours, duck_plain = (str(ctx.workdir / f"sink-{k}-{time.monotonic_ns()}.duckdb")
                             for k in ("ours", "plain"))
    for dsn in (pg_ours, pg_plain):
        migrations.migrate_postgres(dsn)
    for path in (duck_ours, duck_plain):
        migrations.migrate_duckdb(path)
    ctx.say(f"sink: {n:,} windows into PostgreSQL")
    pg_target = PostgresTarget(pg_ours)
    sink_rate(pg_target, warm)
    pg = sink_rate(pg_target, rollups)
    pg_plain_rate = executemany_rate("postgres", pg_plain, windows[:pg_base])
    ctx.say(f"sink: {n:,} windows into DuckDB")
    duck_target = DuckDBTarget(duck_ours)
    sink_rate(duck_target, warm)
    duck = sink_rate(duck_target, rollups)
    pg_target.close()
    duck_plain_rate = executemany_rate("duckdb", duck_plain, windows[:duck_base])
    note = (f"{n:,} windows of {EDGES:,} edges, transactions of 5,000; executemany of the "
            f"first {pg_base:,} (PostgreSQL) / {duck_base:,} (DuckDB) rows")
    return [
        Row(NAME, "rollup rows/s, PostgreSQL", pg, pg_plain_rate, "plain INSERT executemany",
            ">= 100,000", pg >= 100_000, note),
        Row(NAME, "rollup rows/s, DuckDB", duck, duck_plain_rate, "plain INSERT executemany",
            ">= 100,000", duck >= 100_000),
    ]
