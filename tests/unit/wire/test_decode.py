"""Every field rule of wire format v1, one case per rule, with the exact field named."""

from __future__ import annotations

import enum
from http import HTTPStatus
from typing import Any

import orjson
import pytest

from pipeline.errors import EventValidationError
from pipeline.wire.decode import (
    MAX_BATCH_EVENTS,
    MAX_RECORD_BYTES,
    decode_event,
    decode_record,
    validate_event,
)
from pipeline.wire.events import Event, edge_key, split_edge_key

TS = 1_763_900_000.0  # 2025-11-23


def base(**changes: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "v": 1,
        "kind": "request",
        "event_id": "0f" * 16,
        "correlation_id": "corr-1",
        "source_service": "orders",
        "target_service": "payments",
        "protocol": "http",
        "ts": TS,
    }
    for key, value in changes.items():
        if value is _DELETE:
            event.pop(key, None)
        else:
            event[key] = value
    return event


_DELETE = object()


def refused(event: Any) -> EventValidationError:
    with pytest.raises(EventValidationError) as info:
        validate_event(event)
    return info.value


def test_minimal_request_decodes_to_typed_event() -> None:
    event = decode_event(orjson.dumps(base()))
    assert event == Event(kind="request", event_id="0f" * 16, correlation_id="corr-1",
                          source_service="orders", target_service="payments", protocol="http",
                          ts=TS)
    assert event.v == 1
    assert event.edge == "orders\x1fpayments\x1fhttp"
    assert event.to_wire() == base()


def test_every_optional_field_round_trips() -> None:
    full = base(kind="response", trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
                span_id="00f067aa0ba902b7", method="POST /pay", latency_ms=12.5,
                status_code=200, error_type="none", error_message="upstream said: 200 OK",
                attempt=1, backoff_ms=0,
                payload_size=512, circuit_state="closed", health_status="healthy",
                check_type="liveness")
    event = validate_event(full)
    assert event.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert event.span_id == "00f067aa0ba902b7"
    assert event.method == "POST /pay"
    assert event.latency_ms == 12.5
    assert event.status_code == 200
    assert event.error_message == "upstream said: 200 OK"
    assert event.attempt == 1
    assert event.backoff_ms == 0.0 and isinstance(event.backoff_ms, float)
    assert event.payload_size == 512
    assert event.circuit_state == "closed"
    assert event.health_status == "healthy"
    assert event.check_type == "liveness"
    assert event.to_wire() == {**full, "backoff_ms": 0.0}


def test_unknown_fields_are_ignored_and_null_means_absent() -> None:
    event = validate_event(base(extra={"nested": [1, 2]}, method=None, latency_ms=None))
    assert event.method is None and event.latency_ms is None


