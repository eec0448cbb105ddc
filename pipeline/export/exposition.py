"""The ``/metrics`` body without stopping the stream: rendered in the event loop, in slices.

:meth:`Exposition.scrape` runs in the event loop: between two of its steps (never in the
middle of a table write) it takes the per-edge snapshot and renders the worker's own
(small) metrics, then renders the per-edge text
(:meth:`pipeline.export.edges.EdgeExporter.render_in_slices`) giving the loop back every
10 ms, so batches go on between the slices. A thread rendering beside the loop was tried
and measured worse: each of the loop's socket calls then waited for Python's lock (up to
the 5 ms switch interval), and at 10,000 edges the stream crawled. The HTTP server's
request thread calls :meth:`scrape_from_thread`, and gzips and sends the body itself
(:mod:`pipeline.export.server`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from pipeline.export.edges import EdgeExporter

__all__ = ["CONTENT_TYPE", "Exposition", "worker_exposition"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Exposition:
    """The whole ``/metrics`` body: per-edge series, then the registry's (worker) series."""

    def __init__(self, edges: EdgeExporter, registry: Any) -> None:
        self.edges = edges
        self.registry = registry
        self._lock = asyncio.Lock()
        self.last: tuple[float, float, float] = (0.0, 0.0, 0.0)
        """The previous scrape's seconds: the snapshot (on the loop), rendering from start to
        end, and the loop's time in its slices."""

    async def scrape(self) -> bytes:
        """The body; run it in the event loop (:meth:`scrape_from_thread` from others)."""
        from prometheus_client import generate_latest

        async with self._lock:
            began = time.perf_counter()
            snapshot = self.edges.snapshot()
            worker = generate_latest(self.registry)
            on_loop = time.perf_counter() - began
            began = time.perf_counter()
            edges, spent = await self.edges.render_in_slices(snapshot)
            previous = self.last
            self.last = (on_loop, time.perf_counter() - began, spent)
        return self._with_cost(edges, worker, previous)

    def scrape_from_thread(self, loop: asyncio.AbstractEventLoop, timeout: float = 30.0
                           ) -> bytes:
        """The body, from a thread other than ``loop``'s (the HTTP server's)."""
        return asyncio.run_coroutine_threadsafe(self.scrape(), loop).result(timeout)

    def _with_cost(self, edges: bytes, worker: bytes, previous: tuple[float, float, float]
                   ) -> bytes:
        ns = self.edges.ns
        cost = "".join(f'{ns}_exporter_scrape_seconds{{part="{part}"}} {value!r}\n'
                       for part, value in zip(("loop", "render", "render_cpu"), previous,
                                              strict=True))
        return (edges + worker + f"# HELP {ns}_exporter_scrape_seconds The previous scrape's "
                f"cost: the snapshot, rendering from start to end, and the event loop's "
                f"time in its slices\n"
                f"# TYPE {ns}_exporter_scrape_seconds gauge\n{cost}".encode())

    def close(self) -> None:
        """Nothing to release (kept for the server's stop)."""


def worker_exposition(worker: Any, settings: Any, rollups: Any, slo: Any,
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
    return Exposition(edges, registry)
