"""What the sink writes, as SQL both databases run: PostgreSQL (psycopg 3) and DuckDB.

One text per statement; :func:`dialect_sql` adapts the two differences that
matter here (placeholders, the JSON type). Bulk rows come from a staging relation
that both databases name alike (:mod:`pipeline.sink.staging`: a binary COPY into a
temporary table in PostgreSQL, an Arrow table in DuckDB) and move into the real
tables with one ``INSERT ... SELECT ... ON CONFLICT`` per table; the few rows of
the rare paths (health checks, windows several partitions share) travel as one
array per column, unnested in SQL. The order of the steps, and why each is exact
after a replay, is :func:`pipeline.sink.transaction.write_batch`'s docstring.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Literal

import orjson

from pipeline.core.window import WindowStats

__all__ = ["Dialect", "dialect_sql", "pattern_values", "rollup_values"]

Dialect = Literal["postgres", "duckdb"]
Edge = tuple[str, str, str]

# (column, array element type, how it is stored: "ts" from epoch seconds, "json", or plain)
_PARTS = [("window_start", "double precision", "ts"), ("source_service", "text", ""),
          ("target_service", "text", ""), ("protocol", "text", ""),
          ("source_partition", "bigint", ""), ("window_end", "double precision", "ts"),
          ("source_offset", "bigint", ""), ("stats", "text", "json")]
_ROLLUPS = [("window_start", "double precision", "ts"), ("window_end", "double precision", "ts"),
            ("source_service", "text", ""), ("target_service", "text", ""),
            ("protocol", "text", ""), *[(c, "bigint", "") for c in (
                "requests", "responses", "errors", "timeouts", "retries")],
            ("retry_backoff_ms", "double precision", ""), ("late_events", "bigint", ""),
            ("payload_bytes", "bigint", ""), ("latency_count", "bigint", ""),
            *[(c, "double precision", "") for c in (
                "latency_sum_ms", "latency_min_ms", "latency_p50_ms", "latency_p90_ms",
                "latency_p95_ms", "latency_p99_ms", "latency_max_ms", "error_ratio")],
            ("circuit_state", "text", ""), ("derived_circuit_state", "text", ""),
            *[(c, "text", "json") for c in (
                "errors_by_type", "health_checks", "circuit_transitions", "latency_sketch")],
            ("partitions", "bigint", "")]
_EVENTS = [("event_id", "text", ""), ("correlation_id", "text", ""),
           ("source_service", "text", ""), ("target_service", "text", ""),
           ("event_type", "text", ""), ("protocol", "text", ""), ("method", "text", ""),
           ("payload_size", "bigint", ""), ("latency_ms", "double precision", ""),
           ("status_code", "bigint", ""), ("error_type", "text", ""),
           ("error_message", "text", ""), ("attempt", "bigint", ""),
           ("backoff_ms", "double precision", ""), ("trace_id", "text", ""),
           ("span_id", "text", ""), ("parent_span_id", "text", ""),
           ("occurred_at", "double precision", "ts")]
_CHECKS = [("event_id", "text", ""), ("service_name", "text", ""), ("checked_by", "text", ""),
           ("endpoint", "text", ""), ("check_type", "text", ""), ("status", "text", ""),
           ("response_time_ms", "double precision", ""), ("error_details", "text", ""),
           ("checked_at", "double precision", "ts")]
_SLO = [("window_start", "double precision", "ts"), ("window_end", "double precision", "ts"),
        ("source_service", "text", ""), ("target_service", "text", ""), ("protocol", "text", ""),
        ("objective", "text", ""), ("threshold", "double precision", ""),
        ("measured", "double precision", ""), ("ok", "boolean", ""),
        ("miss", "double precision", "")]
_PATTERNS = [("source_service", "text", ""), ("target_service", "text", ""),
             ("communication_type", "text", ""), ("protocol", "text", ""),
             ("message_format", "text", ""), ("avg_latency_ms", "text", "dec"),
             ("success_rate", "text", "dec"), ("throughput_rps", "text", "dec"),
             ("error_rate", "text", "dec"), ("retry_count", "bigint", ""),
             ("circuit_breaker_state", "text", ""), ("last_health_check", "text", "tstz")]

QUANTILES = (0.5, 0.9, 0.95, 0.99)
ASYNC_PROTOCOLS = frozenset({"amqp", "kafka", "nats", "sqs", "pubsub", "mqtt"})


def dialect_sql(sql: str, dialect: Dialect) -> str:
    """Adapt a statement written for PostgreSQL with ``%s`` placeholders and ``{json}``."""
    if dialect == "postgres":
        return sql.replace("{json}", "jsonb")
    return sql.replace("%s", "?").replace("{json}", "JSON")


def _select_unnest(columns: Sequence[tuple[str, str, str]], source: str | None = None) -> str:
    """``SELECT`` of ``columns`` converted to their stored types, from one unnested array
    parameter per column, or from the relation ``source`` (a staging table)."""
    exprs = []
    for name, _, how in columns:
        if how == "ts":
            exprs.append(f"to_timestamp(u.{name})")
        elif how == "json":
            exprs.append(f"u.{name}::{{json}}")
        elif how == "dec":
            exprs.append(f"u.{name}::numeric(10,2)")
        elif how == "tstz":
            exprs.append(f"u.{name}::timestamptz")
        else:
            exprs.append(f"u.{name}")
    if source is not None:
        return f"SELECT {', '.join(exprs)} FROM {source} AS u"
    inner = ", ".join(f"unnest(%s::{typ}[]) AS {name}" for name, typ, _ in columns)
    return f"SELECT {', '.join(exprs)} FROM (SELECT {inner}) AS u"


def _insert(table: str, columns: Sequence[tuple[str, str, str]], conflict: str, *,
            stamp: bool = False, source: str | None = None) -> str:
    """``INSERT ... SELECT`` of unnested column arrays (or of the staging relation
    ``source``); ``stamp`` adds ``updated_at = now()``."""
    names = ", ".join(("updated_at",) * stamp + tuple(c[0] for c in columns))
    select = _select_unnest(columns, source)
    if stamp:
        select = select.replace("SELECT ", "SELECT now(), ", 1)
    return f"INSERT INTO {table} ({names}) {select} ON CONFLICT {conflict}"


def _upsert(table: str, columns: Sequence[tuple[str, str, str]], key: Sequence[str], *,
            newer: str | None = None, source: str | None = None) -> str:
    """``INSERT ... ON CONFLICT (key) DO UPDATE``; with ``newer`` (a column), a row is only
    replaced by one whose ``newer`` is at least its own."""
    sets = ", ".join(f"{c} = excluded.{c}" for c in
                     ("updated_at", *(c[0] for c in columns if c[0] not in key)))
    where = f" WHERE {table}.{newer} <= excluded.{newer}" if newer else ""
    return _insert(table, columns, f"({', '.join(key)}) DO UPDATE SET {sets}{where}", stamp=True,
                   source=source)


_KEY = ("window_start", "source_service", "target_service", "protocol")
# A part is replaced only by a version at least as new: after a restart, windows restored
# from the changelog can be older than what the sink stored before the crash.
UPSERT_PARTS = _upsert("communication_rollup_parts", _PARTS, (*_KEY, "source_partition"),
                       newer="source_offset")
UPSERT_ROLLUPS = _upsert("communication_rollups", _ROLLUPS, _KEY)
UPSERT_SLO = _upsert("communication_slo", _SLO, (*_KEY, "objective"))
UPSERT_PATTERNS = _upsert("communication_patterns", _PATTERNS,
                          ("source_service", "target_service", "protocol"))
INSERT_EVENTS = _insert("communication_events", _EVENTS, "(event_id) DO NOTHING")

# The bulk path: the same statements over staging relations (pipeline.sink.staging).
STAGE_PARTS, STAGE_ROLLUPS, STAGE_SLO, STAGE_EVENTS = (
    "commpipe_stage_parts", "commpipe_stage_rollups", "commpipe_stage_slo",
    "commpipe_stage_events")
STAGED_PARTS = _upsert("communication_rollup_parts", _PARTS, (*_KEY, "source_partition"),
                       newer="source_offset", source=STAGE_PARTS)
STAGED_ROLLUPS = _upsert("communication_rollups", _ROLLUPS, _KEY, source=STAGE_ROLLUPS)
STAGED_SLO = _upsert("communication_slo", _SLO, (*_KEY, "objective"), source=STAGE_SLO)
STAGED_EVENTS = _insert("communication_events", _EVENTS, "(event_id) DO NOTHING",
                        source=STAGE_EVENTS)
# Staged windows whose (window, edge) has a part of another partition, or a newer part of
# their own: their rollup is merged from the stored parts instead (READ_PARTS).
SHARED_KEYS = f"""
SELECT u.window_start, u.source_service, u.target_service, u.protocol
FROM {STAGE_PARTS} AS u
WHERE EXISTS (
    SELECT 1 FROM communication_rollup_parts AS x
    WHERE x.window_start = to_timestamp(u.window_start) AND x.source_service = u.source_service
      AND x.target_service = u.target_service AND x.protocol = u.protocol
      AND (x.source_partition <> u.source_partition OR x.source_offset > u.source_offset))
