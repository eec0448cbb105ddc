"""Sink: windows/s into PostgreSQL and into DuckDB, beside a plain ``executemany`` and a
COPY of the same rows.

Closed windows of 1,000 edges are built the way the worker builds them
(:class:`pipeline.core.batch.PartitionBatch` over requests, responses with latencies
and retries, read back through :class:`pipeline.core.rollups.Rollups`), then one
:meth:`pipeline.sink.Sink.flush` per database stores them all, as the worker's sink
does: transactions of ``COMMPIPE_SINK_BATCH_ROWS`` windows, each storing every kept
event (one retry per window here), every part, the rollups and objectives
(``communication_slo``, 3.5 rows per window here) and the patterns of the touched edges.

Baselines, same run, each into a fresh database, of the same ``communication_rollups``
rows only (no parts, events, objectives or patterns), in one transaction:

- ``executemany`` of a plain ``INSERT`` (one statement per row), the way a first attempt
  writes. DuckDB's manages ~200 rows/s, so it writes only the first ``duck_base`` rows
  (PostgreSQL's the first ``pg_base``); rates are per row.
- COPY: PostgreSQL ``COPY communication_rollups FROM STDIN`` (text format, timestamps
  converted to ``datetime`` first, the conversion timed too); DuckDB ``COPY
  communication_rollups FROM`` a CSV file the same rows were written to (timed too).

Target (issue 19): >= 100,000 windows/s into each database, objectives included.
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
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


def copy_rate(dialect: str, where: str, windows: list[WindowRow], workdir: Any) -> float:
    """Rows/s of a COPY of the rollup rows (see the module docstring)."""
    rows = [rollup_values(w.window_start, w.window_end, w.edge, w.stats, 1) for w in windows]
    names = ", ".join(c for c, _, _ in _ROLLUPS)
    times = [i for i, (_, _, how) in enumerate(_ROLLUPS) if how == "ts"]
    if dialect == "postgres":
        import psycopg

        with psycopg.connect(where) as conn:
            started = time.perf_counter()
            with conn.transaction(), conn.cursor() as cur, cur.copy(
                    f"COPY communication_rollups ({names}) FROM STDIN") as copy:
                for row in rows:
                    values = list(row)
                    for i in times:
                        values[i] = dt.datetime.fromtimestamp(values[i], dt.UTC)
                    copy.write_row(values)
            return len(rows) / (time.perf_counter() - started)
    import duckdb

    path = workdir / f"rollups-{time.monotonic_ns()}.csv"
    con = duckdb.connect(where)
    try:
        started = time.perf_counter()
        with open(path, "w", newline="") as f:
            out = csv.writer(f)
            for row in rows:
                values = list(row)
                for i in times:
                    values[i] = dt.datetime.fromtimestamp(values[i], dt.UTC).isoformat()
                out.writerow(["" if v is None else v for v in values])
        con.execute(f"COPY communication_rollups ({names}) FROM '{path}' (HEADER false, "
                    "NULLSTR '')")
        return len(rows) / (time.perf_counter() - started)
    finally:
        con.close()
        path.unlink(missing_ok=True)


def run(ctx: Context) -> list[Row]:
    from agents import memory

    with memory.tuned():  # as in the worker, whose sink this is
        return _run(ctx)


def _run(ctx: Context) -> list[Row]:
    n = ctx.size(50_000, 10_000)
    pg_base, duck_base = ctx.size(20_000, 5_000), ctx.size(1_000, 200)
    rollups = closed_windows(n)
    windows = rollups.closed_windows()
    warm = closed_windows(EDGES, seed_offset=1)  # connect, check the schema, warm caches
    pg_ours, pg_plain, pg_copy = (ctx.postgres_database() for _ in range(3))
    duck_ours, duck_plain, duck_copy = (
        str(ctx.workdir / f"sink-{k}-{time.monotonic_ns()}.duckdb")
        for k in ("ours", "plain", "copy"))
    for dsn in (pg_ours, pg_plain, pg_copy):
        migrations.migrate_postgres(dsn)
    for path in (duck_ours, duck_plain, duck_copy):
        migrations.migrate_duckdb(path)
    ctx.say(f"sink: {n:,} windows into PostgreSQL")
    pg_target = PostgresTarget(pg_ours)
    sink_rate(pg_target, warm)
    pg = sink_rate(pg_target, rollups)
    pg_plain_rate = executemany_rate("postgres", pg_plain, windows[:pg_base])
    pg_copy_rate = copy_rate("postgres", pg_copy, windows, ctx.workdir)
    ctx.say(f"sink: {n:,} windows into DuckDB")
    duck_target = DuckDBTarget(duck_ours)
    sink_rate(duck_target, warm)
    duck = sink_rate(duck_target, rollups)
    pg_target.close()
    duck_plain_rate = executemany_rate("duckdb", duck_plain, windows[:duck_base])
    duck_copy_rate = copy_rate("duckdb", duck_copy, windows, ctx.workdir)
    batch = Settings().sink_batch_rows
    note = (f"{n:,} windows of {EDGES:,} edges, each with its part, ~3.5 objectives and a "
            f"kept retry event, transactions of {batch:,}; executemany of the first "
            f"{pg_base:,} (PostgreSQL) / {duck_base:,} (DuckDB) rollup rows; COPY of all "
            f"{n:,} rollup rows")
    return [
        Row(NAME, "windows/s, PostgreSQL", pg, pg_plain_rate, "plain INSERT executemany",
            ">= 100,000", pg >= 100_000, note),
        Row(NAME, "windows/s, PostgreSQL vs COPY", pg, pg_copy_rate,
            "COPY of the rollup rows alone", ">= 100,000", pg >= 100_000),
        Row(NAME, "windows/s, DuckDB", duck, duck_plain_rate, "plain INSERT executemany",
            ">= 100,000", duck >= 100_000),
        Row(NAME, "windows/s, DuckDB vs COPY", duck, duck_copy_rate,
            "COPY FROM a CSV of the rollup rows", ">= 100,000", duck >= 100_000),
    ]
