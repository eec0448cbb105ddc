"""What ``commpipe query`` and ``health`` print: values rounded to what they mean in tables
that fit the terminal; CSV and JSON at full precision."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from decimal import Decimal
from typing import Any

import pytest
from rich.console import Console

from pipeline.cli.cells import cell, csv_text, kind_of, plain
from pipeline.cli.data_verbs import HEALTH_KINDS, MISSES_KINDS, one_edge_column
from pipeline.cli.output import print_result
from pipeline.cli.query import Result
from pipeline.cli.tables import fit_widths, wrap

UTC = dt.UTC
WHEN = dt.datetime(2026, 11, 30, 3, 58, 50, tzinfo=UTC)
EPOCH = 1796011130.0  # WHEN as epoch seconds


@pytest.mark.parametrize(("column", "kind"), [
    ("latency_p95_ms", "ms"), ("max(latency_p99_ms)", "ms"), ("p99_ms", "ms"),
    ("error_ratio", "ratio"), ("avg(error_ratio)", "ratio"), ("error_rate", "percent"),
    ("success_rate", "percent"), ("cpu_pct", "percent"), ("ts", "epoch"),
    ("extract(epoch FROM window_start)", "epoch"), ("since_s", "seconds"),
    ("flush_duration_seconds", "seconds"), ("communication_score", "score"),
    ("throughput_rps", "rate"), ("status_code", "id"), ("version", "id"),
    ("requests", "count"), ("items", "count"), ("windows_missed", "count")])
def test_a_column_means_what_its_name_says(column: str, kind: str) -> None:
    assert kind_of(column) == kind


@pytest.mark.parametrize(("value", "kind", "shown"), [
    (518.094855040381, "ms", "518.1"), (Decimal("120.50"), "ms", "120.5"), (3, "ms", "3.0"),
    (12345.678, "ms", "12,345.7"),
    (0.0123, "ratio", "1.2 %"), (0.25, "ratio", "25.0 %"), (0.0025, "ratio", "0.25 %"),
    (0.9995, "ratio", "99.95 %"), (0.99999, "ratio", "99.999 %"), (1.0, "ratio", "100.0 %"),
    (0.0, "ratio", "0.00 %"), (0.000004, "ratio", "0.0004 %"),
    (Decimal("0.25"), "percent", "0.25 %"), (Decimal("12.00"), "percent", "12.0 %"),
    (EPOCH, "epoch", "2026-11-30T03:58:50Z"), (1.23456, "seconds", "1.235"),
    (Decimal("65.00"), "score", "65"), (72.5, "score", "72.5"), (12.345, "rate", "12.3"),
    (1234567, "count", "1,234,567"), (503, "id", "503"), (20261, "id", "20261"),
    (233.66706210867875, "count", "233.7"), (0.000123456, "count", "0.0001235"),
    (1796011130.0, "count", "1,796,011,130"), (2.0, "count", "2"), (True, "count", "true"),
    (None, "ms", ""), (float("nan"), "ms", "nan")])
def test_numbers_are_rounded_to_what_they_mean(value: Any, kind: Any, shown: str) -> None:
    assert cell(value, kind) == shown


def test_times_lists_mappings_and_text() -> None:
    berlin = dt.timezone(dt.timedelta(hours=1))
    assert cell(WHEN.astimezone(berlin)) == "2026-11-30T03:58:50Z"  # always UTC, named
    assert cell(WHEN.replace(microsecond=123456)) == "2026-11-30T03:58:50.123Z"
    assert cell(dt.datetime(2026, 11, 30, 3, 58, 50)) == "2026-11-30T03:58:50"  # no zone stored
    assert cell(["CIRCUIT_BREAKER_OPEN", "OPTIMIZE_LATENCY"]) == (
        "CIRCUIT_BREAKER_OPEN, OPTIMIZE_LATENCY")
    assert cell({"connection": 2, "http_5xx": 1}) == '{"connection": 2, "http_5xx": 1}'
    assert cell("bad\x1b[2Jthing\n") == "bad [2Jthing "  # no terminal control from the data


def test_csv_and_json_keep_full_precision() -> None:
    assert csv_text(518.094855040381) == "518.094855040381"
    assert csv_text(Decimal("120.50")) == "120.50"
    assert csv_text(WHEN.replace(microsecond=5)) == "2026-11-30T03:58:50.000005+00:00"
    assert csv_text({"a": [1, 2.5], "b": None}) == '{"a":[1,2.5],"b":null}'  # JSONB as JSON
    assert csv_text(["x", "y"]) == '["x","y"]'  # arrays as JSON, not Python's repr
    assert csv_text(None) == "" and csv_text(False) == "false"
    assert plain(518.094855040381) == 518.094855040381
    assert plain(Decimal("0.333333333333333333")) == "0.333333333333333333"
    assert plain({"t": WHEN}) == {"t": "2026-11-30T03:58:50+00:00"}
    assert plain(float("inf")) == "inf"


HEALTH = Result(
    ["service_name", "communication_score", "avg_latency", "error_rate", "reliability_issues",
     "recommendations"],
    [("orders", Decimal("65.00"), Decimal("120.50"), Decimal("0.25"),
      ["CIRCUIT_BREAKER_OPEN", "HEALTH_CHECK_FAILURES"], ["OPTIMIZE_LATENCY"]),
     ("gateway", Decimal("95.00"), Decimal("10.00"), Decimal("0.00"), [], [])])
MISSES = Result(
    ["source_service", "target_service", "protocol", "objective", "windows_missed", "threshold",
     "worst_miss", "last_window_end"],
    [("orders", "payments", "grpc", "latency_p95", 12, 100.0, 233.66706210867875, EPOCH),
     ("payments", "bank", "amqp", "delivery_success", 3, 0.999, 0.0123, EPOCH)])


def printed(result: Result, width: int, fmt: str = "table", **kw: Any) -> list[str]:
    console = Console(width=width, file=io.StringIO(), color_system=None)
    print_result(console, result, fmt, "title", **kw)
    return console.file.getvalue().splitlines()  # type: ignore[attr-defined]


def test_health_at_160_columns_is_one_line_per_service() -> None:
    lines = printed(HEALTH, 160, kinds=HEALTH_KINDS)
    assert max(len(line) for line in lines) <= 160
    assert lines[3].split() == ["orders", "65", "120.5", "0.25", "%", "CIRCUIT_BREAKER_OPEN,",
                                "HEALTH_CHECK_FAILURES", "OPTIMIZE_LATENCY"]
    assert lines[4].split() == ["gateway", "95", "10.0", "0.00", "%"]
    assert lines[-1] == "2 rows"


@pytest.mark.parametrize("width", [100, 120])
def test_a_table_that_does_not_fit_wraps_text_between_words_never_numbers(width: int) -> None:
    lines = printed(HEALTH, width, kinds=HEALTH_KINDS)
    assert max(len(line) for line in lines) <= width
    text = "\n".join(lines)
    for whole in ("CIRCUIT_BREAKER_OPEN", "HEALTH_CHECK_FAILURES", "OPTIMIZE_LATENCY", "120.5",
                  "0.25 %", "10.0", "0.00 %"):
        assert whole in text
    row = next(line for line in lines if line.startswith("orders"))
    assert row.split()[:5] == ["orders", "65", "120.5", "0.25", "%"]


def test_too_narrow_for_columns_prints_one_block_per_row() -> None:
    lines = printed(MISSES, 80, kinds=MISSES_KINDS)
    assert max(len(line) for line in lines) <= 80
    assert lines[1].startswith("-[ row 1 ]")
    pairs = [line.split(None, 1) for line in lines[2:10]]
    assert pairs == [["source_service", "orders"], ["target_service", "payments"],
                     ["protocol", "grpc"], ["objective", "latency_p95"], ["windows_missed", "12"],
                     ["threshold", "100.0"], ["worst_miss", "233.7"],
                     ["last_window_end", "2026-11-30T03:58:50Z"]]
    # the delivery objective's threshold and miss are ratios, shown as percentages
    assert ["threshold", "99.9 %"] in [line.split(None, 1) for line in lines[11:19]]
    assert ["worst_miss", "1.2 %"] in [line.split(None, 1) for line in lines[11:19]]
    assert lines[-1] == "2 rows; times in UTC"
    wide = printed(MISSES, 140, kinds=MISSES_KINDS)
    assert wide[3].split() == ["orders", "payments", "grpc", "latency_p95", "12", "100.0",
                               "233.7", "2026-11-30T03:58:50Z"]


def test_markup_in_values_is_printed_as_text() -> None:
    lines = printed(Result(["method"], [("[red]POST[/] /pay",), ("[/bold]",)]), 80)
    assert [line.rstrip() for line in lines[3:5]] == ["[red]POST[/] /pay", "[/bold]"]


def test_csv_and_json_output(capsys: pytest.CaptureFixture[str]) -> None:
    result = Result(["p99_ms", "errors_by_type", "window_start"],
                    [(518.094855040381, {"http_5xx": 2}, WHEN)])
    printed(result, 80, "csv")
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows == [["p99_ms", "errors_by_type", "window_start"],
                    ["518.094855040381", '{"http_5xx":2}', "2026-11-30T03:58:50+00:00"]]
    printed(result, 80, "json")
    assert json.loads(capsys.readouterr().out) == [{
        "p99_ms": 518.094855040381, "errors_by_type": {"http_5xx": 2},
        "window_start": "2026-11-30T03:58:50+00:00"}]


def test_wrap_and_widths() -> None:
    assert wrap("CIRCUIT_BREAKER_OPEN, OPTIMIZE_LATENCY", 22) == [
        "CIRCUIT_BREAKER_OPEN,", "OPTIMIZE_LATENCY"]
    assert wrap("communication_score", 15) == ["communication_", "score"]
    assert wrap("x" * 30, 12) == ["x" * 12, "x" * 12, "x" * 6]
    assert fit_widths(["a", "b"], [["1", "two words"]], [True, False], 80) == [1, 9]
    assert fit_widths(["a", "b"], [["1", "two words"]], [True, False], 8) == [1, 5]
    assert fit_widths(["a", "b"], [["12345678", "two"]], [True, False], 8) is None


def test_health_shows_the_missed_objectives_edge_in_one_column_to_fit_80() -> None:
    assert one_edge_column(MISSES).columns[0] == "edge"
    lines = printed(one_edge_column(MISSES), 80, kinds=MISSES_KINDS)
    assert max(len(line) for line in lines) <= 80
    assert not any(line.startswith("-[ row") for line in lines)  # a table, not blocks
    rows = [line.split() for line in lines if "2026-11-30T03:58:50Z" in line]
    assert rows[0][rows[0].index("latency_p95"):] == [
        "latency_p95", "12", "100.0", "233.7", "2026-11-30T03:58:50Z"]
    assert rows[1][rows[1].index("delivery_success"):] == [
        "delivery_success", "3", "99.9", "%", "1.2", "%", "2026-11-30T03:58:50Z"]
    assert rows[0][0] == "orders" and rows[1][0] == "payments"
