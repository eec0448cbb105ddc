"""Issue 18 end to end: call trees with trace context through the shim, a real worker and its
sink into PostgreSQL and DuckDB; the cascade views, ``commpipe trace`` and ``commpipe check``
read back and compared with what is computed here from the emitted events
(:mod:`tests.integration.cascade_traffic`, :mod:`tests.integration.test_sink`'s written-out
health scoring). Also: a worker of before ``parent_span_id`` counts records carrying it."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from pipeline import Emitter, Settings
from pipeline.cli.check import REPORT_SCHEMA
from tests.before_parent_span import tree_before
from tests.integration import cascade_traffic as ct
from tests.integration.test_sink import Databases, expected_health, expected_patterns
from tests.integration.test_stream_job import applied_events
from tests.integration.test_trace_patterns import commpipe
from tests.integration.traffic import Expected, emit_all
from tests.integration.workers import (
    WorkerProcess,
    read_state,
    read_topic,
    wait_until,
    worker_environment,
    worker_starter,
)

pytestmark = pytest.mark.integration

N_WINDOWS, PER_WINDOW = 4, 45
RETRIED = ("orders", "payments", "grpc")     # protected by its retries
BREAKER = ("payments", "bank", "amqp")       # protected by its reported breaker
DECLARED = ("gateway", "orders", "http")     # protected by the config
DEAD = ("inventory", "db", "kafka")          # three dead-lettered messages
CASCADES = """SELECT span_id, source_service, target_service, protocol, downstream_span_id,
downstream_source_service, downstream_target_service, downstream_protocol, trace_id
FROM communication_cascades ORDER BY span_id"""
WINDOWS = """SELECT extract(epoch FROM window_start), source_service, target_service, protocol,
calls, failures, cascades, cascade_ratio FROM communication_cascade_windows ORDER BY 1, 2, 3, 4"""
SERVICES = """SELECT extract(epoch FROM window_start), service_name, calls, failures, cascades,
cascade_ratio FROM communication_cascade_services ORDER BY 1, 2"""
OUTCOMES = "SELECT coalesce(sum(responses + errors + timeouts), 0) FROM communication_rollups"


def extras(window_start: float, w: int) -> list[dict[str, Any]]:
    """Retries, breaker events, dead letters and health checks, without trace context."""
    out: list[dict[str, Any]] = []
    s, t, p = RETRIED
    for i in range(2):
        out.append({"kind": "retry", "source_service": s, "target_service": t, "protocol": p,
                    "attempt": 1, "backoff_ms": 100.0, "correlation_id": f"r{w}x{i}",
                    "ts": window_start + 2.0 + i})
    if w == 1:
        s, t, p = BREAKER
        out += [{"kind": "circuit", "source_service": s, "target_service": t, "protocol": p,
                 "circuit_state": state, "ts": window_start + at}
                for state, at in (("open", 3.0), ("closed", 6.0))]
    if w == 2:
        s, t, p = DEAD
        out += [{"kind": "error", "source_service": s, "target_service": t, "protocol": p,
                 "error_type": "dead_letter", "latency_ms": 1.0, "ts": window_start + 4 + i / 10}
                for i in range(3)]
    out += [{"kind": "health", "source_service": "gateway", "target_service": target,
             "protocol": "http", "health_status": "healthy", "check_type": "http",
             "ts": window_start + 1.5} for target in ("orders", "payments")]
    return out


@dataclass
class Run:
    env: dict[str, str]
    db: Databases
    events: list[dict[str, Any]]
    trees: list[ct.Tree]
    cascades: dict[str, dict[str, Any]]
    tmp: Path


@pytest.fixture(scope="module")
def run(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory,
        pg_database_module: str, module_topics: Callable[..., str]) -> Iterator[Run]:
    tmp = tmp_path_factory.mktemp("cascades")
    pg_database, topic_factory = pg_database_module, module_topics
    env = worker_environment(
        kafka_bootstrap, topic_factory, tmp, window_s=ct.WINDOW, grace_s=5.0, idle_close_s=3,
        COMMPIPE_POSTGRES_DSN=pg_database, COMMPIPE_DUCKDB_PATH=str(tmp / "c.duckdb"),
        COMMPIPE_PATTERNS_LOOKBACK_S="3600", COMMPIPE_SINK_INTERVAL_S="0.5")
    rng = random.Random(18)
    t0 = math.floor(time.time() / ct.WINDOW) * ct.WINDOW - 300
    phases, trees = [], []
    for w in range(N_WINDOWS):
        mine = ct.operations(rng, t0 + w * ct.WINDOW, PER_WINDOW)
        trees += mine
        phases.append(sorted([e for tree in mine for e in tree.events]
                             + extras(t0 + w * ct.WINDOW, w), key=lambda e: e["ts"]))
    events = [e for phase in phases for e in phase]
    db = Databases(pg_database, env["COMMPIPE_DUCKDB_PATH"])
    outcomes = sum(e["kind"] in ("response", "error", "timeout") for e in events)
    with worker_starter(env, tmp) as start:
        worker = start()
        emitter = Emitter(kafka_bootstrap, env["COMMPIPE_TOPIC"],
                          settings=Settings.from_env({}, shim_linger_ms=5))
        try:
            for phase in phases:
                emit_all(emitter, phase)
        finally:
            emitter.close()
        for which in ("pg", "duck"):
            wait_until(lambda w=which: _outcomes(db, w) == outcomes, timeout=180,
                       what=f"{outcomes} outcomes in {which}", logs=worker.log)
        time.sleep(2.0)  # the kept events go with (or before) their window; one more round
    yield Run(env, db, events, trees, ct.expected_cascades(events), tmp)


def _outcomes(db: Databases, which: str) -> int:
    try:
        return int((db.pg if which == "pg" else db.duck)(OUTCOMES)[0][0])
    except Exception:  # noqa: BLE001 - not migrated yet
        return -1


@pytest.fixture(scope="module")
def pg_database_module(postgres_dsn: str) -> Iterator[str]:
    """A fresh database for this module's one worker run (``pg_database`` is per test)."""
    import uuid

    import psycopg
    from psycopg.conninfo import make_conninfo

    name = f"commpipe_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield make_conninfo(postgres_dsn, dbname=name)
    with psycopg.connect(postgres_dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')


@pytest.fixture(scope="module")
def module_topics(kafka_bootstrap: str) -> Callable[..., str]:
    import uuid

    from agents.topics import ensure_topics
    from pipeline.dev.process import run_sync

    def make(partitions: int = 4) -> str:
        name = f"test.cascades.{uuid.uuid4().hex[:8]}"
        run_sync(lambda: ensure_topics({name: partitions},
                                       client_options={"bootstrap_servers": kafka_bootstrap}))
        return name

    return make


def _epoch(value: Any) -> float:
    return float(value)


def test_the_traffic_exercises_every_rule(run: Run) -> None:
    """The seeded traffic holds cascades and each kind of failure the definition excludes."""
    failed = [e for e in run.events if e["kind"] in ct.FAILED]
    by_span = {e["span_id"]: e for e in failed if e.get("span_id")}
    pairs = [(by_span[e["parent_span_id"]], e) for e in failed
             if e.get("parent_span_id") in by_span]
    assert len(run.cascades) >= 15
    assert any(u["ts"] < d["ts"] for u, d in pairs)  # caller failed first: no cascade
    assert any(d["source_service"] != u["target_service"] for u, d in pairs)  # not its callee
    assert any(u["ts"] == d["ts"] for u, d in pairs
               if u["span_id"] in run.cascades)  # same instant: a cascade
    assert any(not e.get("span_id") for e in failed)  # untraced failures
    assert any(_path_length(t, run.cascades) >= 3 for t in run.trees if t.trace_id)


def test_the_cascade_views_match_the_definition_in_both_databases(run: Run) -> None:
    want = sorted((span, *c["edge"], c["downstream_span_id"], *c["downstream_edge"],
                   c["trace_id"]) for span, c in run.cascades.items())
    pg, duck = run.db.both(CASCADES)
    assert pg == want
    assert duck == want

    windows = ct.expected_windows(run.events, run.cascades)
    want_windows = sorted((start, *edge, calls, failures, n, n / max(calls, 1))
                          for (start, edge), (calls, failures, n) in windows.items())
    for rows in run.db.both(WINDOWS):
        got = [(_epoch(r[0]), r[1], r[2], r[3], int(r[4]), int(r[5]), int(r[6]), float(r[7]))
               for r in rows]
        # every (window, edge) with events has a rollup row, health-only edges included
        assert [g[:7] for g in got] == [w[:7] for w in want_windows]
        assert [g[7] for g in got] == pytest.approx([w[7] for w in want_windows], abs=1e-12)

    services: dict[tuple[float, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    for (start, edge), (calls, failures, n) in windows.items():
        row = services[(start, edge[1])]
        row[0], row[1], row[2] = row[0] + calls, row[1] + failures, row[2] + n
    want_services = sorted((k[0], k[1], *v) for k, v in services.items())
    for rows in run.db.both(SERVICES):
        got = [(_epoch(r[0]), r[1], int(r[2]), int(r[3]), int(r[4])) for r in rows]
        assert got == want_services
        assert [float(r[5]) for r in rows] == pytest.approx(
            [s[4] / max(s[2], 1) for s in want_services], abs=1e-12)


def test_trace_shows_where_a_failed_operation_started(run: Run) -> None:
    deep = [t for t in run.trees if t.root_failed and t.trace_id
            and _path_length(t, run.cascades) >= 3]
    assert deep, "the seeded traffic has a failure cascading over three calls"
    tree = deep[0]
    origin = ct.origin_of(tree.events, run.cascades)
    root = next(e for e in tree.events if e["kind"] in ct.FAILED and not e.get("parent_span_id"))
    path = [root["span_id"]]
    while path[-1] in run.cascades:
        path.append(run.cascades[path[-1]]["downstream_span_id"])
    assert path[-1] == origin
    span_edge = {e["span_id"]: ct.edge_of(e) for e in tree.events if e.get("span_id")}
    cli_env = {"COMMPIPE_POSTGRES_DSN": run.env["COMMPIPE_POSTGRES_DSN"],
               "COMMPIPE_DUCKDB_PATH": run.env["COMMPIPE_DUCKDB_PATH"]}
    for flag in ((), ("--postgres",)):
        done = commpipe(cli_env, "trace", tree.trace_id or "", "--json", *flag)
        assert done.returncode == 0, done.stderr
        chain = json.loads(done.stdout)
        spans = {e["event_id"]: e["span_id"] for e in chain["events"]}
        tops = [c for c in chain["cascades"] if spans[c["top"]] == root["span_id"]]
        assert len(tops) == 1
        assert [spans[i] for i in tops[0]["path"]] == path
        assert tops[0]["origin_edge"] == list(span_edge[origin])
        text = commpipe(cli_env, "trace", tree.trace_id or "", *flag)
        s, t, p = span_edge[origin]
        assert any(f"started at {s} → {t} · {p}" in line for line in text.stdout.splitlines()
                   if line.startswith("  cascade ")), text.stdout


def _path_length(tree: ct.Tree, cascades: dict[str, dict[str, Any]]) -> int:
    roots = [e for e in tree.events if e["kind"] in ct.FAILED and not e.get("parent_span_id")]
    if not roots:
        return 0
    n, span = 1, roots[0]["span_id"]
    while span in cascades:
        span, n = cascades[span]["downstream_span_id"], n + 1
    return n


# --- commpipe check ------------------------------------------------------------------------

def _calls(events: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, int]]:
    out: dict[tuple[str, str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for e in events:
        out[ct.edge_of(e)][e["kind"]] += 1
        if e["kind"] == "error":
            out[ct.edge_of(e)]["dead"] += e["error_type"] == "dead_letter"
    return out


def _p95(values: list[float]) -> float:
    values = sorted(values)
    return values[math.floor(0.95 * (len(values) - 1))]


def expected_gates(run: Run, limits: dict[tuple[str, str, str], float]
                   ) -> dict[str, dict[str, Any]]:
    """Each gate's measured value and offenders, from the events and the config below."""
    counts = _calls(run.events)
    approved = {"inventory": {"http", "kafka"}}
    services: dict[str, bool] = {}
    proto_off = []
    for edge in sorted(counts):
        ok = edge[2] in approved.get(edge[0], {"http", "grpc"})
        services[edge[0]] = services.get(edge[0], True) and ok
        if not ok:
            proto_off.append(edge)
    outcomes = {e: c["response"] + c["error"] + c["timeout"] for e, c in counts.items()}
    called = [e for e in sorted(counts) if outcomes[e] + counts[e]["request"]]
    unprotected = [e for e in called if e not in (RETRIED, BREAKER, DECLARED)]
    cascades_by_edge: dict[tuple[str, str, str], int] = defaultdict(int)
    origins: dict[tuple[str, str, str], dict[tuple[str, str, str], int]] = defaultdict(
        lambda: defaultdict(int))
    for c in run.cascades.values():
        cascades_by_edge[c["edge"]] += 1
        origins[c["edge"]][c["downstream_edge"]] += 1
    async_edges = [e for e in sorted(counts) if e[2] in ("amqp", "kafka") and outcomes[e]]
    dead = sum(counts[e]["dead"] for e in async_edges)
    delivery = {e: counts[e]["response"] / outcomes[e] for e in async_edges}
    latencies: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for e in run.events:
        if e["kind"] in ("response", "error", "timeout") and e["protocol"] in ("http", "grpc"):
            latencies[ct.edge_of(e)].append(e["latency_ms"])
    slow = sorted(e for e, v in latencies.items() if not _p95(v) < limits.get(e, 1e9))
    expected = Expected()
    for e in run.events:
        expected.add(e)
    health = expected_health(expected_patterns(expected), expected)
    return {
        "approved_protocols": {"measured": sum(services.values()) / len(services),
                               "offenders": proto_off},
        "resilience_coverage": {"measured": (len(called) - len(unprotected)) / len(called),
                                "offenders": unprotected},
        "cascade_failure_rate": {
            "measured": len(run.cascades) / sum(outcomes.values()),
            "offenders": sorted(cascades_by_edge),
            "origins": {e: dict(o) for e, o in origins.items()}},
        "dead_letter_ratio": {"measured": dead / sum(outcomes[e] for e in async_edges),
                              "offenders": [e for e in async_edges if counts[e]["dead"]]},
        "latency_sla": {"measured": (len(latencies) - len(slow)) / len(latencies),
                        "offenders": slow, "p95": {e: _p95(v) for e, v in latencies.items()}},
        "delivery_success": {"measured": min(delivery.values()),
                             "offenders": [e for e, r in delivery.items() if not r > 0.999]},
        "health_score": {"measured": float(min(r[1] for r in health)),
                         "offenders": sorted(r[0] for r in health if not r[1] > 90)},
    }


def _key(o: dict[str, Any]) -> tuple[str, str, str]:
    return o["source_service"], o["target_service"], o["protocol"]


def test_check_judges_every_gate_as_computed_here_in_both_databases(run: Run) -> None:
    latencies: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for e in run.events:
        if e["kind"] in ("response", "error", "timeout"):
            latencies[ct.edge_of(e)].append(e["latency_ms"])
    # one edge far over its limit, the others far under theirs (the sketch is 1 % accurate)
    slow_edge = ("orders", "inventory", "http")
    limits = {slow_edge: round(_p95(latencies[slow_edge]) / 2, 3)}
    config = {"approved_protocols": ["http", "grpc"],
              "services": {"inventory": {"approved_protocols": ["http", "kafka"]}},
              "protected": [{"source": "gateway", "target": "orders", "by": "bulkhead"}],
              "thresholds": {"latency_p95_ms": 10_000},
              "latency": [{"source": "orders", "target": "inventory",
                           "p95_ms": limits[slow_edge]}]}
    path = run.tmp / ".communication.yml"
    path.write_text(yaml.safe_dump(config))
    want = expected_gates(run, {e: limits.get(e, 10_000.0) for e in latencies})
    assert want["latency_sla"]["offenders"] == [slow_edge]
    cli_env = {"COMMPIPE_POSTGRES_DSN": run.env["COMMPIPE_POSTGRES_DSN"],
               "COMMPIPE_DUCKDB_PATH": run.env["COMMPIPE_DUCKDB_PATH"]}
    for flag, database in (((), "duckdb"), (("--postgres",), "postgres")):
        report_path = run.tmp / f"report-{database}.json"
        done = commpipe(cli_env, "check", "--config", str(path), "--since", "1h",
                        "--report", str(report_path), *flag)
        assert done.returncode == 1, done.stdout + done.stderr
        assert "cascade_failure_rate" in done.stdout and "FAIL" in done.stdout
        report = json.loads(report_path.read_text())
        jsonschema.validate(report, REPORT_SCHEMA)
        assert report["passed"] is False and report["database"] == database
        gates = {g["name"]: g for g in report["gates"]}
        assert list(gates) == list(want)
        for name, w in want.items():
            g = gates[name]
            assert g["measured"] == pytest.approx(w["measured"], rel=1e-9), name
            assert sorted(_key(o) if "service" not in o else o["service"]
                          for o in g["offenders"]) == sorted(w["offenders"]), name
            assert g["passed"] is (not w["offenders"]), name
            assert g["status"] == ("passed" if g["passed"] else "failed"), name
        assert gates["cascade_failure_rate"]["note"] == (
            f"{sum(1 for e in run.events if e['kind'] in ct.FAILED and not e.get('span_id'))}"
            f" of {sum(1 for e in run.events if e['kind'] in ct.FAILED)} failed calls carry no "
            "span id and cannot be judged")
        for o in gates["cascade_failure_rate"]["offenders"]:
            assert {_key(s): s["cascades"] for s in o["started_from"]} == \
                want["cascade_failure_rate"]["origins"][_key(o)]
        p95 = {_key(o): o["p95_ms"] for o in gates["latency_sla"]["offenders"]}
        assert p95[slow_edge] == pytest.approx(want["latency_sla"]["p95"][slow_edge], rel=0.01)
        assert [o["approved"] for o in gates["approved_protocols"]["offenders"]] == [
            ["http", "grpc"]]  # payments -> bank; inventory may use kafka


def test_check_passes_when_the_config_accepts_what_was_seen(run: Run) -> None:
    """Every gate met or turned off: exit 0, and what was turned off is named."""
    config = {"approved_protocols": ["http", "grpc", "amqp", "kafka"],
              "protected": [{}],  # every edge declared protected
              "thresholds": {"cascade_failure_rate": 1.0, "dead_letter_ratio": 1.0,
                             "latency_p95_ms": 100_000, "health_score": 0},
              "disabled": ["delivery_success"]}
    path = run.tmp / "lenient.yml"
    path.write_text(yaml.safe_dump(config))
    env = {"COMMPIPE_POSTGRES_DSN": run.env["COMMPIPE_POSTGRES_DSN"],
           "COMMPIPE_DUCKDB_PATH": run.env["COMMPIPE_DUCKDB_PATH"]}
    for flag in ((), ("--postgres",)):
        done = commpipe(env, "check", "--config", str(path), "--json", *flag)
        assert done.returncode == 0, done.stdout + done.stderr
        report = json.loads(done.stdout)
        assert report["passed"] is True and report["disabled"] == ["delivery_success"]
        assert [g["status"] for g in report["gates"]] == ["passed"] * 6
    # the lookback holds none of it: every gate has nothing to judge, and fails
    done = commpipe(env, "check", "--config", str(path), "--since", "1s", "--json")
    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert {g["status"] for g in report["gates"]} == {"nothing_to_judge"}
    assert all(g["measured"] is None and g["note"].startswith("nothing to judge: ")
               for g in report["gates"])


@pytest.mark.parametrize(("content", "message"), [
    ("approved_protocols: [http, grpc]\nthresholds: {cascade_rate: 0.1}\n",
     "thresholds.cascade_rate: unknown key (known: cascade_failure_rate, dead_letter_ratio"),
    ("thresholds: {}\n", "approved_protocols: required"),
    ("approved_protocols: [HTTP]\n", "approved_protocols[0]: 'HTTP' is not a lower-case"),
    ("approved_protocols: [http]\nthresholds: {cascade_failure_rate: 5}\n",
     "thresholds.cascade_failure_rate: input should be less than or equal to 1 (got 5)"),
    ("approved_protocols: [http]\ndisabled: [latency]\n", "disabled[0]: not a gate"),
    ("approved_protocols: [http\n", "not valid YAML"),
    ("- http\n", "expected a mapping with at least 'approved_protocols'"),
])
def test_a_bad_config_file_names_the_key(run: Run, content: str, message: str) -> None:
    path = run.tmp / "bad.yml"
    path.write_text(content)
    env = {"COMMPIPE_DUCKDB_PATH": run.env["COMMPIPE_DUCKDB_PATH"],
           "COLUMNS": "400"}
    done = commpipe(env, "check", "--config", str(path), "--report", str(run.tmp / "no.json"))
    assert done.returncode == 1
    error = " ".join(done.stderr.split())
    assert error.startswith(f"error: {path}: ") and message in error, error
    assert len(done.stderr.strip().splitlines()) <= 2  # one line (folded by the terminal)
    assert not (run.tmp / "no.json").exists()


def test_a_missing_config_file_says_what_to_do(run: Run) -> None:
    done = commpipe({"COMMPIPE_DUCKDB_PATH": run.env["COMMPIPE_DUCKDB_PATH"],
                     "COLUMNS": "400"}, "check", "--config", str(run.tmp / "none.yml"))
    assert done.returncode == 1
    assert "no config file" in done.stderr and "README 'Gates for CI'" in done.stderr


# --- v1 stays v1 ---------------------------------------------------------------------------

class WorkerOfBefore(WorkerProcess):
    """A ``commpipe worker`` run from the tree of before ``parent_span_id``."""

    def __init__(self, env: dict[str, str], log_path: Path, tree: Path) -> None:
        super().__init__(env, log_path)
        self.tree = tree

    def start(self) -> WorkerOfBefore:
        import os

        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "worker"], env={**os.environ, **self.env},
            cwd=self.tree, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        return self


def test_a_worker_of_before_counts_records_that_carry_parent_span_id(
        kafka_bootstrap: str, topic_factory: Callable[..., str], tmp_path: Path) -> None:
    tree = tree_before(tmp_path / "before")
    where = subprocess.run([sys.executable, "-c", "import pipeline.wire.events as e; "
                            "print(e.__file__, 'parent_span_id' in e.Event._fields)"],
                           cwd=tree, capture_output=True, text=True, check=True).stdout.split()
    assert Path(where[0]).resolve().is_relative_to(tree.resolve()) and where[1] == "False"
    env = worker_environment(kafka_bootstrap, topic_factory, tmp_path, window_s=ct.WINDOW,
                             grace_s=5.0)
    rng = random.Random(3)
    t0 = math.floor(time.time() / ct.WINDOW) * ct.WINDOW - 60
    events = [e for tree_ in ct.operations(rng, t0, 30) for e in tree_.events]
    with_parent = sum(1 for e in events if e.get("parent_span_id"))
    assert with_parent > 50
    worker = WorkerOfBefore(env, tmp_path / "before.log", tree).start()
    try:
        emitter = Emitter(kafka_bootstrap, env["COMMPIPE_TOPIC"],
                          settings=Settings.from_env({}, shim_linger_ms=5))
        try:
            emit_all(emitter, sorted(events, key=lambda e: e["ts"]))
        finally:
            emitter.close()
        wait_until(lambda: applied_events(read_state(kafka_bootstrap, env["COMMPIPE_APP_ID"]))
                   >= len(events), timeout=120, what=f"{len(events)} events counted",
                   logs=worker.log)
        assert applied_events(read_state(kafka_bootstrap, env["COMMPIPE_APP_ID"])) == len(events)
        assert read_topic(kafka_bootstrap, env["COMMPIPE_DLQ_TOPIC"]) == []
    finally:
        worker.stop(timeout=15)
