"""``GET /metrics`` without stopping the stream: snapshot on the event loop, text in a thread.

:meth:`Exposition.scrape` takes the per-edge snapshot and renders the worker's own
(small) metrics on the loop, then renders the per-edge text in one worker thread
(:meth:`pipeline.export.edges.EdgeExporter.render`), so the loop goes on consuming while a
scrape is built; the thread holds Python's lock only part of the time. Scrapes that
arrive together are answered one after the other (each from a fresh snapshot).
"""

from __future__ import annotations

import asyncio
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

    async def scrape(self) -> bytes:
        from prometheus_client import generate_latest

        async with self._lock:
            snapshot = self.edges.snapshot()
            worker = generate_latest(self.registry)
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="commpipe-metrics")
            edges = await asyncio.get_running_loop().run_in_executor(
                self._pool, self.edges.render, snapshot)
        return edges + worker

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
