"""The exposition text of per-edge metrics: family heads, and each family's lines over
every reported edge at once (a ``%``-template of one edge's lines, repeated for every
edge and filled in one ``%``: the formatting runs in C; the Python per edge is
:class:`pipeline.export.edges.EdgeExporter`'s gathering of values into :class:`Row`).

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
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import accumulate, chain, repeat
from operator import attrgetter, itemgetter, truediv

from pipeline.core.slo import Result
from pipeline.core.totals import LATENCY_BUCKETS_S, EdgeTotals
from pipeline.core.window import WindowStats

__all__ = ["QUANTILES", "Row", "Text", "labels"]

QUANTILES = (0.5, 0.95, 0.99)  # Text.quantile writes three
STATES = ("closed", "open", "half_open")


@dataclass(slots=True)
class Row:
    """One edge's values as its lines show them."""

    lab: str
    totals: EdgeTotals
    late: int
    circuit: tuple[tuple[str, str], ...]
    """The circuit's (source, state) as reported, then derived (none, one or both)."""
    size: int
    window: WindowStats | None = None
    """The last closed window (merged over partitions), if any."""
    quantiles: list[float] = field(default_factory=list)
    results: list[Result] = field(default_factory=list)


@lru_cache(maxsize=1 << 14, typed=True)
def _fmt(v: float) -> str:
    """A sample value as the exposition writes it (the same text as ``%r`` for a finite
    float). Cached: a scrape writes few distinct gauge values many times (quantiles are
    sketch bucket values, thresholds are the objectives', most error ratios are 0)."""
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


def labels(edge: tuple[str, str, str]) -> str:
    return (f'source_service="{_escape(edge[0])}",target_service="{_escape(edge[1])}",'
            f'protocol="{_escape(edge[2])}"')


