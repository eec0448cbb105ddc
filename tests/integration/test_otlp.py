"""OpenTelemetry spans in, end to end: an instrumented client (the real SDK, known durations,
statuses and attributes), its spans encoded by the SDK's own OTLP encoders and written to a
topic as the Collector's Kafka exporter writes them (one ``ExportTraceServiceRequest`` per
record, no key; protobuf and JSON), a real worker with ``COMMPIPE_OTLP_TOPIC`` and its sink.
The rollups in both databases and ``/metrics`` equal what the call plan says, computed here
without the code under test; then the same with the worker killed mid-run."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from opentelemetry.exporter.otlp.json.common.trace_encoder import encode_spans as json_spans
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as proto_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode

from pipeline.dev.process import free_port
from tests.integration.test_metrics import scrape, try_scrape
from tests.integration.test_sink import Databases, check_rollups, wait_for_rows
from tests.integration.traffic import WINDOW, Expected
from tests.integration.workers import (
    WorkerProcess,
    read_topic,
    wait_until,
    worker_environment,
    worker_starter,
)

pytestmark = pytest.mark.integration

# (source service, span attributes, the edge it must make) for each kind of call
CALLS = [
    ("orders", {"rpc.system": "grpc", "rpc.service": "payments.v1.Payments",
                "peer.service": "payments", "rpc.method": "Charge"},
     ("orders", "payments", "grpc")),
    ("orders", {"http.request.method": "GET", "server.address": "inventory",
                "url.full": "http://inventory/items"}, ("orders", "inventory", "http")),
    ("orders", {"messaging.system": "kafka", "messaging.destination.name": "orders.created",
                "server.address": "broker-1"}, ("orders", "orders.created", "kafka")),
    ("gateway", {"http.request.method": "POST", "peer.service": "orders"},
     ("gateway", "orders", "http")),
]
# outcome -> (status, extra attributes, exception, expected kind, expected error type)
OUTCOMES: dict[str, tuple[bool, dict[str, Any], BaseException | None, str, str | None]] = {
    "ok": (False, {}, None, "response", None),
    "http_503": (True, {"http.response.status_code": 503}, None, "error", "http_5xx"),
    "grpc_unavailable": (True, {"rpc.grpc.status_code": 14}, None, "error", "grpc_unavailable"),
    "deadline": (True, {"rpc.grpc.status_code": 4}, None, "timeout", "timeout"),
    "refused": (True, {}, ConnectionRefusedError("refused"), "error", "ConnectionRefusedError"),
}


class Services:
    """Instrumented services: one SDK tracer provider per service name."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracers = {}
        for name in ("orders", "gateway"):
            provider = TracerProvider(resource=Resource.create({"service.name": name}))
            provider.add_span_processor(SimpleSpanProcessor(self.exporter))
            self.tracers[name] = provider.get_tracer("shop")

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())


def make_calls(rng: random.Random, services: Services, n: int, t0: float, span_s: float,
               expected: Expected) -> None:
    """``n`` client calls (plus a server span around each and an internal one) with known
    times and outcomes, and what each must count, recorded in ``expected``."""
    for i in range(n):
        source, attributes, edge = CALLS[i % len(CALLS)]
        outcome = rng.choices(list(OUTCOMES), weights=[70, 8, 8, 7, 7])[0]
        failed, extra, exception, kind, error_type = OUTCOMES[outcome]
        if edge[2] != "grpc" and outcome in ("grpc_unavailable", "deadline"):
            failed, extra, exception, kind, error_type = OUTCOMES["ok"]
        start = t0 + span_s * i / n
        latency_ms = round(rng.lognormvariate(3.0, 0.7), 3) if kind != "timeout" else 1000.0
        size = rng.randint(10, 900) if edge[2] == "http" else None
        tracer = services.tracers[source]
        start_ns = int(start * 1e9)
        with tracer.start_as_current_span("handle", kind=SpanKind.SERVER, start_time=start_ns,
                                          end_on_exit=False) as server:
            span = tracer.start_span(
                f"call {edge[1]}", kind=SpanKind.PRODUCER if edge[2] == "kafka"
                else SpanKind.CLIENT, start_time=start_ns,
                attributes={**attributes, **extra,
                            **({"http.request.body.size": size} if size else {})})
            if exception is not None:
                span.record_exception(exception)
            if failed:
                span.set_status(Status(StatusCode.ERROR))
            end_ns = start_ns + round(latency_ms * 1e6)
            span.end(end_time=end_ns)
            tracer.start_span("render", kind=SpanKind.INTERNAL, start_time=end_ns).end(
                end_time=end_ns + 1000)
            server.end(end_time=end_ns + 2000)
        base = dict(zip(("source_service", "target_service", "protocol"), edge, strict=True))
        expected.add({**base, "kind": "request", "ts": start_ns / 1e9,
                      **({"payload_size": size} if size else {})})
        outcome_event = {**base, "kind": kind, "ts": end_ns / 1e9,
                         "latency_ms": (end_ns - start_ns) / 1e6}
        if kind == "error":
            outcome_event["error_type"] = error_type
        expected.add(outcome_event)


