"""The ``message_patterns`` catalogue: loaded from a YAML or TOML file, checked against
what the pipeline observed (``commpipe patterns load`` / ``commpipe patterns check``).

A file holds a list ``patterns``; each pattern (YAML shown, TOML uses ``[[patterns]]``)::

    patterns:
      - name: checkout-saga                 # 1-100 characters, unique in the catalogue
        type: saga                          # request_response | fire_and_forget | pub_sub | saga
        services: [orders, payments, inventory]
        flow:                               # ordered edges; every service must be listed above
          - {source: orders, target: payments, protocol: grpc}
          - {source: orders, target: inventory, protocol: http}
        reliability: at_least_once          # optional: at_least_once | at_most_once | exactly_once
        consistency: eventual               # optional: eventual | strong | causal
        failure_handling:                   # optional, free form: scenario -> what happens
          payment_declined: release the inventory, cancel the order
        sla: {p95_latency_ms: 250, success_ratio: 0.999}   # optional; also p99_latency_ms

:func:`parse_file` validates everything (pydantic) and reports every problem at
once, each naming its pattern and field (``pattern 'checkout-saga': field
'type': must be one of ...``). :func:`upsert_statements` writes the patterns to
either database (the row keyed by ``pattern_name`` is replaced, other patterns
are left alone). :func:`compare` checks a pattern against the rollups of a
lookback period: every flow edge must have been seen, and, per edge (an edge's
rollups know nothing of the calls around it), the SLA's latency quantiles (from
the merged sketches, 1 % accurate) and success ratio (responses / outcomes)
must hold; an edge with no outcomes has no latency or ratio to judge.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, JsonValue, StringConstraints, ValidationError

from pipeline.config_file import load_data
from pipeline.core.sketch import LatencySketch
from pipeline.errors import ConfigError
from pipeline.sink.sql import Dialect, dialect_sql

__all__ = ["OBSERVED_SQL", "PATTERNS_SQL", "SCHEMA_VERSION", "Difference", "Edge",
           "EdgeObservation", "Pattern", "Sla", "compare", "observe",
           "parse_file", "parse_patterns", "pattern_of_row", "upsert_statements"]

PatternType = Literal["request_response", "fire_and_forget", "pub_sub", "saga"]
Reliability = Literal["at_least_once", "at_most_once", "exactly_once"]
Consistency = Literal["eventual", "strong", "causal"]
SCHEMA_VERSION: Final = 1
"""``message_patterns`` has been there since migration 0001."""

_SERVICE_RULE = "[A-Za-z0-9._:-]{1,100}"
_PROTOCOL_RULE = "[a-z][a-z0-9._-]{0,31}"
Service = Annotated[str, StringConstraints(pattern=f"^{_SERVICE_RULE}$")]
ProtocolName = Annotated[str, StringConstraints(pattern=f"^{_PROTOCOL_RULE}$")]
PatternName = Annotated[str, StringConstraints(pattern=r"^[^\x00-\x1f\x7f-\x9f]{1,100}$")]
_RULES: Final = {"services": f"a service name ({_SERVICE_RULE})",
                 "source": f"a service name ({_SERVICE_RULE})",
                 "target": f"a service name ({_SERVICE_RULE})",
                 "protocol": f"a lower-case protocol ({_PROTOCOL_RULE})",
                 "name": "1-100 characters without control characters"}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Edge(_Model):
    source: Service
    target: Service
    protocol: ProtocolName

    @property
    def key(self) -> tuple[str, str, str]:
        return self.source, self.target, self.protocol

    def __str__(self) -> str:
        return f"{self.source} → {self.target} · {self.protocol}"


class Sla(_Model):
    p95_latency_ms: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    p99_latency_ms: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    success_ratio: Annotated[float, Field(gt=0, le=1)] | None = None


class Pattern(_Model):
    name: PatternName
    type: PatternType
    services: Annotated[list[Service], Field(min_length=1)]
    flow: Annotated[list[Edge], Field(min_length=1)]
    reliability: Reliability | None = None
    consistency: Consistency | None = None
    failure_handling: dict[str, JsonValue] | None = None
    sla: Sla | None = None


_CHOICES: Final = {"type": PatternType, "reliability": Reliability, "consistency": Consistency}
_FIELDS: Final = {"": list(Pattern.model_fields), "flow": list(Edge.model_fields),
                  "sla": list(Sla.model_fields)}


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _where(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _reason(error: Mapping[str, Any]) -> str:
    """A pydantic error as a short reason naming the rule that was broken."""
    kind, loc, value = error["type"], error["loc"], error.get("input")
    last = next((p for p in reversed(loc) if isinstance(p, str)), "")
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        known = _FIELDS.get(str(loc[0]) if len(loc) > 1 else "", _FIELDS[""])
        return f"unknown field (known: {', '.join(known)})"
    if kind == "literal_error" and last in _CHOICES:
        allowed = ", ".join(_CHOICES[last].__args__)
        return f"must be one of {allowed} (got {_shown(value)})"
    if kind == "string_pattern_mismatch" and last in _RULES:
        return f"{_shown(value)} is not {_RULES[last]}"
    msg = str(error["msg"])
    got = "" if kind.startswith("too_") else f" (got {_shown(value)})"
    return msg[:1].lower() + msg[1:] + got


def _label(raw: Any, index: int) -> str:
    name = raw.get("name") if isinstance(raw, dict) else None
    return f"pattern {name!r}" if isinstance(name, str) and name else f"pattern #{index + 1}"


def parse_patterns(data: Any, *, source: str = "the file") -> list[Pattern]:
    """Validate a parsed file (a mapping with a ``patterns`` list); :class:`ConfigError`
    listing every problem, one line each, when anything is wrong."""
    if not isinstance(data, dict) or not isinstance(data.get("patterns"), list):
        raise ConfigError(f"{source}: expected a top-level 'patterns' list of patterns")
    problems = [f"top-level key {k!r}: unknown (only 'patterns')" for k in data if k != "patterns"]
    patterns: list[Pattern] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(data["patterns"]):
        label = _label(raw, i)
        if not isinstance(raw, dict):
            problems.append(f"{label}: expected a mapping of fields, got {type(raw).__name__}")
            continue
        try:
            pattern = Pattern.model_validate(raw)
        except ValidationError as e:
            problems += [f"{label}: field {_where(err['loc'])!r}: {_reason(err)}"
                         for err in e.errors()]
            continue
        if pattern.name in seen:
            problems.append(f"{label}: defined twice (patterns #{seen[pattern.name] + 1} and "
                            f"#{i + 1})")
        seen.setdefault(pattern.name, i)
        listed = set(pattern.services)
        if len(listed) != len(pattern.services):
            problems.append(f"{label}: field 'services': lists a service twice")
        for j, edge in enumerate(pattern.flow):
            for end in ("source", "target"):
                if getattr(edge, end) not in listed:
                    problems.append(f"{label}: field 'flow[{j}].{end}': "
                                    f"{getattr(edge, end)!r} is not in services")
        if pattern.sla is not None and pattern.sla == Sla():
            problems.append(f"{label}: field 'sla': sets none of {', '.join(_FIELDS['sla'])}")
        patterns.append(pattern)
    if not data["patterns"]:
        problems.append("'patterns' is empty")
    if problems:
        raise ConfigError(f"{source}: {len(problems)} problem{'s' * (len(problems) > 1)}:\n  "
                          + "\n  ".join(problems))
    return patterns


def parse_file(path: str | Path) -> list[Pattern]:
    """Read and validate a ``.yaml``/``.yml`` or ``.toml`` catalogue file."""
    return parse_patterns(load_data(path), source=str(path))


# --- the databases ---------------------------------------------------------------------

_COLUMNS: Final = ("pattern_name", "pattern_type", "services_involved", "message_flow",
                   "reliability_guarantees", "consistency_model", "failure_handling",
                   "performance_sla")
UPSERT_SQL: Final = (
    f"INSERT INTO message_patterns ({', '.join(_COLUMNS)}, updated_at) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s::{json}, now()) ON CONFLICT (pattern_name) DO "
    f"UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in _COLUMNS[1:])}, updated_at = now()")
PATTERNS_SQL: Final = f"SELECT {', '.join(_COLUMNS)} FROM message_patterns ORDER BY pattern_name"
OBSERVED_SQL: Final = """
WITH k AS (SELECT unnest(%s::text[]) AS s, unnest(%s::text[]) AS t, unnest(%s::text[]) AS p)
SELECT r.source_service, r.target_service, r.protocol, r.requests, r.responses, r.errors,
       r.timeouts, r.latency_sketch
