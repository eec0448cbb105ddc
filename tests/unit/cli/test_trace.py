"""Building one call's chain from stored rows: order, attempts, backoff, outcome, output."""

from __future__ import annotations

import random
from decimal import Decimal
from typing import Any

import pytest

from pipeline.cli.trace import MAX_EVENTS, build_chain, check_key, render
from pipeline.errors import ConfigError

T0 = 1_750_000_000.0
OP = ("orders", "payments", "grpc")
GO = ("gateway", "orders", "http")


def row(n: int, kind: str, ts: float, edge: tuple[str, str, str] = OP, **fields: Any
        ) -> dict[str, Any]:
    base = {"event_id": f"e{n:02d}", "correlation_id": "chain-1", "ts": ts, "event_type": kind,
            "source_service": edge[0], "target_service": edge[1], "protocol": edge[2],
            "method": None, "attempt": None, "backoff_ms": None, "latency_ms": None,
            "status_code": None, "error_type": None, "error_message": None, "trace_id": None,
            "span_id": None}
    return base | fields


def retried_call(outcome: str = "response", *, with_attempts: bool = True
                 ) -> list[dict[str, Any]]:
    """Three failed attempts with 200/400/800 ms backoff, then the fourth; the error and
    its retry of one attempt share a timestamp (as they do when emitted together)."""
    rows = []
    t = T0
    for n, backoff in enumerate((200.0, 400.0, 800.0), start=1):
        rows.append(row(2 * n, "error", t, attempt=n if with_attempts else None,
                        error_type="http_5xx", status_code=503, latency_ms=10.0 + n,
                        error_message="upstream: password=***"))
        rows.append(row(2 * n + 1, "retry", t, attempt=n, backoff_ms=backoff,
                        error_type="http_5xx"))
        t += backoff / 1000.0 + 0.011
    final = {"response": dict(latency_ms=9.5, status_code=200),
             "error": dict(latency_ms=14.0, status_code=503, error_type="http_5xx"),
             "timeout": dict(latency_ms=1000.0, error_type="timeout")}[outcome]
    rows.append(row(20, outcome, t, attempt=4 if with_attempts else None, **final))
    return rows


@pytest.mark.parametrize(("outcome", "want"), [
    ("response", "succeeded"), ("error", "failed"), ("timeout", "timed_out")])
@pytest.mark.parametrize("with_attempts", [True, False])
def test_retried_call_in_order_whatever_order_the_rows_come_in(
        outcome: str, want: str, with_attempts: bool) -> None:
    rows = retried_call(outcome, with_attempts=with_attempts)
    shuffled = rows[:]
    random.Random(7).shuffle(shuffled)
    chain = build_chain("chain-1", shuffled)
    assert [(s.kind, s.attempt, s.backoff_ms) for s in chain.steps] == [
        ("error", 1, None), ("retry", 1, 200.0), ("error", 2, None), ("retry", 2, 400.0),
        ("error", 3, None), ("retry", 3, 800.0), (outcome, 4, None)]
    assert (chain.attempts, chain.retries, chain.total_backoff_ms, chain.outcome) == (
        4, 3, 1400.0, want)
    assert [(e.source_service, e.target_service, e.protocol, e.attempts, e.retries,
             e.backoff_ms, e.outcome) for e in chain.edges] == [(*OP, 4, 3, 1400.0, want)]


def test_values_as_postgresql_returns_them() -> None:
    def dec(value: float | None) -> Decimal | None:
        return None if value is None else Decimal(f"{value:.2f}")

    rows = [r | {"ts": Decimal(repr(r["ts"])), "backoff_ms": dec(r["backoff_ms"]),
                 "latency_ms": dec(r["latency_ms"])} for r in retried_call()]
    chain = build_chain("chain-1", rows)
    assert chain.total_backoff_ms == 1400.0 and isinstance(chain.total_backoff_ms, float)
    assert [s.latency_ms for s in chain.steps if s.latency_ms] == [11.0, 12.0, 13.0, 9.5]


