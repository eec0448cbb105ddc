"""tenacity -> ``retry`` events: pass :class:`RetryEvents` as ``before_sleep``.

::

    from tenacity import retry, stop_after_attempt, wait_exponential
    from pipeline.shim.adapters.tenacity import RetryEvents

    @retry(stop=stop_after_attempt(4), wait=wait_exponential(multiplier=0.2),
           before_sleep=RetryEvents(emitter, "orders", "payments", protocol="http"))
    def charge(): ...

tenacity calls ``before_sleep`` after attempt *n* failed and before it sleeps;
the event carries ``attempt=n``, ``backoff_ms`` = the coming sleep, the
failure's :func:`~pipeline.shim.error_type_of` and ``str(exc)`` as
``error_message`` (masked and bounded by the shim, :mod:`pipeline.wire.redact`).
All retry events of one retried call share a correlation id
(:meth:`RetryEvents.correlation_id` tells it).

To see every attempt and the outcome in ``commpipe trace``, time each attempt
with :meth:`RetryEvents.call` (tenacity's iterator style gives the attempt's
state): its events share the retry events' correlation id and carry the
attempt number::

    events = RetryEvents(emitter, "orders", "payments")
    for attempt in Retrying(stop=stop_after_attempt(4), wait=wait_exponential(0.2),
                            before_sleep=events):
        with attempt, events.call(attempt):
            charge()

This module does not import tenacity: it reads the ``RetryCallState`` it is given.
"""

from __future__ import annotations

import uuid
import weakref
from typing import Any

from pipeline.shim.call import Call, error_type_of
from pipeline.shim.kinds import EventKinds
from pipeline.wire.redact import text_of

__all__ = ["RetryEvents"]


class RetryEvents:
    """A tenacity ``before_sleep`` callback that emits one ``retry`` event per retry."""

    def __init__(self, emitter: EventKinds, source_service: str, target_service: str, *,
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

    def call(self, attempt: Any) -> Call:
        """The call timer (:meth:`~pipeline.shim.Emitter.call`) for one attempt: ``attempt``
        is tenacity's ``AttemptManager`` (what ``for attempt in Retrying(...)`` yields) or
        its ``RetryCallState``; the call gets this retried call's correlation id and the
        attempt's number."""
        state = getattr(attempt, "retry_state", attempt)
        return self._emitter.call(self._source, self._target, protocol=self._protocol,
                                  method=self._method, correlation_id=self.correlation_id(state),
                                  attempt=state.attempt_number)

    def __call__(self, retry_state: Any) -> None:
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None and outcome.failed else None
        action = retry_state.next_action
        sleep_s = action.sleep if action is not None else retry_state.upcoming_sleep
        self._emitter.retry(
            source_service=self._source, target_service=self._target, protocol=self._protocol,
            attempt=retry_state.attempt_number, backoff_ms=float(sleep_s) * 1000.0,
            error_type=error_type_of(exc) if exc is not None else "result",
            error_message=text_of(exc), method=self._method,
            correlation_id=self.correlation_id(retry_state))
