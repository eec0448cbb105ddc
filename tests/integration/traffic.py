"""Seeded traffic and its independently computed expectation, shared by the stream-job and
sink tests: plain counting, sorted lists for exact quantiles and a few-line breaker, never
the code under test."""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from pipeline import Emitter

WINDOW, GRACE = 10.0, 5.0
T0 = 1_763_900_000.0  # a window boundary (divisible by 10)
N_WINDOWS = 4
T_END = T0 + (N_WINDOWS - 1) * WINDOW + 9.0  # every edge's last event: the watermark
EDGES = [("gateway", "orders", "http"), ("orders", "payments", "grpc"),
         ("orders", "inventory", "http"), ("payments", "bank", "amqp")]
LEGACY = ("legacy", "db", "kafka")  # written by a non-shim producer: unkeyed single events
OUTCOME = {"response": True, "error": False, "timeout": False}


@dataclass
class Expected:
    """Independently computed expectations per (window_start, edge)."""

    counts: dict[tuple[float, tuple[str, str, str]], Counter[str]] = field(
        default_factory=lambda: defaultdict(Counter))
    errors: dict[tuple[float, tuple[str, str, str]], Counter[str]] = field(
        default_factory=lambda: defaultdict(Counter))
    latencies: dict[tuple[float, tuple[str, str, str]], list[float]] = field(
        default_factory=lambda: defaultdict(list))
    backoff: dict[tuple[float, tuple[str, str, str]], float] = field(
        default_factory=lambda: defaultdict(float))
    payload: dict[tuple[float, tuple[str, str, str]], int] = field(
        default_factory=lambda: defaultdict(int))
    late: dict[tuple[float, tuple[str, str, str]], int] = field(
        default_factory=lambda: defaultdict(int))
    outcomes: dict[tuple[str, str, str], list[tuple[float, bool | None]]] = field(
        default_factory=lambda: defaultdict(list))
    events: list[dict[str, Any]] = field(default_factory=list)

    def add(self, event: dict[str, Any]) -> None:
        edge = (event["source_service"], event["target_service"], event["protocol"])
        key = (math.floor(event["ts"] / WINDOW) * WINDOW, edge)
        kind = event["kind"]
        self.counts[key][kind] += 1
        if kind == "error":
            self.errors[key][event["error_type"]] += 1
        if kind in OUTCOME and "latency_ms" in event:
            self.latencies[key].append(event["latency_ms"])
        if kind == "retry":
            self.backoff[key] += event["backoff_ms"]
        self.payload[key] += event.get("payload_size", 0)
        self.outcomes[edge].append((event["ts"], OUTCOME.get(kind)))
        self.events.append(event)


def breaker_entries(outcomes: list[tuple[float, bool | None]]) -> tuple[str, Counter[str]]:
    """The derived breaker (threshold 3, recovery 1 s, 1 probe), written out plainly."""
    state, since, failures, entered = "closed", None, 0, Counter()
    for ts, ok in outcomes:
        since = ts if since is None else since
        if state == "open" and ts >= since + 1.0:
            state, since = "half_open", since + 1.0
            entered["half_open"] += 1
        if ok is None or state == "open":
            continue
        if state == "closed":
            failures = 0 if ok else failures + 1
            if failures == 3:
                state, since, failures = "open", ts, 0
                entered["open"] += 1
        else:
            state, since = ("closed", ts) if ok else ("open", ts)
            entered[state] += 1
    return state, entered


