"""The OTLP bridge: spans from the Collector's Kafka exporter in, commpipe events out.

With ``COMMPIPE_OTLP_TOPIC`` set, each worker also runs this bridge (a task of the Faust
app, with its own aiokafka consumer in the group ``<app id>-otlp`` and its own producer).
It reads the OTLP topic, turns each record's calls into events
(:func:`pipeline.wire.otlp.decode_otlp`) and publishes them to ``COMMPIPE_TOPIC`` as the
shim does: one record per edge, keyed by the edge, a JSON array of at most
``COMMPIPE_SHIM_BATCH_EVENTS`` events and ``COMMPIPE_SHIM_BATCH_BYTES``. The worker's own
agent then applies them like any shim record; the worker's state stays keyed by the
partitions of one input topic.

**Exactly once, from at-least-once pieces.** Every published record carries the shim's
producer headers, derived from where it came from, so that a replay publishes the same
numbers: ``commpipe-producer`` = ``otlp:<topic>:<partition>`` (``...:<lane>`` for the
second and later records of one edge from one OTLP record) and ``commpipe-seq`` = the OTLP
record's offset + 1. The worker applies each number of a producer and edge once
(:mod:`pipeline.core.dedup`): increasing, sparse numbers are new, a copy is skipped, and
a number below the highest is still taken while it is one of the last
:data:`~pipeline.core.dedup.MAX_GAPS` not seen. Its Kafka timestamp is the OTLP record's,
so the worker's horizons decide a replay as they decided the first run.

The bridge works in rounds: a round takes at most :data:`ROUND_OFFSETS` consecutive offsets
per partition, publishes what they hold (events and dead letters), waits until every send
is delivered, and only then commits the offsets after them. The next round starts after
that. So when a send fails, whatever landed of the round lies within the last
``MAX_GAPS`` numbers, and the replay from the last commit (a fresh consumer and producer,
after a backoff) fills exactly the holes; the copies are skipped. A record that is not
OTLP and each span that cannot be a call go to the dead-letter topic with their reason
(:mod:`agents.dead_letters`; ``commpipe-dlq-id`` = ``<otlp topic>/<partition>/<offset>``
and ``/<span index>``), counted in ``commpipe_otlp_dead_letters_total``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import orjson
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from agents.dead_letters import DeadLetters, ProducerTopic
from pipeline.core.dedup import MAX_GAPS
from pipeline.errors import EventValidationError
from pipeline.settings import Settings
from pipeline.wire.events import Event
from pipeline.wire.headers import PRODUCER_HEADER, SEQ_HEADER
from pipeline.wire.otlp import decode_otlp

__all__ = ["ROUND_OFFSETS", "OtlpBridge", "Publication", "publications", "rounds"]

log = logging.getLogger("commpipe.otlp")

ROUND_OFFSETS = MAX_GAPS
"""Most consecutive offsets of one partition in a round: what can land out of order within
a round stays within the numbers the worker's dedup still takes (see the docstring)."""
FETCH_RECORDS = 1_000
"""Most records one fetch hands the bridge."""
BACKOFF_MAX_S = 30.0


class Publication(NamedTuple):
    """One record for the events topic."""

    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]
    events: int


def publications(topic: str, partition: int, offset: int, calls: Sequence[tuple[Event, Event]],
                 *, max_events: int, max_bytes: int) -> list[Publication]:
    """The records for one OTLP record's calls: one per edge (in the order the edges first
    appear), split into lanes when an edge's events exceed ``max_events`` / ``max_bytes``.
    The same calls give the same records, headers included."""
    by_edge: dict[str, list[bytes]] = {}
    for request, outcome in calls:
        parts = by_edge.setdefault(request.edge, [])
        parts.append(orjson.dumps(request.to_wire()))
        parts.append(orjson.dumps(outcome.to_wire()))
    seq = str(offset + 1).encode()
    out: list[Publication] = []
    for edge, parts in by_edge.items():
        key = edge.encode()
        lane, chunk, size = 0, [], 2
        for part in [*parts, None]:
            if part is None or (chunk and (len(chunk) >= max_events
                                           or size + len(part) + 1 > max_bytes)):
                producer = f"otlp:{topic}:{partition}" + (f":{lane}" if lane else "")
                out.append(Publication(key, b"[" + b",".join(chunk) + b"]",
                                       [(PRODUCER_HEADER, producer.encode()), (SEQ_HEADER, seq)],
                                       len(chunk)))
                lane, chunk, size = lane + 1, [], 2
            if part is not None:
                chunk.append(part)
                size += len(part) + 1
    return out


