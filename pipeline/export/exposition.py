"""``GET /metrics`` without stopping the stream: snapshot on the event loop, text in a thread.

:meth:`Exposition.scrape` takes the per-edge snapshot and renders the worker's own
(small) metrics on the loop, then renders the per-edge text in one worker thread
(:meth:`pipeline.export.edges.EdgeExporter.render`), so the loop goes on consuming while a
scrape is built; the thread holds Python's lock only part of the time. Scrapes that
arrive together are answered one after the other (each from a fresh snapshot).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pipeline.export.edges import EdgeExporter

__all__ = ["CONTENT_TYPE", "Exposition"]

CONTENT_TYPE = "text/plain; version=0.0.4"


class Exposition:
    """The whole ``/metrics`` body: per-edge series, then the registry's (worker) series."""

    def __init__(self, edges: EdgeExporter, registry: Any) -> None:
        self.edges = edges
        self.registry = registry
        self._pool: ThreadPoolExecutor | None = None
        self._lock = asyncio.Lock()
        self.last: tuple[float, float, float] = (0.0, 0.0, 0.0)
        """The previous scrape's seconds: on the loop, rendering (wall), rendering (CPU)."""

    async def scrape(self) -> bytes:
        from prometheus_client import generate_latest

        async with self._lock:
            began = time.perf_counter()
            snapshot = self.edges.snapshot()
            worker = generate_latest(self.registry)
            on_loop = time.perf_counter() - began
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="commpipe-metrics")
            edges, wall, cpu = await asyncio.get_running_loop().run_in_executor(
                self._pool, self._render, snapshot)
            previous, self.last = self.last, (on_loop, wall, cpu)
        ns = self.edges.ns
        cost = "".join(f'{ns}_exporter_scrape_seconds{{part="{part}"}} {value!r}\n'
                       for part, value in zip(("loop", "render", "render_cpu"), previous,
                                              strict=True))
        return (edges + worker + f"# HELP {ns}_exporter_scrape_seconds The previous scrape's "
                f"cost: on the event loop, rendering in its thread, and that thread's CPU\n"
                f"# TYPE {ns}_exporter_scrape_seconds gauge\n{cost}".encode())

    def _render(self, snapshot: Any) -> tuple[bytes, float, float]:
        began, cpu = time.perf_counter(), time.thread_time()
        body = self.edges.render(snapshot)
        return body, time.perf_counter() - began, time.thread_time() - cpu

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
