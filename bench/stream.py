"""Stream job throughput: events/s through one real worker over pre-produced shim records.

The same records (shim format: JSON arrays of ~100 events of one edge, 100 edges,
4 partitions) are read three times in one run, each timed from the first event
consumed to the last:

- commpipe: ``bench.workers commpipe``, the real worker (decode and validate, windowed
  aggregates, one changelog write per changed key per batch), sink off;
- baseline (a): the naive Faust agent of :mod:`bench.workers` (``orjson.loads``, one
  windowed-table write per event), over the first ``cap`` seconds only: it is slow;
- baseline (b), the ceiling: a bare aiokafka consumer in this process that only runs
  ``orjson.loads`` on each record.

A last run repeats the commpipe worker with Faust's own fetch wait (1.5 s, where
commpipe sets ``COMMPIPE_WORKER_FETCH_WAIT_MS=100``), to show what that setting buys:
aiokafka sends no other fetch while one waits on partitions with nothing new.

Run: ``python -m bench --cases stream``. Targets (issue 7): >= 10x the naive agent,
>= 50 % of the bare consumer, >= 50,000 events/s on one core (the worker is one thread).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import orjson

from bench.common import (
    Context,
    Measured,
    Row,
    create_topics,
    make_events,
    make_records,
    measure,
    produce,
    worker_env,
    workers,
)

NAME = "stream"
EDGES = 100
PER_RECORD = 100


def bare_consumer(bootstrap: str, topic: str, total: int) -> Measured:
    """The ceiling: fetch and ``orjson.loads`` every record, nothing else."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    async def main() -> Measured:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                    auto_offset_reset="earliest")
        await consumer.start()
        try:
            consumer.assign([TopicPartition(topic, p) for p in range(4)])
            done, first = 0, None
            while done < total:
                batches = await consumer.getmany(timeout_ms=1000)
                for messages in batches.values():
                    for m in messages:
                        value = orjson.loads(m.value)
                        done += len(value) if type(value) is list else 1
                if first is None and done:
                    first = (time.monotonic(), done, time.process_time())
            assert first is not None
            return Measured(done - first[1], time.monotonic() - first[0],
                            time.process_time() - first[2], [done])
        finally:
            await consumer.stop()

    return asyncio.run(main())


def shared_records(ctx: Context, n: int) -> Sequence[Any]:
    """The case's records (also used by the scale-out case)."""
    events = make_events(n, EDGES, span_s=60.0)
    return make_records(events, edges=EDGES, per_record=PER_RECORD)


def run(ctx: Context) -> list[Row]:
    n = ctx.size(500_000, 100_000)
    cap = ctx.size(10, 4)
    records = shared_records(ctx, n)
    with ctx.broker() as broker:
        topic = "bench.stream"
        create_topics(broker.bootstrap, [topic, f"{topic}.dlq"])
        produce(broker.bootstrap, topic, records)
        ctx.say(f"stream: {n:,} events in {len(records):,} records; bare consumer")
        bare = bare_consumer(broker.bootstrap, topic, n)
        ctx.say("stream: commpipe worker")
        with workers("commpipe", worker_env(broker.bootstrap, topic), ctx) as procs:
            ours = measure(procs, n)
        ctx.say("stream: commpipe worker with Faust's fetch wait of 1.5 s")
        env = worker_env(broker.bootstrap, topic, COMMPIPE_WORKER_FETCH_WAIT_MS=1500)
        with workers("commpipe", env, ctx) as procs:
            long_wait = measure(procs, n)
        ctx.say(f"stream: naive agent (first {cap} s)")
        with workers("naive", worker_env(broker.bootstrap, topic), ctx) as procs:
            naive = measure(procs, n, cap_s=cap)
    note = f"{n:,} events, {EDGES} edges, ~{PER_RECORD} events/record, 4 partitions, sink off"
    return [
        Row(NAME, "events/s vs naive agent", ours.rate, naive.rate,
            f"naive Faust agent, 1 table write/event ({naive.events:,} events in {cap} s)",
            ">= 10x", ours.rate >= 10 * naive.rate, note),
        Row(NAME, "events/s vs bare consumer", ours.rate, bare.rate,
            "bare aiokafka consumer + orjson.loads", ">= 0.5x", ours.rate >= 0.5 * bare.rate),
        Row(NAME, "events/s, one worker", ours.rate, bare.rate, "bare consumer",
            ">= 50,000", ours.rate >= 50_000),
        Row(NAME, "worker CPU us/event (lower: better)", ours.cpu_us_per_event,
            naive.cpu_us_per_event, "naive agent's CPU us/event", "-", None,
            f"{1e6 / ours.cpu_us_per_event:,.0f} events per worker CPU-second; the bare "
            f"consumer's CPU: {bare.cpu_us_per_event:.2f} us/event"),
        Row(NAME, "events/s, fetch wait 0.1 s vs Faust's 1.5 s", ours.rate, long_wait.rate,
            "the same worker with COMMPIPE_WORKER_FETCH_WAIT_MS=1500", "-", None,
            "Faust fixes 1,500 ms; commpipe's worker sets 100 ms"),
    ]
