"""``commpipe migrate``, ``query`` and ``health`` as a user runs them, on real databases."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import subprocess
import sys

import psycopg
import pytest

pytestmark = pytest.mark.integration


def commpipe(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "COLUMNS": "200", **env})


@pytest.fixture
def env(pg_database: str, duckdb_path: str) -> dict[str, str]:
    return {"COMMPIPE_POSTGRES_DSN": pg_database, "COMMPIPE_DUCKDB_PATH": duckdb_path}


def test_migrate_up_again_and_down(env: dict[str, str]) -> None:
    first = commpipe(env, "migrate")
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == [
        f"{where}: up {v}" for where in ("PostgreSQL", f"DuckDB {env['COMMPIPE_DUCKDB_PATH']}")
        for v in ("0001 communication_monitoring", "0002 rollups", "0003 call_chains",
                  "0004 slo", "0005 wire_widths", "0006 cascades")]
    again = commpipe(env, "migrate")
    assert again.stdout.splitlines() == [
        "PostgreSQL: up to date", f"DuckDB {env['COMMPIPE_DUCKDB_PATH']}: up to date"]
    down = commpipe(env, "migrate", "--to", "1", "--no-duckdb")
    assert down.stdout.splitlines() == ["PostgreSQL: down 0006 cascades",
                                        "PostgreSQL: down 0005 wire_widths",
                                        "PostgreSQL: down 0004 slo",
                                        "PostgreSQL: down 0003 call_chains",
                                        "PostgreSQL: down 0002 rollups"]
    with psycopg.connect(env["COMMPIPE_POSTGRES_DSN"]) as conn:
        assert conn.execute("SELECT to_regclass('communication_rollups')").fetchone() == (None,)


def test_query_and_health_print_both_databases(env: dict[str, str]) -> None:
    assert commpipe(env, "migrate").returncode == 0
    insert = ("INSERT INTO communication_patterns (source_service, target_service, "
              "communication_type, protocol, message_format, avg_latency_ms, error_rate, "
              "circuit_breaker_state) VALUES ('orders', 'payments', 'synchronous', 'http', "
              "'json', 120.5, 0.25, 'open')")
    with psycopg.connect(env["COMMPIPE_POSTGRES_DSN"]) as conn:
        conn.execute(insert)  # type: ignore[arg-type]
    import duckdb

    con = duckdb.connect(env["COMMPIPE_DUCKDB_PATH"])
    con.execute(insert)
    con.close()
    sql = "SELECT source_service, avg_latency_ms FROM communication_patterns"
    for flag in ([], ["--postgres"]):
        got = commpipe(env, "query", *flag, "--format", "json", sql)
        assert got.returncode == 0, got.stderr
        assert json.loads(got.stdout) == [{"source_service": "orders", "avg_latency_ms": "120.50"}]
    health = commpipe(env, "health")
    assert health.returncode == 0, health.stderr
    lines = health.stdout.splitlines()
    assert lines[0] == "PostgreSQL: analyze_communication_health()"
    assert "DuckDB: analyze_communication_health()" in lines
    # 120.5 ms, 0.25 %: the 65 band; an open circuit; latency above 100 ms
    rows = [line for line in lines if "orders" in line]
    assert len(rows) == 2
    for row in rows:  # the score, ms to 0.1, the error rate (a percentage) named as one
        assert ["orders", "65", "120.5", "0.25", "%"] == row.split()[:5]
        assert "CIRCUIT_BREAKER_OPEN" in row and "OPTIMIZE_LATENCY" in row
    narrow = commpipe({**env, "COLUMNS": "80"}, "health")
    assert narrow.returncode == 0, narrow.stderr
    assert max(len(line) for line in narrow.stdout.splitlines()) <= 80
    # too narrow for six columns: one block per service, every value whole
    for name, value in (("service_name", "orders"), ("communication_score", "65"),
                        ("avg_latency", "120.5"), ("error_rate", "0.25 %")):
        assert narrow.stdout.count(f"\n{name.ljust(19)}  {value}\n") == 2, name


VALUES_SQL = ("SELECT 518.094855040381::DOUBLE PRECISION AS p99_ms, to_timestamp(1796011130.25) "
              "AS window_end, 0.0123::DOUBLE PRECISION AS error_ratio")


def test_tables_round_while_csv_and_json_keep_full_precision(env: dict[str, str]) -> None:
    assert commpipe(env, "migrate").returncode == 0
    for flag in ([], ["--postgres"]):
        table = commpipe(env, "query", *flag, VALUES_SQL)
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert lines[1].split() == ["p99_ms", "window_end", "error_ratio"]
        assert lines[3].split() == ["518.1", "2026-11-30T03:58:50.250Z", "1.2", "%"]
        assert lines[-1] == "1 row; times in UTC"
        got = commpipe(env, "query", *flag, "--format", "csv", VALUES_SQL)
        header, row = list(csv.reader(io.StringIO(got.stdout)))
        assert header == ["p99_ms", "window_end", "error_ratio"]
        assert row[0] == "518.094855040381" and row[2] == "0.0123"
        assert dt.datetime.fromisoformat(row[1]).timestamp() == 1796011130.25
        got = commpipe(env, "query", *flag, "--format", "json", VALUES_SQL)
        [data] = json.loads(got.stdout)
        assert data["p99_ms"] == 518.094855040381 and data["error_ratio"] == 0.0123
        assert dt.datetime.fromisoformat(data["window_end"]).timestamp() == 1796011130.25


def test_postgres_csv_prints_jsonb_and_arrays_as_json(env: dict[str, str]) -> None:
    sql = ("SELECT '{\"http_5xx\": 2, \"nested\": [1, 2.5, null]}'::jsonb AS errors_by_type, "
           "ARRAY['CIRCUIT_BREAKER_OPEN', 'OPTIMIZE_LATENCY'] AS issues")
    got = commpipe(env, "query", "--postgres", "--format", "csv", sql)
    assert got.returncode == 0, got.stderr
    header, row = list(csv.reader(io.StringIO(got.stdout)))
    assert header == ["errors_by_type", "issues"]
    assert json.loads(row[0]) == {"http_5xx": 2, "nested": [1, 2.5, None]}
    assert json.loads(row[1]) == ["CIRCUIT_BREAKER_OPEN", "OPTIMIZE_LATENCY"]
    table = commpipe(env, "query", "--postgres", sql).stdout.splitlines()
    # (jsonb keeps its keys shortest first)
    assert table[3].split("  ")[0] == '{"nested": [1, 2.5, null], "http_5xx": 2}'
    assert table[3].split("  ")[1].strip() == "CIRCUIT_BREAKER_OPEN, OPTIMIZE_LATENCY"


def test_errors_are_clear_and_keep_the_password_out(env: dict[str, str]) -> None:
    bad = commpipe({**env, "COMMPIPE_POSTGRES_DSN": "postgresql://app:s3cret@127.0.0.1:1/x"},
                   "query", "--postgres", "SELECT 1")
    assert bad.returncode == 1
    assert "s3cret" not in bad.stderr + bad.stdout
    assert "error: PostgreSQL (postgresql://app:***@127.0.0.1:1/x)" in bad.stderr
    missing = commpipe(env, "query", "SELECT 1")  # not migrated yet: no file
    assert missing.returncode == 1
    assert "no DuckDB file at" in missing.stderr
    assert commpipe(env, "migrate", "--no-postgres").returncode == 0
    wrong = commpipe(env, "query", "SELECT * FROM nope")
    assert wrong.returncode == 1 and "nope" in wrong.stderr and "Traceback" not in wrong.stderr


def test_postgres_sslmode_reaches_the_connection(env: dict[str, str]) -> None:
    """The embedded server has no TLS: ``require`` must fail (proving the setting is used),
    ``disable`` must work; the password in the DSN appears in neither output."""
    from psycopg.conninfo import make_conninfo

    dsn = make_conninfo(env["COMMPIPE_POSTGRES_DSN"], password="Pw-8c1d")  # (trust: ignored)
    secure = commpipe({**env, "COMMPIPE_POSTGRES_DSN": dsn, "COMMPIPE_POSTGRES_SSLMODE": "require"},
                      "query", "--postgres", "SELECT 1")
    assert secure.returncode == 1
    assert "SSL" in secure.stderr and "Traceback" not in secure.stderr
    plain = commpipe({**env, "COMMPIPE_POSTGRES_DSN": dsn, "COMMPIPE_POSTGRES_SSLMODE": "disable"},
                     "query", "--postgres", "--format", "csv", "SELECT 1 AS one")
    assert (plain.returncode, plain.stdout.split()) == (0, ["one", "1"])
    assert "Pw-8c1d" not in secure.stdout + secure.stderr + plain.stdout + plain.stderr
