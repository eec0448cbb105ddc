"""The Faust app: wires :mod:`pipeline.core` into a stream job with a changelogged table.

Run with ``commpipe worker`` (creates the topics first) or
``faust -A agents.app worker -l info`` (topics must exist). Settings come from
``COMMPIPE_*`` (see :class:`pipeline.settings.Settings`).

The input topic's records reach the worker a fetch at a time, one batch per
partition, past Faust's per-record path (:mod:`agents.intake`). The ``aggregate``
task decodes each record (one event or a batch of one edge's events), sends bad
records and bad events to ``comm.events.dlq`` with their reason, and applies the
good events per source partition (:class:`pipeline.core.batch.PartitionBatch`) to
the record cache (:mod:`agents.cache`). The worker writes its table and changelog
itself and commits its input offsets itself (:mod:`agents.checkpoint`): state
always lives in the changelog partition of the partition its records came from,
whatever partitioner their producer used. Faust keeps the group, the table's
recovery and standbys, the timers and the supervision.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import faust
from faust.serializers import codecs

from agents import private
from agents.cache import RecordCache
from agents.checkpoint import Checkpoint
from agents.dead_letters import DeadLetters, ProducerTopic
from agents.expiry import EdgeExpiry, drop_unowned, expiry_interval
from agents.intake import InputBatch, Intake
from agents.producer import WorkerProducer
from agents.topics import changelog_topic
from pipeline.core.batch import PartitionBatch
from pipeline.core.rollups import Rollups
from pipeline.core.slo import load_config
from pipeline.core.store import decode_state, encode_state, parse_id, partition_id
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
    """Faust's app, with what the consumer-thread hooks of :mod:`agents.private` read."""

    intake: Intake | None = None
    fetch_wait_ms: int | None = None


