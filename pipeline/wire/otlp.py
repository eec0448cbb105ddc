"""OpenTelemetry spans in: the calls an OTLP trace record holds, as wire-format v1 events.

:func:`decode_otlp` reads one record as the Collector's Kafka exporter writes it: an
``ExportTraceServiceRequest`` encoded ``otlp_proto`` (protobuf, on the C-backed ``upb``
runtime the ``protobuf`` package ships) or ``otlp_json`` (OTLP/JSON: hex ids, enums as
integers, 64-bit integers as strings; snake_case keys are read too). A value that starts
with ``{`` (or ``[``) is JSON, anything else protobuf. Each span goes to
:func:`pipeline.wire.otlp_call.call_of`, whose docstring has the span → call rules; every
event that comes back passed :func:`pipeline.wire.decode.validate_event`, the one
validating decoder.

SERVER, INTERNAL, CONSUMER and unspecified spans, and spans without a known peer, make no
edge (counted). A span that cannot be a call is a :class:`SpanError` with its reason; the
other spans of the record still count. Only a record that is not OTLP at all raises
:class:`~pipeline.errors.EventValidationError`.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Final, NamedTuple

import orjson

from pipeline.errors import EventValidationError
from pipeline.wire.events import Event
from pipeline.wire.otlp_call import CALL_KINDS, KINDS, WANTED, SpanRefused, call_of

__all__ = ["MAX_OTLP_RECORD_BYTES", "OtlpRecord", "SpanError", "decode_otlp"]

MAX_OTLP_RECORD_BYTES: Final = 16 * 1024 * 1024
"""Largest OTLP record read (the Collector's default ``max_message_bytes`` is 1 MB)."""
_KIND_NAMES: Final = {f"SPAN_KIND_{v.upper()}": k for k, v in KINDS.items()}
_STATUS_NAMES: Final = {"STATUS_CODE_UNSET": 0, "STATUS_CODE_OK": 1, "STATUS_CODE_ERROR": 2}
_HEX = re.compile(r"[0-9a-f]*")


class SpanError(NamedTuple):
    """A span that is not a call the wire format can hold, and why."""

    index: int
    """The span's position in the record (its resource and scope spans in order, from 0)."""
    field: str
    reason: str
    original: bytes
    """The span alone, encoded as the record was (protobuf or JSON)."""


class OtlpRecord(NamedTuple):
    """What one OTLP record held."""

    calls: list[tuple[Event, Event]]
    """Per call, in record order: its request and its response, error or timeout."""
    errors: list[SpanError]
    skipped: Counter[str]
    """Spans that make no edge, by reason: their kind (``server``, ``internal``,
    ``consumer``, ``unspecified``), or ``no_peer``."""
    spans: int
    encoding: str
    """``proto`` or ``json``."""


def decode_otlp(value: bytes | bytearray | memoryview | None, *,
                not_after: float | None = None) -> OtlpRecord:
    """The calls of one OTLP trace record. ``not_after`` (epoch seconds): a span ending
    later than that is refused (the record's timestamp plus the worker's future horizon).

    Raises :class:`EventValidationError` only when the record is not OTLP at all (no value,
    too large, neither OTLP/JSON nor an ``ExportTraceServiceRequest``, or no spans)."""
    if value is None:
        raise EventValidationError(None, "record has no value")
    value = bytes(value)
    if len(value) > MAX_OTLP_RECORD_BYTES:
        raise EventValidationError(None, f"record is {len(value)} bytes; at most "
                                         f"{MAX_OTLP_RECORD_BYTES} are read")
    if not value:
        raise EventValidationError(None, "record is empty")
    head = value[:1]
    if head in b"{[" or (head.isspace() and value.lstrip()[:1] in (b"{", b"[")):
        try:
            return _from_json(orjson.loads(value), not_after)
        except orjson.JSONDecodeError as e:
            if head in b"{[":  # a protobuf request never starts so (field 15, or 11)
                raise EventValidationError(None, f"not OTLP: invalid JSON ({e})"[:300]) from None
    return _from_proto(value, not_after)


# ---- protobuf --------------------------------------------------------------------------

def _from_proto(value: bytes, not_after: float | None) -> OtlpRecord:
    from google.protobuf.message import DecodeError
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    request = ExportTraceServiceRequest()
    try:
        request.ParseFromString(value)
    except DecodeError as e:
        raise EventValidationError(
            None, f"not OTLP: not an ExportTraceServiceRequest (protobuf: {e})"[:300]) from None
    out = OtlpRecord([], [], Counter(), 0, "proto")
    index = 0
    for resource_spans in request.resource_spans:
        service = _proto_attrs(resource_spans.resource.attributes, ("service.name",))
        service_name = service.get("service.name")
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                kind = span.kind
                if kind not in CALL_KINDS:
                    out.skipped[KINDS.get(kind, "unspecified")] += 1
                else:
                    try:
                        call = call_of(service_name, kind, span.name, span.trace_id.hex(),
                                     span.span_id.hex(), span.parent_span_id.hex(),
                                     span.start_time_unix_nano, span.end_time_unix_nano,
                                     span.status.code, span.status.message,
                                     _proto_attrs(span.attributes, WANTED),
                                     lambda span=span: _proto_exception(span), not_after)
                    except SpanRefused as bad:
                        out.errors.append(SpanError(index, bad.field, bad.reason,
                                                    span.SerializeToString()))
                    else:
                        _keep(out, call)
                index += 1
    return _counted(out, index)


def _proto_attrs(attributes: Any, wanted: Any) -> dict[str, Any]:
    found = {}
    for kv in attributes:
        key = kv.key
        if key in wanted:
            v = kv.value
            which = v.WhichOneof("value")
            if which in ("string_value", "int_value", "double_value", "bool_value"):
                found[key] = getattr(v, which)
    return found


def _proto_exception(span: Any) -> tuple[Any, Any]:
    last: tuple[Any, Any] = (None, None)
    for event in span.events:
        if event.name == "exception":
            a = _proto_attrs(event.attributes, ("exception.type", "exception.message"))
            last = (a.get("exception.type"), a.get("exception.message"))
    return last


# ---- OTLP/JSON -------------------------------------------------------------------------

def _get(obj: Any, camel: str, snake: str) -> Any:
    if type(obj) is not dict:
        return None
    found = obj.get(camel)
    return obj.get(snake) if found is None else found


def _from_json(doc: Any, not_after: float | None) -> OtlpRecord:
    resource_spans = _get(doc, "resourceSpans", "resource_spans")
    if type(resource_spans) is not list:
        shown = "an object without it" if type(doc) is dict else f"JSON {type(doc).__name__}"
        raise EventValidationError(None, "not OTLP/JSON: expected an object with "
                                         f"resourceSpans, got {shown}")
    out = OtlpRecord([], [], Counter(), 0, "json")
    index = 0
    for rs in resource_spans:
        service_name = _json_attrs(_get(_get(rs, "resource", "resource"), "attributes",
                                        "attributes"), ("service.name",)).get("service.name")
        for ss in _get(rs, "scopeSpans", "scope_spans") or ():
            for span in _get(ss, "spans", "spans") or ():
                try:
                    if type(span) is not dict:
                        raise SpanRefused("span", f"expected an object, got {type(span).__name__}")
                    kind = _enum(span.get("kind", 0), _KIND_NAMES, "kind")
                    if kind not in CALL_KINDS:
                        out.skipped[KINDS.get(kind, "unspecified")] += 1
                        index += 1
                        continue
                    status = span.get("status") or {}
                    call = call_of(service_name, kind, span.get("name"),
                                 _json_id(span, "traceId", "trace_id", 32),
                                 _json_id(span, "spanId", "span_id", 16),
                                 _json_id(span, "parentSpanId", "parent_span_id", 16),
                                 _json_int(span, "startTimeUnixNano", "start_time_unix_nano"),
                                 _json_int(span, "endTimeUnixNano", "end_time_unix_nano"),
                                 _enum(_get(status, "code", "code") or 0, _STATUS_NAMES,
                                       "status.code"), _get(status, "message", "message"),
                                 _json_attrs(span.get("attributes"), WANTED),
                                 lambda span=span: _json_exception(span), not_after)
                except SpanRefused as bad:
                    out.errors.append(SpanError(index, bad.field, bad.reason,
                                                orjson.dumps(span)))
                else:
                    _keep(out, call)
                index += 1
    return _counted(out, index)


def _json_attrs(attributes: Any, wanted: Any) -> dict[str, Any]:
    found: dict[str, Any] = {}
    if type(attributes) is not list:
        return found
    for kv in attributes:
        key = kv.get("key") if type(kv) is dict else None
        if key in wanted:
            v = kv.get("value")
            if type(v) is not dict:
                continue
            if "stringValue" in v or "string_value" in v:
                found[key] = _get(v, "stringValue", "string_value")
            elif "intValue" in v or "int_value" in v:
                raw = _get(v, "intValue", "int_value")
                try:
                    found[key] = int(raw) if type(raw) in (int, str) else None
                except ValueError:
                    continue
            elif "doubleValue" in v or "double_value" in v:
                found[key] = _get(v, "doubleValue", "double_value")
            elif "boolValue" in v or "bool_value" in v:
                found[key] = _get(v, "boolValue", "bool_value")
    return found


def _json_exception(span: dict[str, Any]) -> tuple[Any, Any]:
    last: tuple[Any, Any] = (None, None)
    for event in span.get("events") or ():
        if type(event) is dict and event.get("name") == "exception":
            a = _json_attrs(event.get("attributes"), ("exception.type", "exception.message"))
            last = (a.get("exception.type"), a.get("exception.message"))
    return last


def _json_id(span: dict[str, Any], camel: str, snake: str, digits: int) -> str:
    raw = _get(span, camel, snake)
    if raw is None or raw == "":
        return ""
    if type(raw) is not str or len(raw) != digits or _HEX.fullmatch(raw.lower()) is None:
        raise SpanRefused(camel, f"expected {digits} hex digits (OTLP/JSON ids are hex, "
                                 "not base64)")
    return raw.lower()


def _json_int(span: dict[str, Any], camel: str, snake: str) -> int:
    raw = _get(span, camel, snake)
    if raw is None:
        return 0
    try:
        if type(raw) is int or (type(raw) is str and raw.isdigit()):
            return int(raw)
    except ValueError:
        pass
    raise SpanRefused(camel, "expected an unsigned integer (nanoseconds since the epoch)")


def _enum(raw: Any, names: dict[str, int], field: str) -> int:
    if type(raw) is int:
        return raw
    if type(raw) is str and raw in names:
        return names[raw]
    raise SpanRefused(field, f"unknown value {str(raw)[:40]!r}")


# ---- what the spans gave -----------------------------------------------------------------

def _keep(out: OtlpRecord, call: tuple[Event, Event] | str) -> None:
    if isinstance(call, str):
        out.skipped[call] += 1
    else:
        out.calls.append(call)


def _counted(out: OtlpRecord, spans: int) -> OtlpRecord:
    if spans == 0:
        raise EventValidationError(None, "not OTLP: no spans (an ExportTraceServiceRequest "
                                         "with resource spans was expected)")
    return out._replace(spans=spans)

