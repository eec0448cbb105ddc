"""The sink on the real broker, a real worker, the real PostgreSQL and a real DuckDB file.

Known events go in through the shim; every rollup row, every pattern and the
health analysis are computed here from the events themselves (plain sums,
sorted lists for exact quantiles, the specification's scoring written out) and
must match in both databases. Then the faults: a worker killed mid-run, and
PostgreSQL stopped mid-run; nothing may be lost or counted twice.
"""

from __future__ import annotations

import asyncio
import math
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest

from pipeline import Emitter, Settings
from pipeline.cli.query import query_duckdb
from pipeline.core.sketch import ALPHA
from pipeline.errors import CommpipeError
from tests.integration.traffic import (
    GRACE,
    LEGACY,
    WINDOW,
    Expected,
    breaker_entries,
    emit_all,
    produce_legacy,
    traffic,
)
from tests.integration.workers import WorkerProcess, wait_until, worker_environment, worker_starter

pytestmark = pytest.mark.integration

TRIPPED = ("checkout", "fraud", "grpc")  # ends with three failures: its breaker is open
ROLLUP_SQL = """
SELECT extract(epoch FROM window_start), source_service, target_service, protocol,
       extract(epoch FROM window_end), requests, responses, errors, timeouts, retries,
       retry_backoff_ms, late_events, payload_bytes, latency_count, latency_sum_ms,
       latency_min_ms, latency_p50_ms, latency_p90_ms, latency_p95_ms, latency_p99_ms,
       latency_max_ms, error_ratio, circuit_state, errors_by_type, latency_sketch, partitions
FROM communication_rollups ORDER BY 1, 2, 3, 4"""
PATTERN_SQL = """
SELECT source_service, target_service, protocol, communication_type, avg_latency_ms,
       success_rate, throughput_rps, error_rate, retry_count, circuit_breaker_state,
       extract(epoch FROM last_health_check)
FROM communication_patterns ORDER BY 1, 2, 3"""
HEALTH_SQL = "SELECT * FROM analyze_communication_health()"
CHECKS_SQL = """
SELECT service_name, checked_by, status, extract(epoch FROM checked_at),
       extract(epoch FROM recovered_at)
FROM communication_health_checks ORDER BY 1, 2, 4"""
EVENTS_SQL = """
SELECT source_service, target_service, event_type, error_type, extract(epoch FROM occurred_at),
       attempt, CAST(backoff_ms AS DOUBLE PRECISION)
FROM communication_events ORDER BY 1, 2, 5, 3"""


def _norm(value: Any) -> Any:
    """JSON columns as Python values (DuckDB returns the text, psycopg the parsed value)."""
    return orjson.loads(value) if isinstance(value, str) else value


def _epoch(value: Any) -> float | None:
    return None if value is None else float(value)


def _same_times(got: list[tuple[Any, ...]], want: list[tuple[Any, ...]]) -> None:
    """Rows equal, with timestamps (floats) equal to the microsecond the databases keep."""
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert len(g) == len(w), (g, w)
        for a, b in zip(g, w, strict=True):
            assert a == pytest.approx(b, abs=2e-6) if isinstance(b, float) else a == b, (g, w)


class Databases:
    def __init__(self, dsn: str, duckdb_path: str) -> None:
        self.dsn = dsn
        self.duckdb_path = duckdb_path

    def pg(self, sql: str) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn) as conn:
            return [tuple(r) for r in conn.execute(sql).fetchall()]  # type: ignore[arg-type]

    def duck(self, sql: str) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in query_duckdb(self.duckdb_path, sql).rows]

    def both(self, sql: str) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        return self.pg(sql), self.duck(sql)

    def rollups(self, which: str) -> list[tuple[Any, ...]]:
        rows = (self.pg if which == "pg" else self.duck)(ROLLUP_SQL)
        return [(_epoch(r[0]), *r[1:4], _epoch(r[4]), *r[5:23], _norm(r[23]), _norm(r[24]),
                 r[25]) for r in rows]

    def count(self, which: str, table: str) -> int:
        try:
            rows = (self.pg if which == "pg" else self.duck)(f"SELECT count(*) FROM {table}")
        except (psycopg.Error, CommpipeError):
            return -1
        return int(rows[0][0])


