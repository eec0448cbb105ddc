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
* ``commpipe trace ID``: one call's chain across services (:mod:`pipeline.cli_trace`).
* ``commpipe patterns load FILE`` / ``check``: the message_patterns catalogue
  (:mod:`pipeline.cli_patterns`).
* ``commpipe bench``: the benchmarks (``python -m bench``, same options).

The command line needs the ``server`` extra (typer, rich); without it
:func:`main` says so and exits with code 1.
"""

import json
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

__all__ = ["main"]

MISSING_EXTRA = "commpipe's command line needs the server extra: pip install 'commpipe[server]'"


class _Service(Protocol):
    @property
    def is_running(self) -> bool: ...

    @property
    def log_path(self) -> Path: ...

    def start(self) -> object: ...

    def close(self) -> None: ...


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
    # No ``from __future__ import annotations`` in this module: typer reads these
    # annotations at run time, and they name objects imported only here.
    from typing import Annotated

    import typer
    from rich.console import Console

    app = typer.Typer(help="commpipe: inter-service communication telemetry.",
                      no_args_is_help=True, add_completion=False,
                      pretty_exceptions_show_locals=False)  # locals may hold secrets
    console = Console(stderr=True)
    out = Console()

    @app.command()
    def broker(
        port: Annotated[int, typer.Option(help="TCP port; 0 picks a free one.")] = 9092,
        host: Annotated[str, typer.Option(help="Listen and advertised address.")] = "127.0.0.1",
        partitions: Annotated[int | None, typer.Option(
            help="Partitions of the commpipe topics (default: COMMPIPE_PARTITIONS, else 4)."),
        ] = None,
        create_topics: Annotated[bool, typer.Option(
            help="Create COMMPIPE_TOPIC and COMMPIPE_DLQ_TOPIC.")] = True,
    ) -> None:
        """Run the embedded Kafka-protocol broker (Tansu, memory storage) in the foreground."""
        from pipeline.embedded import run_sync
        from pipeline.embedded_broker import EmbeddedBroker
        from pipeline.settings import Settings
        from pipeline.topics import ensure_commpipe_topics

        svc = EmbeddedBroker(port or None, host=host)

        def ready() -> None:
            settings = Settings.from_env(kafka_bootstrap=svc.bootstrap, partitions=partitions)
            if create_topics:
                run_sync(lambda: ensure_commpipe_topics(settings))
                console.print(f"topics [bold]{settings.topic}[/] and [bold]"
                              f"{settings.dlq_topic}[/]: {settings.partitions} partitions")
            out.print(svc.bootstrap, highlight=False, soft_wrap=True)
            console.print(f"[green]Kafka broker ready[/] on [bold]{svc.bootstrap}[/]"
                          f" (export COMMPIPE_KAFKA_BOOTSTRAP={svc.bootstrap}); memory storage:"
                          " topics are lost when it stops. Ctrl-C stops it.", highlight=False,
                          soft_wrap=True)

        raise typer.Exit(_run_service(svc, console, "starting the embedded Kafka broker...", ready))

    @app.command()
    def postgres(
        port: Annotated[int, typer.Option(help="TCP port; 0 picks a free one.")] = 5432,
        data_dir: Annotated[Path, typer.Option(
            help="Cluster directory; created on first run, kept afterwards.")] = Path(
            ".commpipe/pgdata"),
    ) -> None:
        """Run the embedded PostgreSQL in the foreground and print its DSN."""
        from pipeline.embedded_postgres import EmbeddedPostgres

        svc = EmbeddedPostgres(data_dir, port=port or None)

        def ready() -> None:
            out.print(svc.dsn, highlight=False, soft_wrap=True)
            console.print(f"[green]PostgreSQL ready[/]: export COMMPIPE_POSTGRES_DSN={svc.dsn}"
                          f" (data in {svc.data_dir}). Ctrl-C stops it.", highlight=False,
                          soft_wrap=True)

        raise typer.Exit(_run_service(svc, console, "starting the embedded PostgreSQL...", ready))

    @app.command()
    def worker(
        loglevel: Annotated[str | None, typer.Option(
            "--loglevel", "-l",
            help="crit, error, warn, info or debug (default: COMMPIPE_WORKER_LOGLEVEL)")] = None,
    ) -> None:
        """Run the stream job: create the topics if needed, then a Faust worker."""
        from pipeline.embedded import run_sync
        from pipeline.errors import CommpipeError
        from pipeline.settings import Settings
        from pipeline.topics import ensure_commpipe_topics

        try:
            settings = Settings.from_env(worker_loglevel=loglevel)
            run_sync(lambda: ensure_commpipe_topics(settings))
        except CommpipeError as e:
            console.print(f"[red]error:[/] {e}", highlight=False, markup=False)
            raise typer.Exit(1) from None
        from faust import Worker

        from agents.app import create_app

        pipeline = create_app(settings)
        worker = Worker(pipeline.app, loglevel=settings.worker_loglevel)
        # Faust's terminal spinner sets the root logger to DEBUG at warn and above, so every
        # library builds debug records that are then dropped (~12 % of the worker's CPU)
        worker.spinner = None
        worker.execute_from_commandline()

    @app.command()
    def migrate(
        to: Annotated[int | None, typer.Option(
            help="Target version (default: the latest); lower than the current one rolls "
                 "back; 0 removes everything.")] = None,
        postgres: Annotated[bool, typer.Option(help="Migrate PostgreSQL (if a DSN is set).")
                            ] = True,
        duckdb: Annotated[bool, typer.Option(help="Migrate the DuckDB file (if a path is set).")
                          ] = True,
    ) -> None:
        """Apply or roll back the schema migrations (tracked; re-running does nothing)."""
        from pipeline import migrations
        from pipeline.settings import Settings

        def run() -> None:
            settings = Settings.from_env()
            done = False
            if postgres and settings.postgres_dsn.get():
                _steps(out, "PostgreSQL", migrations.migrate_postgres(
                    settings.postgres_conninfo(), to=to))
                done = True
            if duckdb and settings.duckdb_path:
                _steps(out, f"DuckDB {settings.duckdb_path}",
                       migrations.migrate_duckdb(settings.duckdb_path, to=to))
                done = True
            if not done:
                console.print("nothing to migrate: set COMMPIPE_POSTGRES_DSN and/or "
                              "COMMPIPE_DUCKDB_PATH")

        _guarded(console, run)

    @app.command()
    def query(
        sql: Annotated[str, typer.Argument(help="The SQL to run (read-only).")],
        postgres: Annotated[bool, typer.Option(
            "--postgres", help="Query PostgreSQL instead of the DuckDB file.")] = False,
        fmt: Annotated[str, typer.Option("--format", help="table, csv or json.")] = "table",
    ) -> None:
        """Run SQL on the DuckDB file (default) or PostgreSQL and print the result."""
        from pipeline import query as q
        from pipeline.settings import Settings

        if fmt not in ("table", "csv", "json"):
            console.print(f"[red]error:[/] --format must be table, csv or json, not {fmt!r}")
            raise typer.Exit(2)

        def run() -> None:
            settings = Settings.from_env()
            result = (q.query_postgres(settings, sql) if postgres
                      else q.query_duckdb(settings.duckdb_path, sql))
            _print_result(out, result, fmt, "PostgreSQL" if postgres else "DuckDB")

        _guarded(console, run)

    @app.command()
    def health(
        fail_under: Annotated[float | None, typer.Option(
            "--fail-under", help="Exit 1 when a service scores under this, or an objective "
                                 "failed in the lookback (a CI gate).")] = None,
        since: Annotated[str, typer.Option(help="Lookback for objective misses: 90s, 30m, "
                                                "1h, 2d.")] = "1h",
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    ) -> None:
        """Print analyze_communication_health() and the objectives missed in the lookback,
        from each configured database."""
        from pipeline import health as h
        from pipeline.patterns import parse_duration
        from pipeline.settings import Settings

        def run() -> None:
            settings = Settings.from_env()
            since_s = parse_duration(since)
            databases = ((["postgres"] if settings.postgres_dsn.get() else [])
                         + (["duckdb"] if settings.duckdb_path else []))
            reports = [h.report(settings, db, since_s=since_s, fail_under=fail_under)
                       for db in databases]
            if as_json:
                print(json.dumps({"ok": all(r.ok for r in reports),
                                  "reports": [r.to_json() for r in reports]}, indent=1))
            else:
                for r in reports:
                    name = "PostgreSQL" if r.database == "postgres" else "DuckDB"
                    _print_result(out, r.health, "table",
                                  f"{name}: analyze_communication_health()")
                    _print_result(out, r.misses, "table",
                                  f"{name}: objectives missed in the last {since}")
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

        _guarded(console, run)

    @app.command()
    def demo(
        duration: Annotated[float | None, typer.Option(
            help="Seconds to run (default: until Ctrl-C).")] = None,
        rate: Annotated[float, typer.Option(help="Synthetic user requests per second.")
                        ] = 100.0,
        seed: Annotated[int, typer.Option(help="Seed of the traffic model.")] = 1,
    ) -> None:
        """Everything at once: broker, PostgreSQL, worker (sink, /metrics), synthetic traffic."""
        from pipeline.demo import EXAMPLE_QUERIES, run_demo

        def run() -> None:
            result = run_demo(console, duration=duration, rate=rate, seed=seed)
            out.print(f"\n[bold]Done.[/] {result.events_sent} events sent; "
                      f"{len(result.edges_seen)} edges seen. The rollups are in the DuckDB file "
                      f"[bold]{result.duckdb_path}[/] (and in PostgreSQL). Try:", soft_wrap=True)
            env = f"COMMPIPE_DUCKDB_PATH={result.duckdb_path} " if (
                Path(result.duckdb_path) != Path("commpipe.duckdb").resolve()) else ""
            for what, sql in EXAMPLE_QUERIES:
                out.print(f"  [dim]# {what}[/]", highlight=False)
                out.print(f'  {env}commpipe query "{sql}"', highlight=False, soft_wrap=True,
                          markup=False)

        _guarded(console, run)

    @app.command()
    def loadgen(
        rate: Annotated[float, typer.Option(help="Synthetic user requests per second.")
                        ] = 100.0,
        duration: Annotated[float | None, typer.Option(
            help="Seconds to run (default: until Ctrl-C).")] = None,
        seed: Annotated[int, typer.Option(help="Seed of the traffic model.")] = 1,
    ) -> None:
        """Synthetic services emitting through the shim to COMMPIPE_KAFKA_BOOTSTRAP."""
        from pipeline.loadgen import LoadGen
        from pipeline.settings import Settings
        from pipeline.shim import Emitter

        def run() -> None:
            settings = Settings.from_env()
            emitter = Emitter(settings.kafka_bootstrap, settings.topic, settings=settings)
            stop = threading.Event()
            previous = {s: signal.signal(s, lambda *_: stop.set())
                        for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                with console.status(f"emitting to {settings.kafka_bootstrap} at {rate:g} "
                                    "users/s (Ctrl-C stops)..."):
                    stats = LoadGen(emitter, rate=rate, seed=seed).run(duration, stop)
            finally:
                emitter.close()
                for s, handler in previous.items():
                    signal.signal(s, handler)
            sent = emitter.stats()
            out.print(f"{stats.users} users, {stats.events} events; shim: {sent.sent} sent, "
                      f"{sent.dropped} dropped, {sent.failed} failed", highlight=False)

        _guarded(console, run)

    @app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                   "help_option_names": []})
    def bench(ctx: typer.Context) -> None:
        """The benchmarks, as python -m bench (--cases, --quick, --json; --help there)."""
        from bench.__main__ import main as bench_main

        raise typer.Exit(bench_main(ctx.args))

    from pipeline import cli_patterns, cli_trace

    cli_trace.add_commands(app, console)
    cli_patterns.add_commands(app, console)
    return app


def _guarded(console: Any, run: Callable[[], None]) -> None:
    """Run a command body; a commpipe error is printed (no traceback) and exits 1."""
    import typer
    from rich.markup import escape

    from pipeline.errors import CommpipeError

    try:
        run()
    except CommpipeError as e:
        console.print(f"[red]error:[/] {escape(str(e))}", highlight=False)
        raise typer.Exit(1) from None


def _steps(out: Any, where: str, steps: list[Any]) -> None:
    if not steps:
        out.print(f"{where}: up to date")
    for step in steps:
        out.print(f"{where}: {step.direction} {step.version:04d} {step.name}", highlight=False)


def _print_result(out: Any, result: Any, fmt: str, title: str) -> None:
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


def _run_service(svc: _Service, console: Any, starting: str, ready: Callable[[], None]) -> int:
    """Start ``svc``, call ``ready()``, serve until SIGINT/SIGTERM; always close it.

    The signal handlers are in place before the start, so a signal during the
    start stops the service right after it. Returns the exit code: 0 after a
    signal, 1 when a commpipe error occurred or the service died on its own.
    """
    from rich.markup import escape

    from pipeline.embedded import log_tail
    from pipeline.errors import CommpipeError

    stop = threading.Event()
    received: list[str] = []

    def on_signal(signum: int, frame: object) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with console.status(starting):
            svc.start()
        ready()
        while not stop.wait(0.2):
            if not svc.is_running:
                console.print("[red]the service exited unexpectedly[/]; last lines of its log:")
                console.print(log_tail(svc.log_path), markup=False, highlight=False)
                return 1
        console.print(f"{received[0]} received; stopping.")
        return 0
    except CommpipeError as e:
        console.print(f"[red]error:[/] {escape(str(e))}", highlight=False)
        return 1
    finally:
        svc.close()
        for s, handler in previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    main()
