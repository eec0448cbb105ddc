"""Trace context in the call timer and the kind helpers: each call its own span, nested calls
chained, W3C traceparent strings in and out, the current OpenTelemetry span followed, and
OpenTelemetry never imported by commpipe itself."""

from __future__ import annotations

import asyncio
import logging
import re
import subprocess
import sys
from typing import Any

import pytest

from pipeline.shim import context
from pipeline.shim.context import parse_traceparent
from pipeline.shim.kinds import EventKinds
from pipeline.wire.decode import validate_event

W3C_EXAMPLE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


class Recorder(EventKinds):
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def _put(self, event: dict[str, Any]) -> bool:
        self.events.append(event)
        return True


def spans(rec: Recorder) -> list[tuple[str, str, str, str | None]]:
    """(kind, trace_id, span_id, parent_span_id) of every event, each checked by the decoder."""
    out = []
    for e in rec.events:
        event = validate_event({"event_id": "e1", "correlation_id": "c", **e})
        out.append((event.kind, event.trace_id, event.span_id, event.parent_span_id))
    return out


def test_a_call_outside_any_context_starts_a_trace_of_its_own() -> None:
    rec = Recorder()
    with rec.call("gateway", "orders") as call:
        pass
    with rec.call("gateway", "orders") as other:
        pass
    assert re.fullmatch(r"[0-9a-f]{32}", call.trace_id or "")
    assert re.fullmatch(r"[0-9a-f]{16}", call.span_id or "")
    assert call.parent_span_id is None
    assert spans(rec)[:2] == [("request", call.trace_id, call.span_id, None),
                              ("response", call.trace_id, call.span_id, None)]
    assert (other.trace_id, other.span_id) != (call.trace_id, call.span_id)
    assert other.trace_id != call.trace_id
    assert call.traceparent == f"00-{call.trace_id}-{call.span_id}-01"
    assert parse_traceparent(call.traceparent) == (call.trace_id, call.span_id)


def test_nested_calls_chain_and_siblings_get_their_own_spans() -> None:
    rec = Recorder()
    with rec.call("gateway", "orders") as outer:
        with rec.call("orders", "payments") as first:
            with rec.call("payments", "bank") as deep:
                pass
        with rec.call("orders", "inventory") as second:
            pass
    with rec.call("gateway", "orders") as after:
        pass
    assert {c.trace_id for c in (outer, first, deep, second)} == {outer.trace_id}
    assert first.parent_span_id == outer.span_id
    assert deep.parent_span_id == first.span_id
    assert second.parent_span_id == outer.span_id  # back under the outer call
    assert len({c.span_id for c in (outer, first, deep, second, after)}) == 5
    assert after.parent_span_id is None and after.trace_id != outer.trace_id
    # every event of a call carries the call's own ids
    by_span: dict[str, set[tuple[Any, ...]]] = {}
    for kind, trace_id, span_id, parent in spans(rec):
        by_span.setdefault(span_id or "", set()).add((trace_id, parent))
        assert kind in ("request", "response")
    assert by_span[deep.span_id or ""] == {(outer.trace_id, first.span_id)}


def test_a_failed_nested_call_reports_its_parent_too() -> None:
    rec = Recorder()
    with pytest.raises(ConnectionError):
        with rec.call("orders", "payments") as outer:
            with rec.call("payments", "bank") as inner:
                raise ConnectionError("bank away")
    assert [(e["kind"], e["span_id"], e.get("parent_span_id")) for e in rec.events] == [
        ("request", outer.span_id, None), ("request", inner.span_id, outer.span_id),
        ("error", inner.span_id, outer.span_id), ("error", outer.span_id, None)]


def test_a_traceparent_puts_the_call_under_the_callers_span() -> None:
    rec = Recorder()
    with rec.call("payments", "bank", traceparent=W3C_EXAMPLE) as call:
        with rec.call("bank", "ledger") as inner:
            pass
    assert (call.trace_id, call.parent_span_id) == (TRACE, PARENT)
    assert call.span_id != PARENT
    assert (inner.trace_id, inner.parent_span_id) == (TRACE, call.span_id)
    # across services: the callee's emitter gets the caller's call.traceparent
    callee = Recorder()
    with callee.call("bank", "ledger", traceparent=call.traceparent) as remote:
        pass
    assert (remote.trace_id, remote.parent_span_id) == (TRACE, call.span_id)


