"""Scale-out: two workers against one on the same 4-partition topic.

The stream case's records (shim batches of ~100 events, 100 edges) are read by one
worker, then by two workers of another consumer group. Each group starts on an empty
topic and waits until its partitions are settled (with two workers: 2 partitions each,
unchanged for 2 s, so no rebalance falls into the figure); then this process produces
the records (faster than the workers consume them) and the run is timed from the first
event consumed to the last, summed over the workers.

This machine has 2 cores shared by the workers, the broker and this process, so the
ratio says how much a second worker brings here, not what a second machine would.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from bench.common import (
    Context,
    Measured,
    Row,
    WorkerProcess,
    create_topics,
    measure,
    produce,
    wait_ready,
    worker_env,
    workers,
)
from bench.stream import shared_records

NAME = "scaleout"


def settled(procs: list[WorkerProcess], timeout: float = 120.0) -> None:
    """Until each worker owns 4 / len(procs) partitions, unchanged for 2 s."""
    deadline = time.monotonic() + timeout
    stable_since, last = time.monotonic(), None
    while time.monotonic() < deadline:
        owned = tuple(tuple((w.progress() or {}).get("partitions", ())) for w in procs)
        if owned != last:
            stable_since, last = time.monotonic(), owned
        elif all(len(p) == 4 // len(procs) for p in owned) and time.monotonic() - stable_since >= 2:
            return
        time.sleep(0.1)
    raise TimeoutError(f"{len(procs)} workers did not settle on their partitions: {last}")


def run(ctx: Context) -> list[Row]:
    n = ctx.size(1_000_000, 200_000)
    records = shared_records(ctx, n)
    with ctx.broker() as broker:
        one = _run_group(ctx, broker.bootstrap, records, n, 1)
        two = _run_group(ctx, broker.bootstrap, records, n, 2)
    split = " + ".join(f"{c:,}" for c in two.per_worker)
    return [Row(NAME, "events/s, 2 workers vs 1", two.rate, one.rate, "one worker, same records",
                "> 1x (2 cores shared)", two.rate > one.rate,
                f"{n:,} events, 4 partitions, produced once the group had settled; the two "
                f"workers consumed {split}")]


def _run_group(ctx: Context, bootstrap: str, records: Sequence[Any], total: int,
               count: int) -> Measured:
    topic = f"bench.scale{count}"
    create_topics(bootstrap, [topic, f"{topic}.dlq"])
    ctx.say(f"scaleout: {count} worker(s), {total:,} events")
    with workers("commpipe", worker_env(bootstrap, topic), ctx, count=count) as procs:
        wait_ready(procs)
        settled(procs)
        producer = threading.Thread(target=produce, args=(bootstrap, topic, records))
        producer.start()
        try:
            return measure(procs, total)
        finally:
            producer.join()
