"""The call timer: ``with emitter.call("orders", "payments") as call: ...``.

One :class:`Call` emits ``request`` on entry and, on exit, ``response`` with the
measured latency, ``timeout`` when a ``TimeoutError`` escaped, or ``error`` with
:func:`error_type_of` and ``str(exc)`` as ``error_message`` (the shim's sender
masks credentials in it and bounds it, :mod:`pipeline.wire.redact`), all with one
correlation id and, for one try of a retried call, its ``attempt`` number.

Each call is a span of its own (:mod:`pipeline.shim.context`): a fresh ``span_id``, the
trace and ``parent_span_id`` of the ``traceparent`` it was given, of the enclosing call or
of the current OpenTelemetry span, or a new trace. Calls made inside ``with
emitter.call(...)`` therefore chain; pass :attr:`Call.traceparent` to the service you call
so that its calls chain under this one.
"""

from __future__ import annotations

import re
import time
from typing import Any, Protocol

from pipeline.shim.context import (
    Parent,
    current_call,
    explicit_parent,
    new_span_id,
    new_trace_id,
    otel_parent,
    traceparent_of,
)
from pipeline.wire.redact import text_of

__all__ = ["Call", "Reports", "error_type_of"]


class Reports(Protocol):
    """What a call reports to: an emitter's per-kind helpers (keyword arguments as theirs)."""

    def request(self, **fields: Any) -> bool: ...

    def response(self, **fields: Any) -> bool: ...

    def error(self, **fields: Any) -> bool: ...

    def timeout(self, **fields: Any) -> bool: ...

_NOT_NAME = re.compile(r"[^A-Za-z0-9._:-]")


def error_type_of(exc: BaseException) -> str:
    """The ``error_type`` reported for an exception: ``timeout``, ``connection``,
    ``cancelled``, or the exception's class name (made label-safe)."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionError):
        return "connection"
    if not isinstance(exc, Exception):  # CancelledError, KeyboardInterrupt, SystemExit
        return "cancelled"
    return _NOT_NAME.sub("_", type(exc).__name__)[:100] or "error"


class Call:
    """The context manager returned by ``emitter.call(...)``; usable with ``with`` and
    ``async with``. Set ``status_code``/``payload_size`` on it, or call :meth:`fail`."""

    __slots__ = ("_emitter", "_otel_seen", "_started", "_token", "_traceparent", "attempt",
                 "correlation_id", "error_message", "error_type", "method", "parent_span_id",
                 "payload_size", "protocol", "source_service", "span_id", "status_code",
                 "target_service", "trace_id")

    def __init__(self, emitter: Reports, source_service: str, target_service: str, *,
                 protocol: str, method: str | None, correlation_id: str,
                 trace_id: str | None, span_id: str | None, attempt: int | None = None,
                 parent_span_id: str | None = None, traceparent: str | None = None) -> None:
        self._emitter = emitter
        self.source_service = source_service
        self.target_service = target_service
        self.protocol = protocol
        self.method = method
        self.correlation_id = correlation_id
        self.trace_id = trace_id
        """The call's W3C trace id: given, inherited (see :meth:`__enter__`) or new."""
        self.span_id = span_id
        """This call's own span id (16 hex): given, or new on entry."""
        self.parent_span_id = parent_span_id
        """The span this call was made within; None for the first call of a trace."""
        self._traceparent = traceparent
        self._otel_seen: Parent | None = None
        self._token: Any = None
        self.status_code: int | None = None
        self.payload_size: int | None = None
        self.error_type: str | None = None
        self.error_message: str | None = None
        self.attempt = attempt
        self._started = 0.0

    def fail(self, error_type: str, *, status_code: int | None = None,
             message: str | None = None) -> None:
        """Report this call as failed without raising (e.g. an HTTP 503 answer), with an
        optional ``message`` (masked and bounded like any ``error_message``)."""
        self.error_type = error_type
        if status_code is not None:
            self.status_code = status_code
        if message is not None:
            self.error_message = message

    @property
    def traceparent(self) -> str | None:
        """The W3C ``traceparent`` to send to the callee (as the ``traceparent`` header, or
        to its ``emitter.call(..., traceparent=...)``) so its calls chain under this one;
        known once the call has started."""
        if self.trace_id is None or self.span_id is None:
            return None
        return traceparent_of(self.trace_id, self.span_id)

    def _resolve(self) -> None:
        """Fill in the trace context (see :mod:`pipeline.shim.context` for the order)."""
        otel = otel_parent()
        self._otel_seen = otel
        if self.trace_id is None:
            parent = explicit_parent(self._traceparent)
            if parent is None:
                enclosing = current_call.get()
                if enclosing is not None and enclosing.trace_id is not None \
                        and enclosing.span_id is not None and otel == enclosing._otel_seen:
                    parent = Parent(enclosing.trace_id, enclosing.span_id)
                else:  # no enclosing call, or a span was made current inside it
                    parent = otel
            if parent is None:
                self.trace_id = new_trace_id()
            else:
                self.trace_id, self.parent_span_id = parent
        if self.span_id is None:
            self.span_id = new_span_id()

    def __enter__(self) -> Call:
        self._resolve()
        self._token = current_call.set(self)
        self._emitter.request(
            source_service=self.source_service, target_service=self.target_service,
            protocol=self.protocol, method=self.method, correlation_id=self.correlation_id,
            trace_id=self.trace_id, span_id=self.span_id, parent_span_id=self.parent_span_id,
            attempt=self.attempt)
        self._started = time.perf_counter()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        latency_ms = (time.perf_counter() - self._started) * 1000.0
        if self._token is not None:
            try:
                current_call.reset(self._token)
            except ValueError:  # exited in another context than it entered (rare)
                current_call.set(None)
            self._token = None
        common = dict(source_service=self.source_service, target_service=self.target_service,
                      protocol=self.protocol, method=self.method,
                      correlation_id=self.correlation_id, trace_id=self.trace_id,
                      span_id=self.span_id, parent_span_id=self.parent_span_id,
                      latency_ms=latency_ms, attempt=self.attempt)
        if exc is None and self.error_type is None:
            self._emitter.response(status_code=self.status_code,
                                   payload_size=self.payload_size, **common)
            return
        message = self.error_message or text_of(exc)
        if isinstance(exc, TimeoutError):
            self._emitter.timeout(error_message=message, **common)
        else:
            error_type = self.error_type or error_type_of(exc)  # type: ignore[arg-type]
            self._emitter.error(error_type=error_type, status_code=self.status_code,
                                error_message=message, **common)

    async def __aenter__(self) -> Call:
        return self.__enter__()

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: object) -> None:
        self.__exit__(exc_type, exc, tb)
