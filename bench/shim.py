"""Shim overhead: caller-thread cost of ``Emitter.response`` and sustained events/s.

Baselines measured in the same run, against the same embedded broker:
- per-call cost: building the same event dict and appending it to a deque (the
  floor any in-process buffer pays);
- throughput: a bare aiokafka producer sending one orjson event per record, as
  hand-rolled instrumentation would.

Run: ``python -m bench.shim [--events N]`` (or ``python -m bench --cases shim``).
Targets (issue 7): p99 < 20 us, >= 100,000 events/s from one process.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import time

import orjson

from bench.common import Context, Row, create_topics
from pipeline import Emitter, Settings
from pipeline.dev.broker import EmbeddedBroker

EDGES = [(f"svc{i}", f"svc{(i * 7 + 3) % 20}") for i in range(20)]


def percentile(sorted_ns: list[int], q: float) -> float:
    return sorted_ns[min(len(sorted_ns) - 1, int(q * len(sorted_ns)))] / 1000.0


def per_call(emitter: Emitter, n: int) -> tuple[list[int], list[int]]:
    rng = random.Random(7)
    latencies = [rng.uniform(1, 300) for _ in range(n)]
    shim, floor = [], []
    buffer: collections.deque[dict[str, object]] = collections.deque()
    for i in range(n):
        source, target = EDGES[i % len(EDGES)]
        t0 = time.perf_counter_ns()
        emitter.response(source_service=source, target_service=target, latency_ms=latencies[i],
                         status_code=200)
        t1 = time.perf_counter_ns()
        buffer.append({"v": 1, "kind": "response", "source_service": source,
                       "target_service": target, "protocol": "http",
                       "latency_ms": latencies[i], "status_code": 200, "ts": time.time()})
        t2 = time.perf_counter_ns()
        shim.append(t1 - t0)
        floor.append(t2 - t1)
    return sorted(shim), sorted(floor)


def shim_throughput(bootstrap: str, topic: str, n: int) -> float:
    settings = Settings.from_env({}, shim_buffer_size=n + 1)
    emitter = Emitter(bootstrap, topic, settings=settings)
    started = time.perf_counter()
    for i in range(n):
        source, target = EDGES[i % len(EDGES)]
        emitter.response(source_service=source, target_service=target, latency_ms=12.5,
                         status_code=200)
    assert emitter.flush(timeout=300), emitter.stats()
    elapsed = time.perf_counter() - started
    emitter.close()
    assert emitter.stats().sent == n, emitter.stats()
    return n / elapsed


def bare_throughput(bootstrap: str, topic: str, n: int) -> float:
    from aiokafka import AIOKafkaProducer

    async def main() -> float:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        started = time.perf_counter()
        futures = []
        for i in range(n):
            source, target = EDGES[i % len(EDGES)]
            event = {"v": 1, "kind": "response", "source_service": source,
                     "target_service": target, "protocol": "http", "latency_ms": 12.5,
                     "status_code": 200, "ts": time.time()}
            futures.append(await producer.send(topic, orjson.dumps(event),
                                               key=f"{source}\x1f{target}\x1fhttp".encode()))
        await asyncio.gather(*futures)
        elapsed = time.perf_counter() - started
        await producer.stop()
        return n / elapsed

    return asyncio.run(main())


def measure(bootstrap: str, events: int) -> list[tuple[str, float, float, str]]:
    """(case, commpipe, baseline, target) rows, everything against the broker at ``bootstrap``
    (the topics are created first: Apache Kafka here does not create them on first use)."""
    create_topics(bootstrap, ["bench.percall", "bench.shim", "bench.bare"])
    emitter = Emitter(bootstrap, "bench.percall",
                      settings=Settings.from_env({}, shim_buffer_size=events + 1))
    shim, floor = per_call(emitter, min(events, 100_000))
    emitter.close(timeout=60)
    ours = shim_throughput(bootstrap, "bench.shim", events)
    bare = bare_throughput(bootstrap, "bench.bare", min(events, 50_000))
    return [
        ("emit p50 (us)", percentile(shim, 0.5), percentile(floor, 0.5), "-"),
        ("emit p99 (us)", percentile(shim, 0.99), percentile(floor, 0.99), "< 20"),
        ("events/s, one process", ours, bare, ">= 100,000"),
    ]


def run(ctx: Context) -> list[Row]:
    """Case 1 of ``python -m bench``."""
    events = ctx.size(200_000, 50_000)
    with ctx.broker() as broker:
        (p50, p50_floor, _), (p99, p99_floor, _), (ours, bare, _) = (
            r[1:] for r in measure(broker.bootstrap, events))
    note = f"{events:,} events; per-call figures over {min(events, 100_000):,} calls"
    return [
        Row("shim", "emit p50 (us)", p50, p50_floor, "event dict + deque.append", note=note),
        Row("shim", "emit p99 (us)", p99, p99_floor, "event dict + deque.append", "< 20 us",
            p99 < 20),
        Row("shim", "events/s, one process", ours, bare, "bare aiokafka, 1 event/record",
            ">= 100,000", ours >= 100_000),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    with EmbeddedBroker() as broker:
        rows = measure(broker.bootstrap, args.events)
    print(f"{'case':<24}{'commpipe':>12}{'baseline':>12}{'ratio':>8}  target")
    for name, value, base, target in rows:
        print(f"{name:<24}{value:>12,.1f}{base:>12,.1f}{value / base:>8.2f}  {target}")
    print("baselines: per-call = dict + deque.append; events/s = bare aiokafka, 1 event/record")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(zip(("case", "commpipe", "baseline", "target"), r, strict=True))
                       for r in rows], f, indent=2)


if __name__ == "__main__":
    main()
