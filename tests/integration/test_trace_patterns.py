"""Issue 10 end to end: real broker, a real worker with its sink, PostgreSQL and DuckDB.

One worker run (module fixture) carries every call below; the tests then read what reached
the databases through ``commpipe trace`` and ``commpipe patterns`` run as a user runs them.
Every expectation is written out here from the calls made: which attempts failed, the
backoffs tenacity was told to wait, the masked texts, the catalogue rows.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
import tenacity
from aiokafka import AIOKafkaProducer
from psycopg.conninfo import make_conninfo

from agents.topics import ensure_topics
from pipeline import Emitter, Settings, edge_key
from pipeline.cli.query import query_duckdb
from pipeline.dev.process import run_sync
from pipeline.errors import CommpipeError
from pipeline.shim.adapters.tenacity import RetryEvents
from tests.integration.workers import wait_until, worker_environment, worker_starter

pytestmark = pytest.mark.integration

RETRIED = ("checkout", "payments", "http")  # the retried calls' edge
SECRET_EDGE = ("checkout", "vault", "http")
RAW_EDGE = ("legacy", "db", "kafka")  # a producer that does not use the shim
SAGA_SEEN = [("orders", "payments", "grpc"), ("orders", "inventory", "http")]
SAGA_MISSING = ("payments", "inventory", "amqp")  # in the saga's flow, never called
LOOKUP = ("gateway", "orders", "http")
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SECRET_TEXT = "vault said no: postgresql://u:secret@h/db and Bearer abc.def"
SECRET_MASKED = "vault said no: postgresql://u:***@h/db and Bearer ***"
RETRY_TEXT = "payments refused: postgresql://u:secret@h/db"
RETRY_MASKED = "payments refused: postgresql://u:***@h/db"
RAW_TEXT = "login failed: password=hunter2 for postgresql://svc:pw123@db/x"
RAW_MASKED = "login failed: password=*** for postgresql://svc:***@db/x"
EVENTS_STORED = 7 + 7 + 1 + 1  # succeeded-at-4, failed-4-times, the secret call, the raw one
EVENTS_COUNT = "SELECT count(*) FROM communication_events"
EDGES_DONE = """
SELECT count(*) FROM (
    SELECT source_service, target_service, protocol FROM communication_rollups
    WHERE source_service IN ('orders', 'gateway') GROUP BY 1, 2, 3
    HAVING sum(responses) = 20) AS done"""


@dataclass
class Run:
    env: dict[str, str]
    succeeded: str  # correlation ids
    failed: str
    secret: str


def commpipe(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "COLUMNS": "200", **env})


def pg_rows(env: dict[str, str], sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(env["COMMPIPE_POSTGRES_DSN"]) as conn:
        return [tuple(r) for r in conn.execute(sql, params).fetchall()]  # type: ignore[arg-type]


def duck_rows(env: dict[str, str], sql: str, params: Any = ()) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in query_duckdb(env["COMMPIPE_DUCKDB_PATH"], sql, params).rows]


def both(env: dict[str, str], sql: str, params: Any = ()) -> list[list[tuple[Any, ...]]]:
    return [pg_rows(env, sql, params or None), duck_rows(env, sql, params)]


def count(env: dict[str, str], which: str, sql: str) -> int:
    try:
        rows = pg_rows(env, sql) if which == "pg" else duck_rows(env, sql)
    except (psycopg.Error, CommpipeError):
        return -1
    return int(rows[0][0])


def retried_call(emitter: Emitter, succeed_at: int | None) -> str:
    """tenacity: four attempts, 200/400/800 ms apart; each attempt timed by the adapter."""
    events = RetryEvents(emitter, *RETRIED[:2], protocol=RETRIED[2], method="POST /charge")
    cid = ""
    try:
        for attempt in tenacity.Retrying(stop=tenacity.stop_after_attempt(4),
                                         wait=tenacity.wait_exponential(multiplier=0.2),
                                         before_sleep=events, reraise=True):
            with attempt, events.call(attempt) as call:
                cid = call.correlation_id
                if attempt.retry_state.attempt_number != succeed_at:
                    raise ConnectionError(RETRY_TEXT)
                call.status_code = 200
    except ConnectionError:
        assert succeed_at is None
    return cid


async def produce_raw(bootstrap: str, topic: str) -> None:
    event = {"v": 1, "kind": "error", "event_id": "raw-1", "correlation_id": "raw-chain-1",
             "source_service": RAW_EDGE[0], "target_service": RAW_EDGE[1],
             "protocol": RAW_EDGE[2], "ts": time.time(), "error_type": "auth",
             "error_message": RAW_TEXT}
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, orjson.dumps(event), key=edge_key(*RAW_EDGE).encode())
    finally:
        await producer.stop()


@pytest.fixture(scope="module")
def run(kafka_bootstrap: str, postgres_dsn: str, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[Run]:
    tmp = tmp_path_factory.mktemp("issue10")
    name = f"commpipe_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]

    def make_topic(partitions: int = 4) -> str:
        topic = f"test.issue10.{uuid.uuid4().hex[:8]}"
        run_sync(lambda: ensure_topics({topic: partitions},
                                       client_options={"bootstrap_servers": kafka_bootstrap}))
        return topic

    env = worker_environment(
        kafka_bootstrap, make_topic, tmp, window_s=10.0, grace_s=5.0, idle_close_s=3,
        COMMPIPE_POSTGRES_DSN=make_conninfo(postgres_dsn, dbname=name),
        COMMPIPE_DUCKDB_PATH=str(tmp / "commpipe.duckdb"), COMMPIPE_SINK_INTERVAL_S="0.5",
        COMMPIPE_PATTERNS_LOOKBACK_S="3600")
    try:
        with worker_starter(env, tmp) as start:
            worker = start()
            emitter = Emitter(kafka_bootstrap, env["COMMPIPE_TOPIC"],
                              settings=Settings.from_env({}, shim_linger_ms=5))
            try:
                succeeded = retried_call(emitter, succeed_at=4)
                failed = retried_call(emitter, succeed_at=None)
                with pytest.raises(PermissionError):
                    with emitter.call(*SECRET_EDGE[:2], protocol=SECRET_EDGE[2],
                                      trace_id=TRACE_ID) as call:
                        secret = call.correlation_id
                        raise PermissionError(SECRET_TEXT)
                for i in range(20):  # the traffic the catalogue is checked against
                    for s, t, p in [*SAGA_SEEN, LOOKUP]:
                        emitter.request(source_service=s, target_service=t, protocol=p)
                        emitter.response(source_service=s, target_service=t, protocol=p,
                                         latency_ms=10.0 + i, status_code=200)
                assert emitter.flush(timeout=30) is True
            finally:
                emitter.close()
            asyncio.run(produce_raw(kafka_bootstrap, env["COMMPIPE_TOPIC"]))
            for which in ("pg", "duck"):
                wait_until(lambda w=which: count(env, w, EVENTS_COUNT) == EVENTS_STORED,
                           timeout=120, what=f"{EVENTS_STORED} events in {which}",
                           logs=worker.log)
                wait_until(lambda w=which: count(env, w, EDGES_DONE) == 3, timeout=120,
                           what=f"the catalogue's edges in {which}", logs=worker.log)
            yield Run({"COMMPIPE_POSTGRES_DSN": env["COMMPIPE_POSTGRES_DSN"],
                       "COMMPIPE_DUCKDB_PATH": env["COMMPIPE_DUCKDB_PATH"]},
                      succeeded, failed, secret)
    finally:
        with psycopg.connect(postgres_dsn, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
            admin.execute(f'DROP DATABASE IF EXISTS "{name}"')  # type: ignore[arg-type]


def attempts(outcome: str, with_response: bool) -> list[tuple[str, int, float | None]]:
    """(kind, attempt, backoff_ms) of the chain, in order: three failed attempts each followed
    by its retry and backoff, then the fourth attempt's outcome."""
    out: list[tuple[str, int, float | None]] = []
    for n, backoff in ((1, 200.0), (2, 400.0), (3, 800.0)):
        out += [("error", n, None), ("retry", n, backoff)]
    return out + [("response" if with_response else "error", 4, None)]


