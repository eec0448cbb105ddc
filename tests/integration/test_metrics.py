"""``/metrics`` of a real worker on the real broker, parsed with prometheus-client's own
text parser, every value computed independently from the events sent."""

from __future__ import annotations

import gzip
import math
import random
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline import Emitter, Settings
from pipeline.core.sketch import ALPHA
from pipeline.dev.process import free_port
from tests.integration.traffic import (
    GRACE,
    OUTCOME,
    WINDOW,
    Expected,
    breaker_entries,
    emit_all,
    traffic,
)
from tests.integration.workers import WorkerProcess, wait_until, worker_environment, worker_starter

pytestmark = pytest.mark.integration

NS = "domainflow"  # the specification's metric names
BOUNDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0]  # the default
STALE_S = 20.0


@pytest.fixture
def metrics_env(kafka_bootstrap: str, topic_factory: Callable[..., str], tmp_path: Path
                ) -> dict[str, str]:
    return worker_environment(kafka_bootstrap, topic_factory, tmp_path, window_s=WINDOW,
                              grace_s=GRACE, idle_close_s=2,
                              COMMPIPE_METRICS_PORT=str(free_port()),
                              COMMPIPE_METRICS_HOST="127.0.0.1", COMMPIPE_METRICS_NAMESPACE=NS,
                              COMMPIPE_METRICS_STALE_S=str(STALE_S))


@pytest.fixture
def workers(metrics_env: dict[str, str], tmp_path: Path
            ) -> Iterator[Callable[[], WorkerProcess]]:
    with worker_starter(metrics_env, tmp_path) as start:
        yield start


