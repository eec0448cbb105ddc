"""The worker's own Kafka producer: its changelog in bulk, and its dead letters.

:meth:`WorkerProducer.write` hands one partition's changelog records to aiokafka as whole
batches (``create_batch`` / ``send_batch``): one produce per partition per write-out, of at
most ``batch_bytes`` each, instead of one ``send`` per key through Faust's producer and
its buffer. aiokafka sends one batch per partition at a time (a partition is muted while
its batch is in flight), so a partition's batches land in the order they were written:
the partition meta, written last, lands after the values it covers. ``acks=all``.

``last_alone`` is for brokers that report a partition's end offset as its last batch's
*first* offset + 1 (the embedded Tansu broker): each write's last record then travels in
a batch of its own, so that the end offset Faust's recovery reads up to is right.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["Record", "WorkerProducer"]

Record = tuple[bytes, bytes | None]
"""A changelog record: ``(key, value)``; ``None`` is a tombstone."""


class WorkerProducer:
    """One aiokafka producer for the changelog (:meth:`write`) and dead letters (:meth:`send`).

    ``client_options``: aiokafka client keyword arguments (``Settings.kafka_client_options``).
    """

    def __init__(self, client_options: Mapping[str, Any], *, batch_bytes: int,
                 last_alone: bool = False) -> None:
        self._options = dict(client_options)
        self.batch_bytes = batch_bytes
        self.last_alone = last_alone
        self._producer: Any = None
        self._order = asyncio.Lock()
        self._starting = asyncio.Lock()
        self._stopped = False
        self.batches = 0
        """Changelog batches handed to aiokafka."""
        self.records = 0
        """Changelog records in them."""

    async def start(self) -> None:
        """Start the producer (once; later calls wait for the first)."""
        from aiokafka import AIOKafkaProducer

        async with self._starting:
            if self._producer is not None or self._stopped:
                return
            producer = AIOKafkaProducer(
                acks="all", linger_ms=0, max_batch_size=self.batch_bytes,
                max_request_size=max(self.batch_bytes, 1 << 20) + (64 << 10), **self._options)
            await producer.start()
            self._producer = producer

    async def stop(self) -> None:
        """Flush and stop; the producer does not start again."""
        self._stopped = True
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    @property
    def started(self) -> bool:
        return self._producer is not None

    async def write(self, topic: str, partition: int, records: Sequence[Record]
                    ) -> list[asyncio.Future[Any]]:
        """Queue ``records`` for ``topic``'s ``partition`` in that order, in as few batches as
        fit; returns one delivery future per batch. Writes run one after the other (a later
        write's batches follow an earlier one's)."""
        producer = self._producer
        if producer is None:
            raise RuntimeError("WorkerProducer.start() first")
        futures: list[asyncio.Future[Any]] = []
        if not records:
            return futures
        async with self._order:
            body = records[:-1] if self.last_alone else records
            batch = producer.create_batch()
            n = 0
            for key, value in body:
                if batch.append(key=key, value=value, timestamp=None) is None:
                    futures.append(await producer.send_batch(batch, topic, partition=partition))
                    self.batches += 1
                    batch = producer.create_batch()
                    batch.append(key=key, value=value, timestamp=None)  # a first one always fits
                n += 1
            if n:
                futures.append(await producer.send_batch(batch, topic, partition=partition))
                self.batches += 1
            if self.last_alone:
                last = producer.create_batch()
                key, value = records[-1]
                last.append(key=key, value=value, timestamp=None)
                futures.append(await producer.send_batch(last, topic, partition=partition))
                self.batches += 1
            self.records += len(records)
        return futures

    async def send(self, topic: str, *, key: bytes | None, value: bytes,
                   headers: list[tuple[str, bytes]]) -> asyncio.Future[Any]:
        """Queue one record (partitioned by its key); returns its delivery future."""
        if self._producer is None:
            raise RuntimeError("WorkerProducer.start() first")
        return await self._producer.send(topic, value=value, key=key, headers=headers)
