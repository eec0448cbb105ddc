"""The ``/metrics`` body without stopping the stream: snapshot on the event loop, text elsewhere.

:meth:`Exposition.on_loop` runs in the event loop, between two of its steps (never in the
middle of a table write): it takes the per-edge snapshot and renders the worker's own
(small) metrics. Everything else, the per-edge text
(:meth:`pipeline.export.edges.EdgeExporter.render`) above all, runs in the caller's
thread: :meth:`scrape_from_thread` is what the HTTP server's request thread calls
(:mod:`pipeline.export.server`), :meth:`scrape` the same from a coroutine.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from pipeline.export.edges import EdgeExporter, Snapshot

__all__ = ["CONTENT_TYPE", "Exposition"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


SWITCH_S = 0.0005
"""Python's thread switch interval while a scrape renders (its default is 5 ms). The event
loop gives up Python's lock at every socket call and must wait for it to come back; with
a thread rendering beside it, each wait lasted up to the interval, and at 10,000 edges
the loop crawled (measured: 341,400 events in 36 s unscraped, 5,900 scraped)."""

_switches = threading.Lock()
_rendering = 0


@contextlib.contextmanager
def _short_switches() -> Iterator[None]:
    global _rendering
    with _switches:
        if _rendering == 0:
            _short_switches.saved = sys.getswitchinterval()  # type: ignore[attr-defined]
            sys.setswitchinterval(SWITCH_S)
        _rendering += 1
    try:
        yield
    finally:
        with _switches:
            _rendering -= 1
            if _rendering == 0:
                sys.setswitchinterval(_short_switches.saved)  # type: ignore[attr-defined]


class Exposition:
    """The whole ``/metrics`` body: per-edge series, then the registry's (worker) series."""

    def __init__(self, edges: EdgeExporter, registry: Any) -> None:
        self.edges = edges
        self.registry = registry
        self.last: tuple[float, float, float] = (0.0, 0.0, 0.0)
        """The previous scrape's seconds: on the loop, rendering (wall), rendering (CPU)."""

    async def on_loop(self) -> tuple[Snapshot, bytes, float]:
        """(per-edge snapshot, the worker's own metrics, seconds it took): run it in the
        event loop."""
        from prometheus_client import generate_latest

        began = time.perf_counter()
        snapshot = self.edges.snapshot()
        worker = generate_latest(self.registry)
        return snapshot, worker, time.perf_counter() - began

    def scrape_from_thread(self, loop: asyncio.AbstractEventLoop, timeout: float = 30.0
                           ) -> bytes:
        """The body, from a thread other than ``loop``'s."""
        snapshot, worker, on_loop = asyncio.run_coroutine_threadsafe(
            self.on_loop(), loop).result(timeout)
        return self._finish(snapshot, worker, on_loop)

    async def scrape(self) -> bytes:
        """The body, from a coroutine in the loop (the text is rendered in a thread)."""
        snapshot, worker, on_loop = await self.on_loop()
        return await asyncio.to_thread(self._finish, snapshot, worker, on_loop)

    def _finish(self, snapshot: Snapshot, worker: bytes, on_loop: float) -> bytes:
        began, cpu = time.perf_counter(), time.thread_time()
        with _short_switches():
            edges = self.edges.render(snapshot)
        previous = self.last
        self.last = (on_loop, time.perf_counter() - began, time.thread_time() - cpu)
        ns = self.edges.ns
        cost = "".join(f'{ns}_exporter_scrape_seconds{{part="{part}"}} {value!r}\n'
                       for part, value in zip(("loop", "render", "render_cpu"), previous,
                                              strict=True))
        return (edges + worker + f"# HELP {ns}_exporter_scrape_seconds The previous scrape's "
                f"cost: on the event loop, rendering, and the rendering thread's CPU\n"
                f"# TYPE {ns}_exporter_scrape_seconds gauge\n{cost}".encode())

    def close(self) -> None:
        """Nothing to release (kept for the server's stop)."""
