"""The events the sink stores one by one, and the batches the worker keeps them in.

Most events are only counted into windows. These are also stored as rows
(``communication_events``, ``communication_health_checks``): errors, timeouts,
retries and health checks, and the responses that end a retried call, so that
``commpipe trace`` shows every attempt, each backoff and the outcome.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from pipeline.wire.events import Event
from pipeline.wire.redact import safe_message

__all__ = ["DETAIL_CHUNK_BYTES", "DETAIL_CHUNK_EVENTS", "DETAIL_KINDS", "DetailBatch",
           "detail_of", "keeps_detail"]


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


DETAIL_CHUNK_EVENTS: Final = 400
"""Most events in one DetailBatch value."""
DETAIL_CHUNK_BYTES: Final = 512 * 1024
"""Most JSON bytes of events in one DetailBatch value: a changelog record must stay well
under Kafka's 1 MiB (one kept event is at most ~6 KB: a 1,024-character message of 4-byte
characters, a 200-character method, 128-character ids)."""

DETAIL_KINDS: Final = frozenset({"error", "timeout", "retry", "health"})
"""Kinds the sink stores one by one; see :func:`keeps_detail` for the one exception."""


def keeps_detail(event: Event) -> bool:
    """True for the events the sink stores one by one: :data:`DETAIL_KINDS`, and responses
    that end a retried call (``attempt`` > 1), so ``commpipe trace`` shows the outcome.
    Other requests and responses are only counted: storing every one would make the table
    and both databases carry the whole stream."""
    kind = event.kind
    return kind in DETAIL_KINDS or (kind == "response" and (event.attempt or 0) > 1)


def detail_of(event: Event) -> dict[str, Any]:
    """The wire object kept for the sink, its ``error_message`` masked and bounded again:
    producers other than the shim may send credentials."""
    wire = event.to_wire()
    if event.error_message is not None:
        message = safe_message(event.error_message)
        if message is None:
            del wire["error_message"]
        else:
            wire["error_message"] = message
    return wire