def _round2(x: Decimal | float) -> Decimal:
    return Decimal(repr(x) if isinstance(x, float) else x).quantize(Decimal("0.01"),
                                                                     rounding=ROUND_HALF_UP)


def make_traffic(seed: int) -> tuple[list[dict[str, Any]], list[list[dict[str, Any]]]]:
    """Recent traffic (health checks must fall in the analysis' last hour) plus an edge
    whose breaker ends open; and unkeyed single-event records of a non-shim producer."""
    t0 = math.floor(time.time() / WINDOW) * WINDOW - 600
    phases, legacy = traffic(random.Random(seed), t0)
    s, t, p = TRIPPED
    last = t0 + (len(phases) - 1) * WINDOW
    phases[-1].extend([{"kind": "request", "source_service": s, "target_service": t,
                        "protocol": p, "ts": last + 1.0}]
                      + [{"kind": "error", "source_service": s, "target_service": t,
                          "protocol": p, "error_type": "http_5xx", "latency_ms": 20.0 + i,
                          "ts": last + 2.0 + i * 0.1} for i in range(3)])
    return legacy, phases


def check_rollups(expected: Expected, db: Databases) -> None:
    pg, duck = db.rollups("pg"), db.rollups("duck")
    assert pg == duck  # identical rows in both databases
    keys = sorted(expected.counts)
    assert [(r[0], tuple(r[1:4])) for r in pg] == keys
    for row, key in zip(pg, keys, strict=True):
        start, edge = key
        c = expected.counts[key]
        values = sorted(expected.latencies[key])
        failed = c["error"] + c["timeout"]
        assert row[4] == start + WINDOW
        assert row[5:13] == (c["request"], c["response"], c["error"], c["timeout"], c["retry"],
                             pytest.approx(expected.backoff[key]), expected.late[key],
                             expected.payload[key]), key
        assert row[13] == len(values), key
        assert row[21] == failed / max(c["response"] + failed, 1), key
        assert row[23] == dict(expected.errors[key]), key
        # the shim keys by edge: one partition owns each edge; the legacy producer's
        # unkeyed records spread its edge over all four, merged into one row
        assert row[25] == (4 if edge == LEGACY else 1), key
        if not values:
            assert row[14:21] == (0.0, None, None, None, None, None, None), key
            continue
        assert row[14] == pytest.approx(sum(values)), key
        assert (row[15], row[20]) == (values[0], values[-1]), key
        for q, got in zip((0.5, 0.9, 0.95, 0.99), row[16:20], strict=True):
            exact = values[math.floor(q * (len(values) - 1))]
            assert abs(got - exact) <= ALPHA * exact + 1e-9, (key, q)
        assert row[24]["count"] == len(values)  # the sketch itself, re-mergeable


def expected_patterns(expected: Expected) -> list[tuple[Any, ...]]:
    by_edge: dict[tuple[str, str, str], list[tuple[float, tuple[str, str, str]]]] = defaultdict(
        list)
    for key in expected.counts:
        by_edge[key[1]].append(key)
    checks = defaultdict(list)
    for e in expected.events:
        if e["kind"] == "health":
            checks[(e["source_service"], e["target_service"])].append(e["ts"])
    out = []
    for edge, keys in sorted(by_edge.items()):
        n = {k: sum(expected.counts[key][k] for key in keys)
             for k in ("request", "response", "error", "timeout", "retry")}
        latencies = [v for key in keys for v in expected.latencies[key]]
        failed = n["error"] + n["timeout"]
        outcomes = n["response"] + failed
        error_rate = _round2(100.0 * failed / outcomes) if outcomes else Decimal("0.00")
        span = max(k[0] for k in keys) + WINDOW - min(k[0] for k in keys)
        reported = [e["circuit_state"] for e in expected.events
                    if e["kind"] == "circuit" and (e["source_service"], e["target_service"],
                                                   e["protocol"]) == edge]
        state = reported[-1] if reported else breaker_entries(expected.outcomes[edge])[0]
        last_check = max(checks[edge[:2]], default=None)
        out.append((*edge, "asynchronous" if edge[2] in ("amqp", "kafka") else "synchronous",
                    _round2(sum(latencies) / len(latencies)) if latencies else Decimal("0.00"),
                    Decimal("100.00") - error_rate, _round2(n["request"] / span), error_rate,
                    n["retry"], state, last_check))
    return out


