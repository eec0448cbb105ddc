"""pybreaker -> ``circuit`` events: add :class:`CircuitEvents` to a breaker's listeners.

::

    import pybreaker
    from pipeline.shim.adapters.pybreaker import CircuitEvents

    breaker = pybreaker.CircuitBreaker(
        fail_max=5, reset_timeout=30,
        listeners=[CircuitEvents(emitter, "orders", "payments", protocol="grpc")])

Every state change emits a ``circuit`` event with ``closed``, ``open`` or
``half_open`` (pybreaker's ``half-open``).
"""

from __future__ import annotations

from typing import Any

import pybreaker

from pipeline.shim.kinds import EventKinds

__all__ = ["CircuitEvents"]

_STATES = {"closed": "closed", "open": "open", "half-open": "half_open", "half_open": "half_open"}


class CircuitEvents(pybreaker.CircuitBreakerListener):
    """A pybreaker listener that reports the breaker's state changes for one edge."""

    def __init__(self, emitter: EventKinds, source_service: str, target_service: str, *,
                 protocol: str = "http") -> None:
        self._emitter = emitter
        self._source = source_service
        self._target = target_service
        self._protocol = protocol

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        state = _STATES.get(getattr(new_state, "name", str(new_state)))
        if state is None:  # a state pybreaker may add later: report nothing rather than lie
            return
        self._emitter.circuit(source_service=self._source, target_service=self._target,
                              protocol=self._protocol, circuit_state=state)  # type: ignore[arg-type]
