"""Grafana's provisioning files, as Grafana and docker-compose read them: the data source,
the dashboard provider, the dashboards' JSON and the compose service that mounts them.
(Every panel's query runs against a real Prometheus in
tests/integration/test_dashboards.py.)"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
UID = "commpipe-prometheus"


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def boards() -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in DASHBOARDS]


def test_the_data_source_is_the_compose_prometheus() -> None:
    config = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    [source] = config["datasources"]
    assert (source["uid"], source["type"], source["isDefault"]) == (UID, "prometheus", True)
    prometheus = compose()["services"]["prometheus"]
    assert source["url"] == "http://prometheus:9090"
    assert prometheus["ports"] == ["${PUBLISH_ADDRESS:-127.0.0.1}:9090:9090"]
    scrape = yaml.safe_load((ROOT / "prometheus.yml").read_text())["global"]["scrape_interval"]
    assert source["jsonData"]["timeInterval"] == scrape  # $__rate_interval >= 4 scrapes


def test_compose_runs_grafana_with_the_repository_provisioning() -> None:
    grafana = compose()["services"]["grafana"]
    volumes = grafana["volumes"]
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in volumes
    mount = next(v.split(":")[1] for v in volumes if v.startswith("./grafana/dashboards:"))
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/commpipe.yml").read_text())
    assert [p["options"]["path"] for p in provider["providers"]] == [mount]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(mount + "/") and (GRAFANA / "dashboards" / Path(home).name).exists()
    # the admin password comes from the environment, never from the repository
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == (
        "${GRAFANA_ADMIN_PASSWORD:?set GRAFANA_ADMIN_PASSWORD}")
    assert grafana["ports"] == ["${PUBLISH_ADDRESS:-127.0.0.1}:3000:3000"]
    assert "prometheus" in grafana["depends_on"]


def _overlap(a: dict[str, int], b: dict[str, int]) -> bool:
    return (a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"]
            and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"])


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_well_formed(path: Path) -> None:
    board = json.loads(path.read_text())
    assert board["uid"] == path.stem and board["title"].startswith("commpipe: ")
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for i, p in enumerate(panels):
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        assert not any(_overlap(g, q["gridPos"]) for q in panels[i + 1:]), p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": UID}, p["title"]
        assert p["description"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(set(refs)) == len(refs), p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == UID and t["expr"].strip(), p["title"]
            # commpipe's metrics in the default namespace (or Prometheus's own `up`)
            assert re.search(r"\bcommpipe_[a-z_]+\b|\bup\{", t["expr"]), p["title"]
        if p["type"] == "heatmap":
            assert [t["format"] for t in p["targets"]] == ["heatmap"]
            assert "_bucket" in p["targets"][0]["expr"] and "by (le)" in p["targets"][0]["expr"]
    for var in board["templating"]["list"]:
        assert var["datasource"]["uid"] == UID and var["query"]["query"].startswith(
            "label_values(")


def test_the_dashboards_show_what_the_issue_asks_for() -> None:
    """RED per edge, latency quantiles and a heatmap, errors by type, circuit state over time,
    objectives missed; lag, dead letters, duplicates, sink failures and shim drops."""
    panels = {p["title"]: p for b in boards() for p in b["panels"] if p["type"] != "row"}
    exprs = {title: " ".join(t["expr"] for t in p["targets"]) for title, p in panels.items()}

    def shown(metric: str, kind: str | None = None) -> bool:
        return any(metric in e and (kind is None or panels[t]["type"] == kind)
                   for t, e in exprs.items())

    assert shown("commpipe_communication_requests_total")
    assert shown("commpipe_communication_errors_total")
    assert any("histogram_quantile(0.95" in e for e in exprs.values())
    assert shown("commpipe_communication_latency_seconds_bucket", "heatmap")
    assert shown("error_type") and "error_type" in exprs["Errors per second, by type"]
    assert shown("commpipe_communication_circuit_state", "state-timeline")
    assert shown("commpipe_slo_ok")
    for metric in ("commpipe_consumer_lag", "commpipe_dead_letters_total",
                   "commpipe_duplicate_events_total", "commpipe_sink_flush_failures_total",
                   "commpipe_shim_events_dropped_total"):
        assert shown(metric), metric
