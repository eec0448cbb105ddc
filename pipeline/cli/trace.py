"""One call's chain across services, from its stored events (``commpipe trace``).

The sink keeps error, timeout and retry events and the responses that end a
retried call (:func:`pipeline.core.details.keeps_detail`) in
``communication_events``, with their correlation id, trace id, status code,
masked ``error_message``, ``attempt`` and ``backoff_ms``. :data:`TRACE_SQL`
reads the events whose correlation id or W3C trace id is the key asked for;
:func:`build_chain` (a pure function over those rows) puts them in time order
and says, per edge and for the whole chain, how many attempts were made, how
long the caller backed off and how it ended.

Attempts: a ``retry`` event with attempt *n* says attempt *n* failed and the
caller waits ``backoff_ms`` before attempt *n* + 1, so an edge with retries up
to *n* made at least *n* + 1 attempts. An error, timeout or response carries
its attempt when the service sent one (``emitter.call(..., attempt=n)``,
``RetryEvents.call``); otherwise it belongs to the attempt after the edge's
last retry. Events of one instant are ordered request, outcome, retry.

Outcome: the last outcome event of the edge (or of the chain): ``succeeded``
(a response), ``failed`` (an error), ``timed_out``; ``unknown`` when a retry
comes last, i.e. no outcome was stored after it (the next attempt's response
carried no attempt number, so it was only counted, or it is not stored yet).
Times are the services' own clocks.

Where a failed operation started: :data:`CASCADES_SQL` reads the cascade links of the
chain's traces from ``communication_cascades`` (migration 0006; README "Cascade
failures": a failed call whose failure followed a failed call its callee made for it).
:attr:`Chain.cascades` follows them from each failure that no other failure followed,
down to the failure that followed none: the one the operation's failure started from.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final, Literal

from pipeline.errors import ConfigError

__all__ = ["CASCADES_SQL", "MAX_EVENTS", "TRACE_SQL", "Chain", "EdgeSummary", "Outcome", "Step",
           "build_chain", "check_key", "render"]

MAX_EVENTS: Final = 10_000
"""Most events one trace reads (a correlation id reused by mistake can match millions)."""

TRACE_SQL: Final = f"""
SELECT event_id, correlation_id, extract(epoch FROM occurred_at) AS ts, event_type,
       source_service, target_service, protocol, method, attempt, backoff_ms, latency_ms,
       status_code, error_type, error_message, trace_id, span_id, parent_span_id
FROM communication_events
WHERE correlation_id = %s OR trace_id = %s
ORDER BY occurred_at, id
LIMIT {MAX_EVENTS + 1}
"""
"""The chain's rows (parameters: the key twice)."""
CASCADES_SQL: Final = f"""
SELECT event_id, downstream_event_id
FROM communication_cascades
WHERE trace_id IN (SELECT trace_id FROM communication_events
                   WHERE (correlation_id = %s OR trace_id = %s) AND trace_id IS NOT NULL)
ORDER BY occurred_at, event_id
LIMIT {MAX_EVENTS}
"""
"""The cascade links of the chain's traces (parameters: the key twice): each cascade
failure's event and the downstream failure it followed."""
SCHEMA_VERSION: Final = 6
"""``parent_span_id`` and ``communication_cascades`` (migration 0006)."""

Outcome = Literal["succeeded", "failed", "timed_out", "unknown"]
_OUTCOMES: Final[dict[str, Outcome]] = {"response": "succeeded", "error": "failed",
                                        "timeout": "timed_out"}
