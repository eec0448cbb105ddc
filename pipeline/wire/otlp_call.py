"""One span, one call: the rules that turn an OTLP CLIENT or PRODUCER span into the events
of one call (wire format v1), whatever encoding the span came in (:mod:`pipeline.wire.otlp`
reads protobuf and JSON and hands each span here as plain values).

Each CLIENT or PRODUCER span with a known peer is one call: a ``request`` at its start and,
at its end, a ``response``, ``error`` or ``timeout`` carrying its latency, on the edge
``service.name`` (of its resource) → peer, over a protocol from its attributes:

=================  ==========================================================
target (peer)      the first of ``service.peer.name`` / ``peer.service``; for a
                   messaging span (``messaging.system`` set) ``messaging.destination.name``
                   (``messaging.destination``); ``server.address`` (``net.peer.name``);
                   ``rpc.service``, or the service part of a ``Service/Method``
                   ``rpc.method``; the host of ``url.full`` (``http.url``).
                   None of them: no edge (counted ``no_peer``)
protocol           ``rpc.system.name`` / ``rpc.system`` (``grpc`` ...); else
                   ``messaging.system`` (``rabbitmq`` → ``amqp``, others as named:
                   ``kafka`` ...); else ``http`` when an ``http.*`` or ``url.full``
                   attribute is set; else ``db.system.name`` / ``db.system``; else
                   ``network.protocol.name``; else ``unknown``. Lower-cased
outcome            status ERROR: ``timeout`` when ``rpc.grpc.status_code`` is 4 (or
                   ``rpc.response.status_code`` ``DEADLINE_EXCEEDED``) or the error type
                   names a timeout, else ``error``; otherwise ``response``
error_type         ``http_5xx`` / ``http_4xx`` from ``http.response.status_code``
                   (``http.status_code``); ``grpc_<code name>`` from a non-zero gRPC status;
                   ``error.type``; the last ``exception`` event's ``exception.type``;
                   ``timeout`` for timeouts (as the shim). Made label-safe like the shim's
status_code        the HTTP status, else the numeric gRPC status
error_message      the status message, else the exception's message (masked, cut)
latency_ms         (end - start) / 1e6; ``ts``: start (request) and end (outcome)
ids                ``trace_id``, ``span_id``, ``parent_span_id`` kept; ``correlation_id``
                   = ``<trace id>-<span id>``; ``event_id`` = ``<trace id>-<span id>-<kind>``
                   (the same on every replay, so the sink's ``ON CONFLICT`` holds)
method             the span's name; ``payload_size``: request body size on the request
                   (``http.request.body.size``, ``messaging.message.body.size``), response
                   body size on the response
=================  ==========================================================

SERVER, INTERNAL, CONSUMER and unspecified spans make no edge (counted by kind). A span
that cannot be a call (ids missing, times absent or reversed, a value the wire format
refuses, an end further than ``not_after``) raises :class:`SpanRefused`; the decoder reports
it as that span's error, and the other spans of the record still count.
"""

from __future__ import annotations

import re
from typing import Any, Final
from urllib.parse import urlsplit

from pipeline.errors import EventValidationError
from pipeline.wire.decode import validate_event
from pipeline.wire.events import Event
from pipeline.wire.redact import safe_message

__all__ = ["CALL_KINDS", "KINDS", "WANTED", "SpanRefused", "call_of"]

KINDS: Final = {0: "unspecified", 1: "internal", 2: "server", 3: "client", 4: "producer",
                5: "consumer"}
"""OTLP's span kinds by number; only CLIENT (3) and PRODUCER (4) spans are calls."""
CALL_KINDS: Final = frozenset((3, 4))
_ERROR: Final = 2
_GRPC_CODES: Final = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
                      "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
                      "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED",
                      "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED")
