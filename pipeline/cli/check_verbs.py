"""``commpipe check``: the CI gates of the specification (part of the command line, which only
wires library pieces together; :mod:`pipeline.cli.check` does the work)."""

import json
from pathlib import Path
from typing import Annotated, Any

__all__ = ["add_commands", "render_table"]


def _value(measured: float | None, unit: str) -> str:
    if measured is None:
        return "-"
    if unit in ("ratio", "share of services", "share of edges"):
        return f"{measured * 100:.4f}".rstrip("0").rstrip(".") + "%"
    return f"{measured:g}"


def _offender(o: dict[str, Any]) -> str:
    if "service" in o:
        return f"{o['service']} ({o['score']:g})"
    text = f"{o['source_service']} → {o['target_service']} · {o['protocol']}"
    if "cascades" in o:
        starts = ", ".join(f"{s['source_service']} → {s['target_service']} · {s['protocol']}"
                           for s in o.get("started_from", []))
        text += f" ({o['cascades']}/{o['calls']}" + (f", from {starts})" if starts else ")")
    elif "p95_ms" in o:
        text += f" (p95 {o['p95_ms']:.1f} ≥ {o['threshold_ms']:g} ms)"
    elif "dead_letters" in o:
        text += f" ({o['dead_letters']} dead letters)"
    elif "success" in o:
        text += f" ({o['success']:.4%})"
    return text


def render_table(out: Any, report: Any) -> None:
    """The report for people: one row per gate, offenders listed (at most 8 per gate)."""
    from rich.table import Table

    table = Table(title=f"commpipe check ({report.database}, last {report.since_s:g} s)")
    for column in ("gate", "result", "measured", "threshold", "offenders"):
        table.add_column(column, overflow="fold")
    for g in report.gates:
        result = {"passed": "[green]pass[/]", "failed": "[red]FAIL[/]",
                  "nothing_to_judge": "[red]FAIL (nothing to judge)[/]"}[g.status]
        shown = [_offender(o) for o in g.offenders[:8]]
        if len(g.offenders) > 8:
            shown.append(f"... {len(g.offenders) - 8} more (see --report)")
        if g.note:
            shown.append(g.note)
        table.add_row(g.name, result, _value(g.measured, g.unit),
                      f"{g.comparison} {_value(g.threshold, g.unit)}", "\n".join(shown))
    out.print(table)
    if report.disabled:
        out.print(f"disabled in the config: {', '.join(report.disabled)}", highlight=False)
    verdict = "[green]all gates passed[/]" if report.passed else "[red]gates failed[/]"
    out.print(verdict)


def add_commands(app: Any, console: Any, out: Any) -> None:
    """Add ``check`` to the typer ``app``; errors go to ``console``, the table to ``out``."""
    import typer

    from pipeline.cli.output import guarded

    @app.command()
    def check(
        config: Annotated[Path, typer.Option(
            help="The gates' config file (YAML or TOML).")] = Path(".communication.yml"),
        since: Annotated[str, typer.Option(help="Lookback: 90s, 30m, 1h, 2d.")] = "1h",
        report: Annotated[Path | None, typer.Option(
            help="Also write the JSON report to this file (e.g. protocol-report.json).")
                          ] = None,
        postgres: Annotated[bool, typer.Option(
            "--postgres", help="Read PostgreSQL instead of the DuckDB file.")] = False,
        as_json: Annotated[bool, typer.Option(
            "--json", help="Print the JSON report instead of the table.")] = False,
        schema: Annotated[bool, typer.Option(
            "--schema", help="Print the report's JSON Schema and exit.")] = False,
    ) -> None:
        """Judge the specification's gates over the lookback: approved protocols, resilience
        coverage, cascade failure rate, dead letters, latency SLA, delivery, health score.

        Exit 0 when every gate passes, 1 otherwise (a gate with nothing to judge fails)."""
        import time

        from pipeline.cli import check as c
        from pipeline.cli import query as q
        from pipeline.cli.check_config import read_config
        from pipeline.cli.durations import parse_duration
        from pipeline.settings import Settings

        if schema:
            print(json.dumps(c.REPORT_SCHEMA, indent=1))
            return
        passed = True

        def run() -> None:
            nonlocal passed
            since_s = parse_duration(since)
            cfg = read_config(config)
            settings = Settings.from_env()
            since_ts = time.time() - since_s
            if postgres:
                data = c.gather(lambda s: q.execute_postgres(
                    settings, s, min_version=c.SCHEMA_VERSION), since_ts)
            else:
                data = c.gather(lambda s: q.execute_duckdb(
                    settings.duckdb_path, s, min_version=c.SCHEMA_VERSION), since_ts)
            result = c.evaluate(cfg, data, database="postgres" if postgres else "duckdb",
                                config=str(config), since_s=since_s, since_ts=since_ts)
            document = json.dumps(result.to_json(), indent=1, ensure_ascii=False)
            if report is not None:
                try:
                    report.write_text(document + "\n", encoding="utf-8")
                except OSError as e:
                    from pipeline.errors import ConfigError

                    raise ConfigError(f"cannot write the report to {report}: {e.strerror}; "
                                      "pass a writable --report path") from None
            if as_json:
                print(document)
            else:
                render_table(out, result)
            passed = result.passed

        guarded(console, run)
        if not passed:
            raise typer.Exit(1)
