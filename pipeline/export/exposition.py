"""The ``/metrics`` body, rendered in a forked copy of the worker so that the stream goes on.

A scrape at 10,000 edges is ~36 MB of text and most of a second of Python. Rendered by
the worker's own process (in its event loop, or in a thread beside it: Python runs one
of them at a time), that second is taken from the stream. Here the event loop, between
two of its steps (never in the middle of a table write), only collects the worker's own
(small) metrics and forks (a few milliseconds); the child's memory is the worker's at
that instant (copy on write), so it is a consistent snapshot of the table for free. The
child renders the text on another core, gzips it when asked, writes it and the render's
small :class:`pipeline.export.edges.Outcome` to a pipe, and exits; the HTTP request's
thread reads the pipe, applies the outcome (the series cap's state) and sends the body
(:mod:`pipeline.export.server`).

The child touches nothing it shares with the worker: its signal handlers go back to the
defaults first (a signal to the child must not reach the worker's event loop through
their shared wake-up pipe), it never logs or flushes the worker's buffers, and it ends
with ``os._exit``. A child that takes longer than the timeout is killed and the scrape
answers 503. One scrape renders at a time; others wait for it.

Where ``os.fork`` does not exist or fails (no memory or processes left for the copy: logged),
or with ``fork=False``, the event loop renders at once (the stream waits for it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import gc
import logging
import os
import pickle
import select
import signal
import struct
import threading
import time
import traceback
from collections.abc import Iterable, Iterator
from itertools import chain
from typing import TYPE_CHECKING, Any

from isal import isal_zlib

from pipeline.export import split
from pipeline.export.edges import EdgeExporter, Outcome

if TYPE_CHECKING:
    from pipeline.export.collectors import WorkerStatus

__all__ = ["CONTENT_TYPE", "Exposition", "RenderFailed", "worker_exposition"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
log = logging.getLogger("commpipe.metrics")
_TAIL = struct.Struct("!Qc3s")
"""What ends the child's answer, after the body and a payload of the given size: b"K" (the
payload is the pickled outcome and CPU) or b"E" (a traceback), then b"end"."""


class RenderFailed(RuntimeError):
    """The forked render failed or took too long (the scrape answers 503)."""


class Exposition:
    """The whole ``/metrics`` body: per-edge series, then the registry's (worker) series."""

    def __init__(self, edges: EdgeExporter, registry: Any, *, fork: bool | None = None,
                 timeout_s: float = 30.0, processes: int = 1) -> None:
        self.edges = edges
        self.registry = registry
        self.fork = hasattr(os, "fork") if fork is None else fork
        self.timeout_s = timeout_s
        self.processes = processes
        """Processes the forked render shares its edges over (:mod:`pipeline.export.split`)."""
        self._lock = threading.Lock()
        self.last: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
        """The previous scrape's seconds: waiting for the event loop, on it, the render
        from the fork to its last byte, and the render's CPU."""

    # ---- the request's thread --------------------------------------------------------------

    def scrape_from_thread(self, loop: asyncio.AbstractEventLoop, *, gzipped: bool = False
                           ) -> bytes:
        """The body (gzip-compressed if ``gzipped``), from a thread other than ``loop``'s
        (the HTTP server's)."""
        with self._lock:
            deadline = time.monotonic() + self.timeout_s
            began = time.perf_counter()
            future: concurrent.futures.Future[Any] = concurrent.futures.Future()
            loop.call_soon_threadsafe(self._on_loop, future, gzipped)
            try:
                started = future.result(self.timeout_s)
            except concurrent.futures.TimeoutError:
                if future.cancel():  # the loop never came to it: it never will now
                    raise RenderFailed("the event loop did not answer in time") from None
                started = future.result()  # it is forking: a moment
            if isinstance(started, bytes):  # rendered in the loop (no fork)
                return started
            pid, fd, taken, on_loop = started
            try:
                frame = _read_all(fd, deadline)
            finally:
                os.close(fd)
                _reap(pid, deadline)
            outcome, body, cpu = _parse(frame)
            self.edges.absorb(outcome)
            self.last = (taken - began, on_loop, time.perf_counter() - taken - on_loop, cpu)
            return body

    # ---- the event loop ---------------------------------------------------------------------

    def _on_loop(self, future: concurrent.futures.Future[Any], gzipped: bool) -> None:
        if not future.set_running_or_notify_cancel():
            return  # the request gave up waiting
        try:
            from prometheus_client import generate_latest

            began = time.perf_counter()
            worker = generate_latest(self.registry)
            if not self.fork:
                future.set_result(self._render_here(gzipped, worker, began))
                return
            read, write = os.pipe()
            with contextlib.suppress(OSError, AttributeError):  # Linux: 1 MB, not 64 KB
                fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, 1 << 20)
            try:
                pid = os.fork()
            except OSError as e:  # no memory or processes for a copy: render here
                os.close(read)
                os.close(write)
                log.warning("metrics: could not fork the render (%s); rendering in the event "
                            "loop, which the stream waits for", e)
                future.set_result(self._render_here(gzipped, worker, began))
                return
            if pid == 0:  # the child: never returns
                _child(self, read, write, worker, gzipped)
            os.close(write)
            future.set_result((pid, read, began, time.perf_counter() - began))
        except BaseException as e:  # noqa: BLE001 - the request's thread reports it
            future.set_exception(e)

    def _render_here(self, gzipped: bool, worker: bytes, began: float) -> bytes:
        """The body rendered in the loop, after ``worker`` (the registry's text) collected
        from ``began``."""
        cpu = time.process_time()
        edges, outcome = self.edges.render(self.edges.snapshot())
        self.edges.absorb(outcome)
        body = self.body(edges, worker)
        took = time.perf_counter() - began
        self.last = (0.0, took, took, time.process_time() - cpu)
        return b"".join(_gzip([body])) if gzipped else body

    def body(self, edges: bytes, worker: bytes) -> bytes:
        """The per-edge text, the worker's, and the previous scrape's cost."""
        return edges + self.tail(worker).encode()

    def tail(self, worker: bytes) -> str:
        """What follows the per-edge text: the worker's own series (the registry's text)
        and the previous scrape's cost."""
        ns = self.edges.ns
        cost = "".join(f'{ns}_exporter_scrape_seconds{{part="{part}"}} {value!r}\n'
                       for part, value in zip(("wait", "loop", "render", "render_cpu"),
                                              self.last, strict=True))
        return (worker.decode() + f"# HELP {ns}_exporter_scrape_seconds The previous "
                f"scrape's cost: waiting for the event loop, on it, the render from the "
                f"fork to its last byte, and the render's CPU\n"
                f"# TYPE {ns}_exporter_scrape_seconds gauge\n{cost}")

    def close(self) -> None:
        """Nothing to release (kept for the server's stop)."""