def expected_health(patterns: list[tuple[Any, ...]], expected: Expected) -> list[tuple[Any, ...]]:
    """The specification's analyze_communication_health(), written out."""
    unhealthy = {e["target_service"] for e in expected.events
                 if e["kind"] == "health" and e["health_status"] != "healthy"}
    rows = []
    for service in sorted({p[0] for p in patterns}):
        mine = [p for p in patterns if p[0] == service]
        lat = _round2(sum(p[4] for p in mine) / len(mine))
        err = _round2(sum(p[7] for p in mine) / len(mine))
        score = ("95.00" if lat < 50 and err < Decimal("0.1") else
                 "80.00" if lat < 100 and err < Decimal("0.5") else
                 "65.00" if lat < 200 and err < 1 else "40.00")
        issues = (["CIRCUIT_BREAKER_OPEN"] if any(p[9] == "open" for p in mine) else []) + (
            ["HEALTH_CHECK_FAILURES"] if service in unhealthy else [])
        recs = (["OPTIMIZE_LATENCY"] if lat > 100 else []) + (
            ["IMPROVE_ERROR_HANDLING"] if err > Decimal("0.5") else [])
        rows.append((service, Decimal(score), lat, err, issues, recs))
    return rows


def check_details(expected: Expected, db: Databases) -> None:
    # (the shim's timeout() stamps error_type "timeout"; the traffic's retries have none)
    want_events = sorted((e["source_service"], e["target_service"], e["kind"],
                          e.get("error_type", "timeout" if e["kind"] == "timeout" else None),
                          e["ts"], e.get("attempt"), e.get("backoff_ms"))
                         for e in expected.events if e["kind"] in ("error", "timeout", "retry"))
    assert {w[2] for w in want_events} == {"error", "timeout", "retry"}
    pg, duck = db.both(EVENTS_SQL)
    for rows in (pg, duck):
        _same_times(sorted((*r[:4], _epoch(r[4]), *r[5:]) for r in rows), want_events)
    checks = sorted((e["target_service"], e["source_service"], e["health_status"], e["ts"])
                    for e in expected.events if e["kind"] == "health")
    want_checks = []
    for service, by, status, ts in checks:
        later = [c[3] for c in checks if c[0] == service and c[2] == "healthy" and c[3] > ts]
        recovered = min(later) if status != "healthy" and later else None
        want_checks.append((service, by, status, ts, recovered))
    for rows in db.both(CHECKS_SQL):
        _same_times(sorted((*r[:3], _epoch(r[3]), _epoch(r[4])) for r in rows),
                           want_checks)


def check_all(expected: Expected, db: Databases) -> None:
    check_rollups(expected, db)
    patterns = expected_patterns(expected)
    for rows in db.both(PATTERN_SQL):
        _same_times([(*r[:10], _epoch(r[10])) for r in rows], patterns)
    health = expected_health(patterns, expected)
    pg, duck = db.both(HEALTH_SQL)
    assert [(*r[:4], list(r[4]), list(r[5])) for r in pg] == health
    assert [(*r[:4], list(r[4]), list(r[5])) for r in duck] == health
    check_details(expected, db)


def wait_for_rows(db: Databases, which: str, expected: Expected, worker: Callable[[], str],
                  timeout: float = 120) -> None:
    want = len(expected.counts)
    total = sum(c["request"] for c in expected.counts.values())

    def done() -> bool:
        if db.count(which, "communication_rollups") != want:
            return False
        rows = db.rollups(which)
        return sum(r[5] for r in rows) == total

    wait_until(done, timeout=timeout, what=f"{want} rollup rows in {which}", logs=worker)


@pytest.fixture
def db(pg_database: str, tmp_path: Path) -> Databases:
    return Databases(pg_database, str(tmp_path / "commpipe.duckdb"))


@pytest.fixture
def sink_env(kafka_bootstrap: str, topic_factory: Callable[..., str], tmp_path: Path,
             db: Databases) -> dict[str, str]:
    return worker_environment(
        kafka_bootstrap, topic_factory, tmp_path, window_s=WINDOW, grace_s=GRACE,
        idle_close_s=3, COMMPIPE_POSTGRES_DSN=db.dsn, COMMPIPE_DUCKDB_PATH=db.duckdb_path,
        COMMPIPE_PATTERNS_LOOKBACK_S="3600", COMMPIPE_SINK_INTERVAL_S="0.5",
        COMMPIPE_SINK_BACKOFF_MAX_S="2")


