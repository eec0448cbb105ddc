"""``/metrics`` at 10,000 edges: what a scrape costs, and what it costs the stream.

The same pre-produced records (shim format, 10,000 edges, ~50 events of one edge per
record, 120 s of event time) are read twice in one run by the real worker
(``bench.workers commpipe``, sink off, closed windows kept 60 s of event time as a sink
would let them go), each for ``cap`` seconds:

- baseline: nobody scrapes;
- scraped: ``GET /metrics`` every 10 s (Prometheus' usual interval), the first 1 s in,
  each timed from request to the last byte, gzip asked for as Prometheus does.

Both are measured from the moment the worker has seen every edge (a first record of one
event per edge is produced before the rest).

Targets (issue 24): every scrape at 10,000 edges < 1 s, and the scraped worker's
events/s >= 90 % of the baseline's.

Run: ``python -m bench --cases metrics``.
"""

from __future__ import annotations

import gzip
import re
import threading
import time
import urllib.request

from bench.common import (
    Context,
    Measured,
    Row,
    WorkerProcess,
    create_topics,
    make_events,
    make_records,
    measure,
    produce,
    worker_env,
    workers,
)

NAME = "metrics"
PER_RECORD = 50
INTERVAL_S = 10.0
FIRST_S = 1.0
_EDGES = re.compile(rb"^commpipe_exporter_edges (\d+)", re.M)
_COST = re.compile(rb'^commpipe_exporter_scrape_seconds\{part="(\w+)"\} (\S+)', re.M)


def scrape(port: int) -> tuple[float, int, int, dict[str, float]]:
    """(seconds, bytes, edges reported, the previous scrape's cost as the worker measured
    it) of one ``GET /metrics``."""
    began = time.monotonic()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                     headers={"Accept-Encoding": "gzip"})  # as Prometheus
    with urllib.request.urlopen(request, timeout=30) as r:  # noqa: S310 - loopback
        body = r.read()
        gzipped = r.headers.get("Content-Encoding") == "gzip"
    took = time.monotonic() - began
    body = gzip.decompress(body) if gzipped else body
    found = _EDGES.search(body)
    cost = {m.group(1).decode(): float(m.group(2)) for m in _COST.finditer(body)}
    return took, len(body), int(found.group(1)) if found else -1, cost


class Scraper:
    """Scrapes one worker every ``INTERVAL_S`` from ``FIRST_S`` after :meth:`start`."""

    def __init__(self, worker: WorkerProcess, until_s: float) -> None:
        self.worker = worker
        self.until_s = until_s
        self.done: list[tuple[float, int, int, dict[str, float]]] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self, _events: int = 0) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def _run(self) -> None:
        began = time.monotonic()
        due = FIRST_S
        while due < self.until_s and not self._stop.wait(max(0.0, began + due
                                                              - time.monotonic())):
            self.done.append(scrape(self.worker.port))
            due += INTERVAL_S

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)


def seeded(worker: WorkerProcess, edges: int, timeout: float = 300.0) -> None:
    """Until the worker has consumed the first event of every edge (the measure starts
    with all of them in the table)."""
    deadline = time.monotonic() + timeout
    while ((worker.progress() or {}).get("events", 0) < edges):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the worker did not see {edges:,} edges in {timeout:.0f} s")
        time.sleep(0.2)


def produce_chunks(bootstrap: str, topic: str, n: int, edges: int) -> None:
    """One event per edge, then ``n`` events over ``edges`` edges and 120 s of event time
    ending now, produced a chunk at a time (the events of one chunk as dicts fit in
    memory)."""
    span, chunk = 120.0, PER_RECORD * edges
    t0 = time.time() - span
    # first one event per edge, so that every edge is in the table within seconds: the
    # scrapes then see all of them
    produce(bootstrap, topic, make_records(make_events(edges, edges, span_s=1.0, t0=t0,
                                                       seed=6), edges=edges, per_record=1))
    for i, start in enumerate(range(0, n, chunk)):
        size = min(chunk, n - start)
        events = make_events(size, edges, span_s=span * size / n,
                             t0=t0 + span * start / n, seed=7 + i)
        produce(bootstrap, topic, make_records(events, edges=edges, per_record=PER_RECORD))


def run(ctx: Context) -> list[Row]:
    edges = ctx.size(10_000, 2_000)
    n = ctx.size(2_000_000, 300_000)
    cap = ctx.size(36, 16)
    with ctx.broker() as broker:
        topic = "bench.metrics"
        create_topics(broker.bootstrap, [topic, f"{topic}.dlq"])
        ctx.say(f"metrics: producing {n:,} events over {edges:,} edges")
        produce_chunks(broker.bootstrap, topic, n, edges)
        def env() -> dict[str, str]:
            """A fresh app id each run: no worker recovers another's changelog, so
            Tansu's end offsets do not matter (the producer's usual batches)."""
            return worker_env(broker.bootstrap, topic, COMMPIPE_RETAIN_WITHOUT_SINK_S=60,
                              COMMPIPE_WORKER_PRODUCER_BATCH_BYTES=16384)

        ctx.say(f"metrics: worker, not scraped ({cap} s once every edge is in)")
        with workers("commpipe", env(), ctx) as procs:
            seeded(procs[0], edges)
            quiet = measure(procs, n, cap_s=cap)
        ctx.say(f"metrics: worker, scraped every {INTERVAL_S:.0f} s ({cap} s once every "
                "edge is in)")
        with workers("commpipe", env(), ctx) as procs:
            seeded(procs[0], edges)
            scraper = Scraper(procs[0], until_s=cap)
            try:
                scraped: Measured = measure(procs, n, cap_s=cap, on_poll=scraper.start)
            finally:
                scraper.stop()
            last = scrape(procs[0].port)  # the last one's cost, as the worker measured it
    times = [s[0] for s in scraper.done]
    worst = max(times, default=float("nan"))
    sizes = sorted({s[2] for s in scraper.done})
    costs = [s[3] for s in scraper.done[1:]] + [last[3]]
    note = (f"{len(times)} scrapes while streaming: {', '.join(f'{t:.2f}' for t in times)} s, "
            f"{scraper.done[-1][1] / 1e6 if scraper.done else 0:.1f} MB each, edges reported "
            f"{sizes}; the worker's own measure of each (waiting for the loop / on it / "
            f"render / render CPU, s): "
            + "; ".join(f"{c.get('wait', 0):.3f} / {c.get('loop', 0):.3f} / "
                        f"{c.get('render', 0):.2f} / {c.get('render_cpu', 0):.2f}"
                        for c in costs)
            + f"; {n:,} events, {edges:,} edges, ~{PER_RECORD} events/record, sink off")
    return [
        Row(NAME, f"slowest scrape at {edges:,} edges, streaming (s)", worst, INTERVAL_S,
            "Prometheus' scrape interval", "< 1 s", worst < 1.0, note),
        Row(NAME, "events/s scraped every 10 s vs not scraped", scraped.rate, quiet.rate,
            "the same worker and records, nobody scraping", ">= 0.9x",
            scraped.rate >= 0.9 * quiet.rate,
            f"{scraped.events:,} and {quiet.events:,} events in {cap} s each"),
    ]

