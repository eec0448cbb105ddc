"""Per-edge metrics for Prometheus, rendered from the worker's table.

:meth:`EdgeExporter.render` turns a :class:`Snapshot` of the table (its items and the
partitions this worker owns) into the exposition text, and returns beside it what the
render changed of the exporter's own state (:class:`Outcome`: which edges the series cap
admits, which it refused); :meth:`EdgeExporter.absorb` applies that. The two are apart so
that the render can run in a forked copy of the worker (:mod:`pipeline.export.exposition`)
and only the small outcome comes back.

Per edge (``source_service``, ``target_service``, ``protocol``): counters since the edge's
state began, a latency histogram, and gauges over its last closed window (quantiles, error
ratio, objectives) and of its circuit: :mod:`pipeline.export.text` lists them.

Counters never decrease within a process: when this worker gives up a partition an edge
spans (:meth:`EdgeExporter.retire`, called as partitions are revoked), that partition's
last totals stay in the edge's counters while the edge is reported here; a partition that
comes back carries at least those totals and replaces them.

The cardinality cap counts series (``max_series``): edges reported at the last scrape
keep their place while they are live, new edges are admitted newest first while the
budget allows; the others are refused now (``<ns>_exporter_edges_refused``), each
refusal counted once (``<ns>_exporter_edges_refused_total``) and logged once. Edges
without events for ``stale_s`` (worker clock) leave the output.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.core.edge import EdgeMeta, PartitionMeta
from pipeline.core.rollups import Rollups
from pipeline.core.slo import SloConfig, evaluate
from pipeline.core.store import SEP, partition_id
from pipeline.core.totals import DEFAULT_BUCKETS_S, EdgeTotals
from pipeline.core.window import WindowConfig, WindowStats
from pipeline.export.collectors import check_namespace
from pipeline.export.text import QUANTILES, Row, Text, labels

__all__ = ["QUANTILES", "EdgeExporter", "Outcome", "Snapshot"]

log = logging.getLogger("commpipe.exporter")

Edge = tuple[str, str, str]
Kept = tuple[EdgeTotals, int, int]
"""A partition's totals of an edge, its late events, and the offset they are at."""
Forget = tuple[Edge, int, int]
"""A retired (edge, partition, offset) no longer needed."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a scrape reads: the table (unchanged while the render reads it: the render runs
    in the event loop between two of its steps, or in a forked copy of the worker)."""

    store: Mapping[str, Any]
    owns: Callable[[int], bool]
    """Whether this worker owns a source partition (its partitions with a partition state
    in the store are reported)."""
    now: float


@dataclass(slots=True)
class Outcome:
    """What one render changes of the exporter's state (small: it crosses processes)."""

    admitted: set[Edge] | None
    """The edges reported (None: the same as before)."""
    refused: set[Edge]
    new_refusals: list[tuple[Edge, int]]
    """Edges refused now that were not at the last render, with their series."""
    forget: list[tuple[Edge, int, int]]
    """Retired (edge, partition, offset) no longer needed: the edge left, or the partition
    came back with its state."""
    series: int
    """Per-edge series reported."""


@dataclass(slots=True)
class _Edge:
    name: str
    """The edge as the table's keys write it."""
    parts: dict[int, EdgeMeta] = field(default_factory=dict)
    """Owned partitions' state of the edge now."""


@dataclass(slots=True)
class Plan:
    """What a render found before it makes the edges' rows (:meth:`EdgeExporter.plan`)."""

    store: Mapping[str, Any]
    live: dict[Edge, tuple[float, _Edge]]
    """The edges reported unless the cap refuses them, with their last_seen."""
    closes: dict[int, tuple[float, float, bool]]
    """Per partition: its watermark, the watermark less the grace, and whether idleness
    closed all its windows."""
    forget: list[Forget]


_P95 = QUANTILES.index(0.95)
PROBES = 4
"""Window slots looked up per (partition, edge) from the newest that can be closed, before
the edge's windows are looked for by a pass over the table (see ``_closed``)."""


