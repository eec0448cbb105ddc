"""OTLP trace records in: spans made by the real OpenTelemetry SDK, encoded by its own OTLP
encoders (protobuf and JSON), decoded into calls; every expectation written out by hand."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import orjson
import pytest
from google.protobuf.internal import api_implementation
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.json.common.trace_encoder import encode_spans as json_spans
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as proto_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode

from pipeline.errors import EventValidationError
from pipeline.wire.otlp import decode_otlp

T0 = 1_763_900_000_000_000_000  # ns


class Client:
    """An instrumented service: the SDK's tracer, spans with explicit times."""

    def __init__(self, service: str = "orders") -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider(resource=Resource.create({"service.name": service}))
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("test")

    def span(self, name: str, *, kind: SpanKind = SpanKind.CLIENT, start: int = T0,
             ms: float = 10.0, error: str | None = None, exception: BaseException | None = None,
             **attributes: Any) -> ReadableSpan:
        span = self.tracer.start_span(name, kind=kind, start_time=start,
                                      attributes={k.replace("__", "."): v
                                                  for k, v in attributes.items()})
        if exception is not None:
            span.record_exception(exception)
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error or None))
        span.end(end_time=start + int(ms * 1_000_000))
        return self.exporter.get_finished_spans()[-1]


def encode(spans: list[ReadableSpan], encoding: str) -> bytes:
    if encoding == "proto":
        return proto_spans(spans).SerializeToString()  # type: ignore[no-any-return]
    return json_spans(spans).to_json().encode()  # type: ignore[no-any-return]


ENCODINGS = pytest.mark.parametrize("encoding", ["proto", "json"])


def test_the_protobuf_runtime_is_the_c_backed_upb() -> None:
    assert api_implementation.Type() == "upb"


@ENCODINGS
def test_each_client_or_producer_span_is_a_request_and_its_outcome(encoding: str) -> None:
    c = Client()
    parent = c.span("GET /checkout", kind=SpanKind.SERVER, ms=50)
    ok = c.span("POST /pay", ms=12.5, peer__service="payments", http__request__method="POST",
                http__response__status_code=201, http__request__body__size=321,
                http__response__body__size=45)
    record = decode_otlp(encode([parent, ok], encoding))
    assert record.encoding == encoding and record.spans == 2
    assert record.skipped == Counter(server=1) and record.errors == []
    (request, response), = record.calls
    trace, span = f"{ok.context.trace_id:032x}", f"{ok.context.span_id:016x}"
    assert request.to_wire() == {
        "v": 1, "kind": "request", "event_id": f"{trace}-{span}-request",
        "correlation_id": f"{trace}-{span}", "source_service": "orders",
        "target_service": "payments", "protocol": "http", "ts": T0 / 1e9, "trace_id": trace,
        "span_id": span, "method": "POST /pay", "payload_size": 321}
    assert response.to_wire() == {
        "v": 1, "kind": "response", "event_id": f"{trace}-{span}-response",
        "correlation_id": f"{trace}-{span}", "source_service": "orders",
        "target_service": "payments", "protocol": "http", "ts": (T0 + 12_500_000) / 1e9,
        "trace_id": trace, "span_id": span, "method": "POST /pay", "latency_ms": 12.5,
        "status_code": 201, "payload_size": 45}


@ENCODINGS
def test_parent_span_ids_are_kept(encoding: str) -> None:
    c = Client()
    with c.tracer.start_as_current_span("handle", kind=SpanKind.SERVER) as server:
        c.span("SELECT", peer__service="db", db__system="postgresql")
    spans = c.exporter.get_finished_spans()
    (request, outcome), = decode_otlp(encode(list(spans), encoding)).calls
    assert request.parent_span_id == outcome.parent_span_id == \
        f"{server.get_span_context().span_id:016x}"
    assert request.protocol == "postgresql"


