"""``python -m bench``: every benchmark case against a broker and the embedded PostgreSQL.

Prints one table, each figure beside its baseline measured in the same run, the
target and whether it was met; writes the same rows as JSON (``--json``, default
``bench-results.json``). ``--cases`` picks cases, ``--quick`` runs a small smoke size
(numbers then mean little), ``--broker`` the broker: ``tansu`` (embedded, the default),
``kafka`` (Apache Kafka, a local KRaft node) or ``both`` (every case on each, one after
the other in the same run, so the two columns can be compared). See bench/README.md for
what each case measures.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
from typing import Any

from bench.common import BROKERS, Context, Row

CASES = ("shim", "stream", "fleet", "ordinary", "freshness", "sink", "catchup", "growth",
         "scaleout", "otlp", "metrics")
NO_BROKER = {"sink"}  # writes the databases directly: run once, whatever --broker says


def _number(value: float | None) -> str:
    if value is None or value != value:  # None or NaN
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:,.2f}" if abs(value) < 10 else f"{value:,.1f}"


def machine() -> dict[str, Any]:
    import faust

    return {"python": platform.python_version(), "cpus": os.cpu_count(),
            "platform": platform.platform(), "faust": faust.__version__,
            "load_average": os.getloadavg()}


def render(rows: list[Row], info: dict[str, Any], seconds: float) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)
    table = Table(title=f"commpipe benchmarks ({info['cpus']} cores, Python {info['python']}, "
                  f"{seconds:.0f} s)", title_justify="left")
    for name, justify in (("case", "left"), ("broker", "left"), ("metric", "left"),
                          ("commpipe", "right"),
                          ("baseline", "right"), ("ratio", "right"), ("target", "left"),
                          ("met", "left"), ("baseline is", "left")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for r in rows:
        met = {True: "[green]met[/]", False: "[red]NOT MET[/]", None: "-"}[r.met]
        table.add_row(r.case, r.broker, r.metric, _number(r.value), _number(r.baseline),
                      _number(r.ratio), r.target, met, r.baseline_is)
    console.print(table)
    for r in rows:
        if r.note:
            console.print(f"[dim]{r.case} ({r.broker}) / {r.metric}: {r.note}[/]",
                          highlight=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES),
                        help=f"comma-separated, from: {', '.join(CASES)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--broker", default="tansu", choices=[*BROKERS, "both"],
                        help="tansu (embedded, default), kafka (Apache Kafka) or both")
    parser.add_argument("--json", default="bench-results.json", metavar="PATH",
                        help="where to write the rows (default: bench-results.json)")
    args = parser.parse_args(argv)
    chosen = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(chosen) - set(CASES))
    if unknown:
        parser.error(f"unknown case(s): {', '.join(unknown)}; choose from {', '.join(CASES)}")
    ctx = Context(quick=args.quick, say=lambda m: print(f"[bench] {m}", file=sys.stderr,
                                                          flush=True))
    started = time.monotonic()
    rows: list[Row] = []
    failed = []
    engines = list(BROKERS) if args.broker == "both" else [args.broker]
    try:
        for name in chosen:
            for engine in (["-"] if name in NO_BROKER else engines):  # back to back
                ctx.engine = engine
                ctx.say(f"case {name} on {engine}")
                began = time.monotonic()
                try:
                    found = importlib.import_module(f"bench.{name}").run(ctx)
                except Exception as e:  # noqa: BLE001 - report the case as failed, run the rest
                    failed.append(f"{name} ({engine})")
                    found = [Row(name, " ".join(f"FAILED: {type(e).__name__}: {e}".split())[:160],
                                 None, None, "", met=False)]
                    ctx.say(f"case {name} on {engine} failed: {e!r}")
                for row in found:
                    row.broker = engine
                rows += found
                ctx.say(f"case {name} on {engine}: {time.monotonic() - began:.0f} s")
    finally:
        ctx.close(keep=bool(failed))
    if failed:
        ctx.say(f"worker and broker logs kept in {ctx.workdir}")
    seconds = time.monotonic() - started
    info = machine()
    render(rows, info, seconds)
    with open(args.json, "w") as f:
        json.dump({"machine": info, "quick": args.quick, "seconds": round(seconds, 1),
                   "rows": [r.to_json() for r in rows]}, f, indent=2)
    print(f"rows written to {args.json}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
