"""The alert rules with Prometheus's own tool: ``promtool check rules`` (syntax, PromQL,
templates), ``promtool test rules`` (series in, expected alerts out:
prometheus/alerts.test.yml) and ``promtool check config`` on the compose configuration that
loads them. How they behave on a real worker's metrics is
tests/integration/test_dashboards.py::test_alert_rules_evaluate_on_the_real_metrics."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "prometheus/alerts.yml"
TESTS = ROOT / "prometheus/alerts.test.yml"
ALERTS = {"CommpipeEdgeErrorRatioHigh", "CommpipeLatencyP95OverObjective", "CommpipeCircuitOpen",
          "CommpipeConsumerLagHigh", "CommpipeSinkFailing", "CommpipeShimDropping"}


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.fail("promtool is needed: apt-get install -y prometheus (.ci/run does)")
    return subprocess.run([tool, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_promtool_check_rules() -> None:
    done = promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 9 rules found" in done.stdout  # three recording rules, six alerts


def test_promtool_test_rules() -> None:
    done = promtool("test", "rules", TESTS.name, cwd=TESTS.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_a_broken_rule_fails_the_unit_tests(tmp_path: Path) -> None:
    """The unit tests can fail: the same tests against rules whose thresholds moved."""
    for old, new in (("> 0.05\n", "> 0.5\n"), ("== 1\n", "== 0\n"), ("> 10000", "> 100000"),
                     ("unless increase", "and increase")):
        text = RULES.read_text()
        assert old in text, old
        (tmp_path / "alerts.yml").write_text(text.replace(old, new, 1))
        shutil.copy(TESTS, tmp_path / TESTS.name)
        done = promtool("test", "rules", TESTS.name, cwd=tmp_path)
        assert done.returncode == 1 and "FAILED" in done.stdout + done.stderr, old


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    alerts = {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}
    assert set(alerts) == ALERTS
    for rule in alerts.values():
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    cases = [case for test in yaml.safe_load(TESTS.read_text())["tests"]
             for case in test.get("alert_rule_test", [])]
    fired = {c["alertname"] for c in cases if c["exp_alerts"]}
    quiet = {c["alertname"] for c in cases if not c["exp_alerts"]}
    assert fired == ALERTS
    # every alert is also shown not firing where it must not (before its `for`, or a
    # neighbour below the threshold in the same series set)
    assert quiet | {"CommpipeCircuitOpen"} == ALERTS


def test_promtool_check_config_of_compose() -> None:
    done = promtool("check", "config", "prometheus.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 1 rule files found" in done.stdout