"""
INSERT_CHECKS = _insert("communication_health_checks", _CHECKS, "(event_id) DO NOTHING")

READ_PARTS = """
WITH k AS (SELECT unnest(%s::double precision[]) AS ws, unnest(%s::text[]) AS s,
                  unnest(%s::text[]) AS t, unnest(%s::text[]) AS p)
SELECT x.source_service, x.target_service, x.protocol, x.stats
FROM communication_rollup_parts AS x
JOIN k ON x.window_start = to_timestamp(k.ws) AND x.source_service = k.s
      AND x.target_service = k.t AND x.protocol = k.p
ORDER BY x.window_start, x.source_service, x.target_service, x.protocol, x.source_partition
"""

RECOVERIES = """
UPDATE communication_health_checks AS h SET recovered_at = (
    SELECT MIN(g.checked_at) FROM communication_health_checks AS g
    WHERE g.service_name = h.service_name AND g.endpoint = h.endpoint
      AND g.check_type = h.check_type AND g.status = 'healthy' AND g.checked_at > h.checked_at)
WHERE h.status <> 'healthy' AND h.service_name IN (SELECT unnest(%s::text[]))
  AND (h.recovered_at IS NULL OR h.recovered_at > to_timestamp(%s))
"""

PATTERN_SUMS = """
WITH e AS (SELECT unnest(%s::text[]) AS s, unnest(%s::text[]) AS t, unnest(%s::text[]) AS p),
l AS (
    SELECT r.source_service AS s, r.target_service AS t, r.protocol AS p,
           MAX(r.window_start) AS latest_start, MAX(r.window_end) AS latest_end
    FROM communication_rollups AS r
    JOIN e ON r.source_service = e.s AND r.target_service = e.t AND r.protocol = e.p
    GROUP BY r.source_service, r.target_service, r.protocol)
