"""The shim's bounded outbox: the buffer emitters append to, and what it holds on its way out.

Both emitters share this: the caller's thread only masks and bounds ``error_message``
(:func:`pipeline.wire.redact.safe_message`), measures the event's JSON and appends it to a
deque under a lock (never a network call, never an exception). The sender
(:class:`pipeline.shim.sender.Sender`, an asyncio task in the emitter's own thread or in
the caller's loop) takes everything buffered, has :meth:`Outbox.encode` validate each event
with the same rules the worker applies, group them by edge and pack them into records of
at most ``batch_events`` events and ``batch_bytes`` bytes (a JSON array, keyed by the
edge), and sends one record per edge per round.

Accounting: every event handed to :meth:`Outbox.put` ends in exactly one of
``sent``, ``dropped`` (buffer full, emitter closed, or undelivered at close),
``failed`` (the broker refused it for good) or ``invalid`` (it breaks wire
format v1 or cannot be encoded as JSON; the reason is logged). While the broker is
away, records that failed with a retriable error are kept and sent again with backoff;
they count against the buffer's bounds (events and bytes), so memory stays bounded.

Duplicates: a record whose send timed out may still have been written (the
broker got it, its answer did not come back), and sending it again writes it
twice. Every record therefore carries two headers, ``commpipe-producer`` (a
random id of this outbox) and ``commpipe-seq`` (its number among this
producer's records of the same edge, fixed when it is first encoded and kept
on every retry); the worker applies each (producer, edge, seq) once
(:mod:`pipeline.core.batch`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import orjson

from pipeline.errors import EventValidationError
from pipeline.wire.decode import validate_event
from pipeline.wire.headers import PRODUCER_HEADER, SEQ_HEADER
from pipeline.wire.redact import safe_message

__all__ = ["EmitterStats", "Outbox"]

log = logging.getLogger("commpipe.shim")

_LOG_EVERY_S = 10.0  # at most one log line per this many seconds for repeating problems


@dataclass(frozen=True, slots=True)
class EmitterStats:
    """Counts since the emitter was created. ``buffered`` = waiting or being retried now;
    ``buffered_bytes`` = their JSON size as emitted (what the byte bound counts)."""

    sent: int
    dropped: int
    failed: int
    invalid: int
    buffered: int
    buffered_bytes: int = 0


@dataclass(slots=True)
class _Record:
    key: bytes
    value: bytes
    events: int
    headers: list[tuple[str, bytes]]
    held: int = 0
    """Bytes its events count against the buffer's byte bound."""


def _plain_float(value: Any) -> Any:
    """orjson's fallback: a float subclass (``numpy.float64``) as the float it holds."""
    if isinstance(value, float):
        return float.__float__(value)
    raise TypeError(f"Type is not JSON serializable: {type(value).__name__}")


def _bound_message(event: dict[str, Any]) -> None:
    """Mask and cut ``event["error_message"]`` (:func:`safe_message`); drop it when empty."""
    message = event["error_message"]
    if message is None:
        return
    if isinstance(message, str):  # a str subclass gives its characters, not its __str__
        message = str.__str__(message)
    message = safe_message(message)
    if message is None:
        del event["error_message"]
    else:
        event["error_message"] = message


def _kind_of(event: Any) -> str:
    kind = event.get("kind") if isinstance(event, dict) else None
    return kind if type(kind) is str and kind.isidentifier() and len(kind) <= 20 else "an"


def _unencodable(event: dict[str, Any], error: Exception) -> str:
    """Which field keeps ``event`` from being JSON, and why; values are never shown (they may
    hold secrets), only names and types."""
    for name, value in event.items():
        if type(name) is not str:
            return (f"a field name is a {type(name).__name__}, not a string; "
                    "cannot be encoded as JSON")
        try:
            orjson.dumps(value, default=_plain_float)
        except Exception as e:  # noqa: BLE001 - described, not raised
            return f"field {name[:40]!r} ({type(value).__name__}) cannot be encoded as JSON: {e}"
    return f"cannot be encoded as JSON: {type(error).__name__}: {error}"[:300]


