"""The shim's bounded outbox and the asyncio loop that drains it into Kafka.

Both emitters share this: the caller's thread only appends a dict to a deque
under a lock (never a network call, never an exception); :meth:`Outbox.run`
(an asyncio task, in the emitter's own thread or in the caller's loop) takes
everything buffered, masks credentials in ``error_message`` and bounds it
(:func:`pipeline.wire.redact.safe_message`), validates it with the same rules the worker applies,
groups it by edge, and sends one record per edge per round: a JSON array of at
most ``batch_events`` events and ``batch_bytes`` bytes, keyed by the edge.

Accounting: every event handed to :meth:`Outbox.put` ends in exactly one of
``sent``, ``dropped`` (buffer full, emitter closed, or undelivered at close),
``failed`` (the broker refused it for good) or ``invalid`` (it breaks wire
format v1; the reason is logged). While the broker is away, records that
failed with a retriable error are kept and sent again with backoff; they count
against the buffer bound, so memory stays bounded.

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
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from pipeline.errors import EventValidationError
from pipeline.wire.decode import validate_event
from pipeline.wire.headers import PRODUCER_HEADER, SEQ_HEADER
from pipeline.wire.redact import safe_message

if TYPE_CHECKING:
    from aiokafka import AIOKafkaProducer

__all__ = ["EmitterStats", "Outbox", "SenderLoop"]

log = logging.getLogger("commpipe.shim")

_BACKOFF_MIN_S = 0.1
_BACKOFF_MAX_S = 5.0
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


async def _quietly(awaitable: Any, timeout: float) -> None:
    """Await a clean-up step for at most ``timeout`` seconds; its failure changes nothing."""
    try:
        await asyncio.wait_for(awaitable, timeout)
    except Exception:  # noqa: BLE001 - best effort: the connection is being given up anyway
        log.debug("commpipe shim: clean-up step failed", exc_info=True)


class SenderLoop(asyncio.SelectorEventLoop):
    """The event loop of :class:`~pipeline.shim.emitter.Emitter`'s own sender thread.

    At interpreter exit (where ``close()`` runs from ``atexit``) asyncio can no longer
    start the executor thread it resolves host names in (``RuntimeError: can't register
    atexit after shutdown``), so with a host name such as the default ``localhost`` every
    buffered event was lost. This loop then resolves in its own thread, which belongs to
    the sender and blocks no one else.
    """

    async def getaddrinfo(self, host: Any, port: Any, *, family: int = 0, type: int = 0,
                          proto: int = 0, flags: int = 0) -> Any:
        try:
            return await super().getaddrinfo(host, port, family=family, type=type,
                                             proto=proto, flags=flags)
        except RuntimeError:  # no executor any more: interpreter shutdown
            return socket.getaddrinfo(host, port, family, type, proto, flags)


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


class _Deadline(Exception):
    """Internal: ``close()``'s timeout passed while the sender was waiting on Kafka."""


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
        self._capacity = capacity
        self._capacity_bytes = capacity_bytes if capacity_bytes is not None else 2**62
        self._batch_events = batch_events
        self._batch_bytes = batch_bytes
        self._linger_s = linger_s
        self._producer_options = producer_options
        self._lock = threading.Lock()
        self._buffer: deque[tuple[dict[str, Any], int]] = deque()  # (event, its JSON bytes)
        self._buffer_bytes = 0
        self._inflight = 0  # events taken from the buffer and not yet sent, failed or dropped
        self._inflight_bytes = 0
        self._retry: list[_Record] = []
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
            elif len(self._buffer) + self._inflight >= self._capacity:
                full = f"buffer full ({self._capacity} events)"
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
        self._log_limited("invalid", "commpipe shim: %s", reason)

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

    # ---- sender side (one asyncio task) ----------------------------------------------------

    def _take(self) -> tuple[list[dict[str, Any]], list[int]]:
        """Everything buffered, as (events, their sizes); it is in flight from now on."""
        with self._lock:
            taken = self._buffer
            self._buffer = deque()
            self._inflight += len(taken)
            self._inflight_bytes += self._buffer_bytes
            self._buffer_bytes = 0
            self._taken_upto = self._accepted
        return [e for e, _ in taken], [n for _, n in taken]

    def _round_done(self) -> None:
        """The last round left nothing to retry: all it took is settled."""
        with self._lock:
            self._done_upto = self._taken_upto

    def _settle(self, *, sent: int = 0, failed: int = 0, invalid: int = 0,
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

    def _log_limited(self, what: str, msg: str, *args: Any) -> None:
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
            self._log_limited("invalid", "commpipe shim: %s", reason)
        if invalid:
            self._settle(invalid=invalid, held=invalid_bytes)
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

    async def _send(self, producer: AIOKafkaProducer, records: list[_Record]) -> bool:
        """Send records; keep retriable failures for the next round. True if all went."""
        from aiokafka.errors import KafkaError

        async def one(record: _Record) -> None:
            fut = await producer.send(self.topic, record.value, key=record.key,
                                      headers=record.headers)
            await fut

        results = await asyncio.gather(*(one(r) for r in records), return_exceptions=True)
        sent = failed = held = 0
        for record, result in zip(records, results, strict=True):
            if result is None:
                sent += record.events
                held += record.held
            elif (isinstance(result, KafkaError) and getattr(result, "retriable", False)) or \
                    isinstance(result, (asyncio.TimeoutError, OSError)):
                self._retry.append(record)
                self._log_limited("retry", "commpipe shim: Kafka send failed (%s); keeping %d "
                                  "events to retry", type(result).__name__, record.events)
            elif isinstance(result, Exception):
                failed += record.events
                held += record.held
                self._log_limited("failed", "commpipe shim: Kafka refused a record of %d "
                                  "events for good: %r", record.events, result)
            else:  # cancellation and the like: not ours to swallow
                raise result
        self._settle(sent=sent, failed=failed, held=held)
        return not self._retry

    async def _start_producer(self) -> AIOKafkaProducer | None:
        from aiokafka import AIOKafkaProducer
        from aiokafka.errors import KafkaError

        producer = AIOKafkaProducer(**self._producer_options)
        try:
            await producer.start()
        except asyncio.CancelledError:  # close()'s deadline passed while connecting
            await _quietly(producer.stop(), 0.2)
            raise
        except Exception as e:  # noqa: BLE001 - KafkaError, OSError, or anything else: retried
            self._log_limited("connect", "commpipe shim: cannot reach Kafka at %s (%s%s); "
                              "buffering up to %d events and retrying",
                              self._producer_options.get("bootstrap_servers"),
                              type(e).__name__,
                              "" if isinstance(e, (KafkaError, OSError)) else f": {e}",
                              self._capacity)
            await _quietly(producer.stop(), 1.0)
            return None
        log.info("commpipe shim: connected to Kafka at %s",
                 self._producer_options.get("bootstrap_servers"))
        return producer

    async def run(self, stop: asyncio.Event) -> None:
        """Drain the outbox until ``stop`` is set and everything is delivered.

        After ``stop`` is set the loop keeps delivering until :attr:`deadline`
        (monotonic seconds, ``None`` = no limit); whatever is left then is dropped
        and counted, so the stats always add up.
        """
        self.wake = asyncio.Event()
        producer: AIOKafkaProducer | None = None
        backoff = _BACKOFF_MIN_S
        try:
            while True:
                if not stop.is_set():
                    try:
                        await asyncio.wait_for(self.wake.wait(), self._linger_s)
                    except TimeoutError:
                        pass
                    self.wake.clear()
                if self.orphaned or (stop.is_set() and (
                        self.pending() == 0 or self._past_deadline())):
                    return
                if producer is None:
                    producer = await self._bounded(stop, self._start_producer())
                if producer is not None:
                    try:
                        if not self._retry:
                            self._retry = self.encode(*self._take())
                        records, self._retry = self._retry, []
                        delivered = await self._bounded(stop, self._send(producer, records))
                    except _Deadline:
                        raise
                    except Exception as e:  # noqa: BLE001 - the sender must keep going
                        self._fail_inflight(e)
                        delivered = not self._retry
                    if delivered:
                        self._round_done()
                        backoff = _BACKOFF_MIN_S
                        continue
                await self._pause(stop, backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX_S)
        except _Deadline:
            pass  # close()'s time is up: what is left is counted as dropped below
        finally:
            if not self.orphaned:  # in a forked child the producer's sockets are the parent's
                if producer is not None:
                    await self._stop_producer(producer, stop)
                self._drop_all()

    async def _bounded(self, stop: asyncio.Event, awaitable: Any, *, grace: float = 0.0
                       ) -> Any:
        """Await ``awaitable`` (connecting, sending, waiting for acknowledgements); once
        ``stop`` is set, no longer than :attr:`deadline` (+ ``grace``), after which it is
        cancelled and :class:`_Deadline` raised. A broker that accepts connections and
        never answers cannot hold ``close()`` past its timeout."""
        task = asyncio.ensure_future(awaitable)
        try:
            while not stop.is_set():
                stopping = asyncio.ensure_future(stop.wait())
                try:
                    await asyncio.wait((task, stopping), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    stopping.cancel()
                if task.done():
                    return task.result()
            remaining = None if self.deadline is None else max(
                0.0, self.deadline - time.monotonic()) + grace
            await asyncio.wait((task,), timeout=remaining)
            if task.done():
                return task.result()
            raise _Deadline
        finally:
            if not task.done():
                task.cancel()

    async def _stop_producer(self, producer: AIOKafkaProducer, stop: asyncio.Event) -> None:
        """Stop the producer (it flushes what aiokafka still holds), within the deadline; past
        it, close its connections without waiting for the broker."""
        try:
            await self._bounded(stop, producer.stop(), grace=0.1)
        except _Deadline:
            client = getattr(producer, "client", None)
            if client is not None:
                try:
                    await asyncio.wait_for(client.close(), 0.2)
                except Exception:  # noqa: BLE001 - closing anyway; nothing more to do
                    pass

    def _past_deadline(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    async def _pause(self, stop: asyncio.Event, seconds: float) -> None:
        """Back off before the next try; while stopping, never past the deadline."""
        if stop.is_set():
            if self.deadline is not None:
                seconds = max(0.0, min(seconds, self.deadline - time.monotonic()))
            await asyncio.sleep(seconds)
            return
        try:
            await asyncio.wait_for(stop.wait(), seconds)
        except TimeoutError:
            pass

    def _fail_inflight(self, error: Exception) -> None:
        """After an unexpected error in a round: what it had taken (and is not kept to retry)
        counts as failed, and the sender carries on with the next round."""
        with self._lock:
            if self.finished:
                return
            kept = sum(r.events for r in self._retry)
            lost = max(0, self._inflight - kept)
            self._failed += lost
            self._inflight -= lost
            self._inflight_bytes = sum(r.held for r in self._retry)
        log.error("commpipe shim: unexpected error in the sender (%s: %s); %d events counted "
                  "as failed, sending goes on", type(error).__name__, error, lost,
                  exc_info=error)

    def abandon(self) -> None:
        """Count everything not yet settled as dropped, now (``close()`` when the sender did
        not stop in time); whatever the sender does later changes no count."""
        self._drop_all()

    def _drop_all(self) -> None:
        self._retry = []
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
