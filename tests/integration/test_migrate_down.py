"""Rolling the schema back never deletes data unasked.

A down migration that would drop a table with rows or a column with values says exactly
what it would delete and changes nothing, unless asked (``allow_data_loss=True``,
``commpipe migrate --yes``). Expected counts are the rows inserted here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from typing import Any

import pytest

from pipeline.errors import ConfigError, ServiceError
from tests.integration.test_migrations import (
    DOWN3,
    DOWN4,
    DOWN5,
    DOWN6,
    UP3,
    UP4,
    UP5,
    UP6,
    Db,
)

pytestmark = pytest.mark.integration

T0 = datetime(2025, 6, 22, 12, 0, 0, tzinfo=UTC)


@pytest.fixture(params=["postgres", "duckdb"])
def db(request: pytest.FixtureRequest) -> Db:
    if request.param == "postgres":
        return Db("postgres", request.getfixturevalue("pg_database"))
    return Db("duckdb", request.getfixturevalue("duckdb_path"))


def migrate(db: Db, to: int | None = None, **options: Any) -> Any:
    from pipeline.sink import migrations as mig

    if db.dialect == "postgres":
        return mig.migrate_postgres(db.target, to=to, **options)
    return mig.migrate_duckdb(db.target, to=to, **options)


def fill(db: Db) -> None:
    """Two retry events (one with attempt and backoff, one without) and three objective rows."""
    p = db.p
    db.run("INSERT INTO communication_events (event_id, correlation_id, source_service, "
           f"target_service, event_type, protocol, attempt, backoff_ms) VALUES "
           f"({p}, 'c', 'orders', 'payments', 'retry', 'http', {p}, {p})", ["r1", 2, 400])
    db.run("INSERT INTO communication_events (event_id, correlation_id, source_service, "
           "target_service, event_type, protocol) VALUES ('r2', 'c', 'orders', 'payments', "
           "'error', 'http')")
    for objective in ("latency_p95", "latency_max", "delivery_success"):
        db.run("INSERT INTO communication_slo (window_start, window_end, source_service, "
               "target_service, protocol, objective, threshold, measured, ok) VALUES "
               f"({p}, {p}, 'orders', 'payments', 'http', {p}, 1, 2, false)",
               [T0, T0, objective])


def test_a_downgrade_that_would_delete_data_says_what_and_changes_nothing(db: Db) -> None:
    migrate(db)
    fill(db)
    with pytest.raises(ConfigError) as info:
        migrate(db, to=2)
    where = "PostgreSQL" if db.dialect == "postgres" else "DuckDB file"
    message = str(info.value)
    assert message.startswith(f"migrating {where}")
    assert ("down to version 2 would delete 3 rows of table communication_slo, "
            "1 value of column communication_events.attempt, "
            "1 value of column communication_events.backoff_ms; nothing was changed. "
            "Back them up if you need them, then run again with --yes to delete them"
            ) in message
    assert "\n" not in message
    assert db.current() == 6
    assert db.run("SELECT count(*) FROM communication_slo") == [(3,)]
    assert db.run("SELECT event_id, attempt FROM communication_events ORDER BY 1") == [
        ("r1", 2), ("r2", None)]

    assert migrate(db, to=2, allow_data_loss=True) == [DOWN6, DOWN5, DOWN4, DOWN3]
    assert db.current() == 2
    assert migrate(db) == [UP3, UP4, UP5, UP6]
    assert db.run("SELECT count(*) FROM communication_slo") == [(0,)]
    assert db.run("SELECT event_id, attempt FROM communication_events ORDER BY 1") == [
        ("r1", None), ("r2", None)]


def test_a_downgrade_of_empty_tables_and_columns_needs_no_confirmation(db: Db) -> None:
    migrate(db)
    db.run("INSERT INTO communication_events (event_id, correlation_id, source_service, "
           "target_service, event_type, protocol) VALUES ('e1', 'c', 'a', 'b', 'error', "
           "'http')")  # attempt and backoff_ms are NULL: nothing of 0003 is lost
    assert migrate(db, to=2) == [DOWN6, DOWN5, DOWN4, DOWN3]
    assert db.run("SELECT event_id FROM communication_events") == [("e1",)]


def test_a_downgrade_that_cannot_run_says_why_before_changing_anything(pg_database: str
                                                                       ) -> None:
    db = Db("postgres", pg_database)
    migrate(db)
    db.run("INSERT INTO communication_events (event_id, correlation_id, source_service, "
           "target_service, event_type, protocol) VALUES ('e1', 'c', 'a', 'b', 'error', "
           "'grpc-web.streaming-v2x')")  # 22 characters: VARCHAR(20) of 0004 cannot hold it
    with pytest.raises(ServiceError) as info:
        migrate(db, to=3)
    message = str(info.value)
    assert "0005_wire_widths.down.sql" in message
    assert "value too long for type character varying(20)" in message
    assert "nothing was changed" in message
    assert db.current() == 6


def commpipe(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "COLUMNS": "200", **env})


def test_commpipe_migrate_down_asks_for_yes_before_deleting(pg_database: str,
                                                             duckdb_path: str) -> None:
    """The issue's reproduction: `migrate --to 2`, then `migrate`, silently deleted every
    retry attempt number and every objective row."""
    env = {"COMMPIPE_POSTGRES_DSN": pg_database, "COMMPIPE_DUCKDB_PATH": duckdb_path}
    assert commpipe(env, "migrate").returncode == 0
    for db in (Db("postgres", pg_database), Db("duckdb", duckdb_path)):
        fill(db)
    refused = commpipe(env, "migrate", "--to", "2")
    assert refused.returncode == 1
    # one message (the terminal may wrap it: rich wraps at COLUMNS)
    error = " ".join(refused.stderr.split())
    assert error.startswith("error: migrating PostgreSQL") and error.count("error:") == 1
    assert "would delete 3 rows of table communication_slo" in error
    assert error.endswith("then run again with --yes to delete them")
    assert "Traceback" not in refused.stderr
    for db in (Db("postgres", pg_database), Db("duckdb", duckdb_path)):
        assert db.current() == 6
        assert db.run("SELECT count(attempt) FROM communication_events") == [(1,)]
    done = commpipe(env, "migrate", "--to", "2", "--yes")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"{where}: down {v}" for where in ("PostgreSQL", f"DuckDB {duckdb_path}")
        for v in ("0006 cascades", "0005 wire_widths", "0004 slo", "0003 call_chains")]