FROM communication_rollups AS r
JOIN k ON r.source_service = k.s AND r.target_service = k.t AND r.protocol = k.p
WHERE r.window_end > to_timestamp(%s)
ORDER BY r.source_service, r.target_service, r.protocol, r.window_start
"""
"""The flow edges' rollups (parameters: sources, targets, protocols, epoch seconds)."""


def _json(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def upsert_statements(patterns: Iterable[Pattern], dialect: Dialect
                      ) -> list[tuple[str, list[Any]]]:
    """One parameterised upsert per pattern, for :mod:`pipeline.cli.query`'s ``execute_*``."""
    sql = dialect_sql(UPSERT_SQL, dialect)
    return [(sql, [p.name, p.type, list(p.services),
                   _json([e.model_dump() for e in p.flow]), p.reliability, p.consistency,
                   _json(p.failure_handling),
                   _json(p.sla.model_dump(exclude_none=True)) if p.sla else None])
            for p in patterns]


def _loads(value: Any) -> Any:
    return orjson.loads(value) if isinstance(value, str | bytes) else value


def pattern_of_row(row: Sequence[Any]) -> Pattern:
    """A :data:`PATTERNS_SQL` row as a :class:`Pattern` (:class:`ConfigError` if the row,
    written by someone else, does not follow the catalogue's rules)."""
    name, kind, services, flow, reliability, consistency, failure, sla = row
    raw = {"name": name, "type": kind, "services": list(services or []), "flow": _loads(flow),
           "reliability": reliability, "consistency": consistency,
           "failure_handling": _loads(failure), "sla": _loads(sla)}
    try:
        return parse_patterns({"patterns": [raw]}, source="message_patterns")[0]
    except orjson.JSONDecodeError as e:
        raise ConfigError(f"message_patterns: pattern {name!r}: not valid JSON: {e}") from None


# --- checking ----------------------------------------------------------------------------

@dataclass
class EdgeObservation:
    """One edge over the lookback: counts added, latency sketches merged."""

    requests: int = 0
    responses: int = 0
    failures: int = 0
    windows: int = 0
    latency: LatencySketch = field(default_factory=LatencySketch)

    @property
    def outcomes(self) -> int:
        return self.responses + self.failures

    @property
    def success_ratio(self) -> float | None:
        return self.responses / self.outcomes if self.outcomes else None

    def to_json(self) -> dict[str, Any]:
        return {"seen": self.windows > 0, "windows": self.windows, "requests": self.requests,
                "outcomes": self.outcomes, "success_ratio": self.success_ratio,
                "p95_latency_ms": self.latency.quantile(0.95),
                "p99_latency_ms": self.latency.quantile(0.99)}


def observe(rows: Iterable[Sequence[Any]]) -> dict[tuple[str, str, str], EdgeObservation]:
    """:data:`OBSERVED_SQL` rows merged per edge."""
    out: dict[tuple[str, str, str], EdgeObservation] = {}
    for s, t, p, requests, responses, errors, timeouts, sketch in rows:
        o = out.setdefault((s, t, p), EdgeObservation())
        o.windows += 1
        o.requests += int(requests)
        o.responses += int(responses)
        o.failures += int(errors) + int(timeouts)
        o.latency.merge(LatencySketch.from_json(_loads(sketch)))
    return out


DifferenceKind = Literal["edge_not_seen", "p95_latency", "p99_latency", "success_ratio"]


@dataclass(frozen=True)
class Difference:
    kind: DifferenceKind
    edge: Edge
    message: str
    observed: float | None = None
    expected: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "edge": self.edge.model_dump(), "message": self.message,
                "observed": self.observed, "expected": self.expected}


