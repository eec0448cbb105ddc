"""The worker's memory while PostgreSQL is away: bounded by COMMPIPE_SINK_MAX_BACKLOG.

A real worker, the real broker, the real (embedded) PostgreSQL stopped mid-run and a
real DuckDB file. Traffic is one request and one response per edge per window, so what
each database must hold is plain arithmetic over the events sent:

- ``pause``: past the bound the worker stops reading (``/metrics`` says so, its consumed
  count and DuckDB stand still while more records wait in Kafka), reads again once
  PostgreSQL is back and has caught up, and in the end both databases hold every window.
- ``drop``: the worker keeps reading; PostgreSQL's copy of windows past the bound is given
  up, counted in ``<ns>_sink_dropped_total``, and exactly that many windows are missing
  from PostgreSQL afterwards (every other row equal to DuckDB's, DuckDB complete).
"""

from __future__ import annotations

import math
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline import Emitter, Settings
from pipeline.dev.process import free_port
from tests.integration.test_sink import Databases
from tests.integration.traffic import Expected, emit_all
from tests.integration.workers import WorkerProcess, wait_until, worker_environment, worker_starter

pytestmark = pytest.mark.integration

WINDOW, GRACE = 10.0, 2.0
EDGES = [(f"svc{i}", f"dep{i % 5}", ("http", "grpc")[i % 2]) for i in range(30)]
BOUND = 100
NS = "cpb"
KEYS_SQL = """
SELECT extract(epoch FROM window_start), source_service, target_service, protocol, requests,
       responses, latency_count, latency_sum_ms, partitions
FROM communication_rollups ORDER BY 1, 2, 3, 4"""


def window_events(t0: float, windows: range) -> list[dict[str, Any]]:
    """One request and one response per edge per window, in time order."""
    events: list[dict[str, Any]] = []
    for w in windows:
        start = t0 + w * WINDOW
        for e, (s, t, p) in enumerate(EDGES):
            base = {"source_service": s, "target_service": t, "protocol": p}
            events.append({**base, "kind": "request", "ts": start + 1.0 + e * 0.01})
            events.append({**base, "kind": "response", "ts": start + 2.0 + e * 0.01,
                           "latency_ms": 10.0 + e % 7 + w})
    return events


def emit_windows(emitter: Emitter, t0: float, windows: range, expected: Expected) -> None:
    """Window by window, each delivered before the next is sent: one shim flush groups
    its events by edge, so a flush spanning windows would make later edges' early
    windows late behind the partition's watermark."""
    for w in windows:
        emit_all(emitter, window_events(t0, range(w, w + 1)), expected)


def expected_rows(expected: Expected) -> list[tuple[Any, ...]]:
    rows = []
    for (start, edge), c in sorted(expected.counts.items()):
        lat = expected.latencies[(start, edge)]
        rows.append((start, *edge, c["request"], c["response"], len(lat), sum(lat), 1))
    return rows


def stored(db: Databases, which: str) -> list[tuple[Any, ...]]:
    rows = (db.pg if which == "pg" else db.duck)(KEYS_SQL)
    return [(float(r[0]), *r[1:4], *r[4:7], float(r[7]), r[8]) for r in rows]


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",  # noqa: S310 - loopback
                                    timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def metric(port: int, name: str, **labels: str) -> float | None:
    return scrape(port).get((f"{NS}_{name}", tuple(sorted(labels.items()))))


def where(db: Databases, port: int) -> str:
    """Where things stand, for a failure message."""
    return (f"PostgreSQL {db.count('pg', 'communication_rollups')} rows, DuckDB "
            f"{db.count('duck', 'communication_rollups')}, events consumed "
            f"{metric(port, 'events_consumed_total')}, paused {metric(port, 'sink_input_paused')}"
            f", backlog {metric(port, 'sink_backlog', kind='windows')} windows")


