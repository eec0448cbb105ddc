"""Windowed per-edge aggregates: plain Python over plain data, no Kafka.

State lives in one store under three kinds of keys, each owned by exactly one
source partition (the partition is part of every key, so an edge that arrives
on several partitions — a producer with another partitioner — never mixes):

- :func:`window_id` ``w|partition|edge|window_start`` -> :class:`WindowStats`
- :func:`edge_id` ``e|partition|edge`` -> :class:`EdgeMeta` (circuit state, late events)
- :func:`partition_id` ``p|partition`` -> :class:`PartitionMeta` (event-time watermark)
- :func:`detail_id` ``d|partition|first_offset[|part]`` -> :class:`DetailBatch`: the
  events of one batch the sink stores one by one (:func:`keeps_detail`: errors, timeouts,
  retries, health checks and the responses of retried calls), at most
  :data:`DETAIL_CHUNK_EVENTS` events and :data:`DETAIL_CHUNK_BYTES` per value (a changelog
  record must stay well under Kafka's 1 MiB), kept until the sink has stored them, their
  ``error_message`` masked and bounded again (:mod:`pipeline.redact`)

Exactness under at-least-once delivery: every value records ``offset``, the
highest source offset applied to it, and a replayed record is skipped by each
key that already holds it. The caller writes a batch's changes in the order
windows, edges, partition meta, all into one changelog partition, so a log
prefix survives a crash: a persisted partition meta means the whole batch
persisted (its records are skipped outright), and otherwise the watermark
resumes from its last persisted value and every lateness decision replays
exactly as it was first made.

Windows are tumbling, in event time: ``window_start = floor(ts / size) * size``.
An event is *late* when its window ended ``grace`` seconds or more before the
partition's watermark (the largest event time seen there); late events are not
added to their closed window but counted, per edge, in ``late_events`` of the
edge's current window (the one holding the watermark).

Exactness under producer retries: a producer that sends a record again after a
timed-out send may have written it twice, at two offsets. The shim numbers its
records per edge (headers ``commpipe-producer`` and ``commpipe-seq``, kept on
every retry); each edge remembers, per producer, the highest number applied
and the numbers below it not seen yet (:mod:`pipeline.dedup`), so a second copy
is skipped and counted in ``duplicates``. This record lives in the edge's own
value, so it replays with it. Records without the headers (other producers)
are applied as they come: at-least-once.

Error rate = (errors + timeouts) / max(responses + errors + timeouts, 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import orjson

from pipeline.circuit import Breaker, BreakerConfig, StateTrack
from pipeline.dedup import CALL_HORIZON_S, MAX_CALLS, MAX_DUP_OFFSETS, ProducerSeqs, first_time
from pipeline.details import (
    DETAIL_CHUNK_BYTES,
    DETAIL_CHUNK_EVENTS,
    DETAIL_KINDS,
    DetailBatch,
    detail_of,
    keeps_detail,
)
from pipeline.events import Event, edge_key
from pipeline.sketch import LatencySketch
from pipeline.totals import EdgeTotals

if TYPE_CHECKING:
    from pipeline.settings import Settings

__all__ = ["DETAIL_KINDS", "DetailBatch", "EdgeMeta", "PartitionBatch", "PartitionMeta", "State",
           "WindowConfig", "WindowStats", "decode_state", "detail_id", "edge_id", "encode_state",
           "parse_id", "partition_id", "window_id"]

SEP: Final = "\x1e"  # record separator: cannot occur in an edge key or a number


def window_id(partition: int, edge: str, window_start: float) -> str:
    return f"w{SEP}{partition}{SEP}{edge}{SEP}{float(window_start)!r}"


def edge_id(partition: int, edge: str) -> str:
    return f"e{SEP}{partition}{SEP}{edge}"


def partition_id(partition: int) -> str:
    return f"p{SEP}{partition}"


def detail_id(partition: int, first_offset: int, part: int = 0) -> str:
    return f"d{SEP}{partition}{SEP}{first_offset}" + (f"{SEP}{part}" if part else "")


def parse_id(key: str) -> tuple[str, int, str | None, float | None]:
    """``(kind, partition, edge, window_start)`` of a state key (edge/start None if absent)."""
    parts = key.split(SEP)
    kind, partition = parts[0], int(parts[1])
    edge = parts[2] if len(parts) > 2 else None
    start = float(parts[3]) if len(parts) > 3 else None
    return kind, partition, edge, start


@dataclass(frozen=True, slots=True, kw_only=True)
class WindowConfig:
    size_s: float = 10.0
    """Tumbling window length (event time)."""
    grace_s: float = 10.0
    """How long after its end a window still accepts events."""
    max_future_s: float = 300.0
    """Events stamped further than this ahead of the worker's clock are refused."""
    breaker: BreakerConfig = field(default_factory=BreakerConfig)

    @classmethod
    def from_settings(cls, settings: Settings) -> WindowConfig:
        return cls(size_s=settings.window_s, grace_s=settings.grace_s,
                   max_future_s=settings.max_future_s,
                   breaker=BreakerConfig(
                       failure_threshold=settings.breaker_failure_threshold,
                       recovery_timeout_s=settings.breaker_recovery_timeout_s,
                       half_open_probes=settings.breaker_half_open_probes))

    def start_of(self, ts: float) -> float:
        return math.floor(ts / self.size_s) * self.size_s


