"""The message_patterns catalogue without databases: files, every validation rule with the
pattern and field it names, the rows written, and the comparison with observations."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.cli.durations import parse_duration
from pipeline.cli.patterns import (
    Edge,
    EdgeObservation,
    Pattern,
    Sla,
    compare,
    observe,
    parse_file,
    parse_patterns,
    pattern_of_row,
    upsert_statements,
)
from pipeline.core.sketch import LatencySketch
from pipeline.errors import ConfigError

YAML = """\
patterns:
  - name: checkout-saga
    type: saga
    services: [orders, payments, inventory]
    flow:
      - {source: orders, target: payments, protocol: grpc}
      - {source: orders, target: inventory, protocol: http}
      - {source: payments, target: inventory, protocol: amqp}
    reliability: at_least_once
    consistency: eventual
    failure_handling:
      payment_declined: release the inventory, cancel the order
      retries: 3
    sla: {p95_latency_ms: 250, success_ratio: 0.999}
  - name: order-lookup
    type: request_response
    services: [gateway, orders]
    flow:
      - {source: gateway, target: orders, protocol: http}
"""
TOML = """\
[[patterns]]
name = "checkout-saga"
type = "saga"
services = ["orders", "payments", "inventory"]
flow = [
  {source = "orders", target = "payments", protocol = "grpc"},
  {source = "orders", target = "inventory", protocol = "http"},
  {source = "payments", target = "inventory", protocol = "amqp"},
]
reliability = "at_least_once"
consistency = "eventual"
failure_handling = {payment_declined = "release the inventory, cancel the order", retries = 3}
sla = {p95_latency_ms = 250, success_ratio = 0.999}