_RANK: Final = {"request": 0, "response": 1, "error": 1, "timeout": 1, "retry": 2}
_KEY = re.compile(r"[!-~]{1,128}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def check_key(key: str) -> str:
    """``key`` if it can be a correlation id or a trace id (the wire format's rule for
    correlation ids), else :class:`~pipeline.errors.ConfigError` saying so."""
    if _KEY.fullmatch(key) is None:
        raise ConfigError("a correlation id or trace id is 1-128 printable ASCII characters "
                          f"without spaces; got {len(key)} characters that are not")
    return key


@dataclass(frozen=True, slots=True)
class Step:
    """One event of the chain; ``attempt`` as stored or, if absent, inferred."""

    ts: float
    kind: str
    source_service: str
    target_service: str
    protocol: str
    attempt: int | None
    backoff_ms: float | None
    latency_ms: float | None
    status_code: int | None
    error_type: str | None
    error_message: str | None
    method: str | None
    event_id: str
    correlation_id: str
    trace_id: str | None
    span_id: str | None
    parent_span_id: str | None = None

    @property
    def edge(self) -> tuple[str, str, str]:
        return self.source_service, self.target_service, self.protocol


@dataclass(frozen=True, slots=True)
class EdgeSummary:
    source_service: str
    target_service: str
    protocol: str
    attempts: int
    retries: int
    backoff_ms: float
    outcome: Outcome


@dataclass(frozen=True, slots=True)
class Chain:
    key: str
    steps: tuple[Step, ...]
    edges: tuple[EdgeSummary, ...]
    """In the order each edge first appears."""
    truncated: bool = False
    """More than :data:`MAX_EVENTS` events matched; only the first ones are here."""
    cascades: tuple[tuple[Step, ...], ...] = ()
    """Each failure that cascaded, as the path of failed calls from it (the top, which no
    stored failure followed) down to the failure it started from (the origin, last)."""

    @property
    def origins(self) -> tuple[Step, ...]:
        """The failures the chain's cascades started from, one per cascade."""
        return tuple(path[-1] for path in self.cascades)

    @property
    def attempts(self) -> int:
        return sum(e.attempts for e in self.edges)

    @property
    def retries(self) -> int:
        return sum(e.retries for e in self.edges)

    @property
    def total_backoff_ms(self) -> float:
        return math.fsum(s.backoff_ms or 0.0 for s in self.steps if s.kind == "retry")

    @property
    def outcome(self) -> Outcome:
        return _outcome(self.steps)

    def to_json(self) -> dict[str, Any]:
        start = self.steps[0].ts if self.steps else 0.0
        return {
            "key": self.key, "outcome": self.outcome, "attempts": self.attempts,
            "retries": self.retries, "total_backoff_ms": self.total_backoff_ms,
            "truncated": self.truncated,
            "cascades": [{"top": path[0].event_id, "origin": path[-1].event_id,
                          "origin_edge": list(path[-1].edge), "origin_kind": path[-1].kind,
                          "origin_error_type": path[-1].error_type,
                          "path": [s.event_id for s in path]} for path in self.cascades],
            "edges": [{f: getattr(e, f) for f in e.__slots__} for e in self.edges],
            "events": [{"time": _iso(s.ts), "offset_ms": round((s.ts - start) * 1000.0, 3),
                        **{f: getattr(s, f) for f in s.__slots__}} for s in self.steps],
        }


def _num(value: Any) -> float | None:
    return None if value is None else float(value)


def _outcome(steps: Iterable[Step]) -> Outcome:
    last: Outcome = "unknown"
    for step in steps:
        last = _OUTCOMES.get(step.kind, "unknown") if step.kind != "request" else last
    return last


def _cascade_paths(steps: Iterable[Step], links: Iterable[tuple[str, str]]
                   ) -> tuple[tuple[Step, ...], ...]:
    by_id = {s.event_id: s for s in steps}
    down = {up: d for up, d in links if up in by_id and d in by_id}
    followed = set(down.values())
    paths = []
    for top in sorted((u for u in down if u not in followed),
                      key=lambda u: (by_id[u].ts, u)):
        path, seen = [by_id[top]], {top}
        while path[-1].event_id in down and down[path[-1].event_id] not in seen:
            seen.add(down[path[-1].event_id])
            path.append(by_id[down[path[-1].event_id]])
        paths.append(tuple(path))
    return tuple(paths)


def build_chain(key: str, rows: Iterable[Mapping[str, Any]],
                links: Iterable[tuple[str, str]] = ()) -> Chain:
    """The chain of ``rows`` (``TRACE_SQL``'s columns, values as either database returns
    them), in time order with attempts numbered; ``links`` (``CASCADES_SQL``'s rows: a
    cascade failure's event id and the downstream failure's) give :attr:`Chain.cascades`.
    See the module docstring."""
    rows = list(rows)
    truncated = len(rows) > MAX_EVENTS
    ordered = sorted(rows[:MAX_EVENTS], key=lambda r: (
        float(r["ts"]), r["attempt"] or 0, _RANK.get(r["event_type"], 1), r["event_id"]))
    next_attempt: dict[tuple[str, str, str], int] = {}
    steps = []
    for r in ordered:
        edge = (r["source_service"], r["target_service"], r["protocol"])
        kind = r["event_type"]
        attempt = None if r["attempt"] is None else int(r["attempt"])
        if kind == "retry":
            if attempt is not None:
                next_attempt[edge] = attempt + 1
        elif attempt is None:
            attempt = next_attempt.get(edge, 1)
        else:
            next_attempt[edge] = attempt
        steps.append(Step(
            float(r["ts"]), kind, *edge, attempt, _num(r["backoff_ms"]), _num(r["latency_ms"]),
            None if r["status_code"] is None else int(r["status_code"]), r["error_type"],
            r["error_message"], r["method"], r["event_id"], r["correlation_id"],
            r["trace_id"], r["span_id"], r.get("parent_span_id")))
    edges: dict[tuple[str, str, str], list[Step]] = {}
    for step in steps:
        edges.setdefault(step.edge, []).append(step)
    summaries = []
    for edge, mine in edges.items():
        retries = [s for s in mine if s.kind == "retry"]
        attempts = max([s.attempt or 0 for s in mine]
                       + [(s.attempt or 0) + 1 for s in retries] + [1])
        summaries.append(EdgeSummary(*edge, attempts, len(retries),
                                     math.fsum(s.backoff_ms or 0.0 for s in retries),
                                     _outcome(mine)))
    return Chain(key, tuple(steps), tuple(summaries), truncated,
                 _cascade_paths(steps, [(str(u), str(d)) for u, d in links]))


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="microseconds")


