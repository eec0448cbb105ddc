"""``commpipe check``: the specification's CI gates over a lookback, from one database.

:func:`gather` reads what the gates need from DuckDB or PostgreSQL (parameterised
statements below, the same text for both); :func:`evaluate` (pure: plain data in, a
:class:`Report` out) judges each gate of :mod:`pipeline.cli.check_config`'s config:

==========================  ==================================================================
``approved_protocols``      every calling service uses only its approved protocols; measured:
                            the share of services that do (>= 1); offenders: the edges that
                            do not. Every edge with any traffic in the lookback counts.
``resilience_coverage``     every edge with calls is protected: its traffic shows retries or
                            a breaker reporting its state (``circuit`` events), or the config
                            declares it (``protected``); measured: the protected share (>= 1);
                            offenders: the unprotected edges.
``cascade_failure_rate``    cascade failures / calls over the closed windows
                            (``communication_cascade_windows``), strictly under the threshold;
                            offenders: the edges with cascades and where they started.
``dead_letter_ratio``       outcomes of async edges with a dead-letter ``error_type`` / all
                            their outcomes, at most the threshold; offenders: those edges.
``latency_sla``             per sync edge, p95 of the lookback (merged sketches, 1 % accurate)
                            strictly under its limit; measured: the share that is (>= 1).
``delivery_success``        per async edge, responses / outcomes strictly above the
                            threshold; measured: the lowest edge's ratio.
``health_score``            per service with traffic in the lookback,
                            ``analyze_communication_health()`` strictly above the threshold;
                            measured: the lowest score.
==========================  ==================================================================

Nothing to judge (no traffic of the kind a gate needs, or failures without trace context for
the cascade gate): the gate fails with ``status: "nothing_to_judge"``, ``measured: null`` and
a note saying what was missing. A gate that cannot apply to a system is turned off in the
config (``disabled``), and the report lists it as such; no gate passes for want of data.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import orjson

from pipeline.cli.check_config import GATES, CheckConfig
from pipeline.core.sketch import LatencySketch

__all__ = ["REPORT_SCHEMA", "SCHEMA_VERSION", "STATEMENTS", "Data", "GateResult", "Report",
           "evaluate", "gather"]

SCHEMA_VERSION: Final = 6
"""``communication_cascade_windows`` (migration 0006)."""
REPORT_FORMAT: Final = "commpipe-check/1"

Edge = tuple[str, str, str]
Comparison = Literal["<", "<=", ">", ">="]
_SINCE = "window_end > to_timestamp(%s)"
STATEMENTS: Final[dict[str, str]] = {
    "edges": f"""
SELECT source_service, target_service, protocol, sum(requests), sum(responses), sum(errors),
       sum(timeouts), sum(retries)
FROM communication_rollups WHERE {_SINCE}
GROUP BY source_service, target_service, protocol ORDER BY 1, 2, 3""",
    "windows": f"""
SELECT source_service, target_service, protocol, errors_by_type, latency_sketch
FROM communication_rollups WHERE {_SINCE} ORDER BY window_start, 1, 2, 3""",
    "breakers": f"""
SELECT DISTINCT source_service, target_service, protocol FROM communication_rollup_parts
WHERE {_SINCE} AND stats->>'reported_state' IS NOT NULL ORDER BY 1, 2, 3""",
    "cascades": f"""
SELECT source_service, target_service, protocol, sum(calls), sum(cascades)
FROM communication_cascade_windows WHERE {_SINCE}
GROUP BY source_service, target_service, protocol ORDER BY 1, 2, 3""",
    "origins": """
SELECT c.source_service, c.target_service, c.protocol, c.downstream_source_service,
       c.downstream_target_service, c.downstream_protocol, count(*)
FROM communication_cascades AS c
JOIN communication_rollups AS r
  ON r.source_service = c.source_service AND r.target_service = c.target_service
 AND r.protocol = c.protocol AND c.occurred_at >= r.window_start
 AND c.occurred_at < r.window_end
WHERE r.window_end > to_timestamp(%s)
GROUP BY 1, 2, 3, 4, 5, 6 ORDER BY 1, 2, 3, 4, 5, 6""",
    "traced": """
SELECT count(*), count(span_id) FROM communication_events
WHERE event_type IN ('error', 'timeout') AND occurred_at > to_timestamp(%s)""",
    "health": """
