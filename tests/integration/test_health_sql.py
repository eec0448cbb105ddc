"""analyze_communication_health(): PostgreSQL's function and DuckDB's macro on the same rows.

The scoring (seeds/003): by source service, the unweighted averages of its patterns'
avg_latency_ms and error_rate (percent) give 95 if latency < 50 and errors < 0.1,
80 if < 100 and < 0.5, 65 if < 200 and < 1.0, else 40 (strict <, on the unrounded
averages). Issues: CIRCUIT_BREAKER_OPEN if a pattern's breaker is open, then
HEALTH_CHECK_FAILURES if a check of that service in the last hour was not 'healthy'.
Recommendations: OPTIMIZE_LATENCY if latency > 100, then IMPROVE_ERROR_HANDLING if
errors > 0.5. Averages are shown rounded half away from zero to 2 decimals.
Every expected row below is worked out by hand in its comment.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import duckdb
import psycopg
import pytest

from pipeline.sink.migrations import migrate_duckdb, migrate_postgres

pytestmark = pytest.mark.integration

CB, HC = "CIRCUIT_BREAKER_OPEN", "HEALTH_CHECK_FAILURES"
LAT, ERR = "OPTIMIZE_LATENCY", "IMPROVE_ERROR_HANDLING"

# (source_service, target_service, protocol, avg_latency_ms, error_rate, circuit_breaker_state)
PATTERNS: list[tuple[str, str, str, str, str | None, str]] = [
    ("API", "db", "http", "10.00", "0.00", "closed"),
    ("a-fast", "db", "http", "49.99", "0.09", "closed"),
    ("b-lat50", "db", "http", "50.00", "0.00", "closed"),
    ("b-lat99", "db", "http", "99.99", "0.49", "closed"),
    ("c-err01", "db", "http", "10.00", "0.10", "closed"),
    ("d-lat100", "db", "http", "100.00", "0.00", "closed"),
    ("d-lat199", "db", "http", "199.99", "0.99", "closed"),
    ("e-err05", "db", "http", "10.00", "0.50", "closed"),
    ("f-lat200", "db", "http", "200.00", "0.00", "closed"),
    ("g-err1", "db", "http", "10.00", "1.00", "closed"),
    ("h-multi", "x", "http", "30.00", "0.00", "closed"),
    ("h-multi", "y", "http", "120.00", "0.90", "open"),
    ("h-multi", "x", "grpc", "60.00", "0.30", "half_open"),
    ("i-unhealthy", "db", "http", "10.00", "0.00", "closed"),
    ("j-degraded", "db", "http", "10.00", "0.00", "closed"),
    ("k-old", "db", "http", "10.00", "0.00", "closed"),
    ("n-null", "x", "http", "20.00", None, "closed"),
    ("n-null", "y", "http", "40.00", "0.20", "closed"),
    ("t-tie-a", "x", "http", "10.01", "0.01", "closed"),
    ("t-tie-a", "y", "http", "10.02", "0.02", "closed"),
    ("t-tie-b", "x", "http", "1.27", "0.57", "closed"),
    ("t-tie-b", "y", "http", "1.28", "0.58", "closed"),
    ("u-avg-edge", "x", "http", "49.99", "0.00", "closed"),
    ("u-avg-edge", "y", "http", "50.00", "0.00", "closed"),
]

# (event_id, service_name, status, minutes ago)
HEALTH: list[tuple[str, str, str, int]] = [
    ("hc-1", "h-multi", "degraded", 30),
    ("hc-2", "i-unhealthy", "unhealthy", 10),
    ("hc-3", "i-unhealthy", "healthy", 5),
    ("hc-4", "j-degraded", "degraded", 50),
    ("hc-5", "k-old", "unhealthy", 120),  # older than an hour: ignored
    ("hc-6", "k-old", "healthy", 10),
    ("hc-7", "z-orphan", "unhealthy", 5),  # no patterns: not a row of the result
]

COLUMNS = ["service_name", "communication_score", "avg_latency", "error_rate",
           "reliability_issues", "recommendations"]

# In byte order of service_name ('A' < 'a'), as both databases sort it.
EXPECTED: list[tuple[str, str, str, str, list[str], list[str]]] = [
    ("API", "95.00", "10.00", "0.00", [], []),  # no health rows at all
    ("a-fast", "95.00", "49.99", "0.09", [], []),  # just below both 95-thresholds
    ("b-lat50", "80.00", "50.00", "0.00", [], []),  # 50 is not < 50
    ("b-lat99", "80.00", "99.99", "0.49", [], []),
    ("c-err01", "80.00", "10.00", "0.10", [], []),  # 0.1 is not < 0.1
    ("d-lat100", "65.00", "100.00", "0.00", [], []),  # not < 100; not > 100 either
    ("d-lat199", "65.00", "199.99", "0.99", [], [LAT, ERR]),
    ("e-err05", "65.00", "10.00", "0.50", [], []),  # not < 0.5; not > 0.5 either
    ("f-lat200", "40.00", "200.00", "0.00", [], [LAT]),  # not < 200
    ("g-err1", "40.00", "10.00", "1.00", [], [ERR]),  # not < 1.0
    # (30 + 120 + 60) / 3 = 70, (0 + 0.9 + 0.3) / 3 = 0.4: band 80 although one pattern
    # alone would be 65; one breaker open; a degraded check 30 minutes ago
    ("h-multi", "80.00", "70.00", "0.40", [CB, HC], []),
    ("i-unhealthy", "95.00", "10.00", "0.00", [HC], []),
    ("j-degraded", "95.00", "10.00", "0.00", [HC], []),
    ("k-old", "95.00", "10.00", "0.00", [], []),
    # AVG skips NULL: errors 0.20 / 1 (not / 2), latency (20 + 40) / 2 = 30
    ("n-null", "80.00", "30.00", "0.20", [], []),
    # 10.015 -> 10.02 and 0.015 -> 0.02 (half away from zero); 10.015 < 50, 0.015 < 0.1
    ("t-tie-a", "95.00", "10.02", "0.02", [], []),
    # 1.275 -> 1.28, 0.575 -> 0.58 (a DOUBLE average rounds both down); 0.575 >= 0.5 -> 65
    ("t-tie-b", "65.00", "1.28", "0.58", [], [ERR]),
    # 49.995 < 50 -> 95, although it is shown rounded as 50.00
    ("u-avg-edge", "95.00", "50.00", "0.00", [], []),
]


def _insert(conn: Any, p: str, now: datetime) -> None:
    conn.executemany(
        "INSERT INTO communication_patterns (source_service, target_service, protocol, "
        "communication_type, message_format, avg_latency_ms, error_rate, circuit_breaker_state) "
        f"VALUES ({p}, {p}, {p}, 'synchronous', 'json', {p}, {p}, {p})",
        [(s, t, proto, Decimal(lat), None if err is None else Decimal(err), cb)
         for s, t, proto, lat, err, cb in PATTERNS])
    conn.executemany(
        "INSERT INTO communication_health_checks (event_id, service_name, endpoint, check_type, "
        f"status, checked_at) VALUES ({p}, {p}, '/health', 'health', {p}, {p})",
        [(e, s, status, now - timedelta(minutes=ago)) for e, s, status, ago in HEALTH])


def _plain(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Decimals as strings, so 95.0 and 95.00 differ; everything else as returned."""
    return [tuple(str(v) if isinstance(v, Decimal) else v for v in row) for row in rows]


