"""Applying records to windowed per-edge state, exactly once: plain Python, no Kafka.

:class:`PartitionBatch` applies the records of one source partition to the
state laid out as :mod:`pipeline.core.store` describes (windows, edges, the
partition's watermark) and collects what changed. Events the sink stores one by
one (:func:`~pipeline.core.details.keeps_detail`: errors, timeouts, retries,
health checks and the responses of retried calls) are gathered into
:class:`~pipeline.core.details.DetailBatch` values of at most
:data:`~pipeline.core.details.DETAIL_CHUNK_EVENTS` events and
:data:`~pipeline.core.details.DETAIL_CHUNK_BYTES` each (a changelog record must
stay well under Kafka's 1 MiB), their ``error_message`` masked and bounded
again (:mod:`pipeline.wire.redact`).

Exactness under at-least-once delivery: every value records ``offset``, the
highest source offset applied to it, and a replayed record is skipped by each
key that already holds it. The caller writes a batch's changes in the order
windows, edges, partition meta, all into one changelog partition, so a log
prefix survives a crash: a persisted partition meta means the whole batch
persisted (its records are skipped outright), and otherwise the watermark
resumes from its last persisted value and every lateness decision replays
exactly as it was first made.

Late events (:mod:`pipeline.core.window`) are not added to their closed window
but counted, per edge, in ``late_events`` of the edge's current window (the one
holding the watermark).

Exactness under producer retries: a producer that sends a record again after a
timed-out send may have written it twice, at two offsets. The shim numbers its
records per edge (headers ``commpipe-producer`` and ``commpipe-seq``, kept on
every retry); each edge remembers, per producer, the highest number applied
and the numbers below it not seen yet (:mod:`pipeline.core.dedup`), so a second copy
is skipped and counted in ``duplicates``. This record lives in the edge's own
value, so it replays with it. Records without the headers (other producers)
are applied as they come: at-least-once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from pipeline.core.circuit import StateTrack
from pipeline.core.dedup import MAX_DUP_OFFSETS
from pipeline.core.details import (
    DETAIL_CHUNK_BYTES,
    DETAIL_CHUNK_EVENTS,
    DETAIL_KINDS,
    DetailBatch,
    detail_of,
)
from pipeline.core.edge import EdgeMeta, PartitionMeta
from pipeline.core.store import (
    State,
    decode_state,
    detail_id,
    edge_id,
    encode_state,
    partition_id,
    window_id,
)
from pipeline.core.window import WindowConfig, WindowStats
from pipeline.wire.events import Event, edge_key

__all__ = ["PartitionBatch"]

assert Event._fields[3:6] == ("source_service", "target_service", "protocol")  # apply() slices
_OUTCOME = {"response": True, "error": False, "timeout": False}


class PartitionBatch:
    """Applies the records of one source partition to its state; collects what changed.

    ``store`` (a Faust table or a dict, keyed as described above) is only read
    here, and what is read is copied first: a batch that fails halfway leaves the
    store exactly as its changelog has it. The caller writes :meth:`changes` once
    per batch, in the order given.
    """

    def __init__(self, partition: int, config: WindowConfig, store: Mapping[str, Any]) -> None:
        self.partition = partition
        self.config = config
        self._store = store
        self.meta: PartitionMeta = _copy(store.get(partition_id(partition))) or PartitionMeta()
        self._floor = self.meta.offset  # every record up to here is skipped outright on replay
        self._windows: dict[str, WindowStats] = {}
        self._edges: dict[str, EdgeMeta] = {}
        self.details: list[DetailBatch] = []
        self._detail_bytes = 0  # JSON bytes in the last of them
        self._fresh: set[int] = set()  # id() of values that have not seen the current record
        self._fresh_values: list[WindowStats | EdgeMeta] = []  # the same values
        self.applied = 0
        self.late = 0
        self.skipped = 0
        self.duplicates = 0

    def changes(self) -> list[tuple[str, State]]:
        """Changed values in write order: windows, edges, details, the partition meta.

        An edge forgets the offsets of copies it skipped at or before the partition meta
        this batch started from: a replay skips those records whole, without asking."""
        floor = self._floor
        for meta in self._edges.values():
            if meta.dup_offsets and meta.dup_offsets[0] <= floor:
                meta.dup_offsets = [o for o in meta.dup_offsets if o > floor]
        kept: list[tuple[str, State]] = []
        part = 0
        for i, details in enumerate(self.details):
            part = part + 1 if i and details.offset == self.details[i - 1].offset else 0
            kept.append((detail_id(self.partition, details.offset, part), details))
        return [*self._windows.items(), *self._edges.items(), *kept,
                (partition_id(self.partition), self.meta)]

    def touched_edges(self) -> set[str]:
        """Keys of the edges this batch has changed (its changes not written yet)."""
        return set(self._edges)

    def _window(self, edge: str, window_start: float) -> WindowStats:
        key = window_id(self.partition, edge, window_start)
        stats = self._windows.get(key)
        if stats is None:
            stats = _copy(self._store.get(key))
            if stats is None:
                stats = WindowStats(window_start, window_start + self.config.size_s)
            self._windows[key] = stats
        return stats

    def _edge(self, edge: str) -> EdgeMeta:
        key = edge_id(self.partition, edge)
        meta = self._edges.get(key)
        if meta is None:
            meta = _copy(self._store.get(key)) or EdgeMeta()
            self._edges[key] = meta
        return meta

    def _holds(self, value: WindowStats | EdgeMeta, offset: int) -> bool:
        """True when ``value`` already holds record ``offset`` (a replay for this key)."""
        if id(value) in self._fresh:
            return False
        if value.offset >= offset:
            return True
        self._fresh.add(id(value))
        self._fresh_values.append(value)
        return False

    def apply(self, offset: int, events: Sequence[Event], *, record_ts: float | None,
              now: float, producer: tuple[str, int] | None = None) -> list[tuple[Event, str]]:
        """Apply one record's valid events; returns ``(event, reason)`` for each refused one
        (stamped too far in the future). ``producer`` = ``(producer id, seq)`` from the
        record's shim headers: a second copy of a record of one edge is skipped.

        Every decision comes from the record, so that a replay decides as the first run
        did: the future horizon and the producers' horizon are measured from
        ``record_ts``, the record's Kafka timestamp (epoch seconds; for a record without
        one, the newest seen in the partition before it). ``now``, the worker's clock,
        only stamps ``last_seen`` (idle closing and staleness, which count nothing)."""
        meta = self.meta
        if offset <= meta.offset:  # the whole batch holding this record persisted
            self.skipped += len(events)
            return []
        if record_ts is not None and record_ts > 0:
            if meta.record_ts is None or record_ts > meta.record_ts:
                meta.record_ts = record_ts
        else:
            record_ts = meta.record_ts
        refused: list[tuple[Event, str]] = []
        config = self.config
        size = config.size_s
        limit = math.inf if record_ts is None else record_ts + config.max_future_s
        self._fresh.clear()
        fresh = self._fresh_values
        fresh.clear()
        if producer is not None and events:
            edge_meta = self._edge(events[0].edge)
            if self._holds(edge_meta, offset):
                duplicate = offset in edge_meta.dup_offsets  # a replay: as decided before
            else:
                seen = events[0].ts if record_ts is None else record_ts
                duplicate = not edge_meta.first_time(producer[0], producer[1], seen)
                if duplicate:
                    edge_meta.duplicates += len(events)
                    edge_meta.dup_offsets.append(offset)
                    del edge_meta.dup_offsets[:-MAX_DUP_OFFSETS]
                    edge_meta.offset = offset
            if duplicate:
                self.duplicates += len(events)
                meta.offset = offset
                meta.last_seen = now
                return []
        # A shim record holds one edge's events, mostly of one window: look the edge and
        # the window up again only when they change (same objects either way), and ask
        # whether each holds this record once (the answer cannot change within a record).
        last_fields: tuple[str, ...] = ()
        edge = ""
        edge_meta = EdgeMeta()
        edge_new = False
        window: tuple[float, WindowStats, bool] | None = None
        grace = config.grace_s
        for event in events:
            ts = event.ts
            if ts > limit:
                refused.append((event, f"ts: {ts - limit + config.max_future_s:.0f} s ahead "
                                       f"of its record's timestamp (at most "
                                       f"{config.max_future_s:g} s accepted)"))
                continue
            kind = event.kind
            if kind in DETAIL_KINDS or (kind == "response" and (event.attempt or 0) > 1):
                self._keep(event, offset)  # keeps_detail(event), inlined
            fields = event[3:6]  # source_service, target_service, protocol
            if fields != last_fields:
                last_fields = fields
                edge = edge_key(*fields)
                edge_meta = self._edge(edge)
                edge_new = not self._holds(edge_meta, offset)
                window = None
            edge_meta.last_seen = now
            start = math.floor(ts / size) * size
            if ts > meta.watermark:
                meta.watermark = ts
            if start + size + grace <= meta.watermark:
                stats = self._window(edge, config.start_of(meta.watermark))
                if not self._holds(stats, offset):
                    stats.late_events += 1
                if edge_new:
                    edge_meta.late_events += 1
                    edge_meta.totals.add(event)
                self.late += 1
                continue
            if window is None or window[0] != start:
                stats = self._window(edge, start)
                window = (start, stats, not self._holds(stats, offset))
            window_new = window[2]
            if not (window_new or edge_new):
                self.skipped += 1
                continue
            self._add(window[1] if window_new else None, edge_meta if edge_new else None,
                      event)
            self.applied += 1
        for value in fresh:
            value.offset = offset
        meta.offset = offset
        meta.last_seen = now
        return refused

    def _keep(self, event: Event, offset: int) -> None:
        """Keep ``event`` for the sink (:func:`~pipeline.core.details.keeps_detail`)."""
        wire = detail_of(event)
        nbytes = len(orjson.dumps(wire))
        details = self.details[-1] if self.details else None
        if details is None or len(details.events) >= DETAIL_CHUNK_EVENTS or \
                self._detail_bytes + nbytes > DETAIL_CHUNK_BYTES:
            details = DetailBatch(offset=offset)
            self.details.append(details)
            self._detail_bytes = 0
        self._detail_bytes += nbytes
        details.events.append(wire)

    def _add(self, stats: WindowStats | None, edge_meta: EdgeMeta | None, event: Event) -> None:
        """Add one event to its window and/or its edge (whichever does not hold it yet)."""
        kind = event.kind
        ts = event.ts
        if stats is not None:
            _count(stats, event)
        if edge_meta is None:
            return
        edge_meta.totals.add(event)
        if kind == "retry":
            total = edge_meta.add_backoff(event.correlation_id, event.backoff_ms or 0.0, ts)
            if stats is not None and total > stats.max_call_backoff_ms:
                stats.max_call_backoff_ms = total
        elif kind in ("error", "timeout"):
            if edge_meta.last_failure_ts is None or ts > edge_meta.last_failure_ts:
                edge_meta.last_failure_ts = ts
        elif kind == "circuit" and event.circuit_state == "open" and stats is not None:
            # the reaction is the change to open: an open re-reported later is no reaction
            was = edge_meta.reported.state if edge_meta.reported is not None else None
            failed = edge_meta.last_failure_ts
            if was != "open" and failed is not None and failed <= ts:
                reaction = (ts - failed) * 1000.0
                stats.circuit_reaction_ms = max(stats.circuit_reaction_ms or 0.0, reaction)
        if kind == "circuit" and event.circuit_state is not None:
            if edge_meta.reported is None:
                edge_meta.reported = StateTrack(since=ts)
            if edge_meta.reported.enter(event.circuit_state, ts) and stats is not None:
                _bump(stats.transitions, f"reported:{event.circuit_state}")
        breaker = edge_meta.derived
        track = breaker.track
        success = _OUTCOME.get(kind)
        if track.state == "closed" and track.since is not None and success is not False:
            if success:  # what Breaker.observe does here, without a call
                breaker.failures = 0
        else:
            before = dict(track.entered)
            breaker.observe(ts, success, self.config.breaker)
            if stats is not None:
                for state, n in track.entered.items():
                    if n > before.get(state, 0):
                        _bump(stats.transitions, f"derived:{state}", n - before.get(state, 0))
        if stats is not None:
            stats.derived_state = track.state
            if edge_meta.reported is not None:
                stats.reported_state = edge_meta.reported.state
        if edge_meta.last_ts is None or ts > edge_meta.last_ts:
            edge_meta.last_ts = ts


def _copy(value: Any) -> Any:
    """A private copy of a stored value (None stays None)."""
    return None if value is None else decode_state(encode_state(value))


def _bump(counts: dict[str, int], key: str, n: int = 1) -> None:
    counts[key] = counts.get(key, 0) + n


def _count(stats: WindowStats, event: Event) -> None:
    kind = event.kind
    if kind == "request":
        stats.requests += 1
    elif kind == "response":
        stats.responses += 1
    elif kind == "error":
        _bump(stats.errors, event.error_type or "unknown")
    elif kind == "timeout":
        stats.timeouts += 1
    elif kind == "retry":
        stats.retries += 1
        stats.retry_backoff_ms += event.backoff_ms or 0.0
    elif kind == "health":
        _bump(stats.health, event.health_status or "unknown")
    if event.latency_ms is not None and kind in _OUTCOME:
        stats.latency.add(event.latency_ms)
    if event.payload_size is not None:
        stats.payload_bytes += event.payload_size
    ts = event.ts
    if stats.first_ts is None or ts < stats.first_ts:
        stats.first_ts = ts
    if stats.last_ts is None or ts > stats.last_ts:
        stats.last_ts = ts
