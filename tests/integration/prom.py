"""A real Prometheus server for tests (Debian's ``prometheus`` package): started on a free
loopback port with a generated configuration, scraping the targets it is given every
second, queried over its HTTP API, and always killed at the end."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.dev.process import free_port

SCRAPE_S = 1.0


def binary(name: str = "prometheus") -> str:
    """``prometheus`` or ``promtool``; a failure (never a skip) when not installed."""
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is needed: apt-get install -y prometheus (.ci/run does)")
    return found


class Prometheus:
    """One server; :meth:`query` returns the result of an instant query."""

    def __init__(self, workdir: Path, jobs: Mapping[str, Sequence[str]], *,
                 rule_files: Sequence[Path] = ()) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": f"{SCRAPE_S:g}s", "evaluation_interval": "1s",
                       "scrape_timeout": "900ms"},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": list(targets)}]}
                               for job, targets in jobs.items()],
        }
        self.config = workdir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Prometheus:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
        self.proc = subprocess.Popen(
            [binary(), f"--config.file={self.config}",
             f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}",
             "--web.console.templates=/nonexistent", "--web.console.libraries=/nonexistent"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:  # noqa: S310
                    if r.status == 200:
                        return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"prometheus did not start:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def api(self, path: str, **params: Any) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params, doseq=True)}"
        with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 - loopback
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant query ``expr`` (at ``at``, epoch seconds, else now): its result list."""
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.api("query", **params)
        return data["result"] if data["resultType"] in ("vector", "matrix") else [data]

    def vector(self, expr: str, at: float | None = None) -> dict[frozenset[tuple[str, str]],
                                                                 float]:
        """An instant vector as ``{labels: value}`` (``__name__`` left out)."""
        out = {}
        for sample in self.query(expr, at):
            labels = frozenset((k, v) for k, v in sample["metric"].items() if k != "__name__")
            assert labels not in out, (expr, labels)
            out[labels] = float(sample["value"][1])
        return out

    def samples(self, selector: str, seconds: float = 600) -> list[tuple[float, float]]:
        """Raw ``(timestamp, value)`` samples of one series over the last ``seconds``."""
        result = self.query(f"{selector}[{int(seconds)}s]")
        assert len(result) == 1, (selector, result)
        return [(float(t), float(v)) for t, v in result[0]["values"]]


@contextlib.contextmanager
def running(workdir: Path, jobs: Mapping[str, Sequence[str]], *,
            rule_files: Sequence[Path] = ()) -> Iterator[Prometheus]:
    server = Prometheus(workdir, jobs, rule_files=rule_files)
    try:
        yield server.start()
    finally:
        server.stop()