SELECT l.s, l.t, l.p, SUM(r.requests), SUM(r.responses), SUM(r.errors), SUM(r.timeouts),
       SUM(r.retries), SUM(r.latency_count), SUM(r.latency_sum_ms),
       extract(epoch FROM MIN(r.window_start)), extract(epoch FROM l.latest_end),
       MAX(CASE WHEN r.window_start = l.latest_start THEN r.circuit_state END),
       (SELECT MAX(h.checked_at) FROM communication_health_checks AS h
        WHERE h.service_name = l.t AND h.checked_by = l.s)
FROM l JOIN communication_rollups AS r
  ON r.source_service = l.s AND r.target_service = l.t AND r.protocol = l.p
 AND extract(epoch FROM r.window_end) > extract(epoch FROM l.latest_end) - %s
GROUP BY l.s, l.t, l.p, l.latest_end
ORDER BY l.s, l.t, l.p
"""


def _columns(rows: Sequence[Sequence[Any]], width: int) -> list[list[Any]]:
    return [[row[i] for row in rows] for i in range(width)]


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def rollup_values(window_start: float, window_end: float, edge: Edge, stats: WindowStats,
                  partitions: int) -> tuple[Any, ...]:
    """One ``communication_rollups`` row (column order of ``_ROLLUPS``)."""
    sketch = stats.latency
    has = sketch.count > 0
    quantiles = [sketch.quantile(q) if has else None for q in QUANTILES]
    return (window_start, window_end, *edge, stats.requests, stats.responses,
            stats.error_count, stats.timeouts, stats.retries, stats.retry_backoff_ms,
            stats.late_events, stats.payload_bytes, sketch.count, sketch.sum,
            sketch.min if has else None, *quantiles, sketch.max if has else None,
            stats.error_rate, stats.reported_state or stats.derived_state,
            stats.derived_state, _dumps(stats.errors), _dumps(stats.health),
            _dumps(stats.transitions), _dumps(sketch.to_json()), partitions)


def _round2(x: float) -> str:
    return str(Decimal(repr(float(x))).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


def pattern_values(row: Sequence[Any]) -> tuple[Any, ...]:
    """A ``communication_patterns`` row from one edge's sums over its lookback
    (the specification's units: percent, milliseconds, requests per second)."""
    (s, t, p, requests, responses, errors, timeouts, retries, lat_n, lat_sum, first_start,
     latest_end, circuit_state, last_check) = row
    failed = int(errors) + int(timeouts)
    outcomes = int(responses) + failed
    error_rate = Decimal(_round2(100.0 * failed / outcomes)) if outcomes else Decimal("0.00")
    span = float(latest_end) - float(first_start)
    return (s, t, "asynchronous" if p in ASYNC_PROTOCOLS else "synchronous", p, "unknown",
            _round2(float(lat_sum) / int(lat_n)) if lat_n else "0.00",
            str(Decimal("100.00") - error_rate), _round2(int(requests) / span) if span else "0.00",
            str(error_rate), int(retries), circuit_state or "closed",
            last_check.isoformat() if isinstance(last_check, dt.datetime) else None)


def _event_row(e: dict[str, Any]) -> tuple[Any, ...]:
    return (e["event_id"], e["correlation_id"], e["source_service"], e["target_service"],
            e["kind"], e["protocol"], e.get("method"), e.get("payload_size"),
            e.get("latency_ms"), e.get("status_code"), e.get("error_type"),
            e.get("error_message"), e.get("attempt"), e.get("backoff_ms"), e.get("trace_id"),
            e.get("span_id"), e.get("parent_span_id"), e["ts"])


def _check_row(e: dict[str, Any]) -> tuple[Any, ...]:
    endpoint = e.get("method") or f"{e['protocol']}://{e['target_service']}"
    return (e["event_id"], e["target_service"], e["source_service"], endpoint,
            e.get("check_type") or "health", e["health_status"], e.get("latency_ms") or 0.0,
            e.get("error_type"), e["ts"])
