"""Objectives end to end: one edge breaks each objective, one meets them all; the stored
results (both databases), the exporter's gauges and ``commpipe health --fail-under 90``
must match what is computed here from the same events."""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline import Emitter, Settings
from pipeline.dev.process import free_port
from tests.integration.test_cli_sql import commpipe
from tests.integration.test_metrics import scrape
from tests.integration.test_sink import Databases, expected_health, expected_patterns
from tests.integration.traffic import WINDOW, Expected, emit_all
from tests.integration.workers import wait_until, worker_environment, worker_starter

pytestmark = pytest.mark.integration

OK = ("gateway", "orders", "http")
P95 = ("orders", "inventory", "http")         # p95 over 100 ms, every call within 200
MAX = ("orders", "payments", "grpc")          # one call of 250 ms
SUCCESS = ("payments", "bank", "amqp")        # 2 failures in 1,000 outcomes
BACKOFF = ("inventory", "db", "kafka")        # one call backs off 200 + 400 + 800 ms
REACTION = ("checkout", "fraud", "grpc")      # open reported 80 ms after the last failure
SYNC = ("http", "grpc")


def edge_events(rng: random.Random, t0: float) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(edge: tuple[str, str, str], kind: str, ts: float, **extra: Any) -> None:
        s, t, p = edge
        out.append({"kind": kind, "source_service": s, "target_service": t, "protocol": p,
                    "ts": round(ts, 3), **extra})

    def responses(edge: tuple[str, str, str], n: int, low: float, high: float) -> None:
        for i in range(n):
            add(edge, "response", t0 + 0.5 + 8 * i / n, latency_ms=round(rng.uniform(low, high), 2))

    responses(OK, 300, 5, 60)
    for call in range(4):  # four calls retried twice, 300 ms each (1,200 ms in the window)
        for i, backoff in enumerate((100.0, 200.0)):
            add(OK, "retry", t0 + 1 + call + i * 0.5, correlation_id=f"ok-call-{call}",
                attempt=i + 1, backoff_ms=backoff)
    responses(P95, 300, 110, 190)
    responses(MAX, 299, 5, 60)
    add(MAX, "response", t0 + 9.0, latency_ms=250.0)
    responses(SUCCESS, 998, 5, 60)
    add(SUCCESS, "error", t0 + 8.7, error_type="connection", latency_ms=20.0)
    add(SUCCESS, "timeout", t0 + 8.8, latency_ms=150.0)
    responses(BACKOFF, 200, 5, 60)
    for i, backoff in enumerate((200.0, 400.0, 800.0)):
        add(BACKOFF, "retry", t0 + 2 + i, correlation_id="slow-call", attempt=i + 1,
            backoff_ms=backoff)
    responses(REACTION, 1999, 5, 60)
    add(REACTION, "error", t0 + 8.90, error_type="http_5xx", latency_ms=30.0)
    add(REACTION, "circuit", t0 + 8.98, circuit_state="open")
    return sorted(out, key=lambda e: e["ts"])


def expected_results(events: list[dict[str, Any]]) -> dict[tuple[Any, ...], tuple[float, bool]]:
    """(edge, objective) -> (measured, ok), computed plainly from the events."""
    out: dict[tuple[Any, ...], tuple[float, bool]] = {}
    for edge in (OK, P95, MAX, SUCCESS, BACKOFF, REACTION):
        mine = [e for e in events if (e["source_service"], e["target_service"],
                                      e["protocol"]) == edge]
        lat = sorted(e["latency_ms"] for e in mine if e["kind"] in ("response", "error",
                                                                     "timeout"))
        if edge[2] in SYNC:
            p95 = lat[math.floor(0.95 * (len(lat) - 1))]
            out[(edge, "latency_p95")] = (p95, p95 < 100)
        out[(edge, "latency_max")] = (lat[-1], lat[-1] <= 200)
        ok_n = sum(e["kind"] == "response" for e in mine)
        success = ok_n / sum(e["kind"] in ("response", "error", "timeout") for e in mine)
        out[(edge, "delivery_success")] = (success, success > 0.999)
        calls: dict[str, float] = {}
        for e in mine:
            if e["kind"] == "retry":
                calls[e["correlation_id"]] = calls.get(e["correlation_id"], 0) + e["backoff_ms"]
        if calls:
            out[(edge, "retry_backoff")] = (max(calls.values()), max(calls.values()) <= 1000)
        for e in mine:
            if e["kind"] == "circuit" and e["circuit_state"] == "open":
                failed = max(f["ts"] for f in mine if f["kind"] in ("error", "timeout")
                             and f["ts"] <= e["ts"])
                reaction = (e["ts"] - failed) * 1000
                out[(edge, "circuit_reaction")] = (reaction, reaction <= 50)
    return out


SLO_SQL = """SELECT source_service, target_service, protocol, objective, measured, ok, miss,
threshold FROM communication_slo ORDER BY 1, 2, 3, 4"""


