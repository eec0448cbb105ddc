"""``commpipe patterns load|check``: the message_patterns catalogue (part of the command
line, which only wires library pieces together; :mod:`pipeline.cli.patterns` does the work)."""

import json
import time
from pathlib import Path
from typing import Annotated, Any

__all__ = ["add_commands"]


def add_commands(app: Any, console: Any) -> None:
    """Add the ``patterns`` command group to the typer ``app``; errors go to ``console``."""
    import typer

    from pipeline.cli.output import guarded

    group = typer.Typer(help="The message_patterns catalogue: load it from a file, check it "
                             "against what was observed.", no_args_is_help=True)
    app.add_typer(group, name="patterns")

    @group.command()
    def load(
        file: Annotated[Path, typer.Argument(help="A .yaml, .yml or .toml catalogue file.")],
        postgres: Annotated[bool, typer.Option(help="Load into PostgreSQL (if a DSN is set).")
                            ] = True,
        duckdb: Annotated[bool, typer.Option(
            help="Load into the DuckDB file (if a path is set).")] = True,
    ) -> None:
        """Validate FILE and upsert its patterns (by name) into both databases."""
        from pipeline.cli import patterns as pt
        from pipeline.cli import query as q
        from pipeline.settings import Settings

        def run() -> None:
            settings = Settings.from_env()
            found = pt.parse_file(file)
            names = ", ".join(p.name for p in found)
            targets = []
            if postgres and settings.postgres_dsn.get():
                targets.append(("PostgreSQL", lambda: q.execute_postgres(
                    settings, pt.upsert_statements(found, "postgres"), write=True,
                    min_version=pt.SCHEMA_VERSION)))
            if duckdb and settings.duckdb_path:
                targets.append((f"DuckDB {settings.duckdb_path}", lambda: q.execute_duckdb(
                    settings.duckdb_path, pt.upsert_statements(found, "duckdb"), write=True,
                    min_version=pt.SCHEMA_VERSION)))
            if not targets:
                console.print("nothing to load into: set COMMPIPE_POSTGRES_DSN and/or "
                              "COMMPIPE_DUCKDB_PATH")
                raise typer.Exit(1)
            for where, write in targets:
                write()
                print(f"{where}: {len(found)} pattern{'s' * (len(found) != 1)} loaded "
                      f"({names})")

        guarded(console, run)

    @group.command()
    def check(
        since: Annotated[str, typer.Option(
            help="Lookback: 90s, 30m, 1h, 2d (windows ending within it count).")] = "1h",
        postgres: Annotated[bool, typer.Option(
            "--postgres", help="Read PostgreSQL instead of the DuckDB file.")] = False,
        as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")
                           ] = False,
    ) -> None:
        """Compare each catalogued pattern with what was observed; exit 1 if any differs.

        Every flow edge must have traffic in the lookback and meet the pattern's SLA."""
        from pipeline.cli import patterns as pt
        from pipeline.cli import query as q
        from pipeline.cli.durations import parse_duration
        from pipeline.settings import Settings

        def run() -> None:
            settings = Settings.from_env()
            seconds = parse_duration(since)

            def read(sql: str, params: Any = ()) -> list[Any]:
                if postgres:
                    return q.query_postgres(settings, sql, params,
                                            min_version=pt.SCHEMA_VERSION).rows
                return q.query_duckdb(settings.duckdb_path, sql, params,
                                      min_version=pt.SCHEMA_VERSION).rows

            where = "PostgreSQL" if postgres else f"DuckDB {settings.duckdb_path}"
            catalogue = [pt.pattern_of_row(r) for r in read(pt.PATTERNS_SQL)]
            if not catalogue:
                from pipeline.errors import ConfigError

                raise ConfigError(f"the message_patterns catalogue in {where} is empty: "
                                  "load it with `commpipe patterns load FILE`")
            edges = sorted({e.key for p in catalogue for e in p.flow})
            columns = [[e[i] for e in edges] for i in range(3)]
            observed = pt.observe(read(pt.OBSERVED_SQL, [*columns, time.time() - seconds]))
            results = [(p, pt.compare(p, observed, since)) for p in catalogue]
            differing = sum(1 for _, diffs in results if diffs)
            if as_json:
                print(json.dumps({
                    "database": where, "since": since, "since_s": seconds,
                    "ok": differing == 0,
                    "patterns": [{
                        "name": p.name, "type": p.type, "ok": not diffs,
                        "differences": [d.to_json() for d in diffs],
                        "edges": [{**e.model_dump(), **observed.get(
                            e.key, pt.EdgeObservation()).to_json()}
                            for e in {e.key: e for e in p.flow}.values()]}
                        for p, diffs in results]}, indent=1, ensure_ascii=False))
            else:
                for p, diffs in results:
                    n = len({e.key for e in p.flow})
                    head = f"{p.name} ({p.type}, {n} edge{'s' * (n != 1)})"
                    print(f"{head}: {len(diffs)} difference{'s' * (len(diffs) != 1)}"
                          if diffs else f"{head}: as specified")
                    for d in diffs:
                        print(f"  - {d.message}")
                print(f"{differing} of {len(results)} pattern{'s' * (len(results) != 1)} "
                      f"differ from what {where} observed in the last {since}")
            if differing:
                raise typer.Exit(1)

        guarded(console, run)
