"""Cumulative per-edge counters for Prometheus, kept in each edge's state.

Windows leave the worker's table once the databases have them, so counters
that only ever grow (``..._requests_total``, the latency histogram) cannot be
summed from windows at scrape time; each edge's :class:`EdgeTotals` holds them
instead, updated with the same replay rules as the windows (a replayed record
is skipped), so they are exact across crashes.

Latency buckets are fixed (seconds, Prometheus' usual spread from 1 ms to a
minute): a histogram's buckets must never change under a running series.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Any, Final

from pipeline.wire.events import Event

__all__ = ["DEFAULT_BUCKETS_S", "LATENCY_BUCKETS_S", "EdgeTotals"]

LATENCY_BUCKETS_S: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                            2.5, 5.0, 10.0, 30.0, 60.0)
"""Upper bounds (``le``) of the latency histogram; a last bucket holds the rest (+Inf)."""
DEFAULT_BUCKETS_S: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
"""The bounds ``/metrics`` reports by default: where service latencies and their objectives
lie (the sketch's quantile gauges give each edge's tail within 1 %; ``histogram_quantile``
over these is for aggregates across edges, workers and time)."""
_BOUNDS_MS: Final = tuple(b * 1000.0 for b in LATENCY_BUCKETS_S)
_OUTCOMES: Final = frozenset({"response", "error", "timeout"})


@dataclass(slots=True)
class EdgeTotals:
    """Everything one edge did since its state began (late events included)."""

    events: int = 0
    requests: int = 0
    responses: int = 0
    timeouts: int = 0
    retries: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    buckets: list[int] = field(default_factory=lambda: [0] * (len(_BOUNDS_MS) + 1))
    """Latencies per bucket (not cumulative): ``buckets[i]`` counts values in
    ``(bound[i-1], bound[i]]``; the last one those above every bound."""
    latency_sum_ms: float = 0.0

    def add(self, event: Event) -> None:
        self.events += 1
        kind = event.kind
        if kind == "request":
            self.requests += 1
        elif kind == "response":
            self.responses += 1
        elif kind == "timeout":
            self.timeouts += 1
        elif kind == "retry":
            self.retries += 1
        elif kind == "error":
            key = event.error_type or "unknown"
            self.errors[key] = self.errors.get(key, 0) + 1
        if kind in _OUTCOMES and event.latency_ms is not None:
            self.buckets[bisect_left(_BOUNDS_MS, event.latency_ms)] += 1
            self.latency_sum_ms += event.latency_ms

    @property
    def latency_count(self) -> int:
        return sum(self.buckets)

    def merge(self, other: EdgeTotals) -> None:
        for name in ("events", "requests", "responses", "timeouts", "retries"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for k, n in other.errors.items():
            self.errors[k] = self.errors.get(k, 0) + n
        self.buckets = [a + b for a, b in zip(self.buckets, other.buckets, strict=True)]
        self.latency_sum_ms += other.latency_sum_ms

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> EdgeTotals:
        return cls() if data is None else cls(**data)