class Pipeline:
    """The app and the objects around it that the sink and the exporter read."""

    def __init__(self, settings: Settings) -> None:
        private.check()  # a renamed private name stops the worker here, in one line
        private.install()
        self.settings = settings
        self.config = WindowConfig.from_settings(settings)
        Path(settings.worker_datadir).mkdir(parents=True, exist_ok=True)
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
            broker_max_poll_records=settings.worker_batch_records,
            consumer_auto_offset_reset="earliest",
            topic_allow_declare=True,
            table_cleanup_interval=3600.0,
            producer_acks=-1,
        )
        self.app.fetch_wait_ms = settings.worker_fetch_wait_ms
        self.intake = self.app.intake = Intake(
            settings.topic, lambda: self.app.consumer_generation_id,
            max_records=4 * settings.worker_batch_records, max_bytes=INTAKE_MAX_BYTES)
        # The input topic: subscribed (Faust assigns its partitions with the changelog's),
        # never iterated: its records leave each fetch in the consumer thread (intake.py).
        # acks=False: Faust tracks no acknowledgement of it (the worker commits it itself).
        self.events = self.app.topic(settings.topic, key_type=bytes, value_type=bytes,
                                     key_serializer="raw", value_serializer="raw",
                                     partitions=settings.partitions, acks=False)
        self.app.topics.add(self.events)
        self._changelog = changelog_topic(settings)
        # Our own changelog topic, with our codecs and the input's partition count (Faust
        # requires them equal); the worker writes it itself (agents/producer.py).
        changelog = self.app.topic(
            self._changelog, partitions=settings.partitions,
            key_serializer="commpipe_key", value_serializer="commpipe_state",
            compacting=True, deleting=False, acks=True, internal=True)
        self.state = self.app.Table("state", default=None, partitions=settings.partitions,
                                    changelog_topic=changelog)
        # Faust takes a table's serializers from a Record type's options, else JSON; our
        # values are plain classes with their own codec (recovery decodes with it).
        self.state.key_serializer = "commpipe_key"
        self.state.value_serializer = "commpipe_state"
        self.state.on_recover(self._recovered)
        self.app.on_partitions_revoked.connect(self._revoked)
        self.producer = WorkerProducer(settings.kafka_client_options(),
                                       batch_bytes=settings.worker_producer_batch_bytes,
                                       last_alone=settings.worker_changelog_last_alone)
        self.dead_letters = DeadLetters(ProducerTopic(self.producer, settings.dlq_topic))
        self.rollups = Rollups(self.state, self.config, idle_close_s=settings.idle_close_s,
                               owned=self.owns)
        self.cache = RecordCache(self.config, self.state.data, self.producer, self._changelog,
                                 max_records=MAX_UNWRITTEN_RECORDS - settings.worker_batch_records)
        self.checkpoint = Checkpoint(self.cache, self.dead_letters, self.intake,
                                     on_failure=self._stop)
        if settings.worker_cache_interval_s > 0:
            self.app.timer(settings.worker_cache_interval_s, name="commit")(
                self.checkpoint.commit)
        self.expiry = EdgeExpiry(  # silent edges leave the table (agents/expiry.py)
            silent_s=settings.edge_expire_s, items=self.rollups.owned_items,
            touched=self.cache.touched_edges, delete=self.delete,
            removable=lambda key, window: self.sink is not None and self.sink.removable(
                key, window), busy=lambda: bool(self.app.in_recovery or self.app.rebalancing))
        if settings.edge_expire_s > 0:
            self.app.timer(expiry_interval(settings.edge_expire_s), name="expire")(
                self.expiry.run_once)
        self.events_in = 0
        self.duplicates = 0
        self.batches = 0
        self.batch_records = 0
        self.replayed = 0
        """Input records skipped whole: at or below the offset their partition had applied."""
        self.crashed = False
        self.app.task(self._aggregate)
        self.app.on_before_shutdown.connect(self._stopping)
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
        """The table is recovered: forget what other workers own now, then start reading
        each owned input partition at the first offset its state has not applied."""
        try:
            owned = sorted(tp.partition for tp in self.app.assignor.assigned_actives()
                           if tp.topic == self.settings.topic)
            gone = drop_unowned(self.state.data, owned)  # agents/expiry.py
            if gone and self.sink is not None:
                self.sink.forget(gone)
            data = self.state.data
            targets = {p: getattr(data.get(partition_id(p)), "offset", -1) + 1 for p in owned}
            await self.producer.start()
            self.checkpoint.started(await self.intake.start(targets))
        except Exception as exc:  # noqa: BLE001 - Faust does not raise what its callbacks do
            log.critical("worker: cannot start reading the input (%s: %s); stopping",
                         type(exc).__name__, exc)
            await self._stop(exc)

    async def _revoked(self, sender: Any, revoked: Any, **_: Any) -> None:
        """A rebalance: apply nothing more, commit what was applied, forget the assignment."""
        self.intake.stop_all()
        await self.checkpoint.commit()
        self.checkpoint.forget()
        if self.metrics_server is not None:  # counters keep what leaves (export/edges.py)
            self.exposition.edges.retire(
                tp.partition for tp in revoked if tp.topic == self.settings.topic)

    async def _stopping(self, sender: Any, **_: Any) -> None:
        """The worker stops (its fetcher already has): commit what was applied."""
        self.intake.stop_all()
        if not self.crashed:
            await self.checkpoint.commit()
        await self.producer.stop()

    async def _stop(self, exc: BaseException) -> None:
        """Stop the worker (exit 1): its restart reads every uncommitted record again."""
        self.crashed = True
        await self.app.crash(exc)

    def lag(self) -> dict[int, int]:
        """Kafka's consumer lag of each started input partition, as ``kafka-consumer-groups
        --describe`` reports it: the end offset of the latest fetch minus the group's
        committed offset (0 before any commit)."""
        out: dict[int, int] = {}
        for partition in self.intake.started():
            high = self.intake.highwater(partition)
            if high is not None:
                committed = max(self.checkpoint.committed.get(partition, 0), 0)
                out[partition] = max(high - committed, 0)
        return out

    # What the exporter reads (pipeline.export.collectors.WorkerStatus):

    @property
    def unwritten(self) -> int:
        return self.cache.unwritten()

    @property
    def write_outs(self) -> int:
        return self.cache.write_outs

    @property
    def dropped(self) -> int:
        return self.intake.dropped

    @property
    def commits(self) -> int:
        return self.checkpoint.commits

    @property
    def commit_refusals(self) -> int:
        return self.checkpoint.refused

    @property
    def edges_expired(self) -> int:
        return self.expiry.expired

    @property
    def dead_letter_counts(self) -> dict[str, int]:
        return dict(self.dead_letters.counts)

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
        # Back-pressure (pipeline/sink/backlog.py): while a database is away and the
        # backlog is past COMMPIPE_SINK_MAX_BACKLOG, fetches leave the input out.
        self.intake.hold = self.sink.holding()

    async def _close_sink(self, sender: Any, **_: Any) -> None:
        if self.sink is not None:
            self.sink.close()

    async def delete(self, keys: list[str]) -> None:
        """Delete table keys (tombstones in their partition's changelog)."""
        data = self.state.data
        gone: dict[int, list[tuple[bytes, None]]] = defaultdict(list)
        for key in keys:
            if key in data:
                del data[key]
                gone[parse_id(key)[1]].append((key.encode(), None))
        for partition, tombstones in gone.items():
            # (stopped: after the last commit; the keys come back from the changelog at the
            # next start, and the sink finds them stored and deletes them again)
            if self.producer.started:
                await self.producer.write(self._changelog, partition, tombstones)
        if self.sink is not None:
            self.sink.forget(keys)

    async def _aggregate(self) -> None:
        """Apply each fetch's batches, one fetch at a time (a Faust task: an exception
        stops the worker, whose restart reads the uncommitted records again)."""
        intake, checkpoint = self.intake, self.checkpoint
        every_fetch = self.settings.worker_cache_interval_s == 0
        await self.producer.start()
        while True:
            fetched = await intake.next()
            failed: Exception | None = None
            async with checkpoint.lock:
                try:
                    for batch in intake.take(fetched):  # under the lock: see _revoked
                        await self._apply(batch)
                    if every_fetch or checkpoint.due():
                        await checkpoint.commit_held()
                except Exception as exc:  # noqa: BLE001 - bad input never gets here
                    failed = checkpoint.failed = exc  # nothing more is committed
            if failed is not None:
                log.critical("worker: a batch failed (%s: %s); stopping, so that a restart "
                             "reads it again", type(failed).__name__, failed, exc_info=failed)
                await self._stop(failed)
                await asyncio.Event().wait()  # never take another batch in this process

    async def _apply(self, batch: InputBatch) -> None:
        self.batches += 1
        records = batch.records
        self.batch_records += len(records)
        partition = batch.partition
        work = self.cache.open(partition)
        try:
            await self._apply_records(work, records)
        except BaseException:
            self.cache.abandon(partition)
            raise
        self.cache.add(partition, len(records), records[-1].offset + 1,
                       self.dead_letters.take_pending())

    async def _apply_records(self, work: PartitionBatch, records: list[Any]) -> None:
        now = time.time()
        letters = self.dead_letters
        meta, apply, decode = work.meta, work.apply, decode_record
        for record in records:
            offset = record.offset
            if offset <= meta.offset:  # applied before (read again after a restart)
                self.replayed += 1
                continue
            try:
                decoded = decode(record.value)
            except EventValidationError as e:
                await letters.send(record, record.value, e.reason, field=e.field)
                meta.offset = offset  # seen, settled
                continue
            if decoded.errors:
                await letters.send_events(record, decoded.errors)
            events = decoded.events
            copies = work.duplicates
            stamp = record.timestamp  # ms; -1 without one
            refused = apply(offset, events, now=now, producer=producer_of(record.headers),
                            record_ts=stamp / 1000.0 if stamp and stamp > 0 else None)
            for event, reason in refused:
                await letters.send_refused(record, event, reason)
            copied = work.duplicates - copies
            self.duplicates += copied
            self.events_in += len(events) - len(refused) - copied


INTAKE_MAX_BYTES = 64 << 20
"""Most bytes of record values handed over and not yet applied (back-pressure)."""


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
