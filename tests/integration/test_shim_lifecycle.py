"""The shim's life around the service that uses it, against the real broker: unusual input,
interpreter exit without ``close()``, ``fork()``, and ``flush()`` under steady traffic."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import pytest

from tests.integration.test_shim_broker import read_back

pytestmark = pytest.mark.integration


def request(i: int, prefix: str = "c") -> dict[str, Any]:
    return {"v": 1, "kind": "request", "source_service": "orders",
            "target_service": "payments", "protocol": "http", "ts": 1_763_900_000.0 + i,
            "correlation_id": f"{prefix}{i}"}


def run_script(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                          capture_output=True, text=True, timeout=120)


EXIT_WITHOUT_CLOSE = """
    import sys
    from pipeline import Emitter, Settings
    emitter = Emitter(sys.argv[1], sys.argv[2], settings=Settings.from_env({}))
    for i in range(1000):
        emitter.request(source_service="orders", target_service="payments",
                        correlation_id=f"c{i}", ts=1_763_900_000.0 + i)
    # no close(): the interpreter's exit must deliver them
"""


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_events_are_delivered_at_exit_without_close(
        kafka_bootstrap: str, topic_factory: Callable[..., str], host: str) -> None:
    """The exit-time close() used to need a DNS lookup through an executor that can no
    longer start at that point: with a host name every event was lost."""
    topic = topic_factory(4)
    port = kafka_bootstrap.rsplit(":", 1)[1]
    done = run_script(EXIT_WITHOUT_CLOSE, f"{host}:{port}", topic)
    assert done.returncode == 0, done.stderr
    assert "can't register atexit" not in done.stderr
    received = read_back(kafka_bootstrap, topic, 1000)
    assert sorted(e.correlation_id for _, _, e in received) == sorted(
        f"c{i}" for i in range(1000))
