"""Soak: ten minutes of steady load through the shim into a worker with both sinks; the
worker's memory and its table stop growing once windows expire.

Not run by default (``python -m pytest -m soak``; ``COMMPIPE_SOAK_S`` sets the duration).
The broker's memory grows with every record (Tansu keeps them all in memory), so only the
worker process is measured.
"""

from __future__ import annotations

import os
import random
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline import Emitter, Settings
from pipeline.dev.process import free_port
from tests.integration.test_metrics import scrape, try_scrape
from tests.integration.workers import wait_until, worker_environment, worker_starter

pytestmark = pytest.mark.soak

DURATION_S = float(os.environ.get("COMMPIPE_SOAK_S", "600"))
RATE = 2_000  # events/s
EDGES = [(f"svc{i}", f"svc{(i * 7 + 1) % 50}", "http") for i in range(50)]
WINDOW, GRACE = 10.0, 5.0


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (t, y)."""
    n = len(points)
    mt = sum(t for t, _ in points) / n
    my = sum(y for _, y in points) / n
    return sum((t - mt) * (y - my) for t, y in points) / sum((t - mt) ** 2 for t, _ in points)


@pytest.mark.timeout(DURATION_S + 300)
def test_steady_load_keeps_worker_memory_bounded(
        kafka_bootstrap: str, topic_factory: Callable[..., str], tmp_path: Path,
        pg_database: str) -> None:
    port = free_port()
    env = worker_environment(
        kafka_bootstrap, topic_factory, tmp_path, window_s=WINDOW, grace_s=GRACE,
        idle_close_s=5, COMMPIPE_POSTGRES_DSN=pg_database,
        COMMPIPE_DUCKDB_PATH=str(tmp_path / "soak.duckdb"), COMMPIPE_METRICS_PORT=str(port),
        COMMPIPE_METRICS_HOST="127.0.0.1")
    stop = threading.Event()
    sent = [0]
    by_kind = {"request": 0, "response": 0, "error": 0}
    shim: list[Any] = []

    def load() -> None:
        rng = random.Random(1)
        emitter = Emitter(kafka_bootstrap, env["COMMPIPE_TOPIC"],
                          settings=Settings.from_env({}, shim_linger_ms=20))
        try:
            while not stop.is_set():
                started = time.monotonic()
                for _ in range(RATE // 10):
                    s, t, p = rng.choice(EDGES)
                    kind = rng.choice(("request", "response", "error"))
                    extra: dict[str, Any] = ({"latency_ms": rng.lognormvariate(3, 1)}
                                             if kind == "response" else
                                             {"error_type": "http_5xx"} if kind == "error"
                                             else {})
                    getattr(emitter, kind)(source_service=s, target_service=t, protocol=p,
                                           ts=time.time(), **extra)
                    sent[0] += 1
                    by_kind[kind] += 1
                stop.wait(max(0.0, 0.1 - (time.monotonic() - started)))
        finally:
            emitter.close(timeout=30)
            shim.append(emitter.stats())

    samples: list[tuple[float, float, dict[str, float]]] = []
    with worker_starter(env, tmp_path) as start:
        worker = start()
        assert worker.proc is not None
        wait_until(lambda: bool(try_scrape(env)), timeout=60, what="/metrics", logs=worker.log)
        thread = threading.Thread(target=load, daemon=True)
        thread.start()
        t0 = time.monotonic()
        try:
            while time.monotonic() - t0 < DURATION_S:
                time.sleep(10)
                assert worker.alive, worker.log()[-3000:]
                metrics = scrape(env)  # a scrape that fails fails the soak
                keys = {k[1][0][1]: v for k, v in metrics.items()
                        if k[0] == "commpipe_state_keys"}
                assert set(keys) == {"window", "edge", "detail", "partition"}, keys
                samples.append((time.monotonic() - t0, _rss_mb(worker.proc.pid), keys))
        finally:
            stop.set()
            thread.join(60)
        # every event the shim delivered is consumed and counted, once
        (stats,) = shim
        assert (stats.dropped, stats.failed, stats.invalid) == (0, 0, 0), stats
        assert stats.sent == sent[0]

        def counted() -> dict[str, float]:
            metrics = scrape(env)
            out = {kind: sum(v for k, v in metrics.items()
                             if k[0] == f"commpipe_communication_{kind}s_total")
                   for kind in by_kind}
            out["consumed"] = metrics.get(("commpipe_events_consumed_total", ()), 0.0)
            return out

        wait_until(lambda: counted()["consumed"] >= sent[0], timeout=120,
                   what=f"{sent[0]} events consumed", logs=worker.log)
        consumed = counted()
        assert consumed == {**{k: float(v) for k, v in by_kind.items()},
                            "consumed": float(sent[0])}, consumed
        consumed = consumed["consumed"]
    rss = [(t, mb) for t, mb, _ in samples]
    later = [p for p in rss if p[0] >= DURATION_S / 2]
    growth = _slope(later) * 60
    report = ", ".join(f"{t:.0f}s {mb:.0f}MB w={k.get('window', 0):.0f}"
                       f" d={k.get('detail', 0):.0f}" for t, mb, k in samples)
    print(f"\nsoak: {sent[0]} events sent, {consumed:.0f} consumed; RSS {report}; "
          f"second half slope {growth:+.2f} MB/min")
    # bounded: open windows are edges × (window + grace + sink lag) / window, not events
    assert max(k.get("window", 0) for _, _, k in samples) <= len(EDGES) * 5
    assert max(k.get("detail", 0) for _, _, k in samples[2:]) <= 200
    assert growth < 1.0, report  # MB per minute over the second half
    # and the last quarter sits where the second quarter did (medians: one GC spike is noise)
    quarter = [mb for t, mb in rss if DURATION_S / 4 <= t < DURATION_S / 2]
    last = [mb for t, mb in rss if t >= DURATION_S * 3 / 4]
    assert statistics.median(last) <= statistics.median(quarter) + 15, report