def compare(pattern: Pattern, observed: Mapping[tuple[str, str, str], EdgeObservation],
            since: str) -> list[Difference]:
    """What differs between ``pattern`` and the observations (``since``: the lookback as
    the user wrote it, for the messages). Each distinct flow edge is judged once."""
    out: list[Difference] = []
    sla = pattern.sla or Sla()
    for edge in {e.key: e for e in pattern.flow}.values():
        o = observed.get(edge.key)
        if o is None or o.windows == 0:
            out.append(Difference("edge_not_seen", edge,
                                  f"flow edge {edge}: no traffic in the last {since}"))
            continue
        latency: tuple[tuple[str, DifferenceKind, float | None], ...] = (
            ("p95", "p95_latency", sla.p95_latency_ms), ("p99", "p99_latency", sla.p99_latency_ms))
        for name, kind, limit in latency:
            value = o.latency.quantile(0.95 if name == "p95" else 0.99)
            if limit is not None and value is not None and value > limit:
                out.append(Difference(kind, edge, f"{edge}: {name} latency {value:,.1f} ms is "
                                      f"above the SLA's {limit:g} ms", value, limit))
        ratio = o.success_ratio
        if sla.success_ratio is not None and ratio is not None and ratio < sla.success_ratio:
            out.append(Difference("success_ratio", edge,
                                  f"{edge}: success ratio {ratio:.4f} ({o.responses} of "
                                  f"{o.outcomes} outcomes) is below the SLA's "
                                  f"{sla.success_ratio:g}", ratio, sla.success_ratio))
    return out