SELECT h.service_name, h.communication_score FROM analyze_communication_health() AS h
WHERE h.service_name IN (SELECT source_service FROM communication_patterns
                         WHERE updated_at > to_timestamp(%s))
ORDER BY 1""",
}
"""Every statement takes one parameter: the start of the lookback (epoch seconds)."""


@dataclass
class Data:
    """What the gates read, as plain rows (one list per :data:`STATEMENTS` key)."""

    rows: dict[str, list[tuple[Any, ...]]]


def gather(run: Callable[[list[tuple[str, list[Any]]]], list[Any]], since_ts: float) -> Data:
    """Run :data:`STATEMENTS` through ``run`` (a database's ``execute_*`` over one
    transaction, returning results with ``.rows``)."""
    names = list(STATEMENTS)
    results = run([(STATEMENTS[n], [since_ts]) for n in names])
    return Data({n: [tuple(r) for r in res.rows] for n, res in zip(names, results, strict=True)})


@dataclass
class GateResult:
    name: str
    passed: bool
    measured: float | None
    threshold: float
    comparison: Comparison
    unit: str
    rule: str
    judged: int
    offenders: list[dict[str, Any]] = field(default_factory=list)
    note: str | None = None

    @property
    def status(self) -> str:
        if self.measured is None:
            return "nothing_to_judge"
        return "passed" if self.passed else "failed"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "passed": self.passed, "status": self.status,
                "measured": self.measured, "threshold": self.threshold,
                "comparison": self.comparison, "unit": self.unit, "rule": self.rule,
                "judged": self.judged, "offenders": self.offenders, "note": self.note}


@dataclass
class Report:
    database: str
    config: str
    since_s: float
    since_ts: float
    gates: list[GateResult]
    disabled: list[str]

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def to_json(self) -> dict[str, Any]:
        return {"format": REPORT_FORMAT, "passed": self.passed, "database": self.database,
                "config": self.config, "since_s": self.since_s,
                "since": dt.datetime.fromtimestamp(self.since_ts, dt.UTC).isoformat(),
                "disabled": self.disabled, "gates": [g.to_json() for g in self.gates]}


_HOLDS: Final[dict[str, Callable[[float, float], bool]]] = {
    "<": lambda m, t: m < t, "<=": lambda m, t: m <= t,
    ">": lambda m, t: m > t, ">=": lambda m, t: m >= t}


def _gate(name: str, measured: float | None, threshold: float, comparison: Comparison,
          unit: str, rule: str, judged: int, offenders: list[dict[str, Any]],
          nothing: str) -> GateResult:
    if measured is None:
        return GateResult(name, False, None, threshold, comparison, unit, rule, 0, [],
                          f"nothing to judge: {nothing}")
    passed = _HOLDS[comparison](measured, threshold)
    return GateResult(name, passed, measured, threshold, comparison, unit, rule, judged,
                      offenders)


def _edge(edge: Edge, **more: Any) -> dict[str, Any]:
    return {"source_service": edge[0], "target_service": edge[1], "protocol": edge[2], **more}


def _num(value: Any) -> float:
    return 0.0 if value is None else float(value)


def _json(value: Any) -> Any:
    if value is None or isinstance(value, dict):
        return value or {}
    return orjson.loads(value)


class _View:
    """The gathered rows, arranged per edge."""

    def __init__(self, data: Data) -> None:
        r = data.rows
        self.edges: dict[Edge, dict[str, int]] = {}
        for s, t, p, req, resp, err, tout, retries in r["edges"]:
            self.edges[(s, t, p)] = {"requests": int(_num(req)), "responses": int(_num(resp)),
                                     "errors": int(_num(err)), "timeouts": int(_num(tout)),
                                     "retries": int(_num(retries))}
        self.errors_by_type: dict[Edge, dict[str, int]] = defaultdict(dict)
        self.sketches: dict[Edge, LatencySketch] = {}
        for s, t, p, errors, sketch in r["windows"]:
            edge = (s, t, p)
            for kind, n in _json(errors).items():
                self.errors_by_type[edge][kind] = self.errors_by_type[edge].get(kind, 0) + n
            part = LatencySketch.from_json(_json(sketch)) if sketch is not None else None
            if part is not None and part.count:
                self.sketches.setdefault(edge, LatencySketch()).merge(part)
        self.breakers = {(s, t, p) for s, t, p in r["breakers"]}
        self.cascades = {(s, t, p): (int(_num(calls)), int(_num(n)))
                         for s, t, p, calls, n in r["cascades"]}
        self.origins: dict[Edge, list[dict[str, Any]]] = defaultdict(list)
        for s, t, p, ds, dt_, dp, n in r["origins"]:
            self.origins[(s, t, p)].append(_edge((ds, dt_, dp), cascades=int(n)))
        self.failed_events, self.traced_failures = (int(_num(x)) for x in r["traced"][0])
        self.health = [(str(s), float(score)) for s, score in r["health"]]

    def outcomes(self, edge: Edge) -> int:
        c = self.edges[edge]
        return c["responses"] + c["errors"] + c["timeouts"]

    def calls(self, edge: Edge) -> int:
        return self.edges[edge]["requests"] + self.outcomes(edge)


def _protocols(cfg: CheckConfig, v: _View) -> GateResult:
    services: dict[str, bool] = {}
    offenders = []
    for edge in sorted(v.edges):
        approved = cfg.approved_for(edge[0])
        ok = edge[2] in approved
        services[edge[0]] = services.get(edge[0], True) and ok
        if not ok:
            offenders.append(_edge(edge, approved=approved))
    share = sum(services.values()) / len(services) if services else None
    return _gate("approved_protocols", share, 1.0, ">=", "share of services",
                 "every service calls over its approved protocols only", len(services),
                 offenders, "no edge had traffic in the lookback")


def _resilience(cfg: CheckConfig, v: _View) -> GateResult:
    edges = [e for e in sorted(v.edges) if v.calls(e)]
    unprotected = []
    for edge in edges:
        if v.edges[edge]["retries"] or edge in v.breakers or cfg.protection_of(edge):
            continue
        unprotected.append(_edge(edge, calls=v.calls(edge)))
    share = (len(edges) - len(unprotected)) / len(edges) if edges else None
    return _gate("resilience_coverage", share, 1.0, ">=", "share of edges",
                 "every edge with calls shows retries or breaker events, or is declared "
                 "protected", len(edges), unprotected, "no edge had calls in the lookback")


def _cascade(cfg: CheckConfig, v: _View) -> GateResult:
    calls = sum(c for c, _ in v.cascades.values())
    cascades = sum(n for _, n in v.cascades.values())
    offenders = [_edge(edge, cascades=n, calls=c, started_from=v.origins.get(edge, []))
                 for edge, (c, n) in sorted(v.cascades.items()) if n]
    measured: float | None = cascades / calls if calls else None
    nothing = "no call ended in a closed window of the lookback"
    if calls and v.failed_events and not v.traced_failures:
        measured = None
        nothing = (f"{v.failed_events} failed calls, none with trace context (span ids): "
                   "propagate traceparent (README 'Trace context')")
    gate = _gate("cascade_failure_rate", measured, cfg.thresholds.cascade_failure_rate, "<",
                 "ratio", "cascade failures / calls (README 'Cascade failures')", calls,
                 offenders, nothing)
    untraced = v.failed_events - v.traced_failures
    if gate.measured is not None and untraced:
        gate.note = (f"{untraced} of {v.failed_events} failed calls carry no span id and "
                     "cannot be judged")
    return gate


def _async_edges(cfg: CheckConfig, v: _View) -> list[Edge]:
    return [e for e in sorted(v.edges) if e[2] in cfg.async_protocols and v.outcomes(e)]


def _dead_letters(cfg: CheckConfig, v: _View) -> GateResult:
    edges = _async_edges(cfg, v)
    total = sum(v.outcomes(e) for e in edges)
    offenders, dead_total = [], 0
    for edge in edges:
        dead = sum(v.errors_by_type[edge].get(t, 0) for t in cfg.dead_letter_error_types)
        dead_total += dead
        if dead:
            offenders.append(_edge(edge, dead_letters=dead, outcomes=v.outcomes(edge),
                                   ratio=dead / v.outcomes(edge)))
    return _gate("dead_letter_ratio", dead_total / total if total else None,
                 cfg.thresholds.dead_letter_ratio, "<=", "ratio",
                 f"outcomes with error_type in {cfg.dead_letter_error_types} / outcomes, "
                 f"over async edges ({', '.join(cfg.async_protocols)})", len(edges),
                 offenders, "no async edge had outcomes in the lookback")


def _latency(cfg: CheckConfig, v: _View) -> GateResult:
    edges = [e for e in sorted(v.sketches) if e[2] in cfg.sync_protocols]
    offenders = []
    for edge in edges:
        p95, limit = v.sketches[edge].quantile(0.95), cfg.latency_limit(edge)
        if p95 is None or not p95 < limit:
            offenders.append(_edge(edge, p95_ms=p95, threshold_ms=limit))
    share = (len(edges) - len(offenders)) / len(edges) if edges else None
    return _gate("latency_sla", share, 1.0, ">=", "share of edges",
                 f"p95 latency under each sync edge's limit (default "
                 f"{cfg.thresholds.latency_p95_ms:g} ms)", len(edges), offenders,
                 "no sync edge had latencies in the lookback")


def _delivery(cfg: CheckConfig, v: _View) -> GateResult:
    edges = _async_edges(cfg, v)
    limit = cfg.thresholds.delivery_success
    ratios = {e: v.edges[e]["responses"] / v.outcomes(e) for e in edges}
    offenders = [_edge(e, success=r, outcomes=v.outcomes(e)) for e, r in ratios.items()
                 if not r > limit]
    return _gate("delivery_success", min(ratios.values()) if ratios else None, limit, ">",
                 "ratio", "responses / outcomes of each async edge", len(edges), offenders,
                 "no async edge had outcomes in the lookback")


def _health(cfg: CheckConfig, v: _View) -> GateResult:
    limit = cfg.thresholds.health_score
    offenders = [{"service": s, "score": score} for s, score in v.health if not score > limit]
    return _gate("health_score", min((s for _, s in v.health), default=None), limit, ">",
                 "score", "analyze_communication_health() of each service with traffic",
                 len(v.health), offenders, "no service had traffic in the lookback")


_GATES: Final[dict[str, Callable[[CheckConfig, _View], GateResult]]] = {
    "approved_protocols": _protocols, "resilience_coverage": _resilience,
    "cascade_failure_rate": _cascade, "dead_letter_ratio": _dead_letters,
    "latency_sla": _latency, "delivery_success": _delivery, "health_score": _health}
assert tuple(_GATES) == GATES


def evaluate(cfg: CheckConfig, data: Data, *, database: str, config: str, since_s: float,
             since_ts: float | None = None) -> Report:
    """Judge every gate the config does not disable."""
    view = _View(data)
    gates = [judge(cfg, view) for name, judge in _GATES.items() if name not in cfg.disabled]
    for g in gates:  # JSON has no NaN/inf; every measured value here is finite
        assert g.measured is None or math.isfinite(g.measured), g
    start = time.time() - since_s if since_ts is None else since_ts
    return Report(database, config, since_s, start, gates,
                  [g for g in GATES if g in cfg.disabled])


_OFFENDER = {"type": "object", "additionalProperties": True}
REPORT_SCHEMA: Final[dict[str, Any]] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "commpipe check report",
    "type": "object",
    "required": ["format", "passed", "database", "config", "since_s", "since", "disabled",
                 "gates"],
    "additionalProperties": False,
    "properties": {
        "format": {"const": REPORT_FORMAT},
        "passed": {"type": "boolean", "description": "every gate passed"},
        "database": {"enum": ["duckdb", "postgres"]},
        "config": {"type": "string"},
        "since_s": {"type": "number", "exclusiveMinimum": 0},
        "since": {"type": "string", "description": "start of the lookback, ISO 8601 UTC"},
        "disabled": {"type": "array", "items": {"enum": list(GATES)}},
        "gates": {"type": "array", "items": {
            "type": "object", "additionalProperties": False,
            "required": ["name", "passed", "status", "measured", "threshold", "comparison",
                         "unit", "rule", "judged", "offenders", "note"],
            "properties": {
                "name": {"enum": list(GATES)},
                "passed": {"type": "boolean"},
                "status": {"enum": ["passed", "failed", "nothing_to_judge"]},
                "measured": {"type": ["number", "null"],
                             "description": "null when there was nothing to judge"},
                "threshold": {"type": "number"},
                "comparison": {"enum": ["<", "<=", ">", ">="],
                               "description": "passed = measured <comparison> threshold"},
                "unit": {"type": "string"},
                "rule": {"type": "string"},
                "judged": {"type": "integer", "minimum": 0},
                "offenders": {"type": "array", "items": _OFFENDER},
                "note": {"type": ["string", "null"]},
            }}},
    },
}
"""JSON Schema (2020-12) of :meth:`Report.to_json` (``commpipe check --schema``)."""
