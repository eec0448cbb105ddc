"""The service graph's numbers and colours from rollup rows, and its DOT text (no Graphviz
program needed); drawing it is tested in tests/integration/test_graph.py."""

from __future__ import annotations

import math
from typing import Any

import orjson
import pytest

from pipeline.cli.graph import (
    COLOURS,
    ERROR_BAD,
    ERROR_WARN,
    EdgeView,
    build_graph,
    edge_id,
    edge_lines,
    status,
    to_dot,
)
from pipeline.core.sketch import ALPHA, LatencySketch

T0 = 1_796_011_100.0


def row(edge: tuple[str, str, str], window: int, *, requests: int = 0, responses: int = 0,
        errors: int = 0, timeouts: int = 0, latencies: tuple[float, ...] = (),
        circuit: str = "closed", transitions: dict[str, int] | None = None,
        health: dict[str, int] | None = None, json_as_text: bool = True) -> dict[str, Any]:
    sketch = LatencySketch()
    sketch.add_many(latencies)

    def js(value: Any) -> Any:  # DuckDB returns JSON as text, psycopg JSONB as objects
        return orjson.dumps(value).decode() if json_as_text else value

    return {"source_service": edge[0], "target_service": edge[1], "protocol": edge[2],
            "window_start": T0 + 10 * window, "window_end": T0 + 10 * window + 10,
            "requests": requests, "responses": responses, "errors": errors,
            "timeouts": timeouts, "circuit_state": circuit,
            "circuit_transitions": js(transitions or {}), "health_checks": js(health or {}),
            "latency_sketch": js(sketch.to_json())}


GO = ("gateway", "orders", "http")
OP = ("orders", "payments", "grpc")
PB = ("payments", "bank", "amqp")
GP = ("gateway", "payments", "http")
LD = ("legacy:v1", "db", "kafka")


def test_edges_add_their_windows_up() -> None:
    lat_a = tuple(float(v) for v in range(1, 101))
    lat_b = tuple(float(v) for v in range(200, 300))
    rows = [row(GO, 0, requests=100, responses=98, errors=1, timeouts=1, latencies=lat_a),
            row(GO, 2, requests=50, responses=50, latencies=lat_b, json_as_text=False),
            row(PB, 1, requests=10, responses=8, errors=2, latencies=(5.0,) * 10,
                circuit="open", transitions={"reported:open": 1, "derived:open": 3}),
            row(PB, 2, requests=10, responses=10, latencies=(5.0,) * 10, circuit="closed",
                transitions={"reported:closed": 1, "derived:closed": 1}),
            row(OP, 2, requests=4, responses=4, latencies=(7.0,) * 4, circuit="half_open",
                transitions={"derived:open": 2, "derived:half_open": 2}),
            row(GP, 1, health={"healthy": 5, "degraded": 1})]
    graph = build_graph(rows, 3600)
    assert (graph.start, graph.end, graph.period_s) == (T0, T0 + 30, 30.0)
    assert graph.services == ["bank", "gateway", "orders", "payments"]
    go, gp, op, pb = graph.edges
    assert [e.key for e in graph.edges] == [GO, GP, OP, PB]
    assert (go.windows, go.requests, go.responses, go.failures) == (2, 150, 148, 2)
    assert graph.rate(go) == 150 / 30
    assert go.error_ratio == 2 / 150
    exact = sorted(lat_a + lat_b)[math.floor(0.95 * 199)]
    assert go.p95_ms is not None and abs(go.p95_ms - exact) <= ALPHA * exact
    # the newest window's circuit; openings as reported when the edge reports, else derived
    assert (pb.circuit, pb.opened) == ("closed", 1)
    assert (op.circuit, op.opened) == ("half_open", 2)
    assert (gp.error_ratio, gp.p95_ms, gp.health) == (None, None, {"healthy": 5, "degraded": 1})
    assert build_graph([], 60).edges == []


@pytest.mark.parametrize(("failures", "outcomes", "circuit", "want"), [
    (0, 100, "closed", "ok"), (99, 10_000, "closed", "ok"),
    (1, 100, "closed", "warn"), (49, 1000, "closed", "warn"),
    (5, 100, "closed", "bad"), (100, 100, "closed", "bad"),
    (0, 100, "half_open", "warn"), (0, 100, "open", "bad"), (0, 0, "closed", "idle"),
    (0, 0, "open", "bad")])
def test_colour_from_error_ratio_and_circuit(failures: int, outcomes: int, circuit: str,
                                            want: str) -> None:
    edge = EdgeView(*GO, responses=outcomes - failures, failures=failures, circuit=circuit)
    assert status(edge) == want
    assert (ERROR_WARN, ERROR_BAD) == (0.01, 0.05)


def test_labels_say_rate_p95_and_errors() -> None:
    graph = build_graph([
        row(GO, 0, requests=123, responses=120, errors=3, latencies=(10.0,) * 123),
        row(PB, 0, requests=10, responses=10, latencies=(4.0,) * 10, circuit="open",
            transitions={"derived:open": 1}),
        row(GP, 0, health={"healthy": 4, "unhealthy": 2})], 600)
    go, gp, pb = graph.edges
    sketch_p95 = go.p95_ms
    assert sketch_p95 is not None
    assert edge_lines(graph, go) == ["http · 12.3 req/s",
                                     f"p95 {sketch_p95:.1f} ms · 2.4 % errors"]  # 3 of 123
    assert edge_lines(graph, pb)[2] == "circuit open, opened 1×"
    assert edge_lines(graph, gp) == ["http · 6 health checks (2 not healthy)"]


def test_dot_names_every_service_and_edge() -> None:
    graph = build_graph([row(GO, 0, requests=1, responses=1, latencies=(1.0,)),
                         row(LD, 0, requests=2, responses=1, errors=1, latencies=(1.0, 2.0))],
                        60)
    source = to_dot(graph).source
    for service in ("gateway", "orders", "legacy:v1", "db"):
        assert f'id="service:{service}"' in source
    # a ':' in a service name must not become a DOT port: nodes are named n0, n1, ...
    assert "legacy:v1 ->" not in source and '"legacy:v1" ->' not in source
    lines = [ln for ln in source.splitlines() if "->" in ln]
    assert len(lines) == 2
    assert f'id="{edge_id(GO)}"' in lines[0] and f'color="{COLOURS["ok"]}"' in lines[0]
    assert f'id="{edge_id(LD)}"' in lines[1] and f'color="{COLOURS["bad"]}"' in lines[1]
