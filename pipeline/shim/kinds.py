"""The per-kind helpers both emitters share: ``request``, ``response``, ``error``, ...

:class:`EventKinds` builds one wire dict per call (``v``, ``kind``, the edge and
``ts`` filled in) and hands it to the subclass's ``_put``; ``call()`` returns the
call timer (:class:`~pipeline.shim.call.Call`).

Trace context: the call helpers (``request``, ``response``, ``error``, ``timeout``,
``retry``) take ``trace_id``, ``span_id`` and ``parent_span_id``, or a W3C
``traceparent`` string, which gives the trace id and the parent span (explicit
``trace_id``/``parent_span_id`` win; a value that is not W3C trace context is ignored and
logged once). Only ``call()`` makes span ids and follows the enclosing call or the
OpenTelemetry span (:mod:`pipeline.shim.context`); a helper sends what it is given.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any

from pipeline.shim.call import Call
from pipeline.shim.context import explicit_parent
from pipeline.wire.events import SCHEMA_VERSION, CircuitState, Event, HealthStatus

__all__ = ["EventKinds"]


class EventKinds:
    """One method per event kind, building wire dicts; subclasses provide ``emit``."""

    def emit(self, event: Mapping[str, Any] | Event) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def _event(self, kind: str, source_service: str, target_service: str, protocol: str,
               fields: dict[str, Any]) -> bool:
        traceparent = fields.pop("traceparent", None)
        if traceparent is not None:
            parent = explicit_parent(traceparent)
            if parent is not None:
                if fields.get("trace_id") is None:
                    fields["trace_id"] = parent.trace_id
                if fields.get("parent_span_id") is None:
                    fields["parent_span_id"] = parent.span_id
        event = {k: v for k, v in fields.items() if v is not None}
        event["v"] = SCHEMA_VERSION
        event["kind"] = kind
        event["source_service"] = source_service
        event["target_service"] = target_service
        event["protocol"] = protocol
        if "ts" not in event:
            event["ts"] = time.time()
        return self._put(event)

    def _put(self, event: dict[str, Any]) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def request(self, *, source_service: str, target_service: str, protocol: str = "http",
                method: str | None = None, correlation_id: str | None = None,
                payload_size: int | None = None, trace_id: str | None = None,
                span_id: str | None = None, attempt: int | None = None,
                ts: float | None = None, parent_span_id: str | None = None,
                traceparent: str | None = None) -> bool:
        """A call was sent from ``source_service`` to ``target_service`` (``attempt`` n of a
        retried call)."""
        return self._event("request", source_service, target_service, protocol, dict(
            method=method, correlation_id=correlation_id, payload_size=payload_size,
            trace_id=trace_id, span_id=span_id, attempt=attempt, ts=ts,
            parent_span_id=parent_span_id, traceparent=traceparent))

    def response(self, *, source_service: str, target_service: str, latency_ms: float,
                 protocol: str = "http", status_code: int | None = None,
                 method: str | None = None, correlation_id: str | None = None,
                 payload_size: int | None = None, trace_id: str | None = None,
                 span_id: str | None = None, attempt: int | None = None,
                 ts: float | None = None, parent_span_id: str | None = None,
                 traceparent: str | None = None) -> bool:
        """A call succeeded after ``latency_ms`` (at ``attempt`` n of a retried call: the
        worker keeps such responses, n > 1, for ``commpipe trace``)."""
        return self._event("response", source_service, target_service, protocol, dict(
            latency_ms=latency_ms, status_code=status_code, method=method,
            correlation_id=correlation_id, payload_size=payload_size, trace_id=trace_id,
            span_id=span_id, attempt=attempt, ts=ts, parent_span_id=parent_span_id,
            traceparent=traceparent))

    def error(self, *, source_service: str, target_service: str, error_type: str,
              protocol: str = "http", latency_ms: float | None = None,
              status_code: int | None = None, method: str | None = None,
              correlation_id: str | None = None, trace_id: str | None = None,
              span_id: str | None = None, error_message: str | None = None,
              attempt: int | None = None, ts: float | None = None,
              parent_span_id: str | None = None, traceparent: str | None = None) -> bool:
        """A call failed with ``error_type`` (e.g. ``connection``, ``http_5xx``, ``rejected``);
        ``error_message`` (e.g. ``str(exc)``) is sent with credentials masked, at most 1,024
        characters."""
        return self._event("error", source_service, target_service, protocol, dict(
            error_type=error_type, latency_ms=latency_ms, status_code=status_code,
            method=method, correlation_id=correlation_id, trace_id=trace_id, span_id=span_id,
            error_message=error_message, attempt=attempt, ts=ts,
            parent_span_id=parent_span_id, traceparent=traceparent))

    def timeout(self, *, source_service: str, target_service: str, latency_ms: float,
                protocol: str = "http", method: str | None = None,
                correlation_id: str | None = None, trace_id: str | None = None,
                span_id: str | None = None, error_message: str | None = None,
                attempt: int | None = None, ts: float | None = None,
                parent_span_id: str | None = None, traceparent: str | None = None) -> bool:
        """A call gave up after ``latency_ms`` without an answer."""
        return self._event("timeout", source_service, target_service, protocol, dict(
            latency_ms=latency_ms, error_type="timeout", method=method,
            correlation_id=correlation_id, trace_id=trace_id, span_id=span_id,
            error_message=error_message, attempt=attempt, ts=ts,
            parent_span_id=parent_span_id, traceparent=traceparent))

    def retry(self, *, source_service: str, target_service: str, attempt: int,
              protocol: str = "http", backoff_ms: float | None = None,
              error_type: str | None = None, method: str | None = None,
              correlation_id: str | None = None, trace_id: str | None = None,
              span_id: str | None = None, error_message: str | None = None,
              ts: float | None = None, parent_span_id: str | None = None,
              traceparent: str | None = None) -> bool:
        """Attempt ``attempt`` (1-based) failed; the caller waits ``backoff_ms`` and tries again."""
        return self._event("retry", source_service, target_service, protocol, dict(
            attempt=attempt, backoff_ms=backoff_ms, error_type=error_type, method=method,
            correlation_id=correlation_id, trace_id=trace_id, span_id=span_id,
            error_message=error_message, ts=ts, parent_span_id=parent_span_id,
            traceparent=traceparent))

    def circuit(self, *, source_service: str, target_service: str,
                circuit_state: CircuitState, protocol: str = "http",
                correlation_id: str | None = None, ts: float | None = None) -> bool:
        """The caller's circuit breaker for this edge entered ``circuit_state``."""
        return self._event("circuit", source_service, target_service, protocol, dict(
            circuit_state=circuit_state, correlation_id=correlation_id, ts=ts))

    def health(self, *, source_service: str, target_service: str,
               health_status: HealthStatus, protocol: str = "http",
               check_type: str | None = None, latency_ms: float | None = None,
               correlation_id: str | None = None, ts: float | None = None) -> bool:
        """A health check from ``source_service`` found ``target_service`` ``health_status``."""
        return self._event("health", source_service, target_service, protocol, dict(
            health_status=health_status, check_type=check_type, latency_ms=latency_ms,
            correlation_id=correlation_id, ts=ts))

    def call(self, source_service: str, target_service: str, *, protocol: str = "http",
             method: str | None = None, correlation_id: str | None = None,
             trace_id: str | None = None, span_id: str | None = None,
             attempt: int | None = None, parent_span_id: str | None = None,
             traceparent: str | None = None) -> Call:
        """Time one call: ``with emitter.call("orders", "payments") as call: ...``.

        Emits ``request`` on entry; on exit ``response`` with the measured latency,
        ``timeout`` if a ``TimeoutError`` escaped, or ``error`` with the exception's
        :func:`error_type_of` and ``str(exc)`` as ``error_message`` otherwise (or what
        :meth:`Call.fail` set). All share one correlation id and ``attempt`` (the attempt
        number when this call is one try of a retried call). The exception itself is
        never swallowed.

        The call is a span of its own: a new ``span_id`` (unless given), under the
        ``traceparent`` given (e.g. the incoming request's header), else under the
        enclosing ``emitter.call`` or the current OpenTelemetry span, else in a new
        trace (``trace_id`` with ``parent_span_id`` set the parent by hand).
        ``call.traceparent`` is what to send on to the callee.
        """
        return Call(self, source_service, target_service, protocol=protocol, method=method,
                    correlation_id=correlation_id or uuid.uuid4().hex, trace_id=trace_id,
                    span_id=span_id, attempt=attempt, parent_span_id=parent_span_id,
                    traceparent=traceparent)
