"""``commpipe graph`` as a user runs it: rollups in both databases, Graphviz's drawing, and
the HTML page opened in headless Chromium (its DOM after layout, and a screenshot)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from html import unescape
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.cli.query import execute_duckdb, execute_postgres
from pipeline.core.sketch import ALPHA, LatencySketch
from pipeline.settings import Settings
from pipeline.sink import migrations
from pipeline.sink.sql import dialect_sql
from tests.integration import browser

pytestmark = pytest.mark.integration

WINDOW = 10.0
GREEN, ORANGE, RED, GREY = "#2e7d32", "#e65100", "#c62828", "#9e9e9e"
SVG = "{http://www.w3.org/2000/svg}"

INSERT_SQL = (
    "INSERT INTO communication_rollups (window_start, window_end, source_service, "
    "target_service, protocol, requests, responses, errors, timeouts, error_ratio, "
    "circuit_state, circuit_transitions, health_checks, latency_sketch) VALUES "
    "(to_timestamp(%s), to_timestamp(%s), %s, %s, %s, %s, %s, %s, %s, %s, %s, %s::{json}, "
    "%s::{json}, %s::{json})")


def latencies(edge: int, window: int, n: int) -> list[float]:
    """Known latencies: ``n`` values spread over a range that differs per edge."""
    base = (10.0, 40.0, 150.0, 5.0, 1.0, 2.0)[edge]
    return [round(base + (i * 7 + window * 3) % 50 * base / 25, 3) for i in range(n)]


# edge -> per window (requests, responses, errors, timeouts, circuit, transitions, health);
# three windows each. What each must look like is written out in EXPECTED below.
EDGES: dict[tuple[str, str, str], list[tuple[Any, ...]]] = {
    ("gateway", "orders", "http"): [(100, 100, 0, 0, "closed", {}, {"healthy": 2})] * 3,
    ("orders", "payments", "grpc"): [(100, 97, 3, 0, "closed", {}, {})] * 3,
    ("payments", "bank", "amqp"): [(40, 40, 0, 0, "closed", {}, {}),
                                   (40, 39, 1, 0, "closed", {}, {}),
                                   (40, 38, 1, 1, "open", {"reported:open": 1}, {})],
    ("orders", "inventory", "http"): [(50, 40, 6, 4, "closed", {}, {})] * 3,
    ("gateway", "payments", "http"): [(0, 0, 0, 0, "closed", {}, {"healthy": 3,
                                                                    "degraded": 1})] * 3,
    ("legacy:v1", "db", "kafka"): [(20, 20, 0, 0, "closed", {}, {})] * 3,
}
# colour, error ratio as printed, circuit line (None when closed and never opened)
EXPECTED = {
    ("gateway", "orders", "http"): (GREEN, "0.00 %", None),
    ("orders", "payments", "grpc"): (ORANGE, "3.0 %", None),       # 9 of 300
    ("payments", "bank", "amqp"): (RED, "2.5 %", "circuit open, opened 1×"),  # 3 of 120
    ("orders", "inventory", "http"): (RED, "20.0 %", None),        # 30 of 150
    ("gateway", "payments", "http"): (GREY, None, None),
    ("legacy:v1", "db", "kafka"): (GREEN, "0.00 %", None),
}
SERVICES = sorted({s for e in EDGES for s in e[:2]})


def rows(t0: float) -> list[list[Any]]:
    out = []
    for i, (edge, windows) in enumerate(EDGES.items()):
        for w, (req, resp, err, tmo, circuit, transitions, health) in enumerate(windows):
            sketch = LatencySketch()
            sketch.add_many(latencies(i, w, resp + err + tmo))
            ratio = (err + tmo) / max(resp + err + tmo, 1)
            out.append([t0 + w * WINDOW, t0 + (w + 1) * WINDOW, *edge, req, resp, err, tmo,
                        ratio, circuit, orjson.dumps(transitions).decode(),
                        orjson.dumps(health).decode(), orjson.dumps(sketch.to_json()).decode()])
    return out


def expected_lines(edge: tuple[str, str, str]) -> tuple[str, list[str]]:
    """The colour and label lines, computed from EDGES and EXPECTED; ``P95`` stands for the
    p95, checked separately (the sketch's value is within 1 % of the exact one)."""
    windows = EDGES[edge]
    colour, ratio, circuit = EXPECTED[edge]
    if ratio is None:
        checks = sum(sum(w[6].values()) for w in windows)
        bad = checks - sum(w[6].get("healthy", 0) for w in windows)
        return colour, [f"{edge[2]} · {checks} health checks ({bad} not healthy)"]
    rate = sum(w[0] for w in windows) / (len(windows) * WINDOW)
    lines = [f"{edge[2]} · {rate:,.1f} req/s", f"p95 P95 ms · {ratio} errors"]
    return colour, lines + ([circuit] if circuit else [])


def exact_p95(edge: tuple[str, str, str]) -> float:
    i = list(EDGES).index(edge)
    values = sorted(v for w, x in enumerate(EDGES[edge]) for v in latencies(i, w, sum(x[1:4])))
    return values[math.floor(0.95 * (len(values) - 1))]


def check_label(edge: tuple[str, str, str], texts: list[str]) -> None:
    _, want = expected_lines(edge)
    assert len(texts) == len(want), (edge, texts)
    for got, line in zip(texts, want, strict=True):
        if "P95" not in line:
            assert got == line, edge
            continue
        m = re.fullmatch(re.escape(line).replace("P95", "([0-9.,]+)"), got)
        assert m is not None, (edge, got)
        p95 = float(m[1].replace(",", ""))
        assert abs(p95 - exact_p95(edge)) <= ALPHA * exact_p95(edge) + 0.05, (edge, got)


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory, postgres_dsn: str) -> dict[str, str]:
    """Both databases, migrated, holding the rollups of EDGES (three recent windows)."""
    import psycopg
    from psycopg.conninfo import make_conninfo

    tmp = tmp_path_factory.mktemp("graph")
    duck = str(tmp / "commpipe.duckdb")
    name = f"commpipe_graph_{os.getpid()}"
    with psycopg.connect(postgres_dsn, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.execute(f'CREATE DATABASE "{name}"')
    dsn = make_conninfo(postgres_dsn, dbname=name)
    migrations.migrate_postgres(dsn)
    migrations.migrate_duckdb(duck)
    t0 = math.floor(time.time() / WINDOW) * WINDOW - 300
    data = rows(t0)
    execute_duckdb(duck, [(dialect_sql(INSERT_SQL, "duckdb"), r) for r in data], write=True)
    execute_postgres(Settings.from_env({"COMMPIPE_POSTGRES_DSN": dsn}),
                     [(dialect_sql(INSERT_SQL, "postgres"), r) for r in data], write=True)
    yield {"COMMPIPE_DUCKDB_PATH": duck, "COMMPIPE_POSTGRES_DSN": dsn, "tmp": str(tmp)}
    with psycopg.connect(postgres_dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')


def commpipe(env: dict[str, str], *args: str, cwd: str | None = None
             ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd,
                          env={**os.environ, "COLUMNS": "200",
                               **{k: v for k, v in env.items() if k.startswith("COMMPIPE_")}})


def need_dot() -> None:
    if shutil.which("dot") is None:
        pytest.fail("Graphviz's dot is needed: apt-get install -y graphviz (.ci/run does)")


def svg_drawing(text: str) -> tuple[dict[str, str], dict[str, tuple[str, list[str]]]]:
    """(service id -> its text, edge id -> (stroke colour, label lines)) of Graphviz's SVG."""
    root = ET.fromstring(text)
    nodes, edges = {}, {}
    for g in root.iter(f"{SVG}g"):
        if g.get("class") == "node":
            nodes[g.get("id", "")] = "".join(t.text or "" for t in g.iter(f"{SVG}text"))
        elif g.get("class") == "edge":
            path = next(g.iter(f"{SVG}path"))
            edges[g.get("id", "")] = (path.get("stroke", ""),
                                      [t.text or "" for t in g.iter(f"{SVG}text")])
    return nodes, edges


def check_drawing(nodes: dict[str, str], edges: dict[str, tuple[str, list[str]]]) -> None:
    assert nodes == {f"service:{s}": s for s in SERVICES}
    assert set(edges) == {f"edge:{s}/{t}/{p}" for s, t, p in EDGES}
    for (s, t, p) in EDGES:
        stroke, texts = edges[f"edge:{s}/{t}/{p}"]
        assert stroke == expected_lines((s, t, p))[0], (s, t, p)
        check_label((s, t, p), texts)


def test_svg_from_duckdb_and_postgres_draws_every_service_and_edge(
        stored: dict[str, str], tmp_path: Path) -> None:
    need_dot()
    drawings = []
    for flag in ([], ["--postgres"]):
        out = tmp_path / f"graph{len(drawings)}.svg"
        done = commpipe(stored, "graph", *flag, "--out", str(out))  # svg from the suffix
        assert done.returncode == 0, done.stderr
        assert f"wrote {out}: {len(SERVICES)} services, {len(EDGES)} edges" in done.stderr
        drawing = svg_drawing(out.read_text())
        check_drawing(*drawing)
        drawings.append(drawing)
    assert drawings[0] == drawings[1]


def test_dot_and_stdout_and_clear_errors(stored: dict[str, str], tmp_path: Path) -> None:
    dot = commpipe(stored, "graph", "--format", "dot", "--out", "-")
    assert dot.returncode == 0, dot.stderr
    assert dot.stdout.startswith("digraph commpipe {")
    assert sum(1 for line in dot.stdout.splitlines() if " -> " in line) == len(EDGES)
    default = commpipe(stored, "graph", "--format", "dot", cwd=str(tmp_path))
    assert default.returncode == 0 and (tmp_path / "commpipe-graph.dot").exists()
    old = commpipe(stored, "graph", "--since", "30s", "--out", "-")  # the windows are older
    assert old.returncode == 1
    assert "no rollups in the last 30s in the DuckDB file" in old.stderr
    bad = commpipe(stored, "graph", "--format", "png")
    assert bad.returncode == 1 and "--format must be svg, html or dot" in bad.stderr


PROBE = """<script>
(function () {
  const box = (el) => { const r = el.getBoundingClientRect();
    return {x: r.x, y: r.y, w: r.width, h: r.height}; };
  const out = {svg: box(document.querySelector("div.graph svg")), nodes: {}, edges: {},
               rows: [...document.querySelectorAll("table.edges tbody tr")].map(
                 (tr) => tr.dataset.edge)};
  for (const g of document.querySelectorAll("svg g.node")) {
    out.nodes[g.id] = {box: box(g), text: [...g.querySelectorAll("text")].map(
      (t) => t.textContent).join("")};
  }
  for (const g of document.querySelectorAll("svg g.edge")) {
    const path = g.querySelector("path");
    out.edges[g.id] = {length: path.getTotalLength(), stroke: getComputedStyle(path).stroke,
                       head: box(g.querySelector("polygon")),
                       texts: [...g.querySelectorAll("text")].map((t) => t.textContent),
                       label: [...g.querySelectorAll("text")].map((t) => box(t))};
  }
  const pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
})();
</script>"""


def rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


def test_html_in_headless_chromium_shows_every_service_and_edge(
        stored: dict[str, str], tmp_path: Path) -> None:
    need_dot()
    browser.chromium()
    page = tmp_path / "graph.html"
    done = commpipe(stored, "graph", "--out", str(page))  # html from the suffix
    assert done.returncode == 0, done.stderr
    html = page.read_text()
    assert "<script" not in html and "http://" not in html.replace(
        "http://www.w3.org", "")  # self-contained: nothing fetched, nothing run
    # the DOM as the browser laid it out (a probe appended to a copy of the page measures it)
    probed = tmp_path / "probed.html"
    probed.write_text(html.replace("</body>", PROBE + "\n</body>"))
    dom = browser.dump_dom(probed)
    m = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert m is not None, dom[-2000:]
    seen = json.loads(unescape(m[1]))
    svg = seen["svg"]
    assert svg["w"] > 600 and svg["h"] > 150

    def inside(b: dict[str, float]) -> bool:
        return (b["w"] > 0 and b["h"] > 0 and b["x"] >= svg["x"] - 1 and b["y"] >= svg["y"] - 1
                and b["x"] + b["w"] <= svg["x"] + svg["w"] + 1
                and b["y"] + b["h"] <= svg["y"] + svg["h"] + 1)

    assert {k: v["text"] for k, v in seen["nodes"].items()} == {
        f"service:{s}": s for s in SERVICES}
    assert all(inside(v["box"]) for v in seen["nodes"].values())
    assert set(seen["edges"]) == {f"edge:{s}/{t}/{p}" for s, t, p in EDGES}
    assert seen["rows"] == [f"edge:{s}/{t}/{p}" for s, t, p in sorted(EDGES)]
    for (s, t, p) in EDGES:
        drawn = seen["edges"][f"edge:{s}/{t}/{p}"]
        colour = expected_lines((s, t, p))[0]
        assert drawn["length"] > 50, (s, t, p)  # a real arrow between two boxes
        assert drawn["stroke"] == "rgb({}, {}, {})".format(*rgb(colour)), (s, t, p)
        assert inside(drawn["head"]) and all(inside(b) for b in drawn["label"]), (s, t, p)
        check_label((s, t, p), drawn["texts"])
    # and what a person sees: every colour of the drawing is on the screen, in the graph
    from PIL import Image

    shot = browser.screenshot(page, tmp_path / "graph.png")
    with Image.open(shot) as image:
        graph = image.convert("RGB").crop((int(svg["x"]), int(svg["y"]),
                                           int(svg["x"] + svg["w"]), int(svg["y"] + svg["h"])))
        raw = graph.tobytes()
    pixels = [tuple(raw[i:i + 3]) for i in range(0, len(raw), 3)]
    for colour in (GREEN, ORANGE, RED, GREY, "#eef3f8"):  # the four kinds of arrow, the boxes
        want = rgb(colour)
        near = sum(1 for px in pixels if all(abs(a - b) <= 12 for a, b in zip(px, want,
                                                                             strict=True)))
        assert near > 100, (colour, near)
    if os.environ.get("COMMPIPE_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["COMMPIPE_KEEP_SCREENSHOT"])