@pytest.mark.parametrize(
    ("changes", "field", "reason"),
    [
        ({"v": _DELETE}, "v", "missing (required)"),
        ({"v": 2}, "v", "unsupported schema version 2; this reader reads v1"),
        ({"v": True}, "v", "unsupported schema version True"),
        ({"v": "1"}, "v", "unsupported schema version '1'"),
        ({"kind": _DELETE}, "kind", "missing (required)"),
        ({"kind": "reply"}, "kind", "expected one of circuit | error | health | request | "
                                    "response | retry | timeout, got 'reply'"),
        ({"kind": 3}, "kind", "got 3"),
        ({"event_id": _DELETE}, "event_id", "missing (required)"),
        ({"event_id": ""}, "event_id", "'' does not match [A-Za-z0-9_-]{1,64}"),
        ({"event_id": "a" * 65}, "event_id", "does not match [A-Za-z0-9_-]{1,64}"),
        ({"event_id": "a b"}, "event_id", "'a b' does not match"),
        ({"event_id": 12}, "event_id", "expected a string ([A-Za-z0-9_-]{1,64}), got int"),
        ({"correlation_id": _DELETE}, "correlation_id", "missing (required)"),
        ({"correlation_id": "has space"}, "correlation_id", "does not match 1-128 printable"),
        ({"correlation_id": "x" * 129}, "correlation_id", "does not match"),
        ({"correlation_id": "é"}, "correlation_id", "does not match"),
        ({"source_service": _DELETE}, "source_service", "missing (required)"),
        ({"source_service": ""}, "source_service", "does not match [A-Za-z0-9._:-]{1,100}"),
        ({"source_service": "a" * 101}, "source_service", "does not match"),
        ({"source_service": "orders'; DROP TABLE x;--"}, "source_service", "does not match"),
        ({"source_service": 'a"b'}, "source_service", "does not match"),
        ({"source_service": "a\nb"}, "source_service", "does not match"),
        ({"source_service": ["orders"]}, "source_service", "expected a string"),
        ({"target_service": _DELETE}, "target_service", "missing (required)"),
        ({"target_service": "pay{ments}"}, "target_service", "does not match"),
        ({"protocol": _DELETE}, "protocol", "missing (required)"),
        ({"protocol": "HTTP"}, "protocol", "'HTTP' does not match [a-z][a-z0-9._-]{0,31}"),
        ({"protocol": "1http"}, "protocol", "does not match"),
        ({"protocol": "h" * 33}, "protocol", "does not match"),
        ({"ts": _DELETE}, "ts", "missing (required)"),
        ({"ts": "2025-11-23"}, "ts", "expected a number, got str"),
        ({"ts": True}, "ts", "expected a number, got bool"),
        ({"ts": 946_684_799.0}, "ts", "946684799.0 is outside [9.46685e+08, 4.10244e+09)"),
        ({"ts": 4_102_444_800}, "ts", "is outside"),
        ({"ts": 1e400}, "ts", "must be finite, got inf"),
        ({"trace_id": "ABCDEF" + "0" * 26}, "trace_id", "does not match 32 lower-case hex"),
        ({"trace_id": "0" * 32}, "trace_id", "must not be all zero"),
        ({"trace_id": "a" * 31}, "trace_id", "does not match"),
        ({"span_id": "0" * 16}, "span_id", "must not be all zero"),
        ({"span_id": "xyz"}, "span_id", "does not match 16 lower-case hex"),
        ({"method": ""}, "method", "does not match 1-200 characters, no control characters"),
        ({"method": "a\x00b"}, "method", "does not match"),
        ({"method": "m" * 201}, "method", "does not match"),
        ({"latency_ms": -0.001}, "latency_ms", "-0.001 is outside [0, 8.64e+07]"),
        ({"latency_ms": 86_400_000.5}, "latency_ms", "is outside"),
        ({"latency_ms": "12"}, "latency_ms", "expected a number, got str"),
        ({"latency_ms": False}, "latency_ms", "expected a number, got bool"),
        ({"status_code": 200.0}, "status_code", "expected an integer, got float"),
        ({"status_code": -1}, "status_code", "-1 is outside [0, 999]"),
        ({"status_code": 1000}, "status_code", "1000 is outside [0, 999]"),
        ({"error_type": "http 5xx"}, "error_type", "does not match"),
        ({"error_type": ""}, "error_type", "does not match"),
        ({"error_message": ""}, "error_message", "0 characters; 1-1024 are accepted"),
        ({"error_message": "m" * 1025}, "error_message", "1025 characters; 1-1024 are accepted"),
        ({"error_message": 503}, "error_message", "expected a string, got int"),
        ({"error_message": ["a"]}, "error_message", "expected a string, got list"),
        ({"error_message": "line one\nline two"}, "error_message",
         "control character U+000A at position 8 (one line of printable text is accepted)"),
        ({"error_message": "red \x1b[31m"}, "error_message", "control character U+001B"),
        ({"error_message": "csi \x9b"}, "error_message", "control character U+009B"),
        ({"attempt": 0}, "attempt", "0 is outside [1, 10000]"),
        ({"attempt": 1.5}, "attempt", "expected an integer, got float"),
        ({"backoff_ms": -5}, "backoff_ms", "is outside"),
        ({"payload_size": -1}, "payload_size", "-1 is outside [0, 1099511627776]"),
        ({"payload_size": 2**40 + 1}, "payload_size", "is outside"),
        ({"circuit_state": "half-open"}, "circuit_state",
         "expected one of closed | half_open | open, got 'half-open'"),
        ({"health_status": "ok"}, "health_status",
         "expected one of degraded | healthy | unhealthy, got 'ok'"),
        ({"check_type": "live ness"}, "check_type", "does not match"),
    ],
)
def test_field_rules(changes: dict[str, Any], field: str, reason: str) -> None:
    error = refused(base(**changes))
    assert error.field == field
    assert reason in error.reason
    assert str(error).startswith(f"{field}: ")


