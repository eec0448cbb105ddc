"""Dead letters: what the worker refuses goes to ``comm.events.dlq`` with its reason.

The DLQ record's value is the original bytes (the whole record when the record
itself is unusable; the offending event's JSON when one event of a batch is
bad), its key the original key, and its headers say why and where from:
``commpipe-reason``, ``commpipe-field``, ``commpipe-index`` and
``commpipe-source`` (``topic/partition/offset``). Counts per reason category
are kept for the exporter.

A value larger than :data:`MAX_VALUE_BYTES` (an oversized record: the reason it
is here) keeps only its first bytes, with ``commpipe-truncated`` giving the
original size: the worker's own producer could not send it whole, and a dead
letter must never stop the worker. A dead letter the broker refuses for good
is logged and counted under ``unsendable``.

A record's offset is committed only once its dead letters are delivered (each commit
first awaits :meth:`DeadLetters.settle` on what :meth:`DeadLetters.take_pending`
returned since the last: agents/checkpoint.py), so none is lost to a crash. A record
read again after a crash, past what its partition had applied, sends its dead letters
again: ``commpipe-dlq-id``
(``topic/partition/offset`` of the source record, ``/index`` for one event of a
batch) is the same on every copy, so a consumer can drop the copies.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any

import orjson
from aiokafka.errors import KafkaError

from pipeline.errors import EventValidationError
from pipeline.wire.events import Event

__all__ = ["DeadLetters", "ProducerTopic"]

log = logging.getLogger("commpipe.worker")

MAX_VALUE_BYTES = 64 * 1024
"""Most bytes of the original kept in one dead letter."""


class ProducerTopic:
    """A topic to send to through ``producer`` (aiokafka's, or :class:`~agents.producer.
    WorkerProducer`): what :class:`DeadLetters` sends with."""

    def __init__(self, producer: Any, name: str) -> None:
        self._producer = producer
        self.name = name

    async def send(self, *, key: bytes | None, value: bytes, headers: list[Any]) -> Any:
        return await self._producer.send(self.name, value=value, key=key, headers=headers)


class DeadLetters:
    """Sends refused records and events to the dead-letter topic, and counts them."""

    def __init__(self, topic: Any) -> None:
        self._topic = topic
        self.counts: Counter[str] = Counter()
        """Dead letters per category: ``record`` (whole record) or the field at fault."""
        self._pending: list[tuple[str, Any]] = []  # (dead-letter id, delivery future)

    async def send(self, message: Any, original: bytes | None, reason: str, *,
                   field: str | None = None, index: int | None = None) -> None:
        category = field or "record"
        self.counts[category] += 1
        source = f"{message.topic}/{message.partition}/{message.offset}"
        dlq_id = source if index is None else f"{source}/{index}"
        headers = [("commpipe-reason", reason.encode()), ("commpipe-source", source.encode()),
                   ("commpipe-dlq-id", dlq_id.encode())]
        if field is not None:
            headers.append(("commpipe-field", field.encode()))
        if index is not None:
            headers.append(("commpipe-index", str(index).encode()))
        value = original or b""
        if len(value) > MAX_VALUE_BYTES:
            headers.append(("commpipe-truncated", str(len(value)).encode()))
            value = value[:MAX_VALUE_BYTES]
        try:
            delivery = await self._topic.send(key=message.key, value=value, headers=headers)
        except KafkaError as e:
            self._unsendable(dlq_id, e)
        else:
            self._pending.append((dlq_id, delivery))
        if sum(self.counts.values()) % 1000 == 1:
            log.warning("dead letter (%s): %s", category, reason)

    def take_pending(self) -> list[tuple[str, Any]]:
        """The dead letters sent since the last call, as ``(id, delivery future)``."""
        pending, self._pending = self._pending, []
        return pending

    async def settle(self, pending: list[tuple[str, Any]]) -> None:
        """Wait until ``pending`` is delivered; count and log what the broker refused."""
        if not pending:
            return
        results = await asyncio.gather(*(f for _, f in pending), return_exceptions=True)
        for (dlq_id, _), result in zip(pending, results, strict=True):
            if isinstance(result, asyncio.CancelledError):
                raise result
            if isinstance(result, BaseException):
                self._unsendable(dlq_id, result)

    def _unsendable(self, dlq_id: str, exc: BaseException) -> None:
        self.counts["unsendable"] += 1
        log.error("dead letter %s could not be sent: %s: %s", dlq_id, type(exc).__name__, exc)

    async def send_events(self, message: Any, errors: list[EventValidationError]) -> None:
        """The bad events of one batch record, each re-encoded from the record (parsed once)."""
        try:
            elements = orjson.loads(message.value)
        except orjson.JSONDecodeError:  # cannot happen after decode_record; keep the bytes
            elements = None
        for error in errors:
            if isinstance(elements, list) and error.index is not None:
                original = orjson.dumps(elements[error.index])
            else:
                original = message.value
            await self.send(message, original, error.reason, field=error.field,
                            index=error.index)

    async def send_refused(self, message: Any, event: Event, reason: str) -> None:
        """A valid event the worker refuses (e.g. stamped far in the future)."""
        await self.send(message, orjson.dumps(event.to_wire()), reason, field="ts")