def _child(exposition: Exposition, read: int, write: int, worker: bytes,
           gzipped: bool) -> None:
    """The forked render: write its frame to ``write`` and exit, whatever happens."""
    code = 1
    try:
        for sig in signal.valid_signals():
            with contextlib.suppress(OSError, ValueError, TypeError):
                if signal.getsignal(sig) not in (signal.SIG_DFL, signal.SIG_IGN, None):
                    signal.signal(sig, signal.SIG_DFL)
        with contextlib.suppress(ValueError):
            signal.set_wakeup_fd(-1)
        split.own_session()
        gc.disable()  # short-lived: collecting would only copy the worker's pages
        os.close(read)
        cpu = time.process_time()
        edges = exposition.edges
        pieces, outcome = split.render(edges, edges.snapshot(), processes=exposition.processes,
                                       deadline=time.monotonic() + exposition.timeout_s,
                                       close=(write,))
        # the pieces one by one, each made, encoded (and compressed) and sent before the
        # next: whole, the text is 36 MB at 10,000 edges, twice (str and bytes), in new
        # pages, and each page the child takes is a fault (copy on write, or zeroed)
        out: Iterable[bytes] = map(_encoded, chain(pieces, (exposition.tail(worker),)))
        for chunk in _gzip(out) if gzipped else out:
            split.write_all(write, chunk)
        done = pickle.dumps((outcome, time.process_time() - cpu), pickle.HIGHEST_PROTOCOL)
        split.write_all(write, done + _TAIL.pack(len(done), b"K", b"end"))
        code = 0
    except BaseException:  # noqa: BLE001 - reported through the pipe, never raised here
        with contextlib.suppress(BaseException):
            text = traceback.format_exc(limit=8).encode()
            split.write_all(write, text + _TAIL.pack(len(text), b"E", b"end"))
    finally:
        os._exit(code)


def _encoded(piece: str | bytes) -> bytes:
    return piece.encode() if type(piece) is str else piece  # type: ignore[return-value]


def _gzip(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """``chunks`` as one gzip stream (ISA-L's level 1: text compresses ~20x even so)."""
    z = isal_zlib.compressobj(1, isal_zlib.DEFLATED, 31)  # wbits 16 + 15: gzip's container
    for chunk in chunks:
        out = z.compress(chunk)
        if out:
            yield out
    yield z.flush()


def _read_all(fd: int, deadline: float) -> bytes:
    chunks: list[bytes] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise RenderFailed("the render took longer than its timeout")
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _reap(pid: int, deadline: float) -> None:
    """Wait for the child (killed if it is still there past ``deadline``)."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return
            time.sleep(0.005)


def _parse(frame: bytes) -> tuple[Outcome, bytes, float]:
    """The child's answer: its outcome, the body before it, and its CPU."""
    end = len(frame) - _TAIL.size
    if end < 0:
        raise RenderFailed("the render ended without an answer")
    size, kind, mark = _TAIL.unpack_from(frame, end)
    if mark != b"end" or size > end:
        raise RenderFailed("the render ended without an answer")
    data = frame[end - size:end]
    if kind != b"K":
        raise RenderFailed("the render failed: " + data.decode(errors="replace").strip()
                           .rsplit("\n", 1)[-1])
    try:
        outcome, cpu = pickle.loads(data)  # noqa: S301 - our own child's, through our pipe
    except Exception:  # noqa: BLE001 - a cut-off body that happened to end like a trailer
        raise RenderFailed("the render ended without an answer") from None
    return outcome, frame[:end - size], cpu


def worker_exposition(worker: WorkerStatus, settings: Any, rollups: Any, slo: Any,
                      sink: Any) -> Exposition:
    """A worker's ``/metrics``: its edges from ``rollups``, and its own series."""
    from prometheus_client import CollectorRegistry

    from pipeline.export.collectors import WorkerCollector
    from pipeline.settings import parse_buckets

    s = settings
    registry = CollectorRegistry(auto_describe=False)
    registry.register(WorkerCollector(worker, namespace=s.metrics_namespace, sink=sink))
    edges = EdgeExporter(rollups, namespace=s.metrics_namespace,
                         stale_s=s.metrics_stale_s, max_series=s.metrics_max_series,
                         buckets=parse_buckets(s.metrics_latency_buckets), slo=slo)
    return Exposition(edges, registry, processes=s.metrics_render_processes)
