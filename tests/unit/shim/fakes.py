"""A stand-in for aiokafka's producer, so the sender's loop runs without a broker.

``install(monkeypatch)`` makes every :class:`~pipeline.shim.sender.Sender` of the test
"connect" to one :class:`FakeProducer`, which keeps what it is sent and acknowledges it at
once (or never, with ``answer=False``: a broker that takes requests and does not reply).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pipeline.shim.sender import Sender
from pipeline.wire.decode import decode_record
from pipeline.wire.events import Event


class FakeProducer:
    def __init__(self, *, answer: bool = True) -> None:
        self.answer = answer
        self.records: list[tuple[str, bytes, bytes]] = []  # (topic, key, value)
        self.started = self.stopped = 0

    async def start(self) -> None:
        self.started += 1

    async def stop(self) -> None:
        self.stopped += 1

    async def send(self, topic: str, value: bytes, *, key: bytes,
                   headers: list[tuple[str, bytes]]) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.answer:
            self.records.append((topic, key, value))
            future.set_result(None)
        return future

    def events(self) -> list[Event]:
        return [e for _, _, value in self.records for e in decode_record(value).events]


def install(monkeypatch: pytest.MonkeyPatch, producer: FakeProducer | None = None
            ) -> FakeProducer:
    producer = producer or FakeProducer()

    async def start(self: Sender) -> Any:
        await producer.start()
        return producer

    monkeypatch.setattr(Sender, "_start_producer", start)
    return producer