class EdgeExporter:
    """Per-edge metrics (see the module docstring)."""

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
        self._clock = clock
        self._lock = threading.Lock()
        self._retired: dict[Edge, dict[int, Kept]] = {}
        """Per edge: partition given up -> its last totals (see :meth:`retire`)."""
        self._admitted: set[Edge] = set()
        self._refused: set[Edge] = set()
        self.refusals = 0
        self.text = Text(self.ns, self.buckets)

    # ---- on the event loop ----------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """The table, which partitions this worker owns, and the time, now."""
        return Snapshot(self.rollups.data(), self.rollups.owns, self._clock())

    def retire(self, partitions: Iterable[int]) -> None:
        """``partitions`` are being given up (call it before they leave the table): keep
        their edges' last totals, so that the counters of an edge that spans them and
        others owned here do not go down."""
        mine = set(partitions)
        if not mine:
            return
        kept: list[tuple[Edge, int, Kept]] = []
        store = self.rollups.data()
        for key in store:
            if key[0] != "e":
                continue
            _, partition, edge = key.split(SEP, 2)
            if int(partition) in mine:
                meta = store[key]
                kept.append((tuple(edge.split("\x1f")), int(partition),  # type: ignore[arg-type]
                             (meta.totals, meta.late_events, meta.offset)))
        with self._lock:
            for edge, partition, value in kept:
                self._retired.setdefault(edge, {})[partition] = value

    # ---- rendering -------------------------------------------------------------------------

    def scrape(self) -> bytes:
        """Snapshot, render and absorb in the caller's thread (tests, tools)."""
        body, outcome = self.render(self.snapshot())
        self.absorb(outcome)
        return body

    def absorb(self, outcome: Outcome) -> None:
        """Apply what a render found (in any thread; logs the new refusals)."""
        with self._lock:
            for edge, size in outcome.new_refusals:
                self.refusals += 1
                log.warning("exporter: edge %s -> %s (%s) left out of /metrics: its %d series "
                            "would pass COMMPIPE_METRICS_MAX_SERIES=%d", *edge, size,
                            self.max_series)
            self._refused = outcome.refused
            if outcome.admitted is not None:
                self._admitted = outcome.admitted
            for edge, partition, offset in outcome.forget:
                kept = self._retired.get(edge)
                if kept is not None and partition in kept and kept[partition][2] == offset:
                    del kept[partition]
                    if not kept:
                        del self._retired[edge]

    def render(self, snap: Snapshot) -> tuple[bytes, Outcome]:
        """The exposition text (Prometheus 0.0.4) of ``snap``, and what it changes of the
        exporter's state (not applied: :meth:`absorb`)."""
        pieces, outcome = self.render_pieces(snap)
        return "".join(pieces).encode(), outcome  # type: ignore[arg-type] - one process: str

    def render_pieces(self, snap: Snapshot) -> tuple[Iterator[str | bytes], Outcome]:
        """:meth:`render`'s text in pieces (a family's head, a thousand edges' lines of it,
        ...), made as they are taken: a writer that sends each before taking the next
        never holds more than one (36 MB at 10,000 edges, whole). The outcome is known
        before the first piece.

        Column by column: a pass over the live edges gathers each one's values, then each
        family's lines are formatted over whole columns (one ``%`` per piece). The phases
        (:meth:`plan`, :meth:`rows`, :meth:`admit`, :meth:`assemble`) are apart so that
        the rows of a part of the edges can be made in another process
        (:mod:`pipeline.export.split`)."""
        return self.pieces_of(self.plan(snap))

    def pieces_of(self, plan: Plan) -> tuple[Iterator[str | bytes], Outcome]:
        """:meth:`render_pieces` from its :meth:`plan`."""
        edges = list(plan.live)
        rows, forget = self.rows(plan, edges)
        reported, outcome = self.admit(plan, dict(zip(edges, (r.size for r in rows),
                                                      strict=True)), forget)
        by_edge = dict(zip(edges, rows, strict=True))
        return self.assemble([self.text.chunks([by_edge[e] for e in reported])],
                             len(reported), plan, outcome), outcome

    def plan(self, snap: Snapshot) -> Plan:
        """The live edges of ``snap`` and what finding their closed windows needs."""
        edges, parts = self._group(snap)
        forget: list[tuple[Edge, int, int]] = []
        live = self._live(edges, snap.now, forget)
        idle = self.rollups.idle_close_s
        closes = {p: (m.watermark, m.watermark - self.config.grace_s,
                      m.last_seen is not None and snap.now - m.last_seen >= idle)
                  for p, m in parts.items()}
        return Plan(snap.store, live, closes, forget)

    def rows(self, plan: Plan, edges: Sequence[Edge]) -> tuple[list[Row], list[Forget]]:
        """The rows of ``edges`` (live ones of ``plan``), and the retired totals they found
        no longer needed."""
        live = plan.live
        some = live if len(edges) == len(live) else {e: live[e] for e in edges}
        closed = self._closed(some, plan.store, plan.closes)
        forget: list[Forget] = []
        return [self._row(e, live[e][1], closed.get(e), forget) for e in edges], forget

    def admit(self, plan: Plan, sizes: Mapping[Edge, int], forget: list[Forget]
              ) -> tuple[list[Edge], Outcome]:
        """The edges reported (sorted) given every live edge's series, and the outcome
        (``forget``: what :meth:`rows` found, beside the plan's own)."""
        return self._admit(plan.live, sizes, plan.forget + forget)

    def assemble(self, parts: Sequence[Iterator[Iterable[str | bytes]]], reported: int,
                 plan: Plan, outcome: Outcome) -> Iterator[str | bytes]:
        """The text: each family's head, then that family's pieces from each of ``parts``
        (one per run of consecutive reported edges, in order: each an iterator over the
        families, in :attr:`Text.FAMILIES` order, of iterables of pieces), then the
        exporter's own series."""
        for head in self.text.heads():
            yield head
            for part in parts:
                yield from next(part)
        yield self.text.own(reported, outcome.series, len(plan.live) - reported,
                            self.refusals + len(outcome.new_refusals))

    def _group(self, snap: Snapshot) -> tuple[dict[Edge, _Edge], dict[int, PartitionMeta]]:
        """The reported partitions' edge states by edge, and partition states (windows are
        looked up later, only the one each edge reports). One pass over the table's keys
        finds both: the reported partitions are those owned with a partition state."""
        store = snap.store
        found: dict[str, list[tuple[str, str]]] = {}  # partition as keys write it -> edges
        present: list[int] = []
        for key in store:
            kind = key[0]
            if kind == "e":
                _, p, name = key.split(SEP, 2)
                edges = found.get(p)
                if edges is None:
                    edges = found[p] = []
                edges.append((name, key))
            elif kind == "p":
                present.append(int(key[2:]))
        owns = snap.owns
        parts = {p: store[partition_id(p)] for p in present if owns(p)}
        by_name: dict[str, _Edge] = {}
        for p, edges in found.items():
            partition = int(p)
            if partition not in parts:
                continue
            for name, key in edges:
                state = by_name.get(name)
                if state is None:
                    state = by_name[name] = _Edge(name)
                state.parts[partition] = store[key]
        return {tuple(name.split("\x1f")): state  # type: ignore[misc]
                for name, state in by_name.items()}, parts

    def _live(self, edges: dict[Edge, _Edge], now: float,
              forget: list[tuple[Edge, int, int]]) -> dict[Edge, tuple[float, _Edge]]:
        """Edges seen within ``stale_s`` (state written before last_seen existed: kept),
        with their last_seen; the retired totals of the others go into ``forget``."""
        live: dict[Edge, tuple[float, _Edge]] = {}
        stale_s, inf = self.stale_s, math.inf
        for edge, state in edges.items():
            metas = state.parts
            if len(metas) == 1:
                meta, = metas.values()
                seen = inf if meta.last_seen is None else meta.last_seen
            elif metas:
                seen = max((m.last_seen for m in metas.values() if m.last_seen is not None),
                           default=inf)
            else:
                continue
            if seen != inf and now - seen > stale_s:
                continue
            live[edge] = (seen, state)
        for edge in self._retired.keys() - live.keys():
            forget.extend((edge, p, v[2]) for p, v in self._retired[edge].items())
        return live

    def _closed(self, live: dict[Edge, tuple[float, _Edge]], store: Mapping[str, Any],
                closes: dict[int, tuple[float, float, bool]]
                ) -> dict[Edge, list[tuple[int, WindowStats]]]:
        """Each edge's last closed window, one (partition, stats) per partition holding it
        (partitions descending). ``closes``: per owned partition, its watermark, the
        watermark less the grace (a window ending by then is closed), and whether idleness
        closed all its windows.

        A window's start is a multiple of the window size no later than its partition's
        watermark (late events count in the watermark's window), so each (partition, edge)
        looks up the slots from the newest that can be closed, down ``PROBES`` of them; the
        windows of the few it does not find so are looked for in one pass over the table."""
        size = self.config.size_s
        # per partition: its keys' prefix, and the slots to look up (each key's suffix and
        # the window's start), newest first; none without event time yet
        plans: dict[int, tuple[str, list[tuple[str, float]], float, bool]] = {}
        for partition, (watermark, limit, idle) in closes.items():
            slots: list[tuple[str, float]] = []
            if math.isfinite(limit):
                top = math.floor(watermark / size)
                if not idle:
                    top = min(top, math.floor(limit / size))
                slots = [(f"{SEP}{start!r}", start) for start in
                         (float(k * size) for k in range(top, top - PROBES, -1))]
            plans[partition] = (f"w{SEP}{partition}{SEP}", slots, limit, idle)
        get = store.get
        newest: dict[tuple[Edge, int], tuple[float, WindowStats]] = {}
        wanted: dict[str, tuple[Edge, int]] = {}
        for edge, (_, state) in live.items():
            name = state.name
            for partition in state.parts:
                prefix, slots, limit, idle = plans[partition]
                head = prefix + name
                for suffix, start in slots:
                    stats = get(head + suffix)
                    if stats is not None and (idle or stats.window_end <= limit):
                        newest[edge, partition] = (start, stats)
                        break
                else:  # not in its slots (or no event time yet): looked for in the pass
                    wanted[head] = (edge, partition)
        if wanted:
            for key in store:
                if key[0] != "w":
                    continue
                head, _, text = key.rpartition(SEP)
                found = wanted.get(head)
                if found is None:
                    continue
                start, stats = float(text), store[key]
                _, limit, idle = closes[found[1]]
                if (idle or stats.window_end <= limit) and start > newest.get(
                        found, (-math.inf,))[0]:
                    newest[found] = (start, stats)
        best: dict[Edge, float] = {}
        out: dict[Edge, list[tuple[int, WindowStats]]] = {}
        for (edge, partition), (start, stats) in newest.items():
            if start > best.get(edge, -math.inf):
                best[edge] = start
                out[edge] = [(partition, stats)]
            elif start == best[edge]:
                out[edge].append((partition, stats))
        for closed in out.values():
            if len(closed) > 1:
                closed.sort(key=lambda ps: -ps[0])
        return out

    def _totals(self, edge: Edge, state: _Edge, forget: list[tuple[Edge, int, int]]
                ) -> tuple[EdgeTotals, int]:
        """The edge's totals over its owned partitions and those it retired."""
        retired = self._retired.get(edge)
        if not retired and len(state.parts) == 1:
            meta, = state.parts.values()
            return meta.totals, meta.late_events
        kept = {p: (m.totals, m.late_events) for p, m in state.parts.items()}
        for partition, (totals, late, offset) in (retired or {}).items():
            meta = state.parts.get(partition)
            if meta is not None and meta.offset >= offset:  # back with its state
                forget.append((edge, partition, offset))
            else:  # elsewhere (or back behind what it had here)
                kept[partition] = (totals, late)
        t, late = EdgeTotals(), 0
        for totals, n in kept.values():
            t.merge(totals)
            late += n
        return t, late

    def _row(self, edge: Edge, state: _Edge, closed: list[tuple[int, WindowStats]] | None,
             forget: list[tuple[Edge, int, int]]) -> Row:
        """What the edge's lines show, and how many series they are."""
        t, late = self._totals(edge, state, forget)
        lab = labels(edge)
        metas = state.parts
        meta = (next(iter(metas.values())) if len(metas) == 1 else
                max(metas.values(), key=lambda m: m.last_ts or -math.inf))
        circuit: tuple[tuple[str, str], ...] = ()
        if meta.reported is not None and meta.reported.state is not None:
            circuit = (("reported", meta.reported.state),)
        derived = meta.derived.track.state
        if derived is not None:
            circuit += (("derived", derived),)
        size = 5 + len(t.errors) + self.text.hist_size + 3 * len(circuit)
        if not closed:
            return Row(lab, t, late, circuit, size)
        window = closed[0][1]
        if len(closed) > 1:
            window = WindowStats(window.window_start, window.window_end)
            for _, stats in closed:
                window.merge(stats)
        quantiles = window.latency.quantiles(QUANTILES)
        results = evaluate(edge, window, self.slo.for_edge(edge),
                           p95=quantiles[_P95] if quantiles else None)
        return Row(lab, t, late, circuit, size + len(quantiles) + 1 + 3 * len(results),
                    window, quantiles, results)

    def _admit(self, live: dict[Edge, tuple[float, _Edge]], sizes: Mapping[Edge, int],
               forget: list[Forget]) -> tuple[list[Edge], Outcome]:
        """The edges reported, sorted: the cap counts series (see the module docstring)."""
        admitted = self._admitted
        budget, reported, refused = self.max_series, [], set()
        total = sum(sizes.values())
        if total <= budget:  # all fit: no order of precedence needed
            budget -= total
            reported = list(live)
        else:
            for edge in sorted(live, key=lambda e: (e not in admitted, -live[e][0], e)):
                size = sizes[edge]
                if size <= budget:
                    budget -= size
                    reported.append(edge)
                else:
                    refused.add(edge)
        new = [(edge, sizes[edge]) for edge in sorted(refused - self._refused)]
        now = set(reported)
        outcome = Outcome(None if now == admitted else now, refused, new, forget,
                          self.max_series - budget)
        reported.sort()
        return reported, outcome
