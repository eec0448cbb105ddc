"""The synthetic load generator against a fake emitter: determinism, edges, retries,
the breaker's cycle through a burst, and real-time pacing."""

from __future__ import annotations

import re
import threading
import time
from typing import Any

import pytest

from pipeline.cli.loadgen import EDGES, LoadGen


class FakeEmitter:
    """Records every helper call as (kind, kwargs); same keyword signatures as the shim."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def _record(self, kind: str, **kw: Any) -> bool:
        self.calls.append((kind, kw))
        return True

    def request(self, *, source_service: str, target_service: str, protocol: str = "http",
                method: str | None = None, correlation_id: str | None = None,
                payload_size: int | None = None, trace_id: str | None = None,
                span_id: str | None = None, attempt: int | None = None,
                ts: float | None = None, parent_span_id: str | None = None) -> bool:
        return self._record("request", source_service=source_service,
                            target_service=target_service, protocol=protocol,
                            correlation_id=correlation_id, ts=ts, trace_id=trace_id,
                            span_id=span_id, parent_span_id=parent_span_id)

    def response(self, *, source_service: str, target_service: str, latency_ms: float,
                 protocol: str = "http", status_code: int | None = None,
                 method: str | None = None, correlation_id: str | None = None,
                 payload_size: int | None = None, trace_id: str | None = None,
                 span_id: str | None = None, attempt: int | None = None,
                 ts: float | None = None, parent_span_id: str | None = None) -> bool:
        return self._record("response", source_service=source_service,
                            target_service=target_service, protocol=protocol,
                            latency_ms=latency_ms, status_code=status_code,
                            correlation_id=correlation_id, ts=ts, trace_id=trace_id,
                            span_id=span_id, parent_span_id=parent_span_id)

    def error(self, *, source_service: str, target_service: str, error_type: str,
              protocol: str = "http", latency_ms: float | None = None,
              status_code: int | None = None, method: str | None = None,
              correlation_id: str | None = None, trace_id: str | None = None,
              span_id: str | None = None, error_message: str | None = None,
              attempt: int | None = None, ts: float | None = None,
              parent_span_id: str | None = None) -> bool:
        return self._record("error", source_service=source_service,
                            target_service=target_service, protocol=protocol,
                            error_type=error_type, latency_ms=latency_ms,
                            status_code=status_code, correlation_id=correlation_id, ts=ts,
                            trace_id=trace_id, span_id=span_id, parent_span_id=parent_span_id)

    def timeout(self, *, source_service: str, target_service: str, latency_ms: float,
                protocol: str = "http", method: str | None = None,
                correlation_id: str | None = None, trace_id: str | None = None,
                span_id: str | None = None, error_message: str | None = None,
                attempt: int | None = None, ts: float | None = None,
                parent_span_id: str | None = None) -> bool:
        return self._record("timeout", source_service=source_service,
                            target_service=target_service, protocol=protocol,
                            latency_ms=latency_ms, correlation_id=correlation_id, ts=ts,
                            trace_id=trace_id, span_id=span_id, parent_span_id=parent_span_id)

    def retry(self, *, source_service: str, target_service: str, attempt: int,
              protocol: str = "http", backoff_ms: float | None = None,
              error_type: str | None = None, method: str | None = None,
              correlation_id: str | None = None, trace_id: str | None = None,
              span_id: str | None = None, error_message: str | None = None,
              ts: float | None = None) -> bool:
        return self._record("retry", source_service=source_service,
                            target_service=target_service, protocol=protocol, attempt=attempt,
                            backoff_ms=backoff_ms, error_type=error_type,
                            correlation_id=correlation_id, ts=ts)

    def circuit(self, *, source_service: str, target_service: str, circuit_state: str,
                protocol: str = "http", correlation_id: str | None = None,
                ts: float | None = None) -> bool:
        return self._record("circuit", source_service=source_service,
                            target_service=target_service, protocol=protocol,
                            circuit_state=circuit_state, correlation_id=correlation_id, ts=ts)

    def health(self, *, source_service: str, target_service: str, health_status: str,
               protocol: str = "http", check_type: str | None = None,
               latency_ms: float | None = None, correlation_id: str | None = None,
               ts: float | None = None) -> bool:
        return self._record("health", source_service=source_service,
                            target_service=target_service, protocol=protocol,
                            health_status=health_status, check_type=check_type,
                            latency_ms=latency_ms, correlation_id=correlation_id, ts=ts)

    def sequence(self) -> list[tuple[str, tuple[tuple[str, Any], ...]]]:
        """The calls without ts and without the retry events' random correlation ids."""
        def keep(kind: str, key: str) -> bool:
            return key != "ts" and not (kind == "retry" and key == "correlation_id")

        return [(kind, tuple(sorted((k, v) for k, v in kw.items() if keep(kind, k))))
                for kind, kw in self.calls]


# 200 users/s, a 4 s burst every 10 s: users 2000..2799 are in the first burst.
BURSTY = dict(rate=200.0, burst_every_s=10.0, burst_s=4.0)


def simulate(seed: int, users: int = 4000) -> tuple[FakeEmitter, Any]:
    fake = FakeEmitter()
    stats = LoadGen(fake, seed=seed, **BURSTY).simulate(users)
    return fake, stats


def test_same_seed_same_events_different_seed_differs() -> None:
    a, stats_a = simulate(7)
    b, stats_b = simulate(7)
    c, _ = simulate(8)
    assert a.sequence() == b.sequence()
    assert stats_a.kinds == stats_b.kinds and stats_a.circuit == stats_b.circuit
    assert a.sequence() != c.sequence()
    # our own events carry ts=time.time(); the adapters' retry/circuit events leave it to the shim
    assert all(kw["ts"] is not None for kind, kw in a.calls if kind not in ("retry", "circuit"))


