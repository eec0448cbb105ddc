"""Windowed per-edge aggregates: plain Python over plain data, no Kafka.

State lives in one store under three kinds of keys, each owned by exactly one
source partition (the partition is part of every key, so an edge that arrives
on several partitions — a producer with another partitioner — never mixes):

- :func:`window_id` ``w|partition|edge|window_start`` -> :class:`WindowStats`
- :func:`edge_id` ``e|partition|edge`` -> :class:`EdgeMeta` (circuit state, late events)
- :func:`partition_id` ``p|partition`` -> :class:`PartitionMeta` (event-time watermark)
- :func:`detail_id` ``d|partition|first_offset`` -> :class:`DetailBatch`: the error,
  timeout and health events of one batch, kept until the sink has stored them

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

Error rate = (errors + timeouts) / max(responses + errors + timeouts, 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import orjson

from pipeline.circuit import Breaker, BreakerConfig, StateTrack
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


def detail_id(partition: int, first_offset: int) -> str:
    return f"d{SEP}{partition}{SEP}{first_offset}"


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

    def to_json(self) -> dict[str, Any]:
        return {"reported": self.reported.to_json() if self.reported else None,
                "derived": self.derived.to_json(), "late_events": self.late_events,
                "last_ts": self.last_ts, "offset": self.offset,
                "totals": self.totals.to_json(), "last_seen": self.last_seen}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EdgeMeta:
        reported = StateTrack.from_json(data["reported"]) if data["reported"] else None
        return cls(reported, Breaker.from_json(data["derived"]), data["late_events"],
                   data["last_ts"], data["offset"], EdgeTotals.from_json(data.get("totals")),
                   data.get("last_seen"))


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


@dataclass(slots=True)
class DetailBatch:
    """Events kept one by one for the sink (``communication_events`` and
    ``communication_health_checks``), as wire-format objects. Keyed by the batch's first
    new offset: a replay after a crash writes the same key again or a new one, and the
    databases drop the repeats by ``event_id``."""

    events: list[dict[str, Any]] = field(default_factory=list)
    offset: int = -1

    def to_json(self) -> dict[str, Any]:
        return {"events": self.events, "offset": self.offset}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DetailBatch:
        return cls(data["events"], data["offset"])


DETAIL_KINDS: Final = frozenset({"error", "timeout", "health"})
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
        self.details = DetailBatch()
        self._fresh: set[int] = set()  # id() of values that have not seen the current record
        self.applied = 0
        self.late = 0
        self.skipped = 0

    def changes(self) -> list[tuple[str, State]]:
        """Changed values in write order: windows, edges, details, the partition meta."""
        details = self.details
        kept: list[tuple[str, State]] = (
            [(detail_id(self.partition, details.offset), details)] if details.events else [])
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

    def apply(self, offset: int, events: Sequence[Event], *, now: float
              ) -> list[tuple[Event, str]]:
        """Apply one record's valid events; returns ``(event, reason)`` for each refused one
        (stamped too far in the future)."""
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
            if event.kind in DETAIL_KINDS:
                if not self.details.events:
                    self.details.offset = offset
                self.details.events.append(event.to_wire())
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
