"""Service-level objectives per edge, judged on every closed window.

The specification's numbers are the defaults; a YAML or TOML file
(``COMMPIPE_SLO_FILE``) may change them, for all edges or for the edges that
match a rule (shell-style patterns on source, target and protocol; the last
matching rule wins, field by field)::

    latency_p95_ms = 100          # synchronous calls (sync_protocols) only
    latency_max_ms = 200          # every call within this
    delivery_success = 0.999      # responses / (responses + errors + timeouts) must exceed
    retry_backoff_ms = 1000       # total backoff of one call (its retry events) at most
    circuit_reaction_ms = 50      # last failure -> the circuit event reporting open, at most
    health_score = 90             # every service's analyze_communication_health() score above
    min_outcomes = 20             # p95 and delivery judged only in windows with this many
    sync_protocols = ["http", "grpc"]

    [[edges]]
    target = "bank"
    latency_p95_ms = 300

:func:`evaluate` turns one window's stats into one :class:`Result` per
objective that had something to judge (no latency objective in a window
without outcomes, no backoff objective without retries, ...): what was
measured, the threshold, whether it held and by how much it missed (0 when it
held).

Two rules keep the judgement fair:

- **A minimum sample.** ``delivery_success`` and ``latency_p95`` are judged only in
  windows with at least ``min_outcomes`` outcomes (responses, errors, timeouts; 20 by
  default): below that one call weighs 5 % or more, so a single failure would read as
  a missed 99.9 % objective and fail the gate for the whole lookback. Such windows are
  not judged (no result); their counts still reach the rollups and ``/metrics``, and
  ``latency_max`` (one call over the bound is a miss) and the other objectives are
  judged in every window.
- **The sketch's 1 %.** p95 comes from a sketch within ``ALPHA`` (1 %) of the true
  value, so it is judged with that tolerance in the edge's favour: it holds while the
  sketch reads under ``threshold * (1 + ALPHA)``. A true p95 under the threshold never
  fails; one reported as missed is truly at or over it; a true p95 up to about 2 % over
  may pass. The sink stores the results (``communication_slo``), the exporter shows
them for each edge's last closed window, and ``commpipe health`` gates on them.
"""

from __future__ import annotations

import re
from fnmatch import translate
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from pipeline.config_file import load_data
from pipeline.core.sketch import ALPHA
from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.core.window import WindowStats

__all__ = ["OBJECTIVES", "Objectives", "Result", "SloConfig", "check_file", "evaluate",
           "load_config"]

OBJECTIVES: Final = ("latency_p95", "latency_max", "delivery_success", "retry_backoff",
                     "circuit_reaction")
"""Objective names, as stored and exported (``health_score`` is judged per service)."""


class Objectives(BaseModel):
    """The thresholds for one edge."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    latency_p95_ms: float = Field(100.0, gt=0)
    latency_max_ms: float = Field(200.0, gt=0)
    delivery_success: float = Field(0.999, ge=0, le=1)
    retry_backoff_ms: float = Field(1000.0, ge=0)
    circuit_reaction_ms: float = Field(50.0, ge=0)
    health_score: float = Field(90.0, ge=0, le=100)
    min_outcomes: int = Field(20, ge=1)
    sync_protocols: tuple[str, ...] = ("http", "grpc")


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = "*"
    target: str = "*"
    protocol: str = "*"
    latency_p95_ms: float | None = Field(None, gt=0)
    latency_max_ms: float | None = Field(None, gt=0)
    delivery_success: float | None = Field(None, ge=0, le=1)
    retry_backoff_ms: float | None = Field(None, ge=0)
    circuit_reaction_ms: float | None = Field(None, ge=0)
    min_outcomes: int | None = Field(None, ge=1)
    sync_protocols: tuple[str, ...] | None = None


class SloConfig(BaseModel):
    """Defaults plus per-edge rules."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    defaults: Objectives = Objectives()
    edges: tuple[_Rule, ...] = ()

    _cache: dict[Any, Any] = PrivateAttr(default_factory=dict)
    """The rules' patterns compiled (``None``), and the thresholds of each set of matching
    rules met so far: a scrape asks for every edge's, and merging the rules' models per
    edge cost 8-23 us with three rules."""

    def for_edge(self, edge: tuple[str, str, str]) -> Objectives:
        """The thresholds of ``edge``: the defaults, then every matching rule in order."""
        if not self.edges:
            return self.defaults
        cache = self.__pydantic_private__["_cache"]  # type: ignore[index] - self._cache: 5 us
        patterns = cache.get(None)
        if patterns is None:  # one pattern per rule over "source\x1ftarget\x1fprotocol"
            patterns = cache[None] = [re.compile("\x1f".join(  # translate ends in \Z
                translate(p)[:-2] for p in (r.source, r.target, r.protocol)) + r"\Z").match
                for r in self.edges]
        name = "\x1f".join(edge)
        matching = tuple(i for i, match in enumerate(patterns) if match(name))
        merged = cache.get(matching)
        if merged is None:
            changes: dict[str, Any] = {}
            for i in matching:
                changes |= self.edges[i].model_dump(exclude={"source", "target", "protocol"},
                                                    exclude_none=True)
            merged = self.defaults.model_copy(update=changes) if changes else self.defaults
            cache[matching] = merged
        return merged


