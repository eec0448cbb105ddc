"""Per-edge metrics for Prometheus, rendered from a snapshot of the worker's table.

A scrape has two halves so that it never stops the stream:

- :meth:`EdgeExporter.snapshot`, on the event loop: a list of the table's items and the
  partitions this worker owns (a few milliseconds at 10,000 edges). Stored values are
  never changed in place (a batch writes fresh copies), so the snapshot stays
  consistent while the loop goes on writing.
- :meth:`EdgeExporter.render_in_slices`, in the loop too, 10 ms at a time (or
  :meth:`EdgeExporter.render` at once): the exposition text. Each edge's lines are cached
  in two halves with the offsets of the state they came from, so a half that did not
  change since the last scrape costs a dictionary lookup.

Per edge (``source_service``, ``target_service``, ``protocol``), by default:

- counters since the edge's state began: ``<ns>_communication_requests_total``,
  ``..._responses_total``, ``..._errors_total{error_type}``, ``..._timeouts_total``,
  ``..._retries_total``, ``..._late_events_total``;
- ``..._latency_seconds``: a histogram over ``buckets`` (a subset of the stored bounds,
  :data:`DEFAULT_BUCKETS_S`: ten bounds from 5 ms to 10 s, +Inf, ``_sum``, ``_count``);
- over the edge's last closed window: ``..._latency_quantile_seconds{quantile}`` for
  0.5, 0.95 and 0.99 (the sketch's, within 1 %; no ``_count``/``_sum``: a window's
  count is not a counter) and ``..._error_ratio`` (0-1);
- ``..._circuit_state{state, source}``: 1 for the current state, 0 for the others,
  ``source`` = ``reported`` (circuit events, if the edge sends any) and ``derived``;
- ``<ns>_slo_ok`` / ``_slo_measured`` / ``_slo_threshold{objective}`` for each objective
  the last closed window judged.

That is 26 series for an edge with one error type, outcomes and no reported circuit,
plus 3 per objective judged (usually 3 objectives: 35 in all).

Counters never decrease within a process: when this worker loses one of the partitions
an edge spans, that partition's last totals stay in the edge's counters while the edge is
reported (a partition that comes back carries at least those totals).

The cardinality cap counts series (``max_series``): edges reported at the last scrape
keep their place while they are live, new edges are admitted newest first while the
budget allows; the others are refused now (``<ns>_exporter_edges_refused``), each
refusal counted once (``<ns>_exporter_edges_refused_total``) and logged once. Edges
without events for ``stale_s`` (worker clock) leave the output and the exporter's memory.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.core.edge import EdgeMeta, PartitionMeta
from pipeline.core.rollups import Rollups
from pipeline.core.slo import SloConfig, evaluate
from pipeline.core.store import SEP
from pipeline.core.totals import DEFAULT_BUCKETS_S, LATENCY_BUCKETS_S, EdgeTotals
from pipeline.core.window import WindowConfig, WindowStats
from pipeline.export.collectors import check_namespace

__all__ = ["QUANTILES", "EdgeExporter", "Snapshot"]

log = logging.getLogger("commpipe.exporter")

QUANTILES = (0.5, 0.95, 0.99)  # _lines writes three
STATES = ("closed", "open", "half_open")
Edge = tuple[str, str, str]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a scrape reads of the table, taken on the event loop."""

    items: list[tuple[str, Any]]
    owned: frozenset[int] | None
    """Partitions this worker owns now (None: all of them)."""
    now: float


@dataclass(slots=True)
class _Edge:
    parts: dict[int, EdgeMeta]
    """Owned partitions' state of the edge now."""
    windows: list[tuple[int, WindowStats]]


def _fmt(v: float) -> str:
    if type(v) is int:
        return str(v)
    if v != v:
        return "NaN"
    if v in (math.inf, -math.inf):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def _escape(value: str) -> str:
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return value


