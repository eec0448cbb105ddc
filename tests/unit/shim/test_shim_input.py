"""The shim with unusual but valid input, and with input that is not an event at all.

Whatever a caller passes, ``emit()`` and the helpers return (True or False) and never
raise; what cannot be sent is counted (``invalid`` or ``dropped``) and logged, and the
sender keeps going for the events after it.
"""

from __future__ import annotations

import asyncio
import enum
import socket
import tracemalloc
from collections.abc import Iterator, Mapping
from http import HTTPStatus
from typing import Any

import orjson
import pytest

from pipeline import AsyncEmitter, Emitter, Settings
from pipeline.shim.outbox import Outbox
from pipeline.wire.decode import decode_record
from tests.unit.shim import fakes


class Service(enum.StrEnum):
    ORDERS = "orders"
    PAYMENTS = "payments"


def outbox(**overrides: Any) -> Outbox:
    options: dict[str, Any] = dict(topic="t", capacity=100, capacity_bytes=1_000_000,
                                   batch_events=100, batch_bytes=100_000, linger_s=0.01,
                                   producer_options={})
    options.update(overrides)
    return Outbox(**options)


def wire(**fields: Any) -> dict[str, Any]:
    return {"v": 1, "kind": "response", "source_service": "orders",
            "target_service": "payments", "protocol": "http", "ts": 1.7e9, "latency_ms": 5.0,
            **fields}


def test_int_and_str_subclasses_are_sent_as_plain_values() -> None:
    box = outbox()
    events = [wire(status_code=HTTPStatus.OK, correlation_id="c1"),
              wire(source_service=Service.ORDERS, target_service=Service.PAYMENTS,
                   correlation_id="c2")]
    decoded = [e for r in box.encode(events) for e in decode_record(r.value).events]
    assert box.stats().invalid == 0
    assert [(e.correlation_id, e.source_service, e.target_service, e.status_code)
            for e in decoded] == [("c1", "orders", "payments", 200),
                                  ("c2", "orders", "payments", None)]


def settings(**overrides: Any) -> Settings:
    return Settings.from_env({}, **overrides)


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


UNENCODABLE = [object(), {1: "int key"}, 2**70, "lone surrogate \ud800", [1, {2: 3}]]


