"""``commpipe query`` cannot write: not to the database, not to another file.

The reproductions of issue 23 and more of their kinds, each run as a user would, against
the real PostgreSQL and a real DuckDB file; after each the data is checked unchanged and
no file written. PostgreSQL runs the statement as a cursor in a read-only transaction
(one SELECT, WITH ... SELECT, VALUES or TABLE; the server refuses anything else), with
the session read-only too and, where the connecting role may, as ``pg_read_all_data``
(no superuser powers: no server files). DuckDB opens the file read-only, turns off
access to any other file and locks its configuration, and runs one statement.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import psycopg
import pytest

from pipeline.sink.migrations import migrate_duckdb, migrate_postgres

pytestmark = pytest.mark.integration

INSERT = ("INSERT INTO communication_patterns (source_service, target_service, "
          "communication_type, protocol, message_format) VALUES "
          "('orders', 'payments', 'synchronous', 'http', 'json')")
COUNT = "SELECT count(*) FROM communication_patterns"


def commpipe(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "COLUMNS": "300", **env})


@pytest.fixture
def env(pg_database: str, duckdb_path: str) -> dict[str, str]:
    migrate_postgres(pg_database)
    migrate_duckdb(duckdb_path)
    with psycopg.connect(pg_database) as pg:
        pg.execute(INSERT)  # type: ignore[arg-type]
    with duckdb.connect(duckdb_path) as dk:
        dk.execute(INSERT)
    return {"COMMPIPE_POSTGRES_DSN": pg_database, "COMMPIPE_DUCKDB_PATH": duckdb_path}


def pg_count(dsn: str) -> int:
    with psycopg.connect(dsn) as pg:
        return int(pg.execute(COUNT).fetchone()[0])  # type: ignore[index]


def refused(done: subprocess.CompletedProcess[str]) -> str:
    """The one error line of a refused query."""
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


@pytest.mark.parametrize("sql", [
    "COMMIT; DELETE FROM communication_patterns",  # the three
    "SET TRANSACTION READ WRITE; DELETE FROM communication_patterns",
    "ROLLBACK; DROP TABLE communication_patterns",
    "DELETE FROM communication_patterns",
    "COMMIT",
    "SET default_transaction_read_only = off",
    "WITH gone AS (DELETE FROM communication_patterns RETURNING *) SELECT * FROM gone",
    "SELECT 1; DELETE FROM communication_patterns",
    "SELECT set_config('transaction_read_only', 'off', true)",
    "TRUNCATE communication_patterns",
])
def test_postgres_query_cannot_change_the_database(env: dict[str, str], sql: str) -> None:
    done = commpipe(env, "query", "--postgres", sql)
    line = refused(done)
    assert line.startswith("error: PostgreSQL (")
    assert pg_count(env["COMMPIPE_POSTGRES_DSN"]) == 1
    with psycopg.connect(env["COMMPIPE_POSTGRES_DSN"]) as pg:
        assert pg.execute("SELECT to_regclass('communication_patterns')").fetchone() == (
            "communication_patterns",)


def test_postgres_query_cannot_write_server_files(env: dict[str, str], tmp_path: Path) -> None:
    """The embedded server's role is a superuser, which may write files from SQL."""
    dsn = env["COMMPIPE_POSTGRES_DSN"]
    with psycopg.connect(dsn) as pg:
        (oid,) = pg.execute("SELECT lo_from_bytea(0, 'secret')").fetchone()  # type: ignore[misc]
    target = tmp_path / "out"
    target.mkdir()
    os.chmod(target, 0o777)  # the server runs as another user
    for sql in (f"COPY communication_patterns TO '{target / 'copy.csv'}'",
                f"SELECT lo_export({oid}, '{target / 'lo.bin'}')",
                "SELECT pg_read_file('/etc/hostname')"):
        refused(commpipe(env, "query", "--postgres", sql))
    assert list(target.iterdir()) == []


@pytest.mark.parametrize("statement", [
    "ATTACH '{other}' AS o (READ_WRITE); DELETE FROM o.t",  # the two
    "COPY communication_patterns TO '{out}'",
    "ATTACH '{other}' AS o (READ_WRITE)",
    "SELECT 1; DELETE FROM communication_patterns",
    "DELETE FROM communication_patterns",
    "EXPORT DATABASE '{outdir}'",
    "SET enable_external_access = true",
    "SELECT * FROM read_csv('{other}')",
])
def test_duckdb_query_cannot_write_the_file_or_any_other(
        env: dict[str, str], tmp_path: Path, statement: str) -> None:
    other = tmp_path / "other.duckdb"
    with duckdb.connect(str(other)) as o:
        o.execute("CREATE TABLE t AS SELECT 42 AS answer")
    out, outdir = tmp_path / "copy.csv", tmp_path / "export"
    sql = statement.format(other=other, out=out, outdir=outdir)
    line = refused(commpipe(env, "query", sql))
    assert line.startswith("error: ")
    assert not out.exists() and not outdir.exists()
    with duckdb.connect(str(other), read_only=True) as o:
        assert o.execute("SELECT answer FROM t").fetchall() == [(42,)]
    with duckdb.connect(env["COMMPIPE_DUCKDB_PATH"], read_only=True) as dk:
        assert dk.execute(COUNT).fetchall() == [(1,)]


def test_more_than_one_statement_is_refused_with_a_clear_message(env: dict[str, str]) -> None:
    line = refused(commpipe(env, "query", "SELECT 1; SELECT 2"))
    assert line == ("error: commpipe query runs one statement; this SQL holds 2 "
                    "(run them one at a time)")


@pytest.mark.parametrize("sql", [
    "SELECT source_service, protocol FROM communication_patterns",
    "WITH p AS (SELECT source_service, protocol FROM communication_patterns) SELECT * FROM p",
    "SELECT source_service, protocol FROM communication_patterns;",
])
def test_queries_still_work_in_both(env: dict[str, str], sql: str) -> None:
    for flag in ([], ["--postgres"]):
        done = commpipe(env, "query", *flag, "--format", "json", sql)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == [{"source_service": "orders", "protocol": "http"}]


def test_values_table_and_describe(env: dict[str, str]) -> None:
    done = commpipe(env, "query", "--postgres", "--format", "json", "VALUES (1, 'a')")
    assert (done.returncode, json.loads(done.stdout)) == (
        0, [{"column1": 1, "column2": "a"}]), done.stderr
    done = commpipe(env, "query", "--postgres", "--format", "json",
                    "TABLE communication_patterns")
    assert done.returncode == 0 and len(json.loads(done.stdout)) == 1, done.stderr
    done = commpipe(env, "query", "--format", "json", "DESCRIBE communication_patterns")
    assert done.returncode == 0, done.stderr
    assert "protocol" in [row["column_name"] for row in json.loads(done.stdout)]
