"""Freshness: from ``emit`` to the event's effect in ``/metrics`` and in SQL.

One real worker (``bench.workers commpipe``) with ``/metrics``, the sink writing to
PostgreSQL and DuckDB, windows of ``WINDOW_S`` = 2 s, grace ``GRACE_S`` = 0.5 s and a
sink round every ``SINK_S`` = 0.5 s. Through the shim (at its default linger, 500 ms) this
process emits background traffic (~1,000 events/s over 20 edges) and, every 100 ms, a
probe: a ``request`` event of the edge ``bench-probe -> fresh``. Probe ``i`` is visible

- in ``/metrics`` once ``commpipe_communication_requests_total`` of that edge is > i
  (scraped every ~10 ms);
- in SQL once the probe's window is in ``communication_rollups`` with its count
  (PostgreSQL polled every ~50 ms, DuckDB via ``pipeline.cli.query.query_duckdb`` every
  ~250 ms; the window is written once the watermark passes its end + grace).

Baselines, same run: for ``/metrics`` a bare aiokafka consumer of the same topic
seeing the probe's record (shim linger + broker: the transport floor); for SQL that
floor plus the wait the window semantics impose (window end + grace - emit time).
Targets (issue 7): p99 < 2 s to ``/metrics``, p99 < window + 2 s = 4 s to SQL.
"""

from __future__ import annotations

import asyncio
import math
import re
import threading
import time
import urllib.request

import orjson

from bench.common import Context, Row, create_topics, percentile, wait_ready, worker_env, workers
from pipeline import Emitter, Settings
from pipeline.cli.query import query_duckdb
from pipeline.sink import migrations

NAME = "freshness"
WINDOW_S, GRACE_S, SINK_S = 2.0, 0.5, 0.5
PROBE = ("bench-probe", "fresh", "http")
SQL = ("SELECT extract(epoch FROM window_start), requests FROM communication_rollups "
       "WHERE source_service = 'bench-probe'")
_REQUESTS = re.compile(r'^commpipe_communication_requests_total\{[^}]*source_service="bench-probe"'
                       r"[^}]*\} (\S+)$", re.MULTILINE)


def _transport_floor(bootstrap: str, topic: str, seen: dict[str, float],
                     stop: threading.Event) -> None:
    """Bare consumer: when each probe's record arrives (by correlation id)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    async def main() -> None:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            consumer.assign([TopicPartition(topic, p) for p in range(4)])
            while not stop.is_set():
                for messages in (await consumer.getmany(timeout_ms=50)).values():
                    for m in messages:
                        if b"bench-probe" in m.value:
                            now = time.time()
                            for e in orjson.loads(m.value):
                                seen.setdefault(e.get("correlation_id", ""), now)
        finally:
            await consumer.stop()

    asyncio.run(main())


def probe_count(port: int) -> int:
    """The probe edge's request count on the worker's ``/metrics`` (0 while unreachable)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:  # noqa: S310
            found = _REQUESTS.search(r.read().decode())
    except OSError:
        return 0
    return int(float(found.group(1))) if found else 0


def _sql_counts(rows: list[tuple[float, int]]) -> dict[float, int]:
    return {round(float(start), 3): int(n) for start, n in rows}


def run(ctx: Context) -> list[Row]:
    probes = ctx.size(150, 40)
    dsn = ctx.postgres_database()
    duckdb_path = str(ctx.workdir / f"fresh-{time.monotonic_ns()}.duckdb")
    migrations.migrate_postgres(dsn)  # the tables exist before the first poll
    migrations.migrate_duckdb(duckdb_path)
    with ctx.broker() as broker:
        topic = "bench.fresh"
        create_topics(broker.bootstrap, [topic, f"{topic}.dlq"])
        env = worker_env(broker.bootstrap, topic, COMMPIPE_WINDOW_S=WINDOW_S,
                         COMMPIPE_GRACE_S=GRACE_S, COMMPIPE_SINK_INTERVAL_S=SINK_S,
                         COMMPIPE_POSTGRES_DSN=dsn, COMMPIPE_DUCKDB_PATH=duckdb_path)
        with workers("commpipe", env, ctx) as procs:
            wait_ready(procs)
            ctx.say(f"freshness: {probes} probes, 10 per second")
            return _probe(ctx, broker.bootstrap, topic, procs[0].port, dsn, duckdb_path, probes)


