"""``commpipe trace``: one call's chain across services (part of the command line, which
only wires library pieces together; :mod:`pipeline.cli.trace` does the work)."""

import json
import sys
from typing import Annotated, Any

__all__ = ["add_commands"]

NOTHING_STORED = (
    "no stored events for {key}: the sink keeps error, timeout and retry events and the "
    "responses of retried calls (attempt > 1), so a call that succeeded at its first try "
    "leaves none; events reach the databases when their window closes")


def add_commands(app: Any, console: Any) -> None:
    """Add ``trace`` to the typer ``app``; errors go to ``console``."""
    import typer

    from pipeline.cli.output import guarded

    @app.command()
    def trace(
        key: Annotated[str, typer.Argument(
            help="The call's correlation id (or its W3C trace id).")],
        postgres: Annotated[bool, typer.Option(
            "--postgres", help="Read PostgreSQL instead of the DuckDB file.")] = False,
        as_json: Annotated[bool, typer.Option("--json", help="Print the chain as JSON.")
                           ] = False,
    ) -> None:
        """Print one call's chain across services: edges, attempts, backoffs, outcome, and
        where a failure that cascaded up the chain started.

        Events in time order, from the DuckDB file (or PostgreSQL); exit 1 when nothing is
        stored for the id."""
        from pipeline.cli import query as q
        from pipeline.cli import trace as t
        from pipeline.settings import Settings

        def run() -> None:
            settings = Settings.from_env()
            wanted = t.check_key(key)
            params = (wanted, wanted)
            statements = [(t.TRACE_SQL, params), (t.CASCADES_SQL, params)]
            result, links = (
                q.execute_postgres(settings, statements, min_version=t.SCHEMA_VERSION)
                if postgres else q.execute_duckdb(settings.duckdb_path, statements,
                                                  min_version=t.SCHEMA_VERSION))
            chain = t.build_chain(wanted, (dict(zip(result.columns, row, strict=True))
                                           for row in result.rows),
                                  [(row[0], row[1]) for row in links.rows])
            if as_json:
                print(json.dumps(chain.to_json(), indent=1, ensure_ascii=False))
            elif chain.steps:
                from rich.console import Console

                print(t.render(chain, width=Console().width))  # COLUMNS, else the terminal
            if not chain.steps:
                print(NOTHING_STORED.format(key=wanted), file=sys.stderr)
                raise typer.Exit(1)

        guarded(console, run)
