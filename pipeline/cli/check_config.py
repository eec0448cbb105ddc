"""The ``.communication.yml`` file of ``commpipe check``: approved protocols, declared
protection, thresholds. YAML (or TOML with the same keys)::

    approved_protocols: [http, grpc]        # required: what every service may call over
    services:                               # optional: a service's own list (as caller)
      inventory: {approved_protocols: [http, kafka]}
    protected:                              # optional: edges protected by what traffic
      - {source: gateway, target: orders, by: "timeout + bulkhead in the gateway"}
    async_protocols: [amqp, kafka]          # dead letters and delivery judge these edges
    sync_protocols: [http, grpc]            # the latency SLA judges these edges
    dead_letter_error_types: [dead_letter]  # error types that mean "dead-lettered"
    thresholds:                             # the specification's success criteria
      cascade_failure_rate: 0.001           # cascades / calls, strictly under
      dead_letter_ratio: 0.0                # dead letters / async outcomes, at most
      latency_p95_ms: 100                   # per sync edge, strictly under
      delivery_success: 0.999               # per async edge, strictly above
      health_score: 90                      # per service, strictly above
    latency:                                # optional per-edge p95 limits (last match wins)
      - {target: bank, p95_ms: 300}
    disabled: []                            # gates not to run (named in the report)

Edge patterns (``source``, ``target``, ``protocol``) are shell-style (``fnmatch``) and
default to ``*``. Every problem of a file is one line naming the key
(``.communication.yml: thresholds.cascade_failure_rate: must be at most 1 (got 5)``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from pipeline.config_file import load_data
from pipeline.errors import ConfigError

__all__ = ["GATES", "CheckConfig", "Gate", "parse_config", "read_config"]

Gate = Literal["approved_protocols", "resilience_coverage", "cascade_failure_rate",
               "dead_letter_ratio", "latency_sla", "delivery_success", "health_score"]
GATES: Final[tuple[str, ...]] = Gate.__args__  # type: ignore[attr-defined]

Protocol = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9._-]{0,31}$")]
Service = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._:-]{1,100}$")]
EdgePattern = Annotated[str, StringConstraints(min_length=1, max_length=200)]
Ratio = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class _Edge(_Model):
    source: EdgePattern = "*"
    target: EdgePattern = "*"
    protocol: EdgePattern = "*"

    def matches(self, edge: Sequence[str]) -> bool:
        return (fnmatchcase(edge[0], self.source) and fnmatchcase(edge[1], self.target)
                and fnmatchcase(edge[2], self.protocol))


class Protected(_Edge):
    by: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = None
    """What protects it (free text, shown in the report)."""


class LatencyRule(_Edge):
    p95_ms: Positive


class ServiceRules(_Model):
    approved_protocols: Annotated[list[Protocol], Field(min_length=1)]


class Thresholds(_Model):
    cascade_failure_rate: Ratio = 0.001
    dead_letter_ratio: Ratio = 0.0
    latency_p95_ms: Positive = 100.0
    delivery_success: Ratio = 0.999
    health_score: Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)] = 90.0


class CheckConfig(_Model):
    approved_protocols: Annotated[list[Protocol], Field(min_length=1)]
    services: dict[Service, ServiceRules] = {}
    protected: list[Protected] = []
    async_protocols: list[Protocol] = ["amqp", "kafka", "nats", "sqs", "pubsub", "mqtt"]
    sync_protocols: list[Protocol] = ["http", "grpc"]
    dead_letter_error_types: Annotated[list[Service], Field(min_length=1)] = ["dead_letter"]
    thresholds: Thresholds = Thresholds()
    latency: list[LatencyRule] = []
    disabled: list[Gate] = []

    def approved_for(self, service: str) -> list[str]:
        rules = self.services.get(service)
        return rules.approved_protocols if rules is not None else self.approved_protocols

    def protection_of(self, edge: Sequence[str]) -> Protected | None:
        """The last ``protected`` entry matching ``edge``, if any."""
        found = None
        for rule in self.protected:
            if rule.matches(edge):
                found = rule
        return found

    def latency_limit(self, edge: Sequence[str]) -> float:
        limit = self.thresholds.latency_p95_ms
        for rule in self.latency:
            if rule.matches(edge):
                limit = rule.p95_ms
        return limit


_KNOWN: Final[dict[str, list[str]]] = {
    "": list(CheckConfig.model_fields), "thresholds": list(Thresholds.model_fields),
    "protected": list(Protected.model_fields), "latency": list(LatencyRule.model_fields),
    "services": list(ServiceRules.model_fields)}


def _where(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _reason(error: Mapping[str, Any]) -> str:
    kind, loc = error["type"], error["loc"]
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        section = str(loc[0]) if len(loc) > 1 else ""
        known = _KNOWN.get(section, _KNOWN[""])
        return f"unknown key (known: {', '.join(known)})"
    if kind == "literal_error":
        return f"not a gate (gates: {', '.join(GATES)}; got {_shown(error.get('input'))})"
    if kind == "string_pattern_mismatch":
        last = next((p for p in reversed(loc) if isinstance(p, str)), "")
        what = ("a service name ([A-Za-z0-9._:-]{1,100})" if last in ("services",
                                                                     "dead_letter_error_types")
                else "a lower-case protocol ([a-z][a-z0-9._-]{0,31})")
        return f"{_shown(error.get('input'))} is not {what}"
    msg = str(error["msg"])
    return msg[:1].lower() + msg[1:] + f" (got {_shown(error.get('input'))})"


def parse_config(data: Any, *, source: str = "the config file") -> CheckConfig:
    """Validate a parsed file; :class:`ConfigError` naming each wrong key, on one line."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with at least 'approved_protocols' "
                          f"(got {type(data).__name__}); see README 'Gates for CI'")
    try:
        return CheckConfig.model_validate(data)
    except ValidationError as e:
        problems = [f"{_where(err['loc'])}: {_reason(err)}" for err in e.errors()]
        raise ConfigError(f"{source}: {'; '.join(problems)}; fix the file and run again"
                          ) from None


def read_config(path: str | Path) -> CheckConfig:
    """Read and validate a ``.yml``/``.yaml``/``.toml`` config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no config file {path}: write one (README 'Gates for CI') or "
                          "pass --config")
    return parse_config(load_data(path), source=str(path))
