"""The verbs that run something: ``broker``, ``postgres``, ``worker``, ``demo``,
``loadgen`` and ``bench`` (part of the command line, which only wires library pieces)."""

import math
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from pipeline.cli.output import guarded

__all__ = ["add_commands"]


class _Service(Protocol):
    @property
    def is_running(self) -> bool: ...

    @property
    def log_path(self) -> Path: ...

    def start(self) -> object: ...

    def close(self) -> None: ...


def add_commands(app: Any, console: Any, out: Any) -> None:
    """Add the verbs to the typer ``app``; errors go to ``console``, results to ``out``."""
    # No ``from __future__ import annotations`` in this module: typer reads these
    # annotations at run time, and they name objects imported only here.
    from typing import Annotated

    import typer

    @app.command()
    def broker(
        engine: Annotated[str, typer.Option(
            help="tansu: the embedded Tansu broker (memory storage, nothing to install); "
                 "kafka: Apache Kafka in KRaft mode (needs Java 17+; its jars are fetched "
                 "with Maven on first use).")] = "tansu",
        port: Annotated[int, typer.Option(help="TCP port; 0 picks a free one.")] = 9092,
        host: Annotated[str, typer.Option(help="Listen and advertised address.")] = "127.0.0.1",
        partitions: Annotated[int | None, typer.Option(
            help="Partitions of the commpipe topics (default: COMMPIPE_PARTITIONS, else 4)."),
        ] = None,
        create_topics: Annotated[bool, typer.Option(
            help="Create the commpipe topics (input, dead letters, the worker's changelog).")
        ] = True,
        data_dir: Annotated[Path, typer.Option(
            help="kafka: the node's storage, formatted on first run and kept.")] = Path(
            ".commpipe/kafka"),
    ) -> None:
        """Run a Kafka broker in the foreground: Tansu (default) or Apache Kafka."""
        import os

        from agents.topics import ensure_commpipe_topics
        from pipeline.dev.process import run_sync
        from pipeline.settings import Settings

        if engine not in ("tansu", "kafka"):
            console.print(f"[red]error:[/] --engine must be tansu or kafka, got {engine!r}",
                          highlight=False, markup=True)
            raise typer.Exit(2)
        svc: Any
        if engine == "kafka":
            from pipeline.dev.kafka import KafkaBroker
            from pipeline.dev.kafka_dist import pom_version

            version = os.environ.get("COMMPIPE_KAFKA_VERSION") or pom_version()
            svc = KafkaBroker(port or None, host=host, data_dir=data_dir, version=version,
                              heap="1g")
            what = (f"Apache Kafka {version} (KRaft; data in {svc.node_dir}, kept when it "
                    "stops)")
            starting = (f"starting Apache Kafka {version} (the first run fetches its jars "
                        "with Maven)...")
        else:
            from pipeline.dev.broker import EmbeddedBroker

            svc = EmbeddedBroker(port or None, host=host)
            what = "the Tansu broker (memory storage: topics are lost when it stops)"
            starting = "starting the embedded Kafka broker..."
        workarounds = " ".join(f"{k}={v}" for k, v in svc.WORKER_ENV.items())

        def ready() -> None:
            settings = Settings.from_env(kafka_bootstrap=svc.bootstrap, partitions=partitions)
            if create_topics:
                run_sync(lambda: ensure_commpipe_topics(settings))
                console.print(f"topics [bold]{settings.topic}[/] and [bold]"
                              f"{settings.dlq_topic}[/]: {settings.partitions} partitions")
            out.print(svc.bootstrap, highlight=False, soft_wrap=True)
            console.print(f"[green]Kafka broker ready[/] on [bold]{svc.bootstrap}[/]: {what}. "
                          f"export COMMPIPE_KAFKA_BOOTSTRAP={svc.bootstrap}"
                          + (f"; workers on it need {workarounds}" if workarounds else "")
                          + ". Ctrl-C stops it.", highlight=False, soft_wrap=True, markup=True)

        raise typer.Exit(_run_service(svc, console, starting, ready))

    @app.command()
    def postgres(
        port: Annotated[int, typer.Option(help="TCP port; 0 picks a free one.")] = 5432,
        data_dir: Annotated[Path, typer.Option(
            help="Cluster directory; created on first run, kept afterwards.")] = Path(
            ".commpipe/pgdata"),
    ) -> None:
        """Run the embedded PostgreSQL in the foreground and print its DSN."""
        from pipeline.dev.postgres import EmbeddedPostgres

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
            help="critical, error, warn, info or debug (default: COMMPIPE_WORKER_LOGLEVEL)")
        ] = None,
    ) -> None:
        """Run the stream job: create the topics if needed, then a Faust worker."""
        from rich.markup import escape

        from agents.topics import wait_and_ensure_commpipe_topics
        from pipeline.core.slo import check_file
        from pipeline.dev.process import run_sync
        from pipeline.errors import CommpipeError
        from pipeline.settings import Settings, unknown_variables

        for warning in unknown_variables():
            console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
        try:
            settings = Settings.from_env(worker_loglevel=loglevel)
            check_file(settings.slo_file)  # before any topic is created
            run_sync(lambda: wait_and_ensure_commpipe_topics(
                settings, wait_s=settings.broker_wait_s,
                on_retry=lambda m: console.print(f"[yellow]worker:[/] {escape(m)}",
                                                 highlight=False)))
        except CommpipeError as e:
            console.print(f"[red]error:[/] {escape(str(e))}", highlight=False)
            raise typer.Exit(1) from None
        from faust import Worker

        from agents import memory
        from agents.app import create_app

        pipeline = create_app(settings)
        worker = Worker(pipeline.app, loglevel=settings.worker_loglevel)
        memory.tune()  # rare full collections (agents/memory.py)
        # Faust's terminal spinner sets the root logger to DEBUG at warn and above, so every
        # library builds debug records that are then dropped (~12 % of the worker's CPU)
        worker.spinner = None
        worker.execute_from_commandline()

    @app.command()
    def demo(
        duration: Annotated[float | None, typer.Option(
            help="Seconds to run (default: until Ctrl-C).")] = None,
        rate: Annotated[float, typer.Option(help="Synthetic user requests per second.")
                        ] = 100.0,
        seed: Annotated[int, typer.Option(help="Seed of the traffic model.")] = 1,
    ) -> None:
        """Everything at once: broker, PostgreSQL, worker (sink, /metrics), synthetic traffic."""
        from pipeline.cli.demo import EXAMPLE_QUERIES, run_demo

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
            if result.graphs:
                out.print("The service graph: " + " and ".join(map(str, result.graphs))
                          + f" (again: {env}commpipe graph --since "
                          f"{math.ceil(result.lookback_s / 60)}m)",
                          highlight=False, soft_wrap=True, markup=False)
            if result.graph_note:
                console.print(result.graph_note, highlight=False, markup=False)

        guarded(console, run)

    @app.command()
    def loadgen(
        rate: Annotated[float, typer.Option(help="Synthetic user requests per second.")
                        ] = 100.0,
        duration: Annotated[float | None, typer.Option(
            help="Seconds to run (default: until Ctrl-C).")] = None,
        seed: Annotated[int, typer.Option(help="Seed of the traffic model.")] = 1,
    ) -> None:
        """Synthetic services emitting through the shim to COMMPIPE_KAFKA_BOOTSTRAP."""
        from pipeline.cli.loadgen import LoadGen
        from pipeline.settings import Settings
        from pipeline.shim.emitter import Emitter

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

        guarded(console, run)

    @app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                   "help_option_names": []})
    def bench(ctx: typer.Context) -> None:
        """The benchmarks, as python -m bench (--cases, --quick, --json; --help there)."""
        import subprocess
        import sys

        # A child process: the benchmarks use the library, the library never imports them.
        raise typer.Exit(subprocess.call([sys.executable, "-m", "bench", *ctx.args]))


def _run_service(svc: _Service, console: Any, starting: str, ready: Callable[[], None]) -> int:
    """Start ``svc``, call ``ready()``, serve until SIGINT/SIGTERM; always close it.

    The signal handlers are in place before the start, so a signal during the
    start stops the service right after it. Returns the exit code: 0 after a
    signal, 1 when a commpipe error occurred or the service died on its own.
    """
    from rich.markup import escape

    from pipeline.dev.process import log_tail
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