@pytest.mark.parametrize(
    ("kind", "field"),
    [("response", "latency_ms"), ("retry", "attempt"), ("circuit", "circuit_state"),
     ("health", "health_status")],
)
def test_fields_required_by_kind(kind: str, field: str) -> None:
    error = refused(base(kind=kind))
    assert (error.field, error.reason) == (field, f"missing (required for {kind} events)")


@pytest.mark.parametrize("kind", ["request", "error", "timeout"])
def test_kinds_with_nothing_extra_required(kind: str) -> None:
    assert validate_event(base(kind=kind)).kind == kind


def test_boundaries_that_are_allowed() -> None:
    event = validate_event(base(kind="response", latency_ms=0, ts=946_684_800,
                                status_code=999, payload_size=2**40,
                                source_service="a" * 100, protocol="x" + "y" * 31))
    assert event.latency_ms == 0.0 and event.ts == 946_684_800.0
    assert validate_event(base(kind="response", latency_ms=86_400_000)).latency_ms == 86_400_000


def test_error_message_accepted_as_sent_and_never_quoted_when_refused() -> None:
    for text in ("x", "m" * 1024, "connect to postgresql://u:***@h/db: refused", "Ünïcödé ✓"):
        event = validate_event(base(kind="error", error_message=text))
        assert event.error_message == text
        assert event.to_wire()["error_message"] == text
    # the decoder validates; masking is the shim's and the worker's job (pipeline.wire.redact)
    secret = "password=hunter2\n"
    error = refused(base(kind="error", error_message=secret))
    assert "hunter2" not in str(error)
    assert "hunter2" not in str(refused(base(error_message="hunter2" * 200)))


def test_protocol_is_not_accepted_through_the_name_memory() -> None:
    # "HTTP" is a valid service name; passing it as a name first must not make it a protocol.
    validate_event(base(source_service="HTTP"))
    assert refused(base(protocol="HTTP")).field == "protocol"


def test_not_an_object() -> None:
    error = refused([1])
    assert error.field is None and error.reason == "expected a JSON object, got list"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "record has no value"),
        (b"", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON: str is not valid UTF-8"),
        (b'{"v":1,"kind":"request","source_service":"\xed\xa0\x80"}', "not valid UTF-8"),
        (b"NaN", "not valid JSON"),
        (b"42", "expected a JSON object or array of objects, got int"),
        (b'"hello"', "expected a JSON object or array of objects, got str"),
        (b"[]", "empty batch (a JSON array with no events)"),
    ],
)
def test_record_level_errors(value: bytes | None, reason: str) -> None:
    with pytest.raises(EventValidationError) as info:
        decode_record(value)
    assert info.value.field is None and info.value.index is None
    assert reason in info.value.reason


def test_record_size_and_batch_length_limits() -> None:
    big = b'{"pad":"' + b"x" * MAX_RECORD_BYTES + b'"}'
    with pytest.raises(EventValidationError, match=f"at most {MAX_RECORD_BYTES} are accepted"):
        decode_record(big)
    many = orjson.dumps([{}] * (MAX_BATCH_EVENTS + 1))
    with pytest.raises(EventValidationError,
                       match=f"batch holds {MAX_BATCH_EVENTS + 1} events; at most"):
        decode_record(many)


