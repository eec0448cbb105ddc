"""What the verbs share: running a body with clean errors, and printing results."""

import sys
from collections.abc import Callable
from typing import Any

__all__ = ["guarded", "print_result", "steps"]


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


def print_result(out: Any, result: Any, fmt: str, title: str) -> None:
    import csv
    import json

    from rich.table import Table

    if fmt == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(result.columns)
        writer.writerows(result.rows)
        return
    if fmt == "json":
        rows = [dict(zip(result.columns, row, strict=True)) for row in result.rows]
        print(json.dumps(rows, default=str, indent=1))
        return
    out.print(title, style="bold", highlight=False)
    table = Table()
    for column in result.columns:
        table.add_column(column, overflow="fold")
    for row in result.rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    out.print(table)
    out.print(f"{len(result.rows)} row{'s' if len(result.rows) != 1 else ''}", style="dim")

