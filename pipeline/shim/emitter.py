"""The producer shim services import: ``Emitter`` (sync, thread-safe) and ``AsyncEmitter``.

``emit()`` and the per-kind helpers only append to a bounded buffer
(:class:`pipeline.shim.outbox.Outbox`, bounded in events and bytes): they never
wait on the network and never raise into the caller, whatever they are given
(what is not an event, or cannot be encoded as JSON, is counted as invalid and
``emit`` returns False). A background sender (:class:`pipeline.shim.sender.Sender`)
validates, batches by edge and sends; what it cannot deliver is counted in
:meth:`stats`, so ``sent + dropped + failed + invalid`` always equals what was
emitted once the emitter is closed. Emitters keep working in a forked child
(:mod:`pipeline.shim.forking`). Defaults come from ``COMMPIPE_*`` through
:class:`pipeline.settings.Settings`.

::

    from pipeline import Emitter

    emitter = Emitter(bootstrap_servers="localhost:9092")
    with emitter.call("orders", "payments", protocol="http", method="POST /pay") as call:
        call.status_code = charge(card)          # response, or error/timeout if it raises
    emitter.retry(source_service="orders", target_service="payments", protocol="http",
                  attempt=2, backoff_ms=200, error_type="connection")
    emitter.close()
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import threading
import time
import weakref
from collections.abc import Mapping
from typing import Any

from pipeline.settings import Settings
from pipeline.shim import forking
from pipeline.shim.call import Call, error_type_of
from pipeline.shim.kinds import EventKinds
from pipeline.shim.outbox import EmitterStats, Outbox
from pipeline.shim.sender import Sender, SenderLoop
from pipeline.wire.events import Event

__all__ = ["AsyncEmitter", "Call", "Emitter", "EmitterStats", "error_type_of"]

log = logging.getLogger("commpipe.shim")

_CLOSE_GRACE_S = 0.5
"""How long close() waits beyond its timeout for the sender to wind down (the sender's own
waits end at the deadline; this covers stopping the producer and closing the loop)."""

def _outbox(settings: Settings, bootstrap_servers: str | None, topic: str | None,
            buffer_size: int | None, buffer_bytes: int | None) -> Outbox:
    options = settings.kafka_client_options()
    if bootstrap_servers is not None:
        options["bootstrap_servers"] = bootstrap_servers
    options.update(acks="all", request_timeout_ms=settings.shim_request_timeout_ms,
                   max_batch_size=256 * 1024, max_request_size=2 * settings.shim_batch_bytes,
                   client_id="commpipe-shim")
    return Outbox(topic=topic or settings.topic,
                  capacity=buffer_size or settings.shim_buffer_size,
                  capacity_bytes=buffer_bytes or settings.shim_buffer_bytes,
                  batch_events=settings.shim_batch_events,
                  batch_bytes=settings.shim_batch_bytes,
                  linger_s=settings.shim_linger_ms / 1000.0,
                  producer_options=options)


def _wire(event: Any, outbox: Outbox) -> dict[str, Any] | None:
    """A fresh wire dict of what ``emit`` got; ``None`` (counted as invalid and logged)
    when it is neither an :class:`Event` nor a mapping, or reading it raised."""
    try:
        if isinstance(event, Event):
            return event.to_wire()
        if isinstance(event, Mapping):
            return dict(event)
        reason = f"emit() takes a mapping or an Event, got {type(event).__name__}"
    except Exception as e:  # noqa: BLE001 - a broken mapping must not reach the caller
        reason = (f"emit() got a {type(event).__name__} that cannot be read as a mapping "
                  f"({type(e).__name__})")
    outbox.reject(reason)
    return None


class Emitter(EventKinds):
    """Thread-safe, synchronous emitter; sends from its own background thread.

    ``bootstrap_servers``, ``topic``, ``buffer_size`` and ``buffer_bytes`` default to the
    ``COMMPIPE_*`` settings (``COMMPIPE_KAFKA_BOOTSTRAP``, ``COMMPIPE_TOPIC``,
    ``COMMPIPE_SHIM_BUFFER_SIZE``, ``COMMPIPE_SHIM_BUFFER_BYTES``); pass ``settings=`` to
    use another Settings object.
    The broker may start after the emitter: events wait in the buffer meanwhile.
    At interpreter exit an open emitter is closed, waiting up to
    ``COMMPIPE_SHIM_CLOSE_TIMEOUT_S`` for delivery (host names are resolved even then).
    After ``fork()`` the child's emitter starts afresh: its own sender (started by its
    first emit), its own counts, nothing of the parent's buffer.
    """

    def __init__(self, bootstrap_servers: str | None = None, topic: str | None = None, *,
                 buffer_size: int | None = None, buffer_bytes: int | None = None,
                 settings: Settings | None = None) -> None:
        self._settings = settings or Settings.from_env()
        self._outbox = _outbox(self._settings, bootstrap_servers, topic, buffer_size,
                               buffer_bytes)
        self._put = self._outbox.put
        self._closed = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._start_lock = threading.Lock()
        self._start_sender()
        ref = weakref.ref(self)
        self._atexit = lambda: (e := ref()) is not None and e.close()
        atexit.register(self._atexit)
        forking.track(self)

    def _start_sender(self) -> None:
        self._loop = loop = SenderLoop()
        self._stop = stop = asyncio.Event()
        self._thread = threading.Thread(target=self._serve, args=(loop, stop, self._outbox),
                                        name="commpipe-shim", daemon=True)
        self._thread.start()

    def _after_fork_in_child(self) -> None:
        """(:mod:`pipeline.shim.forking`) A fresh outbox; the first emit starts a sender."""
        self._outbox = self._outbox.forked()
        self._thread = self._loop = None
        self._start_lock = threading.Lock()
        self._put = self._put_first

    def _put_first(self, event: dict[str, Any]) -> bool:
        with self._start_lock:
            if self._thread is None:
                self._start_sender()
                self._put = self._outbox.put
        return self._outbox.put(event)

    @staticmethod
    def _serve(loop: asyncio.AbstractEventLoop, stop: asyncio.Event, outbox: Outbox) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(Sender(outbox).run(stop))
        except Exception:  # the sender must never die silently
            log.exception("commpipe shim: sender stopped unexpectedly")
        finally:
            try:  # as asyncio.run does: let what aiokafka left running see its cancellation
                left = asyncio.all_tasks(loop)
                for task in left:
                    task.cancel()
                if left:
                    loop.run_until_complete(asyncio.wait(left, timeout=0.5))
                loop.run_until_complete(loop.shutdown_asyncgens())
            except Exception:  # noqa: BLE001 - closing the loop anyway
                log.debug("commpipe shim: cleaning up the sender's loop failed", exc_info=True)
            loop.close()

    def emit(self, event: Mapping[str, Any] | Event) -> bool:
        """Queue one event (a wire dict or an :class:`Event`); False if it was dropped or is
        not an event at all (counted in ``stats().invalid``). Never raises."""
        wire = _wire(event, self._outbox)
        return False if wire is None else self._put(wire)

    def stats(self) -> EmitterStats:
        """Counts so far: sent, dropped, failed, invalid, and how many are buffered now."""
        return self._outbox.stats()

    def _wake(self) -> None:
        wake, loop = self._outbox.wake, self._loop
        if wake is not None and loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # loop closed in between
                pass

    def flush(self, timeout: float | None = None) -> bool:
        """Send what was emitted before this call; True once all of it is settled (sent, or
        counted failed or invalid), False on timeout or when the emitter has stopped with
        events undelivered. Events emitted meanwhile do not hold it up."""
        mark = self._outbox.mark()
        deadline = None if timeout is None else time.monotonic() + timeout
        self._wake()
        while not self._outbox.flushed(mark):
            thread = self._thread
            if self._outbox.finished or thread is None or not thread.is_alive():
                return False
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    def close(self, timeout: float | None = None) -> bool:
        """Deliver what is buffered (waiting up to ``timeout`` seconds, default
        ``COMMPIPE_SHIM_CLOSE_TIMEOUT_S``), then stop; later emits are dropped.
        Returns True when nothing was left undelivered. Safe to call twice."""
        if self._closed:
            return self._outbox.undelivered == 0 and self._outbox.pending() == 0
        self._closed = True
        atexit.unregister(self._atexit)
        timeout = self._settings.shim_close_timeout_s if timeout is None else timeout
        self._outbox.close()
        self._outbox.deadline = time.monotonic() + timeout
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:  # a forked child that never emitted
            self._outbox.abandon()
            return True
        try:
            loop.call_soon_threadsafe(self._stop.set)
        except RuntimeError:
            pass
        self._wake()
        thread.join(timeout + _CLOSE_GRACE_S)
        if thread.is_alive():  # stuck in something that ignores the deadline
            log.warning("commpipe shim: the sender did not stop within close(timeout=%s); "
                        "what it still held is counted as dropped", timeout)
            self._outbox.abandon()
        return self._outbox.undelivered == 0 and self._outbox.pending() == 0

    def __enter__(self) -> Emitter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncEmitter(EventKinds):
    """The asyncio twin of :class:`Emitter`: the sender is a task in the running loop.

    The emit methods are plain (non-async) calls, safe inside coroutines; use
    ``async with AsyncEmitter(...) as emitter:`` or ``await emitter.start()`` /
    ``await emitter.close()``. Emitting before ``start()`` buffers; the first emit
    inside a running loop starts the sender.
    """

    def __init__(self, bootstrap_servers: str | None = None, topic: str | None = None, *,
                 buffer_size: int | None = None, buffer_bytes: int | None = None,
                 settings: Settings | None = None) -> None:
        self._settings = settings or Settings.from_env()
        self._outbox = _outbox(self._settings, bootstrap_servers, topic, buffer_size,
                               buffer_bytes)
        self._task: asyncio.Task[None] | None = None
        self._stop: asyncio.Event | None = None
        forking.track(self)

    def _after_fork_in_child(self) -> None:
        """(:mod:`pipeline.shim.forking`) A fresh outbox; the next emit inside a running
        loop starts a sender task."""
        self._outbox = self._outbox.forked()
        self._task = self._stop = None

    async def start(self) -> AsyncEmitter:
        """Start the sender task in the running loop (idempotent)."""
        self._ensure_task()
        return self

    def _ensure_task(self) -> None:
        if self._task is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop yet: events wait in the buffer until start()
        self._stop = asyncio.Event()
        self._task = loop.create_task(Sender(self._outbox).run(self._stop),
                                      name="commpipe-shim")

    def _put(self, event: dict[str, Any]) -> bool:
        if self._task is None:
            self._ensure_task()
        return self._outbox.put(event)

    def emit(self, event: Mapping[str, Any] | Event) -> bool:
        """Queue one event (a wire dict or an :class:`Event`); False if it was dropped or is
        not an event at all (counted in ``stats().invalid``). Never raises."""
        wire = _wire(event, self._outbox)
        return False if wire is None else self._put(wire)

    def stats(self) -> EmitterStats:
        """Counts so far: sent, dropped, failed, invalid, and how many are buffered now."""
        return self._outbox.stats()

    async def flush(self, timeout: float | None = None) -> bool:
        """Send what was emitted before this call; True once all of it is settled (as
        :meth:`Emitter.flush`), False on timeout or when the sender has stopped."""
        self._ensure_task()
        mark = self._outbox.mark()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._outbox.flushed(mark):
            if self._outbox.finished or self._task is None or self._task.done():
                return False
            if deadline is not None and time.monotonic() >= deadline:
                return False
            if self._outbox.wake is not None:
                self._outbox.wake.set()
            await asyncio.sleep(0.005)
        return True

    async def close(self, timeout: float | None = None) -> bool:
        """Deliver what is buffered (up to ``timeout`` s), then stop the sender task."""
        self._ensure_task()
        timeout = self._settings.shim_close_timeout_s if timeout is None else timeout
        self._outbox.close()
        self._outbox.deadline = time.monotonic() + timeout
        if self._task is None or self._stop is None:
            return self._outbox.pending() == 0
        self._stop.set()
        if self._outbox.wake is not None:
            self._outbox.wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout + _CLOSE_GRACE_S)
        except TimeoutError:
            self._task.cancel()
            self._outbox.abandon()
        except Exception:  # noqa: BLE001 - close() never raises into the caller
            log.exception("commpipe shim: sender stopped unexpectedly")
        return self._outbox.undelivered == 0 and self._outbox.pending() == 0

    async def __aenter__(self) -> AsyncEmitter:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