class Outbox:
    """A bounded buffer of event dicts plus the coroutine that sends them.

    The bound is ``capacity`` events and ``capacity_bytes`` bytes of the events' JSON as
    emitted (``None``: events only), counting what is buffered and what is in flight or
    kept to retry.
    """

    def __init__(
        self,
        *,
        topic: str,
        capacity: int,
        capacity_bytes: int | None = None,
        batch_events: int,
        batch_bytes: int,
        linger_s: float,
        producer_options: dict[str, Any],
    ) -> None:
        self._config: dict[str, Any] = dict(
            topic=topic, capacity=capacity, capacity_bytes=capacity_bytes,
            batch_events=batch_events, batch_bytes=batch_bytes, linger_s=linger_s,
            producer_options=producer_options)
        self.topic = topic
        self.capacity = capacity
        self._capacity_bytes = capacity_bytes if capacity_bytes is not None else 2**62
        self._batch_events = batch_events
        self._batch_bytes = batch_bytes
        self._lock = threading.Lock()
        self._buffer: deque[tuple[dict[str, Any], int]] = deque()  # (event, its JSON bytes)
        self._buffer_bytes = 0
        self._inflight = 0  # events taken from the buffer and not yet sent, failed or dropped
        self._inflight_bytes = 0
        self._closed = False
        self.finished = False  # the sender has stopped; what it left is counted as dropped
        self.orphaned = False  # replaced in a forked child (forked()): its sender just ends
        # flush marks: events accepted so far, taken by the sender's last round, and the
        # count below which every event is settled (sent, failed, invalid or dropped)
        self._accepted = self._taken_upto = self._done_upto = 0
        self._burst = 0  # drops since the sender last made room; > 0 means "dropping now"
        self._sent = self._dropped = self._failed = self._invalid = 0
        self._last_log: dict[str, tuple[float, int]] = {}  # what -> (logged at, quiet since)
        self.wake: asyncio.Event | None = None  # created inside the sender's loop
        self.deadline: float | None = None  # monotonic; set when closing with a timeout
        self.linger_s = linger_s
        self.producer_options = producer_options
        self.undelivered = 0  # events dropped because the sender stopped before sending them
        self.producer_id = os.urandom(8).hex()
        self._seq: dict[bytes, int] = {}  # edge key -> last record number given

    # ---- caller side (any thread) -------------------------------------------------------

    def put(self, event: dict[str, Any]) -> bool:
        """Buffer one event (``event`` becomes the outbox's); False when it cannot be encoded
        as JSON (counted as invalid) or the buffer is full or closed (counted as dropped).
        Never raises.

        ``error_message`` is masked and cut to its wire bound here, so that the buffer
        holds what will be sent; the event's JSON size counts against the byte bound.
        """
        if "error_message" in event:
            _bound_message(event)
        try:
            size = len(orjson.dumps(event, default=_plain_float))
        except Exception as e:  # noqa: BLE001 - JSONEncodeError, or whatever a value raises
            self.reject(f"invalid {_kind_of(event)} event not sent: {_unencodable(event, e)}")
            return False
        with self._lock:
            if self._closed:
                full = "emitter is closed"
            elif len(self._buffer) + self._inflight >= self.capacity:
                full = f"buffer full ({self.capacity} events)"
            elif self._buffer_bytes + self._inflight_bytes + size > self._capacity_bytes:
                full = f"buffer full ({self._capacity_bytes} bytes)"
            else:
                self._buffer.append((event, size))
                self._buffer_bytes += size
                self._accepted += 1
                return True
            self._dropped += 1
            self._burst += 1
            first = self._burst == 1
        if first:
            log.warning("commpipe shim: %s; dropping events until there is room (counted in "
                        "stats().dropped)", full)
        return False

    def reject(self, reason: str) -> None:
        """Count one event as invalid without buffering it, and log ``reason`` (rate-limited)."""
        with self._lock:
            self._invalid += 1
        self.log_limited("invalid", "commpipe shim: %s", reason)

    def stats(self) -> EmitterStats:
        with self._lock:
            return EmitterStats(self._sent, self._dropped, self._failed, self._invalid,
                                len(self._buffer) + self._inflight,
                                self._buffer_bytes + self._inflight_bytes)

    def pending(self) -> int:
        """Events not yet sent, failed or dropped."""
        with self._lock:
            return len(self._buffer) + self._inflight

    def mark(self) -> int:
        """A flush mark: how many events were accepted so far."""
        with self._lock:
            return self._accepted

    def flushed(self, mark: int) -> bool:
        """True once every event accepted before ``mark`` was taken is settled (sent, or
        counted failed or invalid); events emitted since do not hold it up."""
        with self._lock:
            return self._done_upto >= mark

    def close(self) -> None:
        """Refuse new events from now on (they count as dropped)."""
        with self._lock:
            self._closed = True

    def forked(self) -> Outbox:
        """In a forked child: a fresh outbox with the same settings (nothing buffered, counts
        at zero, a new producer id), closed if this one was. This one is left alone (its
        lock may be held by a thread that does not exist here) and never sends again."""
        self.orphaned = True
        fresh = Outbox(**self._config)
        fresh._closed = self._closed
        return fresh

    # ---- sender side (:class:`pipeline.shim.sender.Sender`, one asyncio task) ---------------

    def take(self) -> tuple[list[dict[str, Any]], list[int]]:
        """Everything buffered, as (events, their sizes); it is in flight from now on."""
        with self._lock:
            taken = self._buffer
            self._buffer = deque()
            self._inflight += len(taken)
            self._inflight_bytes += self._buffer_bytes
            self._buffer_bytes = 0
            self._taken_upto = self._accepted
        return [e for e, _ in taken], [n for _, n in taken]

    def round_done(self) -> None:
        """The last round left nothing to retry: all it took is settled."""
        with self._lock:
            self._done_upto = self._taken_upto

    def settle(self, *, sent: int = 0, failed: int = 0, invalid: int = 0,
                held: int = 0) -> None:
        """Events in flight are done (``held``: the bytes they counted)."""
        with self._lock:
            if self.finished:  # close() gave up on them already: counted as dropped
                return
            self._sent += sent
            self._failed += failed
            self._invalid += invalid
            self._inflight -= sent + failed + invalid
            self._inflight_bytes -= held
            burst, self._burst = self._burst, 0
        if burst:
            log.warning("commpipe shim: dropped %d events in the last burst", burst)

    def log_limited(self, what: str, msg: str, *args: Any) -> None:
        """Log at most once per ``_LOG_EVERY_S`` per kind of problem, saying how many like it
        were not logged in between (they are all counted in the stats)."""
        now = time.monotonic()
        last, quiet = self._last_log.get(what, (-_LOG_EVERY_S, 0))
        if now - last < _LOG_EVERY_S:
            self._last_log[what] = (last, quiet + 1)
            return
        self._last_log[what] = (now, 0)
        if quiet:
            log.warning(msg + " (and %d more like it in the last %.0f s, not logged)",
                        *args, quiet, now - last)
        else:
            log.warning(msg, *args)

    def encode(self, events: list[dict[str, Any]], sizes: list[int] | None = None
               ) -> list[_Record]:
        """Validate, group by edge and encode; invalid events are counted and logged.

        Each event is checked and encoded on its own, so one that breaks the format (or
        that a caller changed after ``emit`` into something JSON cannot hold) costs only
        itself: the others of the round are still sent.
        """
        ids = os.urandom(16 * len(events)).hex()
        by_edge: dict[str, list[tuple[bytes, int]]] = {}
        invalid = invalid_bytes = 0
        for i, event in enumerate(events):
            held = sizes[i] if sizes is not None else 0
            try:
                key, data = self._encode_one(event, ids[32 * i: 32 * i + 32])
            except EventValidationError as e:
                reason: str = f"invalid {_kind_of(event)} event not sent: {e}"
            except Exception as e:  # noqa: BLE001 - one event must never stop the sender
                reason = f"invalid {_kind_of(event)} event not sent: {_unencodable(event, e)}"
            else:
                if len(data) + 2 <= self._batch_bytes:
                    by_edge.setdefault(key, []).append((data, held))
                    continue
                reason = (f"invalid {_kind_of(event)} event not sent: it is {len(data)} bytes "
                          f"as JSON, and a record holds at most {self._batch_bytes} "
                          "(COMMPIPE_SHIM_BATCH_BYTES); leave out or shorten extra fields")
            invalid += 1
            invalid_bytes += held
            self.log_limited("invalid", "commpipe shim: %s", reason)
        if invalid:
            self.settle(invalid=invalid, held=invalid_bytes)
        records: list[_Record] = []
        for key, parts in by_edge.items():
            self._pack(key.encode(), parts, records)
        return records

    def _encode_one(self, event: dict[str, Any], event_id: str) -> tuple[str, bytes]:
        event["event_id"] = event_id
        event.setdefault("correlation_id", event_id)
        if "error_message" in event:  # as put() did; again for events changed since
            _bound_message(event)
        valid = validate_event(event)
        return valid.edge, orjson.dumps(event, default=_plain_float)

    def _pack(self, key: bytes, parts: list[tuple[bytes, int]], out: list[_Record]) -> None:
        """One edge's encoded events as records of at most ``batch_events`` events and
        ``batch_bytes`` bytes (a JSON array: brackets and commas included)."""
        start, size = 0, 2
        for i, (data, _) in enumerate(parts):
            if i > start and (i - start >= self._batch_events
                              or size + 1 + len(data) > self._batch_bytes):
                self._record(key, parts[start:i], out)
                start, size = i, 2
            size += len(data) + (i > start)
        if start < len(parts):
            self._record(key, parts[start:], out)

    def _record(self, key: bytes, parts: list[tuple[bytes, int]], out: list[_Record]) -> None:
        seq = self._seq[key] = self._seq.get(key, 0) + 1
        out.append(_Record(key, b"[" + b",".join(data for data, _ in parts) + b"]", len(parts),
                           [(PRODUCER_HEADER, self.producer_id.encode()),
                            (SEQ_HEADER, str(seq).encode())], sum(n for _, n in parts)))

    def fail_inflight(self, error: Exception, kept: list[_Record]) -> None:
        """After an unexpected error in a round: what it had taken (and is not ``kept`` to
        retry) counts as failed, and the sender carries on with the next round."""
        with self._lock:
            if self.finished:
                return
            lost = max(0, self._inflight - sum(r.events for r in kept))
            self._failed += lost
            self._inflight -= lost
            self._inflight_bytes = sum(r.held for r in kept)
        log.error("commpipe shim: unexpected error in the sender (%s: %s); %d events counted "
                  "as failed, sending goes on", type(error).__name__, error, lost,
                  exc_info=error)

    def abandon(self) -> None:
        """Count everything not yet settled as dropped, now (``close()`` when the sender did
        not stop in time); whatever the sender does later changes no count."""
        self.drop_all()

    def drop_all(self) -> None:
        """Count everything not settled as dropped, and refuse new events: the sender is done."""
        with self._lock:
            left = len(self._buffer) + self._inflight
            self._dropped += left
            self._inflight = self._inflight_bytes = self._buffer_bytes = 0
            self._buffer.clear()
            self._closed = True
            self.finished = True
            if not left:
                self._done_upto = self._accepted
        self.undelivered += left
        if left:
            log.warning("commpipe shim: closed with %d events undelivered (counted as dropped)",
                        left)
