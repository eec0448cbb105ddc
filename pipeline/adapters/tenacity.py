"""tenacity -> ``retry`` events: pass :class:`RetryEvents` as ``before_sleep``.

::

    from tenacity import retry, stop_after_attempt, wait_exponential
    from pipeline.adapters.tenacity import RetryEvents

    @retry(stop=stop_after_attempt(4), wait=wait_exponential(multiplier=0.2),
           before_sleep=RetryEvents(emitter, "orders", "payments", protocol="http"))
    def charge(): ...

tenacity calls ``before_sleep`` after attempt *n* failed and before it sleeps;
the event carries ``attempt=n``, ``backoff_ms`` = the coming sleep, and the
failure's :func:`~pipeline.shim.error_type_of`. All retry events of one retried
call share a correlation id (:meth:`RetryEvents.correlation_id` tells it, e.g.
to pass to ``emitter.call(..., correlation_id=...)`` inside the attempt).
This module does not import tenacity: it reads the ``RetryCallState`` it is given.
"""

from __future__ import annotations

import uuid
import weakref
from typing import Any

from pipeline.shim import _Kinds, error_type_of

__all__ = ["RetryEvents"]


class RetryEvents:
    """A tenacity ``before_sleep`` callback that emits one ``retry`` event per retry."""

    def __init__(self, emitter: _Kinds, source_service: str, target_service: str, *,
                 protocol: str = "http", method: str | None = None) -> None:
        self._emitter = emitter
        self._source = source_service
        self._target = target_service
        self._protocol = protocol
        self._method = method
        self._ids: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()

    def correlation_id(self, retry_state: Any) -> str:
        """The correlation id shared by every retry event of this retried call."""
        cid = self._ids.get(retry_state)
        if cid is None:
            cid = self._ids[retry_state] = uuid.uuid4().hex
        return cid

    def __call__(self, retry_state: Any) -> None:
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None and outcome.failed else None
        action = retry_state.next_action
        sleep_s = action.sleep if action is not None else retry_state.upcoming_sleep
        self._emitter.retry(
            source_service=self._source, target_service=self._target, protocol=self._protocol,
            attempt=retry_state.attempt_number, backoff_ms=float(sleep_s) * 1000.0,
            error_type=error_type_of(exc) if exc is not None else "result",
            method=self._method, correlation_id=self.correlation_id(retry_state))
