"""The shim against the real broker, read back with a plain aiokafka consumer."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

import pybreaker
import pytest
import tenacity
from aiokafka import AIOKafkaConsumer

from pipeline import AsyncEmitter, Emitter, Event, Settings, decode_record, edge_key
from pipeline.dev.broker import EmbeddedBroker
from pipeline.dev.process import free_port
from pipeline.shim.adapters.pybreaker import CircuitEvents
from pipeline.shim.adapters.tenacity import RetryEvents

pytestmark = pytest.mark.integration

SERVICES = ["gateway", "orders", "payments", "inventory", "db"]
PROTOCOLS = ["http", "grpc", "amqp"]


def read_back(bootstrap: str, topic: str, expected: int, *, timeout: float = 30.0
              ) -> list[tuple[int, bytes | None, Event]]:
    """(partition, key, event) of every event on ``topic``, read from the beginning."""

    async def main() -> list[tuple[int, bytes | None, Event]]:
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap,
                                    auto_offset_reset="earliest", enable_auto_commit=False)
        await consumer.start()
        out: list[tuple[int, bytes | None, Event]] = []
        try:
            deadline = time.monotonic() + timeout
            while len(out) < expected and time.monotonic() < deadline:
                batches = await consumer.getmany(timeout_ms=500)
                for tp, messages in batches.items():
                    for message in messages:
                        decoded = decode_record(message.value)
                        assert decoded.errors == []
                        out.extend((tp.partition, message.key, e) for e in decoded.events)
            # anything beyond the expected count would be a duplicate: look once more
            for tp_messages in (await consumer.getmany(timeout_ms=500)).values():
                for message in tp_messages:
                    out.extend((-1, message.key, e) for e in decode_record(message.value).events)
        finally:
            await consumer.stop()
        return out

    return asyncio.run(main())


def test_ten_thousand_events_arrive_intact_and_each_edge_on_one_partition(
        kafka_bootstrap: str, topic_factory: Callable[..., str]) -> None:
    topic = topic_factory(4)
    rng = random.Random(20261123)
    sent: dict[str, dict[str, Any]] = {}
    emitter = Emitter(kafka_bootstrap, topic, settings=Settings.from_env({}))
    try:
        for i in range(10_000):
            source, target = rng.sample(SERVICES, 2)
            correlation_id = f"c{i}"
            fields = dict(source_service=source, target_service=target,
                          protocol=rng.choice(PROTOCOLS), correlation_id=correlation_id,
                          ts=1_763_900_000.0 + i / 1000)
            kind = rng.choice(["request", "response", "error", "retry"])
            if kind == "request":
                emitter.request(method=f"m{i % 7}", **fields)
            elif kind == "response":
                emitter.response(latency_ms=rng.uniform(0, 500), status_code=200,
                                 payload_size=i, **fields)
            elif kind == "error":
                emitter.error(error_type=rng.choice(["connection", "http_5xx"]),
                              status_code=503, latency_ms=rng.uniform(0, 50), **fields)
            else:
                emitter.retry(attempt=1 + i % 3, backoff_ms=100.0 * (1 + i % 3),
                              error_type="connection", **fields)
            sent[correlation_id] = {"kind": kind, **fields}
        assert emitter.flush(timeout=60) is True
    finally:
        emitter.close()
    stats = emitter.stats()
    assert (stats.sent, stats.dropped, stats.failed, stats.invalid) == (10_000, 0, 0, 0)

    received = read_back(kafka_bootstrap, topic, 10_000)
    assert len(received) == 10_000
    by_id = {event.correlation_id: event for _, _, event in received}
    assert len(by_id) == 10_000 and len({e.event_id for _, _, e in received}) == 10_000
    partitions: dict[str, set[int]] = defaultdict(set)
    for partition, key, event in received:
        assert key == edge_key(event.source_service, event.target_service,
                               event.protocol).encode()
        partitions[event.edge].add(partition)
        expected = sent[event.correlation_id]
        wire = event.to_wire()
        for name, value in expected.items():
            assert wire[name] == value, (name, event)
    assert all(len(p) == 1 for p in partitions.values())
    assert len({p for ps in partitions.values() for p in ps}) > 1  # edges spread over partitions


def test_without_a_broker_emit_stays_fast_then_delivers_when_one_appears(
        topic_factory: Callable[..., str]) -> None:
    port = free_port()
    emitter = Emitter(f"127.0.0.1:{port}", "late.topic",
                      settings=Settings.from_env({}, shim_buffer_size=2_000))
    late_broker = EmbeddedBroker(port)
    try:
        durations = []
        for i in range(3_000):
            started = time.perf_counter_ns()
            emitter.request(source_service="orders", target_service="payments",
                            correlation_id=f"c{i}", ts=1_763_900_000.0 + i)
            durations.append(time.perf_counter_ns() - started)
        durations.sort()
        # microseconds, not the seconds a blocking connect would take (generous for CI noise)
        assert durations[len(durations) // 2] < 200_000
        time.sleep(1.0)  # the sender has tried, and failed, to connect meanwhile
        stats = emitter.stats()
        assert (stats.sent, stats.dropped, stats.buffered) == (0, 1_000, 2_000)

        late_broker.start()
        assert emitter.flush(timeout=60) is True
        stats = emitter.stats()
        assert (stats.sent, stats.dropped, stats.buffered) == (2_000, 1_000, 0)
        received = read_back(late_broker.bootstrap, "late.topic", 2_000)
        # the first 2,000 were buffered; the 1,000 beyond the bound were dropped
        assert sorted(e.correlation_id for _, _, e in received) == sorted(
            f"c{i}" for i in range(2_000))
    finally:
        emitter.close(timeout=5)
        late_broker.close()


def test_async_emitter_round_trip(kafka_bootstrap: str,
                                  topic_factory: Callable[..., str]) -> None:
    topic = topic_factory(4)

    async def main() -> Any:
        async with AsyncEmitter(kafka_bootstrap, topic,
                                settings=Settings.from_env({})) as emitter:
            for i in range(500):
                async with emitter.call("gateway", "orders", protocol="grpc",
                                        correlation_id=f"call{i}") as call:
                    call.status_code = 0
            assert await emitter.flush(timeout=30) is True
        return emitter.stats()

    stats = asyncio.run(main())
    assert (stats.sent, stats.dropped, stats.failed, stats.invalid) == (1_000, 0, 0, 0)
    received = read_back(kafka_bootstrap, topic, 1_000)
    kinds = Counter((e.correlation_id, e.kind) for _, _, e in received)
    assert kinds == Counter({(f"call{i}", k): 1 for i in range(500)
                             for k in ("request", "response")})


def test_adapters_emit_through_a_real_broker(kafka_bootstrap: str,
                                             topic_factory: Callable[..., str]) -> None:
    topic = topic_factory(4)
    emitter = Emitter(kafka_bootstrap, topic, settings=Settings.from_env({}))
    attempts = []
    retry_events = RetryEvents(emitter, "orders", "payments", protocol="http")

    @tenacity.retry(stop=tenacity.stop_after_attempt(4),
                    wait=tenacity.wait_exponential(multiplier=0.01, max=1),
                    before_sleep=retry_events, reraise=True)
    def flaky() -> str:
        attempts.append(1)
        if len(attempts) < 4:
            raise ConnectionRefusedError("refused")
        return "ok"

    breaker = pybreaker.CircuitBreaker(
        fail_max=2, reset_timeout=0.05,
        listeners=[CircuitEvents(emitter, "orders", "inventory", protocol="grpc")])
    try:
        assert flaky() == "ok"
        for _ in range(2):
            with pytest.raises((ZeroDivisionError, pybreaker.CircuitBreakerError)):
                breaker.call(lambda: 1 / 0)
        time.sleep(0.06)
        assert breaker.call(lambda: "fine") == "fine"
        assert emitter.flush(timeout=30) is True
    finally:
        emitter.close()

    received = [e for _, _, e in read_back(kafka_bootstrap, topic, 6)]
    retries = sorted((e for e in received if e.kind == "retry"), key=lambda e: e.attempt or 0)
    assert [(e.attempt, e.backoff_ms, e.error_type, e.error_message) for e in retries] == [
        (1, 10.0, "connection", "refused"), (2, 20.0, "connection", "refused"),
        (3, 40.0, "connection", "refused")]
    assert len({e.correlation_id for e in retries}) == 1
    circuit = sorted((e for e in received if e.kind == "circuit"), key=lambda e: e.ts)
    assert [(e.target_service, e.protocol, e.circuit_state) for e in circuit] == [
        ("inventory", "grpc", "open"), ("inventory", "grpc", "half_open"),
        ("inventory", "grpc", "closed")]