def check_rows(rows: list[tuple[Any, ...]], want: dict[tuple[Any, ...], tuple[float, bool]]
               ) -> None:
    got = {((r[0], r[1], r[2]), r[3]): r for r in rows}
    assert set(got) == set(want)
    for key, (measured, ok) in want.items():
        row = got[key]
        rel = 0.01 if key[1] == "latency_p95" else 1e-9
        assert row[4] == pytest.approx(measured, rel=rel, abs=1e-6), key
        assert bool(row[5]) is ok, key
        miss = 0.0 if ok else (row[7] - row[4] if key[1] == "delivery_success"
                               else row[4] - row[7])
        assert row[6] == pytest.approx(miss, abs=1e-9), key


def test_each_objective_broken_by_one_edge(
        kafka_bootstrap: str, topic_factory: Callable[..., str], tmp_path: Path,
        pg_database: str) -> None:
    port = free_port()
    env = worker_environment(
        kafka_bootstrap, topic_factory, tmp_path, window_s=WINDOW, grace_s=5.0, idle_close_s=3,
        COMMPIPE_POSTGRES_DSN=pg_database, COMMPIPE_DUCKDB_PATH=str(tmp_path / "slo.duckdb"),
        COMMPIPE_METRICS_PORT=str(port), COMMPIPE_METRICS_HOST="127.0.0.1",
        COMMPIPE_PATTERNS_LOOKBACK_S="3600", COMMPIPE_SINK_INTERVAL_S="0.5")
    t0 = math.floor(time.time() / WINDOW) * WINDOW - 300
    events = edge_events(random.Random(10), t0)
    want = expected_results(events)
    assert sorted(k for k, (_, ok) in want.items() if not ok) == sorted([
        (P95, "latency_p95"), (MAX, "latency_max"), (SUCCESS, "delivery_success"),
        (BACKOFF, "retry_backoff"), (REACTION, "circuit_reaction")])
    expected = Expected()
    db = Databases(pg_database, env["COMMPIPE_DUCKDB_PATH"])
    with worker_starter(env, tmp_path) as start:
        worker = start()
        emitter = Emitter(kafka_bootstrap, env["COMMPIPE_TOPIC"],
                          settings=Settings.from_env({}, shim_linger_ms=5))
        try:
            emit_all(emitter, events, expected)
        finally:
            emitter.close()
        for which in ("pg", "duck"):
            wait_until(lambda w=which: db.count(w, "communication_slo") == len(want), timeout=120,
                       what=f"objectives in {which}", logs=worker.log)
        pg, duck = db.both(SLO_SQL)
        check_rows(pg, want)
        check_rows(duck, want)

        # the exporter: the same judgement over each edge's last closed window
        metrics = scrape(env)
        for (edge, objective), (measured, ok) in want.items():
            labels = tuple(sorted({"source_service": edge[0], "target_service": edge[1],
                                   "protocol": edge[2], "objective": objective}.items()))
            assert metrics[("commpipe_slo_ok", labels)] == (1.0 if ok else 0.0), objective
            rel = 0.01 if objective == "latency_p95" else 1e-9
            assert metrics[("commpipe_slo_measured", labels)] == pytest.approx(
                measured, rel=rel, abs=1e-6), objective

    # the gate: services under 90 (the specification's scoring, written out) and the misses
    health = expected_health(expected_patterns(expected), expected)
    under = sorted((row[0], float(row[1])) for row in health if row[1] < 90)
    cli_env = {"COMMPIPE_POSTGRES_DSN": pg_database, "COMMPIPE_DUCKDB_PATH": db.duckdb_path}
    gate = commpipe(cli_env, "health", "--fail-under", "90", "--json")
    assert gate.returncode == 1, gate.stderr
    result = json.loads(gate.stdout)
    assert result["ok"] is False and len(result["reports"]) == 2
    for report in result["reports"]:
        assert sorted((u["service"], u["score"]) for u in report["services_under"]) == under
        assert sorted((m["source_service"], m["target_service"], m["protocol"], m["objective"])
                      for m in report["slo_misses"]) == sorted(
            (*edge, objective) for (edge, objective), (_, ok) in want.items() if not ok)
    table = commpipe(cli_env, "health", "--fail-under", "90")
    assert table.returncode == 1 and "objectives missed in the last 1h" in table.stdout
    # with the misses gone and a threshold every service meets, the gate passes
    with __import__("psycopg").connect(pg_database, autocommit=True) as conn:
        conn.execute("DELETE FROM communication_slo WHERE NOT ok")
    passing = commpipe({"COMMPIPE_POSTGRES_DSN": pg_database, "COMMPIPE_DUCKDB_PATH": ""},
                       "health", "--fail-under", str(min(float(r[1]) for r in health)))
    assert passing.returncode == 0, passing.stdout + passing.stderr