@dataclass(slots=True)
class WindowStats:
    """Everything one edge did in one window (as seen by one partition)."""

    window_start: float
    window_end: float
    requests: int = 0
    responses: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    timeouts: int = 0
    retries: int = 0
    retry_backoff_ms: float = 0.0
    payload_bytes: int = 0
    late_events: int = 0
    health: dict[str, int] = field(default_factory=dict)
    latency: LatencySketch = field(default_factory=LatencySketch)
    reported_state: str | None = None
    derived_state: str = "closed"
    transitions: dict[str, int] = field(default_factory=dict)
    """``"reported:open"`` / ``"derived:half_open"`` ... -> entries in this window."""
    max_call_backoff_ms: float = 0.0
    """Largest total retry backoff one call (correlation id) had reached by a retry here."""
    circuit_reaction_ms: float | None = None
    """Largest time from the edge's last failure to a reported ``open`` here (ms)."""
    first_ts: float | None = None
    last_ts: float | None = None
    offset: int = -1

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def error_rate(self) -> float:
        failed = self.error_count + self.timeouts
        return failed / max(self.responses + failed, 1)

    def merge(self, other: WindowStats) -> None:
        """Add another partition's part of the same window (counts add, sketches merge)."""
        self.requests += other.requests
        self.responses += other.responses
        for k, n in other.errors.items():
            self.errors[k] = self.errors.get(k, 0) + n
        self.timeouts += other.timeouts
        self.retries += other.retries
        self.retry_backoff_ms += other.retry_backoff_ms
        self.payload_bytes += other.payload_bytes
        self.late_events += other.late_events
        for k, n in other.health.items():
            self.health[k] = self.health.get(k, 0) + n
        for k, n in other.transitions.items():
            self.transitions[k] = self.transitions.get(k, 0) + n
        self.latency.merge(other.latency)
        self.max_call_backoff_ms = max(self.max_call_backoff_ms, other.max_call_backoff_ms)
        if other.circuit_reaction_ms is not None:
            self.circuit_reaction_ms = max(self.circuit_reaction_ms or 0.0,
                                           other.circuit_reaction_ms)
        if other.last_ts is not None and (self.last_ts is None or other.last_ts > self.last_ts):
            self.last_ts = other.last_ts
            self.reported_state = other.reported_state or self.reported_state
            self.derived_state = other.derived_state
        if other.first_ts is not None and (self.first_ts is None or other.first_ts < self.first_ts):
            self.first_ts = other.first_ts

    def to_json(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in self.__slots__ if name != "latency"}
        data["latency"] = self.latency.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WindowStats:
        values = dict(data)
        values["latency"] = LatencySketch.from_json(values["latency"])
        return cls(**values)


