"""``commpipe demo`` as a user runs it: a subprocess, to the end, then the databases."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest

from pipeline.cli.loadgen import ALL_EDGES, EDGES
from pipeline.cli.query import query_duckdb
from tests.integration.cascade_traffic import expected_cascades
from tests.integration.workers import broker_env

pytestmark = pytest.mark.integration

DURATION = 45


def test_demo_runs_to_the_end_and_leaves_rollups_for_every_edge(
        kafka_bootstrap: str, topic_factory: Callable[..., str], pg_database: str,
        tmp_path: Path) -> None:
    env = {**os.environ, **broker_env(kafka_bootstrap), "COMMPIPE_KAFKA_BOOTSTRAP": kafka_bootstrap,
           "COMMPIPE_TOPIC": topic_factory(4), "COMMPIPE_DLQ_TOPIC": topic_factory(4),
           "COMMPIPE_APP_ID": f"demo{uuid.uuid4().hex[:8]}", "COMMPIPE_POSTGRES_DSN": pg_database,
           "COLUMNS": "160"}
    env.pop("COMMPIPE_DUCKDB_PATH", None)
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "demo", "--duration",
                           str(DURATION), "--rate", "50", "--seed", "3"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=DURATION + 150)
    log = tmp_path / ".commpipe/demo/worker.log"
    assert done.returncode == 0, done.stderr[-3000:] + (log.read_text()[-3000:]
                                                        if log.exists() else "")
    duckdb_file = tmp_path / "commpipe.duckdb"
    assert f"{len(ALL_EDGES)} edges seen" in done.stdout  # the live view read /metrics
    assert str(duckdb_file) in done.stdout.replace("\n", "")
    assert done.stdout.count('commpipe query "SELECT') == 3
    sql = ("SELECT source_service, target_service, protocol, count(*), sum(requests) "
           "FROM communication_rollups GROUP BY 1, 2, 3 ORDER BY 1, 2, 3")
    in_duck = query_duckdb(duckdb_file, sql).rows
    with psycopg.connect(pg_database) as conn:
        in_pg = [tuple(r) for r in conn.execute(sql).fetchall()]  # type: ignore[arg-type]
    assert [r[:3] for r in in_duck] == list(ALL_EDGES)
    # several windows each; requests on every call edge (health-check edges carry none)
    assert all(r[3] >= 2 for r in in_duck)
    assert all(r[4] > 0 for r in in_duck if r[:3] in EDGES)
    assert in_pg == in_duck
    transitions = query_duckdb(duckdb_file, "SELECT circuit_transitions FROM "
                               "communication_rollups WHERE source_service = 'payments' "
                               "AND target_service = 'bank'").rows
    seen = set()
    for (value,) in transitions:
        seen |= {k for k, n in orjson.loads(value).items() if n}
    # the pybreaker breaker tripped during a burst and recovered
    assert {"reported:open", "reported:closed"} <= seen
    # the service graph of the run, where the demo says it wrote it
    said = next(line for line in done.stdout.splitlines()
                if line.startswith("The service graph: "))
    html, svg = (tmp_path / ".commpipe/demo/graph.html", tmp_path / ".commpipe/demo/graph.svg")
    assert said.startswith(f"The service graph: {html} and {svg} (again: commpipe graph")
    for page in (html.read_text(), svg.read_text()):
        for s, t, p in ALL_EDGES:
            assert f'id="edge:{s}/{t}/{p}"' in page
            assert f'id="service:{s}"' in page and f'id="service:{t}"' in page
    # the example queries run as printed
    for line in done.stdout.splitlines():
        if 'commpipe query "' in line:
            query = line.split('commpipe query "', 1)[1].rsplit('"', 1)[0]
            assert query_duckdb(duckdb_file, query).columns

    check_gates_fire(env, tmp_path, duckdb_file, pg_database)


FAILURES = """SELECT event_type, source_service, target_service, protocol, trace_id, span_id,
parent_span_id, extract(epoch FROM occurred_at) FROM communication_events
WHERE event_type IN ('error', 'timeout')"""
WINDOWS = """SELECT source_service, target_service, protocol, extract(epoch FROM window_start),
extract(epoch FROM window_end) FROM communication_rollups"""


def check_gates_fire(env: dict[str, str], tmp_path: Path, duckdb_file: Path,
                     pg_database: str) -> None:
    """After the demo, only http and grpc approved: check exits 1 and names the unapproved
    protocols, the unprotected edges and the edges failures cascaded up, as the stored
    events say (the cascade definition applied here by plain loops)."""
    config = tmp_path / ".communication.yml"
    config.write_text("approved_protocols: [http, grpc]\n")
    keys = ("kind", "source_service", "target_service", "protocol", "trace_id", "span_id",
            "parent_span_id", "ts")
    failures = [dict(zip(keys, (*r[:7], float(r[7])), strict=True))
                for r in query_duckdb(duckdb_file, FAILURES).rows]
    windows: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    for s, t, p, start, end in query_duckdb(duckdb_file, WINDOWS).rows:
        windows.setdefault((s, t, p), []).append((float(start), float(end)))
    cascades = expected_cascades(failures)
    cascaded = {c["edge"] for c in cascades.values()
                if any(a <= c["ts"] < b for a, b in windows[c["edge"]])}
    assert {("gateway", "orders", "http"), ("orders", "payments", "grpc")} <= cascaded
    retried = query_duckdb(duckdb_file, "SELECT sum(retries) FROM communication_rollups WHERE "
                           "source_service = 'orders' AND target_service = 'payments'").rows
    assert retried[0][0] > 0
    protected = {("orders", "payments", "grpc"), ("payments", "bank", "amqp")}
    for flag in ((), ("--postgres",)):
        report_path = tmp_path / "protocol-report.json"
        done = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "check", "--config", str(config), "--since",
             "1h", "--report", str(report_path), *flag], cwd=tmp_path, capture_output=True,
            text=True, timeout=120, env={**env, "COMMPIPE_DUCKDB_PATH": str(duckdb_file)})
        assert done.returncode == 1, done.stdout + done.stderr
        report = json.loads(report_path.read_text())
        gates = {g["name"]: g for g in report["gates"]}

        def edges(name: str, gates: dict[str, Any] = gates) -> set[tuple[str, str, str]]:
            return {(o["source_service"], o["target_service"], o["protocol"])
                    for o in gates[name]["offenders"]}

        assert edges("approved_protocols") == {e for e in ALL_EDGES
                                               if e[2] not in ("http", "grpc")}
        assert {o["protocol"] for o in gates["approved_protocols"]["offenders"]} == {
            "amqp", "kafka", "soap"}
        assert edges("resilience_coverage") == set(EDGES) - protected
        assert edges("cascade_failure_rate") == cascaded
        assert not any(gates[n]["passed"] for n in ("approved_protocols",
                                                    "resilience_coverage",
                                                    "cascade_failure_rate"))
        assert gates["dead_letter_ratio"]["passed"] is False