def load_config(path: str | Path | None) -> SloConfig:
    """The objectives in ``path`` (YAML or TOML), or the defaults when ``path`` is empty."""
    if not path:
        return SloConfig()
    data = load_data(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table of objectives, got {type(data).__name__}")
    rules = data.pop("edges", ())
    try:
        return SloConfig(defaults=Objectives(**data), edges=tuple(
            _Rule(**rule) if isinstance(rule, dict) else _Rule.model_validate(rule)
            for rule in rules))
    except (ValidationError, TypeError) as e:
        raise ConfigError(f"{path}: {_describe(e)}") from None


def check_file(path: str) -> None:
    """Raise :class:`ConfigError` naming ``COMMPIPE_SLO_FILE`` when ``path`` (non-empty) is
    missing or does not parse: the worker checks it before it creates anything."""
    if not path:
        return
    if not Path(path).is_file():
        raise ConfigError(f"COMMPIPE_SLO_FILE: no such file {path!r}")
    try:
        load_config(path)
    except ConfigError as e:
        raise ConfigError(f"COMMPIPE_SLO_FILE: {e}") from None


def _describe(error: ValidationError | TypeError) -> str:
    if isinstance(error, TypeError):
        return str(error)
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'file'}: {e['msg']}"
                     for e in error.errors())


class Result(NamedTuple):
    objective: str
    threshold: float
    measured: float
    ok: bool
    miss: float
    """How far past the threshold (same unit as ``measured``; 0 when it held)."""


def evaluate(edge: tuple[str, str, str], stats: WindowStats, objectives: Objectives, *,
             p95: float | None = None) -> list[Result]:
    """Every objective that one (merged) window of ``edge`` gives something to judge.
    ``p95``: the window's ``latency.quantile(0.95)``, if the caller has it already."""
    out: list[Result] = []
    sketch = stats.latency
    enough = objectives.min_outcomes
    if sketch.count:
        if edge[2] in objectives.sync_protocols and sketch.count >= enough:
            if p95 is None:
                p95 = sketch.quantile(0.95)
            limit = objectives.latency_p95_ms
            held = p95 < limit * (1.0 + ALPHA)  # the sketch's error in the edge's favour
            out.append(Result("latency_p95", limit, p95, held, 0.0 if held else p95 - limit))
        out.append(_at_most("latency_max", objectives.latency_max_ms, sketch.max))
    failed = stats.error_count + stats.timeouts
    outcomes = stats.responses + failed
    if outcomes >= enough:
        success = stats.responses / outcomes
        held = success > objectives.delivery_success
        out.append(Result("delivery_success", objectives.delivery_success, success, held,
                          0.0 if held else objectives.delivery_success - success))
    if stats.retries:
        out.append(_at_most("retry_backoff", objectives.retry_backoff_ms,
                            stats.max_call_backoff_ms))
    if stats.circuit_reaction_ms is not None:
        out.append(_at_most("circuit_reaction", objectives.circuit_reaction_ms,
                            stats.circuit_reaction_ms))
    return out


def _at_most(name: str, threshold: float, measured: float) -> Result:
    held = measured <= threshold
    return Result(name, threshold, measured, held, 0.0 if held else measured - threshold)
