"""The Faust app: wires :mod:`pipeline.core` into a stream job with a changelogged table.

Run with ``commpipe worker`` (creates the topics first) or
``faust -A agents.app worker -l info`` (topics must exist). Settings come from
``COMMPIPE_*`` (see :class:`pipeline.settings.Settings`).

One agent reads ``comm.events`` in batches (``take_events``): each record is
decoded (one event or a batch of one edge's events), bad records and bad events
go to ``comm.events.dlq`` with their reason, and the good events are applied
per source partition by :class:`pipeline.core.batch.PartitionBatch`. The
worker writes its table and changelog itself (the record cache): state always
lives in the changelog partition of the partition its records came from,
whatever partitioner their producer used.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import faust
from faust.serializers import codecs

from agents.acks import Acks, gate_acks
from agents.cache import RecordCache
from agents.consumer import (
    ReadyPartitions,
    check_recovered,
    consumer_lag,
    fetch_mark,
    input_positions,
    patch_consumers,
    positions_readable,
    scheduler,
    set_fetch_wait,
)
from agents.dead_letters import DeadLetters
from agents.expiry import EdgeExpiry, drop_unowned, expiry_interval
from agents.sequence import InputSequence, blind_read_offsets, count_absent, follow_seeks
from pipeline.core.batch import PartitionBatch
from pipeline.core.rollups import Rollups
from pipeline.core.slo import load_config
from pipeline.core.store import decode_state, encode_state, parse_id
from pipeline.core.window import WindowConfig
from pipeline.errors import EventValidationError
from pipeline.settings import MAX_UNWRITTEN_RECORDS, Settings
from pipeline.sink.writer import Sink, build_sink
from pipeline.wire.decode import decode_record
from pipeline.wire.headers import producer_of

__all__ = ["Pipeline", "create_app"]

log = logging.getLogger("commpipe.worker")


class _StateCodec(codecs.Codec):
    def _dumps(self, obj: Any) -> bytes:
        return encode_state(obj)

    def _loads(self, s: bytes) -> Any:
        return decode_state(s)


class _KeyCodec(codecs.Codec):
    def _dumps(self, obj: Any) -> bytes:
        return obj.encode() if isinstance(obj, str) else bytes(obj)

    def _loads(self, s: bytes) -> Any:
        return s.decode()


codecs.register("commpipe_state", _StateCodec())
codecs.register("commpipe_key", _KeyCodec())


class _App(faust.App):
    """Faust's app, with two hooks: ``setup_consumer`` (the worker's aiokafka consumer,
    before it starts) and ``ready`` (no record reaches a stream during an assignment until
    the table is recovered: agents/consumer.py)."""

    setup_consumer: Callable[[Any], None] | None = None
    ready: ReadyPartitions | None = None
    giving_up: Callable[[], Awaitable[None]] | None = None
    """Awaited when the worker starts giving its partitions up (a rebalance, a stop)."""

    async def _on_partitions_assigned(self, assigned: Any, generation_id: int = 0) -> None:
        if self.ready is not None:
            self.ready.assigning(self.consumer)
        await super()._on_partitions_assigned(assigned, generation_id)

    async def _on_partitions_revoked(self, revoked: Any) -> None:
        if self.giving_up is not None:
            await self.giving_up()
        await super()._on_partitions_revoked(revoked)

    async def on_stop(self) -> None:
        if self.giving_up is not None:
            await self.giving_up()
        await super().on_stop()


class Pipeline:
    """The app and the objects around it that the sink and the exporter read."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.config = WindowConfig.from_settings(settings)
        Path(settings.worker_datadir).mkdir(parents=True, exist_ok=True)
        patch_consumers()
        self.app = _App(
            settings.app_id,
            broker=[f"kafka://{h.strip()}" for h in settings.kafka_bootstrap.split(",")],
            broker_credentials=_credentials(settings),
            store="memory://",
            topic_partitions=settings.partitions,
            datadir=settings.worker_datadir,
            web_enabled=False,  # its pages would show table contents: MetricsServer instead
            broker_session_timeout=settings.broker_session_timeout_s,
            broker_heartbeat_interval=settings.broker_heartbeat_interval_s,
            consumer_auto_offset_reset="earliest",
            topic_allow_declare=True,
            table_cleanup_interval=3600.0,
            producer_max_batch_size=settings.worker_producer_batch_bytes,
            producer_acks=-1,  # all in-sync replicas: the changelog and dead letters
            ConsumerScheduler=scheduler(),  # no record fetched before a seek (consumer.py)
        )
        self.app.setup_consumer = self._setup_consumer
        self.ready = self.app.ready = ReadyPartitions(settings.topic)
        self.acks = Acks(lambda: self.app.consumer, self._stop)
        self.sequence = InputSequence(  # in offset order, each once (sequence.py)
            committed=lambda tp: self.app.consumer._committed_offset.get(tp),  # noqa: SLF001
            mark=lambda tp: fetch_mark(self.kafka_consumer._subscription, tp),  # noqa: SLF001
            seek=lambda tp, offset: self.app.consumer.seek_wait({tp: offset}),
            absent=lambda tp, start, end: count_absent(self.app.consumer, tp, start, end))
        self.app.giving_up = self._giving_up
        self.events = self.app.topic(settings.topic, key_type=bytes, value_type=bytes,
                                     key_serializer="raw", value_serializer="raw",
                                     partitions=settings.partitions)
        self.dlq = self.app.topic(settings.dlq_topic, key_serializer="raw",
                                  value_serializer="raw", partitions=settings.partitions)
        # Our own changelog topic, with our codecs and the input's partition count (Faust
        # requires them equal). ``acks=True`` is Faust's consumer-side acknowledgement of a
        # topic's records, not the producer's; producer acks are ``producer_acks`` above.
        self._changelog = f"{settings.app_id}-state-changelog"
        changelog = self.app.topic(
            self._changelog, partitions=settings.partitions,
            key_serializer="commpipe_key", value_serializer="commpipe_state",
            compacting=True, deleting=False, acks=True, internal=True)
        self.state = self.app.Table("state", default=None, partitions=settings.partitions,
                                    changelog_topic=changelog)
        # Faust takes a table's serializers from a Record type's options, else JSON; our
        # values are plain classes with their own codec. The worker writes the table's data
        # and its changelog itself (_put, _send): the changelog partition is the source
        # partition's, and each write's delivery decides when its records are acknowledged.
        self.state.key_serializer = "commpipe_key"
        self.state.value_serializer = "commpipe_state"
        self.state.on_recover(self._recovered)
        self.app.on_partitions_revoked.connect(self._revoked)
        self.rollups = Rollups(self.state, self.config, idle_close_s=settings.idle_close_s,
                               owned=self.owns)
        self.dead_letters = DeadLetters(self.dlq)
        self.cache = RecordCache(
            self.config, self.state, interval_s=settings.worker_cache_interval_s,
            max_records=MAX_UNWRITTEN_RECORDS - settings.worker_batch_records,
            put=self._put, send=self._send, settle=self.dead_letters.settle,
            release=self._release)
        if settings.worker_cache_interval_s > 0:
            self.app.timer(settings.worker_cache_interval_s / 2,
                           name="write_out")(self._write_out_due)
        self.expiry = EdgeExpiry(  # silent edges leave the table (agents/expiry.py)
            silent_s=settings.edge_expire_s, items=self.rollups.owned_items,
            touched=self.cache.touched_edges, delete=self.delete,
            removable=lambda key, window: self.sink is not None and self.sink.removable(
                key, window), busy=lambda: bool(self.app.in_recovery or self.app.rebalancing))
        self.app.timer(self.sequence.quiet_s / 2, name="unstall")(self._unstall)
        if settings.edge_expire_s > 0:
            self.app.timer(expiry_interval(settings.edge_expire_s), name="expire")(
                self.expiry.run_once)
        self.events_in = 0
        self.duplicates = 0
        self.batches = 0
        self.batch_records = 0
        self.input_paused = False
        self.kafka_consumer: Any = None
        """The worker's aiokafka consumer (set before it starts; paused by _hold_input)."""
        self.app.agent(self.events, name="aggregate")(self._aggregate)
        self.slo = load_config(settings.slo_file)
        self.sink: Sink | None = build_sink(settings, self.rollups, self.slo)
        if self.sink is not None:
            self.app.timer(settings.sink_interval_s, name="sink")(self._flush)
            self.app.on_before_shutdown.connect(self._close_sink)
        from pipeline.export.exposition import worker_exposition

        self.exposition = worker_exposition(self, settings, self.rollups, self.slo, self.sink)
        self.metrics_server: Any = None
        if settings.otlp_topic:  # OpenTelemetry spans in, published to settings.topic
            from agents.otlp import OtlpBridge

            self.otlp = OtlpBridge(settings)
            self.app.task(self.otlp.run)
            self.exposition.registry.register(self.otlp.collector())
        if settings.metrics_port > 0:
            from pipeline.export.server import MetricsServer

            # /metrics and /health in threads of their own (pipeline/export/server.py)
            self.metrics_server = MetricsServer(self.exposition, settings.metrics_host,
                                                settings.metrics_port)
            self.app.task(self._serve_metrics)
            self.app.on_before_shutdown.connect(self._stop_metrics)

    async def _serve_metrics(self) -> None:
        self.metrics_server.start(asyncio.get_running_loop())

    async def _stop_metrics(self, sender: Any, **_: Any) -> None:
        self.metrics_server.stop()

    async def _recovered(self) -> None:
        self.ready.recovered(self.app.consumer.assignment())
        self.sequence.forget()
        self.cache.relax()
        gone = drop_unowned(self.state.data, (p for p in range(self.settings.partitions)
                                              if p in self.ready))  # agents/expiry.py
        if gone and self.sink is not None:
            self.sink.forget(gone)

    async def _giving_up(self) -> None:
        """A rebalance or a stop began: write out what the cache holds, and every batch from
        now on, so that the records behind them are acknowledged before Faust waits for
        that (and commits)."""
        await self.cache.write_out_all()

    async def _write_out_due(self) -> None:
        await self.cache.write_out_due()

    async def _unstall(self) -> None:
        """A record lost on its way with none behind it: seek back (agents/sequence.py)."""
        if not (self.kafka_consumer is None or self.input_paused or self.app.rebalancing
                or self.app.in_recovery):
            await self.sequence.unstall(input_positions(self.kafka_consumer, self.settings.topic))

    def _release(self, records: list[Any], writes: list[Any]) -> None:
        self.acks.release_when(records, writes)

    async def _revoked(self, sender: Any, revoked: Any, **_: Any) -> None:
        self.ready.revoked()
        self.sequence.forget()
        if self.metrics_server is not None:  # counters keep what leaves (export/edges.py)
            self.exposition.edges.retire(
                tp.partition for tp in revoked if tp.topic == self.settings.topic)

    def _setup_consumer(self, consumer: Any) -> None:
        """The worker's aiokafka consumer, before it starts (agents/consumer.py)."""
        set_fetch_wait(consumer, self.settings.worker_fetch_wait_ms)
        positions_readable(consumer)
        self.kafka_consumer = consumer
        gate_acks(self.app.consumer, self.settings.topic)  # only what we applied (acks.py)
        blind_read_offsets(self.app.consumer, self.settings.topic)  # our order (sequence.py)
        follow_seeks(self.app.consumer, self.settings.topic, self.sequence)

    async def _stop(self, exc: BaseException) -> None:
        """Stop the worker (exit 1): its restart reads every unacknowledged record again."""
        await self.app.crash(exc)

    def lag(self) -> dict[int, int]:
        """Kafka's consumer lag of each owned input partition (agents/consumer.py)."""
        return consumer_lag(self.app, self.settings.topic)

    def state_keys(self) -> dict[str, int]:
        """Keys held in this worker's table, by kind (what its memory grows with)."""
        names = {"w": "window", "e": "edge", "d": "detail", "p": "partition"}
        counts = dict.fromkeys(names.values(), 0)
        for key in list(self.state.keys()):
            counts[names[key[0]]] += 1
        return counts

    def owns(self, partition: int) -> bool:
        """True while this worker actively owns ``partition`` of the input topic."""
        actives = self.app.assignor.assigned_actives()
        return any(tp.topic == self.settings.topic and tp.partition == partition
                   for tp in actives)

    async def _flush(self) -> None:
        """One sink round, then delete what every database has stored for good."""
        assert self.sink is not None
        if self.app.in_recovery or self.app.rebalancing:
            return  # the table may be partly restored: wait for the whole of it
        await self.delete(await self.sink.flush())
        await self._hold_input(self.sink.holding())

    async def _hold_input(self, hold: bool) -> None:
        """Back-pressure from the sink (pipeline/sink/backlog.py): while a database is away
        and the backlog is past COMMPIPE_SINK_MAX_BACKLOG, read no more input records (they
        wait in Kafka), so the table stops growing; read again once it has drained.

        The pause is aiokafka's, in the consumer's own thread: it fetches nothing more for
        those partitions and throws away what it had fetched without moving its position,
        so reading resumes at the first record the worker has not applied. (Faust's
        ``pause_partitions`` instead drops fetched records after aiokafka has moved past
        them, which is only right followed by a seek to the committed offsets; the
        records in between were never applied: measured, a paused worker resumed 366
        events short.) Re-applied every round while holding: a rebalance unpauses."""
        if not hold and not self.input_paused:
            return
        kafka = self.kafka_consumer
        if kafka is None:
            return
        topic = self.settings.topic

        async def apply() -> None:
            tps = [tp for tp in kafka.assignment() if tp.topic == topic]
            (kafka.pause if hold else kafka.resume)(*tps)

        await self.app.consumer._thread.call_thread(apply)  # noqa: SLF001 - its own loop
        self.input_paused = hold

    async def _close_sink(self, sender: Any, **_: Any) -> None:
        if self.sink is not None:
            self.sink.close()

    async def delete(self, keys: list[str]) -> None:
        """Delete table keys (tombstones in their partition's changelog)."""
        data = self.state.data
        gone: dict[int, list[tuple[str, Any]]] = defaultdict(list)
        for key in keys:
            if key in data:
                del data[key]
                gone[parse_id(key)[1]].append((key, None))
        for partition, tombstones in gone.items():
            await self.cache.send(partition, tombstones)
        if self.sink is not None:
            self.sink.forget(keys)

    def _put(self, changes: list[tuple[str, Any]]) -> None:
        """Set ``changes`` in the table's data (their changelog records are :meth:`_send`'s)."""
        self.state.data.update(changes)

    async def _send(self, partition: int, changes: list[tuple[str, Any]]) -> list[Any]:
        """Hand ``changes`` to the changelog's partition ``partition`` (the source
        partition's, whatever partitioner the records' producer used, so a restart recovers
        them on the worker that owns them), in order (``None``: a tombstone); returns their
        delivery futures. Straight to the producer, not through Faust's producer buffer:
        past 100 queued messages it makes every incoming record wait for 100 sends, and a
        write-out is often more than 100."""
        send = self.app.producer.send
        topic = self._changelog
        return [await send(topic, key.encode(), None if value is None else encode_state(value),
                           partition, None, None)
                for key, value in changes]

    async def _aggregate(self, stream: Any) -> None:
        settings = self.settings
        async for batch in stream.take_events(settings.worker_batch_records,
                                              within=settings.worker_batch_within_s):
            try:
                self.sequence.applying()  # no seek back of a quiet partition meanwhile
                batch = await self.sequence.admit(batch)
                self.acks.hold(batch)  # acknowledged once its writes are delivered (acks.py)
                await self._batch(batch)
                self.sequence.applied()
            except Exception as exc:  # noqa: BLE001 - bad input never gets here
                # A restarted agent would go on past this batch, and its records would
                # never be applied: stop the worker; restarted, it reads them again.
                log.critical("worker: a batch failed (%s: %s); stopping, so that a restart "
                             "reads it again", type(exc).__name__, exc, exc_info=exc)
                await self._stop(exc)
                await asyncio.Event().wait()  # never take another batch in this process

    async def _batch(self, batch: list[Any]) -> None:
        self.batches += 1
        self.batch_records += len(batch)
        by_partition: dict[int, list[Any]] = defaultdict(list)
        for event in batch:
            by_partition[event.message.partition].append(event)
        for partition, records in by_partition.items():
            await self._apply(partition, records)

    async def _apply(self, partition: int, records: list[Any]) -> None:
        if partition not in self.ready:
            raise RuntimeError(f"records of partition {partition} reached the stream before "
                               "its table was recovered")
        work = self.cache.open(partition)
        try:
            if partition in self.ready.unchecked:
                self.ready.unchecked.discard(partition)
                committed = self.app.consumer._committed_offset.get(  # noqa: SLF001 - Faust's
                    records[0].message.tp)
                check_recovered(partition, work.meta.offset, committed)
            await self._apply_records(work, records)
        except BaseException:
            self.cache.abandon(partition)
            raise
        await self.cache.add(partition, records, self.dead_letters.take_pending())

    async def _apply_records(self, work: PartitionBatch, records: list[Any]) -> None:
        now = time.time()
        for record in records:
            message = record.message
            try:
                decoded = decode_record(message.value)
            except EventValidationError as e:
                await self.dead_letters.send(message, message.value, e.reason, field=e.field)
                work.meta.offset = max(work.meta.offset, message.offset)  # seen, settled
                continue
            if decoded.errors:
                await self.dead_letters.send_events(message, decoded.errors)
            copies = work.duplicates
            refused = work.apply(message.offset, decoded.events, record_ts=message.timestamp,
                                 now=now, producer=producer_of(message.headers))
            for event, reason in refused:
                await self.dead_letters.send_refused(message, event, reason)
            copied = work.duplicates - copies
            self.duplicates += copied
            self.events_in += len(decoded.events) - len(refused) - copied



def _credentials(settings: Settings) -> Any:
    if settings.kafka_sasl_mechanism:
        ssl = settings.kafka_client_options().get("ssl_context")  # SASL_SSL: TLS as well
        return faust.SASLCredentials(username=settings.kafka_sasl_username,
                                     password=settings.kafka_sasl_password.get(),
                                     mechanism=settings.kafka_sasl_mechanism,
                                     ssl_context=ssl)
    if settings.kafka_security_protocol == "SSL":
        return faust.SSLCredentials(cafile=settings.kafka_ssl_cafile)
    return None


def create_app(settings: Settings) -> Pipeline:
    """Build the app for ``settings`` (no connection is made until the worker starts)."""
    return Pipeline(settings)


_default: Pipeline | None = None


def __getattr__(name: str) -> Any:
    """``agents.app.app`` / ``.pipeline``: built from the environment on first use, so that
    ``faust -A agents.app`` works and importing :func:`create_app` builds nothing."""
    global _default
    if name in ("app", "pipeline"):
        if _default is None:
            _default = create_app(Settings.from_env())
        return _default.app if name == "app" else _default
    raise AttributeError(name)
