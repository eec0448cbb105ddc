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
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from pipeline import Emitter, Settings
from pipeline.core.rollups import Rollups
from pipeline.core.sketch import ALPHA
from pipeline.core.window import WindowConfig
from tests.integration.traffic import (
    EDGES,
    GRACE,
    T0,
    T_END,
    WINDOW,
    Expected,
    breaker_entries,
    emit_all,
    produce_legacy,
    traffic,
)
from tests.integration.workers import (
    WorkerProcess,
    read_state,
    read_topic,
    wait_until,
    worker_environment,
    worker_starter,
)

pytestmark = pytest.mark.integration

def settle(bootstrap: str, app_id: str, total: int, *, timeout: float, what: str,
           logs: Callable[[], str]) -> dict[str, Any]:
    """Wait until the table holds ``total`` events; it must then hold exactly that many."""
    wait_until(lambda: applied_events(read_state(bootstrap, app_id)) >= total,
               timeout=timeout, what=f"{total} events {what}", logs=logs)
    state = read_state(bootstrap, app_id)
    assert applied_events(state) == total
    return state


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
    return worker_environment(kafka_bootstrap, topic_factory, tmp_path, window_s=WINDOW,
                              grace_s=GRACE)


@pytest.fixture
def workers(worker_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[[], WorkerProcess]]:
    with worker_starter(worker_env, tmp_path) as start:
        yield start


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


def test_sigkill_while_changes_wait_in_the_cache_loses_and_doubles_nothing(
        kafka_bootstrap: str, topic_factory: Callable[..., str], tmp_path: Path) -> None:
    """A worker that gathers changes for 60 s (COMMPIPE_WORKER_CACHE_INTERVAL_S) holds them,
    and the records behind them unacknowledged, when it is killed; a restarted worker
    (the default interval) must count every event exactly once."""
    from pipeline.dev.process import free_port
    from tests.integration.test_metrics import try_scrape

    env = worker_environment(kafka_bootstrap, topic_factory, tmp_path, window_s=WINDOW,
                             grace_s=GRACE, COMMPIPE_METRICS_PORT=str(free_port()),
                             COMMPIPE_METRICS_HOST="127.0.0.1")
    rng = random.Random(13)
    phases, _ = traffic(rng)
    expected = Expected()
    settings = Settings.from_env({}, shim_linger_ms=5)
    with worker_starter({**env, "COMMPIPE_WORKER_CACHE_INTERVAL_S": "60"}, tmp_path) as start:
        holder = start()
        emitter = Emitter(kafka_bootstrap, env["COMMPIPE_TOPIC"], settings=settings)
        try:
            emit_all(emitter, phases[0], expected)
            assert emitter.flush(timeout=30)
            first = sum(sum(c.values()) for c in expected.counts.values())

            def unwritten() -> float:
                metrics = try_scrape(env)
                return metrics.get(("commpipe_worker_unwritten_records", ()), 0.0) if (
                    metrics.get(("commpipe_events_consumed_total", ()), 0.0) >= first) else 0.0

            wait_until(lambda: unwritten() > 0, timeout=90, what="changes held in the cache",
                       logs=holder.log)
            assert read_state(kafka_bootstrap, env["COMMPIPE_APP_ID"]) == {}  # none written
            holder.kill()
            for events in phases[1:]:
                emit_all(emitter, events, expected)
            assert emitter.flush(timeout=30)
        finally:
            emitter.close()
    total = sum(sum(c.values()) for c in expected.counts.values())
    with worker_starter(env, tmp_path) as start:
        second = start()
        state = settle(kafka_bootstrap, env["COMMPIPE_APP_ID"], total, timeout=120,
                       what="after the restart", logs=second.log)
    check_against(expected, state)


def test_two_workers_split_partitions_and_agree_with_one(
        worker_env: dict[str, str], workers: Callable[[], WorkerProcess],
        kafka_bootstrap: str) -> None:
    rng = random.Random(5)
    phases, _ = traffic(rng)
    expected = Expected()
    app_id = worker_env["COMMPIPE_APP_ID"]
    worker_env["COMMPIPE_WORKER_LOGLEVEL"] = "info"  # to read each worker's assignment
    pair = [workers(), workers()]
    topic = re.escape(worker_env["COMMPIPE_TOPIC"])

    def owned() -> list[set[int]]:  # the last assignment each worker logged for the input
        found = [re.findall(rf"\|\s*{topic}\s*\|\s*\{{([0-9, -]+)\}}", w.log()) for w in pair]
        return [set(_partitions(f[-1])) if f else set() for f in found]

    # both in the group before any traffic: on Apache Kafka the first worker to join could
    # otherwise have read everything before the second one's join
    wait_until(lambda: all(owned()), timeout=90, what="both workers assigned partitions",
               logs=lambda: pair[0].log() + pair[1].log())
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
    first, second = owned()
    assert first and second and first.isdisjoint(second)
    assert first | second == {0, 1, 2, 3}


def _partitions(text: str) -> list[int]:
    """``"0, 2"`` or ``"0-3"`` (Faust's compact sets) -> partition numbers."""
    out: list[int] = []
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        out.extend(range(int(low), int(high or low) + 1))
    return out