def test_the_sender_survives_extra_fields_orjson_cannot_encode(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    producer = fakes.install(monkeypatch)
    emitter = Emitter(closed_port(), "t", settings=settings())
    try:
        results = []
        for i, extra in enumerate(UNENCODABLE):
            results.append(emitter.emit(wire(correlation_id=f"good{i}")))
            results.append(emitter.emit(wire(correlation_id=f"bad{i}", extra=extra)))
        assert emitter.flush(timeout=10) is True
        assert emitter._thread.is_alive()
        results.append(emitter.emit(wire(correlation_id="after")))
        assert emitter.flush(timeout=10) is True
    finally:
        emitter.close(timeout=5)
    assert results == [True, False] * len(UNENCODABLE) + [True]
    stats = emitter.stats()
    assert (stats.sent, stats.invalid, stats.dropped, stats.failed, stats.buffered) == (
        len(UNENCODABLE) + 1, len(UNENCODABLE), 0, 0, 0)
    assert sorted(e.correlation_id for e in producer.events()) == sorted(
        [f"good{i}" for i in range(len(UNENCODABLE))] + ["after"])
    assert "sender stopped unexpectedly" not in caplog.text
    assert "cannot be encoded as JSON" in caplog.text


def test_async_emitter_sends_the_good_events_of_a_round_and_close_does_not_raise(
        monkeypatch: pytest.MonkeyPatch) -> None:
    producer = fakes.install(monkeypatch)

    async def main() -> Any:
        async with AsyncEmitter(closed_port(), "t", settings=settings()) as emitter:
            for i, extra in enumerate(UNENCODABLE):
                emitter.emit(wire(correlation_id=f"good{i}"))
                emitter.emit(wire(correlation_id=f"bad{i}", extra=extra))
            assert await emitter.flush(timeout=10) is True
        return emitter.stats()

    stats = asyncio.run(main())
    assert (stats.sent, stats.invalid, stats.dropped, stats.buffered) == (
        len(UNENCODABLE), len(UNENCODABLE), 0, 0)
    assert sorted(e.correlation_id for e in producer.events()) == [
        f"good{i}" for i in range(len(UNENCODABLE))]


def test_an_event_the_sender_cannot_encode_is_counted_not_fatal(
        caplog: pytest.LogCaptureFixture) -> None:
    """The caller may change a nested value after emit(): the sender's own encoding of each
    event is guarded too, and the other events of the round are still sent."""
    box = outbox()
    nested: list[Any] = []
    assert box.put(wire(correlation_id="good")) is True
    assert box.put(wire(correlation_id="changed", extra=nested)) is True
    nested.append(object())  # after emit: no longer JSON
    records = box.encode(*box.take())
    assert [e.correlation_id for r in records for e in decode_record(r.value).events] == [
        "good"]
    assert (box.stats().invalid, box.stats().buffered) == (1, 1)
    assert "cannot be encoded as JSON" in caplog.text


@pytest.mark.parametrize("value", [None, "x", 42, b"{}", [("v", 1)], 1.5, object()])
def test_emit_of_something_that_is_not_an_event_returns_false_and_counts_it(
        value: Any, caplog: pytest.LogCaptureFixture) -> None:
    emitter = Emitter(closed_port(), "t", settings=settings())
    try:
        assert emitter.emit(value) is False
        stats = emitter.stats()
        assert (stats.invalid, stats.buffered, stats.dropped) == (1, 0, 0)
    finally:
        emitter.close(timeout=0.1)
    assert f"emit() takes a mapping or an Event, got {type(value).__name__}" in caplog.text


def test_emit_of_a_mapping_that_cannot_be_read_returns_false() -> None:
    class Broken(Mapping[str, Any]):
        def __getitem__(self, key: str) -> Any:
            raise KeyError(key)

        def __iter__(self) -> Iterator[str]:
            raise RuntimeError("cannot iterate")

        def __len__(self) -> int:
            return 1

    async def main() -> Any:
        emitter = AsyncEmitter(closed_port(), "t", settings=settings())
        assert emitter.emit(Broken()) is False
        assert emitter.emit(None) is False  # type: ignore[arg-type]
        stats = emitter.stats()
        await emitter.close(timeout=0.1)
        return stats

    stats = asyncio.run(main())
    assert (stats.invalid, stats.buffered) == (2, 0)


def test_an_unexpected_error_in_a_round_is_counted_and_the_sender_goes_on(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    producer = fakes.install(monkeypatch)
    real_pack = Outbox._pack
    calls: list[int] = []

    def pack_failing_once(self: Outbox, *args: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug in the sender")
        real_pack(self, *args)

    monkeypatch.setattr(Outbox, "_pack", pack_failing_once)
    emitter = Emitter(closed_port(), "t", settings=settings())
    try:
        assert emitter.emit(wire(correlation_id="lost")) is True
        assert emitter.flush(timeout=10) is True
        assert emitter.emit(wire(correlation_id="sent")) is True
        assert emitter.flush(timeout=10) is True
        assert emitter._thread.is_alive()
    finally:
        emitter.close(timeout=5)
    stats = emitter.stats()
    assert (stats.sent, stats.failed, stats.invalid, stats.dropped) == (1, 1, 0, 0)
    assert [e.correlation_id for e in producer.events()] == ["sent"]
    assert "unexpected error in the sender (RuntimeError: a bug in the sender)" in caplog.text


def test_the_buffer_bound_counts_bytes_as_well_as_events() -> None:
    event = wire(kind="request", method="m" * 150, correlation_id="c")
    del event["latency_ms"]
    size = len(orjson.dumps(event))  # what one such event weighs: its JSON as emitted
    bound = 10_000
    emitter = Emitter(closed_port(), "t", settings=settings(shim_buffer_size=1_000,
                                                            shim_buffer_bytes=bound))
    try:
        results = [emitter.emit(event) for _ in range(100)]
        stats = emitter.stats()
    finally:
        emitter.close(timeout=0.1)
    fits = bound // size
    assert results == [True] * fits + [False] * (100 - fits)
    assert (stats.buffered, stats.buffered_bytes, stats.dropped) == (
        fits, fits * size, 100 - fits)


def test_error_messages_are_cut_when_emitted_so_a_full_buffer_stays_small() -> None:
    """2,000 errors with 100 KB messages while the broker is away: each message is masked
    and cut to 1,024 characters at emit(), not when it is sent."""
    message = "connection refused by payments " * 3_300  # ~100 KB, with spaces
    emitter = Emitter(closed_port(), "t", settings=settings(shim_buffer_size=10_000))
    try:
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(2_000):  # a new text each time, as str(exc) would be
            emitter.error(source_service="orders", target_service="payments",
                          error_type="connection", error_message=f"{i}: {message}")
        grown = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        stats = emitter.stats()
    finally:
        emitter.close(timeout=0.1)
    assert stats.buffered == 2_000
    # without the cut: 2,000 x 100 KB = 200 MB; with it, ~1.2 KB of JSON per event
    assert grown < 12 * 1024 * 1024
    assert stats.buffered_bytes <= 2_000 * 1_300