def test_every_edge_appears_with_its_protocol() -> None:
    fake, stats = simulate(1, users=500)
    seen = {(kw["source_service"], kw["target_service"], kw["protocol"])
            for kind, kw in fake.calls if kind == "request"}
    assert seen == set(EDGES)
    assert stats.users == 500 and stats.events == len(fake.calls)
    assert stats.kinds["response"] > stats.kinds["error"] > 0
    health = {kw["target_service"] for kind, kw in fake.calls if kind == "health"}
    assert health == {"orders", "payments", "inventory"}


def test_retries_carry_attempt_and_backoff() -> None:
    fake, _ = simulate(3)
    retries = [kw for kind, kw in fake.calls if kind == "retry"]
    assert retries
    assert {kw["attempt"] for kw in retries} == {1, 2}
    assert all(kw["backoff_ms"] > 0 for kw in retries)
    assert all((kw["source_service"], kw["target_service"]) == ("orders", "payments")
               for kw in retries)


def test_breaker_opens_in_burst_and_closes_after(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_sleep(seconds: float) -> None:
        raise AssertionError(f"the simulation slept {seconds} s: its time is simulated")

    monkeypatch.setattr(time, "sleep", no_sleep)  # instead of timing a shared machine
    fake, stats = simulate(5)
    states = [kw["circuit_state"] for kind, kw in fake.calls if kind == "circuit"]
    assert all((kw["source_service"], kw["target_service"]) == ("payments", "bank")
               for kind, kw in fake.calls if kind == "circuit")
    assert states == stats.circuit
    assert states[0] == "open"
    first_half_open = states.index("half_open")
    assert "closed" in states[first_half_open:] and states[-1] == "closed"
    # while open, bank is not called: payments answers orders with circuit_open
    assert any(kind == "error" and kw["error_type"] == "circuit_open"
               and kw["target_service"] == "payments" for kind, kw in fake.calls)
    bank_errors = [kw for kind, kw in fake.calls
                   if kind == "error" and kw["target_service"] == "bank"]
    assert {kw["error_type"] for kw in bank_errors} == {"connection"}
    # the open transition happens inside the burst (user index >= 2000)
    users_before_open = 0
    for kind, kw in fake.calls:
        if kind == "request" and kw["source_service"] == "gateway":
            users_before_open += 1
        if kind == "circuit":
            break
    assert 2000 < users_before_open <= 2800


def test_payments_health_degrades_in_burst() -> None:
    fake, _ = simulate(2)
    payments = [kw["health_status"] for kind, kw in fake.calls
                if kind == "health" and kw["target_service"] == "payments"]
    assert payments[0] == "healthy"
    assert set(payments) - {"healthy"}  # checks at users 2000, 2200 … fall in the burst


def test_run_paces_to_rate() -> None:
    fake = FakeEmitter()
    started = time.monotonic()
    stats = LoadGen(fake, rate=100.0, seed=1).run(duration_s=1.0)
    elapsed = time.monotonic() - started
    assert 90 <= stats.users <= 110
    assert 0.9 <= elapsed < 1.5


def test_run_stops_when_asked() -> None:
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    started = time.monotonic()
    stats = LoadGen(FakeEmitter(), rate=100.0).run(None, stop)
    assert time.monotonic() - started < 1.0
    assert 10 <= stats.users <= 40


def test_every_call_is_a_span_under_its_caller_one_trace_per_user() -> None:
    fake, _ = simulate(4, users=300)
    calls = [kw for kind, kw in fake.calls if kind == "request"]
    by_span = {kw["span_id"]: kw for kw in calls}
    assert len(by_span) == len(calls)  # each call its own span
    for kw in calls:
        assert re.fullmatch(r"[0-9a-f]{16}", kw["span_id"])
        assert re.fullmatch(r"[0-9a-f]{32}", kw["trace_id"])
        if kw["source_service"] == "gateway":
            assert kw["parent_span_id"] is None
            continue
        parent = by_span[kw["parent_span_id"]]
        assert parent["target_service"] == kw["source_service"]  # made by the callee
        assert parent["trace_id"] == kw["trace_id"]
    assert len({kw["trace_id"] for kw in calls}) == 300
    # the outcome of a call carries the ids of its request
    for kind, kw in fake.calls:
        if kind in ("response", "error", "timeout"):
            assert by_span[kw["span_id"]]["parent_span_id"] == kw["parent_span_id"]


def test_what_makes_each_gate_fire() -> None:
    fake, stats = simulate(6)
    edges = {(kw["source_service"], kw["target_service"], kw["protocol"])
             for kind, kw in fake.calls if kind == "request"}
    assert ("payments", "ledger", "soap") in edges  # an unapproved protocol
    assert stats.error_types["dead_letter"] > 0  # on inventory -> db (kafka)
    assert all(kw["target_service"] == "db" for kind, kw in fake.calls
               if kind == "error" and kw["error_type"] == "dead_letter")
    # cascades: a failed call whose callee's own call failed before it, in the same trace
    failed = {kw["span_id"]: kw for kind, kw in fake.calls if kind in ("error", "timeout")}
    cascaded = {(failed[kw["parent_span_id"]]["source_service"],
                 failed[kw["parent_span_id"]]["target_service"])
                for kw in failed.values() if kw["parent_span_id"] in failed
                and kw["ts"] <= failed[kw["parent_span_id"]]["ts"]}
    assert {("gateway", "orders"), ("orders", "payments")} <= cascaded