def _probe(ctx: Context, bootstrap: str, topic: str, port: int, dsn: str, duckdb_path: str,
           probes: int) -> list[Row]:
    import psycopg

    seen: dict[str, float] = {}
    stop = threading.Event()
    floor = threading.Thread(target=_transport_floor, args=(bootstrap, topic, seen, stop),
                             daemon=True)
    floor.start()
    emitter = Emitter(bootstrap, topic, settings=Settings.from_env({}))
    emitted: list[float] = []  # emit time of probe i (= its ts)
    to_metrics: dict[int, float] = {}
    to_sql: dict[str, dict[int, float]] = {"postgres": {}, "duckdb": {}}
    last_pg = last_duck = 0.0
    deadline = time.monotonic() + probes / 10 + 60
    try:
        with psycopg.connect(dsn, autocommit=True) as pg:
            while time.monotonic() < deadline:
                now = time.time()
                if now >= (emitted[-1] + 0.1 if emitted else 0):
                    for k in range(100):  # background: ~1,000 events/s over 20 edges
                        emitter.response(source_service=f"bg{k % 20}", target_service="api",
                                         latency_ms=5.0 + k)
                    emitter.request(source_service=PROBE[0], target_service=PROBE[1],
                                    correlation_id=f"p{len(emitted)}", ts=now)
                    emitted.append(now)
                count = probe_count(port)
                seen_at = time.time()
                for i in range(min(count, probes)):
                    to_metrics.setdefault(i, seen_at)
                if time.monotonic() - last_pg >= 0.05:
                    last_pg = time.monotonic()
                    _visible(emitted, probes, _sql_counts(pg.execute(SQL).fetchall()),
                             to_sql["postgres"])
                if time.monotonic() - last_duck >= 0.25:
                    last_duck = time.monotonic()
                    rows = query_duckdb(duckdb_path, SQL, wait_s=2).rows
                    _visible(emitted, probes, _sql_counts(rows), to_sql["duckdb"])
                if min(len(to_metrics), *(len(v) for v in to_sql.values())) >= probes:
                    break
                time.sleep(0.01)
    finally:
        stop.set()
        emitter.close(timeout=5)
        floor.join(10)
    return _rows(emitted[:probes], to_metrics, to_sql, seen, probes)


def _visible(emitted: list[float], probes: int, windows: dict[float, int],
             out: dict[int, float]) -> None:
    """Mark probes whose window row holds them (a window is written whole, once closed)."""
    now = time.time()
    rank: dict[float, int] = {}
    for i, ts in enumerate(emitted[:probes]):
        start = round(math.floor(ts / WINDOW_S) * WINDOW_S, 3)
        rank[start] = rank.get(start, 0) + 1
        if windows.get(start, 0) >= rank[start]:
            out.setdefault(i, now)


def _rows(emitted: list[float], to_metrics: dict[int, float], to_sql: dict[str, dict[int, float]],
          seen: dict[str, float], probes: int) -> list[Row]:
    def delays_ms(at: dict[int, float]) -> list[float]:
        missing = probes - len(at)
        if missing:
            raise TimeoutError(f"{missing} of {probes} probes never became visible")
        return [1000 * (at[i] - emitted[i]) for i in range(probes)]

    transport = [1000 * (seen[f"p{i}"] - emitted[i]) for i in range(probes) if f"p{i}" in seen]
    window_floor = [1000 * (math.floor(ts / WINDOW_S) * WINDOW_S + WINDOW_S + GRACE_S - ts)
                    + percentile(transport, 0.5) for ts in emitted]
    metrics = delays_ms(to_metrics)
    note = (f"{probes} probes at 10/s beside ~1,000 events/s; window {WINDOW_S:g} s, grace "
            f"{GRACE_S:g} s, sink every {SINK_S:g} s, shim linger "
            f"{Settings().shim_linger_ms:g} ms, worker cache "
            f"{Settings().worker_cache_interval_s:g} s")
    rows = [
        Row(NAME, "emit -> /metrics p50 (ms)", percentile(metrics, 0.5),
            percentile(transport, 0.5), "bare consumer sees the record", note=note),
        Row(NAME, "emit -> /metrics p99 (ms)", percentile(metrics, 0.99),
            percentile(transport, 0.99), "bare consumer sees the record", "< 2,000 ms",
            percentile(metrics, 0.99) < 2000),
    ]
    for db, at in to_sql.items():
        p99 = percentile(delays_ms(at), 0.99)
        rows.append(Row(NAME, f"emit -> SQL p99, {db} (ms)", p99, percentile(window_floor, 0.99),
                        "window end + grace - emit + transport p50", "< 4,000 ms", p99 < 4000))
    return rows
