"""Unusual but valid command lines get one line saying what is wrong, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.sink.migrations import migrate_duckdb

pytestmark = pytest.mark.integration


def commpipe(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "COLUMNS": "300", **env})


def one_error(done: subprocess.CompletedProcess[str]) -> str:
    """The one error message (rich wraps it at the terminal's width: joined again here)."""
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr and "╭" not in done.stderr, done.stderr
    assert done.stderr.startswith("error: ") and done.stderr.count("error:") == 1
    return " ".join(done.stderr.split())


NO_SQL = 'error: no SQL given: pass one query, e.g. commpipe query "SELECT * FROM ' \
    'communication_rollups LIMIT 5"'


def test_query_without_sql(pg_database: str, duckdb_path: str) -> None:
    migrate_duckdb(duckdb_path)
    env = {"COMMPIPE_POSTGRES_DSN": pg_database, "COMMPIPE_DUCKDB_PATH": duckdb_path}
    for sql in ("", "   "):
        assert one_error(commpipe(env, "query", sql)) == NO_SQL
        assert one_error(commpipe(env, "query", "--postgres", sql)) == NO_SQL
    assert one_error(commpipe(env, "query", "; ;")) == (
        "error: no SQL statement given (only comments or semicolons)")


@pytest.mark.parametrize("args", [["query", "SELECT 1"], ["trace", "6f42c1"],
                                  ["patterns", "check"]])
def test_an_empty_duckdb_path_is_named(args: list[str]) -> None:
    env = {"COMMPIPE_DUCKDB_PATH": "", "COMMPIPE_POSTGRES_DSN": ""}
    assert one_error(commpipe(env, *args)) == (
        "error: COMMPIPE_DUCKDB_PATH is empty, so there is no DuckDB file to read (the DuckDB "
        "sink is off): set it to the sink's file, or use --postgres")


def test_a_directory_as_duckdb_path_is_named(tmp_path: Path) -> None:
    env = {"COMMPIPE_DUCKDB_PATH": str(tmp_path)}
    assert one_error(commpipe(env, "query", "SELECT 1")) == (
        f"error: {tmp_path} is a directory, not a DuckDB file: set COMMPIPE_DUCKDB_PATH to "
        "the file the sink writes")


def test_migrate_into_a_folder_that_cannot_be_created(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    path = blocker / "sub" / "commpipe.duckdb"
    env = {"COMMPIPE_DUCKDB_PATH": str(path), "COMMPIPE_POSTGRES_DSN": ""}
    line = one_error(commpipe(env, "migrate"))
    assert line == (f"error: cannot create the folder {blocker / 'sub'} for DuckDB file {path}"
                    " (Not a directory): set COMMPIPE_DUCKDB_PATH to a file in a folder that "
                    "exists or can be created")
    assert not (blocker / "sub").exists()
