"""The shim without a broker: event building, the call timer, batching and accounting."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import sys
import time
from typing import Any

import orjson
import pytest

from pipeline import AsyncEmitter, Emitter, Event, Settings
from pipeline.shim.call import error_type_of
from pipeline.shim.kinds import EventKinds
from pipeline.shim.outbox import Outbox
from pipeline.wire.decode import decode_record


class Recorder(EventKinds):
    """The kind helpers with a list instead of Kafka."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def _put(self, event: dict[str, Any]) -> bool:
        self.events.append(event)
        return True


def closed_port() -> str:
    """A loopback address where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"127.0.0.1:{port}"


def settings(**overrides: Any) -> Settings:
    return Settings.from_env({}, **overrides)


def outbox(**overrides: Any) -> Outbox:
    options: dict[str, Any] = dict(topic="t", capacity=100, capacity_bytes=1_000_000,
                                   batch_events=3, batch_bytes=10_000, linger_s=0.01,
                                   producer_options={})
    options.update(overrides)
    return Outbox(**options)


def test_kind_helpers_build_wire_events() -> None:
    rec = Recorder()
    rec.request(source_service="a", target_service="b", protocol="grpc", method="Pay",
                correlation_id="c1", ts=1.7e9)
    rec.response(source_service="a", target_service="b", latency_ms=12.5, status_code=200,
                 correlation_id="c1", payload_size=10, ts=1.7e9)
    rec.error(source_service="a", target_service="b", error_type="http_5xx", status_code=503,
              ts=1.7e9)
    rec.timeout(source_service="a", target_service="b", latency_ms=1000, ts=1.7e9)
    rec.retry(source_service="a", target_service="b", attempt=2, backoff_ms=200,
              error_type="connection", ts=1.7e9)
    rec.circuit(source_service="a", target_service="b", circuit_state="open", ts=1.7e9)
    rec.health(source_service="a", target_service="b", health_status="degraded",
               check_type="readiness", latency_ms=3, ts=1.7e9)
    common = {"v": 1, "source_service": "a", "target_service": "b", "ts": 1.7e9}
    assert rec.events == [
        {**common, "kind": "request", "protocol": "grpc", "method": "Pay",
         "correlation_id": "c1"},
        {**common, "kind": "response", "protocol": "http", "latency_ms": 12.5,
         "status_code": 200, "correlation_id": "c1", "payload_size": 10},
        {**common, "kind": "error", "protocol": "http", "error_type": "http_5xx",
         "status_code": 503},
        {**common, "kind": "timeout", "protocol": "http", "latency_ms": 1000,
         "error_type": "timeout"},
        {**common, "kind": "retry", "protocol": "http", "attempt": 2, "backoff_ms": 200,
         "error_type": "connection"},
        {**common, "kind": "circuit", "protocol": "http", "circuit_state": "open"},
        {**common, "kind": "health", "protocol": "http", "health_status": "degraded",
         "check_type": "readiness", "latency_ms": 3},
    ]


def test_ts_defaults_to_now() -> None:
    rec = Recorder()
    before = time.time()
    rec.request(source_service="a", target_service="b")
    assert before <= rec.events[0]["ts"] <= time.time()


def test_call_success_emits_request_then_response_with_latency() -> None:
    rec = Recorder()
    with rec.call("orders", "payments", protocol="grpc", method="Charge") as call:
        time.sleep(0.02)
        call.status_code = 0
        call.payload_size = 99
    request, response = rec.events
    assert request["kind"] == "request" and response["kind"] == "response"
    assert request["correlation_id"] == response["correlation_id"] == call.correlation_id
    assert re.fullmatch(r"[0-9a-f]{32}", call.correlation_id)
    assert 20.0 <= response["latency_ms"] < 2000.0
    assert (response["status_code"], response["payload_size"], response["method"]) == (
        0, 99, "Charge")


@pytest.mark.parametrize(
    ("exc", "kind", "error_type"),
    [(ConnectionRefusedError("no"), "error", "connection"),
     (KeyError("k"), "error", "KeyError"),
     (TimeoutError(), "timeout", "timeout"),
     (OSError("disk"), "error", "OSError")],
)
def test_call_failure_reraises_and_reports(exc: Exception, kind: str, error_type: str) -> None:
    rec = Recorder()
    with pytest.raises(type(exc)):
        with rec.call("a", "b", correlation_id="cid"):
            raise exc
    assert [e["kind"] for e in rec.events] == ["request", kind]
    assert rec.events[1]["error_type"] == error_type
    assert rec.events[1]["correlation_id"] == "cid"
    assert rec.events[1]["latency_ms"] >= 0


def test_call_fail_without_exception() -> None:
    rec = Recorder()
    with rec.call("a", "b") as call:
        call.fail("http_5xx", status_code=503)
    assert rec.events[1]["kind"] == "error"
    assert (rec.events[1]["error_type"], rec.events[1]["status_code"]) == ("http_5xx", 503)
    assert "error_message" not in rec.events[1]
    with rec.call("a", "b") as call:
        call.fail("rejected", message="quota exceeded for api_key=k-123")
    assert rec.events[3]["error_message"] == "quota exceeded for api_key=k-123"


def test_call_failures_carry_the_exception_text_and_the_attempt() -> None:
    rec = Recorder()
    with pytest.raises(ConnectionError):
        with rec.call("a", "b", correlation_id="c", attempt=2):
            raise ConnectionError("to postgresql://u:secret@h/db")
    with pytest.raises(TimeoutError):
        with rec.call("a", "b", correlation_id="c", attempt=3):
            raise TimeoutError("read timed out\nafter 5 s")
    with pytest.raises(KeyError):
        with rec.call("a", "b", correlation_id="c", attempt=4):
            raise KeyError()  # str(KeyError()) == "": no message at all
    with rec.call("a", "b", correlation_id="c", attempt=5):
        pass
    assert [(e["kind"], e.get("attempt"), e.get("error_message")) for e in rec.events] == [
        ("request", 2, None), ("error", 2, "to postgresql://u:secret@h/db"),
        ("request", 3, None), ("timeout", 3, "read timed out\nafter 5 s"),
        ("request", 4, None), ("error", 4, None),
        ("request", 5, None), ("response", 5, None)]
    # the sender masks and bounds the text before it leaves the service
    box = outbox(batch_events=100)
    decoded = [e for r in box.encode(rec.events) for e in decode_record(r.value).events]
    assert [e.error_message for e in decoded if e.kind != "request"] == [
        "to postgresql://u:***@h/db", "read timed out after 5 s", None, None]


def test_sender_masks_bounds_and_drops_messages_from_any_source() -> None:
    rec = Recorder()
    rec.error(source_service="a", target_service="b", error_type="auth",
              error_message="401: Authorization: Bearer abc.def")
    rec.timeout(source_service="a", target_service="b", latency_ms=5.0,
                error_message="x" * 3000)
    rec.retry(source_service="a", target_service="b", attempt=1, error_message=" \n ")
    raw = {"v": 1, "kind": "error", "source_service": "a", "target_service": "b",
           "protocol": "http", "ts": 1.7e9, "error_message": "password=hunter2"}
    events = [*rec.events, raw]
    box = outbox(batch_events=100)
    decoded = [e for r in box.encode(events) for e in decode_record(r.value).events]
    assert box.stats().invalid == 0
    assert [e.error_message for e in decoded] == [
        "401: Authorization: Bearer ***", "x" * 1023 + "…", None, "password=***"]


def test_tenacity_adapter_times_each_attempt_under_one_correlation_id() -> None:
    import tenacity

    from pipeline.shim.adapters.tenacity import RetryEvents

    rec = Recorder()
    events = RetryEvents(rec, "orders", "payments", protocol="grpc", method="Charge")
    sleeps: list[float] = []
    for attempt in tenacity.Retrying(stop=tenacity.stop_after_attempt(4),
                                     wait=tenacity.wait_exponential(multiplier=0.2),
                                     before_sleep=events, sleep=sleeps.append):
        with attempt, events.call(attempt) as call:
            if attempt.retry_state.attempt_number < 4:
                raise ConnectionRefusedError("refused by payments:443, token=t0k3n")
            call.status_code = 0
    assert sleeps == [0.2, 0.4, 0.8]
    got = [(e["kind"], e.get("attempt"), e.get("backoff_ms"), e.get("error_type"),
            e.get("error_message")) for e in rec.events]
    failed = "refused by payments:443, token=t0k3n"  # masked by the sender, not here
    assert got == [
        ("request", 1, None, None, None), ("error", 1, None, "connection", failed),
        ("retry", 1, 200.0, "connection", failed),
        ("request", 2, None, None, None), ("error", 2, None, "connection", failed),
        ("retry", 2, 400.0, "connection", failed),
        ("request", 3, None, None, None), ("error", 3, None, "connection", failed),
        ("retry", 3, 800.0, "connection", failed),
        ("request", 4, None, None, None), ("response", 4, None, None, None)]
    assert len({e["correlation_id"] for e in rec.events}) == 1
    assert {(e["protocol"], e["method"]) for e in rec.events} == {("grpc", "Charge")}


def test_async_call() -> None:
    rec = Recorder()

    async def main() -> None:
        async with rec.call("a", "b") as call:
            await asyncio.sleep(0.01)
            call.status_code = 200

    asyncio.run(main())
    assert [e["kind"] for e in rec.events] == ["request", "response"]
    assert rec.events[1]["latency_ms"] >= 10.0


def test_error_type_of() -> None:
    class Weird_Ü(Exception):  # noqa: N801 - a class name that is not label-safe
        pass

    assert error_type_of(TimeoutError()) == "timeout"
    assert error_type_of(ConnectionResetError()) == "connection"
    assert error_type_of(ValueError()) == "ValueError"
    assert error_type_of(Weird_Ü()) == "Weird__"
    assert error_type_of(KeyboardInterrupt()) == "cancelled"
    assert error_type_of(asyncio.CancelledError()) == "cancelled"


def test_outbox_groups_by_edge_and_bounds_batches() -> None:
    box = outbox(batch_events=3)
    rec = Recorder()
    for i in range(7):
        rec.request(source_service="a", target_service="b", ts=1.7e9 + i)
    for i in range(2):
        rec.request(source_service="c", target_service="b", ts=1.7e9 + i)
    records = box.encode(rec.events)
    assert [(r.key, r.events) for r in records] == [
        (b"a\x1fb\x1fhttp", 3), (b"a\x1fb\x1fhttp", 3), (b"a\x1fb\x1fhttp", 1),
        (b"c\x1fb\x1fhttp", 2)]
    decoded = [decode_record(r.value) for r in records]
    assert all(not d.errors for d in decoded)
    events = [e for d in decoded for e in d.events]
    assert [e.ts for e in events] == [1.7e9 + i for i in range(7)] + [1.7e9, 1.7e9 + 1]
    ids = [e.event_id for e in events]
    assert len(set(ids)) == 9 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    # an event without a correlation id is its own call
    assert all(e.correlation_id == e.event_id for e in events)


def test_outbox_splits_records_by_bytes() -> None:
    box = outbox(batch_events=100, batch_bytes=1_000)
    rec = Recorder()
    for _ in range(20):
        rec.request(source_service="a", target_service="b", method="m" * 150)
    records = box.encode(rec.events)
    assert sum(r.events for r in records) == 20
    assert all(len(r.value) <= 1_000 for r in records)
    assert len(records) > 1


def test_outbox_counts_invalid_events() -> None:
    box = outbox()
    rec = Recorder()
    rec.request(source_service="bad name", target_service="b")
    rec.request(source_service="a", target_service="b")
    for event in rec.events:
        box.put(event)
    records = box.encode(*box.take())
    assert sum(r.events for r in records) == 1
    assert box.stats().invalid == 1 and box.stats().buffered == 1


def test_put_is_bounded_and_counts_drops() -> None:
    box = outbox(capacity=5)
    results = [box.put({"n": i}) for i in range(8)]
    assert results == [True] * 5 + [False] * 3
    stats = box.stats()
    assert (stats.buffered, stats.dropped, stats.sent) == (5, 3, 0)
    box.close()
    assert box.put({"n": 9}) is False and box.stats().dropped == 4


def test_emitter_without_broker_never_blocks_and_accounts_for_everything() -> None:
    emitter = Emitter(closed_port(), "t", settings=settings(shim_buffer_size=1_000))
    try:
        started = time.perf_counter()
        for _ in range(1_500):
            emitter.response(source_service="a", target_service="b", latency_ms=1.0)
        elapsed = time.perf_counter() - started
        assert elapsed < 1.0  # 1,500 emits; a blocking network call would take seconds
        stats = emitter.stats()
        assert (stats.sent, stats.dropped, stats.buffered) == (0, 500, 1_000)
        assert emitter.flush(timeout=0.2) is False
    finally:
        assert emitter.close(timeout=0.2) is False
    stats = emitter.stats()
    assert (stats.sent, stats.dropped, stats.failed, stats.buffered) == (0, 1_500, 0, 0)
    assert emitter.emit(Event("request", "e", "c", "a", "b", "http", 1.7e9)) is False
    assert emitter.close() is False  # second close is harmless


def test_emit_accepts_events_and_mappings() -> None:
    emitter = Emitter(closed_port(), "t", settings=settings())
    try:
        assert emitter.emit(Event("request", "e", "c", "a", "b", "http", 1.7e9)) is True
        wire = {"v": 1, "kind": "request", "source_service": "a", "target_service": "b",
                "protocol": "http", "ts": 1.7e9}
        assert emitter.emit(wire) is True
        assert "event_id" not in wire  # the caller's dict is not changed
        assert emitter.stats().buffered == 2
    finally:
        emitter.close(timeout=0.1)


def test_async_emitter_without_broker() -> None:
    async def main() -> tuple[Any, Any]:
        emitter = AsyncEmitter(closed_port(), "t", settings=settings(shim_buffer_size=10))
        async with emitter:
            for _ in range(12):
                emitter.request(source_service="a", target_service="b")
            during = emitter.stats()
            assert await emitter.flush(timeout=0.1) is False
            emitter._settings = settings(shim_close_timeout_s=0.1)
        return during, emitter.stats()

    during, after = asyncio.run(main())
    assert (during.buffered, during.dropped) == (10, 2)
    assert (after.buffered, after.dropped, after.sent) == (0, 12, 0)


def test_importing_the_shim_stays_light() -> None:
    code = ("import sys; import pipeline; from pipeline import Emitter, AsyncEmitter; "
            "heavy = {'faust', 'duckdb', 'psycopg', 'prometheus_client', 'typer', 'rich', "
            "'mode', 'tenacity', 'pybreaker'}; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_wire_of_event_round_trips() -> None:
    event = Event("retry", "e", "c", "a", "b", "http", 1.7e9, attempt=2, backoff_ms=100.0)
    assert decode_record(orjson.dumps(event.to_wire())).events == [event]
