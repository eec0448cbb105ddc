"""The stream job on the real broker: known events in, every aggregate checked independently.

Expected values are computed here from the events themselves (plain counting,
sorted lists for exact quantiles, a few-line breaker), never with the code
under test. What the worker holds is read back from its table's changelog.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from pipeline import Emitter, Settings
from pipeline.aggregate import WindowConfig
from pipeline.rollups import Rollups
from pipeline.sketch import ALPHA
from tests.integration.workers import (
    FAST_JOIN,
    WorkerProcess,
    read_state,
    read_topic,
    wait_until,
)

pytestmark = pytest.mark.integration

WINDOW, GRACE = 10.0, 5.0
T0 = 1_763_900_000.0  # a window boundary (divisible by 10)
N_WINDOWS = 4
T_END = T0 + (N_WINDOWS - 1) * WINDOW + 9.0  # every edge's last event: the watermark
EDGES = [("gateway", "orders", "http"), ("orders", "payments", "grpc"),
         ("orders", "inventory", "http"), ("payments", "bank", "amqp")]
LEGACY = ("legacy", "db", "kafka")  # written by a non-shim producer: unkeyed single events
OUTCOME = {"response": True, "error": False, "timeout": False}


@dataclass
class Expected:
    """Independently computed expectations per (window_start, edge)."""

    counts: dict[tuple[float, tuple[str, str, str]], Counter[str]] = field(
        default_factory=lambda: defaultdict(Counter))
    errors: dict[tuple[float, tuple[str, str, str]], Counter[str]] = field(
        default_factory=lambda: defaultdict(Counter))
    latencies: dict[tuple[float, tuple[str, str, str]], list[float]] = field(
        default_factory=lambda: defaultdict(list))
    backoff: dict[tuple[float, tuple[str, str, str]], float] = field(
        default_factory=lambda: defaultdict(float))
    payload: dict[tuple[float, tuple[str, str, str]], int] = field(
        default_factory=lambda: defaultdict(int))
    late: dict[tuple[float, tuple[str, str, str]], int] = field(
        default_factory=lambda: defaultdict(int))
    outcomes: dict[tuple[str, str, str], list[tuple[float, bool | None]]] = field(
        default_factory=lambda: defaultdict(list))

    def add(self, event: dict[str, Any]) -> None:
        edge = (event["source_service"], event["target_service"], event["protocol"])
        key = (math.floor(event["ts"] / WINDOW) * WINDOW, edge)
        kind = event["kind"]
        self.counts[key][kind] += 1
        if kind == "error":
            self.errors[key][event["error_type"]] += 1
        if kind in OUTCOME and "latency_ms" in event:
            self.latencies[key].append(event["latency_ms"])
        if kind == "retry":
            self.backoff[key] += event["backoff_ms"]
        self.payload[key] += event.get("payload_size", 0)
        self.outcomes[edge].append((event["ts"], OUTCOME.get(kind)))


def breaker_entries(outcomes: list[tuple[float, bool | None]]) -> tuple[str, Counter[str]]:
    """The derived breaker (threshold 3, recovery 1 s, 1 probe), written out plainly."""
    state, since, failures, entered = "closed", None, 0, Counter()
    for ts, ok in outcomes:
        since = ts if since is None else since
        if state == "open" and ts >= since + 1.0:
            state, since = "half_open", since + 1.0
            entered["half_open"] += 1
        if ok is None or state == "open":
            continue
        if state == "closed":
            failures = 0 if ok else failures + 1
            if failures == 3:
                state, since, failures = "open", ts, 0
                entered["open"] += 1
        else:
            state, since = ("closed", ts) if ok else ("open", ts)
            entered[state] += 1
    return state, entered


def make_window_events(rng: random.Random, window: int) -> list[dict[str, Any]]:
    """Seeded traffic for one window over EDGES, in time order per edge."""
    events: list[dict[str, Any]] = []
    start = T0 + window * WINDOW
    for edge in EDGES:
        source, target, protocol = edge
        base = {"source_service": source, "target_service": target, "protocol": protocol}
        # (start + 0.6: the previous window's breaker probe at start + 0.5 stays in time order)
        times = sorted(rng.uniform(start + 0.6, start + 8.9)
                       for _ in range(rng.randint(40, 90)))
        for ts in times:
            kind = rng.choices(["request", "response", "error", "timeout", "retry", "health"],
                               weights=[30, 45, 8, 3, 10, 4])[0]
            event = {**base, "kind": kind, "ts": ts}
            if kind == "response":
                event |= {"latency_ms": rng.lognormvariate(3, 0.8), "status_code": 200,
                          "payload_size": rng.randint(100, 5000)}
            elif kind == "error":
                event |= {"error_type": rng.choice(["connection", "http_5xx", "rejected"]),
                          "latency_ms": rng.uniform(1, 50)}
            elif kind == "timeout":
                event |= {"latency_ms": 1000.0}
            elif kind == "retry":
                attempt = rng.randint(1, 3)
                event |= {"attempt": attempt, "backoff_ms": 100.0 * 2 ** (attempt - 1)}
            elif kind == "health":
                event |= {"health_status": rng.choice(["healthy", "degraded"])}
            events.append(event)
        if window == 2 and edge == ("orders", "payments", "grpc"):
            # a clean trip: three failures in a row, then a probe after the recovery time
            for i, t in enumerate((start + 9.0, start + 9.1, start + 9.2)):
                events.append({**base, "kind": "error", "error_type": "connection",
                               "latency_ms": 5.0 + i, "ts": t})
            events.append({**base, "kind": "response", "latency_ms": 7.0, "ts": start + 10.5})
        if edge == ("payments", "bank", "amqp") and window in (1, 2):
            state = "open" if window == 1 else "closed"
            events.append({**base, "kind": "circuit", "circuit_state": state, "ts": start + 9.5})
    return events


def emit_all(emitter: Emitter, events: list[dict[str, Any]],
             expected: Expected | None = None) -> None:
    """Emit through the shim's kind helpers, wait for delivery, record the expectation."""
    for event in events:
        fields = {k: v for k, v in event.items() if k != "kind"}
        getattr(emitter, event["kind"])(**fields)
        if expected is not None:
            expected.add(event)
    assert emitter.flush(timeout=30) is True


