"""What the verbs share: running a body with clean errors, and printing results for people
(tables that fit the terminal) or for programs (CSV and JSON at full precision)."""

import sys
from collections.abc import Callable, Mapping
from typing import Any

from pipeline.cli.cells import Kind

__all__ = ["Hint", "guarded", "print_result", "steps"]


def guarded(console: Any, run: Callable[[], None]) -> None:
    """Run a command body; a commpipe error is printed (no traceback) and exits 1."""
    import typer
    from rich.markup import escape

    from pipeline.errors import CommpipeError

    try:
        run()
    except CommpipeError as e:
        console.print(f"[red]error:[/] {escape(str(e))}", highlight=False)
        raise typer.Exit(1) from None


def steps(out: Any, where: str, steps: list[Any]) -> None:
    if not steps:
        out.print(f"{where}: up to date")
    for step in steps:
        out.print(f"{where}: {step.direction} {step.version:04d} {step.name}", highlight=False)


Hint = Kind | Callable[[Mapping[str, Any]], Kind]
"""What a column's values mean (:data:`~pipeline.cli.cells.Kind`), or a function of the
row deciding it (a threshold is ms or a ratio depending on the objective)."""


def print_result(out: Any, result: Any, fmt: str, title: str, *,
                 kinds: Mapping[str, Hint] | None = None) -> None:
    """Print ``result`` (columns and rows) as ``fmt``: ``csv`` and ``json`` at full
    precision (:func:`~pipeline.cli.cells.plain`), ``table`` rounded to what each value
    means and fitted to ``out``'s width (:mod:`pipeline.cli.tables`). ``kinds`` overrides
    what a column means where its name does not say (:func:`~pipeline.cli.cells.kind_of`)."""
    import csv
    import json

    from rich.text import Text

    from pipeline.cli import cells, tables

    if fmt == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(result.columns)
        writer.writerows([cells.csv_text(v) for v in row] for row in result.rows)
        return
    if fmt == "json":
        rows = [{c: cells.plain(v) for c, v in zip(result.columns, row, strict=True)}
                for row in result.rows]
        print(json.dumps(rows, indent=1, ensure_ascii=False))
        return
    hints = {c: (kinds or {}).get(c, cells.kind_of(c)) for c in result.columns}
    texts = []
    times = False
    for row in result.rows:
        named = dict(zip(result.columns, row, strict=True))
        line = []
        for column, value in named.items():
            hint = hints[column]
            kind = hint(named) if callable(hint) else hint
            line.append(cells.cell(value, kind))
            times = times or _is_time(value, kind)
        texts.append(line)
    fixed = [all(v is None or cells.is_number(v) or _is_time(v, "count")
                 for v in (row[i] for row in result.rows)) for i in range(len(result.columns))]
    out.print(title, style="bold", highlight=False)
    out.print(tables.render(result.columns, texts, fixed, out.width))
    note = f"{len(result.rows)} row{'s' if len(result.rows) != 1 else ''}"
    out.print(Text(note + ("; times in UTC" if times else ""), style="dim"))


def _is_time(value: Any, kind: Kind) -> bool:
    import datetime as dt

    from pipeline.cli.cells import is_number

    return isinstance(value, dt.datetime) or (kind == "epoch" and is_number(value))