def steady(read: Callable[[], Any], *, for_s: float = 3.0, timeout: float = 60.0) -> Any:
    """``read()`` once it has returned the same value for ``for_s`` seconds."""
    deadline = time.monotonic() + timeout
    value, since = read(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = read()
        if now != value:
            value, since = now, time.monotonic()
        elif time.monotonic() - since >= for_s:
            return value
    raise TimeoutError(f"still changing after {timeout:g} s: {value!r}")


@pytest.fixture
def db(pg_database: str, tmp_path: Path) -> Databases:
    return Databases(pg_database, str(tmp_path / "commpipe.duckdb"))


@pytest.fixture
def port() -> int:
    return free_port()


def backlog_env(kafka_bootstrap: str, topic_factory: Callable[..., str], tmp_path: Path,
                db: Databases, port: int, policy: str) -> dict[str, str]:
    return worker_environment(
        kafka_bootstrap, topic_factory, tmp_path, window_s=WINDOW, grace_s=GRACE,
        idle_close_s=2, COMMPIPE_POSTGRES_DSN=db.dsn, COMMPIPE_DUCKDB_PATH=db.duckdb_path,
        COMMPIPE_SINK_INTERVAL_S="0.5", COMMPIPE_SINK_BACKOFF_MAX_S="1",
        COMMPIPE_SINK_MAX_BACKLOG=str(BOUND), COMMPIPE_SINK_BACKLOG_POLICY=policy,
        COMMPIPE_METRICS_PORT=str(port), COMMPIPE_METRICS_HOST="127.0.0.1",
        COMMPIPE_METRICS_NAMESPACE=NS)


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[[dict[str, str]], WorkerProcess]]:
    stack: list[Any] = []

    def start(env: dict[str, str]) -> WorkerProcess:
        starter = worker_starter(env, tmp_path)
        stack.append(starter)
        return starter.__enter__()()

    yield start
    for starter in stack:
        starter.__exit__(None, None, None)


@dataclass
class Outage:
    """A worker that stored one window of every edge in both databases, then 19 more
    windows of every edge emitted while PostgreSQL is away."""

    t0: float
    expected: Expected
    worker: WorkerProcess
    emitter: Emitter


@contextmanager
def postgres_away_after_one_window(env: dict[str, str], db: Databases, postgres: Any,
                                   start_worker: Callable[[dict[str, str]], WorkerProcess]
                                   ) -> Iterator[Outage]:
    t0 = math.floor(time.time() / WINDOW) * WINDOW - 600
    worker = start_worker(env)
    emitter = Emitter(env["COMMPIPE_KAFKA_BOOTSTRAP"], env["COMMPIPE_TOPIC"],
                      settings=Settings.from_env({}, shim_linger_ms=5))
    outage = Outage(t0, Expected(), worker, emitter)
    try:
        emit_windows(emitter, t0, range(0, 1), outage.expected)
        wait_until(lambda: db.count("pg", "communication_rollups") == len(EDGES), timeout=90,
                   what="the first window of every edge in PostgreSQL", logs=worker.log)
        postgres.stop()
        # 19 more windows of 30 edges: 570 closed windows PostgreSQL lacks, bound 100
        emit_windows(emitter, t0, range(1, 20), outage.expected)
        yield outage
    finally:
        emitter.close()