def test_analyze_communication_health_same_in_both(pg_database: str, duckdb_path: str) -> None:
    migrate_postgres(pg_database)
    migrate_duckdb(duckdb_path)
    now = datetime.now(UTC)

    with psycopg.connect(pg_database) as pg:
        _insert(pg.cursor(), "%s", now)
        pg.commit()
        cur = pg.execute("SELECT * FROM analyze_communication_health()")
        pg_columns = [d.name for d in cur.description]
        pg_rows = cur.fetchall()

    with duckdb.connect(duckdb_path) as dk:
        _insert(dk, "?", now)
        res = dk.execute("SELECT * FROM analyze_communication_health()")
        dk_columns = [d[0] for d in res.description]
        dk_rows = res.fetchall()

    assert pg_columns == COLUMNS
    assert dk_columns == COLUMNS
    assert _plain(pg_rows) == EXPECTED
    assert _plain(dk_rows) == EXPECTED
    assert dk_rows == pg_rows


def test_analyze_communication_health_empty(pg_database: str, duckdb_path: str) -> None:
    migrate_postgres(pg_database)
    migrate_duckdb(duckdb_path)
    with psycopg.connect(pg_database) as pg:
        assert pg.execute("SELECT * FROM analyze_communication_health()").fetchall() == []
    with duckdb.connect(duckdb_path) as dk:
        assert dk.execute("SELECT * FROM analyze_communication_health()").fetchall() == []
