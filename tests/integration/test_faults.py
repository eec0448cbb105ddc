"""Faults and bad input against the real broker, a real worker and the real databases.

Every expectation is computed here from what was sent (or, where the shim may
drop, from what the topic holds, read back with a plain consumer), never with
the code under test. Related fault tests live beside the features they break:
a worker killed mid-run (test_sink.py, test_stream_job.py) and PostgreSQL away
during flushes (test_sink.py).
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline import Emitter, Settings
from pipeline.aggregate import EdgeMeta, parse_id
from pipeline.decode import decode_record
from pipeline.events import split_edge_key
from pipeline.outbox import PRODUCER_HEADER, SEQ_HEADER
from tests.integration.workers import (
    WorkerProcess,
    read_state,
    read_topic,
    wait_until,
    worker_environment,
    worker_starter,
)

pytestmark = pytest.mark.integration

SERVICES = ["gateway", "orders", "payments", "inventory", "bank"]


@pytest.fixture
def env(kafka_bootstrap: str, topic_factory: Callable[..., str], tmp_path: Path
        ) -> dict[str, str]:
    return worker_environment(kafka_bootstrap, topic_factory, tmp_path, window_s=10.0,
                              grace_s=5.0)


@pytest.fixture
def workers(env: dict[str, str], tmp_path: Path) -> Iterator[Callable[[], WorkerProcess]]:
    with worker_starter(env, tmp_path) as start:
        yield start


def edge_totals(bootstrap: str, app_id: str) -> dict[tuple[str, str, str], Counter[str]]:
    """Per edge, the worker's cumulative counts (all partitions added), from its changelog."""
    out: dict[tuple[str, str, str], Counter[str]] = defaultdict(Counter)
    for key, value in read_state(bootstrap, app_id).items():
        if parse_id(key)[0] != "e":
            continue
        assert isinstance(value, EdgeMeta)
        t = value.totals
        counts = out[split_edge_key(parse_id(key)[2] or "")]
        counts.update({"request": t.requests, "response": t.responses, "timeout": t.timeouts,
                       "retry": t.retries})
        counts.update({f"error:{k}": n for k, n in t.errors.items()})
    return {edge: +counts for edge, counts in out.items()}


def expected_totals(events: list[dict[str, Any]]) -> dict[tuple[str, str, str], Counter[str]]:
    out: dict[tuple[str, str, str], Counter[str]] = defaultdict(Counter)
    for e in events:
        kind = e["kind"] if e["kind"] != "error" else f"error:{e['error_type']}"
        out[(e["source_service"], e["target_service"], e["protocol"])][kind] += 1
    return dict(out)


class Traffic(threading.Thread):
    """A service emitting steadily (about ``rate`` events/s) through the shim, recording the
    slowest emit call; every event has its own correlation id."""

    def __init__(self, emitter: Emitter, rate: float, seed: int) -> None:
        super().__init__(daemon=True)
        self.emitter = emitter
        self.rate = rate
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.emitted: dict[str, dict[str, Any]] = {}
        self.calls: list[float] = []

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            for _ in range(10):
                source, target = self.rng.sample(SERVICES, 2)
                kind = self.rng.choice(["request", "response", "error"])
                event: dict[str, Any] = {"source_service": source, "target_service": target,
                                         "protocol": "http", "correlation_id": f"c{n}",
                                         "ts": time.time()}
                if kind == "response":
                    event["latency_ms"] = round(self.rng.uniform(1, 90), 2)
                elif kind == "error":
                    event["error_type"] = self.rng.choice(["connection", "http_5xx"])
                started = time.perf_counter()
                getattr(self.emitter, kind)(**event)
                self.calls.append(time.perf_counter() - started)
                self.emitted[f"c{n}"] = {"kind": kind, "protocol": "http", **event}
                n += 1
            time.sleep(10 / self.rate)


def test_broker_away_30s_buffers_drops_and_delivers_each_event_once(
        env: dict[str, str], workers: Callable[[], WorkerProcess], broker: Any) -> None:
    worker = workers()
    pid = worker.proc.pid if worker.proc else None
    emitter = Emitter(env["COMMPIPE_KAFKA_BOOTSTRAP"], env["COMMPIPE_TOPIC"],
                      settings=Settings.from_env({}, shim_buffer_size=3_000,
                                                 shim_linger_ms=5))
    traffic = Traffic(emitter, rate=400, seed=8)
    traffic.start()
    try:
        time.sleep(5)
        broker.pause()
        time.sleep(30)  # 30 s × 400 events/s: far beyond the 3,000-event buffer
        during = emitter.stats()
        broker.resume()
        time.sleep(5)
    finally:
        traffic.stop.set()
        traffic.join(10)
        broker.resume()
    assert emitter.flush(timeout=60) is True
    emitter.close()
    stats = emitter.stats()
    emitted = len(traffic.emitted)

    # the host stayed responsive: emit never waited for the broker (seconds if it had)
    calls = sorted(traffic.calls)
    assert calls[int(len(calls) * 0.99)] < 0.01 and calls[-1] < 0.5, calls[-5:]
    # bounded buffer, every event accounted for: sent or counted as dropped
    assert during.buffered <= 3_000
    assert stats.dropped > 0 and (stats.failed, stats.invalid, stats.buffered) == (0, 0, 0)
    assert stats.sent + stats.dropped == emitted

    # what the topic holds, read with a plain consumer: each sent event (maybe twice, if a
    # timed-out send had landed after all), every record with the shim's numbering
    records = read_topic(env["COMMPIPE_KAFKA_BOOTSTRAP"], env["COMMPIPE_TOPIC"])
    delivered: dict[str, dict[str, Any]] = {}
    copies = Counter[tuple[bytes, bytes, bytes]]()
    for record in records:
        headers = dict(record.headers)
        copies[(record.key, headers[PRODUCER_HEADER], headers[SEQ_HEADER])] += 1
        for event in decode_record(record.value).events:
            delivered[event.correlation_id] = traffic.emitted[event.correlation_id]
    assert len(delivered) == stats.sent
    second_copies = sum(n - 1 for n in copies.values())

    # the worker (never restarted) reconnected by itself and counted each event once
    want = expected_totals(list(delivered.values()))
    app_id = env["COMMPIPE_APP_ID"]
    wait_until(lambda: edge_totals(env["COMMPIPE_KAFKA_BOOTSTRAP"], app_id) == want,
               timeout=120, what=f"{stats.sent} events ({second_copies} records sent twice)",
               logs=worker.log)
    assert worker.alive and worker.proc is not None and worker.proc.pid == pid
    assert "Traceback" not in worker.log(), worker.log()[-3000:]
