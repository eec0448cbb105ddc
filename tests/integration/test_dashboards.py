"""Every panel of the Grafana dashboards, and every alert rule, against a real Prometheus
scraping a real worker (and a service's shim) that processed known traffic
(:mod:`tests.integration.observed`).

Each panel's PromQL is read from the dashboard files themselves, with Grafana's variables
set to "All" and ``$__rate_interval`` set to exactly the time between the scrape before
phase 2 and the scrape after it, evaluated at the latter: a rate is then phase 2's increase
over that time, computed here from the events sent. The label sets must be exactly the
expected ones; the values too, wherever the traffic (rather than the scrape timing)
determines them.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.core.sketch import ALPHA
from tests.integration.observed import (
    ALL_EDGES,
    BUFFER,
    DROPS,
    ROOT,
    Observed,
    edge_of,
    observe,
    outcome_latencies_s,
    window_events,
)
from tests.integration.test_metrics import BOUNDS
from tests.integration.traffic import breaker_entries
from tests.integration.workers import wait_until

pytestmark = pytest.mark.integration

DASHBOARDS = sorted((ROOT / "grafana/dashboards").glob("*.json"))
ALL = {"$source": ".*", "$target": ".*", "$protocol": ".*"}
Labels = frozenset[tuple[str, str]]


@pytest.fixture(scope="module")
def observed(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[Observed]:
    from agents.topics import ensure_topics
    from pipeline.dev.process import run_sync

    def make(partitions: int = 4) -> str:
        name = f"test.dashboards.{uuid.uuid4().hex[:8]}"
        options = {"bootstrap_servers": kafka_bootstrap}
        run_sync(lambda: ensure_topics({name: partitions}, client_options=options))
        return name

    yield from observe(kafka_bootstrap, make, tmp_path_factory.mktemp("observed"))


def panel_targets() -> list[tuple[str, str, dict[str, Any]]]:
    """(dashboard uid, "panel title/refId", target) of every query in the dashboards."""
    out = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                out.append((board["uid"], f"{panel['title']}/{target['refId']}", target))
    return out


def lab(edge: tuple[str, str, str] | None = None, **extra: str) -> Labels:
    named = dict(zip(("source_service", "target_service", "protocol"), edge or (), strict=False))
    return frozenset({**named, **extra}.items())


# --- what the traffic determines -------------------------------------------------------

class Any0:
    """A value the scrape timing decides: only its sign is known."""

    def __init__(self, test: Callable[[float], bool], what: str) -> None:
        self.test, self.what = test, what

    def __repr__(self) -> str:
        return self.what


POSITIVE = Any0(lambda v: v > 0, "> 0")
NONNEG = Any0(lambda v: v >= 0, ">= 0")
AT_LEAST_1 = Any0(lambda v: v >= 1, ">= 1")


def per_edge(expected: Any) -> dict[tuple[str, str, str], Counter[str]]:
    out: dict[tuple[str, str, str], Counter[str]] = defaultdict(Counter)
    for (_, edge), c in expected.counts.items():
        out[edge].update(c)
    return out


def histogram_quantile(q: float, cumulative: list[tuple[float, float]]) -> float:
    """Prometheus's bucket interpolation, written out: cumulative (upper bound, count)
    pairs in order, the last one +Inf."""
    total = cumulative[-1][1]
    rank = q * total
    b = next(i for i, (_, c) in enumerate(cumulative) if c >= rank)
    if b == len(cumulative) - 1:
        return cumulative[-2][0]
    below, start = (0.0, 0.0) if b == 0 else (cumulative[b - 1][1], cumulative[b - 1][0])
    return start + (cumulative[b][0] - start) * (rank - below) / (cumulative[b][1] - below)


def cumulative(values: list[float]) -> list[tuple[float, float]]:
    return [(bound, sum(1 for v in values if v <= bound)) for bound in BOUNDS] + [
        (math.inf, len(values))]


def exact_quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[math.floor(q * (len(ordered) - 1))]


def slo_results(o: Observed) -> dict[tuple[tuple[str, str, str], str], tuple[float, bool]]:
    """(edge, objective) -> (measured, ok) over each edge's newest window, with the
    default objectives, written out plainly."""
    both = o.everything()
    out = {}
    for edge in ALL_EDGES:
        start = max(s for s, e in both.counts if e == edge)
        mine = window_events(both, edge, start)
        lat = [v * 1000 for v in outcome_latencies_s(mine)]
        if lat and edge[2] in ("http", "grpc"):
            p95 = exact_quantile(lat, 0.95)
            assert abs(p95 - 100) > 1.5, f"p95 {p95} too close to 100 ms: change the seed"
            out[(edge, "latency_p95")] = (p95, p95 < 100)
        if lat:
            out[(edge, "latency_max")] = (max(lat), max(lat) <= 200)
        k = Counter(e["kind"] for e in mine)
        outcomes = k["response"] + k["error"] + k["timeout"]
        if outcomes:
            out[(edge, "delivery_success")] = (k["response"] / outcomes,
                                               k["response"] / outcomes > 0.999)
        retries = [e["backoff_ms"] for e in mine if e["kind"] == "retry"]
        if retries:  # every retry event is its own call (its own correlation id)
            out[(edge, "retry_backoff")] = (max(retries), max(retries) <= 1000)
        for e in mine:
            if e["kind"] == "circuit" and e["circuit_state"] == "open":
                edge_all = [f for f in both.events if (f["source_service"], f["target_service"],
                                                       f["protocol"]) == edge]
                failed = max(f["ts"] for f in edge_all if f["kind"] in ("error", "timeout")
                             and f["ts"] <= e["ts"])
                reaction = (e["ts"] - failed) * 1000
                out[(edge, "circuit_reaction")] = (reaction, reaction <= 50)
    return out


def circuit_values(o: Observed) -> dict[Labels, float]:
    both = o.everything()
    code = {"closed": 0.0, "half_open": 1.0, "open": 2.0}
    out = {lab(edge, source="derived"): code[breaker_entries(both.outcomes[edge])[0]]
           for edge in ALL_EDGES}
    for edge in ALL_EDGES:
        reported = [e["circuit_state"] for e in both.events if e["kind"] == "circuit" and (
            e["source_service"], e["target_service"], e["protocol"]) == edge]
        if reported:
            out[lab(edge, source="reported")] = code[reported[-1]]
    return out


def expectations(o: Observed) -> dict[str, dict[Labels, Any]]:
    """``"title/refId"`` -> the series it must return and their values."""
    r, d = o.window_s, o.delta()
    change = per_edge(d)
    first = per_edge(o.phases[0].events)
    errors: dict[tuple[Any, ...], int] = Counter()
    for (_, edge), c in d.errors.items():
        for t, n in c.items():
            errors[(edge, t)] += n
    born = {(edge, t) for (_, edge), c in o.phases[0].events.errors.items() for t in c}
    assert set(errors) <= born, "an error type new in phase 2 would start its series late"
    lat = defaultdict(list)
    for (_, edge), values in d.latencies.items():
        lat[edge] += [v / 1000 for v in values]
    both = o.everything()
    last = {edge: window_events(both, edge, max(s for s, e in both.counts if e == edge))
            for edge in ALL_EDGES}
    failed = {e: change[e]["error"] + change[e]["timeout"] for e in ALL_EDGES}
    slo = slo_results(o)
    w = {("instance", o.worker), ("job", "commpipe-worker")}

    def at(**extra: str) -> Labels:
        return frozenset({("instance", o.worker), *extra.items()})

    last_ratio = {}
    for edge, events in last.items():
        k = Counter(e["kind"] for e in events)
        last_ratio[lab(edge)] = (k["error"] + k["timeout"]) / max(
            k["response"] + k["error"] + k["timeout"], 1)
    heat = cumulative([v for values in lat.values() for v in values])
    missed = {(edge, obj): m for (edge, obj), (m, ok) in slo.items() if not ok}
    shim = frozenset({("instance", o.shim), ("job", "commpipe-shim"), ("emitter", "default")})
    assert set(first) == set(ALL_EDGES)  # every edge's series exist before phase 2
    return {
        "Requests per second/A": {lab(e): change[e]["request"] / r for e in ALL_EDGES},
        "Error ratio/A": {lab(e): failed[e] / (change[e]["response"] + failed[e])
                          for e in ALL_EDGES},
        "Errors per second, by type/A": {lab(e, error_type=t): errors.get((e, t), 0) / r
                                         for e, t in born},
        "Errors per second, by type/B": {lab(e): change[e]["timeout"] / r for e in ALL_EDGES},
        "Retries per second/A": {lab(e): change[e]["retry"] / r for e in ALL_EDGES},
        "Error ratio, last closed window/A": last_ratio,
        **{f"Latency p50 / p95 / p99 (histogram)/{ref}": {
            lab(e): histogram_quantile(q, cumulative(lat[e])) for e in ALL_EDGES}
           for ref, q in (("A", 0.5), ("B", 0.95), ("C", 0.99))},
        **{f"p95 and p99, last closed window (1 % sketch)/{ref}": {
            lab(e): ("sketch", exact_quantile(outcome_latencies_s(last[e]), q))
            for e in ALL_EDGES} for ref, q in (("A", 0.95), ("B", 0.99))},
        "Latency heatmap/A": {frozenset({("le", "+Inf" if b == math.inf else repr(b))}): n / r
                              for b, n in heat},
        "Circuit state/A": circuit_values(o),
        "Objectives missed, last closed window/A": {
            frozenset({*lab(edge, objective=obj), *w}): ("sketch" if obj == "latency_p95"
                                                        else "exact", m)
            for (edge, obj), m in missed.items()},
        "Edges missing each objective/A": {
            frozenset({("objective", obj)}): n
            for obj, n in Counter(obj for (_, obj) in missed).items()},
        # the pipeline itself
        "Events consumed per second/A": {at(): o.phases[1].valid / r},
        "Consumer lag/A": {at(partition=str(p)): NONNEG for p in range(4)},  # Tansu: see README
        "Targets up/A": {frozenset({("job", "commpipe-worker")}): 1.0,
                         frozenset({("job", "commpipe-shim")}): 1.0},
        "Dead letters per second, by reason/A": {frozenset({("reason", k)}): n / r
                                                 for k, n in o.phases[1].dead.items()},
        "Duplicates skipped and late events per second/A": {at(): o.phases[1].duplicates / r},
        "Duplicates skipped and late events per second/B": {at(): o.phases[1].late / r},
        "Sink transactions per second/A": {at(database="duckdb"): POSITIVE,
                                           at(database="postgres"): 0.0},
        "Sink transactions per second/B": {at(database="duckdb"): 0.0,
                                           at(database="postgres"): POSITIVE},
        "Window rows stored per second/A": {at(database="duckdb"): POSITIVE,
                                            at(database="postgres"): 0.0},
        "Last sink transaction's duration/A": {at(database="duckdb"): POSITIVE,
                                               at(database="postgres"): 0.0},
        "Events dropped by the shim per second/A": {shim: DROPS[1] / o.shim_window_s},
        "Events waiting in the shim/A": {shim: float(BUFFER)},
        "Edges reported/A": {at(): float(len(ALL_EDGES))},
        "Edges reported/B": {at(): 0.0},
        "Keys in the worker's table/A": {at(kind="edge"): float(len(ALL_EDGES)),
                                         at(kind="window"): POSITIVE,
                                         at(kind="detail"): NONNEG, at(kind="partition"): POSITIVE},
        "Batches per second, records per batch/A": {at(): POSITIVE},
        "Batches per second, records per batch/B": {at(): AT_LEAST_1},
    }


def check(name: str, got: dict[Labels, float], want: dict[Labels, Any]) -> None:
    assert set(got) == set(want), (name, sorted(map(sorted, got)), sorted(map(sorted, want)))
    for labels, value in want.items():
        v = got[labels]
        where = (name, sorted(labels), v, value)
        if isinstance(value, Any0):
            assert value.test(v), where
        elif isinstance(value, tuple):  # ("sketch", exact): within 1 %; ("exact", x)
            kind, exact = value
            tolerance = ALPHA * exact if kind == "sketch" else 1e-9 * max(abs(exact), 1)
            assert abs(v - exact) <= tolerance + 1e-12, where
        else:
            assert v == pytest.approx(value, rel=1e-3, abs=1e-9), where


def prepared(expr: str, o: Observed) -> tuple[str, float]:
    """The query as Grafana sends it with every variable on "All", and when to run it."""
    for name, value in ALL.items():
        expr = expr.replace(name, value)
    shim = "commpipe_shim_" in expr
    seconds = o.shim_window_s if shim else o.window_s
    # 1 ms wider than the scrapes apart, so the earlier scrape is inside the range whether
    # the range's start counts as inside (Prometheus 2) or not (3): the rate is unchanged
    expr = expr.replace("$__rate_interval", f"{round(seconds * 1000) + 1}ms")
    assert "$" not in expr, expr
    return expr, (o.s_last if shim else o.t_last)


def test_every_panel_returns_the_series_the_traffic_determines(observed: Observed) -> None:
    want = expectations(observed)
    targets = panel_targets()
    assert sorted(name for _, name, _ in targets) == sorted(want)  # every panel, no other
    assert len(DASHBOARDS) == 2
    for uid, name, target in targets:
        expr, at = prepared(target["expr"], observed)
        check(f"{uid}: {name}", observed.server.vector(expr, at), want[name])


def test_variables_list_every_service_and_protocol(observed: Observed) -> None:
    board = json.loads((ROOT / "grafana/dashboards/commpipe-communication.json").read_text())
    found = {}
    for var in board["templating"]["list"]:
        m = re.fullmatch(r"label_values\((.+), (\w+)\)", var["query"]["query"])
        assert m is not None, var
        selector = m[1]
        for name, value in ALL.items():
            selector = selector.replace(name, value)
        found[var["name"]] = set(observed.server.api(f"label/{m[2]}/values",
                                                     **{"match[]": selector}))
    assert found == {"source": {e[0] for e in ALL_EDGES}, "target": {e[1] for e in ALL_EDGES},
                     "protocol": {e[2] for e in ALL_EDGES}}


def test_alert_rules_evaluate_on_the_real_metrics(observed: Observed) -> None:
    """The rules file loads, every rule evaluates without error, and the alerts that the
    traffic calls for (and only those) are pending or firing."""
    o = observed
    groups = o.server.api("rules")["groups"]
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    assert {n for n, r in rules.items() if r["type"] == "alerting"} == {
        "CommpipeEdgeErrorRatioHigh", "CommpipeLatencyP95OverObjective", "CommpipeCircuitOpen",
        "CommpipeConsumerLagHigh", "CommpipeSinkFailing", "CommpipeShimDropping"}
    assert {n: r["health"] for n, r in rules.items()} == dict.fromkeys(rules, "ok")
    change = per_edge(o.delta())
    want: set[Labels] = set()
    for edge in ALL_EDGES:
        failed = change[edge]["error"] + change[edge]["timeout"]
        outcomes = change[edge]["response"] + failed
        ratio = failed / outcomes
        assert abs(ratio - 0.05) > 0.005, f"{edge}: {ratio} too close to 5 %: change the seed"
        if ratio > 0.05:
            assert outcomes >= 30, edge  # well over the rule's minimum of 0.05/s
            want.add(frozenset({("alertname", "CommpipeEdgeErrorRatioHigh"),
                                ("severity", "warning"), *lab(edge)}))
    for (edge, objective), (_, ok) in slo_results(o).items():
        if objective == "latency_p95" and not ok:
            want.add(frozenset({("alertname", "CommpipeLatencyP95OverObjective"),
                                ("severity", "warning"), ("objective", objective),
                                ("instance", o.worker), ("job", "commpipe-worker"),
                                *lab(edge)}))
    opened = {edge_of(k - {("source", "derived"), ("source", "reported")})
              for k, v in circuit_values(o).items() if v == 2.0}
    assert {("orders", "inventory", "http"), ("payments", "bank", "amqp")} <= opened
    want |= {frozenset({("alertname", "CommpipeCircuitOpen"), ("severity", "critical"),
                        *lab(edge)}) for edge in opened}
    want.add(frozenset({("alertname", "CommpipeSinkFailing"), ("severity", "critical"),
                        ("database", "postgres"), ("instance", o.worker),
                        ("job", "commpipe-worker")}))
    want.add(frozenset({("alertname", "CommpipeShimDropping"), ("severity", "critical"),
                        ("emitter", "default"), ("instance", o.shim), ("job", "commpipe-shim")}))

    def active() -> set[Labels]:
        return {labels - {("alertstate", "pending"), ("alertstate", "firing")}
                for labels in o.server.vector("ALERTS")}

    wait_until(lambda: active() == want, timeout=30, what="the expected alerts",
               logs=lambda: "\n".join(sorted(map(str, map(sorted, active() ^ want)))))
    assert {dict(labels)["alertstate"] for labels in o.server.vector("ALERTS")} <= {
        "pending", "firing"}


def test_the_rules_prometheus_loads_are_the_ones_compose_mounts() -> None:
    """prometheus.yml's rule file is the one tested here and mounted by docker-compose."""
    import yaml

    config = yaml.safe_load((ROOT / "prometheus.yml").read_text())
    assert config["rule_files"] == ["prometheus/alerts.yml"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    volumes = compose["services"]["prometheus"]["volumes"]
    assert "./prometheus/alerts.yml:/etc/prometheus/prometheus/alerts.yml:ro" in volumes
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in volumes
    assert Path(ROOT / "prometheus/alerts.yml").exists()
