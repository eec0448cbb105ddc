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


def _topics(bootstrap: str) -> list[str]:
    from aiokafka.admin import AIOKafkaAdminClient

    from pipeline.dev.process import run_sync

    async def topics() -> list[str]:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            return list(await admin.list_topics())
        finally:
            await admin.close()

    return run_sync(topics)


@pytest.mark.parametrize(("env", "message"), [
    ({"COMMPIPE_WINDOW_S": "nan"}, "error: COMMPIPE_WINDOW_S must be a finite number, got nan"),
    ({"COMMPIPE_SLO_FILE": "/nonexistent/slo.toml"},
     "error: COMMPIPE_SLO_FILE: no such file '/nonexistent/slo.toml'"),
    ({"COMMPIPE_WORKER_FETCH_WAIT_MS": "-1"},
     "error: COMMPIPE_WORKER_FETCH_WAIT_MS must be >= 0, got -1")])
def test_the_worker_refuses_a_setting_that_cannot_work_before_creating_topics(
        kafka_bootstrap: str, env: dict[str, str], message: str, tmp_path: Path) -> None:
    import uuid

    topic = f"test.refused.{uuid.uuid4().hex[:8]}"
    done = commpipe({"COMMPIPE_KAFKA_BOOTSTRAP": kafka_bootstrap, "COMMPIPE_TOPIC": topic,
                     "COMMPIPE_DLQ_TOPIC": f"{topic}.dlq", "COMMPIPE_WINDOWS_S": "5",
                     "COMMPIPE_WORKER_DATADIR": str(tmp_path), **env}, "worker")
    warning, _, rest = done.stderr.partition("\n")
    assert warning == ("warning: COMMPIPE_WINDOWS_S is not a commpipe setting and is ignored "
                       "(did you mean COMMPIPE_WINDOW_S?)")
    assert one_error(subprocess.CompletedProcess(done.args, done.returncode, done.stdout,
                                                 rest)) == message
    assert "[red]" not in done.stderr
    assert not [t for t in _topics(kafka_bootstrap) if t.startswith(topic)]


def test_the_worker_waits_for_a_broker_that_is_not_up_yet(tmp_path: Path) -> None:
    """As honcho starts it beside the broker: it retries, one line each, then runs."""
    import time
    import urllib.request

    from pipeline.dev.broker import EmbeddedBroker
    from pipeline.dev.process import free_port, terminate_process

    port, metrics = free_port(), free_port()
    env = {**os.environ, "COMMPIPE_KAFKA_BOOTSTRAP": f"127.0.0.1:{port}",
           "COMMPIPE_METRICS_PORT": str(metrics), "COMMPIPE_WORKER_DATADIR": str(tmp_path),
           "COMMPIPE_APP_ID": "waits", "COMMPIPE_DUCKDB_PATH": "", "COMMPIPE_POSTGRES_DSN": "",
           "COMMPIPE_WORKER_CHANGELOG_LAST_ALONE": "true", "COMMPIPE_BROKER_WAIT_S": "60",
           "COMMPIPE_BROKER_SESSION_TIMEOUT_S": "6", "COMMPIPE_BROKER_HEARTBEAT_INTERVAL_S": "1",
           "COLUMNS": "300"}
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "worker"], env=env,
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        waiting = (f"worker: Kafka at 127.0.0.1:{port} is not reachable yet (attempt 2); "
                   "retrying for up to")
        deadline = time.monotonic() + 30
        while waiting not in log.read_text():
            assert worker.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        with EmbeddedBroker(port, log_path=tmp_path / "tansu.log"):
            deadline = time.monotonic() + 60
            while True:
                assert worker.poll() is None, log.read_text()
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/health",
                                                timeout=2) as r:  # noqa: S310 - loopback
                        assert r.read() == b"ok\n"
                        break
                except OSError:
                    assert time.monotonic() < deadline, log.read_text()
                    time.sleep(0.5)
    finally:
        terminate_process(worker, timeout=20, group=True)


def test_the_demo_refuses_a_metrics_port_of_0_at_once(tmp_path: Path) -> None:
    """Port 0 turns /metrics off, and the demo follows the worker there: it used to show 0
    edges and wait 60 s for nothing."""
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "demo", "--duration", "5"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env={**os.environ, "COLUMNS": "300", "COMMPIPE_METRICS_PORT": "0"})
    assert one_error(done) == (
        "error: COMMPIPE_METRICS_PORT=0 turns the worker's /metrics off, and the demo follows "
        "the worker there: unset it (a free port is chosen) or choose a port")
    assert not (tmp_path / ".commpipe").exists()  # nothing was started