def collector_records(spans: list[ReadableSpan], per_record: int) -> list[bytes]:
    """What the Collector's Kafka exporter writes: one ExportTraceServiceRequest per batch of
    spans (in the order they ended), encoded ``otlp_proto``, every third one ``otlp_json``."""
    spans = sorted(spans, key=lambda s: s.end_time or 0)
    out = []
    for k, i in enumerate(range(0, len(spans), per_record)):
        batch = spans[i:i + per_record]
        out.append(json_spans(batch).to_json().encode() if k % 3 == 2
                   else proto_spans(batch).SerializeToString())
    return out


async def write(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5,
                                max_request_size=4 * 1024 * 1024)
    await producer.start()
    try:
        await asyncio.gather(*[await producer.send(topic, v) for v in values])
    finally:
        await producer.stop()


@pytest.fixture
def db(pg_database: str, duckdb_path: str) -> Databases:
    return Databases(pg_database, duckdb_path)


@pytest.fixture
def otlp_env(kafka_bootstrap: str, topic_factory: Callable[..., str], tmp_path: Path,
             db: Databases) -> dict[str, str]:
    # The bridge reads the OTLP topic's two partitions in rounds, and one may run ahead of
    # the other by a fetch: a grace of a few seconds would count the other's spans late.
    return worker_environment(
        kafka_bootstrap, topic_factory, tmp_path, window_s=WINDOW, grace_s=600,
        idle_close_s=3, COMMPIPE_POSTGRES_DSN=db.dsn, COMMPIPE_DUCKDB_PATH=db.duckdb_path,
        COMMPIPE_SINK_INTERVAL_S="0.5", COMMPIPE_OTLP_TOPIC=topic_factory(2),
        COMMPIPE_METRICS_PORT=str(free_port()), COMMPIPE_METRICS_STALE_S="3600")


@pytest.fixture
def workers(otlp_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[[], WorkerProcess]]:
    with worker_starter(otlp_env, tmp_path) as start:
        yield start


def check_metrics(env: dict[str, str], expected: Expected) -> None:
    """Per edge: requests, responses, timeouts and errors by type, as the plan says."""
    got = scrape(env)
    edges = {edge for _, edge in expected.counts}
    for edge in edges:
        labels = tuple(sorted(zip(("source_service", "target_service", "protocol"), edge,
                                  strict=True)))
        total: Counter[str] = Counter()
        errors: Counter[str] = Counter()
        for (_, e), c in expected.counts.items():
            if e == edge:
                total.update(c)
        for (_, e), c in expected.errors.items():
            if e == edge:
                errors.update(c)
        for name, kind in (("requests", "request"), ("responses", "response"),
                           ("timeouts", "timeout")):
            assert got[(f"commpipe_communication_{name}_total", labels)] == total[kind], \
                (edge, name)
        for error_type, n in errors.items():
            key = tuple(sorted((*labels, ("error_type", error_type))))
            assert got[("commpipe_communication_errors_total", key)] == n, (edge, error_type)
        assert sum(v for (name, lab), v in got.items()
                   if name == "commpipe_communication_errors_total"
                   and dict(lab).items() >= dict(labels).items()) == total["error"]


def _events(expected: Expected) -> int:
    return sum(sum(c.values()) for c in expected.counts.values())


