"""``commpipe demo``: the whole pipeline on one machine, with synthetic services.

Starts (or uses, when ``COMMPIPE_KAFKA_BOOTSTRAP`` / ``COMMPIPE_POSTGRES_DSN`` are
set) a Kafka broker and PostgreSQL, applies the migrations, runs a worker
(stream job, sink, ``/metrics``) as a child process and the load generator in a
thread, and shows the edges live from the worker's ``/metrics``. On Ctrl-C or
after ``duration`` it stops the traffic, lets the worker store the last
windows, stops everything it started, in reverse order, and draws the run's
service graph from the DuckDB file (:func:`write_graph`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import ServiceError
from pipeline.settings import Settings

__all__ = ["EXAMPLE_QUERIES", "DemoResult", "run_demo", "write_graph"]

EXAMPLE_QUERIES = (
    ("the slowest edges",
     "SELECT source_service, target_service, protocol, max(latency_p99_ms) AS p99_ms "
     "FROM communication_rollups GROUP BY ALL ORDER BY p99_ms DESC LIMIT 5"),
    ("the error-rate trend",
     "SELECT window_start, source_service, target_service, error_ratio "
     "FROM communication_rollups WHERE error_ratio > 0 ORDER BY window_start DESC LIMIT 10"),
    ("circuit trips",
     "SELECT window_start, source_service, target_service, circuit_transitions "
     "FROM communication_rollups WHERE circuit_transitions::VARCHAR LIKE '%open%' "
     "ORDER BY window_start DESC LIMIT 10"),
)
_TANSU = {"COMMPIPE_WORKER_CHANGELOG_LAST_ALONE": "true",
          "COMMPIPE_BROKER_SESSION_TIMEOUT_S": "6", "COMMPIPE_BROKER_HEARTBEAT_INTERVAL_S": "1"}


@dataclass
class DemoResult:
    duckdb_path: str
    worker_log: Path
    events_sent: int = 0
    scrapes: int = 0
    edges_seen: set[tuple[str, str, str]] = field(default_factory=set)
    graphs: list[Path] = field(default_factory=list)
    """The service graph of the run (HTML and SVG; DOT alone without Graphviz's dot)."""
    graph_note: str = ""
    """Why there is no (drawn) graph, when there is none."""
    lookback_s: float = 0.0
    """How far back the run's windows go, for ``commpipe graph --since``."""


def write_graph(result: DemoResult, workdir: Path) -> None:
    """Draw the run's service graph from the DuckDB file into ``workdir`` (graph.html and
    graph.svg; graph.dot only, with a note, when Graphviz's dot is not installed)."""
    from pipeline.cli import graph, graph_page
    from pipeline.errors import CommpipeError

    try:
        drawn = graph.read_graph(Settings.from_env(duckdb_path=result.duckdb_path),
                                 result.lookback_s)
    except CommpipeError as e:
        result.graph_note = f"no service graph: {e}"
        return
    if not drawn.edges:
        result.graph_note = "no service graph: no windows were stored"
        return
    try:
        pages = {fmt: graph_page.render(drawn, fmt) for fmt in ("html", "svg")}
    except CommpipeError as e:  # no Graphviz: the DOT text, which needs no program
        pages = {"dot": graph_page.render(drawn, "dot")}
        result.graph_note = str(e)
    for fmt, text in pages.items():
        path = (workdir / f"graph.{fmt}").resolve()
        path.write_text(text, encoding="utf-8")
        result.graphs.append(path)


def _samples(port: int) -> list[Any]:
    """Every sample of the worker's ``/metrics`` (OSError while it does not answer)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:  # noqa: S310
        text = r.read().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def scrape(port: int) -> dict[tuple[str, str, str], dict[str, Any]]:
    """Per edge: requests, p95/p99 (s), error ratio, circuit states, from ``/metrics``."""
    edges: dict[tuple[str, str, str], dict[str, Any]] = {}
    for s in _samples(port):
        labels = s.labels
        if "source_service" not in labels:
            continue
        row = edges.setdefault((labels["source_service"], labels["target_service"],
                                labels["protocol"]), {})
        name = s.name.rsplit("_communication_", 1)[-1]
        if name == "requests_total":
            row["requests"] = s.value
        elif name == "latency_quantile_seconds" and labels.get("quantile") in ("0.95",
                                                                             "0.99"):
            row["p" + labels["quantile"][2:]] = s.value
        elif name == "error_ratio":
            row["error_ratio"] = s.value
        elif name == "circuit_state" and s.value == 1.0:
            row[labels["source"]] = labels["state"]
    return edges


def _table(edges: dict[tuple[str, str, str], dict[str, Any]],
           rates: dict[tuple[str, str, str], float], title: str) -> Any:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column in ("edge", "req/s", "p95 ms", "p99 ms", "errors", "circuit"):
        table.add_column(column, justify="left" if column in ("edge", "circuit") else "right")
    for edge, row in sorted(edges.items()):
        circuit = row.get("reported") or row.get("derived", "?")
        style = {"open": "red", "half_open": "yellow"}.get(circuit, "green")
        ms = (lambda v: "" if v is None else f"{v * 1000:.1f}")  # noqa: E731
        ratio = row.get("error_ratio")
        table.add_row(f"{edge[0]} → {edge[1]} ({edge[2]})", f"{rates.get(edge, 0.0):.0f}",
                      ms(row.get("p95")), ms(row.get("p99")),
                      "" if ratio is None else f"{ratio:.1%}", f"[{style}]{circuit}[/]")
    return table


@contextlib.contextmanager
def _services(settings: Settings, workdir: Path, console: Any
              ) -> Iterator[tuple[str, str, dict[str, str]]]:
    """(bootstrap, dsn, extra worker env): the given services, or embedded ones."""
    with contextlib.ExitStack() as stack:
        extra: dict[str, str] = {}
        bootstrap = os.environ.get("COMMPIPE_KAFKA_BOOTSTRAP", "")
        if not bootstrap:
            from pipeline.dev.broker import EmbeddedBroker

            with console.status("starting the embedded Kafka broker..."):
                broker = stack.enter_context(EmbeddedBroker())
            bootstrap, extra = broker.bootstrap, dict(_TANSU)
        dsn = settings.postgres_conninfo()
        if not dsn:
            from pipeline.dev.postgres import EmbeddedPostgres

            with console.status("starting the embedded PostgreSQL..."):
                pg = stack.enter_context(EmbeddedPostgres(workdir / "pgdata"))
            dsn = pg.dsn
        yield bootstrap, dsn, extra


def run_demo(console: Any, *, duration: float | None, rate: float, seed: int,
             workdir: Path = Path(".commpipe/demo")) -> DemoResult:
    """Run everything until ``duration`` s pass or SIGINT/SIGTERM; see the module doc."""
    from rich.markup import escape

    from agents.topics import ensure_commpipe_topics
    from pipeline.core.slo import check_file
    from pipeline.dev.process import free_port, run_sync, terminate_process
    from pipeline.errors import ConfigError
    from pipeline.settings import unknown_variables
    from pipeline.sink import migrations

    for warning in unknown_variables():
        console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    settings = Settings.from_env()
    check_file(settings.slo_file)
    if "COMMPIPE_METRICS_PORT" in os.environ and settings.metrics_port == 0:
        raise ConfigError("COMMPIPE_METRICS_PORT=0 turns the worker's /metrics off, and the "
                          "demo follows the worker there: unset it (a free port is chosen) "
                          "or choose a port")
    started = time.time()
    workdir.mkdir(parents=True, exist_ok=True)
    duckdb_path = str(Path(settings.duckdb_path or "commpipe.duckdb").resolve())
    result = DemoResult(duckdb_path, workdir / "worker.log")
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT,
                                                                   signal.SIGTERM)}
    try:
        with _services(settings, workdir, console) as (bootstrap, dsn, extra):
            settings = Settings.from_env(kafka_bootstrap=bootstrap)
            run_sync(lambda: ensure_commpipe_topics(settings))
            migrations.migrate_postgres(dsn)
            migrations.migrate_duckdb(duckdb_path)
            port = settings.metrics_port if "COMMPIPE_METRICS_PORT" in os.environ else free_port()
            env = {**os.environ, **extra, "COMMPIPE_KAFKA_BOOTSTRAP": bootstrap,
                   "COMMPIPE_POSTGRES_DSN": dsn, "COMMPIPE_DUCKDB_PATH": duckdb_path,
                   "COMMPIPE_METRICS_PORT": str(port), "COMMPIPE_METRICS_HOST": "127.0.0.1",
                   "COMMPIPE_IDLE_CLOSE_S": os.environ.get("COMMPIPE_IDLE_CLOSE_S", "3"),
                   "COMMPIPE_WORKER_LOGLEVEL": os.environ.get("COMMPIPE_WORKER_LOGLEVEL", "warn"),
                   "COMMPIPE_WORKER_DATADIR": str(workdir / "worker")}
            with open(result.worker_log, "ab") as log:
                worker = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "worker"],
                                          env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True)
            try:
                _run(console, result, settings, port, worker, stop, duration,
                     rate=rate, seed=seed)
            finally:
                with console.status("stopping the worker..."):
                    terminate_process(worker, timeout=20, group=True)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    # every window of this run (not an earlier run's, kept in the same file)
    result.lookback_s = time.time() - started + 2 * settings.window_s
    write_graph(result, workdir)
    return result


def _run(console: Any, result: DemoResult, settings: Settings, port: int,
         worker: subprocess.Popen[bytes], stop: threading.Event, duration: float | None, *,
         rate: float, seed: int) -> None:
    """Traffic and the live view until ``stop`` or ``duration``; then the last windows."""
    from rich.live import Live

    from pipeline.cli.loadgen import LoadGen
    from pipeline.shim.emitter import Emitter

    emitter = Emitter(settings.kafka_bootstrap, settings.topic, settings=settings)
    traffic_stop = threading.Event()
    loadgen = LoadGen(emitter, rate=rate, seed=seed)
    thread = threading.Thread(target=loadgen.run, args=(None, traffic_stop), daemon=True)
    thread.start()
    started = time.monotonic()
    last: dict[tuple[str, str, str], float] = {}
    rates: dict[tuple[str, str, str], float] = {}
    edges: dict[tuple[str, str, str], dict[str, Any]] = {}
    try:
        with Live(_table({}, {}, "starting the worker..."), console=console,
                      refresh_per_second=2) as live:
            while not stop.wait(1.0):
                if worker.poll() is not None:
                    raise ServiceError(f"the worker exited (code {worker.returncode}); "
                                       f"see {result.worker_log}")
                elapsed = time.monotonic() - started
                if duration is not None and elapsed >= duration:
                    break
                try:
                    edges = scrape(port)
                except OSError:
                    continue  # the worker is still starting
                result.scrapes += 1
                result.edges_seen.update(edges)
                for edge, row in edges.items():
                    n = row.get("requests", 0.0)
                    rates[edge] = max(n - last.get(edge, n), 0.0)
                    last[edge] = n
                remaining = "" if duration is None else f", {duration - elapsed:.0f} s left"
                live.update(_table(edges, rates, f"commpipe demo: {len(edges)} edges "
                                   f"(/metrics on :{port}{remaining}; Ctrl-C stops)"))
    finally:
        traffic_stop.set()
        thread.join(10)
        emitter.close()
        result.events_sent = emitter.stats().sent
    with console.status("storing the last windows..."):
        _drain(port, result.events_sent, settings)


def _drain(port: int, sent: int, settings: Settings, timeout: float = 60.0) -> None:
    """Wait until the worker has every event sent and its last windows closed and stored."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            samples = _samples(port)
        except OSError:
            time.sleep(0.5)
            continue
        consumed = next((s.value for s in samples
                         if s.name.endswith("_events_consumed_total")), 0)
        if consumed >= sent:
            break
        time.sleep(0.5)
    # idle closing, then one or two sink rounds
    time.sleep(float(os.environ.get("COMMPIPE_IDLE_CLOSE_S", "3")) + 3 * settings.sink_interval_s)