def settle(bootstrap: str, app_id: str, total: int, *, timeout: float, what: str,
           logs: Callable[[], str]) -> dict[str, Any]:
    """Wait until the table holds ``total`` events; it must then hold exactly that many."""
    wait_until(lambda: applied_events(read_state(bootstrap, app_id)) >= total,
               timeout=timeout, what=f"{total} events {what}", logs=logs)
    state = read_state(bootstrap, app_id)
    assert applied_events(state) == total
    return state


async def produce_legacy(bootstrap: str, topic: str, events: list[dict[str, Any]]) -> None:
    """Single-event records without a key, as a non-shim producer might send them."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for i, event in enumerate(events):
            wire = {"v": 1, "event_id": f"legacy{i}", "correlation_id": f"l{i}", **event}
            await producer.send_and_wait(topic, orjson.dumps(wire), partition=i % 4)
    finally:
        await producer.stop()


async def produce_raw(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value, key=b"orders\x1fpayments\x1fgrpc")
    finally:
        await producer.stop()


@pytest.fixture
def worker_env(kafka_bootstrap: str, topic_factory: Callable[..., str], tmp_path: Path
               ) -> dict[str, str]:
    topic = topic_factory(4)
    dlq = topic_factory(4)
    return {**FAST_JOIN, "COMMPIPE_KAFKA_BOOTSTRAP": kafka_bootstrap, "COMMPIPE_TOPIC": topic,
            "COMMPIPE_DLQ_TOPIC": dlq, "COMMPIPE_PARTITIONS": "4",
            "COMMPIPE_APP_ID": f"t{uuid.uuid4().hex[:10]}",
            "COMMPIPE_WINDOW_S": str(WINDOW), "COMMPIPE_GRACE_S": str(GRACE),
            "COMMPIPE_IDLE_CLOSE_S": "3600", "COMMPIPE_WORKER_DATADIR": str(tmp_path / "w"),
            "COMMPIPE_WORKER_LOGLEVEL": "warn"}


@pytest.fixture
def workers(worker_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[[], WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start() -> WorkerProcess:
        worker = WorkerProcess(worker_env, tmp_path / f"worker{len(started)}.log").start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop(timeout=15)


def applied_events(state: dict[str, Any]) -> int:
    """Events the table holds (window counts plus late events)."""
    rollups = Rollups(state, WindowConfig(size_s=WINDOW, grace_s=GRACE))
    return sum(sum(_kinds(r.stats).values()) + r.stats.late_events for r in rollups.windows())


def _kinds(stats: Any) -> Counter[str]:
    return Counter({"request": stats.requests, "response": stats.responses,
                    "error": stats.error_count, "timeout": stats.timeouts,
                    "retry": stats.retries, "health": sum(stats.health.values()),
                    "circuit": stats.transitions.get("reported:open", 0)
                    + stats.transitions.get("reported:closed", 0)})


def check_against(expected: Expected, state: dict[str, Any]) -> None:
    rollups = Rollups(state, WindowConfig(size_s=WINDOW, grace_s=GRACE))
    merged = Rollups.merged(rollups.windows())
    keys = set(expected.counts) | set(expected.late)
    assert set(merged) == keys
    for key in sorted(keys):
        stats = merged[key]
        counts = expected.counts[key]
        assert _kinds(stats) - Counter() == counts - Counter(), key
        assert stats.errors == dict(expected.errors[key]), key
        assert stats.retry_backoff_ms == pytest.approx(expected.backoff[key], abs=1e-6), key
        assert stats.payload_bytes == expected.payload[key], key
        assert stats.late_events == expected.late[key], key
        values = sorted(expected.latencies[key])
        assert stats.latency.count == len(values), key
        if values:
            assert (stats.latency.min, stats.latency.max) == (values[0], values[-1]), key
            assert stats.latency.sum == pytest.approx(sum(values)), key
            for q in (0.5, 0.9, 0.95, 0.99):
                exact = values[math.floor(q * (len(values) - 1))]
                assert abs(stats.latency.quantile(q) - exact) <= ALPHA * exact + 1e-9, (key, q)
        failed = counts["error"] + counts["timeout"]
        assert stats.error_rate == failed / max(counts["response"] + failed, 1)
    for edge in EDGES:
        view = rollups.circuit(*edge)
        assert view is not None
        state_now, entered = breaker_entries(expected.outcomes[edge])
        assert (view.derived, Counter(view.derived_entered)) == (state_now, entered), edge
    trip = rollups.circuit("orders", "payments", "grpc")
    assert trip is not None and trip.derived_entered["open"] >= 1  # the designed trip opened it
    reported = rollups.circuit("payments", "bank", "amqp")
    assert reported is not None
    assert (reported.reported, reported.reported_entered) == ("closed", {"open": 1, "closed": 1})


def traffic(rng: random.Random) -> tuple[list[list[dict[str, Any]]], list[dict[str, Any]]]:
    """Per-window shim events (plus every edge's final event at T_END), and legacy events."""
    phases = [make_window_events(rng, w) for w in range(N_WINDOWS)]
    phases[-1].extend({"kind": "request", "source_service": s, "target_service": t,
                       "protocol": p, "ts": T_END} for s, t, p in EDGES)
    legacy = [{"kind": "response", "source_service": LEGACY[0], "target_service": LEGACY[1],
               "protocol": LEGACY[2], "latency_ms": float(i + 1), "ts": T0 + 10 + i * 0.1}
              for i in range(40)]
    return phases, legacy


def test_aggregates_dead_letters_late_events_and_breaker(
        worker_env: dict[str, str], workers: Callable[[], WorkerProcess],
        kafka_bootstrap: str) -> None:
    rng = random.Random(3)
    phases, legacy = traffic(rng)
    expected = Expected()
    worker = workers()
    settings = Settings.from_env({}, shim_linger_ms=5)
    emitter = Emitter(kafka_bootstrap, worker_env["COMMPIPE_TOPIC"], settings=settings)
    try:
        for window, events in enumerate(phases):
            emit_all(emitter, events, expected)
            if window == 1:
                asyncio.run(produce_legacy(kafka_bootstrap, worker_env["COMMPIPE_TOPIC"], legacy))
                for event in legacy:
                    expected.add(event)
        # late: window 0 ended long before the watermark (T_END) on every edge's partition
        late_events = [{"kind": "response", "source_service": s, "target_service": t,
                        "protocol": p, "latency_ms": 1.0, "ts": T0 + 1.0}
                       for s, t, p in EDGES for _ in range(2)]
        emit_all(emitter, late_events)
        for s, t, p in EDGES:
            expected.late[(math.floor(T_END / WINDOW) * WINDOW, (s, t, p))] += 2
    finally:
        emitter.close()
    bad_values = [b"not json", b'{"v":1,"kind":"request"}',
                  orjson.dumps([{"v": 1, "kind": "request", "event_id": "ok1",
                                 "correlation_id": "c", "source_service": "orders",
                                 "target_service": "payments", "protocol": "grpc",
                                 "ts": T_END},
                                {"v": 1, "kind": "response", "event_id": "bad",
                                 "correlation_id": "c", "source_service": "orders",
                                 "target_service": "payments", "protocol": "grpc",
                                 "ts": T_END, "latency_ms": -5}])]
    asyncio.run(produce_raw(kafka_bootstrap, worker_env["COMMPIPE_TOPIC"], bad_values))
    expected.add({"kind": "request", "source_service": "orders", "target_service": "payments",
                  "protocol": "grpc", "ts": T_END})
    total = sum(sum(c.values()) for c in expected.counts.values()) + sum(expected.late.values())

    state = settle(kafka_bootstrap, worker_env["COMMPIPE_APP_ID"], total, timeout=90,
                   what="in the table", logs=worker.log)
    check_against(expected, state)
    # the legacy edge arrived on all four partitions: four owners, merged into one row
    owners = {key.split("\x1e")[1] for key in state if "legacy\x1fdb" in key}
    assert owners == {"0", "1", "2", "3"}

    dead = read_topic(kafka_bootstrap, worker_env["COMMPIPE_DLQ_TOPIC"])
    reasons = sorted((dict(m.headers).get("commpipe-field", b"").decode(),
                      m.value) for m in dead)
    assert [r[0] for r in reasons] == ["", "event_id", "latency_ms"]
    assert reasons[0][1] == b"not json"
    assert orjson.loads(reasons[2][1])["event_id"] == "bad"
    assert all(dict(m.headers)["commpipe-reason"] for m in dead)
    assert worker.alive


def test_restart_resumes_from_changelog_without_reset_or_double_count(
        worker_env: dict[str, str], workers: Callable[[], WorkerProcess],
        kafka_bootstrap: str) -> None:
    rng = random.Random(11)
    phases, _ = traffic(rng)
    expected = Expected()
    app_id = worker_env["COMMPIPE_APP_ID"]
    settings = Settings.from_env({}, shim_linger_ms=5)
    emitter = Emitter(kafka_bootstrap, worker_env["COMMPIPE_TOPIC"], settings=settings)
    try:
        first = workers()
        for events in phases[:2]:
            emit_all(emitter, events, expected)
        half = sum(sum(c.values()) for c in expected.counts.values())
        wait_until(lambda: applied_events(read_state(kafka_bootstrap, app_id)) >= half,
                   timeout=90, what="the first half", logs=first.log)
        first.kill()  # SIGKILL: no clean shutdown, offsets possibly uncommitted
        for events in phases[2:]:
            emit_all(emitter, events, expected)
    finally:
        emitter.close()
    total = sum(sum(c.values()) for c in expected.counts.values())
    second = workers()
    state = settle(kafka_bootstrap, app_id, total, timeout=120, what="after the restart",
                   logs=second.log)
    check_against(expected, state)
    # a clean stop and start resumes from the changelog: one more event makes total + 1
    assert second.stop(timeout=30) is not None
    third = workers()
    emitter = Emitter(kafka_bootstrap, worker_env["COMMPIPE_TOPIC"], settings=settings)
    emitter.request(source_service="gateway", target_service="orders", protocol="http",
                    ts=T_END)
    assert emitter.flush(timeout=30) is True
    emitter.close()
    settle(kafka_bootstrap, app_id, total + 1, timeout=90, what="after the clean restart",
           logs=third.log)


def test_two_workers_split_partitions_and_agree_with_one(
        worker_env: dict[str, str], workers: Callable[[], WorkerProcess],
        kafka_bootstrap: str) -> None:
    rng = random.Random(5)
    phases, _ = traffic(rng)
    expected = Expected()
    app_id = worker_env["COMMPIPE_APP_ID"]
    worker_env["COMMPIPE_WORKER_LOGLEVEL"] = "info"  # to read each worker's assignment
    pair = [workers(), workers()]
    settings = Settings.from_env({}, shim_linger_ms=5)
    emitter = Emitter(kafka_bootstrap, worker_env["COMMPIPE_TOPIC"], settings=settings)
    try:
        for events in phases:
            emit_all(emitter, events, expected)
    finally:
        emitter.close()
    total = sum(sum(c.values()) for c in expected.counts.values())
    state = settle(kafka_bootstrap, app_id, total, timeout=120, what="with two workers",
                   logs=lambda: pair[0].log() + pair[1].log())
    check_against(expected, state)
    assert all(w.alive for w in pair)
    topic = re.escape(worker_env["COMMPIPE_TOPIC"])
    owned = []
    for worker in pair:  # the last assignment each worker logged for the input topic
        found = re.findall(rf"\|\s*{topic}\s*\|\s*\{{([0-9, -]+)\}}", worker.log())
        assert found, worker.log()[-2000:]
        owned.append(set(_partitions(found[-1])))
    assert owned[0] and owned[1] and owned[0].isdisjoint(owned[1])
    assert owned[0] | owned[1] == {0, 1, 2, 3}


def _partitions(text: str) -> list[int]:
    """``"0, 2"`` or ``"0-3"`` (Faust's compact sets) -> partition numbers."""
    out: list[int] = []
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        out.extend(range(int(low), int(high or low) + 1))
    return out