def test_sdk_spans_from_the_collectors_topic_become_rollups_and_metrics(
        otlp_env: dict[str, str], workers: Callable[[], WorkerProcess], db: Databases) -> None:
    bootstrap, topic = otlp_env["COMMPIPE_KAFKA_BOOTSTRAP"], otlp_env["COMMPIPE_OTLP_TOPIC"]
    t0 = math.floor(time.time() / WINDOW) * WINDOW - 300
    expected, services = Expected(), Services()
    make_calls(random.Random(21), services, 240, t0, 45.0, expected)
    records = collector_records(services.spans(), per_record=50)
    # a record that is not OTLP, and one whose second span ends before it starts: the first
    # span of that record counts
    good = Services()
    make_calls(random.Random(5), good, 1, t0 + 50, 1.0, expected)
    client = next(x for x in good.spans() if x.kind == SpanKind.CLIENT)
    bad = good.tracers["orders"].start_span("bad", kind=SpanKind.CLIENT,
                                            start_time=int((t0 + 50) * 1e9),
                                            attributes={"peer.service": "payments"})
    bad.end(end_time=int((t0 + 49) * 1e9))
    records += [b"this is not OTLP", proto_spans([client, good.spans()[-1]]).SerializeToString()]
    asyncio.run(write(bootstrap, topic, records))
    worker = workers()
    wait_for_rows(db, "pg", expected, worker.log)
    wait_for_rows(db, "duck", expected, worker.log)
    check_rollups(expected, db)
    wait_until(lambda: try_scrape(otlp_env).get(("commpipe_events_consumed_total", ()))
               == _events(expected), timeout=30, what="every event counted", logs=worker.log)
    check_metrics(otlp_env, expected)
    got = scrape(otlp_env)
    assert got[("commpipe_otlp_spans_total", (("result", "call"),))] == 241
    assert got[("commpipe_otlp_spans_total", (("result", "server"),))] == 240
    assert got[("commpipe_otlp_spans_total", (("result", "internal"),))] == 240
    assert got[("commpipe_otlp_spans_total", (("result", "dead_letter"),))] == 1
    assert got[("commpipe_otlp_dead_letters_total", (("reason", "record"),))] == 1
    assert got[("commpipe_otlp_dead_letters_total", (("reason", "endTimeUnixNano"),))] == 1
    letters = read_topic(bootstrap, otlp_env["COMMPIPE_DLQ_TOPIC"])
    reasons = sorted(dict(m.headers)["commpipe-reason"].decode() for m in letters)
    assert len(reasons) == 2
    assert reasons[0].startswith("not OTLP: not an ExportTraceServiceRequest")
    assert reasons[1] == "the span ends 1000.000 ms before it starts"
    # the error events are stored one by one, with the spans' ids (ON CONFLICT (event_id))
    stored = db.pg("SELECT event_id, trace_id, span_id FROM communication_events")
    assert len(stored) == sum(n for c in expected.counts.values()
                              for k, n in c.items() if k in ("error", "timeout"))
    assert all(e.startswith(f"{t}-{s}-") for e, t, s in stored)
    assert worker.alive


def test_a_worker_killed_mid_run_neither_loses_nor_doubles_spans(
        otlp_env: dict[str, str], workers: Callable[[], WorkerProcess], db: Databases) -> None:
    """Small records (one call's spans each, as with ``partition_traces_by_id``); the worker
    SIGKILLed while its bridge is part-way through them, then started again."""
    bootstrap, topic = otlp_env["COMMPIPE_KAFKA_BOOTSTRAP"], otlp_env["COMMPIPE_OTLP_TOPIC"]
    t0 = math.floor(time.time() / WINDOW) * WINDOW - 300
    expected, services = Expected(), Services()
    make_calls(random.Random(22), services, 3000, t0, 60.0, expected)
    records = collector_records(services.spans(), per_record=3)
    half = len(records) * 2 // 3
    asyncio.run(write(bootstrap, topic, records[:half]))
    first = workers()

    def read() -> float:
        return try_scrape(otlp_env).get(("commpipe_otlp_records_total", ()), 0.0)

    deadline = time.monotonic() + 90
    while (at_kill := read()) < 400 and time.monotonic() < deadline:
        time.sleep(0.05)
    first.kill()
    assert 400 <= at_kill < half, f"not killed while bridging ({at_kill} of {half} records)"
    asyncio.run(write(bootstrap, topic, records[half:]))
    second = workers()
    wait_for_rows(db, "pg", expected, second.log)
    wait_for_rows(db, "duck", expected, second.log)
    check_rollups(expected, db)
    wait_until(lambda: _metrics_match(otlp_env, expected), timeout=30,
               what="/metrics equal to the plan", logs=second.log)
    check_metrics(otlp_env, expected)


def _metrics_match(env: dict[str, str], expected: Expected) -> bool:
    try:
        check_metrics(env, expected)
    except (AssertionError, KeyError, OSError):
        return False
    return True
