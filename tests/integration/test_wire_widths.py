"""Every column of both schemas holds everything the wire format accepts.

The limits are not written here by hand: they are found by asking the decoder itself
(:func:`pipeline.wire.decode.validate_event`) for the longest string, the largest number
it accepts in each field. Events at those limits then go the real way: the worker's
aggregation (:class:`pipeline.core.batch.PartitionBatch`), the sink
(:class:`pipeline.sink.writer.Sink`) and its PostgreSQL and DuckDB targets, and every
value must come back as it went in. A column too narrow (``protocol VARCHAR(20)`` against
a 32-character protocol) made the PostgreSQL sink fail and retry for ever.
"""

from __future__ import annotations

import asyncio
import math
from decimal import Decimal
from typing import Any

import duckdb
import psycopg
import pytest

from pipeline.core.batch import PartitionBatch
from pipeline.core.rollups import Rollups
from pipeline.core.window import WindowConfig
from pipeline.errors import EventValidationError
from pipeline.sink.migrations import migrate_duckdb, migrate_postgres
from pipeline.sink.writer import DuckDBTarget, PostgresTarget, Sink
from pipeline.wire import decode
from pipeline.wire.decode import validate_event
from pipeline.wire.events import Event

pytestmark = pytest.mark.integration

T0 = 1_763_900_000.0
CFG = WindowConfig(size_s=10.0, grace_s=5.0)


def _base(kind: str = "error", **fields: Any) -> dict[str, Any]:
    event: dict[str, Any] = {"v": 1, "kind": kind, "event_id": "e1", "correlation_id": "c1",
                             "source_service": "a", "target_service": "b", "protocol": "http",
                             "ts": T0}
    event.update(fields)
    return event


def _accepts(**fields: Any) -> bool:
    try:
        validate_event(_base(**fields))
    except EventValidationError:
        return False
    return True


def longest(field: str, char: str) -> int:
    """The longest run of ``char`` the decoder accepts in ``field``."""
    accepted = [n for n in range(1, 4097) if _accepts(**{field: char * n})]
    assert accepted and accepted[-1] < 4096, field
    return accepted[-1]


def largest_int(field: str) -> int:
    """The largest integer the decoder accepts in ``field`` (doubling, then bisection)."""
    high = 1
    while _accepts(**{field: high * 2}):
        high *= 2
        assert high < 2**62, field
    low, high = high, high * 2  # low accepted, high refused
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if _accepts(**{field: mid}) else (low, mid)
    return low


def largest_ms(field: str) -> float:
    """The largest duration the decoder accepts: its constant, checked to be the edge."""
    assert _accepts(**{field: decode.MS_MAX})
    assert not _accepts(**{field: math.nextafter(decode.MS_MAX, math.inf)})
    return decode.MS_MAX


LIMITS = {name: longest(name, char) for name, char in [
    ("source_service", "s"), ("target_service", "t"), ("protocol", "p"), ("method", "é"),
    ("error_type", "e"), ("check_type", "k"), ("error_message", "é"),
    ("correlation_id", "c"), ("event_id", "i"), ("trace_id", "a"), ("span_id", "b"),
    ("parent_span_id", "b")]}


def widest_events() -> list[Event]:
    """An error, a retry, a retried call's response and a health check of one edge, every
    field at the decoder's limit."""
    edge = {"source_service": "s" * LIMITS["source_service"],
            "target_service": "t" * LIMITS["target_service"],
            "protocol": "p" * LIMITS["protocol"]}
    common = {**edge, "method": "é" * LIMITS["method"], "trace_id": "a" * LIMITS["trace_id"],
              "span_id": "b" * LIMITS["span_id"], "ts": T0 + 1}
    longest_id = "i" * (LIMITS["event_id"] - 1)
    wire = [
        _base("error", **common, event_id=longest_id + "1",
              correlation_id="c" * LIMITS["correlation_id"],
              error_type="e" * LIMITS["error_type"], latency_ms=largest_ms("latency_ms"),
              status_code=largest_int("status_code"),
              error_message="é" * LIMITS["error_message"],
              attempt=largest_int("attempt")),
        _base("retry", **common, event_id=longest_id + "2", attempt=largest_int("attempt"),
              backoff_ms=largest_ms("backoff_ms"), error_type="e" * LIMITS["error_type"]),
        _base("response", **common, event_id=longest_id + "3",
              latency_ms=largest_ms("latency_ms"), status_code=largest_int("status_code"),
              payload_size=largest_int("payload_size"), attempt=largest_int("attempt")),
        _base("health", **common, event_id=longest_id + "4",
              check_type="k" * LIMITS["check_type"], health_status="unhealthy",
              latency_ms=largest_ms("latency_ms")),
    ]
    return [validate_event(e) for e in wire]


def test_the_probed_limits_are_the_documented_ones() -> None:
    """(So that a probe gone wrong cannot make the test below weaker.)"""
    assert LIMITS == {"source_service": 100, "target_service": 100, "protocol": 32,
                      "method": 200, "error_type": 100, "check_type": 100,
                      "error_message": 1024, "correlation_id": 128, "event_id": 64,
                      "trace_id": 32, "span_id": 16, "parent_span_id": 16}