@pytest.fixture
def workers(sink_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[[], WorkerProcess]]:
    with worker_starter(sink_env, tmp_path) as start:
        yield start


def _emitter(env: dict[str, str]) -> Emitter:
    return Emitter(env["COMMPIPE_KAFKA_BOOTSTRAP"], env["COMMPIPE_TOPIC"],
                   settings=Settings.from_env({}, shim_linger_ms=5))


class Readers:
    """Users querying the DuckDB file in a loop while the sink writes it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.reads = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            if Path(self.path).exists():
                try:
                    query_duckdb(self.path, "SELECT count(*) FROM communication_rollups")
                    self.reads += 1
                except CommpipeError as e:
                    if "communication_rollups" not in str(e):  # not yet migrated: fine
                        self.errors.append(str(e))
            time.sleep(0.02)

    def __enter__(self) -> Readers:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def test_every_row_in_both_databases_while_users_query(
        sink_env: dict[str, str], workers: Callable[[], WorkerProcess], db: Databases) -> None:
    legacy, phases = make_traffic(21)
    expected = Expected()
    worker = workers()
    emitter = _emitter(sink_env)
    with Readers(db.duckdb_path) as readers:
        try:
            for i, events in enumerate(phases):
                emit_all(emitter, events, expected)
                if i == 1:
                    asyncio.run(produce_legacy(sink_env["COMMPIPE_KAFKA_BOOTSTRAP"],
                                               sink_env["COMMPIPE_TOPIC"], legacy))
                    for event in legacy:
                        expected.add(event)
        finally:
            emitter.close()
        wait_for_rows(db, "pg", expected, worker.log)
        wait_for_rows(db, "duck", expected, worker.log)
    assert readers.errors == []
    assert readers.reads > 20
    check_all(expected, db)
    # a second worker round changes nothing: the sink stored each key once
    before = db.both(ROLLUP_SQL.replace("SELECT", "SELECT updated_at,", 1))
    time.sleep(2.0)
    assert db.both(ROLLUP_SQL.replace("SELECT", "SELECT updated_at,", 1)) == before
    assert worker.alive


def test_worker_killed_mid_run_neither_loses_nor_doubles(
        sink_env: dict[str, str], workers: Callable[[], WorkerProcess], db: Databases) -> None:
    _, phases = make_traffic(22)
    expected = Expected()
    first = workers()
    emitter = _emitter(sink_env)
    try:
        for events in phases[:2]:
            emit_all(emitter, events, expected)
        wait_until(lambda: db.count("pg", "communication_rollups") > 0, timeout=90,
                   what="the first rows in PostgreSQL", logs=first.log)
        first.kill()
        for events in phases[2:]:
            emit_all(emitter, events, expected)
    finally:
        emitter.close()
    second = workers()
    wait_for_rows(db, "pg", expected, second.log)
    wait_for_rows(db, "duck", expected, second.log)
    check_all(expected, db)


def test_postgres_away_delays_but_loses_nothing(
        sink_env: dict[str, str], workers: Callable[[], WorkerProcess], db: Databases,
        postgres: Any) -> None:
    _, phases = make_traffic(23)
    expected = Expected()
    worker = workers()
    emitter = _emitter(sink_env)
    try:
        emit_all(emitter, phases[0], expected)
        wait_until(lambda: db.count("pg", "communication_rollups") > 0, timeout=90,
                   what="the first rows in PostgreSQL", logs=worker.log)
        postgres.stop()
        for events in phases[1:]:
            emit_all(emitter, events, expected)
        # DuckDB goes on without PostgreSQL
        wait_for_rows(db, "duck", expected, worker.log)
        assert db.count("pg", "communication_rollups") == -1
        time.sleep(2.0)  # a few failed rounds with backoff
        postgres.start()
    finally:
        emitter.close()
    wait_for_rows(db, "pg", expected, worker.log)
    check_all(expected, db)
    log = worker.log()
    assert "sink postgres: flush failed" in log
    assert "stored again after" in log
    assert worker.alive
