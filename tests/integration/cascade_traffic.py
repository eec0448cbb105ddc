"""Seeded call trees with trace context, and the cascades in them computed plainly.

:func:`operations` makes one window's operations on a small service graph: each call a
span (request, then response, error or timeout) under its caller's span, with failures
that propagate up, failures absorbed by the caller, callers that gave up before their
callee failed, a failed call made by another service than the callee under the same
parent span, and operations sent without any trace context. :func:`expected_cascades` and
:func:`expected_windows` apply the README's definition to the emitted events with loops
and dictionaries only, never the code under test.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

WINDOW = 10.0
CHILDREN: dict[str, list[tuple[str, str]]] = {
    "gateway": [("orders", "http")],
    "orders": [("payments", "grpc"), ("inventory", "http")],
    "payments": [("bank", "amqp")],
    "inventory": [("db", "kafka")],
}
FAILED = ("error", "timeout")


@dataclass
class Tree:
    """What one operation emitted, and how its root call ended."""

    events: list[dict[str, Any]]
    trace_id: str | None
    root_failed: bool


class _Ids:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def trace(self) -> str:
        return f"{self.rng.getrandbits(128) | 1:032x}"

    def span(self) -> str:
        return f"{self.rng.getrandbits(64) | 1:016x}"


def _call(rng: random.Random, ids: _Ids, out: list[dict[str, Any]], src: str, dst: str,
          protocol: str, start: float, trace: str | None, parent: str | None,
          cid: str) -> tuple[float, bool]:
    """Emit one call and its children; return (end time, failed)."""
    span = ids.span() if trace else None
    ctx = {"trace_id": trace, "span_id": span, "parent_span_id": parent} if trace else {}
    base = {"source_service": src, "target_service": dst, "protocol": protocol,
            "correlation_id": cid, **ctx}
    out.append({**base, "kind": "request", "ts": round(start, 3)})
    t = start + 0.001
    child_failed_at: float | None = None
    for child, child_protocol in CHILDREN.get(dst, []):
        end, failed = _call(rng, ids, out, dst, child, child_protocol, t, trace, span, cid)
        if failed and child_failed_at is None:
            child_failed_at = end
        t = end + 0.001
    # now and then the callee also calls a side service under this call's span, but as the
    # caller's own service (src, not dst): not "a call it made downstream"
    if trace and dst == "payments" and rng.random() < 0.15:
        side = {"source_service": src, "target_service": "audit", "protocol": "http",
                "correlation_id": cid, "trace_id": trace, "span_id": ids.span(),
                "parent_span_id": span}
        out.append({**side, "kind": "request", "ts": round(t, 3)})
        t += 0.002
        out.append({**side, "kind": "error", "error_type": "rejected", "latency_ms": 2.0,
                    "ts": round(t, 3)})
        if child_failed_at is None:
            child_failed_at = -1.0  # a failure under the span, but not a cascade
        t += 0.001
    latency = round(rng.uniform(1.0, 30.0), 3)
    end = round(t + latency / 1000.0, 3)
    failed = False
    if child_failed_at is not None and child_failed_at >= 0 and rng.random() < 0.75:
        failed = True  # the callee's failure propagates (usually)
        if rng.random() < 0.1:
            end = round(child_failed_at, 3)  # at the very same instant
    elif rng.random() < 0.06:
        failed = True  # a failure of its own
    if child_failed_at is not None and child_failed_at >= 0 and failed and rng.random() < 0.12:
        end = round(start + 0.0005, 4)  # the caller gave up before the callee failed
    kind = "response"
    if failed:
        kind = "timeout" if rng.random() < 0.3 else "error"
    event = {**base, "kind": kind, "latency_ms": round((end - start) * 1000.0, 3),
             "ts": end}
    if kind == "error":
        event["error_type"] = rng.choice(["unavailable", "http_5xx", "connection"])
    out.append(event)
    return end, failed


def operations(rng: random.Random, window_start: float, n: int) -> list[Tree]:
    """``n`` operations (gateway -> orders -> ...) starting inside the window, each done
    within ~1 s, so every event of one operation falls in this window."""
    ids = _Ids(rng)
    trees = []
    for i in range(n):
        start = round(window_start + 0.5 + 8.0 * i / n, 3)
        traced = rng.random() >= 0.1
        trace = ids.trace() if traced else None
        cid = f"op{int(window_start)}x{i}"
        out: list[dict[str, Any]] = []
        _, failed = _call(rng, ids, out, "gateway", "orders", "http", start, trace, None, cid)
        trees.append(Tree(out, trace, failed))
    return trees


def edge_of(e: dict[str, Any]) -> tuple[str, str, str]:
    return e["source_service"], e["target_service"], e["protocol"]


def expected_cascades(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Upstream failure's span id -> {edge, ts, downstream span, downstream edge}: a failed
    call U (with a span) on A -> B whose trace holds a failed call D with parent U's span,
    made by B, that failed no later than U; the downstream one is the earliest such D."""
    failed = [e for e in events if e["kind"] in FAILED and e.get("span_id")]
    out: dict[str, dict[str, Any]] = {}
    for u in failed:
        found = [d for d in failed
                 if d["trace_id"] == u["trace_id"] and d.get("parent_span_id") == u["span_id"]
                 and d["source_service"] == u["target_service"] and d["ts"] <= u["ts"]]
        if found:
            first = min(found, key=lambda d: d["ts"])
            out[u["span_id"]] = {"edge": edge_of(u), "ts": u["ts"],
                                 "downstream_span_id": first["span_id"],
                                 "downstream_edge": edge_of(first), "trace_id": u["trace_id"]}
    return out


def expected_windows(events: list[dict[str, Any]], cascades: dict[str, dict[str, Any]]
                     ) -> dict[tuple[float, tuple[str, str, str]], tuple[int, int, int]]:
    """(window_start, edge) -> (calls, failures, cascades) for every edge and window with
    events; calls are responses, errors and timeouts."""
    out: dict[tuple[float, tuple[str, str, str]], list[int]] = defaultdict(lambda: [0, 0, 0])
    for e in events:
        key = (math.floor(e["ts"] / WINDOW) * WINDOW, edge_of(e))
        row = out[key]
        if e["kind"] in ("response", *FAILED):
            row[0] += 1
        if e["kind"] in FAILED:
            row[1] += 1
    for c in cascades.values():
        out[(math.floor(c["ts"] / WINDOW) * WINDOW, c["edge"])][2] += 1
    return {k: (v[0], v[1], v[2]) for k, v in out.items()}


def origin_of(trace_events: list[dict[str, Any]], cascades: dict[str, dict[str, Any]]
              ) -> str | None:
    """The span where the trace's failure started: from its root failure (the failed call
    without a parent), down the cascade links to the failure that followed no other."""
    roots = [e for e in trace_events if e["kind"] in FAILED and not e.get("parent_span_id")]
    if not roots:
        return None
    span = roots[0]["span_id"]
    while span in cascades:
        span = cascades[span]["downstream_span_id"]
    return span