def scrape(env: dict[str, str]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``(sample name, sorted labels) -> value``; raises on output that does not parse."""
    url = f"http://127.0.0.1:{env['COMMPIPE_METRICS_PORT']}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    return parse(text)


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in out, key  # no duplicate series
            out[key] = sample.value
    return out


def try_scrape(env: dict[str, str]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    try:
        return scrape(env)
    except OSError:
        return {}


def lab(edge: tuple[str, str, str], **extra: str) -> tuple[tuple[str, str], ...]:
    s, t, p = edge
    return tuple(sorted({"source_service": s, "target_service": t, "protocol": p,
                         **extra}.items()))


def test_metrics_equal_the_events_then_stale_edges_leave(
        metrics_env: dict[str, str], workers: Callable[[], WorkerProcess]) -> None:
    t0 = math.floor(time.time() / WINDOW) * WINDOW - 600
    phases, _ = traffic(random.Random(31), t0)
    expected = Expected()
    worker = workers()
    emitter = Emitter(metrics_env["COMMPIPE_KAFKA_BOOTSTRAP"], metrics_env["COMMPIPE_TOPIC"],
                      settings=Settings.from_env({}, shim_linger_ms=5))
    try:
        for events in phases:
            emit_all(emitter, events, expected)
    finally:
        emitter.close()
    by_edge: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for e in expected.events:
        by_edge[(e["source_service"], e["target_service"], e["protocol"])].append(e)
    total = len(expected.events)
    p = f"{NS}_communication"

    def last_window(edge: tuple[str, str, str]) -> tuple[float, tuple[str, str, str]]:
        return max(start for start, e in expected.counts if e == edge), edge

    def ratio(key: tuple[float, tuple[str, str, str]]) -> float:
        c = expected.counts[key]
        failed = c["error"] + c["timeout"]
        return failed / max(c["response"] + failed, 1)

    def complete() -> bool:
        got = try_scrape(metrics_env)
        # every event applied, and every edge's newest window closed (idle after 2 s)
        return (got.get((f"{NS}_events_consumed_total", ()), 0) == total
                and all(got.get((f"{p}_error_ratio", lab(edge))) == ratio(last_window(edge))
                        for edge in by_edge))

    wait_until(complete, timeout=90, what="all events in /metrics", logs=worker.log)
    got = scrape(metrics_env)
    for edge, events in by_edge.items():
        kinds = Counter(e["kind"] for e in events)
        for kind, name in (("request", "requests"), ("response", "responses"),
                           ("timeout", "timeouts"), ("retry", "retries")):
            assert got[(f"{p}_{name}_total", lab(edge))] == kinds[kind], (edge, name)
        errors = Counter(e["error_type"] for e in events if e["kind"] == "error")
        reported = {dict(k[1])["error_type"]: v for k, v in got.items()
                    if k[0] == f"{p}_errors_total" and k[1] == lab(edge, error_type=k[1][0][1])}
        assert reported == dict(errors), edge
        latencies = [e["latency_ms"] / 1000 for e in events
                     if e["kind"] in OUTCOME and "latency_ms" in e]
        for bound in BOUNDS:
            assert got[(f"{p}_latency_seconds_bucket", lab(edge, le=repr(bound)))] == sum(
                1 for v in latencies if v <= bound), (edge, bound)
        assert got[(f"{p}_latency_seconds_bucket", lab(edge, le="+Inf"))] == len(latencies)
        assert got[(f"{p}_latency_seconds_count", lab(edge))] == len(latencies)
        assert got[(f"{p}_latency_seconds_sum", lab(edge))] == pytest.approx(sum(latencies))
        # the last closed window: the edge's newest
        key = last_window(edge)
        window = sorted(expected.latencies[key])
        for q in (0.5, 0.95, 0.99):
            exact = window[math.floor(q * (len(window) - 1))] / 1000
            value = got[(f"{p}_latency_quantile_seconds", lab(edge, quantile=repr(q)))]
            assert abs(value - exact) <= ALPHA * exact + 1e-12, (edge, q)
        assert got[(f"{p}_error_ratio", lab(edge))] == ratio(key)
        derived = breaker_entries(expected.outcomes[edge])[0]
        for state in ("closed", "open", "half_open"):
            assert got[(f"{p}_circuit_state", lab(edge, state=state, source="derived"))] == (
                1.0 if state == derived else 0.0), (edge, state)
        circuit = [e["circuit_state"] for e in events if e["kind"] == "circuit"]
        for state in ("closed", "open", "half_open"):
            value = got.get((f"{p}_circuit_state", lab(edge, state=state, source="reported")))
            assert value == ((1.0 if state == circuit[-1] else 0.0) if circuit else None)
    assert got[(f"{NS}_exporter_edges", ())] == len(by_edge)
    assert not [k for k in got if k[0] == f"{NS}_dead_letters_total"]
    assert got[(f"{NS}_worker_batch_records_total", ())] >= 1
    # no more events: after STALE_S every edge leaves the output
    wait_until(lambda: try_scrape(metrics_env).get((f"{NS}_exporter_edges", ())) == 0,
               timeout=STALE_S + 30, what="stale edges to leave /metrics", logs=worker.log)
    left = scrape(metrics_env)
    assert not [k for k in left if k[0].startswith(f"{p}_")]
    assert left[(f"{NS}_events_consumed_total", ())] == total
    # only /metrics and /health: Faust's pages showed table contents (correlation ids...)
    base = f"http://127.0.0.1:{metrics_env['COMMPIPE_METRICS_PORT']}"
    with urllib.request.urlopen(f"{base}/health", timeout=5) as r:  # noqa: S310 - loopback
        assert (r.status, r.read()) == (200, b"ok\n")
    for page in ("/table/state/", "/router/state/", "/"):
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(base + page, timeout=5)  # noqa: S310 - loopback
        assert info.value.code == 404, page
    # Prometheus asks for gzip: the same series, compressed
    request = urllib.request.Request(f"{base}/metrics", headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(request, timeout=5) as r:  # noqa: S310 - loopback
        assert r.headers["Content-Encoding"] == "gzip"
        unzipped = gzip.decompress(r.read()).decode()
    assert {k for k in parse(unzipped) if k[0] != f"{NS}_exporter_scrape_seconds"} == {
        k for k in left if k[0] != f"{NS}_exporter_scrape_seconds"}