class EdgeExporter:
    """Per-edge metrics (see the module docstring)."""

    FAMILIES = ("requests", "responses", "timeouts", "retries", "late_events", "errors",
                "latency", "circuit",  # from the edge's state: _edge_lines
                "quantile", "ratio", "slo_ok", "slo_measured", "slo_threshold")  # _window_lines
    EDGE_FAMILIES = 8

    def __init__(self, rollups: Rollups, *, namespace: str = "commpipe",
                 stale_s: float = 300.0, max_series: int = 400_000,
                 buckets: Sequence[float] = DEFAULT_BUCKETS_S,
                 clock: Callable[[], float] = time.time, slo: SloConfig | None = None
                 ) -> None:
        self.rollups = rollups
        self.config: WindowConfig = rollups.config
        self.slo = slo or SloConfig()
        self.ns = check_namespace(namespace)
        self.stale_s = stale_s
        self.max_series = max_series
        self.buckets = tuple(buckets)
        self._index = [LATENCY_BUCKETS_S.index(b) for b in self.buckets]  # ValueError if not
        self._clock = clock
        self._lock = threading.Lock()
        # per edge: partition -> that partition's last (totals, late events, offset) seen
        self._kept: dict[Edge, dict[int, tuple[EdgeTotals, int, int]]] = {}
        # per edge: (version, lines, samples) of its state's half and of its window's half
        self._cache: dict[Edge, tuple[Any, tuple[str, ...], int]] = {}
        self._window_cache: dict[Edge, tuple[Any, tuple[str, ...], int]] = {}
        self._admitted: set[Edge] = set()
        self._refused: set[Edge] = set()
        self.refusals = 0
        self._bounds = [(repr(b), i) for b, i in zip(self.buckets, self._index, strict=True)]
        self._quantiles = [repr(q) for q in QUANTILES]
        self._parsed: dict[str, tuple[str, int, Edge | None]] = {}
        p = f"{self.ns}_communication"
        self._heads = {
            "requests": (f"{p}_requests_total", "counter", "Requests sent"),
            "responses": (f"{p}_responses_total", "counter", "Responses received"),
            "timeouts": (f"{p}_timeouts_total", "counter", "Calls that timed out"),
            "retries": (f"{p}_retries_total", "counter", "Retries"),
            "late_events": (f"{p}_late_events_total", "counter",
                            "Events past their window's grace"),
            "errors": (f"{p}_errors_total", "counter", "Failed calls by error type"),
            "latency": (f"{p}_latency_seconds", "histogram",
                        "Call latency (responses, errors, timeouts)"),
            "quantile": (f"{p}_latency_quantile_seconds", "summary",
                         "Latency quantiles (1 %) over the last closed window"),
            "ratio": (f"{p}_error_ratio", "gauge",
                      "(errors + timeouts) / outcomes over the last closed window"),
            "circuit": (f"{p}_circuit_state", "gauge", "1 for the circuit's current state"),
            "slo_ok": (f"{self.ns}_slo_ok", "gauge",
                       "1 when the objective held over the last closed window"),
            "slo_measured": (f"{self.ns}_slo_measured", "gauge",
                             "The objective's measure over the last closed window "
                             "(ms, or a 0-1 ratio for delivery_success)"),
            "slo_threshold": (f"{self.ns}_slo_threshold", "gauge",
                              "The objective's threshold (same unit as measured)"),
        }
        self._names = [self._heads[f][0] for f in self.FAMILIES]

    # ---- on the event loop ----------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """The table's items and the owned partitions, now (cheap: run it on the loop)."""
        items, owned = self.rollups.snapshot()
        return Snapshot(items, owned, self._clock())

    # ---- rendering -------------------------------------------------------------------------

    def render(self, snapshot: Snapshot) -> bytes:
        """The exposition text (Prometheus 0.0.4) of ``snapshot``, at once."""
        with self._lock:
            steps = self._render(snapshot)
            while True:
                try:
                    next(steps)
                except StopIteration as done:
                    return done.value  # type: ignore[no-any-return]

    async def render_in_slices(self, snapshot: Snapshot, slice_s: float = 0.01
                               ) -> tuple[bytes, float]:
        """:meth:`render` in the event loop, giving it back every ``slice_s`` seconds; the
        text and the seconds of rendering (the loop's time spent on it)."""
        import asyncio

        with self._lock:
            steps = self._render(snapshot)
            spent = 0.0
            while True:
                began = time.perf_counter()
                try:
                    while time.perf_counter() - began < slice_s:
                        next(steps)
                except StopIteration as done:
                    return done.value, spent + time.perf_counter() - began
                spent += time.perf_counter() - began
                await asyncio.sleep(0)

    def scrape(self) -> bytes:
        """Snapshot and render in the caller's thread (tests, tools)."""
        return self.render(self.snapshot())

    def _render(self, snap: Snapshot) -> Iterator[None]:
        """Yields between pieces of work (a few hundred microseconds each); returns the
        text."""
        edges, parts = yield from self._group(snap)
        live = self._live(edges, snap.now)
        halves: dict[Edge, tuple[tuple[str, ...], tuple[str, ...]]] = {}
        sizes: dict[Edge, int] = {}
        cache: dict[Edge, tuple[Any, tuple[str, ...], int]] = {}
        window_cache: dict[Edge, tuple[Any, tuple[str, ...], int]] = {}
        for i, (edge, (_, state)) in enumerate(live.items()):
            if not i % 16:
                yield
            version, window_version, closed = self._version(edge, state, parts, snap.now)
            hit = self._cache.get(edge)
            if hit is None or hit[0] != version:
                hit = (version, *self._edge_lines(edge, state))
            whit = self._window_cache.get(edge)
            if whit is None or whit[0] != window_version:
                whit = (window_version, *self._window_lines(edge, closed))
            cache[edge], window_cache[edge] = hit, whit
            halves[edge], sizes[edge] = (hit[1], whit[1]), hit[2] + whit[2]
        self._cache, self._window_cache = cache, window_cache
        reported = self._admit(live, sizes)
        out: list[str] = []
        for i, family in enumerate(self.FAMILIES):
            name, kind, text = self._heads[family]
            out.append(f"# HELP {name} {text}\n# TYPE {name} {kind}\n")
            half, at = (0, i) if i < self.EDGE_FAMILIES else (1, i - self.EDGE_FAMILIES)
            out.extend(halves[e][half][at] for e in reported)
            yield
        ns = self.ns
        refused = len(live) - len(reported)
        out.append(f"# HELP {ns}_exporter_edges Edges reported\n# TYPE {ns}_exporter_edges "
                   f"gauge\n{ns}_exporter_edges {len(reported)}\n")
        out.append(f"# HELP {ns}_exporter_series Per-edge series reported\n"
                   f"# TYPE {ns}_exporter_series gauge\n"
                   f"{ns}_exporter_series {sum(sizes[e] for e in reported)}\n")
        out.append(f"# HELP {ns}_exporter_edges_refused Live edges left out now over the "
                   f"series cap\n# TYPE {ns}_exporter_edges_refused gauge\n"
                   f"{ns}_exporter_edges_refused {refused}\n")
        out.append(f"# HELP {ns}_exporter_edges_refused_total Times an edge was left out over "
                   f"the series cap\n# TYPE {ns}_exporter_edges_refused_total counter\n"
                   f"{ns}_exporter_edges_refused_total {self.refusals}\n")
        return "".join(out).encode()

    def _group(self, snap: Snapshot
               ) -> Iterator[None] | Any:  # a generator returning (edges, partitions)
        edges: dict[Edge, _Edge] = {}
        parts: dict[int, PartitionMeta] = {}
        owned = snap.owned
        known, parsed = self._parsed, {}
        for i, (key, value) in enumerate(snap.items):
            if not i % 1024:
                yield
            kind = key[0]
            if kind == "d":
                continue
            entry = known.get(key)
            if entry is None:
                fields = key.split(SEP)
                edge = tuple(fields[2].split("\x1f")) if kind != "p" else None
                entry = (kind, int(fields[1]), edge)  # type: ignore[assignment]
            parsed[key] = entry
            _, partition, edge = entry
            if owned is not None and partition not in owned:
                continue
            if edge is None:
                parts[partition] = value
                continue
            state = edges.get(edge)
            if state is None:
                state = edges[edge] = _Edge({}, [])
            if kind == "e":
                state.parts[partition] = value
            else:
                state.windows.append((partition, value))
        self._parsed = parsed  # the keys of this snapshot only
        return edges, parts

    def _live(self, edges: dict[Edge, _Edge], now: float
              ) -> dict[Edge, tuple[float, _Edge]]:
        """Edges seen within ``stale_s`` (state written before last_seen existed: kept),
        with their last_seen; forgets what the exporter kept of the others."""
        live: dict[Edge, tuple[float, _Edge]] = {}
        for edge, state in edges.items():
            if not state.parts:
                continue
            seen = max((m.last_seen for m in state.parts.values() if m.last_seen is not None),
                       default=math.inf)
            if seen != math.inf and now - seen > self.stale_s:
                continue
            live[edge] = (seen, state)
        for gone in self._kept.keys() - live.keys():
            del self._kept[gone]
        return live

    def _version(self, edge: Edge, state: _Edge, parts: dict[int, PartitionMeta], now: float
                 ) -> tuple[Any, Any, list[tuple[int, WindowStats]]]:
        """What each half of the edge's lines depends on (the offsets of its state, and of
        its last closed window), and that window's rows; keeps the owned partitions'
        totals."""
        kept = self._kept.setdefault(edge, {})
        for partition, meta in state.parts.items():
            old = kept.get(partition)
            if old is None or old[2] != meta.offset:
                kept[partition] = (meta.totals, meta.late_events, meta.offset)
        grace, idle = self.config.grace_s, self.rollups.idle_close_s
        closed_start, closed = -math.inf, []
        for partition, stats in state.windows:
            pmeta = parts.get(partition)
            if pmeta is None or not (
                    stats.window_end + grace <= pmeta.watermark
                    or (pmeta.last_seen is not None and now - pmeta.last_seen >= idle)):
                continue
            if stats.window_start > closed_start:
                closed_start, closed = stats.window_start, [(partition, stats)]
            elif stats.window_start == closed_start:
                closed.append((partition, stats))
        if len(kept) == 1 and len(closed) <= 1:  # the usual edge: one partition
            (p, (_, _, offset)), = kept.items()
            return (p, offset), (closed[0][0], closed[0][1].offset) if closed else None, closed
        version = (tuple(sorted((p, v[2]) for p, v in kept.items())),
                   tuple(sorted((p, meta.offset) for p, meta in state.parts.items())))
        return version, (closed_start, tuple(sorted((p, s.offset) for p, s in closed))), closed

    @staticmethod
    def _labels(edge: Edge) -> str:
        return (f'source_service="{_escape(edge[0])}",target_service="{_escape(edge[1])}",'
                f'protocol="{_escape(edge[2])}"')

    def _edge_lines(self, edge: Edge, state: _Edge) -> tuple[tuple[str, ...], int]:
        """The edge's counters (every partition it had here), histogram and circuit: one
        string per family of the first :attr:`EDGE_FAMILIES`, and their sample count."""
        kept = self._kept[edge]
        if len(kept) == 1:
            (t, late, _), = kept.values()
        else:
            t, late = EdgeTotals(), 0
            for totals, n, _ in kept.values():
                t.merge(totals)
                late += n
        meta = max(state.parts.values(), key=lambda m: m.last_ts or -math.inf)
        n = self._names
        lab = self._labels(edge)
        errors = "".join(f'{n[5]}{{{lab},error_type="{_escape(k)}"}} {c}\n'
                         for k, c in sorted(t.errors.items()))
        counts, below, at = t.buckets, 0, 0
        hist = []
        for bound, index in self._bounds:
            while at <= index:
                below += counts[at]
                at += 1
            hist.append(f'{n[6]}_bucket{{{lab},le="{bound}"}} {below}\n')
        total = below + sum(counts[at:])
        hist.append(f'{n[6]}_bucket{{{lab},le="+Inf"}} {total}\n{n[6]}_count{{{lab}}} {total}\n'
                    f"{n[6]}_sum{{{lab}}} {t.latency_sum_ms / 1000.0!r}\n")
        circuit = []
        for source, now in (("reported", meta.reported.state if meta.reported else None),
                            ("derived", meta.derived.track.state)):
            if now is not None:
                circuit.extend(f'{n[7]}{{{lab},state="{s}",source="{source}"}} '
                               f'{1 if s == now else 0}\n' for s in STATES)
        return ((f"{n[0]}{{{lab}}} {t.requests}\n", f"{n[1]}{{{lab}}} {t.responses}\n",
                 f"{n[2]}{{{lab}}} {t.timeouts}\n", f"{n[3]}{{{lab}}} {t.retries}\n",
                 f"{n[4]}{{{lab}}} {late}\n", errors, "".join(hist), "".join(circuit)),
                8 + len(t.errors) + len(self._bounds) + len(circuit))

    def _window_lines(self, edge: Edge, closed: list[tuple[int, WindowStats]]
                      ) -> tuple[tuple[str, ...], int]:
        """The edge's last closed window (merged over partitions): quantiles, error ratio
        and objectives, one string per family after :attr:`EDGE_FAMILIES`."""
        if not closed:
            return ("", "", "", "", ""), 0
        window = closed[0][1]
        if len(closed) > 1:
            window = WindowStats(window.window_start, window.window_end)
            for _, stats in closed:
                window.merge(stats)
        n = self._names
        lab = self._labels(edge)
        quantile, size = "", 0
        sketch = window.latency
        if sketch.count:
            v = sketch.quantiles(QUANTILES)  # latencies: finite, >= 0
            q = self._quantiles
            quantile = (f'{n[8]}{{{lab},quantile="{q[0]}"}} {v[0] / 1000.0!r}\n'
                        f'{n[8]}{{{lab},quantile="{q[1]}"}} {v[1] / 1000.0!r}\n'
                        f'{n[8]}{{{lab},quantile="{q[2]}"}} {v[2] / 1000.0!r}\n')
            size = len(QUANTILES)
        results = evaluate(edge, window, self.slo.for_edge(edge))
        ok = "".join(f'{n[10]}{{{lab},objective="{r.objective}"}} {1 if r.ok else 0}\n'
                     for r in results)
        measured = "".join(f'{n[11]}{{{lab},objective="{r.objective}"}} {_fmt(r.measured)}\n'
                           for r in results)
        threshold = "".join(f'{n[12]}{{{lab},objective="{r.objective}"}} '
                            f"{_fmt(r.threshold)}\n" for r in results)
        return ((quantile, f"{n[9]}{{{lab}}} {window.error_rate!r}\n", ok, measured, threshold),
                size + 1 + 3 * len(results))

    def _admit(self, live: dict[Edge, tuple[float, _Edge]], sizes: dict[Edge, int]
               ) -> list[Edge]:
        """The edges reported, sorted: the cap counts series (see the module docstring)."""
        order = sorted(live, key=lambda e: (e not in self._admitted, -live[e][0], e))
        budget, reported, refused = self.max_series, [], set()
        for edge in order:
            if sizes[edge] <= budget:
                budget -= sizes[edge]
                reported.append(edge)
            else:
                refused.add(edge)
        for edge in sorted(refused - self._refused):
            self.refusals += 1
            log.warning("exporter: edge %s -> %s (%s) left out of /metrics: its %d series "
                        "would pass COMMPIPE_METRICS_MAX_SERIES=%d", *edge, sizes[edge],
                        self.max_series)
        self._refused = refused
        self._admitted = set(reported)
        reported.sort()
        return reported