def rounds(batch: dict[Any, list[Any]]) -> Iterator[dict[Any, list[Any]]]:
    """``batch`` (records per partition, in offset order) in rounds of at most
    :data:`ROUND_OFFSETS` consecutive offsets per partition."""
    rest = {tp: list(records) for tp, records in batch.items() if records}
    while rest:
        this: dict[Any, list[Any]] = {}
        for tp, records in list(rest.items()):
            first = records[0].offset
            n = next((i for i, r in enumerate(records) if r.offset - first >= ROUND_OFFSETS),
                     len(records))
            this[tp] = records[:n]
            if n < len(records):
                rest[tp] = records[n:]
            else:
                del rest[tp]
        yield this


class OtlpBridge:
    """Reads ``settings.otlp_topic``, publishes to ``settings.topic`` (module docstring)."""

    def __init__(self, settings: Settings, *, consumer_factory: Any = None,
                 producer_factory: Any = None) -> None:
        self.settings = settings
        self.group = f"{settings.app_id}-otlp"
        self._consumer_factory = consumer_factory or self._consumer
        self._producer_factory = producer_factory or self._producer
        self.records = 0
        self.spans: Counter[str] = Counter()
        """Spans read, by what became of them: ``call``, ``dead_letter``, or why they make
        no edge (``server``, ``internal``, ``consumer``, ``unspecified``, ``no_peer``)."""
        self.events = 0
        self.published = 0
        self.rounds = 0
        self.failures = 0
        self.dead_letter_counts: Counter[str] = Counter()
        self.lag: dict[int, int] = {}

    def _consumer(self) -> Any:
        from aiokafka import AIOKafkaConsumer

        s = self.settings
        return AIOKafkaConsumer(
            s.otlp_topic, group_id=self.group, enable_auto_commit=False,
            auto_offset_reset=s.otlp_auto_offset_reset,
            session_timeout_ms=int(s.broker_session_timeout_s * 1000),
            heartbeat_interval_ms=int(s.broker_heartbeat_interval_s * 1000),
            fetch_max_wait_ms=s.worker_fetch_wait_ms, max_partition_fetch_bytes=4 * 1024 * 1024,
            **s.kafka_client_options())

    def _producer(self) -> Any:
        from aiokafka import AIOKafkaProducer

        # batches of up to 512 KiB: one OTLP record becomes a record per edge, and with
        # aiokafka's 16 KiB default each partition's small records wait for a round trip
        # per 16 KiB (on the embedded broker 250 OTLP records of 200 spans bridged in 20 s
        # instead of 36)
        return AIOKafkaProducer(acks="all", linger_ms=5, max_request_size=2 * 1024 * 1024,
                                max_batch_size=512 * 1024,
                                **self.settings.kafka_client_options())

    async def run(self) -> None:
        """Bridge until cancelled; after a failure, again from the last commit (backoff)."""
        log.info("otlp bridge: %s -> %s (group %s)", self.settings.otlp_topic,
                 self.settings.topic, self.group)
        backoff = 0.5
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Kafka errors, any failed send
                self.failures += 1
                log.error("otlp bridge: %s: %s; reading again from the last commit in %.1f s",
                          type(exc).__name__, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
            else:
                return

    async def _session(self) -> None:
        from aiokafka.errors import CommitFailedError, IllegalStateError

        consumer, producer = self._consumer_factory(), self._producer_factory()
        await producer.start()
        try:
            await consumer.start()
            letters = DeadLetters(ProducerTopic(producer, self.settings.dlq_topic))
            letters.counts = self.dead_letter_counts  # counted across sessions
            while True:
                batch = await consumer.getmany(timeout_ms=1000, max_records=FETCH_RECORDS)
                for this in rounds(batch):
                    try:
                        await self._round(consumer, producer, letters, this)
                    except (CommitFailedError, IllegalStateError) as e:
                        # a rebalance took (some of) these partitions: their next owner reads
                        # them again from the last commit; this consumer is repositioned too
                        log.info("otlp bridge: commit refused (%s); the partitions' next "
                                 "owner reads them again", e)
                        break
        finally:
            try:
                await consumer.stop()
            finally:
                await producer.stop()

    async def _round(self, consumer: Any, producer: Any, letters: DeadLetters,
                     batch: dict[Any, list[Any]]) -> None:
        """Publish one round, wait for every delivery, then commit the offsets after it."""
        deliveries: list[Any] = []
        events = 0
        for records in batch.values():
            for message in records:
                for publication in await self._decode(message, letters):
                    deliveries.append(await producer.send(
                        self.settings.topic, value=publication.value, key=publication.key,
                        headers=publication.headers,
                        timestamp_ms=message.timestamp if (message.timestamp or 0) > 0
                        else None))
                    events += publication.events
                await asyncio.sleep(0)  # a large record decodes for a while: let others run
        pending = letters.take_pending()
        await asyncio.gather(*deliveries)  # the first failure fails the round: nothing commits
        await letters.settle(pending)
        assigned = consumer.assignment()
        ends = {tp: records[-1].offset + 1 for tp, records in batch.items() if tp in assigned}
        if ends:
            await consumer.commit(ends)
        self.rounds += 1
        self.published += len(deliveries)
        self.events += events
        for tp, end in ends.items():
            high = consumer.highwater(tp)
            if high is not None:
                self.lag[tp.partition] = max(high - end, 0)

    async def _decode(self, message: Any, letters: DeadLetters) -> list[Publication]:
        self.records += 1
        s = self.settings
        stamped = message.timestamp / 1000.0 if (message.timestamp or 0) > 0 else None
        try:
            record = decode_otlp(message.value, not_after=None if stamped is None
                                 else stamped + s.max_future_s)
        except EventValidationError as e:
            await letters.send(message, message.value, e.reason, field=e.field)
            return []
        for error in record.errors:
            await letters.send(message, error.original, error.reason, field=error.field,
                               index=error.index)
        self.spans.update(record.skipped)
        self.spans["call"] += len(record.calls)
        self.spans["dead_letter"] += len(record.errors)
        return publications(message.topic, message.partition, message.offset, record.calls,
                            max_events=s.shim_batch_events, max_bytes=s.shim_batch_bytes)

    def collector(self) -> Any:
        """A Prometheus collector of the bridge's own counts."""
        return _Collector(self, self.settings.metrics_namespace)


class _Collector:
    def __init__(self, bridge: OtlpBridge, namespace: str) -> None:
        self.bridge = bridge
        self.ns = namespace

    def collect(self) -> Iterator[Any]:
        b, ns = self.bridge, f"{self.ns}_otlp"
        yield CounterMetricFamily(f"{ns}_records_total", "OTLP records read (again after a "
                                  "replay)", value=b.records)
        spans = CounterMetricFamily(f"{ns}_spans_total", "Spans read, by what became of them",
                                    labels=["result"])
        for result, n in sorted(b.spans.items()):
            spans.add_metric([result], n)
        yield spans
        yield CounterMetricFamily(f"{ns}_events_published_total", "Events published to the "
                                  "events topic (delivered)", value=b.events)
        dead = CounterMetricFamily(f"{ns}_dead_letters_total", "OTLP records and spans sent "
                                   "to the dead-letter topic", labels=["reason"])
        for reason, n in sorted(b.dead_letter_counts.items()):
            dead.add_metric([reason], n)
        yield dead
        yield CounterMetricFamily(f"{ns}_round_failures_total", "Rounds that failed and were "
                                  "read again from the last commit", value=b.failures)
        lag = GaugeMetricFamily(f"{ns}_consumer_lag", "OTLP records behind the partition's "
                                "end", labels=["partition"])
        for partition, behind in sorted(b.lag.items()):
            lag.add_metric([str(partition)], behind)
        yield lag