@pytest.mark.parametrize("flags", [[], ["--postgres"]], ids=["duckdb", "postgres"])
def test_trace_shows_the_four_attempts_and_their_backoff(run: Run, flags: list[str]) -> None:
    for cid, outcome, with_response in ((run.succeeded, "succeeded", True),
                                        (run.failed, "failed", False)):
        got = commpipe(run.env, "trace", cid, "--json", *flags)
        assert got.returncode == 0, got.stderr
        chain = json.loads(got.stdout)
        assert [(e["kind"], e["attempt"], e["backoff_ms"]) for e in chain["events"]] == (
            attempts(outcome, with_response))
        assert (chain["attempts"], chain["retries"], chain["total_backoff_ms"],
                chain["outcome"]) == (4, 3, 1400.0, outcome)
        assert chain["edges"] == [{"source_service": "checkout", "target_service": "payments",
                                   "protocol": "http", "attempts": 4, "retries": 3,
                                   "backoff_ms": 1400.0, "outcome": outcome}]
        times = [e["offset_ms"] for e in chain["events"]]
        assert times == sorted(times) and times[-1] >= 1400.0  # tenacity really waited
        assert {(e["correlation_id"], e["method"]) for e in chain["events"]} == {
            (cid, "POST /charge")}
        assert [e["error_message"] for e in chain["events"]] == (
            [RETRY_MASKED] * 6 + ([None] if with_response else [RETRY_MASKED]))
        assert [e["status_code"] for e in chain["events"]][-1] == (200 if with_response
                                                                    else None)
    text = commpipe(run.env, "trace", run.succeeded, *flags)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0] == (f"chain {run.succeeded}: 7 events, 1 edge, 4 attempts, 3 retries, "
                        "total backoff 1,400 ms; outcome: succeeded")
    assert lines[1] == ("  checkout → payments · http: 4 attempts, 3 retries, backoff "
                        "1,400 ms, succeeded")
    rows = [re.split(r"\s{2,}", line.strip()) for line in lines[4:]]
    assert [(r[2], r[3]) + ((r[4],) if r[2] == "retry" else ()) for r in rows] == [
        ("error", "1"), ("retry", "1", "200 ms"), ("error", "2"), ("retry", "2", "400 ms"),
        ("error", "3"), ("retry", "3", "800 ms"), ("response", "4")]


