"""The verbs over the stored data: ``migrate``, ``query`` and ``health`` (part of the
command line, which only wires library pieces together)."""

import json
from collections.abc import Mapping
from typing import Any

from pipeline.cli.cells import Kind
from pipeline.cli.output import Hint, guarded, print_result, steps

__all__ = ["add_commands"]


def _objective_unit(row: Mapping[str, Any]) -> Kind:
    """An objective's threshold and miss are a 0-1 ratio (delivery_success) or ms."""
    return "ratio" if row.get("objective") == "delivery_success" else "ms"


def one_edge_column(result: Any) -> Any:
    """``result`` with its first three columns (source, target, protocol) shown as one
    ``edge`` column, ``orders → payments · grpc``: a table for people that fits 80 columns."""
    from pipeline.cli.query import Result

    if result.columns[:3] != ["source_service", "target_service", "protocol"]:
        return result
    return Result(["edge", *result.columns[3:]],
                  [(f"{r[0]} → {r[1]} · {r[2]}", *r[3:]) for r in result.rows])


HEALTH_KINDS: dict[str, Hint] = {"avg_latency": "ms"}  # the specification's name, no unit
MISSES_KINDS: dict[str, Hint] = {"threshold": _objective_unit, "worst_miss": _objective_unit,
                                 "last_window_end": "epoch"}


def add_commands(app: Any, console: Any, out: Any) -> None:
    """Add the verbs to the typer ``app``; errors go to ``console``, results to ``out``."""
    # No ``from __future__ import annotations`` in this module: typer reads these
    # annotations at run time, and they name objects imported only here.
    from typing import Annotated

    import typer

    @app.command()
    def migrate(
        to: Annotated[int | None, typer.Option(
            help="Target version (default: the latest); lower than the current one rolls "
                 "back; 0 removes everything.")] = None,
        postgres: Annotated[bool, typer.Option(help="Migrate PostgreSQL (if a DSN is set).")
                            ] = True,
        duckdb: Annotated[bool, typer.Option(help="Migrate the DuckDB file (if a path is set).")
                          ] = True,
        yes: Annotated[bool, typer.Option(
            "--yes", help="Roll back even if that deletes data (tables with rows, columns "
                          "with values); without it such a rollback says what it would "
                          "delete and changes nothing.")] = False,
    ) -> None:
        """Apply or roll back the schema migrations (tracked; re-running does nothing)."""
        from pipeline.settings import Settings
        from pipeline.sink import migrations

        def run() -> None:
            settings = Settings.from_env()
            done = False
            if postgres and settings.postgres_dsn.get():
                steps(out, "PostgreSQL", migrations.migrate_postgres(
                    settings.postgres_conninfo(), to=to, allow_data_loss=yes))
                done = True
            if duckdb and settings.duckdb_path:
                steps(out, f"DuckDB {settings.duckdb_path}",
                      migrations.migrate_duckdb(settings.duckdb_path, to=to,
                                                allow_data_loss=yes))
                done = True
            if not done:
                console.print("nothing to migrate: set COMMPIPE_POSTGRES_DSN and/or "
                              "COMMPIPE_DUCKDB_PATH")

        guarded(console, run)

    @app.command()
    def query(
        sql: Annotated[str, typer.Argument(help="The SQL to run (read-only).")],
        postgres: Annotated[bool, typer.Option(
            "--postgres", help="Query PostgreSQL instead of the DuckDB file.")] = False,
        fmt: Annotated[str, typer.Option("--format", help="table, csv or json.")] = "table",
    ) -> None:
        """Run SQL on the DuckDB file (default) or PostgreSQL and print the result."""
        from pipeline.cli import query as q
        from pipeline.settings import Settings

        if fmt not in ("table", "csv", "json"):
            console.print(f"[red]error:[/] --format must be table, csv or json, not {fmt!r}")
            raise typer.Exit(2)

        def run() -> None:
            settings = Settings.from_env()
            result = (q.query_postgres(settings, sql) if postgres
                      else q.query_duckdb(settings.duckdb_path, sql))
            print_result(out, result, fmt, "PostgreSQL" if postgres else "DuckDB")

        guarded(console, run)

    @app.command()
    def health(
        fail_under: Annotated[float | None, typer.Option(
            "--fail-under", help="Exit 1 when a service scores under this, or an objective "
                                 "failed in the lookback (a CI gate).")] = None,
        since: Annotated[str, typer.Option(help="Lookback for objective misses: 90s, 30m, "
                                                "1h, 2d.")] = "1h",
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
        gate: Annotated[bool, typer.Option(
            "--gate", help="A CI gate with the objectives file's health_score "
                           "(COMMPIPE_SLO_FILE; 90 by default) as --fail-under.")] = False,
    ) -> None:
        """Print analyze_communication_health() and the objectives missed in the lookback,
        from each configured database. As a gate (--fail-under, or --gate) it exits 1 when a
        service scores under the bound or an objective failed, and when there is nothing
        to judge: no database configured, no schema, or no rollups in the lookback."""
        from pipeline.cli import health as h
        from pipeline.cli.durations import parse_duration
        from pipeline.errors import ConfigError
        from pipeline.settings import Settings

        def run() -> None:
            nonlocal fail_under
            settings = Settings.from_env()
            if gate and fail_under is None:
                from pipeline.core.slo import load_config

                fail_under = load_config(settings.slo_file).defaults.health_score
            since_s = parse_duration(since)
            databases = ((["postgres"] if settings.postgres_dsn.get() else [])
                         + (["duckdb"] if settings.duckdb_path else []))
            if not databases:
                if as_json:
                    print(json.dumps({"ok": False, "reports": [],
                                      "problems": [h.NOTHING_TO_CHECK]}, indent=1))
                raise ConfigError(h.NOTHING_TO_CHECK)
            reports = [h.report(settings, db, since_s=since_s, since=since,
                                fail_under=fail_under) for db in databases]
            if as_json:
                print(json.dumps({"ok": all(r.ok for r in reports),
                                  "reports": [r.to_json() for r in reports]}, indent=1))
            else:
                for r in reports:
                    name = "PostgreSQL" if r.database == "postgres" else "DuckDB"
                    print_result(out, r.health, "table",
                                 f"{name}: analyze_communication_health()",
                                 kinds=HEALTH_KINDS)
                    print_result(out, one_edge_column(r.misses), "table",
                                 f"{name}: objectives missed in the last {since}",
                                 kinds=MISSES_KINDS)
                    for problem in r.problems:
                        console.print(f"[red]{r.database}: {problem}[/]", highlight=False)
                    if fail_under is None:
                        continue
                    for service, score in r.low:
                        console.print(f"[red]{r.database}: {service} scores {score:g} < "
                                      f"{fail_under:g}[/]")
                    if r.misses.rows:
                        console.print(f"[red]{r.database}: {len(r.misses.rows)} edge "
                                      f"objective(s) missed in the last {since}[/]")
            if fail_under is not None and not all(r.ok for r in reports):
                raise typer.Exit(1)

        guarded(console, run)
