"""The service graph written out: DOT, SVG, or one self-contained HTML page.

The page holds Graphviz's SVG inline, a legend of the colours and a table of
the edges; no scripts, fonts or styles from elsewhere, so it opens the same way
anywhere (a file attached to an incident, a CI artefact)."""

from __future__ import annotations

from html import escape
from typing import Final, Literal

from pipeline.cli.cells import cell
from pipeline.cli.graph import (
    COLOURS,
    MEANING,
    Graph,
    edge_id,
    edge_lines,
    render_svg,
    status,
    to_dot,
)

__all__ = ["FORMATS", "Format", "render", "render_html"]

Format = Literal["svg", "html", "dot"]
FORMATS: Final[tuple[Format, ...]] = ("svg", "html", "dot")


def render(graph: Graph, fmt: Format) -> str:
    """The graph as DOT text (no Graphviz program needed), SVG or the HTML page."""
    if fmt == "dot":
        return to_dot(graph).source
    return render_svg(graph) if fmt == "svg" else render_html(graph)

_STYLE: Final = """
body { font-family: Helvetica, Arial, sans-serif; margin: 1.5em; color: #1f2933; }
h1 { font-size: 1.3em; margin: 0 0 .3em; }
p.period { margin: 0 0 1em; color: #52606d; }
ul.legend { list-style: none; padding: 0; display: flex; flex-wrap: wrap; gap: 1.5em; }
ul.legend span.swatch { display: inline-block; width: 2em; height: .35em;
  vertical-align: middle; margin-right: .4em; }
div.graph svg { max-width: 100%; height: auto; }
g.edge:hover path { stroke-width: 4; }
table { border-collapse: collapse; margin-top: 1.5em; }
th, td { padding: .25em .8em; border-bottom: 1px solid #e4e7eb; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
"""


def _duration(seconds: float) -> str:
    """``90`` -> ``1 min 30 s``, ``3600`` -> ``1 h``."""
    s = round(seconds)
    parts = [(s // 86400, "d"), (s % 86400 // 3600, "h"), (s % 3600 // 60, "min"), (s % 60, "s")]
    return " ".join(f"{n} {unit}" for n, unit in parts if n) or "0 s"


def _svg_element(svg: str) -> str:
    """The ``<svg>`` element alone (no XML declaration or doctype inside HTML)."""
    return svg[svg.index("<svg"):]


def render_html(graph: Graph) -> str:
    """The page (see the module docstring)."""
    svg = _svg_element(render_svg(graph))
    legend = "".join(
        f'<li><span class="swatch" style="background:{COLOURS[s]}"></span>{escape(text)}</li>'
        for s, text in MEANING.items())
    rows = []
    for e in graph.edges:
        ratio = e.error_ratio
        rows.append(
            f'<tr data-edge="{escape(edge_id(e))}" data-status="{status(e)}">'
            f"<td>{escape(e.source)}</td><td>{escape(e.target)}</td>"
            f"<td>{escape(e.protocol)}</td>"
            f'<td class="n">{graph.rate(e):,.1f}</td>'
            f'<td class="n">{escape(cell(e.p95_ms, "ms"))}</td>'
            f'<td class="n">{escape(cell(ratio, "ratio")) if ratio is not None else ""}</td>'
            f'<td style="color:{COLOURS[status(e)]}">{escape(e.circuit)}</td>'
            f'<td class="n">{e.opened}</td>'
            f"<td>{escape('; '.join(edge_lines(graph, e)))}</td></tr>")
    period = (f"{cell(graph.start, 'epoch')} to {cell(graph.end, 'epoch')} (UTC), "
              f"{_duration(graph.period_s)} of windows within the last "
              f"{_duration(graph.since_s)}; "
              "rates are requests per second over that period, p95 and error ratio over "
              "all of it, the circuit as of its last window")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>commpipe service graph</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>commpipe service graph: {len(graph.services)} services, {len(graph.edges)} edges</h1>
<p class="period">{escape(period)}</p>
<ul class="legend">{legend}</ul>
<div class="graph">
{svg}
</div>
<table class="edges">
<thead><tr><th>source</th><th>target</th><th>protocol</th><th>req/s</th><th>p95 ms</th>
<th>errors</th><th>circuit</th><th>opened</th><th>label</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody>
</table>
</body>
</html>
"""