@pytest.mark.parametrize(("attributes", "target"), [
    ({"peer.service": "payments", "server.address": "pay.svc", "rpc.service": "p.Pay"},
     "payments"),
    ({"service.peer.name": "ledger", "peer.service": "payments"}, "ledger"),
    ({"messaging.system": "kafka", "messaging.destination.name": "orders.created",
      "server.address": "broker-1"}, "orders.created"),
    ({"messaging.system": "kafka", "messaging.destination": "old.topic"}, "old.topic"),
    ({"messaging.system": "kafka", "server.address": "broker-1"}, "broker-1"),
    ({"server.address": "pay.svc", "rpc.service": "p.Pay"}, "pay.svc"),
    ({"net.peer.name": "legacy.host", "rpc.service": "p.Pay"}, "legacy.host"),
    ({"rpc.system": "grpc", "rpc.service": "payments.v1.Pay"}, "payments.v1.Pay"),
    ({"rpc.system.name": "grpc", "rpc.method": "payments.v1.Pay/Charge"}, "payments.v1.Pay"),
    ({"http.request.method": "GET", "url.full": "https://inventory.svc:8443/items?x=1"},
     "inventory.svc"),
    ({"http.method": "GET", "http.url": "http://10.0.0.7/items"}, "10.0.0.7"),
    ({"peer.service": "", "server.address": "fallback"}, "fallback"),
])
def test_the_peer_is_the_first_attribute_of_the_documented_rule(
        attributes: dict[str, Any], target: str) -> None:
    span = Client().span("call", **{k.replace(".", "__"): v for k, v in attributes.items()})
    (request, _), = decode_otlp(encode([span], "proto")).calls
    assert request.target_service == target


@pytest.mark.parametrize(("attributes", "protocol"), [
    ({"rpc.system": "grpc", "http.request.method": "POST"}, "grpc"),
    ({"rpc.system.name": "connect_rpc"}, "connect_rpc"),
    ({"messaging.system": "rabbitmq"}, "amqp"),
    ({"messaging.system": "kafka"}, "kafka"),
    ({"messaging.system": "AWS_SQS"}, "aws_sqs"),
    ({"http.request.method": "GET"}, "http"),
    ({"http.status_code": 200}, "http"),
    ({"url.full": "https://x/"}, "http"),
    ({"db.system.name": "redis"}, "redis"),
    ({"network.protocol.name": "mqtt"}, "mqtt"),
    ({}, "unknown"),
])
def test_the_protocol_comes_from_the_attributes(attributes: dict[str, Any], protocol: str
                                                ) -> None:
    span = Client().span("call", peer__service="dep",
                         **{k.replace(".", "__"): v for k, v in attributes.items()})
    (request, outcome), = decode_otlp(encode([span], "json")).calls
    assert request.protocol == outcome.protocol == protocol


@pytest.mark.parametrize(("error", "exception", "attributes", "want"), [
    ("", None, {"http.response.status_code": 503, "error.type": "503"},
     ("error", "http_5xx", 503)),
    ("", None, {"http.status_code": 404}, ("error", "http_4xx", 404)),
    ("", None, {"rpc.grpc.status_code": 14}, ("error", "grpc_unavailable", 14)),
    ("", None, {"rpc.response.status_code": "PERMISSION_DENIED"},
     ("error", "grpc_permission_denied", 7)),
    ("", None, {"rpc.grpc.status_code": 4}, ("timeout", "timeout", 4)),
    ("", None, {"rpc.response.status_code": "DEADLINE_EXCEEDED"}, ("timeout", "timeout", 4)),
    ("", None, {"error.type": "java.net.SocketTimeoutException"}, ("timeout", "timeout", None)),
    ("", TimeoutError("slow"), {}, ("timeout", "timeout", None)),
    ("", ConnectionRefusedError("no"), {}, ("error", "ConnectionRefusedError", None)),
    ("", None, {"error.type": "*net.OpError"}, ("error", "_net.OpError", None)),
    ("", None, {}, ("error", None, None)),
])
def test_a_failed_span_is_an_error_or_a_timeout_with_its_error_type(
        error: str, exception: BaseException | None, attributes: dict[str, Any],
        want: tuple[str, str | None, int | None]) -> None:
    span = Client().span("call", peer__service="dep", error=error, exception=exception,
                         **{k.replace(".", "__"): v for k, v in attributes.items()})
    for encoding in ("proto", "json"):
        (_, outcome), = decode_otlp(encode([span], encoding)).calls
        assert (outcome.kind, outcome.error_type, outcome.status_code) == want
        assert outcome.latency_ms == 10.0
        assert outcome.event_id.endswith(f"-{want[0]}")


