"""Circuit state per edge, in event time: what services report, and what the stream implies.

:class:`StateTrack` follows one state over time: the current state, since when,
how many times each state was entered, and the seconds spent in each finished
stretch. The *reported* state is a ``StateTrack`` driven by ``circuit`` events.

:class:`Breaker` derives a state for edges whose callers report none, with the
classic breaker machine (defaults from the specification's breaker test:
``FailureThreshold: 3, RecoveryTimeout: 1s``):

- ``closed``: ``failure_threshold`` consecutive failures (``error``/``timeout``
  events) open it; a success (``response``) resets the count.
- ``open``: outcomes are ignored (a real breaker would have refused those
  calls); the first event at or after ``opened + recovery_timeout_s`` moves it to
  ``half_open`` as of that moment.
- ``half_open``: ``half_open_probes`` consecutive successes close it; a failure
  opens it again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

__all__ = ["Breaker", "BreakerConfig", "StateTrack"]

STATES: Final = ("closed", "open", "half_open")


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerConfig:
    failure_threshold: int = 3
    """Consecutive failures that open the derived breaker."""
    recovery_timeout_s: float = 1.0
    """Event-time seconds an open breaker waits before it lets a probe through."""
    half_open_probes: int = 1
    """Consecutive successful probes that close it again."""

    def __post_init__(self) -> None:
        from pipeline.errors import ConfigError

        if self.failure_threshold < 1 or self.half_open_probes < 1:
            raise ConfigError("breaker failure_threshold and half_open_probes must be >= 1, got "
                              f"{self.failure_threshold} and {self.half_open_probes}")
        if self.recovery_timeout_s < 0:
            raise ConfigError(f"breaker recovery_timeout_s must be >= 0, got "
                              f"{self.recovery_timeout_s}")


@dataclass(slots=True)
class StateTrack:
    """One state through event time: entries per state and seconds per state."""

    state: str = "closed"
    since: float | None = None
    entered: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def enter(self, state: str, ts: float) -> bool:
        """Move to ``state`` at ``ts`` (never before the current stretch began).
        Returns True when the state changed."""
        if self.since is None:
            self.since = ts
        at = max(ts, self.since)
        if state == self.state:
            return False
        self.seconds[self.state] = self.seconds.get(self.state, 0.0) + (at - self.since)
        self.state = state
        self.since = at
        self.entered[state] = self.entered.get(state, 0) + 1
        return True

    def seconds_in(self, state: str, now: float | None = None) -> float:
        """Seconds spent in ``state``, counting the current stretch up to ``now``."""
        total = self.seconds.get(state, 0.0)
        if now is not None and state == self.state and self.since is not None:
            total += max(0.0, now - self.since)
        return total

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, "since": self.since, "entered": self.entered,
                "seconds": self.seconds}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StateTrack:
        return cls(data["state"], data["since"], dict(data["entered"]), dict(data["seconds"]))


@dataclass(slots=True)
class Breaker:
    """The derived breaker of one edge (see the module docstring)."""

    track: StateTrack = field(default_factory=StateTrack)
    failures: int = 0
    probes_ok: int = 0

    def observe(self, ts: float, success: bool | None, config: BreakerConfig) -> None:
        """Feed one event: ``success`` True (response), False (error/timeout), None (other)."""
        track = self.track
        if track.since is None:
            track.since = ts
        if track.state == "open":
            reopen_at = track.since + config.recovery_timeout_s
            if ts < reopen_at:
                return
            track.enter("half_open", reopen_at)
            self.probes_ok = 0
        if success is None:
            return
        if track.state == "closed":
            if success:
                self.failures = 0
            else:
                self.failures += 1
                if self.failures >= config.failure_threshold:
                    track.enter("open", ts)
                    self.failures = 0
        elif success:  # half_open
            self.probes_ok += 1
            if self.probes_ok >= config.half_open_probes:
                track.enter("closed", ts)
                self.failures = 0
        else:
            track.enter("open", ts)
            self.probes_ok = 0

    def to_json(self) -> dict[str, Any]:
        return {"track": self.track.to_json(), "failures": self.failures,
                "probes_ok": self.probes_ok}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Breaker:
        return cls(StateTrack.from_json(data["track"]), data["failures"], data["probes_ok"])