def test_events_at_every_wire_limit_are_stored_whole_in_both_databases(
        pg_database: str, duckdb_path: str) -> None:
    migrate_postgres(pg_database)
    migrate_duckdb(duckdb_path)
    events = widest_events()
    store: dict[str, Any] = {}
    batch = PartitionBatch(0, CFG, store)
    batch.apply(1, events, record_ts=1e12, now=1e12)
    store.update(batch.changes())
    targets = [PostgresTarget(pg_database), DuckDBTarget(duckdb_path)]
    sink = Sink(Rollups(store, CFG, idle_close_s=0.0, clock=lambda: 1e12), targets)
    try:
        asyncio.run(sink.flush())
    finally:
        for target in targets:
            target.close()
    assert [(s.failures, s.last_error) for s in sink.status] == [(0, None), (0, None)]

    stored = [e for e in events if e.kind != "health"]
    want_events = sorted(
        (e.event_id, e.correlation_id, e.source_service, e.target_service, e.kind, e.protocol,
         e.method, e.payload_size, None if e.latency_ms is None else Decimal(
             f"{e.latency_ms:.2f}"), e.status_code, e.error_type, e.error_message, e.attempt,
         None if e.backoff_ms is None else Decimal(f"{e.backoff_ms:.2f}"), e.trace_id,
         e.span_id) for e in stored)
    (health,) = [e for e in events if e.kind == "health"]
    want_check = [(health.event_id, health.target_service, health.source_service,
                   health.method, health.check_type, health.health_status)]
    edge = (events[0].source_service, events[0].target_service, events[0].protocol)
    events_sql = ("SELECT event_id, correlation_id, source_service, target_service, event_type,"
                  " protocol, method, payload_size, latency_ms, status_code, error_type, "
                  "error_message, attempt, backoff_ms, trace_id, span_id "
                  "FROM communication_events ORDER BY event_id")
    checks_sql = ("SELECT event_id, service_name, checked_by, endpoint, check_type, status "
                  "FROM communication_health_checks")
    edges_sql = {t: f"SELECT source_service, target_service, protocol FROM {t}"
                 for t in ("communication_rollups", "communication_rollup_parts",
                           "communication_patterns")}
    with psycopg.connect(pg_database) as pg, duckdb.connect(duckdb_path) as dk:
        for name, run in (("PostgreSQL", lambda q: [tuple(r) for r in pg.execute(q)]),
                          ("DuckDB", lambda q: dk.execute(q).fetchall())):
            assert run(events_sql) == want_events, name
            assert run(checks_sql) == want_check, name
            for table, sql in edges_sql.items():
                assert run(sql) == [edge], (name, table)


# Columns with a length limit, and the wire field whose values they hold (None: values that
# do not come from an event's text, each with why). A new limited column fails this test
# until it is listed here, and a listed one until it is wide enough.
FROM_WIRE = {
    "source_service": "source_service", "target_service": "target_service",
    "protocol": "protocol", "event_id": "event_id", "correlation_id": "correlation_id",
    "method": "method", "error_type": "error_type", "trace_id": "trace_id",
    "span_id": "span_id", "parent_span_id": "parent_span_id", "check_type": "check_type",
    ("communication_health_checks", "service_name"): "target_service",
    ("communication_health_checks", "checked_by"): "source_service",
}
NOT_FROM_WIRE = {
    ("communication_events", "event_type"): "a kind, at most 8 characters",
    ("communication_health_checks", "status"): "a health status, at most 9 characters",
    ("communication_health_checks", "endpoint"): "method, or protocol://target (<= 135)",
    ("communication_patterns", "communication_type"): "synchronous or asynchronous",
    ("communication_patterns", "message_format"): "'unknown' (the sink does not know it)",
    ("communication_patterns", "circuit_breaker_state"): "a circuit state, <= 9 characters",
    ("communication_rollups", "circuit_state"): "a circuit state",
    ("communication_rollups", "derived_circuit_state"): "a circuit state",
    ("communication_slo", "objective"): "an objective's name (pipeline.core.slo)",
    ("commpipe_schema_migrations", "name"): "a migration file's name",
}
CATALOGUE = "message_patterns"  # from `commpipe patterns load`, validated there, not events


def test_every_limited_postgres_column_is_as_wide_as_the_wire_allows(pg_database: str) -> None:
    migrate_postgres(pg_database)
    with psycopg.connect(pg_database) as pg:
        limited = pg.execute(
            "SELECT table_name, column_name, character_maximum_length "
            "FROM information_schema.columns WHERE table_schema = 'public' "
            "AND character_maximum_length IS NOT NULL AND table_name <> %s "
            # views (the cascade views of 0006) show only their tables' columns
            "AND table_name IN (SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = 'public' AND table_type = 'BASE TABLE') "
            "ORDER BY 1, 2", (CATALOGUE,)).fetchall()
    too_narrow, unknown = [], []
    for table, column, width in limited:
        field = FROM_WIRE.get((table, column), FROM_WIRE.get(column))
        if (table, column) in NOT_FROM_WIRE:
            continue
        if field is None:
            unknown.append((table, column, width))
        elif width < LIMITS[field]:
            too_narrow.append((table, column, width, LIMITS[field]))
    assert (too_narrow, unknown) == ([], [])
    endpoint = max(LIMITS["method"],
                   len("://") + LIMITS["protocol"] + LIMITS["target_service"])
    widths = {(t, c): w for t, c, w in limited}
    assert widths[("communication_health_checks", "endpoint")] >= endpoint