def test_error_messages_come_from_the_status_or_the_exception_and_are_masked() -> None:
    c = Client()
    told = c.span("a", peer__service="dep", error="db_password=hunter2 refused",
                  exception=ValueError("other"))
    raised = c.span("b", peer__service="dep", error="", exception=ValueError("x" * 3000))
    (_, first), (_, second) = decode_otlp(encode([told, raised], "proto")).calls
    assert first.error_message == "db_password=*** refused"
    assert second.error_message == "x" * 1023 + "…"
    assert first.error_type == "ValueError"


@ENCODINGS
def test_server_internal_and_consumer_spans_and_spans_without_a_peer_make_no_edge(
        encoding: str) -> None:
    c = Client()
    spans = [c.span("s", kind=SpanKind.SERVER, peer__service="x"),
             c.span("i", kind=SpanKind.INTERNAL), c.span("c", kind=SpanKind.CONSUMER,
                                                           messaging__system="kafka"),
             c.span("nobody", http__request__method="GET"),
             c.span("send", kind=SpanKind.PRODUCER, messaging__system="kafka",
                    messaging__destination__name="t")]
    record = decode_otlp(encode(spans, encoding))
    assert record.skipped == Counter(server=1, internal=1, consumer=1, no_peer=1)
    assert [(r.kind, r.target_service, r.protocol) for r, _ in record.calls] == [
        ("request", "t", "kafka")]


def _span(**fields: Any) -> PbSpan:
    base: dict[str, Any] = {"trace_id": bytes(range(1, 17)), "span_id": bytes(range(1, 9)),
                            "name": "call", "kind": PbSpan.SPAN_KIND_CLIENT,
                            "start_time_unix_nano": T0, "end_time_unix_nano": T0 + 5_000_000}
    span = PbSpan(**{**base, **{k: v for k, v in fields.items() if k != "attrs"}})
    for key, value in {"peer.service": "payments", **fields.get("attrs", {})}.items():
        kv = span.attributes.add(key=key)
        if isinstance(value, int):
            kv.value.int_value = value
        else:
            kv.value.string_value = value
    return span


def _request(spans: list[PbSpan], service: str | None = "orders") -> bytes:
    request = ExportTraceServiceRequest()
    rs = request.resource_spans.add()
    if service is not None:
        rs.resource.attributes.add(key="service.name").value.string_value = service
    rs.scope_spans.add().spans.extend(spans)
    return request.SerializeToString()  # type: ignore[no-any-return]


def test_bad_spans_are_refused_alone_with_their_reason_and_the_good_ones_count() -> None:
    day_ns = 86_400 * 1_000_000_000
    bad = [
        ("traceId", _span(trace_id=b"")),
        ("traceId", _span(trace_id=bytes(16))),
        ("spanId", _span(span_id=b"\x01\x02")),
        ("parentSpanId", _span(parent_span_id=b"\x01")),
        ("startTimeUnixNano", _span(start_time_unix_nano=0)),
        ("endTimeUnixNano", _span(end_time_unix_nano=0)),
        ("endTimeUnixNano", _span(end_time_unix_nano=T0 - 1_000_000)),
        ("ts", _span(start_time_unix_nano=1_000, end_time_unix_nano=2_000)),  # 1970
        ("latency_ms", _span(start_time_unix_nano=T0 - 2 * day_ns)),
        ("endTimeUnixNano", _span(end_time_unix_nano=T0 + 400 * 1_000_000_000)),  # future
        ("target_service", _span(attrs={"peer.service": "pay ments; DROP"})),
        ("protocol", _span(attrs={"rpc.system": "gRPC over <tls>"})),
    ]
    good = _span(span_id=b"\x09" * 8)
    spans = [good, *(s for _, s in bad), good]
    record = decode_otlp(_request(spans), not_after=T0 / 1e9 + 300)
    assert record.spans == len(spans)
    assert [(e.index, e.field) for e in record.errors] == [
        (i + 1, field) for i, (field, _) in enumerate(bad)]
    for error, (_, span) in zip(record.errors, bad, strict=True):
        assert PbSpan.FromString(error.original) == span
        assert error.reason
    assert "ends 1.000 ms before it starts" in record.errors[6].reason
    assert "'pay ments; DROP' does not match" in record.errors[10].reason
    assert len(record.calls) == 2  # the good span, twice (the records' spans are not deduped)
    no_service = decode_otlp(_request([good], service=None))
    assert [(e.field, e.reason) for e in no_service.errors] == [
        ("service.name", "the span's resource has no service.name")]