def make_window_events(rng: random.Random, window: int, t0: float = T0) -> list[dict[str, Any]]:
    """Seeded traffic for one window over EDGES, in time order per edge."""
    events: list[dict[str, Any]] = []
    start = t0 + window * WINDOW
    for edge in EDGES:
        source, target, protocol = edge
        base = {"source_service": source, "target_service": target, "protocol": protocol}
        # (start + 0.6: the previous window's breaker probe at start + 0.5 stays in time order)
        times = sorted(rng.uniform(start + 0.6, start + 8.9)
                       for _ in range(rng.randint(40, 90)))
        for ts in times:
            kind = rng.choices(["request", "response", "error", "timeout", "retry", "health"],
                               weights=[30, 45, 8, 3, 10, 4])[0]
            event = {**base, "kind": kind, "ts": ts}
            if kind == "response":
                event |= {"latency_ms": rng.lognormvariate(3, 0.8), "status_code": 200,
                          "payload_size": rng.randint(100, 5000)}
            elif kind == "error":
                event |= {"error_type": rng.choice(["connection", "http_5xx", "rejected"]),
                          "latency_ms": rng.uniform(1, 50)}
            elif kind == "timeout":
                event |= {"latency_ms": 1000.0}
            elif kind == "retry":
                attempt = rng.randint(1, 3)
                event |= {"attempt": attempt, "backoff_ms": 100.0 * 2 ** (attempt - 1)}
            elif kind == "health":
                event |= {"health_status": rng.choice(["healthy", "degraded"])}
            events.append(event)
        if window == 2 and edge == ("orders", "payments", "grpc"):
            # a clean trip: three failures in a row, then a probe after the recovery time
            for i, t in enumerate((start + 9.0, start + 9.1, start + 9.2)):
                events.append({**base, "kind": "error", "error_type": "connection",
                               "latency_ms": 5.0 + i, "ts": t})
            events.append({**base, "kind": "response", "latency_ms": 7.0, "ts": start + 10.5})
        if edge == ("payments", "bank", "amqp") and window in (1, 2):
            state = "open" if window == 1 else "closed"
            events.append({**base, "kind": "circuit", "circuit_state": state, "ts": start + 9.5})
    return events


def emit_all(emitter: Emitter, events: list[dict[str, Any]],
             expected: Expected | None = None) -> None:
    """Emit through the shim's kind helpers, wait for delivery, record the expectation."""
    for event in events:
        fields = {k: v for k, v in event.items() if k != "kind"}
        getattr(emitter, event["kind"])(**fields)
        if expected is not None:
            expected.add(event)
    assert emitter.flush(timeout=30) is True


def traffic(rng: random.Random, t0: float = T0
            ) -> tuple[list[list[dict[str, Any]]], list[dict[str, Any]]]:
    """Per-window shim events (plus every edge's final event at ``t0`` + the span of T_END),
    and legacy events."""
    t_end = t0 + (T_END - T0)
    phases = [make_window_events(rng, w, t0) for w in range(N_WINDOWS)]
    phases[-1].extend({"kind": "request", "source_service": s, "target_service": t,
                       "protocol": p, "ts": t_end} for s, t, p in EDGES)
    legacy = [{"kind": "response", "source_service": LEGACY[0], "target_service": LEGACY[1],
               "protocol": LEGACY[2], "latency_ms": float(i + 1), "ts": t0 + 10 + i * 0.1}
              for i in range(40)]
    return phases, legacy


async def produce_legacy(bootstrap: str, topic: str, events: list[dict[str, Any]]) -> None:
    """Single-event records without a key, as a non-shim producer might send them."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for i, event in enumerate(events):
            wire = {"v": 1, "event_id": f"legacy{i}", "correlation_id": f"l{i}", **event}
            await producer.send_and_wait(topic, orjson.dumps(wire), partition=i % 4)
    finally:
        await producer.stop()


CALL_SERVICES = ["gateway", "orders", "payments", "inventory", "bank"]


def random_call_event(rng: random.Random, n: int, kinds: list[str], ts: float
                      ) -> tuple[str, dict[str, Any]]:
    """``(kind, fields)`` of one http event between two of :data:`CALL_SERVICES`, its
    correlation id ``c<n>``: a latency on a response, an error type on an error."""
    source, target = rng.sample(CALL_SERVICES, 2)
    kind = rng.choice(kinds)
    event: dict[str, Any] = {"source_service": source, "target_service": target,
                             "protocol": "http", "correlation_id": f"c{n}", "ts": ts}
    if kind == "response":
        event["latency_ms"] = round(rng.uniform(1, 90), 2)
    elif kind == "error":
        event["error_type"] = rng.choice(["connection", "http_5xx"])
    return kind, event