def _text(value: Any) -> str:
    """A value as one printable line (whatever another writer left in the database)."""
    if value is None:
        return ""
    if isinstance(value, float | Decimal):
        return f"{value:g}"
    return _CONTROL.sub(" ", str(value))


def _edge(source: str, target: str, protocol: str) -> str:
    return _text(f"{source} → {target} · {protocol}")


def _ms(value: float | None) -> str:
    """Milliseconds to 0.1, a trailing .0 left out: 9.5 ms, 11 ms, 1,400 ms."""
    return "" if value is None else f"{value:,.1f}".removesuffix(".0") + " ms"


_HEADERS: Final = ("+time", "edge", "event", "attempt", "backoff", "latency", "status", "error")
_RIGHT: Final = (True, False, False, True, True, True, True, False)
_ERROR_INDENT: Final = 10
"""Where an error goes when it does not fit beside its event: on the next line, indented."""


def _lines(text: str, width: int | None, indent: str = "") -> list[str]:
    from pipeline.cli.tables import wrap

    if width is None:
        return [text]
    body = text.lstrip(" ")
    lead = text[:len(text) - len(body)]
    first, *rest = wrap(body, width - len(lead))
    indent = lead + indent
    return [lead + first, *(indent + line for line in wrap(" ".join(rest), width - len(indent))
                            if rest)]


def _aligned(cells: tuple[str, ...], widths: list[int]) -> str:
    from rich.cells import cell_len

    return "  ".join(c.rjust(w) if right else c + " " * (w - cell_len(c))
                     for c, w, right in zip(cells, widths, _RIGHT, strict=False))