def test_trace_by_trace_id_and_nothing_found(run: Run) -> None:
    for flags in ([], ["--postgres"]):
        by_trace = json.loads(commpipe(run.env, "trace", TRACE_ID, "--json", *flags).stdout)
        assert [(e["kind"], e["correlation_id"], e["error_type"], e["error_message"])
                for e in by_trace["events"]] == [
            ("error", run.secret, "PermissionError", SECRET_MASKED)]
        missing = commpipe(run.env, "trace", "no-such-call", *flags)
        assert missing.returncode == 1 and missing.stdout == ""
        assert "no stored events for no-such-call" in missing.stderr
    bad = commpipe(run.env, "trace", "has space")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert "1-128 printable ASCII characters without spaces" in bad.stderr


def test_secrets_never_reach_the_databases(run: Run) -> None:
    sql = ("SELECT correlation_id, event_type, attempt, error_message FROM communication_events "
           "WHERE source_service IN ('checkout', 'legacy') AND error_message IS NOT NULL "
           "ORDER BY correlation_id, occurred_at, event_type")
    stored = both(run.env, sql)
    retried = {run.succeeded: 6, run.failed: 7}
    want = sorted(
        [(cid, kind, n, RETRY_MASKED) for cid, total in retried.items()
         for n, kind in [(i // 2 + 1, ("error", "retry")[i % 2]) for i in range(total)]]
        + [(run.secret, "error", None, SECRET_MASKED), ("raw-chain-1", "error", None, RAW_MASKED)],
        key=lambda r: r[0])
    for rows in stored:
        assert sorted(rows, key=lambda r: (r[0], r[2] or 0, r[1])) == sorted(
            want, key=lambda r: (r[0], r[2] or 0, r[1]))
    leaks = ("SELECT count(*) FROM communication_events WHERE error_message LIKE '%secret%' "
             "OR error_message LIKE '%abc.def%' OR error_message LIKE '%hunter2%' "
             "OR error_message LIKE '%pw123%'")
    assert [rows[0][0] for rows in both(run.env, leaks)] == [0, 0]


SAGA_YAML = """\
patterns:
  - name: checkout-saga
    type: saga
    services: [orders, payments, inventory]
    flow:
      - {source: orders, target: payments, protocol: grpc}
      - {source: orders, target: inventory, protocol: http}
      - {source: payments, target: inventory, protocol: amqp}
    reliability: at_least_once
    consistency: eventual
    failure_handling: {payment_declined: release the inventory}
    sla: {p95_latency_ms: %s, success_ratio: 0.99}
  - name: order-lookup
    type: request_response
    services: [gateway, orders]
    flow:
      - {source: gateway, target: orders, protocol: http}
    sla: {p95_latency_ms: 100}
"""
CATALOGUE_SQL = """
SELECT pattern_name, pattern_type, services_involved, message_flow, reliability_guarantees,
       consistency_model, failure_handling, performance_sla
FROM message_patterns ORDER BY pattern_name"""


def catalogue(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """JSON columns as values (PostgreSQL parses jsonb, DuckDB returns JSON text)."""
    def value(v: Any) -> Any:
        return orjson.loads(v) if isinstance(v, str) and v[:1] in "[{" else v

    return [tuple(list(v) if isinstance(v, list) else value(v) for v in r) for r in rows]


def expected_catalogue(p95: float) -> list[tuple[Any, ...]]:
    return [
        ("checkout-saga", "saga", ["orders", "payments", "inventory"],
         [{"source": "orders", "target": "payments", "protocol": "grpc"},
          {"source": "orders", "target": "inventory", "protocol": "http"},
          {"source": "payments", "target": "inventory", "protocol": "amqp"}],
         "at_least_once", "eventual", {"payment_declined": "release the inventory"},
         {"p95_latency_ms": p95, "success_ratio": 0.99}),
        ("order-lookup", "request_response", ["gateway", "orders"],
         [{"source": "gateway", "target": "orders", "protocol": "http"}],
         None, None, None, {"p95_latency_ms": 100.0})]


def test_patterns_load_into_both_and_check_reports_the_missing_edge(
        run: Run, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(SAGA_YAML.replace("type: saga", "type: sagaa") % 250)
    refused = commpipe(run.env, "patterns", "load", str(bad))
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert ("pattern 'checkout-saga': field 'type': must be one of request_response, "
            "fire_and_forget, pub_sub, saga (got 'sagaa')") in refused.stderr
    assert [rows for rows in both(run.env, CATALOGUE_SQL)] == [[], []]  # nothing written

    path = tmp_path / "catalogue.yaml"
    for p95 in (5, 250):  # loading again replaces each pattern by name
        path.write_text(SAGA_YAML % p95)
        loaded = commpipe(run.env, "patterns", "load", str(path))
        assert loaded.returncode == 0, loaded.stderr
        assert loaded.stdout.splitlines() == [
            f"{where}: 2 patterns loaded (checkout-saga, order-lookup)"
            for where in ("PostgreSQL", f"DuckDB {run.env['COMMPIPE_DUCKDB_PATH']}")]
        for rows in both(run.env, CATALOGUE_SQL):
            assert catalogue(rows) == expected_catalogue(float(p95))

    for flags, where in (([], f"DuckDB {run.env['COMMPIPE_DUCKDB_PATH']}"),
                         (["--postgres"], "PostgreSQL")):
        text = commpipe(run.env, "patterns", "check", "--since", "1h", *flags)
        assert text.returncode == 1, text.stderr
        assert text.stdout.splitlines() == [
            "checkout-saga (saga, 3 edges): 1 difference",
            "  - flow edge payments → inventory · amqp: no traffic in the last 1h",
            "order-lookup (request_response, 1 edge): as specified",
            f"1 of 2 patterns differ from what {where} observed in the last 1h"]
        result = json.loads(commpipe(run.env, "patterns", "check", "--json", *flags).stdout)
        assert result["ok"] is False and result["since_s"] == 3600.0
        saga, lookup = result["patterns"]
        assert saga["differences"] == [{
            "kind": "edge_not_seen", "observed": None, "expected": None,
            "edge": {"source": "payments", "target": "inventory", "protocol": "amqp"},
            "message": "flow edge payments → inventory · amqp: no traffic in the last 1h"}]
        # twenty responses per seen edge, 10..29 ms: p95 within 1 % of the 19th smallest
        for edge in saga["edges"][:2] + lookup["edges"]:
            assert (edge["seen"], edge["requests"], edge["outcomes"],
                    edge["success_ratio"]) == (True, 20, 20, 1.0)
            assert abs(edge["p95_latency_ms"] - 28.0) <= 0.01 * 28.0
        assert saga["edges"][2]["seen"] is False and lookup["differences"] == []
    # a tighter SLA is a second difference, with the observed value
    path.write_text(SAGA_YAML % 5)
    assert commpipe(run.env, "patterns", "load", str(path), "--no-postgres").returncode == 0
    result = json.loads(commpipe(run.env, "patterns", "check", "--json").stdout)
    kinds = [(d["kind"], d["edge"]["source"], d["edge"]["target"], d["expected"])
             for d in result["patterns"][0]["differences"]]
    assert kinds == [("p95_latency", "orders", "payments", 5.0),
                     ("p95_latency", "orders", "inventory", 5.0),
                     ("edge_not_seen", "payments", "inventory", None)]
    bad_since = commpipe(run.env, "patterns", "check", "--since", "1x")
    assert bad_since.returncode == 1 and "'1x' is not a duration" in bad_since.stderr