def test_batch_keeps_good_events_and_reports_each_bad_one_with_its_index() -> None:
    good1 = base(event_id="e1")
    good2 = base(event_id="e2", kind="response", latency_ms=3)
    record = orjson.dumps([good1, base(ts="x"), 7, good2, base(kind="retry")])
    events, errors = decode_record(record)
    assert [e.event_id for e in events] == ["e1", "e2"]
    assert [(e.index, e.field) for e in errors] == [(1, "ts"), (2, None), (4, "attempt")]
    assert str(errors[0]) == "event[1].ts: expected a number, got str"
    assert str(errors[1]) == "event[2]: expected a JSON object, got int"


def test_single_object_record() -> None:
    events, errors = decode_record(orjson.dumps(base()))
    assert len(events) == 1 and errors == []
    with pytest.raises(EventValidationError) as info:
        decode_record(orjson.dumps(base(kind="nope")))
    assert info.value.field == "kind" and info.value.index is None


def test_str_and_memoryview_values_are_accepted() -> None:
    raw = orjson.dumps(base())
    assert decode_event(raw.decode()) == decode_event(memoryview(raw))


def test_edge_key_round_trip() -> None:
    key = edge_key("orders", "payments", "grpc")
    assert key == "orders\x1fpayments\x1fgrpc"
    assert split_edge_key(key) == ("orders", "payments", "grpc")
    with pytest.raises(ValueError):
        split_edge_key("orders-payments")


class Service(enum.StrEnum):
    ORDERS = "orders"
    PAYMENTS = "payments"


class Protocol(enum.StrEnum):
    GRPC = "grpc"


class Millis(float):
    """A float subclass (as numpy.float64 is)."""


class Tagged(str):
    """A str subclass whose ``__str__``, ``__eq__`` and ``__hash__`` say something else: the
    decoder must read the characters themselves."""

    def __str__(self) -> str:
        return "bogus name"

    def __eq__(self, other: object) -> bool:
        return False

    def __hash__(self) -> int:
        raise TypeError("unhashable on purpose")


def test_int_float_and_str_subclasses_are_accepted_as_their_plain_values() -> None:
    event = validate_event(base(
        kind="error", source_service=Service.ORDERS, target_service=Tagged("payments"),
        protocol=Protocol.GRPC, status_code=HTTPStatus.SERVICE_UNAVAILABLE,
        latency_ms=Millis(12.5), error_type=Tagged("http_5xx"), attempt=HTTPStatus.CONTINUE,
        method=Tagged("POST /pay"), correlation_id=Tagged("corr-1"),
        event_id=Tagged("e" * 32), error_message=Tagged("refused"), ts=Millis(TS)))
    assert event == Event(kind="error", event_id="e" * 32, correlation_id="corr-1",
                          source_service="orders", target_service="payments", protocol="grpc",
                          ts=TS, method="POST /pay", latency_ms=12.5, status_code=503,
                          error_type="http_5xx", error_message="refused", attempt=100)
    # the event holds plain values, not the subclasses it was given
    assert [type(v) for v in event if v is not None] == [
        str, str, str, str, str, str, float, str, float, int, str, str, int, int]
    health = validate_event(base(kind="health", health_status=enum.StrEnum(
        "H", {"OK": "healthy"}).OK, check_type=Tagged("readiness")))
    assert (type(health.health_status), health.health_status) == (str, "healthy")
    assert health.check_type == "readiness"


def test_bool_is_still_not_a_number_and_subclass_values_still_follow_the_rules() -> None:
    assert refused(base(status_code=True)).reason == "expected an integer, got bool"
    assert refused(base(latency_ms=False)).reason == "expected a number, got bool"
    assert refused(base(status_code=HTTPStatus.OK, attempt=0)).field == "attempt"
    assert "does not match" in refused(base(source_service=Tagged("bad name"))).reason
    assert refused(base(payload_size=Millis(1.0))).reason == (
        "expected an integer, got Millis")