[[patterns]]
name = "order-lookup"
type = "request_response"
services = ["gateway", "orders"]
flow = [{source = "gateway", target = "orders", protocol = "http"}]
"""
SAGA = Pattern(
    name="checkout-saga", type="saga", services=["orders", "payments", "inventory"],
    flow=[Edge(source="orders", target="payments", protocol="grpc"),
          Edge(source="orders", target="inventory", protocol="http"),
          Edge(source="payments", target="inventory", protocol="amqp")],
    reliability="at_least_once", consistency="eventual",
    failure_handling={"payment_declined": "release the inventory, cancel the order",
                      "retries": 3},
    sla=Sla(p95_latency_ms=250.0, success_ratio=0.999))
LOOKUP = Pattern(name="order-lookup", type="request_response", services=["gateway", "orders"],
                 flow=[Edge(source="gateway", target="orders", protocol="http")])


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize(("name", "text"), [("c.yaml", YAML), ("c.yml", YAML), ("c.toml", TOML)])
def test_yaml_and_toml_read_the_same(tmp_path: Path, name: str, text: str) -> None:
    assert parse_file(write(tmp_path, name, text)) == [SAGA, LOOKUP]


def good(**changes: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": "checkout-saga", "type": "saga", "services": ["orders", "payments"],
        "flow": [{"source": "orders", "target": "payments", "protocol": "grpc"}],
        "sla": {"p95_latency_ms": 100}}
    for key, value in changes.items():
        if value is None:
            raw.pop(key)
        else:
            raw[key] = value
    return raw


def problems(*raws: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_patterns({"patterns": list(raws)}, source="c.yaml")
    head, *lines = str(info.value).split("\n")
    assert head == f"c.yaml: {len(lines)} problem{'s' if len(lines) > 1 else ''}:"
    return [line.strip() for line in lines]


@pytest.mark.parametrize(("changes", "problem"), [
    ({"type": "sagaa"}, "field 'type': must be one of request_response, fire_and_forget, "
                        "pub_sub, saga (got 'sagaa')"),
    ({"type": None}, "field 'type': required"),
    ({"services": ["orders", "pay ments"]},
     "field 'services[1]': 'pay ments' is not a service name ([A-Za-z0-9._:-]{1,100})"),
    ({"services": []}, "field 'services': list should have at least 1 item after validation, "
                       "not 0"),
    ({"services": "orders"}, "field 'services': input should be a valid list (got 'orders')"),
    ({"flow": [{"source": "orders", "target": "payments", "protocol": "GRPC"}]},
     "field 'flow[0].protocol': 'GRPC' is not a lower-case protocol ([a-z][a-z0-9._-]{0,31})"),
    ({"flow": [{"source": "orders", "target": "payments"}]}, "field 'flow[0].protocol': required"),
    ({"flow": [{"source": "orders", "target": "payments", "protocol": "grpc", "via": "x"}]},
     "field 'flow[0].via': unknown field (known: source, target, protocol)"),
    ({"flow": [{"source": "orders", "target": "bank", "protocol": "grpc"}]},
     "field 'flow[0].target': 'bank' is not in services"),
    ({"reliability": "once"}, "field 'reliability': must be one of at_least_once, "
                              "at_most_once, exactly_once (got 'once')"),
    ({"consistency": "sometimes"}, "field 'consistency': must be one of eventual, strong, "
                                   "causal (got 'sometimes')"),
    ({"sla": {"success_ratio": 1.5}}, "field 'sla.success_ratio': input should be less than "
                                      "or equal to 1 (got 1.5)"),
    ({"sla": {"p95_latency_ms": -3}}, "field 'sla.p95_latency_ms': input should be greater "
                                      "than 0 (got -3)"),
    ({"sla": {"p95_latency_ms": "100ms"}}, "field 'sla.p95_latency_ms': input should be a "
                                           "valid number (got '100ms')"),
    ({"sla": {"p95": 100}}, "field 'sla.p95': unknown field (known: p95_latency_ms, "
                            "p99_latency_ms, success_ratio)"),
    ({"sla": {}}, "field 'sla': sets none of p95_latency_ms, p99_latency_ms, success_ratio"),
    ({"relability": "at_least_once"}, "field 'relability': unknown field (known: name, type, "
                                      "services, flow, reliability, consistency, "
                                      "failure_handling, sla)"),
    ({"services": ["orders", "payments", "orders"]}, "field 'services': lists a service twice"),
])
def test_each_invalid_field_is_named(changes: dict[str, Any], problem: str) -> None:
    assert problems(good(**changes)) == [f"pattern 'checkout-saga': {problem}"]


def test_every_problem_at_once_and_unnamed_patterns_by_position() -> None:
    assert problems(good(type="x", reliability="y"), good(name=None), "oops",
                    good(), good(), good(name="a\nb")) == [
        "pattern 'checkout-saga': field 'type': must be one of request_response, "
        "fire_and_forget, pub_sub, saga (got 'x')",
        "pattern 'checkout-saga': field 'reliability': must be one of at_least_once, "
        "at_most_once, exactly_once (got 'y')",
        "pattern #2: field 'name': required",
        "pattern #3: expected a mapping of fields, got str",
        "pattern 'checkout-saga': defined twice (patterns #4 and #5)",
        "pattern 'a\\nb': field 'name': 'a\\nb' is not 1-100 characters without control "
        "characters",
    ]


@pytest.mark.parametrize(("data", "error"), [
    (None, "c.yaml: expected a top-level 'patterns' list of patterns"),
    ({"pattern": []}, "c.yaml: expected a top-level 'patterns' list of patterns"),
    ({"patterns": []}, "c.yaml: 1 problem:\n  'patterns' is empty"),
    ({"patterns": [good()], "extra": 1},
     "c.yaml: 1 problem:\n  top-level key 'extra': unknown (only 'patterns')"),
])
def test_file_shape(data: Any, error: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_patterns(data, source="c.yaml")
    assert str(info.value) == error


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"c\.json: unknown file type '\.json'; use"):
        parse_file(write(tmp_path, "c.json", "{}"))
    with pytest.raises(ConfigError, match=r"cannot read .*missing\.yaml: \[Errno 2\]"):
        parse_file(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML: .*line 2"):
        parse_file(write(tmp_path, "bad.yaml", "patterns:\n  - [unclosed\n"))
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML: .*line 1"):
        parse_file(write(tmp_path, "bad.toml", "[[patterns]\n"))


@pytest.mark.parametrize("dialect", ["postgres", "duckdb"])
def test_rows_written_and_read_back(dialect: str) -> None:
    (sql, params), (_, lookup) = upsert_statements([SAGA, LOOKUP], dialect)  # type: ignore[arg-type]
    assert sql.startswith("INSERT INTO message_patterns (pattern_name, pattern_type, ")
    assert ("?" in sql) == (dialect == "duckdb") and "ON CONFLICT (pattern_name)" in sql
    assert params == [
        "checkout-saga", "saga", ["orders", "payments", "inventory"],
        '[{"source":"orders","target":"payments","protocol":"grpc"},'
        '{"source":"orders","target":"inventory","protocol":"http"},'
        '{"source":"payments","target":"inventory","protocol":"amqp"}]',
        "at_least_once", "eventual",
        '{"payment_declined":"release the inventory, cancel the order","retries":3}',
        '{"p95_latency_ms":250.0,"success_ratio":0.999}']
    assert lookup[4:] == [None, None, None, None]
    # as PostgreSQL (jsonb parsed) and DuckDB (JSON text) give the rows back
    assert pattern_of_row(params) == SAGA
    assert pattern_of_row([*params[:7], orjson.loads(params[7])]) == SAGA
    with pytest.raises(ConfigError, match="pattern 'checkout-saga': field 'type'"):
        pattern_of_row(["checkout-saga", "nonsense", *params[2:]])


@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90.0), ("30m", 1800.0), ("1h", 3600.0), ("2d", 172800.0), ("45", 45.0),
    (" 1.5H ", 5400.0)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "1x", "0s", "h", "-5m", "1h30m"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ConfigError, match="is not a duration: use e.g. 90s, 30m, 1h or 2d"):
        parse_duration(text)


def sketch(*values: float) -> dict[str, Any]:
    s = LatencySketch()
    s.add_many(values)
    return s.to_json()


def test_observe_merges_windows_and_compare_names_each_difference() -> None:
    op, oi = ("orders", "payments", "grpc"), ("orders", "inventory", "http")
    rows = [(*op, 10, 9, 1, 0, sketch(*[10.0] * 9, 400.0)),
            (*op, 10, 10, 0, 0, orjson.dumps(sketch(*[20.0] * 10)).decode()),  # DuckDB: text
            (*oi, 4, 0, 0, 0, sketch())]  # requests only: nothing to judge the SLA by
    observed = observe(rows)
    assert (observed[op].windows, observed[op].requests, observed[op].outcomes,
            observed[op].success_ratio) == (2, 20, 20, 19 / 20)
    assert observed[oi].success_ratio is None and observed[oi].latency.quantile(0.95) is None
    p95 = observed[op].latency.quantile(0.95)
    assert p95 is not None and abs(p95 - 20.0) <= 0.2  # 19 values of 10 and 20, one of 400
    tight = SAGA.model_copy(update={"sla": Sla(p95_latency_ms=15.0, p99_latency_ms=500.0,
                                               success_ratio=0.99)})
    diffs = compare(tight, observed, "1h")
    assert [(d.kind, d.edge.key) for d in diffs] == [
        ("p95_latency", op), ("success_ratio", op),
        ("edge_not_seen", ("payments", "inventory", "amqp"))]
    assert diffs[0].message == f"orders → payments · grpc: p95 latency {p95:,.1f} ms is above " \
                               "the SLA's 15 ms"
    assert diffs[1].message == ("orders → payments · grpc: success ratio 0.9500 (19 of 20 "
                                "outcomes) is below the SLA's 0.99")
    assert diffs[2].message == "flow edge payments → inventory · amqp: no traffic in the last 1h"
    assert (diffs[1].observed, diffs[1].expected) == (0.95, 0.99)
    assert compare(LOOKUP, {("gateway", "orders", "http"): EdgeObservation(windows=1)},
                   "1h") == []
