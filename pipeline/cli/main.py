"""``commpipe``: the command line. It only wires library pieces together; nothing imports it.

Commands:

* ``commpipe broker``: the embedded Kafka-protocol broker (Tansu) in the
  foreground, with the commpipe topics created; stops on Ctrl-C or SIGTERM.
* ``commpipe postgres``: the embedded PostgreSQL in the foreground, with its
  data kept in a directory across restarts; stops on Ctrl-C or SIGTERM.
* ``commpipe worker``: the stream job, with the sink when a database is configured.
* ``commpipe migrate``: apply (or roll back, ``--to N``) the schema migrations of
  PostgreSQL (``COMMPIPE_POSTGRES_DSN``) and the DuckDB file (``COMMPIPE_DUCKDB_PATH``).
* ``commpipe query "SQL"``: run SQL on the DuckDB file (``--postgres``: on
  PostgreSQL) and print the result; ``commpipe health``: the health analysis of both.
* ``commpipe trace ID``: one call's chain across services.
* ``commpipe patterns load FILE`` / ``check``: the message_patterns catalogue.
* ``commpipe check``: the specification's CI gates (``.communication.yml``), a table and a
  JSON report; exit 1 when a gate fails.
* ``commpipe graph``: the service graph from the rollups (SVG, HTML or DOT).
* ``commpipe bench``: the benchmarks (``python -m bench``, same options).

Each ``*_verbs`` module adds its verbs to the app (:mod:`~pipeline.cli.run_verbs`,
:mod:`~pipeline.cli.data_verbs`, :mod:`~pipeline.cli.trace_verbs`,
:mod:`~pipeline.cli.patterns_verbs`, :mod:`~pipeline.cli.check_verbs`,
:mod:`~pipeline.cli.graph_verbs`); the other modules here are the library pieces only the
command line uses (queries, reports, the graph, the demo, the load generator).

The command line needs the ``server`` extra (typer, rich); without it
:func:`main` says so and exits with code 1.
"""

import sys
from typing import Any

__all__ = ["main"]

MISSING_EXTRA = "commpipe's command line needs the server extra: pip install 'commpipe[server]'"


def main() -> None:
    """Console-script entry point ``commpipe``."""
    try:
        import rich  # noqa: F401
        import typer  # noqa: F401
    except ImportError:
        print(MISSING_EXTRA, file=sys.stderr)
        sys.exit(1)
    _build_app()()


def _build_app() -> Any:
    import typer
    from rich.console import Console

    from pipeline.cli import (
        check_verbs,
        data_verbs,
        graph_verbs,
        patterns_verbs,
        run_verbs,
        trace_verbs,
    )

    app = typer.Typer(help="commpipe: inter-service communication telemetry.",
                      no_args_is_help=True, add_completion=False,
                      pretty_exceptions_show_locals=False)  # locals may hold secrets
    console = Console(stderr=True)
    out = Console()
    run_verbs.add_commands(app, console, out)
    data_verbs.add_commands(app, console, out)
    trace_verbs.add_commands(app, console)
    patterns_verbs.add_commands(app, console)
    check_verbs.add_commands(app, console, out)
    graph_verbs.add_commands(app, console)
    return app


if __name__ == "__main__":
    main()
