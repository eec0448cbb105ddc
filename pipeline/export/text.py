"""The exposition text of per-edge metrics: family heads, and each family's lines over
every reported edge at once (a ``%``-template of one edge's lines, repeated for every
edge and filled in one ``%``: the formatting runs in C; the Python per edge is
:class:`pipeline.export.edges.EdgeExporter`'s gathering of values into :class:`Row`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
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
    circuit: str
    """The circuit lines' template (``{0}``: the labels)."""
    size: int
    window: WindowStats | None = None
    """The last closed window (merged over partitions), if any."""
    quantiles: list[float] = field(default_factory=list)
    results: list[Result] = field(default_factory=list)


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


def labels(edge: tuple[str, str, str]) -> str:
    return (f'source_service="{_escape(edge[0])}",target_service="{_escape(edge[1])}",'
            f'protocol="{_escape(edge[2])}"')


class Text:
    """The templates of one namespace and histogram bounds."""

    FAMILIES = ("requests", "responses", "timeouts", "retries", "late_events", "errors",
                "latency", "circuit", "quantile", "ratio", "slo_ok", "slo_measured",
                "slo_threshold")

    def __init__(self, namespace: str, buckets: Sequence[float]) -> None:
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
        self.quantile = "".join(f'{n[8]}{{%s,quantile="{q!r}"}} %r\n' for q in QUANTILES)
        self.ratio = f"{n[9]}{{%s}} %r\n"
        self.slo = [f'{name}{{%s,objective="%s"}} %s\n' for name in n[10:13]]
        # str.format templates, {0} the labels: one per edge, chosen by its circuit states
        self.circuit = {
            (source, now): "".join(f'{n[7]}{{{{{{0}},state="{s}",source="{source}"}}}} '
                                   f"{1 if s == now else 0}\n" for s in STATES)
            for source in ("reported", "derived") for now in STATES}

    def heads(self) -> list[str]:
        """Each family's ``# HELP`` and ``# TYPE`` lines, in :attr:`FAMILIES` order."""
        return [f"# HELP {name} {about}\n# TYPE {name} {kind}\n"
                for name, kind, about in (self._heads[f] for f in self.FAMILIES)]

    def families(self, rows: list[Row]) -> list[str]:
        """Each family's lines over ``rows`` (in :attr:`FAMILIES` order)."""
        labs = [r.lab for r in rows]
        totals = [r.totals for r in rows]
        simple, n = self.simple, self.names
        out = [_lines(simple[i], labs, list(map(attrgetter(attr), totals)))
               for i, attr in enumerate(("requests", "responses", "timeouts", "retries"))]
        out.append(_lines(simple[4], labs, [r.late for r in rows]))
        out.append("".join([f'{n[5]}{{{r.lab},error_type="{_escape(k)}"}} {c}\n'
                            for r in rows if r.totals.errors
                            for k, c in sorted(r.totals.errors.items())]))
        cums = [list(accumulate(t.buckets)) for t in totals]
        columns: list[list[object]] = []
        for i in self.index:
            columns += (labs, list(map(itemgetter(i), cums)))
        counts = list(map(itemgetter(-1), cums))
        sums = list(map(truediv, map(attrgetter("latency_sum_ms"), totals), repeat(1000.0)))
        out.append(_lines(self.hist, *columns, labs, counts, labs, counts, labs, sums))
        out.append("".join(map(str.format, [r.circuit for r in rows], labs)))
        windowed = [r for r in rows if r.window is not None]
        timed = [r for r in windowed if r.quantiles]
        tlabs = [r.lab for r in timed]
        out.append(_lines(self.quantile, *[column for i in range(len(QUANTILES)) for column in (
            tlabs, [r.quantiles[i] / 1000.0 for r in timed])]))
        out.append(_lines(self.ratio, [r.lab for r in windowed],
                          [r.window.error_rate for r in windowed]))  # type: ignore[union-attr]
        judged = [(r.lab, result) for r in windowed for result in r.results]
        jlabs = [lab for lab, _ in judged]
        objectives = [j.objective for _, j in judged]
        out.append(_lines(self.slo[0], jlabs, objectives, [1 if j.ok else 0 for _, j in judged]))
        out.append(_lines(self.slo[1], jlabs, objectives, [_fmt(j.measured) for _, j in judged]))
        out.append(_lines(self.slo[2], jlabs, objectives,
                          [_fmt(j.threshold) for _, j in judged]))
        return out


def _lines(template: str, *columns: Sequence[object]) -> str:
    """``template`` (one edge's lines; its i-th placeholder takes ``columns[i]``'s value of
    the edge) over every edge: one ``%`` over the template repeated, so the formatting of
    a family runs in C."""
    if not columns[0]:
        return ""
    return (template * len(columns[0])) % tuple(chain.from_iterable(zip(*columns, strict=True)))