_DEADLINE_EXCEEDED: Final = 4
_MESSAGING_PROTOCOLS: Final = {"rabbitmq": "amqp"}
_PEER: Final = ("service.peer.name", "peer.service")
_DESTINATION: Final = ("messaging.destination.name", "messaging.destination")
_ADDRESS: Final = ("server.address", "net.peer.name")
_URL: Final = ("url.full", "http.url")
_HTTP_STATUS: Final = ("http.response.status_code", "http.status_code")
_REQUEST_SIZE: Final = ("http.request.body.size", "messaging.message.body.size",
                        "http.request_content_length", "messaging.message_payload_size_bytes")
_RESPONSE_SIZE: Final = ("http.response.body.size", "http.response_content_length")
WANTED: Final = frozenset((
    *_PEER, *_DESTINATION, *_ADDRESS, *_URL, *_HTTP_STATUS, *_REQUEST_SIZE, *_RESPONSE_SIZE,
    "rpc.system.name", "rpc.system", "rpc.service", "rpc.method", "rpc.grpc.status_code",
    "rpc.response.status_code", "messaging.system", "db.system.name", "db.system",
    "network.protocol.name", "error.type", "http.request.method", "http.method"))
_NOT_LABEL = re.compile(r"[^A-Za-z0-9._:-]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class SpanRefused(Exception):
    """A span that cannot be a call: ``field`` (OTLP's name, or the event field the wire
    format refused) and ``reason``."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(reason)
        self.field = field
        self.reason = reason


def _label(value: Any) -> str | None:
    """A value as an error type: label-safe as the shim's (``[A-Za-z0-9._:-]``, 100)."""
    if value is None or value == "":
        return None
    return _NOT_LABEL.sub("_", str(value))[:100] or None


def _text(value: Any) -> str | None:
    return value if type(value) is str and value else None


def _target(a: dict[str, Any]) -> str | None:
    for key in _PEER:
        if _text(a.get(key)):
            return a[key]  # type: ignore[no-any-return]
    if a.get("messaging.system") is not None:
        for key in _DESTINATION:
            if _text(a.get(key)):
                return a[key]  # type: ignore[no-any-return]
    for key in _ADDRESS:
        if _text(a.get(key)):
            return a[key]  # type: ignore[no-any-return]
    if _text(a.get("rpc.service")):
        return a["rpc.service"]  # type: ignore[no-any-return]
    method = _text(a.get("rpc.method"))
    if method and "/" in method.strip("/"):
        return method.strip("/").rsplit("/", 1)[0]
    for key in _URL:
        url = _text(a.get(key))
        if url:
            try:
                host = urlsplit(url).hostname
            except ValueError:
                host = None
            if host:
                return host
    return None


def _protocol(a: dict[str, Any]) -> str:
    rpc = _text(a.get("rpc.system.name")) or _text(a.get("rpc.system"))
    if rpc:
        return rpc.lower()
    messaging = _text(a.get("messaging.system"))
    if messaging:
        return _MESSAGING_PROTOCOLS.get(messaging.lower(), messaging.lower())
    if any(a.get(k) is not None for k in (*_HTTP_STATUS, *_URL, "http.request.method",
                                          "http.method")):
        return "http"
    other = _text(a.get("db.system.name")) or _text(a.get("db.system")) or _text(
        a.get("network.protocol.name"))
    return other.lower() if other else "unknown"


def _int(value: Any) -> int | None:
    if type(value) is int:
        return value
    if type(value) is str and value.isdigit():
        return int(value)
    return None


def _grpc_code(a: dict[str, Any]) -> int | None:
    code = _int(a.get("rpc.grpc.status_code"))
    if code is not None:
        return code
    raw = a.get("rpc.response.status_code")
    if type(raw) is str and raw in _GRPC_CODES:
        return _GRPC_CODES.index(raw)
    return _int(raw)


def call_of(service: Any, kind: int, name: Any, trace_id: str, span_id: str, parent: str,
          start_ns: int, end_ns: int, status: int, status_message: Any, a: dict[str, Any],
          exception: Any, not_after: float | None) -> tuple[Event, Event] | str:
    """The two events of one CLIENT or PRODUCER span, or why it makes no edge (``str``);
    raises :class:`SpanRefused` when it cannot be a call."""
    target = _target(a)
    if target is None:
        return "no_peer"
    if not _text(service):
        raise SpanRefused("service.name", "the span's resource has no service.name")
    if len(trace_id) != 32 or trace_id.count("0") == 32:
        raise SpanRefused("traceId", "missing or all zero (16 bytes are required)")
    if len(span_id) != 16 or span_id.count("0") == 16:
        raise SpanRefused("spanId", "missing or all zero (8 bytes are required)")
    if parent and (len(parent) != 16 or parent.count("0") == 16):
        raise SpanRefused("parentSpanId", "neither empty nor 8 bytes, not all zero")
    if not start_ns or not end_ns:
        raise SpanRefused("startTimeUnixNano" if not start_ns else "endTimeUnixNano",
                   "missing (a call needs both its start and end time)")
    if end_ns < start_ns:
        raise SpanRefused("endTimeUnixNano", f"the span ends {(start_ns - end_ns) / 1e6:.3f} ms "
                                      "before it starts")
    end = end_ns / 1e9
    if not_after is not None and end > not_after:
        raise SpanRefused("endTimeUnixNano", f"ends {end - not_after:.0f} s later than its "
                                             "record's timestamp allows (the worker's future "
                                             "horizon)")
    base: dict[str, Any] = {
        "v": 1, "source_service": service, "target_service": target, "protocol": _protocol(a),
        "correlation_id": f"{trace_id}-{span_id}", "trace_id": trace_id, "span_id": span_id}
    if parent:
        base["parent_span_id"] = parent
    if _text(name):
        base["method"] = _CONTROL.sub(" ", name)[:200]
    request = {**base, "kind": "request", "event_id": f"{trace_id}-{span_id}-request",
               "ts": start_ns / 1e9}
    size = next((_int(a[k]) for k in _REQUEST_SIZE if _int(a.get(k)) is not None), None)
    if size is not None:
        request["payload_size"] = size
    outcome = {**base, "ts": end, "latency_ms": (end_ns - start_ns) / 1e6}
    http = next((_int(a[k]) for k in _HTTP_STATUS if _int(a.get(k)) is not None), None)
    grpc = _grpc_code(a)
    status_code = http if http is not None else grpc
    if status_code is not None and 0 <= status_code <= 999:
        outcome["status_code"] = status_code
    if status != _ERROR:
        outcome["kind"] = "response"
        size = next((_int(a[k]) for k in _RESPONSE_SIZE if _int(a.get(k)) is not None), None)
        if size is not None:
            outcome["payload_size"] = size
    else:
        exc_type, exc_message = exception()
        named = _label(a.get("error.type")) or _label(exc_type)
        timeout = grpc == _DEADLINE_EXCEEDED or (
            named is not None and "timeout" in named.rsplit(".", 1)[-1].lower())
        if timeout:
            outcome["kind"], outcome["error_type"] = "timeout", "timeout"
        else:
            outcome["kind"] = "error"
            if http is not None and http >= 400:
                outcome["error_type"] = "http_5xx" if http >= 500 else "http_4xx"
            elif grpc:
                outcome["error_type"] = "grpc_" + (_GRPC_CODES[grpc].lower()
                                                   if grpc < len(_GRPC_CODES) else str(grpc))
            elif named is not None:
                outcome["error_type"] = named
        message = safe_message(_text(status_message) or _text(exc_message))
        if message:
            outcome["error_message"] = message
    outcome["event_id"] = f"{trace_id}-{span_id}-{outcome['kind']}"
    try:
        return validate_event(request), validate_event(outcome)
    except EventValidationError as e:
        raise SpanRefused(e.field or "span", e.reason) from None
