"""Ordinary rates through the real shim: a fleet of service instances into one worker, the
worker's whole CPU per event (idle cost included), and emit -> ``/metrics`` under that load.

``INSTANCES`` = 16 service instances (4 services x 4 replicas), each an
:class:`~pipeline.Emitter` of its own (its own producer, at the shim's defaults: linger
500 ms) calling 4 targets, ``RATE`` events/s in all (2,560; half requests, half
outcomes). One commpipe worker (``bench.workers commpipe``, sink off) reads them live, and
a bare aiokafka consumer with ``orjson.loads`` (``bench.workers bare``) reads the same
records beside it: the floor of reading them at all.

1. CPU: after a warm-up, both processes' CPU seconds (``/proc``) over ``span`` seconds,
   divided by the events each consumed meanwhile. Nothing scrapes ``/metrics`` then (a
   scrape renders every edge, and is the scraper's cost, not the stream's).
2. Freshness: the same load, plus a probe request every 100 ms on its own edge; the probe
   is visible once ``/metrics`` (scraped every ~20 ms) counts it. Baseline: the bare
   consumer's view of the same records is not timed per probe here; the target is absolute.

Targets: worker CPU <= 30 us per event, idle included; emit -> ``/metrics`` p99 < 2 s.
Run: ``python -m bench --cases ordinary`` (``--broker kafka`` on Apache Kafka).
"""

from __future__ import annotations

import threading
import time

from bench.common import Context, Row, create_topics, percentile, wait_ready, worker_env, workers
from bench.freshness import PROBE, probe_count
from pipeline import Emitter, Settings

NAME = "ordinary"
SERVICES, REPLICAS, TARGETS = 4, 4, 4
INSTANCES = SERVICES * REPLICAS
RATE = 2_560.0


class Fleet:
    """INSTANCES emitters in threads, each at RATE / INSTANCES events/s."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        settings = Settings.from_env({})
        self.emitters = [Emitter(bootstrap, topic, settings=settings) for _ in range(INSTANCES)]
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(INSTANCES)]

    def _run(self, i: int) -> None:
        emitter = self.emitters[i]
        source = f"svc{i % SERVICES}"
        per_tick = RATE / INSTANCES / 50  # 50 ticks per second
        owed = 0.0
        n = 0
        next_tick = time.monotonic()
        while not self.stop.is_set():
            owed += per_tick
            while owed >= 2:
                target = f"dep{n % TARGETS}"
                emitter.request(source_service=source, target_service=target, protocol="http",
                                correlation_id=f"{i}-{n}")
                emitter.response(source_service=source, target_service=target,
                                 protocol="http", latency_ms=5.0 + n % 50,
                                 correlation_id=f"{i}-{n}")
                owed -= 2
                n += 1
            next_tick += 0.02
            time.sleep(max(0.0, next_tick - time.monotonic()))

    def start(self) -> Fleet:
        for t in self.threads:
            t.start()
        return self

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(5)
        for e in self.emitters:
            e.close(timeout=5)


def run(ctx: Context) -> list[Row]:
    span = ctx.size(60, 15)
    probes = ctx.size(200, 50)
    with ctx.broker() as broker:
        topic = "bench.ordinary"
        create_topics(broker.bootstrap, [topic, f"{topic}.dlq"])
        env = worker_env(broker.bootstrap, topic)
        with workers("commpipe", env, ctx) as ours, workers("bare", env, ctx) as bare:
            wait_ready(ours)
            ctx.say(f"ordinary: {INSTANCES} emitters, {RATE:,.0f} events/s, {span} s measured")
            fleet = Fleet(broker.bootstrap, topic).start()
            try:
                time.sleep(5)  # warm-up: every producer connected, linger rounds steady
                worker, floor = ours[0], bare[0]
                start = (time.monotonic(), worker.cpu_seconds(), floor.cpu_seconds(),
                         worker.progress() or {}, floor.progress() or {})
                time.sleep(span)
                end = (time.monotonic(), worker.cpu_seconds(), floor.cpu_seconds(),
                       worker.progress() or {}, floor.progress() or {})
                freshness = _freshness(broker.bootstrap, topic, worker.port, probes)
            finally:
                fleet.close()
    seconds = end[0] - start[0]
    events = end[3]["events"] - start[3]["events"]
    records = end[3]["records"] - start[3]["records"]
    floor_events = end[4]["events"] - start[4]["events"]
    ours_us = 1e6 * (end[1] - start[1]) / events
    floor_us = 1e6 * (end[2] - start[2]) / floor_events
    shape = (f"{events:,} events in {seconds:.0f} s ({events / seconds:,.0f}/s), "
             f"{events / max(records, 1):.1f} events/record, {INSTANCES} shims at linger "
             f"{Settings().shim_linger_ms:g} ms")
    p50, p99 = percentile(freshness, 0.5), percentile(freshness, 0.99)
    return [
        Row(NAME, "worker CPU us/event, idle included", ours_us, floor_us,
            "bare aiokafka consumer + orjson, same records", "<= 30", ours_us <= 30, shape),
        Row(NAME, "emit -> /metrics p50 (ms)", p50, None, "-", "-", None,
            f"{probes} probes at 10/s under the same load"),
        Row(NAME, "emit -> /metrics p99 (ms)", p99, None, "-", "< 2,000 ms", p99 < 2000),
    ]


def _freshness(bootstrap: str, topic: str, port: int, probes: int) -> list[float]:
    """Delays (ms) from emitting probe i to ``/metrics`` counting i + 1 probes."""
    emitter = Emitter(bootstrap, topic, settings=Settings.from_env({}))
    emitted: list[float] = []
    seen: dict[int, float] = {}
    deadline = time.monotonic() + probes / 10 + 60
    try:
        while len(seen) < probes and time.monotonic() < deadline:
            now = time.time()
            if len(emitted) < probes and now >= (emitted[-1] + 0.1 if emitted else 0):
                emitter.request(source_service=PROBE[0], target_service=PROBE[1],
                                protocol=PROBE[2], correlation_id=f"p{len(emitted)}", ts=now)
                emitted.append(now)
            count = probe_count(port)
            at = time.time()
            for i in range(min(count, len(emitted))):
                seen.setdefault(i, at)
            time.sleep(0.02)
    finally:
        emitter.close(timeout=5)
    if len(seen) < probes:
        raise TimeoutError(f"{probes - len(seen)} of {probes} probes never reached /metrics")
    return [1000 * (seen[i] - emitted[i]) for i in range(probes)]
