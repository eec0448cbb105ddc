"""Property: whatever a service passes, from however many threads, the shim neither raises
nor blocks, and after ``close()`` every call is accounted for exactly once:
``sent + dropped + failed + invalid == emitted``.

Hypothesis draws, for several threads at once, calls of every helper (``request`` ...
``health``, ``call()``) with arbitrary keyword values, and ``emit()`` of arbitrary objects
and of event dicts with arbitrary values and extra fields (unencodable objects, huge ints,
lone surrogates, int keys, subclasses, nesting). Each case runs against :class:`Emitter`
and :class:`AsyncEmitter`, both with a sender that delivers at once
(:class:`tests.unit.shim.fakes.FakeProducer`, so ``sent`` is checked against what it
received) and with no broker at all and a small buffer (so drops happen).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import inspect
import socket
import threading
import time
from decimal import Decimal
from http import HTTPStatus
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import AsyncEmitter, Emitter, Event, Settings
from pipeline.shim.kinds import EventKinds
from tests.unit.shim import fakes

THREADS = 4
NEVER_BLOCKS_S = 0.5  # one call; generous for a loaded 2-core machine (a blocking network
#                       call would take the 10 s request timeout)


class Name(enum.StrEnum):
    ORDERS = "orders"


class Opaque:
    """Something JSON cannot hold, with a repr that is not a value."""


texts = st.text(st.characters(exclude_categories=()), max_size=40)  # surrogates included
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=2**63, max_value=2**80),
    st.floats(), texts, st.binary(max_size=10), st.builds(Opaque),
    st.sampled_from([HTTPStatus.OK, Name.ORDERS, Decimal("1.5"), dt.datetime(2025, 1, 1),
                     float("nan"), -0.0, "", "x" * 5_000]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.tuples(inner, inner),
    st.dictionaries(st.one_of(texts, st.integers(), st.none()), inner, max_size=3)),
    max_leaves=8)
names = st.sampled_from(["orders", "payments", "a.b:c-d"]) | values
FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "source_service": names, "target_service": names,
    "protocol": st.sampled_from(["http", "grpc"]) | values,
    "latency_ms": st.floats(0, 1e4) | values, "error_type": st.just("http_5xx") | values,
    "attempt": st.integers(1, 5) | values,
    "circuit_state": st.sampled_from(["open", "closed"]) | values,
    "health_status": st.sampled_from(["healthy", "degraded"]) | values,
}
HELPERS = ["request", "response", "error", "timeout", "retry", "circuit", "health"]


def helper_call(name: str) -> st.SearchStrategy[tuple[str, dict[str, Any]]]:
    """(name, keyword arguments): required ones always, optional ones sometimes, every
    value arbitrary (often valid)."""
    params = inspect.signature(getattr(EventKinds, name)).parameters
    required = {p: FIELD_VALUES.get(p, values) for p, v in params.items()
                if p != "self" and v.default is inspect.Parameter.empty}
    optional = {p: FIELD_VALUES.get(p, values) for p, v in params.items()
                if p != "self" and v.default is not inspect.Parameter.empty}
    return st.tuples(st.just(name), st.fixed_dictionaries(required, optional=optional))


wire_dicts = st.fixed_dictionaries(
    {"v": st.just(1) | values, "kind": st.sampled_from(HELPERS) | values,
     "source_service": names, "target_service": names,
     "protocol": FIELD_VALUES["protocol"], "ts": st.just(1.7e9) | values},
    optional={"latency_ms": FIELD_VALUES["latency_ms"], "attempt": FIELD_VALUES["attempt"],
              "error_message": values, "method": values, "status_code": values,
              "extra": values, "more": values}) | st.dictionaries(
    st.one_of(texts, st.integers()), values, max_size=4)
emit_arguments = st.one_of(
    wire_dicts, values,
    st.builds(Event, kind=st.sampled_from(HELPERS), event_id=st.just("e1"),
              correlation_id=st.just("c1"), source_service=names, target_service=names,
              protocol=st.just("http"), ts=st.just(1.7e9) | values))
calls = st.one_of(
    *[helper_call(name) for name in HELPERS],
    st.tuples(st.just("emit"), emit_arguments),
    st.tuples(st.just("call"), st.fixed_dictionaries(
        {"source_service": names, "target_service": names},
        optional={"protocol": FIELD_VALUES["protocol"], "method": values,
                  "attempt": values})))
per_thread = st.lists(st.lists(calls, max_size=25), min_size=THREADS, max_size=THREADS)


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


class Calls:
    """Runs drawn calls against one emitter; counts events emitted, times each call and
    keeps anything that was raised."""

    def __init__(self, emitter: Any) -> None:
        self.emitter = emitter
        self.emitted = 0
        self.slowest = 0.0
        self.raised: list[BaseException] = []
        self._lock = threading.Lock()

    def run(self, drawn: list[tuple[str, Any]]) -> None:
        emitted = 0
        slowest = 0.0
        for name, argument in drawn:
            started = time.perf_counter()
            try:
                if name == "emit":
                    result = self.emitter.emit(argument)
                    emitted += 1
                elif name == "call":
                    with self.emitter.call(argument.pop("source_service"),
                                           argument.pop("target_service"), **argument):
                        pass
                    emitted += 2  # request, then response
                else:
                    result = getattr(self.emitter, name)(**argument)
                    emitted += 1
                if name != "call":
                    assert result in (True, False)
            except BaseException as e:  # noqa: BLE001 - what the property forbids
                self.raised.append(e)
            slowest = max(slowest, time.perf_counter() - started)
        with self._lock:
            self.emitted += emitted
            self.slowest = max(self.slowest, slowest)

    def threads(self, drawn: list[list[tuple[str, Any]]]) -> list[threading.Thread]:
        return [threading.Thread(target=self.run, args=(d,)) for d in drawn]


def check(calls: Calls, stats: Any, producer: fakes.FakeProducer | None) -> None:
    assert calls.raised == []
    assert calls.slowest < NEVER_BLOCKS_S
    assert stats.sent + stats.dropped + stats.failed + stats.invalid == calls.emitted
    assert (stats.buffered, stats.buffered_bytes) == (0, 0)
    if producer is not None:  # delivered at once: nothing dropped, sent = what arrived
        assert stats.dropped == 0 and stats.failed == 0
        assert stats.sent == len(producer.events())
    else:
        assert stats.sent == 0


def shim_settings(broker: bool) -> Settings:
    if broker:
        return Settings.from_env({})
    return Settings.from_env({}, shim_buffer_size=40, shim_buffer_bytes=20_000)


PROPERTY = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


@pytest.mark.parametrize("broker", [True, False], ids=["delivering", "no-broker"])
@PROPERTY
@given(drawn=per_thread)
def test_emitter_never_raises_never_blocks_and_accounts_for_every_event(
        broker: bool, drawn: list[list[tuple[str, Any]]]) -> None:
    with pytest.MonkeyPatch.context() as patch:
        producer = fakes.install(patch) if broker else None
        emitter = Emitter(closed_port(), "t", settings=shim_settings(broker))
        calls = Calls(emitter)
        threads = calls.threads(drawn)
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        emitter.close(timeout=5 if broker else 0.1)
    check(calls, emitter.stats(), producer)


@pytest.mark.parametrize("broker", [True, False], ids=["delivering", "no-broker"])
@PROPERTY
@given(drawn=per_thread, in_loop=st.lists(calls, max_size=25))
def test_async_emitter_never_raises_never_blocks_and_accounts_for_every_event(
        broker: bool, drawn: list[list[tuple[str, Any]]],
        in_loop: list[tuple[str, Any]]) -> None:
    async def main(producer: fakes.FakeProducer | None) -> tuple[Calls, Any]:
        emitter = AsyncEmitter(closed_port(), "t", settings=shim_settings(broker))
        async with emitter:
            calls = Calls(emitter)
            threads = calls.threads(drawn)
            for t in threads:
                t.start()
            calls.run(in_loop)  # from the loop's own thread too
            loop = asyncio.get_running_loop()
            for t in threads:
                await loop.run_in_executor(None, t.join, 60)
            emitter._settings = Settings.from_env(
                {}, shim_close_timeout_s=5 if broker else 0.1)
        return calls, emitter.stats()

    with pytest.MonkeyPatch.context() as patch:
        producer = fakes.install(patch) if broker else None
        calls, stats = asyncio.run(main(producer))
    check(calls, stats, producer)
