"""One edge's window: its configuration and everything the edge did in it.

Windows are tumbling, in event time: ``window_start = floor(ts / size) * size``.
An event is *late* when its window ended ``grace`` seconds or more before the
partition's watermark (the largest event time seen there).

Error rate = (errors + timeouts) / max(responses + errors + timeouts, 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.core.circuit import BreakerConfig
from pipeline.core.sketch import LatencySketch

if TYPE_CHECKING:
    from pipeline.settings import Settings

__all__ = ["WindowConfig", "WindowStats"]


@dataclass(frozen=True, slots=True, kw_only=True)
class WindowConfig:
    size_s: float = 10.0
    """Tumbling window length (event time)."""
    grace_s: float = 10.0
    """How long after its end a window still accepts events."""
    max_future_s: float = 300.0
    """Events stamped further than this ahead of their record's Kafka timestamp are refused
    (the record's, not the worker's clock: a replay must decide as the first run did)."""
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
