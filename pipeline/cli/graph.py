"""The service graph (``commpipe graph``): services as nodes, edges as arrows, from the rollups.

:data:`GRAPH_SQL` reads the ``communication_rollups`` whose window ended within
the lookback, from either database; :func:`build_graph` (a pure function over
those rows) adds each edge's windows up: requests, outcomes and failures
summed, latency sketches merged (so the p95 is the lookback's, 1 % accurate),
the circuit state of its newest window and how often it opened.

- **rate** = the edge's requests / the period the rows cover (the first window's
  start to the last window's end, the same period for every edge), in requests/s;
- **p95** = the 0.95 quantile of the merged sketch, in ms;
- **error ratio** = (errors + timeouts) / (responses + errors + timeouts);
- **colour** (:func:`status`): red when the circuit is open or the error ratio is
  at least :data:`ERROR_BAD` (the error-ratio alert's threshold), orange when it
  is half-open or the ratio is at least :data:`ERROR_WARN`, green otherwise, grey
  for an edge with no outcomes (health checks only).

:func:`to_dot` lays nothing out itself: it writes the graph in Graphviz's
language with the ``graphviz`` package, and Graphviz's ``dot`` places it
(:func:`render_svg`); :mod:`pipeline.cli.graph_page` wraps the SVG in a
self-contained HTML page. Every node has the id ``service:<name>`` and every
arrow ``edge:<source>/<target>/<protocol>`` in the SVG.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import orjson

from pipeline.core.sketch import LatencySketch
from pipeline.errors import ConfigError
from pipeline.settings import Settings

__all__ = ["COLOURS", "ERROR_BAD", "ERROR_WARN", "GRAPH_SQL", "MEANING", "SCHEMA_VERSION",
           "EdgeView", "Graph", "Status", "build_graph", "edge_id", "edge_lines", "read_graph",
           "render_svg", "service_id", "status", "to_dot"]

GRAPH_SQL: Final = """
SELECT source_service, target_service, protocol,
       extract(epoch FROM window_start) AS window_start,
       extract(epoch FROM window_end) AS window_end,
       requests, responses, errors, timeouts, circuit_state, circuit_transitions,
       health_checks, latency_sketch
FROM communication_rollups
WHERE window_end > to_timestamp(%s)
ORDER BY window_start, source_service, target_service, protocol
"""
"""The lookback's rollups (parameter: the cut-off, epoch seconds)."""
SCHEMA_VERSION: Final = 2
"""``communication_rollups`` came with migration 0002."""

ERROR_WARN: Final = 0.01
ERROR_BAD: Final = 0.05
"""Error ratios from which an edge is orange, red (``CommpipeEdgeErrorRatioHigh`` fires at
the same 5 %)."""

Status = Literal["ok", "warn", "bad", "idle"]
COLOURS: Final[dict[Status, str]] = {"ok": "#2e7d32", "warn": "#e65100", "bad": "#c62828",
                                     "idle": "#9e9e9e"}
MEANING: Final[dict[Status, str]] = {
    "ok": f"error ratio under {ERROR_WARN:.0%}, circuit closed",
    "warn": f"error ratio {ERROR_WARN:.0%} to {ERROR_BAD:.0%}, or circuit half-open",
    "bad": f"error ratio {ERROR_BAD:.0%} or more, or circuit open",
    "idle": "no calls (health checks only)"}


def _loads(value: Any) -> Any:
    return orjson.loads(value) if isinstance(value, str | bytes) else (value or {})


@dataclass
class EdgeView:
    """One edge over the lookback."""

    source: str
    target: str
    protocol: str
    windows: int = 0
    requests: int = 0
    responses: int = 0
    failures: int = 0
    latency: LatencySketch = field(default_factory=LatencySketch)
    circuit: str = "closed"
    """The circuit state of the edge's newest window (reported when it reports, else derived)."""
    opened: int = 0
    """Times the circuit entered ``open`` in the lookback (as reported, else as derived)."""
    health: dict[str, int] = field(default_factory=dict)
    _transitions: dict[str, int] = field(default_factory=dict, repr=False)

    @property
    def key(self) -> tuple[str, str, str]:
        return self.source, self.target, self.protocol

    @property
    def outcomes(self) -> int:
        return self.responses + self.failures

    @property
    def error_ratio(self) -> float | None:
        return self.failures / self.outcomes if self.outcomes else None

    @property
    def p95_ms(self) -> float | None:
        return self.latency.quantile(0.95)


@dataclass
class Graph:
    since_s: float
    start: float
    """The first window's start (epoch seconds); ``end`` the last one's end."""
    end: float
    edges: list[EdgeView]

    @property
    def period_s(self) -> float:
        return max(self.end - self.start, 0.0)

    @property
    def services(self) -> list[str]:
        return sorted({e.source for e in self.edges} | {e.target for e in self.edges})

    def rate(self, edge: EdgeView) -> float:
        """Requests per second over the period."""
        return edge.requests / self.period_s if self.period_s > 0 else 0.0