def test_cascade_across_services() -> None:
    # payments -> bank times out, orders -> payments fails, gateway -> orders fails last
    pb = ("payments", "bank", "amqp")
    rows = [row(3, "error", T0 + 1.2, GO, error_type="http_5xx", status_code=502),
            row(1, "timeout", T0 + 1.0, pb, latency_ms=1000.0, error_type="timeout"),
            row(2, "error", T0 + 1.1, OP, error_type="connection")]
    chain = build_chain("chain-1", rows)
    assert [s.edge for s in chain.steps] == [pb, OP, GO]
    assert [(e.source_service, e.attempts, e.outcome) for e in chain.edges] == [
        ("payments", 1, "timed_out"), ("orders", 1, "failed"), ("gateway", 1, "failed")]
    assert (chain.attempts, chain.retries, chain.total_backoff_ms, chain.outcome) == (
        3, 0, 0.0, "failed")


def test_no_outcome_after_the_last_retry() -> None:
    rows = [row(1, "retry", T0, attempt=1, backoff_ms=100.0),
            row(2, "retry", T0 + 0.2, attempt=2, backoff_ms=200.0)]
    chain = build_chain("chain-1", rows)
    # retry 2 means a third attempt is made; its result was not stored
    assert (chain.attempts, chain.retries, chain.total_backoff_ms, chain.outcome) == (
        3, 2, 300.0, "unknown")
    assert build_chain("x", []).outcome == "unknown" and build_chain("x", []).attempts == 0


def test_truncated_at_max_events() -> None:
    rows = [row(i, "error", T0 + i) for i in range(MAX_EVENTS + 1)]
    chain = build_chain("chain-1", rows)
    assert chain.truncated and len(chain.steps) == MAX_EVENTS
    assert "showing the first 10000" in render(chain)


def test_render_and_json() -> None:
    rows = retried_call()
    rows[0]["error_message"] = "bad\x1b[2Jthing"  # another writer's control characters
    chain = build_chain("chain-1", rows)
    assert render(chain).splitlines() == [
        "chain chain-1: 7 events, 1 edge, 4 attempts, 3 retries, total backoff 1,400 ms; "
        "outcome: succeeded",
        "  orders → payments · grpc: 4 attempts, 3 retries, backoff 1,400 ms, succeeded",
        "started 2025-06-15T15:06:40.000Z (UTC; times are the services' own clocks)",
        "   +time  edge                      event     attempt  backoff  latency  status  error",
        "+0.000 s  orders → payments · grpc  error           1             11 ms     503  "
        "http_5xx: bad [2Jthing",
        "+0.000 s  orders → payments · grpc  retry           1   200 ms                   http_5xx",
        "+0.211 s  orders → payments · grpc  error           2             12 ms     503  "
        "http_5xx: upstream: password=***",
        "+0.211 s  orders → payments · grpc  retry           2   400 ms                   http_5xx",
        "+0.622 s  orders → payments · grpc  error           3             13 ms     503  "
        "http_5xx: upstream: password=***",
        "+0.622 s  orders → payments · grpc  retry           3   800 ms                   http_5xx",
        "+1.433 s  orders → payments · grpc  response        4            9.5 ms     200",
    ]
    data = chain.to_json()
    assert {k: data[k] for k in ("key", "outcome", "attempts", "retries", "total_backoff_ms",
                                 "truncated")} == {
        "key": "chain-1", "outcome": "succeeded", "attempts": 4, "retries": 3,
        "total_backoff_ms": 1400.0, "truncated": False}
    assert data["edges"] == [{"source_service": "orders", "target_service": "payments",
                              "protocol": "grpc", "attempts": 4, "retries": 3,
                              "backoff_ms": 1400.0, "outcome": "succeeded"}]
    assert [(e["kind"], e["attempt"], e["offset_ms"]) for e in data["events"]] == [
        ("error", 1, 0.0), ("retry", 1, 0.0), ("error", 2, 211.0), ("retry", 2, 211.0),
        ("error", 3, 622.0), ("retry", 3, 622.0), ("response", 4, 1433.0)]
    assert data["events"][0]["time"] == "2025-06-15T15:06:40.000000+00:00"
    assert render(build_chain("nope", [])) == "no stored events for nope"