def test_pause_stops_reading_while_postgres_is_away_and_loses_nothing(
        kafka_bootstrap: str, topic_factory: Callable[..., str], tmp_path: Path,
        db: Databases, port: int, postgres: Any,
        start_worker: Callable[[dict[str, str]], WorkerProcess]) -> None:
    env = backlog_env(kafka_bootstrap, topic_factory, tmp_path, db, port, "pause")
    with postgres_away_after_one_window(env, db, postgres, start_worker) as outage:
        worker, expected = outage.worker, outage.expected
        wait_until(lambda: metric(port, "sink_input_paused") == 1.0, timeout=90,
                   what="the worker to stop reading its input", logs=worker.log)
        # records the worker had fetched before it paused, and windows closing for
        # idleness, may still move these: wait until they stand still
        consumed, duck_rows = steady(lambda: (metric(port, "events_consumed_total"),
                                              db.count("duck", "communication_rollups")))
        waiting = metric(port, "sink_backlog", kind="windows")
        assert waiting is not None and waiting > BOUND
        # more records arrive while paused: they wait in Kafka
        emit_windows(outage.emitter, outage.t0, range(20, 25), expected)
        time.sleep(4.0)
        assert metric(port, "events_consumed_total") == consumed
        assert metric(port, "sink_input_paused") == 1.0
        assert db.count("duck", "communication_rollups") == duck_rows
        assert db.count("pg", "communication_rollups") == -1
        postgres.start()
    want = expected_rows(expected)
    assert len(want) == 25 * len(EDGES)
    for which in ("pg", "duck"):
        try:
            wait_until(lambda w=which: db.count(w, "communication_rollups") == len(want),
                       timeout=120, what=f"{len(want)} rollup rows in {which}",
                       logs=worker.log)
        except AssertionError as e:
            raise AssertionError(f"{where(db, port)}\n{e}") from None
    assert stored(db, "pg") == want
    assert stored(db, "duck") == want
    assert metric(port, "events_consumed_total") == len(expected.events)
    assert metric(port, "sink_input_paused") == 0.0
    assert metric(port, "sink_dropped_total", database="postgres", kind="windows") == 0.0
    log = worker.log()
    assert "the worker stops reading its input" in log
    assert "the worker reads its input again" in log
    assert worker.alive


def test_drop_gives_up_postgres_copy_past_the_bound_and_counts_it(
        kafka_bootstrap: str, topic_factory: Callable[..., str], tmp_path: Path,
        db: Databases, port: int, postgres: Any,
        start_worker: Callable[[dict[str, str]], WorkerProcess]) -> None:
    env = backlog_env(kafka_bootstrap, topic_factory, tmp_path, db, port, "drop")
    with postgres_away_after_one_window(env, db, postgres, start_worker) as outage:
        worker, expected = outage.worker, outage.expected
        want = expected_rows(expected)
        # DuckDB goes on: every window, while the worker keeps reading
        wait_until(lambda: db.count("duck", "communication_rollups") == len(want),
                   timeout=120, what=f"{len(want)} rollup rows in DuckDB", logs=worker.log)
        wait_until(lambda: (metric(port, "sink_dropped_total", database="postgres",
                                   kind="windows") or 0) > 0,
                   timeout=60, what="PostgreSQL's copy given up past the bound", logs=worker.log)
        # the bound holds what can be given up (final windows); each edge's newest closed
        # window stays on top of it until PostgreSQL has it (the exporter reports from it)
        wait_until(lambda: (metric(port, "sink_backlog", kind="windows") or math.inf)
                   <= BOUND + len(EDGES),
                   timeout=60, what="the backlog back under its bound", logs=worker.log)
        assert metric(port, "sink_input_paused") == 0.0
        assert metric(port, "events_consumed_total") == len(expected.events)
        postgres.start()
    wait_until(lambda: metric(port, "sink_backlog", kind="windows") == 0.0, timeout=120,
               what="PostgreSQL caught up with what was not given up", logs=worker.log)
    dropped = metric(port, "sink_dropped_total", database="postgres", kind="windows")
    assert dropped is not None and 0 < dropped <= len(want) - len(EDGES)
    assert metric(port, "sink_dropped_total", database="duckdb", kind="windows") == 0.0
    duck, pg = stored(db, "duck"), stored(db, "pg")
    assert duck == want
    assert len(pg) == len(want) - dropped
    assert set(pg) <= set(want)  # what PostgreSQL holds is exact; only the counted gap
    # the newest window of each edge is never given up (the exporter reports from it)
    newest = {r[1:4]: r for r in want}
    assert set(newest.values()) <= set(pg)
    log = worker.log()
    assert "COMMPIPE_SINK_BACKLOG_POLICY=drop" in log
    assert worker.alive