class Text:
    """The templates of one namespace and histogram bounds."""

    FAMILIES = ("requests", "responses", "timeouts", "retries", "late_events", "errors",
                "latency", "circuit", "quantile", "ratio", "slo_ok", "slo_measured",
                "slo_threshold")

    def __init__(self, namespace: str, buckets: Sequence[float]) -> None:
        self.ns = namespace
        p = f"{namespace}_communication"
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
            "circuit": (f"{p}_circuit_state", "gauge", "1 for the circuit's current state"),
            "quantile": (f"{p}_latency_quantile_seconds", "summary",
                         "Latency quantiles (1 %) over the last closed window"),
            "ratio": (f"{p}_error_ratio", "gauge",
                      "(errors + timeouts) / outcomes over the last closed window"),
            "slo_ok": (f"{namespace}_slo_ok", "gauge",
                       "1 when the objective held over the last closed window"),
            "slo_measured": (f"{namespace}_slo_measured", "gauge",
                             "The objective's measure over the last closed window "
                             "(ms, or a 0-1 ratio for delivery_success)"),
            "slo_threshold": (f"{namespace}_slo_threshold", "gauge",
                              "The objective's threshold (same unit as measured)"),
        }
        n = [self._heads[f][0] for f in self.FAMILIES]
        self.names = n
        # %-templates of one edge's lines of a family, %s the edge's labels: a family is
        # one ``%`` over the template repeated for every edge (see _lines)
        self.simple = [f"{name}{{%s}} %s\n" for name in n[:5]]
        self.hist = "".join(f'{n[6]}_bucket{{%s,le="{b!r}"}} %s\n' for b in buckets)
        self.hist += (f'{n[6]}_bucket{{%s,le="+Inf"}} %s\n{n[6]}_count{{%s}} %s\n'
                      f"{n[6]}_sum{{%s}} %r\n")
        self.index = [LATENCY_BUCKETS_S.index(b) for b in buckets]  # ValueError if not
        self.hist_size = len(buckets) + 3
        self.quantile = "".join(f'{n[8]}{{%s,quantile="{q!r}"}} %s\n' for q in QUANTILES)
        self.ratio = f"{n[9]}{{%s}} %s\n"
        self.slo = [f'{name}{{%s,objective="%s"}} %s\n' for name in n[10:13]]
        self.errors = f'{n[5]}{{%s,error_type="%s"}} %s\n'
        self.circuit = "".join(f'{n[7]}{{%s,state="{state}",source="%s"}} %s\n'
                               for state in STATES)

    def heads(self) -> list[str]:
        """Each family's ``# HELP`` and ``# TYPE`` lines, in :attr:`FAMILIES` order."""
        return [f"# HELP {name} {about}\n# TYPE {name} {kind}\n"
                for name, kind, about in (self._heads[f] for f in self.FAMILIES)]

    def own(self, edges: int, series: int, refused: int, refusals: int) -> str:
        """The exporter's own series: edges and series reported, edges refused now, and
        refusals since the start."""
        ns = self.ns
        return (f"# HELP {ns}_exporter_edges Edges reported\n# TYPE {ns}_exporter_edges "
                f"gauge\n{ns}_exporter_edges {edges}\n"
                f"# HELP {ns}_exporter_series Per-edge series reported\n"
                f"# TYPE {ns}_exporter_series gauge\n{ns}_exporter_series {series}\n"
                f"# HELP {ns}_exporter_edges_refused Live edges left out now over the "
                f"series cap\n# TYPE {ns}_exporter_edges_refused gauge\n"
                f"{ns}_exporter_edges_refused {refused}\n"
                f"# HELP {ns}_exporter_edges_refused_total Times an edge was left out over "
                f"the series cap\n# TYPE {ns}_exporter_edges_refused_total counter\n"
                f"{ns}_exporter_edges_refused_total {refusals}\n")

    def families(self, rows: list[Row]) -> list[str]:
        """Each family's lines over ``rows`` (in :attr:`FAMILIES` order)."""
        return [_lines(template, *columns) for template, columns in self.columns(rows)]

    def chunks(self, rows: list[Row], size: int = 1024) -> Iterator[Iterator[str]]:
        """Each family's lines over ``rows`` (in :attr:`FAMILIES` order), each written
        ``size`` lines' groups at a time: a writer that sends each piece before the next
        is made reuses the memory of the last one, where whole families would take new
        pages for 36 MB at 10,000 edges (in a forked render, every page taken is a fault)."""
        for template, columns in self.columns(rows):
            yield (_lines(template, *[column[i:i + size] for column in columns])
                   for i in range(0, len(columns[0]), size))

    def columns(self, rows: list[Row]) -> list[tuple[str, list[list[object]]]]:
        """Each family's template (one edge's lines, or one error type's, circuit
        source's, objective's) and its columns (see :func:`_lines`) over ``rows``."""
        labs = [r.lab for r in rows]
        totals = [r.totals for r in rows]
        simple = self.simple
        out: list[tuple[str, list[list[object]]]] = [
            (simple[i], [labs, list(map(attrgetter(attr), totals))])
            for i, attr in enumerate(("requests", "responses", "timeouts", "retries"))]
        out.append((simple[4], [labs, [r.late for r in rows]]))
        errors = [(r.lab, k, c) for r in rows if r.totals.errors
                  for k, c in sorted(r.totals.errors.items())]
        out.append((self.errors, [[e[0] for e in errors], [_escape(e[1]) for e in errors],
                                  [e[2] for e in errors]]))
        cums = [list(accumulate(t.buckets)) for t in totals]
        columns: list[list[object]] = []
        for i in self.index:
            columns += (labs, list(map(itemgetter(i), cums)))
        counts = list(map(itemgetter(-1), cums))
        sums = list(map(truediv, map(attrgetter("latency_sum_ms"), totals), repeat(1000.0)))
        out.append((self.hist, [*columns, labs, counts, labs, counts, labs, sums]))
        circuits = [(r.lab, source, now) for r in rows for source, now in r.circuit]
        columns = []
        for state in STATES:
            columns += ([c[0] for c in circuits], [c[1] for c in circuits],
                        [1 if c[2] == state else 0 for c in circuits])
        out.append((self.circuit, columns))
        windowed = [r for r in rows if r.window is not None]
        timed = [r for r in windowed if r.quantiles]
        tlabs = [r.lab for r in timed]
        out.append((self.quantile, [column for i in range(len(QUANTILES)) for column in (
            tlabs, list(map(_fmt, [r.quantiles[i] / 1000.0 for r in timed])))]))
        out.append((self.ratio, [[r.lab for r in windowed], list(map(
            _fmt, [r.window.error_rate for r in windowed]))]))  # type: ignore[union-attr]
        judged = [(r.lab, result) for r in windowed for result in r.results]
        jlabs = [lab for lab, _ in judged]
        objectives = [j.objective for _, j in judged]
        out.append((self.slo[0], [jlabs, objectives, [1 if j.ok else 0 for _, j in judged]]))
        out.append((self.slo[1], [jlabs, objectives,
                                  list(map(_fmt, [j.measured for _, j in judged]))]))
        out.append((self.slo[2], [jlabs, objectives,
                                  list(map(_fmt, [j.threshold for _, j in judged]))]))
        return out


def _lines(template: str, *columns: Sequence[object]) -> str:
    """``template`` (one edge's lines; its i-th placeholder takes ``columns[i]``'s value of
    the edge) over every edge: one ``%`` over the template repeated, so the formatting of
    a family runs in C."""
    if not columns[0]:
        return ""
    return (template * len(columns[0])) % tuple(chain.from_iterable(zip(*columns, strict=True)))