def test_render_fits_the_width_and_keeps_each_value_whole() -> None:
    chain = build_chain("chain-1", retried_call())
    widest = ("+0.211 s  orders → payments · grpc  error           2             12 ms     503  "
              "http_5xx: upstream: password=***")
    assert max(len(line) for line in render(chain).splitlines()) == len(widest)
    assert render(chain, len(widest)) == render(chain)  # it fits: one line per event
    at_80 = render(chain, 80).splitlines()
    assert max(len(line) for line in at_80) <= 80
    # the events keep one line each; their errors go below them, indented
    assert at_80[4:10] == [
        "   +time  edge                      event     attempt  backoff  latency  status",
        "          error",
        "+0.000 s  orders → payments · grpc  error           1             11 ms     503",
        "          http_5xx: upstream: password=***",
        "+0.000 s  orders → payments · grpc  retry           1   200 ms",
        "          http_5xx",
    ]
    assert at_80[-1] == ("+1.433 s  orders → payments · grpc  response        4            "
                         "9.5 ms     200")
    at_50 = render(chain, 50).splitlines()  # too narrow for a row: one block per event
    assert max(len(line) for line in at_50) <= 50
    assert at_50.count("latency  9.5 ms") == 1 and at_50.count("backoff  800 ms") == 1
    assert "error    http_5xx: upstream: password=***" in at_50


@pytest.mark.parametrize("key", ["", "has space", "x" * 129, "é"])
def test_bad_keys_are_refused_clearly(key: str) -> None:
    with pytest.raises(ConfigError, match="1-128 printable ASCII characters without spaces"):
        check_key(key)
    assert check_key("4bf92f3577b34da6a3ce929d0e0e4736") == "4bf92f3577b34da6a3ce929d0e0e4736"


def test_cascades_follow_the_links_down_to_where_the_failure_started() -> None:
    pb, bk = ("payments", "bank", "amqp"), ("bank", "ledger", "grpc")
    rows = [row(1, "error", T0 + 0.050, GO, error_type="http_5xx", span_id="a" * 16),
            row(2, "timeout", T0 + 0.040, OP, span_id="b" * 16, parent_span_id="a" * 16),
            row(3, "error", T0 + 0.030, pb, error_type="unavailable", span_id="c" * 16,
                parent_span_id="b" * 16),
            row(4, "error", T0 + 0.010, bk, error_type="connection", span_id="d" * 16,
                parent_span_id="c" * 16),
            row(5, "error", T0 + 0.020, bk, error_type="rejected", span_id="e" * 16)]
    links = [("e01", "e02"), ("e02", "e03"), ("e03", "e04"),
             ("x99", "e01")]  # a link to an event this chain does not hold is left out
    chain = build_chain("chain-1", rows, links)
    assert [[s.event_id for s in path] for path in chain.cascades] == [
        ["e01", "e02", "e03", "e04"]]
    assert [s.event_id for s in chain.origins] == ["e04"]
    assert {s.event_id: s.parent_span_id for s in chain.steps}["e04"] == "c" * 16
    out = chain.to_json()
    assert out["cascades"] == [{"top": "e01", "origin": "e04", "origin_edge": list(bk),
                                "origin_kind": "error", "origin_error_type": "connection",
                                "path": ["e01", "e02", "e03", "e04"]}]
    text = render(chain)
    assert ("  cascade 1: started at bank → ledger · grpc (error connection, +0.000 s); "
            "failed in turn: payments → bank · amqp (error unavailable, +0.020 s), then "
            "orders → payments · grpc (timeout, +0.030 s), then gateway → orders · http "
            "(error http_5xx, +0.040 s)") in text.splitlines()
    assert build_chain("chain-1", rows).cascades == ()
