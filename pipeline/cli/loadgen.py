"""Deterministic synthetic traffic on a small service graph, emitted through the real shim:
``LoadGen(emitter, rate=200, seed=1).run(60.0)`` returns a printable :class:`LoadStats`.

A user request walks gateway->orders, then orders->payments (->bank, then ->ledger) and
orders->inventory (->db). Latencies are drawn (per-edge lognormal; a parent's includes its
children's), never slept. orders->payments is retried by tenacity (no-op sleep, jitter from
the seeded RNG, ``RetryEvents``); payments->bank goes through a pybreaker breaker
(``CircuitEvents``). While it is open nothing is emitted on payments->bank and payments
answers orders with an ``error`` of type ``circuit_open``. Every 5 s gateway health-checks
its three neighbours.

What makes each gate of ``commpipe check`` fire: every call is a span (its own span id,
its caller's as ``parent_span_id``, one trace per user request), and a failure fails every
call above it, so the bank's bursts cascade up payments, orders and the gateway; the legacy
ledger is called over ``soap`` (no approved list has it) and, like orders->inventory and
inventory->db, without retries or a breaker (unprotected); inventory->db sometimes
dead-letters a message (``error_type`` ``dead_letter`` on a kafka edge).

Every decision comes from ``random.Random(seed)`` and the *simulated* clock
``user_index / rate`` (bursts, health checks, the breaker's reset_timeout), so seed and rate
fix the events on any machine; only ``ts`` and the retry events' correlation ids (uuid4 from
``RetryEvents``) vary. Trace and span ids come from a second generator seeded from ``seed``,
so they leave the decisions as they were. Needs the ``tenacity`` and ``pybreaker`` extras.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import pybreaker
from tenacity import Retrying, stop_after_attempt, wait_exponential_jitter

from pipeline.shim.adapters.pybreaker import CircuitEvents
from pipeline.shim.adapters.tenacity import RetryEvents

__all__ = ["ALL_EDGES", "EDGES", "HEALTH_TARGETS", "LoadGen", "LoadStats"]

EDGES: tuple[tuple[str, str, str], ...] = (
    ("gateway", "orders", "http"),
    ("orders", "payments", "grpc"),
    ("orders", "inventory", "http"),
    ("payments", "bank", "amqp"),
    ("inventory", "db", "kafka"),
    ("payments", "ledger", "soap"),
)
PROTOCOL = {(s, t): p for s, t, p in EDGES}
HEALTH_EVERY_S = 5.0
HEALTH_TARGETS = ("orders", "payments", "inventory")
"""The gateway health-checks these over http (edges of their own: gateway -> payments...)."""
ALL_EDGES: tuple[tuple[str, str, str], ...] = tuple(sorted(
    set(EDGES) | {("gateway", t, "http") for t in HEALTH_TARGETS}))
BURST_FAIL_P = 0.9  # payments->bank failure probability during a burst


class EdgeModel(NamedTuple):
    median_ms: float
    sigma: float
    timeout_ms: float
    error_p: float
    error_types: tuple[str, ...]
    timeout_p: float


MODEL: dict[tuple[str, str], EdgeModel] = {
    ("gateway", "orders"): EdgeModel(10.0, 0.5, 3000.0, 0.003, ("http_5xx",), 0.0005),
    ("orders", "payments"): EdgeModel(20.0, 0.6, 2500.0, 0.01, ("rejected", "unavailable"), 1e-3),
    ("orders", "inventory"): EdgeModel(12.0, 0.5, 1000.0, 0.01, ("http_5xx", "rejected"), 1e-3),
    ("payments", "bank"): EdgeModel(80.0, 0.7, 2000.0, 0.005, ("connection",), 0.002),
    ("inventory", "db"): EdgeModel(5.0, 0.4, 500.0, 0.003, ("rejected", "dead_letter"), 0.001),
    ("payments", "ledger"): EdgeModel(15.0, 0.5, 1500.0, 0.004, ("http_5xx",), 0.0005),
}

KINDS = ("request", "response", "error", "timeout", "retry", "circuit", "health")


@dataclass
class LoadStats:
    """What one ``run``/``simulate`` emitted."""

    users: int = 0
    events: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    error_types: Counter[str] = field(default_factory=Counter)
    circuit: list[str] = field(default_factory=list)  # payments->bank states, in order
    elapsed_s: float = 0.0

    def __str__(self) -> str:
        kinds = " ".join(f"{k}={self.kinds[k]}" for k in KINDS if self.kinds[k])
        return (f"{self.users} users, {self.events} events in {self.elapsed_s:.1f} s ({kinds});"
                f" circuit: {' -> '.join(self.circuit) or 'no transitions'}")


class _Failed(Exception):
    """A simulated failure of one edge call, already emitted."""

    def __init__(self, error_type: str, latency_ms: float) -> None:
        super().__init__(error_type)
        self.error_type, self.latency_ms = error_type, latency_ms


# A _Failed subclass per error type, so error_type_of() in RetryEvents reports that type.
_EXC: dict[str, type[_Failed]] = {
    "connection": type("SimConnectionError", (_Failed, ConnectionError), {}),
    "timeout": type("SimTimeoutError", (_Failed, TimeoutError), {}),
}


def _exc(error_type: str, latency_ms: float) -> _Failed:
    cls = _EXC.get(error_type) or _EXC.setdefault(error_type, type(error_type, (_Failed,), {}))
    return cls(error_type, latency_ms)


class _SeededJitter(wait_exponential_jitter):
    """``wait_exponential_jitter`` whose jitter comes from our RNG (tenacity uses ``random``)."""

    def __init__(self, rng: random.Random, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._rng = rng

    def __call__(self, retry_state: Any) -> float:
        exp = self.multiplier * self.exp_base ** (retry_state.attempt_number - 1)
        return max(0, self.min, min(exp + self._rng.uniform(0, self.jitter), self.max))


class _SimClockStorage(pybreaker.CircuitMemoryStorage):
    """Breaker storage that measures ``reset_timeout`` on the simulated clock: ``opened_at``
    reads as long past once ``reset_timeout`` simulated seconds went by, else as the future."""

    def __init__(self, clock: Any, reset_timeout: float) -> None:
        super().__init__(pybreaker.STATE_CLOSED)
        self._clock, self._reset_timeout = clock, reset_timeout
        self._sim_opened: float | None = None

    @property
    def opened_at(self) -> datetime | None:
        if self._sim_opened is None:
            return None
        elapsed = self._clock() - self._sim_opened >= self._reset_timeout - 1e-9
        return datetime.now(UTC) + timedelta(days=-1 if elapsed else 1)

    @opened_at.setter
    def opened_at(self, value: datetime) -> None:
        self._sim_opened = self._clock()


class _Counting:
    """Forwards the emit helpers to the emitter and counts what passes."""

    def __init__(self, emitter: Any, gen: LoadGen) -> None:
        self._emitter, self._gen = emitter, gen

    def __getattr__(self, kind: str) -> Any:
        if kind not in KINDS:
            raise AttributeError(kind)
        return lambda **kw: self._emit(kind, kw)

    def _emit(self, kind: str, kw: dict[str, Any]) -> bool:
        stats = self._gen._stats
        stats.events += 1
        stats.kinds[kind] += 1
        if kind in ("error", "timeout"):
            stats.error_types[kw.get("error_type", "timeout")] += 1
        if kind == "circuit":
            stats.circuit.append(kw["circuit_state"])
        return bool(getattr(self._emitter, kind)(**kw))


class LoadGen:
    """Synthetic users on :data:`EDGES`, emitted through ``emitter`` (an ``Emitter``)."""

    def __init__(self, emitter: Any, *, rate: float = 200.0, seed: int = 1,
                 burst_every_s: float = 30.0, burst_s: float = 8.0) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0")
        self.rate, self.seed = rate, seed
        self._rng = random.Random(seed)
        self._ids = random.Random(seed ^ 0x7472616365)  # trace and span ids only
        self._em = _Counting(emitter, self)
        self._stats = LoadStats()
        self._user = 0  # index of the next user; the simulated clock is _user / rate
        self._burst_period = max(1, round(rate * burst_every_s))
        self._burst_users = round(rate * burst_s)
        self._health_every = max(1, round(rate * HEALTH_EVERY_S))
        self._retrying = Retrying(
            stop=stop_after_attempt(3),
            wait=_SeededJitter(self._rng, multiplier=0.05, max=1.0),  # = initial=0.05
            sleep=lambda _s: None, reraise=True,
            before_sleep=RetryEvents(self._em, "orders", "payments",  # type: ignore[arg-type]
                                     protocol=PROTOCOL["orders", "payments"]))
        self._breaker = pybreaker.CircuitBreaker(
            fail_max=3, reset_timeout=2,
            state_storage=_SimClockStorage(self._now, 2.0),
            listeners=[CircuitEvents(self._em, "payments", "bank",  # type: ignore[arg-type]
                                     protocol=PROTOCOL["payments", "bank"])])

    def _now(self) -> float:
        return self._user / self.rate

    def in_burst(self) -> bool:
        """Whether the current user falls in a payments->bank burst: the first ``burst_s``
        of every ``burst_every_s`` period after the first one (simulated time)."""
        u = self._user
        return u >= self._burst_period and u % self._burst_period < self._burst_users

    def _span(self) -> str:
        return f"{self._ids.getrandbits(64) | 1 << 60:016x}"

    def _edge(self, src: str, dst: str, cid: str, trace: tuple[str, str | None],
              children: Any = None, fail_p: float | None = None) -> float:
        """Emit one call src->dst in ``trace`` (trace id, caller's span): request, children (a
        callable taking this call's (trace id, span) and returning their latency or raising
        _Failed), then the outcome. Returns the latency or raises the failure."""
        m, proto = MODEL[src, dst], PROTOCOL[src, dst]
        span = self._span()
        ids = dict(source_service=src, target_service=dst, protocol=proto, correlation_id=cid,
                   trace_id=trace[0], span_id=span, parent_span_id=trace[1])
        self._em.request(**ids, ts=time.time())
        latency = round(self._rng.lognormvariate(math.log(m.median_ms), m.sigma), 3)
        error_type = None
        if children is not None:
            try:
                latency += children((trace[0], span))
            except _Failed as exc:
                latency += exc.latency_ms
                error_type = exc.error_type
        r = self._rng.random()
        if error_type is None and (latency > m.timeout_ms or r < m.timeout_p):
            self._em.timeout(**ids, latency_ms=m.timeout_ms, ts=time.time())
            raise _exc("timeout", m.timeout_ms)
        if error_type is None and r < m.timeout_p + (m.error_p if fail_p is None else fail_p):
            error_type = self._rng.choice(m.error_types)
        http = proto == "http"
        if error_type is not None:
            self._em.error(**ids, error_type=error_type, latency_ms=round(latency, 3),
                           status_code=(503 if error_type == "http_5xx" else 409) if http
                           else None, ts=time.time())
            raise _exc(error_type, latency)
        self._em.response(**ids, latency_ms=round(latency, 3),
                          status_code=200 if http else None, ts=time.time())
        return latency

    def _payments_children(self, cid: str, trace: tuple[str, str | None]) -> float:
        fail_p = BURST_FAIL_P if self.in_burst() else None
        try:
            latency = self._breaker.call(self._edge, "payments", "bank", cid, trace,
                                         fail_p=fail_p)
        except pybreaker.CircuitBreakerError as exc:  # open (bank not called), or just tripped
            called = exc.__context__
            if not isinstance(called, _Failed):
                raise _Failed("circuit_open", 0.2) from None
            raise _Failed("unavailable", called.latency_ms) from None
        except _Failed as exc:
            raise _Failed("unavailable", exc.latency_ms) from None
        try:  # the legacy ledger: soap, no retries, no breaker
            return latency + self._edge("payments", "ledger", cid, trace)
        except _Failed as exc:
            raise _Failed("unavailable", latency + exc.latency_ms) from None

    def _inventory_children(self, cid: str, trace: tuple[str, str | None]) -> float:
        try:
            return self._edge("inventory", "db", cid, trace)
        except _Failed as exc:  # inventory cannot answer without its store
            raise _Failed("unavailable", exc.latency_ms) from None

    def _orders_children(self, cid: str, trace: tuple[str, str | None]) -> float:
        total = 0.0
        try:
            for attempt in self._retrying:
                with attempt:
                    total += self._edge("orders", "payments", cid, trace,
                                        children=lambda t: self._payments_children(cid, t))
            total += self._edge("orders", "inventory", cid, trace,
                                children=lambda t: self._inventory_children(cid, t))
        except _Failed as exc:
            raise _Failed("http_5xx", total + exc.latency_ms) from None
        return total

    def _health(self) -> None:
        burst = self.in_burst()
        for target in HEALTH_TARGETS:
            status = "healthy"
            if target == "payments" and burst:
                status = "unhealthy" if self._breaker.current_state == "open" else "degraded"
            self._em.health(source_service="gateway", target_service=target, protocol="http",
                            health_status=status, check_type="http",
                            latency_ms=round(self._rng.lognormvariate(math.log(2.0), 0.3), 3),
                            ts=time.time())

    def _one_user(self) -> None:
        if self._user % self._health_every == 0:
            self._health()
        cid = f"{self.seed & 0xFFFFFFFF:08x}{self._user:024x}"
        try:
            trace = (f"{self._ids.getrandbits(128) | 1 << 124:032x}", None)
            self._edge("gateway", "orders", cid, trace,
                       children=lambda t: self._orders_children(cid, t))
        except _Failed:
            pass  # already emitted as error/timeout
        self._user += 1
        self._stats.users += 1

    def simulate(self, users: int) -> LoadStats:
        """Emit ``users`` user requests back to back (no pacing)."""
        self._stats, started = LoadStats(), time.monotonic()
        for _ in range(users):
            self._one_user()
        self._stats.elapsed_s = time.monotonic() - started
        return self._stats

    def run(self, duration_s: float | None, stop: threading.Event | None = None) -> LoadStats:
        """Emit ``rate`` users per real second for ``duration_s`` (None: until ``stop``)."""
        self._stats, started = LoadStats(), time.monotonic()
        target = None if duration_s is None else max(0, round(duration_s * self.rate))
        done = 0
        while not (stop is not None and stop.is_set()):
            elapsed = time.monotonic() - started
            if duration_s is not None and (done >= target or elapsed >= duration_s):
                break
            due = int(elapsed * self.rate) + 1
            while done < (due if target is None else min(due, target)):
                self._one_user()
                done += 1
            pause = min(0.01, max(0.0, (done / self.rate) - (time.monotonic() - started)))
            if pause > 0:
                stop.wait(pause) if stop is not None else time.sleep(pause)
        self._stats.elapsed_s = time.monotonic() - started
        return self._stats