def test_a_bad_traceparent_is_ignored_and_logged_once(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(context, "_bad_traceparent_logged", False)
    rec = Recorder()
    with caplog.at_level(logging.WARNING, "commpipe.shim"):
        with rec.call("a", "b", traceparent="00-not-a-trace-01") as call:
            pass
        with rec.call("a", "b", traceparent="garbage"):
            pass
    assert call.parent_span_id is None and re.fullmatch(r"[0-9a-f]{32}", call.trace_id or "")
    assert call.trace_id != TRACE
    assert [r.getMessage() for r in caplog.records].count(
        "commpipe shim: ignoring a traceparent that is not W3C trace context "
        "(00-<32 hex>-<16 hex>-<2 hex>); such calls start a new trace") == 1


@pytest.mark.parametrize(("value", "parent"), [
    (W3C_EXAMPLE, (TRACE, PARENT)),
    (f"  {W3C_EXAMPLE} ", (TRACE, PARENT)),  # optional whitespace around a header value
    (f"01-{TRACE}-{PARENT}-00-extra", (TRACE, PARENT)),  # a later version may add fields
    (f"00-{TRACE}-{PARENT}-01-extra", None),  # version 00 has exactly four
    (f"ff-{TRACE}-{PARENT}-01", None),
    (f"00-{TRACE.upper()}-{PARENT}-01", None),
    (f"00-{'0' * 32}-{PARENT}-01", None),
    (f"00-{TRACE}-{'0' * 16}-01", None),
    (f"00-{TRACE}-{PARENT}", None),
    ("", None),
    (None, None),
    (42, None),
])
def test_parse_traceparent_follows_w3c(value: Any, parent: tuple[str, str] | None) -> None:
    assert parse_traceparent(value) == parent


def test_explicit_ids_win_over_every_context() -> None:
    rec = Recorder()
    with rec.call("a", "b") as outer:
        with rec.call("b", "c", trace_id=TRACE, parent_span_id=PARENT,
                      span_id="1111111111111111") as given:
            pass
    assert (given.trace_id, given.span_id, given.parent_span_id) == (
        TRACE, "1111111111111111", PARENT)
    assert outer.parent_span_id is None


def test_the_helpers_take_a_traceparent_or_explicit_ids() -> None:
    rec = Recorder()
    rec.error(source_service="a", target_service="b", error_type="x", traceparent=W3C_EXAMPLE,
              span_id="2222222222222222", ts=1.7e9)
    rec.retry(source_service="a", target_service="b", attempt=1, traceparent=W3C_EXAMPLE,
              parent_span_id="3333333333333333", ts=1.7e9)
    rec.timeout(source_service="a", target_service="b", latency_ms=5, traceparent="bad",
                ts=1.7e9)
    assert spans(rec) == [("error", TRACE, "2222222222222222", PARENT),
                          ("retry", TRACE, None, "3333333333333333"),
                          ("timeout", None, None, None)]
    assert all("traceparent" not in e for e in rec.events)


def test_concurrent_tasks_keep_their_own_chains() -> None:
    rec = Recorder()

    async def user(name: str) -> tuple[Any, Any]:
        async with rec.call("gateway", name) as outer:
            await asyncio.sleep(0.01)
            async with rec.call(name, "db") as inner:
                await asyncio.sleep(0.01)
        return outer, inner

    async def main() -> list[tuple[Any, Any]]:
        return list(await asyncio.gather(user("orders"), user("payments")))

    (o1, i1), (o2, i2) = asyncio.run(main())
    assert (i1.trace_id, i1.parent_span_id) == (o1.trace_id, o1.span_id)
    assert (i2.trace_id, i2.parent_span_id) == (o2.trace_id, o2.span_id)
    assert o1.trace_id != o2.trace_id


def test_the_current_opentelemetry_span_is_followed() -> None:
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    def span(trace_hex: str, span_hex: str) -> Any:
        return NonRecordingSpan(SpanContext(int(trace_hex, 16), int(span_hex, 16),
                                            is_remote=False, trace_flags=TraceFlags(1)))

    rec = Recorder()
    with trace.use_span(span(TRACE, PARENT)):
        with rec.call("orders", "payments") as under_otel:
            with rec.call("payments", "bank") as nested:  # the commpipe call is innermost
                pass
            # a span made current inside the call is innermost now
            with trace.use_span(span(TRACE, "4444444444444444")):
                with rec.call("payments", "fraud") as under_inner_span:
                    pass
            with rec.call("payments", "ledger") as back:  # that span has ended
                pass
    assert (under_otel.trace_id, under_otel.parent_span_id) == (TRACE, PARENT)
    assert (nested.trace_id, nested.parent_span_id) == (TRACE, under_otel.span_id)
    assert (under_inner_span.trace_id, under_inner_span.parent_span_id) == (
        TRACE, "4444444444444444")
    assert back.parent_span_id == under_otel.span_id
    # an invalid (default) span is no context: a call outside any span starts a trace
    with trace.use_span(trace.INVALID_SPAN):
        with rec.call("a", "b") as alone:
            pass
    assert alone.parent_span_id is None and alone.trace_id != TRACE


def test_commpipe_never_imports_opentelemetry() -> None:
    code = """
import sys
from pipeline import Emitter
from pipeline.shim.kinds import EventKinds
class R(EventKinds):
    def _put(self, event):
        return True
with R().call("a", "b") as outer:
    with R().call("b", "c") as inner:
        pass
assert inner.parent_span_id == outer.span_id
print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stdout.strip() == "[]"
