"""The gates of ``commpipe check`` over plain rows: each rule, its edge cases, and a gate with
nothing to judge failing rather than passing."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest

from pipeline.cli.check import REPORT_SCHEMA, STATEMENTS, Data, evaluate
from pipeline.cli.check_config import GATES, parse_config
from pipeline.core.sketch import LatencySketch

SLOW = ("orders", "inventory", "http")


def sketch(*values: float) -> str:
    s = LatencySketch()
    s.add_many(values)
    import orjson

    return orjson.dumps(s.to_json()).decode()


def data(**rows: list[tuple[Any, ...]]) -> Data:
    base: dict[str, list[tuple[Any, ...]]] = {name: [] for name in STATEMENTS}
    base["traced"] = [(0, 0)]
    base.update(rows)
    return Data(base)


def report(config: dict[str, Any], d: Data) -> dict[str, Any]:
    r = evaluate(parse_config(config), d, database="duckdb", config="c.yml", since_s=3600,
                 since_ts=1.7e9)
    out = r.to_json()
    jsonschema.validate(out, REPORT_SCHEMA)
    return {g["name"]: g for g in out["gates"]} | {"_passed": out["passed"],
                                                    "_disabled": out["disabled"]}


def test_nothing_to_judge_fails_every_gate_and_says_why() -> None:
    got = report({"approved_protocols": ["http"]}, data())
    assert got["_passed"] is False
    for name in GATES:
        g = got[name]
        assert (g["passed"], g["status"], g["measured"], g["judged"]) == (
            False, "nothing_to_judge", None, 0), name
        assert g["note"].startswith("nothing to judge: "), name


def test_failures_without_trace_context_leave_cascades_unjudged() -> None:
    d = data(cascades=[("a", "b", "http", 100, 0)], traced=[(7, 0)])
    g = report({"approved_protocols": ["http"]}, d)["cascade_failure_rate"]
    assert (g["status"], g["measured"]) == ("nothing_to_judge", None)
    assert g["note"] == ("nothing to judge: 7 failed calls, none with trace context (span "
                         "ids): propagate traceparent (README 'Trace context')")
    # one traced failure is enough to judge; the rest are named in the note
    g = report({"approved_protocols": ["http"]},
               data(cascades=[("a", "b", "http", 100, 0)], traced=[(7, 1)]))[
        "cascade_failure_rate"]
    assert (g["status"], g["measured"]) == ("passed", 0.0)
    assert g["note"] == "6 of 7 failed calls carry no span id and cannot be judged"


def test_thresholds_and_their_comparisons() -> None:
    edges = [("gw", "orders", "http", 1000, 1000, 0, 0, 0), ("orders", "bank", "amqp",
                                                              1000, 999, 1, 0, 0)]
    d = data(edges=edges, cascades=[("gw", "orders", "http", 1000, 1),
                                    ("orders", "bank", "amqp", 1000, 0)],
             traced=[(1, 1)], health=[("gw", 95.0), ("orders", 90.0)],
             windows=[("orders", "bank", "amqp", '{"dead_letter": 1}', None),
                      ("gw", "orders", "http", "{}", sketch(*range(1, 101)))])
    cfg = {"approved_protocols": ["http", "amqp"], "protected": [{}]}
    got = report(cfg, d)
    # 1 cascade in 2,000 calls = 0.0005 < 0.001; exactly 0.001 would fail (strictly under)
    assert got["cascade_failure_rate"]["measured"] == 0.0005 and got[
        "cascade_failure_rate"]["passed"]
    at_limit = report(cfg | {"thresholds": {"cascade_failure_rate": 0.0005}}, d)
    assert at_limit["cascade_failure_rate"]["passed"] is False
    # delivery 999/1000 = 0.999 is not above 0.999
    assert got["delivery_success"]["measured"] == 0.999
    assert got["delivery_success"]["passed"] is False
    assert got["dead_letter_ratio"]["measured"] == 0.001 and not got["dead_letter_ratio"][
        "passed"]
    assert report(cfg | {"thresholds": {"dead_letter_ratio": 0.001}}, d)[
        "dead_letter_ratio"]["passed"]
    # health: 90 is not above 90
    assert [o["service"] for o in got["health_score"]["offenders"]] == ["orders"]
    # latency: p95 of 1..100 ms is 95 (within 1 %), under 100, not under 90
    assert got["latency_sla"]["passed"]
    slow = report(cfg | {"latency": [{"source": "gw", "p95_ms": 90}]}, d)["latency_sla"]
    assert slow["measured"] == 0.0 and slow["offenders"][0]["threshold_ms"] == 90
    assert slow["offenders"][0]["p95_ms"] == pytest.approx(95, rel=0.01)


def test_protocols_per_service_and_declared_protection() -> None:
    edges = [("gw", "orders", "http", 10, 10, 0, 0, 0), ("inv", "db", "kafka", 5, 5, 0, 0, 0),
             ("pay", "bank", "amqp", 5, 5, 0, 0, 2), ("gw", "pay", "http", 0, 0, 0, 0, 0)]
    cfg = {"approved_protocols": ["http"], "services": {"inv": {"approved_protocols":
                                                                ["kafka"]}},
           "protected": [{"source": "inv", "by": "pool retries"}, {"target": "nothing"}]}
    got = report(cfg, data(edges=edges, breakers=[("gw", "orders", "http")]))
    p = got["approved_protocols"]
    assert p["measured"] == pytest.approx(2 / 3) and p["judged"] == 3
    assert [(o["source_service"], o["protocol"], o["approved"]) for o in p["offenders"]] == [
        ("pay", "amqp", ["http"])]
    r = got["resilience_coverage"]  # gw -> pay has no calls (health checks only)
    assert (r["measured"], r["judged"], r["offenders"]) == (1.0, 3, [])
    without = report({"approved_protocols": ["http"]}, data(edges=edges))["resilience_coverage"]
    assert [(o["source_service"], o["target_service"]) for o in without["offenders"]] == [
        ("gw", "orders"), ("inv", "db")]


def test_disabled_gates_are_not_run_and_are_named() -> None:
    got = report({"approved_protocols": ["http"], "disabled": ["health_score",
                                                                "delivery_success"]}, data())
    assert "health_score" not in got and "delivery_success" not in got
    assert got["_disabled"] == ["delivery_success", "health_score"]  # in gate order