@dataclass(slots=True)
class EdgeMeta:
    """Per (partition, edge): circuit state over time, late events and cumulative totals."""

    reported: StateTrack | None = None
    derived: Breaker = field(default_factory=Breaker)
    late_events: int = 0
    last_ts: float | None = None
    offset: int = -1
    totals: EdgeTotals = field(default_factory=EdgeTotals)
    last_seen: float | None = None
    """Worker clock when an event of this edge last arrived (for staleness)."""
    producers: dict[str, ProducerSeqs] = field(default_factory=dict)
    duplicates: int = 0
    """Events of records skipped as a producer's second copy."""
    dup_offsets: list[int] = field(default_factory=list)
    """Offsets of the latest records skipped as copies: a replay skips them again."""
    calls: dict[str, list[float]] = field(default_factory=dict)
    """Correlation id -> [total retry backoff ms, last retry ts] of recently retried calls."""
    last_failure_ts: float | None = None

    def add_backoff(self, call: str, backoff_ms: float, ts: float) -> float:
        """Add one retry's backoff to its call; returns the call's total so far."""
        entry = self.calls.get(call)
        if entry is None:
            if len(self.calls) >= MAX_CALLS:
                recent = sorted(self.calls.items(), key=lambda kv: kv[1][1])[MAX_CALLS // 2:]
                self.calls = {k: v for k, v in recent if v[1] >= ts - CALL_HORIZON_S}
            entry = self.calls[call] = [0.0, ts]
        entry[0] += backoff_ms
        entry[1] = max(entry[1], ts)
        return entry[0]

    def first_time(self, producer: str, seq: int, now: float) -> bool:
        """False when ``producer``'s record ``seq`` of this edge was applied already."""
        return first_time(self.producers, producer, seq, now)

    def to_json(self) -> dict[str, Any]:
        return {"reported": self.reported.to_json() if self.reported else None,
                "derived": self.derived.to_json(), "late_events": self.late_events,
                "last_ts": self.last_ts, "offset": self.offset,
                "totals": self.totals.to_json(), "last_seen": self.last_seen,
                "producers": {p: [s.high, s.gaps, s.last_seen]
                              for p, s in self.producers.items()},
                "duplicates": self.duplicates, "dup_offsets": self.dup_offsets,
                "calls": self.calls, "last_failure_ts": self.last_failure_ts}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EdgeMeta:
        reported = StateTrack.from_json(data["reported"]) if data["reported"] else None
        producers = {p: ProducerSeqs(high, list(gaps), seen)
                     for p, (high, gaps, seen) in data.get("producers", {}).items()}
        return cls(reported, Breaker.from_json(data["derived"]), data["late_events"],
                   data["last_ts"], data["offset"], EdgeTotals.from_json(data.get("totals")),
                   data.get("last_seen"), producers, data.get("duplicates", 0),
                   list(data.get("dup_offsets", ())), dict(data.get("calls", {})),
                   data.get("last_failure_ts"))


@dataclass(slots=True)
class PartitionMeta:
    """Per source partition: the event-time watermark and when events last arrived."""

    watermark: float = -math.inf
    last_seen: float | None = None
    """Worker clock when this partition last delivered an event (for idle closing)."""
    offset: int = -1

    def to_json(self) -> dict[str, Any]:
        return {"watermark": None if self.watermark == -math.inf else self.watermark,
                "last_seen": self.last_seen, "offset": self.offset}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PartitionMeta:
        wm = data["watermark"]
        return cls(-math.inf if wm is None else wm, data["last_seen"], data["offset"])


assert Event._fields[3:6] == ("source_service", "target_service", "protocol")  # apply() slices
State = WindowStats | EdgeMeta | PartitionMeta | DetailBatch
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
        self._windows: dict[str, WindowStats] = {}
        self._edges: dict[str, EdgeMeta] = {}
        self.details: list[DetailBatch] = []
        self._detail_bytes = 0  # JSON bytes in the last of them
        self._fresh: set[int] = set()  # id() of values that have not seen the current record
        self.applied = 0
        self.late = 0
        self.skipped = 0
        self.duplicates = 0

    def changes(self) -> list[tuple[str, State]]:
        """Changed values in write order: windows, edges, details, the partition meta."""
        kept: list[tuple[str, State]] = []
        part = 0
        for i, details in enumerate(self.details):
            part = part + 1 if i and details.offset == self.details[i - 1].offset else 0
            kept.append((detail_id(self.partition, details.offset, part), details))
        return [*self._windows.items(), *self._edges.items(), *kept,
                (partition_id(self.partition), self.meta)]

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
        return False

    def apply(self, offset: int, events: Sequence[Event], *, now: float,
              producer: tuple[str, int] | None = None) -> list[tuple[Event, str]]:
        """Apply one record's valid events; returns ``(event, reason)`` for each refused one
        (stamped too far in the future). ``producer`` = ``(producer id, seq)`` from the
        record's shim headers: a second copy of a record of one edge is skipped."""
        meta = self.meta
        if offset <= meta.offset:  # the whole batch holding this record persisted
            self.skipped += len(events)
            return []
        refused: list[tuple[Event, str]] = []
        config = self.config
        size = config.size_s
        limit = now + config.max_future_s
        self._fresh.clear()
        touched: list[WindowStats | EdgeMeta] = []
        if producer is not None and events:
            edge_meta = self._edge(events[0].edge)
            if self._holds(edge_meta, offset):
                duplicate = offset in edge_meta.dup_offsets  # a replay: as decided before
            else:
                touched.append(edge_meta)
                duplicate = not edge_meta.first_time(producer[0], producer[1], now)
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
        # the window up again only when they change (same objects either way).
        last_fields: tuple[str, ...] = ()
        edge = ""
        edge_meta = EdgeMeta()
        window: tuple[float, WindowStats] | None = None
        for event in events:
            ts = event.ts
            if ts > limit:
                refused.append((event, f"ts: {ts - now:.0f} s ahead of the worker's clock "
                                       f"(at most {config.max_future_s:g} s accepted)"))
                continue
            if keeps_detail(event):
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
            fields = event[3:6]  # source_service, target_service, protocol
            if fields != last_fields:
                last_fields = fields
                edge = edge_key(*fields)
                edge_meta = self._edge(edge)
                window = None
            edge_meta.last_seen = now
            start = math.floor(ts / size) * size
            if ts > meta.watermark:
                meta.watermark = ts
            if start + size + config.grace_s <= meta.watermark:
                stats = self._window(edge, config.start_of(meta.watermark))
                if not self._holds(stats, offset):
                    stats.late_events += 1
                    touched.append(stats)
                if not self._holds(edge_meta, offset):
                    edge_meta.late_events += 1
                    edge_meta.totals.add(event)
                    touched.append(edge_meta)
                self.late += 1
                continue
            if window is None or window[0] != start:
                window = (start, self._window(edge, start))
            stats = window[1]
            window_new = not self._holds(stats, offset)
            edge_new = not self._holds(edge_meta, offset)
            if not (window_new or edge_new):
                self.skipped += 1
                continue
            self._add(stats if window_new else None, edge_meta if edge_new else None, event)
            touched.append(stats)
            touched.append(edge_meta)
            self.applied += 1
        for value in touched:
            if id(value) in self._fresh:
                value.offset = offset
        meta.offset = offset
        meta.last_seen = now
        return refused

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
            failed = edge_meta.last_failure_ts
            if failed is not None and failed <= ts:
                reaction = (ts - failed) * 1000.0
                stats.circuit_reaction_ms = max(stats.circuit_reaction_ms or 0.0, reaction)
        if kind == "circuit" and event.circuit_state is not None:
            if edge_meta.reported is None:
                edge_meta.reported = StateTrack(since=ts)
            if edge_meta.reported.enter(event.circuit_state, ts) and stats is not None:
                _bump(stats.transitions, f"reported:{event.circuit_state}")
        breaker = edge_meta.derived
        before = dict(breaker.track.entered)
        breaker.observe(ts, _OUTCOME.get(kind), self.config.breaker)
        if stats is not None:
            for state, n in breaker.track.entered.items():
                if n > before.get(state, 0):
                    _bump(stats.transitions, f"derived:{state}", n - before.get(state, 0))
            stats.derived_state = breaker.track.state
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


_TAGS: Final[dict[type, str]] = {WindowStats: "w", EdgeMeta: "e", PartitionMeta: "p",
                                 DetailBatch: "d"}
_TYPES: Final[dict[str, Any]] = {tag: cls for cls, tag in _TAGS.items()}


def encode_state(value: State) -> bytes:
    """Changelog bytes of a state value (JSON with a type tag)."""
    return orjson.dumps({"t": _TAGS[type(value)], "d": value.to_json()})


def decode_state(data: bytes) -> State:
    """Inverse of :func:`encode_state`."""
    obj = orjson.loads(data)
    return _TYPES[obj["t"]].from_json(obj["d"])  # type: ignore[no-any-return]
