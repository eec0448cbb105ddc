"""``commpipe health --fail-under``: a CI gate that checked nothing must fail, and say why.

Nothing configured, a database without the schema, a migrated database without rollups
in the lookback (empty, or only older windows): each fails with a message naming the
reason. With rollups in the lookback and every service scoring well, it passes, so the
gate is not simply always failing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from typing import Any

import duckdb
import psycopg
import pytest

from pipeline.sink.migrations import migrate_duckdb, migrate_postgres

pytestmark = pytest.mark.integration

NOTHING = ("no database to check: set COMMPIPE_POSTGRES_DSN and/or COMMPIPE_DUCKDB_PATH "
           "(a gate that checked nothing must not pass)")


def commpipe(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "COLUMNS": "300", **env})


def text(done: subprocess.CompletedProcess[str]) -> str:
    """stdout and stderr as one line of words (rich wraps long lines)."""
    return " ".join((done.stdout + " " + done.stderr).split())


def test_no_database_configured_fails(tmp_path: Any) -> None:
    env = {"COMMPIPE_POSTGRES_DSN": "", "COMMPIPE_DUCKDB_PATH": ""}
    gate = commpipe(env, "health", "--fail-under", "90")
    assert gate.returncode == 1
    assert gate.stderr.startswith("error: ") and "Traceback" not in gate.stderr
    assert " ".join(gate.stderr.split()) == f"error: {NOTHING}"
    as_json = commpipe(env, "health", "--fail-under", "90", "--json")
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout) == {"ok": False, "reports": [], "problems": [NOTHING]}


def test_a_database_without_the_schema_fails(pg_database: str, duckdb_path: str) -> None:
    gate = commpipe({"COMMPIPE_POSTGRES_DSN": pg_database, "COMMPIPE_DUCKDB_PATH": ""},
                    "health", "--fail-under", "90")
    assert gate.returncode == 1
    assert "has schema version 0; this needs 4 or later: run `commpipe migrate`" in text(gate)
    duckdb.connect(duckdb_path).close()  # a file, without the schema
    gate = commpipe({"COMMPIPE_POSTGRES_DSN": "", "COMMPIPE_DUCKDB_PATH": duckdb_path},
                    "health", "--fail-under", "90")
    assert gate.returncode == 1
    assert f"DuckDB file {duckdb_path} has schema version 0" in text(gate)


def rollup(p: str, window_end: float) -> tuple[str, list[Any]]:
    end = datetime.fromtimestamp(window_end, UTC)
    start = datetime.fromtimestamp(window_end - 10, UTC)
    return ("INSERT INTO communication_rollups (window_start, window_end, source_service, "
            f"target_service, protocol, requests, latency_sketch) VALUES ({p}, {p}, 'orders', "
            f"'payments', 'http', 5, '{{}}')", [start, end])


GOOD_PATTERN = ("INSERT INTO communication_patterns (source_service, target_service, "
                "communication_type, protocol, message_format, avg_latency_ms, error_rate) "
                "VALUES ('orders', 'payments', 'synchronous', 'http', 'json', 12.5, 0.0)")


@pytest.fixture
def env(pg_database: str, duckdb_path: str) -> dict[str, str]:
    migrate_postgres(pg_database)
    migrate_duckdb(duckdb_path)
    return {"COMMPIPE_POSTGRES_DSN": pg_database, "COMMPIPE_DUCKDB_PATH": duckdb_path}


def fill(env: dict[str, str], *window_ends: float) -> None:
    """A well-scoring pattern (95: 12.5 ms, 0 % errors) and rollups ending at these times."""
    with psycopg.connect(env["COMMPIPE_POSTGRES_DSN"]) as pg:
        pg.execute(GOOD_PATTERN)
        for end in window_ends:
            pg.execute(*rollup("%s", end))  # type: ignore[arg-type]
    with duckdb.connect(env["COMMPIPE_DUCKDB_PATH"]) as dk:
        dk.execute(GOOD_PATTERN)
        for end in window_ends:
            dk.execute(*rollup("?", end))


def test_a_migrated_but_empty_database_fails(env: dict[str, str]) -> None:
    gate = commpipe(env, "health", "--fail-under", "90", "--json")
    assert gate.returncode == 1, gate.stdout + gate.stderr
    result = json.loads(gate.stdout)
    assert result["ok"] is False
    for report in result["reports"]:
        assert (report["ok"], report["windows_checked"]) == (False, 0)
        assert report["problems"] == [
            "no rollups in the last 1h: nothing was checked (is a worker writing to "
            "this database?)"]
    table = commpipe(env, "health", "--fail-under", "90")
    assert table.returncode == 1
    assert ("postgres: no rollups in the last 1h: nothing was checked (is a worker writing "
            "to this database?)") in text(table)
    assert "duckdb: no rollups in the last 1h: nothing was checked" in text(table)


def test_only_rollups_older_than_the_lookback_fail(env: dict[str, str]) -> None:
    """The patterns score 95 (above the gate), but no window ended in the lookback."""
    now = time.time()
    fill(env, now - 2 * 3600, now - 45 * 60)
    gate = commpipe(env, "health", "--fail-under", "90", "--since", "30m", "--json")
    assert gate.returncode == 1
    reports = json.loads(gate.stdout)["reports"]
    assert [(r["database"], r["windows_checked"], r["services_under"]) for r in reports] == [
        ("postgres", 0, []), ("duckdb", 0, [])]
    # the same data judged over the last hour: one window, scores fine, the gate passes
    passing = commpipe(env, "health", "--fail-under", "90", "--since", "1h", "--json")
    assert passing.returncode == 0, passing.stdout + passing.stderr
    result = json.loads(passing.stdout)
    assert result["ok"] is True
    assert [(r["database"], r["ok"], r["windows_checked"], r["problems"])
            for r in result["reports"]] == [("postgres", True, 1, []), ("duckdb", True, 1, [])]


def test_the_gate_reads_health_score_from_the_objectives_file(env: dict[str, str],
                                                              tmp_path: Any) -> None:
    """The pattern scores 95: it passes the default 90, fails an objectives file's 96."""
    fill(env, time.time() - 60)
    passing = commpipe(env, "health", "--gate", "--json")
    assert passing.returncode == 0, passing.stdout + passing.stderr
    assert [r["fail_under"] for r in json.loads(passing.stdout)["reports"]] == [90.0, 90.0]
    (tmp_path / "slo.toml").write_text("health_score = 96\n")
    strict = {**env, "COMMPIPE_SLO_FILE": str(tmp_path / "slo.toml")}
    failing = commpipe(strict, "health", "--gate", "--json")
    assert failing.returncode == 1, failing.stdout + failing.stderr
    assert [(r["fail_under"], r["services_under"]) for r in
            json.loads(failing.stdout)["reports"]] == [
        (96.0, [{"service": "orders", "score": 95.0}])] * 2
    assert commpipe(strict, "health", "--json").returncode == 0  # a report, not a gate