def _table(rows: list[tuple[str, ...]], width: int | None) -> list[str]:
    """One line per event, the error last; where that is too wide, the error on the next
    line; where even the rest is too wide, a table that wraps (or blocks)."""
    import io

    from rich.console import Console

    from pipeline.cli.tables import fit_widths, render, wrap

    table = [_HEADERS, *rows]
    natural = [max(len(r[i]) for r in table) for i in range(len(_HEADERS) - 1)]
    if width is None or sum(natural) + 2 * len(natural) + max(len(r[-1]) for r in rows) <= width:
        return [(_aligned(r, natural) + "  " + r[-1]).rstrip() for r in table]
    widths = fit_widths(_HEADERS[:-1], [r[:-1] for r in rows], [True] * len(natural), width)
    if widths is not None:
        out = [_aligned(_HEADERS[:-1], widths).rstrip(), " " * _ERROR_INDENT + _HEADERS[-1]]
        for r in rows:
            out.append(_aligned(r, widths).rstrip())
            out += [" " * _ERROR_INDENT + line
                    for line in (wrap(r[-1], width - _ERROR_INDENT) if r[-1] else [])]
        return out
    console = Console(file=io.StringIO(), width=width, color_system=None, highlight=False,
                      emoji=False, markup=False)
    console.print(render(_HEADERS, rows, _RIGHT, width))
    return [line.rstrip() for line in console.file.getvalue().splitlines()]


def render(chain: Chain, width: int | None = None) -> str:
    """The chain as text: a summary line, one line per edge, a table of the events; at most
    ``width`` columns wide when given (:mod:`pipeline.cli.tables`)."""
    if not chain.steps:
        return f"no stored events for {_text(chain.key)}"
    plural = "s" if len(chain.edges) != 1 else ""
    lines = _lines(f"chain {_text(chain.key)}: {len(chain.steps)} events, "
                   f"{len(chain.edges)} edge{plural}, {chain.attempts} attempts, "
                   f"{chain.retries} retries, total backoff {_ms(chain.total_backoff_ms)}; "
                   f"outcome: {chain.outcome}", width, "  ")
    if chain.truncated:
        lines += _lines(f"(more than {MAX_EVENTS} events matched: showing the first "
                        f"{MAX_EVENTS})", width)
    for e in chain.edges:
        lines += _lines(f"  {_edge(e.source_service, e.target_service, e.protocol)}: "
                        f"{e.attempts} attempts, {e.retries} retries, backoff "
                        f"{_ms(e.backoff_ms)}, {e.outcome}", width, "    ")
    start = chain.steps[0].ts

    def failure(step: Step) -> str:
        what = step.kind + (f" {_text(step.error_type)}" if step.error_type
                            and step.kind == "error" else "")
        return f"{_edge(*step.edge)} ({what}, +{step.ts - start:.3f} s)"

    for n, path in enumerate(chain.cascades, start=1):
        up = ", then ".join(failure(s) for s in reversed(path[:-1]))
        lines += _lines(f"  cascade {n}: started at {failure(path[-1])}; failed in turn: {up}",
                        width, "    ")
    rows = []
    for s in chain.steps:
        error = ": ".join(_text(x) for x in (s.error_type, s.error_message) if x)
        rows.append((f"+{s.ts - start:.3f} s", _edge(*s.edge), s.kind, _text(s.attempt),
                     _ms(s.backoff_ms), _ms(s.latency_ms), _text(s.status_code), error))
    started = dt.datetime.fromtimestamp(start, dt.UTC).isoformat(timespec="milliseconds")
    lines += _lines(f"started {started.replace('+00:00', 'Z')} (UTC; times are the "
                    "services' own clocks)", width, "  ")
    return "\n".join([*lines, *_table(rows, width)])