def test_bad_json_spans_are_refused_alone() -> None:
    doc = orjson.loads(encode([Client().span("call", peer__service="p")], "json"))
    spans = doc["resourceSpans"][0]["scopeSpans"][0]["spans"]
    good = spans[0]
    spans[:] = [good, {**good, "traceId": "S/ODRf+kE4Y="}, {**good, "kind": "SPAN_KIND_NONSENSE"},
                {**good, "startTimeUnixNano": "soon"}, 7, good]
    record = decode_otlp(orjson.dumps(doc))
    assert [(e.index, e.field) for e in record.errors] == [
        (1, "traceId"), (2, "kind"), (3, "startTimeUnixNano"), (4, "span")]
    assert "hex, not base64" in record.errors[0].reason
    assert orjson.loads(record.errors[0].original)["traceId"] == "S/ODRf+kE4Y="
    assert len(record.calls) == 2


def test_json_with_snake_case_keys_and_enum_names_is_read_too() -> None:
    span = Client().span("call", peer__service="p", error="")
    doc = orjson.loads(encode([span], "json"))
    s = doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    s.update(kind="SPAN_KIND_CLIENT", status={"code": "STATUS_CODE_ERROR"},
             start_time_unix_nano=int(s.pop("startTimeUnixNano")))
    snake = {"resource_spans": [{"resource": doc["resourceSpans"][0]["resource"],
                                 "scope_spans": doc["resourceSpans"][0]["scopeSpans"]}]}
    (_, outcome), = decode_otlp(orjson.dumps(snake)).calls
    assert (outcome.kind, outcome.latency_ms) == ("error", 10.0)


@pytest.mark.parametrize(("value", "reason"), [
    (None, "record has no value"),
    (b"", "record is empty"),
    (b"hello, world", "not OTLP: not an ExportTraceServiceRequest"),
    (b"{not json", "not OTLP: invalid JSON"),
    (b"{}", "not OTLP/JSON: expected an object with resourceSpans, got an object without it"),
    (b'[{"v": 1, "kind": "request"}]', "got JSON list"),
    (b'{"resourceSpans": []}', "not OTLP: no spans"),
    (b"\x0a\x00", "not OTLP: no spans"),
    (b"\x0a" * (16 * 1024 * 1024 + 1), "at most 16777216 are read"),
])
def test_a_record_that_is_not_otlp_is_refused_whole(value: bytes | None, reason: str) -> None:
    with pytest.raises(EventValidationError) as info:
        decode_otlp(value)
    assert info.value.field is None and reason in info.value.reason


def test_decoding_is_deterministic_so_replays_give_the_same_event_ids() -> None:
    c = Client()
    value = encode([c.span("a", peer__service="p"), c.span("b", peer__service="q", error="")],
                   "proto")
    first, again = decode_otlp(value), decode_otlp(value)
    assert first == again
    ids = [e.event_id for call in first.calls for e in call]
    assert len(set(ids)) == 4 and all(len(i) <= 64 for i in ids)


VALID = encode([Client().span(f"s{i}", peer__service="p", error="" if i % 2 else None,
                              start=time.time_ns()) for i in range(3)], "proto")


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.integers(0, len(VALID)).map(lambda n: VALID[:n]),
                 st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)).map(
                     lambda f: VALID[:f[0]] + bytes([f[1]]) + VALID[f[0] + 1:])))
def test_any_bytes_decode_or_raise_only_the_validation_error(value: bytes) -> None:
    """Truncated, corrupted or random records: calls, span errors or one clear reason."""
    try:
        record = decode_otlp(value)
    except EventValidationError as e:
        assert e.reason
        return
    assert len(record.calls) + len(record.errors) + sum(record.skipped.values()) == record.spans
