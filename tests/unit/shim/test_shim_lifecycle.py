"""The shim's flush and close under traffic and against a broker that never answers.

The sender runs against :class:`tests.unit.shim.fakes.FakeProducer` (no broker), or
against a loopback socket that accepts connections and never replies.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pipeline import AsyncEmitter, Emitter, Settings
from tests.unit.shim import fakes


def settings(**overrides: Any) -> Settings:
    return Settings.from_env({}, **overrides)


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def request(i: int, prefix: str = "c") -> dict[str, Any]:
    return {"v": 1, "kind": "request", "source_service": "orders",
            "target_service": "payments", "protocol": "http", "ts": 1.7e9,
            "correlation_id": f"{prefix}{i}"}


class Traffic:
    """A thread emitting without pause until stopped; ``emitted`` counts returned emits."""

    def __init__(self, emitter: Emitter) -> None:
        self.emitter = emitter
        self.emitted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.emitter.emit(request(self.emitted))
            self.emitted += 1
            if self.emitted % 50 == 0:
                time.sleep(0.001)

    def __enter__(self) -> Traffic:
        self._thread.start()
        while self.emitted < 200:
            time.sleep(0.001)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture
def producer(monkeypatch: pytest.MonkeyPatch) -> fakes.FakeProducer:
    return fakes.install(monkeypatch)


def sent_ids(producer: fakes.FakeProducer) -> set[str]:
    return {e.correlation_id for e in producer.events()}


def test_flush_under_steady_traffic_waits_for_what_was_emitted_before_it(
        producer: fakes.FakeProducer) -> None:
    emitter = Emitter(closed_port(), "t", settings=settings(shim_buffer_size=10**6))
    try:
        with Traffic(emitter) as traffic:
            for _ in range(3):
                before = traffic.emitted  # every event below this was emitted before flush
                started = time.monotonic()
                assert emitter.flush(timeout=5) is True
                assert time.monotonic() - started < 2.0
                assert {f"c{i}" for i in range(before)} <= sent_ids(producer)
            # and without a timeout it returns too (it used to wait for an empty buffer)
            done = threading.Event()
            waiter = threading.Thread(target=lambda: (emitter.flush(), done.set()),
                                      daemon=True)
            waiter.start()
            assert done.wait(5), "flush() without a timeout hung under steady traffic"
    finally:
        emitter.close(timeout=5)
    stats = emitter.stats()
    assert stats.sent + stats.dropped == traffic.emitted and stats.buffered == 0


def test_async_flush_under_steady_traffic(producer: fakes.FakeProducer) -> None:
    async def main() -> tuple[bool, float, set[str], int]:
        async with AsyncEmitter(closed_port(), "t",
                                settings=settings(shim_buffer_size=10**6)) as emitter:
            emitted = 0
            stop = asyncio.Event()

            async def traffic() -> None:
                nonlocal emitted
                while not stop.is_set():
                    emitter.emit(request(emitted))
                    emitted += 1
                    await asyncio.sleep(0)

            task = asyncio.create_task(traffic())
            await asyncio.sleep(0.2)
            before = emitted
            started = time.monotonic()
            ok = await emitter.flush(timeout=5)
            took = time.monotonic() - started
            missing = {f"c{i}" for i in range(before)} - sent_ids(producer)
            stop.set()
            await task
        return ok, took, missing, before

    ok, took, missing, before = asyncio.run(main())
    assert before > 0
    assert (ok, missing) == (True, set())
    assert took < 2.0


def test_flush_after_close_with_undelivered_events_is_false() -> None:
    emitter = Emitter(closed_port(), "t", settings=settings())
    emitter.emit(request(0))
    assert emitter.close(timeout=0.2) is False
    assert emitter.flush(timeout=1) is False


def test_flush_with_nothing_emitted_is_true_at_once(producer: fakes.FakeProducer) -> None:
    emitter = Emitter(closed_port(), "t", settings=settings())
    try:
        started = time.monotonic()
        assert emitter.flush(timeout=5) is True
        assert time.monotonic() - started < 1.0
    finally:
        emitter.close(timeout=1)


@pytest.fixture
def silent_broker() -> Iterator[str]:
    """A loopback port that accepts TCP connections (the kernel does, from the backlog) and
    never answers a request."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield f"127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.parametrize("wait_before_close", [0.0, 0.5])
def test_close_is_bounded_against_a_broker_that_never_answers(
        silent_broker: str, wait_before_close: float) -> None:
    emitter = Emitter(silent_broker, "t", settings=settings())
    for i in range(100):
        emitter.emit(request(i))
    time.sleep(wait_before_close)  # connecting, then waiting for metadata that never comes
    started = time.monotonic()
    assert emitter.close(timeout=1) is False
    took = time.monotonic() - started
    assert took < 1.6, f"close(timeout=1) took {took:.1f} s"
    assert not emitter._thread.is_alive()
    stats = emitter.stats()
    assert (stats.sent, stats.dropped, stats.failed, stats.invalid, stats.buffered) == (
        0, 100, 0, 0, 0)


