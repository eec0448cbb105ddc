"""The sink's bulk values against the definitions they replace: the same floats and rows
as ``LatencySketch.quantile``, ``sql.rollup_values`` and ``slo.evaluate``, and which keys
of a batch go to the merge."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest

from pipeline.core.batch import PartitionBatch
from pipeline.core.rollups import Rollups
from pipeline.core.sketch import LatencySketch
from pipeline.core.slo import SloConfig, evaluate, load_config
from pipeline.core.window import WindowConfig, WindowStats
from pipeline.sink.rows import Judge, part_json, prepare, quantiles, rollup_row
from pipeline.sink.sql import rollup_values
from pipeline.wire.events import Event

CFG = WindowConfig(size_s=10.0, grace_s=0.0)
T0 = 1_700_000_000.0
EDGES = [("api", "db", "grpc"), ("web", "api", "http"), ("orders", "bus", "kafka")]


def _sketch(rng: random.Random) -> LatencySketch:
    sketch = LatencySketch()
    n = rng.choice([0, 1, 2, 3, 7, 50, 400])
    zeros = rng.random() < 0.3
    for _ in range(n):
        sketch.add(0.0 if zeros and rng.random() < 0.4 else rng.lognormvariate(2.0, 1.5))
    return sketch


@pytest.mark.parametrize("seed", range(40))
def test_quantiles_are_the_sketch_quantiles(seed: int) -> None:
    sketch = _sketch(random.Random(seed))
    assert quantiles(sketch) == tuple(sketch.quantile(q) if sketch.count else None
                                      for q in (0.5, 0.9, 0.95, 0.99))


def _store(seed: int, partitions: int = 1) -> dict[str, Any]:
    """Windows as the worker builds them from mixed, seeded traffic."""
    rng = random.Random(seed)
    store: dict[str, Any] = {}
    offset = 0
    for w in range(4):
        for p in range(partitions):
            batch = PartitionBatch(p, CFG, store)
            for e, edge in enumerate(EDGES):
                offset += 1
                events = []
                for i in range(rng.randint(1, 12)):
                    kind = rng.choice(["request", "response", "response", "error", "timeout",
                                       "retry", "health", "circuit"])
                    opt: dict[str, Any] = {}
                    if kind in ("response", "error", "timeout"):
                        opt["latency_ms"] = round(rng.lognormvariate(2.5, 1.0), 3)
                    if kind == "error":
                        opt["error_type"] = rng.choice(["http_5xx", "connection"])
                    if kind == "retry":
                        opt.update(attempt=rng.randint(1, 3), backoff_ms=rng.choice([50.0, 200]))
                    if kind == "health":
                        opt["health_status"] = rng.choice(["healthy", "degraded"])
                    if kind == "circuit":
                        opt["circuit_state"] = rng.choice(["open", "closed", "half_open"])
                    ts = T0 + w * 10 + e * 0.1 + i * 0.01
                    events.append(Event(kind, f"e{seed}-{offset}-{i}", f"c{offset % 5}", *edge,
                                        ts, **opt))
                batch.apply(offset, events, record_ts=T0 + 1e5, now=T0 + 1e5)
            store.update(batch.changes())
    return store


@pytest.mark.parametrize("seed", range(6))
def test_rows_are_what_the_definitions_give(seed: int) -> None:
    rollups = Rollups(_store(seed), CFG, idle_close_s=0.0, clock=lambda: T0 + 1e6)
    windows = rollups.closed_windows()
    assert len(windows) == 4 * len(EDGES)
    slo = load_config(None)
    prepared = prepare(windows, Judge(slo))
    assert prepared.shared == set()
    assert prepared.rollups == [rollup_values(w.window_start, w.window_end, w.edge, w.stats, 1)
                                for w in windows]
    assert prepared.slo == [(w.window_start, w.window_end, *w.edge, *r) for w in windows
                            for r in evaluate(w.edge, w.stats, slo.for_edge(w.edge))]
    assert len(prepared.slo) > len(windows)  # the traffic gives most objectives something
    assert prepared.parts == [(w.window_start, *w.edge, w.partition, w.window_end,
                               w.stats.offset, part_json(w.stats)) for w in windows]
    for w, part in zip(windows, prepared.parts, strict=True):
        again = WindowStats.from_json(orjson.loads(part[-1]))
        assert again.to_json() == w.stats.to_json()


def test_per_edge_rules_are_applied_per_edge(tmp_path: Any) -> None:
    path = tmp_path / "slo.toml"
    path.write_text('latency_max_ms = 5\n[[edges]]\ntarget = "api"\nlatency_max_ms = 70\n')
    slo = load_config(path)
    windows = Rollups(_store(3), CFG, idle_close_s=0.0, clock=lambda: T0 + 1e6).closed_windows()
    judged = prepare(windows, Judge(slo)).slo
    thresholds = {(r[3], r[5]): r[6] for r in judged}
    assert thresholds[("api", "latency_max")] == 70.0
    assert thresholds[("db", "latency_max")] == 5.0
    assert judged == [(w.window_start, w.window_end, *w.edge, *r) for w in windows
                      for r in evaluate(w.edge, w.stats, slo.for_edge(w.edge))]


def test_keys_several_partitions_hold_in_one_batch_go_to_the_merge() -> None:
    rollups = Rollups(_store(4, partitions=2), CFG, idle_close_s=0.0, clock=lambda: T0 + 1e6)
    windows = rollups.closed_windows()
    lonely = [w for w in windows if w.window_start == T0 and w.partition == 0]
    batch = [w for w in windows if w.window_start != T0] + lonely
    prepared = prepare(batch, Judge(SloConfig()))
    assert len(prepared.parts) == len(batch)
    assert prepared.shared == {(T0 + k * 10, *edge) for k in (1, 2, 3) for edge in EDGES}
    assert [r[:5] for r in prepared.rollups] == [
        (w.window_start, w.window_end, *w.edge) for w in lonely]
    assert {r[:5] for r in prepared.slo} <= {r[:5] for r in prepared.rollups}


def test_rollup_row_counts_partitions_as_given() -> None:
    (w, *_) = Rollups(_store(5), CFG, idle_close_s=0.0, clock=lambda: T0 + 1e6).closed_windows()
    assert rollup_row(w.window_start, w.window_end, w.edge, w.stats, 3) == rollup_values(
        w.window_start, w.window_end, w.edge, w.stats, 3)
