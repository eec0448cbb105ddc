"""Trace context for the call timer: W3C ``traceparent`` strings, the enclosing call, and
the active OpenTelemetry span when the service uses OpenTelemetry.

Each call gets its own span id; its parent is, in this order:

1. what the caller passed: ``traceparent="00-<trace id>-<parent id>-<flags>"`` (e.g. the
   incoming request's header), or ``trace_id=`` with ``parent_span_id=``;
2. the innermost enclosing context: the commpipe call whose ``with`` block this call runs
   in, or an OpenTelemetry span made current inside that block (or, outside any commpipe
   call, the current OpenTelemetry span);
3. nothing: the call starts a new trace (a fresh random trace id).

commpipe never imports OpenTelemetry: :func:`otel_parent` reads the current span only
when the service has imported ``opentelemetry.trace`` itself (the ``otel`` extra installs
``opentelemetry-api``), so a service without it pays nothing.
"""

from __future__ import annotations

import logging
import re
import sys
import uuid
from contextvars import ContextVar
from typing import Any, Final, NamedTuple

__all__ = ["Parent", "current_call", "explicit_parent", "new_span_id", "new_trace_id",
           "otel_parent", "parse_traceparent", "traceparent_of"]

log = logging.getLogger("commpipe.shim")

_TRACEPARENT: Final = re.compile(
    r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[ -~]*)?")
_ZERO_TRACE: Final = "0" * 32
_ZERO_SPAN: Final = "0" * 16

current_call: ContextVar[Any] = ContextVar("commpipe_current_call", default=None)
"""The :class:`~pipeline.shim.call.Call` whose ``with`` block is running (None outside)."""


class Parent(NamedTuple):
    """A trace id and the span id of the parent a new call hangs under."""

    trace_id: str
    span_id: str


def new_trace_id() -> str:
    """A random W3C trace id (32 lower-case hex; a uuid4's, so never all zero)."""
    return uuid.uuid4().hex


def new_span_id() -> str:
    """A random W3C span id (16 lower-case hex; never all zero: it holds uuid4's version
    digit)."""
    return uuid.uuid4().hex[:16]


def parse_traceparent(value: Any) -> Parent | None:
    """The trace id and parent id of a W3C ``traceparent`` value, or None when it is not
    one (the W3C rule: an invalid header starts a new trace). Version ``00`` has exactly
    four fields; later versions may add more; version ``ff`` and all-zero ids are invalid."""
    if not isinstance(value, str):
        return None
    m = _TRACEPARENT.fullmatch(value.strip())
    if m is None:
        return None
    version, trace_id, span_id, _flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest) or trace_id == _ZERO_TRACE \
            or span_id == _ZERO_SPAN:
        return None
    return Parent(trace_id, span_id)


def traceparent_of(trace_id: str, span_id: str) -> str:
    """The W3C ``traceparent`` that makes a callee's calls children of this span
    (version 00, sampled)."""
    return f"00-{trace_id}-{span_id}-01"


_otel_failed = False


def otel_parent() -> Parent | None:
    """The current OpenTelemetry span's ids, if the service has imported
    ``opentelemetry.trace`` and a valid span is current; otherwise None."""
    global _otel_failed
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return None
    try:
        ctx = trace.get_current_span().get_span_context()
        if not ctx.is_valid:
            return None
        return Parent(format(ctx.trace_id, "032x"), format(ctx.span_id, "016x"))
    except Exception as e:  # noqa: BLE001 - a tracing problem must never reach the service
        if not _otel_failed:
            _otel_failed = True
            log.warning("commpipe shim: cannot read the OpenTelemetry span (%s); calls start "
                        "their own traces", e)
        return None


_bad_traceparent_logged = False


def explicit_parent(traceparent: str | None) -> Parent | None:
    """:func:`parse_traceparent`, logging (once per process) a value that is not one."""
    global _bad_traceparent_logged
    if traceparent is None:
        return None
    parent = parse_traceparent(traceparent)
    if parent is None and not _bad_traceparent_logged:
        _bad_traceparent_logged = True
        log.warning("commpipe shim: ignoring a traceparent that is not W3C trace context "
                    "(00-<32 hex>-<16 hex>-<2 hex>); such calls start a new trace")
    return parent