def test_close_is_bounded_while_sends_wait_for_acknowledgements(
        monkeypatch: pytest.MonkeyPatch) -> None:
    producer = fakes.install(monkeypatch, fakes.FakeProducer(answer=False))
    emitter = Emitter(closed_port(), "t", settings=settings())
    for i in range(100):
        emitter.emit(request(i))
    assert emitter.flush(timeout=0.5) is False  # sent, never acknowledged
    started = time.monotonic()
    assert emitter.close(timeout=1) is False
    took = time.monotonic() - started
    assert took < 1.6, f"close(timeout=1) took {took:.1f} s"
    assert not emitter._thread.is_alive() and producer.stopped == 1
    stats = emitter.stats()
    assert (stats.sent, stats.dropped, stats.buffered) == (0, 100, 0)


def test_async_close_is_bounded_against_a_broker_that_never_answers(silent_broker: str) -> None:
    async def main() -> tuple[float, Any, bool]:
        emitter = AsyncEmitter(silent_broker, "t", settings=settings())
        await emitter.start()
        for i in range(100):
            emitter.emit(request(i))
        await asyncio.sleep(0.5)
        started = time.monotonic()
        result = await emitter.close(timeout=1)
        return time.monotonic() - started, emitter.stats(), result

    took, stats, result = asyncio.run(main())
    assert result is False
    assert took < 1.6, f"close(timeout=1) took {took:.1f} s"
    assert (stats.sent, stats.dropped, stats.buffered) == (0, 100, 0)


def _in_child(body: Callable[[], dict[str, Any]], timeout: float = 20.0) -> dict[str, Any]:
    """Fork; run ``body`` in the child and return what it returned (as JSON through a pipe).
    A child that hangs is killed and fails the test."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 0
        try:
            os.close(read_end)
            os.write(write_end, json.dumps(body()).encode())
        except BaseException:  # noqa: BLE001 - reported to the parent by the exit code
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read_end)
            pytest.fail(f"the forked child hung for {timeout} s")
        time.sleep(0.02)
    with os.fdopen(read_end, "rb") as f:
        out = f.read()
    assert os.waitstatus_to_exitcode(status) == 0, "the child failed"
    return dict(json.loads(out))


def test_fork_while_a_thread_holds_the_outbox_lock_does_not_deadlock_the_child() -> None:
    emitter = Emitter(closed_port(), "t", settings=settings())
    emitter.emit(request(0))
    held = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with emitter._outbox._lock:
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(5)
    threading.Timer(0.3, release.set).start()

    def child() -> dict[str, Any]:
        ok = [emitter.emit(request(i, "k")) for i in range(5)]
        before = emitter.stats()
        alive = emitter._thread is not None and emitter._thread.is_alive()
        closed = emitter.close(timeout=0.2)
        after = emitter.stats()
        return {"ok": ok, "alive": alive, "before": [before.buffered, before.dropped],
                "closed": closed, "after": [after.sent, after.dropped, after.buffered]}

    try:
        got = _in_child(child)
    finally:
        release.set()
        holder.join(5)
        emitter.close(timeout=0.2)
    # the child has its own sender and counts: its 5 events, not the parent's one
    assert got == {"ok": [True] * 5, "alive": True, "before": [5, 0], "closed": False,
                   "after": [0, 5, 0]}
    assert emitter.stats().dropped == 1  # the parent's own event, at the parent's close


def test_after_fork_the_child_sends_its_own_events_with_its_own_producer_id(
        monkeypatch: pytest.MonkeyPatch) -> None:
    producer = fakes.install(monkeypatch)
    emitter = Emitter(closed_port(), "t", settings=settings())
    try:
        emitter.emit(request(0, "p"))
        assert emitter.flush(timeout=5) is True
        parent_id = emitter._outbox.producer_id

        def child() -> dict[str, Any]:
            for i in range(3):
                emitter.emit(request(i, "k"))
            flushed = emitter.flush(timeout=5)
            stats = emitter.stats()
            return {"flushed": flushed, "sent": stats.sent, "ids": sorted(
                e.correlation_id for e in producer.events()),
                "producer": emitter._outbox.producer_id}

        got = _in_child(child)
    finally:
        emitter.close(timeout=1)
    assert got["flushed"] is True and got["sent"] == 3
    # the fake keeps what it was sent in the child's memory too: the parent's record, then
    # the child's three, never the parent's event sent again
    assert got["ids"] == ["k0", "k1", "k2", "p0"]
    assert got["producer"] != parent_id  # else the worker would skip its records as copies
    assert [e.correlation_id for e in producer.events()] == ["p0"]
    assert emitter.stats().sent == 1


def test_aiokafka_connection_errors_are_rate_limited_while_the_broker_is_away(
        caplog: pytest.LogCaptureFixture) -> None:
    """aiokafka logs 'Unable connect' at ERROR on every reconnection attempt (about five in
    two seconds with the sender's backoff); one line per kind per 10 s is enough."""
    from pipeline.shim import sender

    sender.reset_log_limits()
    caplog.set_level("WARNING")
    emitter = Emitter(closed_port(), "t", settings=settings())
    try:
        emitter.emit(request(0))
        time.sleep(2.5)
    finally:
        emitter.close(timeout=0.1)
    unable = [r for r in caplog.records
              if r.name == "aiokafka" and r.getMessage().startswith("Unable connect to")]
    assert len(unable) == 1
    assert sender.suppressed_log_lines() >= 2
