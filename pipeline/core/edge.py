"""Per (partition, edge) and per partition state: what outlives one window.

:class:`EdgeMeta` holds an edge's circuit state over time, its late events, its
cumulative totals (what ``/metrics`` counters read), the shim producers' record
numbers (:mod:`pipeline.core.dedup`) and the retry backoff of recent calls.
:class:`PartitionMeta` holds a source partition's event-time watermark.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from pipeline.core.circuit import Breaker, StateTrack
from pipeline.core.dedup import CALL_HORIZON_S, MAX_CALLS, ProducerSeqs, first_time
from pipeline.core.totals import EdgeTotals

__all__ = ["EdgeMeta", "PartitionMeta"]


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

    def first_time(self, producer: str, seq: int, at: float) -> bool:
        """False when ``producer``'s record ``seq`` of this edge was applied already
        (``at``: the record's timestamp)."""
        return first_time(self.producers, producer, seq, at)

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
    """Worker clock when this partition last delivered an event (for idle closing only:
    nothing that is counted depends on it)."""
    offset: int = -1
    record_ts: float | None = None
    """Newest Kafka record timestamp seen here (epoch seconds): the horizon of a record
    that carries none."""

    def to_json(self) -> dict[str, Any]:
        return {"watermark": None if self.watermark == -math.inf else self.watermark,
                "last_seen": self.last_seen, "offset": self.offset,
                "record_ts": self.record_ts}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PartitionMeta:
        wm = data["watermark"]
        return cls(-math.inf if wm is None else wm, data["last_seen"], data["offset"],
                   data.get("record_ts"))
