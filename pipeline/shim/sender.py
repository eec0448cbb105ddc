"""The shim's sender: the asyncio loop that drains an :class:`~pipeline.shim.outbox.Outbox`
into Kafka, one round at a time.

A round takes everything buffered, has the outbox validate, group by edge and encode it,
and sends one record per edge (or sends again what a retriable failure left, with backoff,
before taking anything new). The broker may be away or slow for as long as it likes:
events wait in the outbox's bounded buffer. Once ``stop`` is set (``close()``), every wait
on the broker (connecting, sending, acknowledgements, stopping the producer) ends at the
outbox's ``deadline``; what is left then is counted as dropped, so the counts always add up.
The sender never stops because of one event or one bad round (see
:meth:`~pipeline.shim.outbox.Outbox.fail_inflight`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from pipeline.shim.outbox import Outbox, _Record

if TYPE_CHECKING:
    from aiokafka import AIOKafkaProducer

__all__ = ["Sender", "SenderLoop", "reset_log_limits", "suppressed_log_lines"]

log = logging.getLogger("commpipe.shim")

_BACKOFF_MIN_S = 0.1
_BACKOFF_MAX_S = 5.0


_LOG_EVERY_S = 10.0
_AIOKAFKA_LOGGERS = ("aiokafka", "aiokafka.conn", "aiokafka.producer.sender")


class _RateLimit(logging.Filter):
    """At most one warning or error per message template per ``_LOG_EVERY_S`` from
    aiokafka's loggers, which otherwise log 'Unable connect to ...' at ERROR on every
    reconnection attempt while a broker is away. The next line let through says how many
    like it were left out. Installed on those loggers (for every aiokafka client of the
    process) when the first sender starts; DEBUG and INFO lines are not touched."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self.last: dict[tuple[str, str], tuple[float, int]] = {}
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, str(record.msg))
        now = time.monotonic()
        with self._lock:
            last, quiet = self.last.get(key, (-_LOG_EVERY_S, 0))
            if now - last < _LOG_EVERY_S:
                self.last[key] = (last, quiet + 1)
                self.suppressed += 1
                return False
            self.last[key] = (now, 0)
        if quiet:
            record.msg = (f"{record.msg} [and {quiet} more like it in the last "
                          f"{now - last:.0f} s, not logged]")
        return True


_AIOKAFKA_LIMIT = _RateLimit()
_installed = False


def _limit_aiokafka_logs() -> None:
    global _installed
    if not _installed:
        _installed = True
        for name in _AIOKAFKA_LOGGERS:
            logging.getLogger(name).addFilter(_AIOKAFKA_LIMIT)


def reset_log_limits() -> None:
    """Forget what was logged lately (tests)."""
    with _AIOKAFKA_LIMIT._lock:
        _AIOKAFKA_LIMIT.last.clear()
        _AIOKAFKA_LIMIT.suppressed = 0


def suppressed_log_lines() -> int:
    """aiokafka warnings and errors left out by the rate limit since the last reset."""
    return _AIOKAFKA_LIMIT.suppressed


class _Deadline(Exception):
    """Internal: ``close()``'s timeout passed while the sender was waiting on Kafka."""


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


class Sender:
    """Drains one outbox; ``retry`` holds the records a retriable failure left."""

    def __init__(self, box: Outbox) -> None:
        self.box = box
        self.retry: list[_Record] = []
        _limit_aiokafka_logs()

    async def run(self, stop: asyncio.Event) -> None:
        """Drain the outbox until ``stop`` is set and everything is delivered.

        After ``stop`` is set the loop keeps delivering until :attr:`deadline`
        (monotonic seconds, ``None`` = no limit); whatever is left then is dropped
        and counted, so the stats always add up.
        """
        self.box.wake = asyncio.Event()
        producer: AIOKafkaProducer | None = None
        backoff = _BACKOFF_MIN_S
        try:
            while True:
                if not stop.is_set():
                    try:
                        await asyncio.wait_for(self.box.wake.wait(), self.box.linger_s)
                    except TimeoutError:
                        pass
                    self.box.wake.clear()
                if self.box.orphaned or (stop.is_set() and (
                        self.box.pending() == 0 or self._past_deadline())):
                    return
                if producer is None:
                    producer = await self._bounded(stop, self._start_producer())
                if producer is not None:
                    try:
                        if not self.retry:
                            self.retry = self.box.encode(*self.box.take())
                        records, self.retry = self.retry, []
                        delivered = await self._bounded(stop, self._send(producer, records))
                    except _Deadline:
                        raise
                    except Exception as e:  # noqa: BLE001 - the sender must keep going
                        self.box.fail_inflight(e, self.retry)
                        delivered = not self.retry
                    if delivered:
                        self.box.round_done()
                        backoff = _BACKOFF_MIN_S
                        continue
                await self._pause(stop, backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX_S)
        except _Deadline:
            pass  # close()'s time is up: what is left is counted as dropped below
        finally:
            if not self.box.orphaned:  # in a forked child the producer's sockets are the parent's
                if producer is not None:
                    await self._stop_producer(producer, stop)
                self.retry = []
                self.box.drop_all()

    async def _send(self, producer: AIOKafkaProducer, records: list[_Record]) -> bool:
        """Send records; keep retriable failures for the next round. True if all went."""
        from aiokafka.errors import KafkaError

        async def one(record: _Record) -> None:
            fut = await producer.send(self.box.topic, record.value, key=record.key,
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
                self.retry.append(record)
                self.box.log_limited("retry", "commpipe shim: Kafka send failed (%s); keeping %d "
                                  "events to retry", type(result).__name__, record.events)
            elif isinstance(result, Exception):
                failed += record.events
                held += record.held
                self.box.log_limited("failed", "commpipe shim: Kafka refused a record of %d "
                                  "events for good: %r", record.events, result)
            else:  # cancellation and the like: not ours to swallow
                raise result
        self.box.settle(sent=sent, failed=failed, held=held)
        return not self.retry

    async def _start_producer(self) -> AIOKafkaProducer | None:
        from aiokafka import AIOKafkaProducer
        from aiokafka.errors import KafkaError

        producer = AIOKafkaProducer(**self.box.producer_options)
        try:
            await producer.start()
        except asyncio.CancelledError:  # close()'s deadline passed while connecting
            await _quietly(producer.stop(), 0.2)
            raise
        except Exception as e:  # noqa: BLE001 - KafkaError, OSError, or anything else: retried
            self.box.log_limited("connect", "commpipe shim: cannot reach Kafka at %s (%s%s); "
                              "buffering up to %d events and retrying",
                              self.box.producer_options.get("bootstrap_servers"),
                              type(e).__name__,
                              "" if isinstance(e, (KafkaError, OSError)) else f": {e}",
                              self.box.capacity)
            await _quietly(producer.stop(), 1.0)
            return None
        log.info("commpipe shim: connected to Kafka at %s",
                 self.box.producer_options.get("bootstrap_servers"))
        return producer

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
            remaining = None if self.box.deadline is None else max(
                0.0, self.box.deadline - time.monotonic()) + grace
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
        return self.box.deadline is not None and time.monotonic() >= self.box.deadline

    async def _pause(self, stop: asyncio.Event, seconds: float) -> None:
        """Back off before the next try; while stopping, never past the deadline."""
        if stop.is_set():
            if self.box.deadline is not None:
                seconds = max(0.0, min(seconds, self.box.deadline - time.monotonic()))
            await asyncio.sleep(seconds)
            return
        try:
            await asyncio.wait_for(stop.wait(), seconds)
        except TimeoutError:
            pass

