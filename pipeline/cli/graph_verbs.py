"""``commpipe graph``: the service graph from the rollups (part of the command line, which
only wires library pieces together; :mod:`pipeline.cli.graph` does the work)."""

from pathlib import Path
from typing import Annotated, Any

__all__ = ["add_commands", "default_out"]


def default_out(fmt: str) -> Path:
    return Path(f"commpipe-graph.{fmt}")


def add_commands(app: Any, console: Any) -> None:
    """Add ``graph`` to the typer ``app``; errors and the summary go to ``console``."""
    import typer

    from pipeline.cli.output import guarded

    @app.command()
    def graph(
        since: Annotated[str, typer.Option(
            help="Lookback: 90s, 30m, 1h, 2d (windows ending within it count).")] = "1h",
        fmt: Annotated[str | None, typer.Option(
            "--format", help="svg, html or dot (default: from --out's suffix, else html).")
                       ] = None,
        out: Annotated[Path | None, typer.Option(
            "--out", help="File to write (default: commpipe-graph.<format>; - for stdout).")
                       ] = None,
        postgres: Annotated[bool, typer.Option(
            "--postgres", help="Read PostgreSQL instead of the DuckDB file.")] = False,
    ) -> None:
        """Draw the service graph: services as nodes, edges as arrows with rate, p95 and
        error ratio, coloured by error ratio and circuit state.

        Laid out by Graphviz (svg and html need its dot program; dot does not)."""
        import sys

        from pipeline.cli import graph as g
        from pipeline.cli import graph_page
        from pipeline.cli.durations import parse_duration
        from pipeline.errors import ConfigError
        from pipeline.settings import Settings

        def run() -> None:
            chosen = fmt or (out.suffix.lstrip(".").lower() if out and str(out) != "-"
                             else "html")
            if chosen not in graph_page.FORMATS:
                raise ConfigError(f"--format must be svg, html or dot, not {chosen!r}")
            settings = Settings.from_env()
            seconds = parse_duration(since)
            drawn = g.read_graph(settings, seconds, postgres=postgres)
            where = "PostgreSQL" if postgres else f"the DuckDB file {settings.duckdb_path}"
            if not drawn.edges:
                raise ConfigError(f"no rollups in the last {since} in {where}: run the worker "
                                  "(or `commpipe demo`) first, or look further back (--since)")
            text = graph_page.render(drawn, chosen)  # type: ignore[arg-type]
            if out is not None and str(out) == "-":
                sys.stdout.write(text)
                return
            path = out or default_out(chosen)
            path.write_text(text, encoding="utf-8")
            console.print(f"wrote {path}: {len(drawn.services)} services, {len(drawn.edges)} "
                          f"edges from {where} (last {since})", highlight=False, markup=False)

        guarded(console, run)