def build_graph(rows: Iterable[Mapping[str, Any]], since_s: float) -> Graph:
    """The graph of :data:`GRAPH_SQL`'s rows (values as either database returns them)."""
    edges: dict[tuple[str, str, str], EdgeView] = {}
    start, end = math.inf, -math.inf
    for r in rows:
        key = (r["source_service"], r["target_service"], r["protocol"])
        e = edges.get(key) or edges.setdefault(key, EdgeView(*key))
        e.windows += 1
        e.requests += int(r["requests"])
        e.responses += int(r["responses"])
        e.failures += int(r["errors"]) + int(r["timeouts"])
        e.latency.merge(LatencySketch.from_json(_loads(r["latency_sketch"])))
        e.circuit = str(r["circuit_state"])  # rows come oldest first: the newest wins
        for k, n in _loads(r["circuit_transitions"]).items():
            e._transitions[k] = e._transitions.get(k, 0) + int(n)
        for k, n in _loads(r["health_checks"]).items():
            e.health[k] = e.health.get(k, 0) + int(n)
        start = min(start, float(r["window_start"]))
        end = max(end, float(r["window_end"]))
    for e in edges.values():
        reported = any(k.startswith("reported:") for k in e._transitions)
        e.opened = e._transitions.get("reported:open" if reported else "derived:open", 0)
    if not edges:
        start = end = 0.0
    return Graph(since_s, start, end, sorted(edges.values(), key=lambda e: e.key))


def status(edge: EdgeView) -> Status:
    """The edge's colour class (see the module docstring)."""
    if edge.circuit == "open":
        return "bad"
    if edge.circuit == "half_open":
        return "warn"
    ratio = edge.error_ratio
    if ratio is None:
        return "idle"
    return "bad" if ratio >= ERROR_BAD else "warn" if ratio >= ERROR_WARN else "ok"


def service_id(service: str) -> str:
    return f"service:{service}"


def edge_id(edge: EdgeView | tuple[str, str, str]) -> str:
    s, t, p = edge.key if isinstance(edge, EdgeView) else edge
    return f"edge:{s}/{t}/{p}"


def _number(value: float, decimals: int = 1) -> str:
    return f"{value:,.{decimals}f}"


def edge_lines(graph: Graph, e: EdgeView) -> list[str]:
    """What an arrow says: protocol and rate; p95 and error ratio; the circuit if not closed."""
    from pipeline.cli.cells import cell

    if not e.outcomes and not e.requests:
        checks = sum(e.health.values())
        unhealthy = checks - e.health.get("healthy", 0)
        return [f"{e.protocol} · {checks:,} health checks"
                + (f" ({unhealthy:,} not healthy)" if unhealthy else "")]
    lines = [f"{e.protocol} · {_number(graph.rate(e))} req/s"]
    p95, ratio = e.p95_ms, e.error_ratio
    lines.append(" · ".join([f"p95 {_number(p95)} ms" if p95 is not None else "no latency",
                             f"{cell(ratio, 'ratio')} errors" if ratio is not None
                             else "no outcomes"]))
    if e.circuit != "closed" or e.opened:
        lines.append(f"circuit {e.circuit}" + (f", opened {e.opened}×" if e.opened else ""))
    return lines


def _title(graph: Graph) -> str:
    from pipeline.cli.cells import cell

    if not graph.edges:
        return "commpipe: no rollups in the lookback"
    return (f"commpipe service graph: {len(graph.services)} services, {len(graph.edges)} edges, "
            f"{cell(graph.start, 'epoch')} to {cell(graph.end, 'epoch')} (UTC)")


def to_dot(graph: Graph) -> Any:
    """The graph as a ``graphviz.Digraph`` (``.source`` is its DOT text)."""
    import graphviz

    dot = graphviz.Digraph(
        "commpipe", graph_attr={"rankdir": "LR", "label": _title(graph), "labelloc": "t",
                                "fontname": "Helvetica", "fontsize": "14", "pad": "0.4",
                                "nodesep": "0.7", "ranksep": "1.6", "bgcolor": "white"},
        node_attr={"shape": "box", "style": "rounded,filled", "fillcolor": "#eef3f8",
                   "color": "#4a5d70", "fontname": "Helvetica", "fontsize": "13",
                   "margin": "0.25,0.12"},
        edge_attr={"fontname": "Helvetica", "fontsize": "10", "arrowsize": "0.8"})
    # node names are numbers: a service name may hold ':', which DOT reads as a port
    names = {s: f"n{i}" for i, s in enumerate(graph.services)}
    for service, name in names.items():
        dot.node(name, label=service, id=service_id(service), tooltip=service)
    for e in graph.edges:
        colour = COLOURS[status(e)]
        lines = edge_lines(graph, e)
        dot.edge(names[e.source], names[e.target], label="\\n".join(lines), id=edge_id(e),
                 color=colour, fontcolor=colour,
                 penwidth=f"{1.2 + min(math.log10(1 + graph.rate(e)), 3.0):.2f}",
                 style="dashed" if status(e) == "idle" else "solid",
                 tooltip=f"{e.source} → {e.target}: " + "; ".join(lines))
    return dot


def render_svg(graph: Graph) -> str:
    """The graph drawn by Graphviz's ``dot``, as SVG text."""
    import graphviz

    try:
        return to_dot(graph).pipe(format="svg", encoding="utf-8")
    except graphviz.ExecutableNotFound:
        raise ConfigError("the svg and html formats need Graphviz's `dot` program (Debian: "
                          "apt-get install graphviz; macOS: brew install graphviz); "
                          "--format dot writes the graph without it") from None
    except graphviz.CalledProcessError as e:
        raise ConfigError(f"Graphviz's dot failed: {e.stderr!r}") from None


def read_graph(settings: Settings, since_s: float, *, postgres: bool = False,
               now: float | None = None) -> Graph:
    """The graph of the rollups whose window ended in the last ``since_s`` seconds, from the
    DuckDB file (or PostgreSQL)."""
    from pipeline.cli import query as q

    params = [(time.time() if now is None else now) - since_s]
    result = (q.query_postgres(settings, GRAPH_SQL, params, min_version=SCHEMA_VERSION)
              if postgres else q.query_duckdb(settings.duckdb_path, GRAPH_SQL, params,
                                              min_version=SCHEMA_VERSION))
    return build_graph((dict(zip(result.columns, row, strict=True)) for row in result.rows),
                       since_s)
