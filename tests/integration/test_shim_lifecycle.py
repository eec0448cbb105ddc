"""The shim's life around the service that uses it, against the real broker: unusual input,
interpreter exit without ``close()``, ``fork()``, and ``flush()`` under steady traffic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import pytest

from pipeline import Emitter, Settings
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


def test_after_fork_parent_and_child_each_deliver_their_own_events_once(
        kafka_bootstrap: str, topic_factory: Callable[..., str]) -> None:
    topic = topic_factory(4)
    emitter = Emitter(kafka_bootstrap, topic, settings=Settings.from_env({}))
    for i in range(100):
        emitter.emit(request(i, "p"))
    assert emitter.flush(timeout=30) is True
    for i in range(20):  # buffered in the parent when it forks: the parent's to send
        emitter.emit(request(i, "b"))
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child, as a gunicorn worker would be
        code = 1
        try:
            os.close(read_end)
            ok = [emitter.emit(request(i, "k")) for i in range(200)]
            closed = emitter.close(timeout=30)
            stats = emitter.stats()
            os.write(write_end, json.dumps(
                [all(ok), closed, stats.sent, stats.dropped, stats.failed, stats.invalid,
                 stats.buffered]).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        for i in range(50):
            emitter.emit(request(i, "q"))
        assert emitter.close(timeout=30) is True
    finally:
        _, status = os.waitpid(pid, 0)
    with os.fdopen(read_end, "rb") as f:
        child = json.loads(f.read())
    assert os.waitstatus_to_exitcode(status) == 0
    assert child == [True, True, 200, 0, 0, 0, 0]
    stats = emitter.stats()
    assert (stats.sent, stats.dropped, stats.failed, stats.invalid) == (170, 0, 0, 0)
    received = read_back(kafka_bootstrap, topic, 370)
    assert sorted(e.correlation_id for _, _, e in received) == sorted(
        [f"p{i}" for i in range(100)] + [f"b{i}" for i in range(20)]
        + [f"q{i}" for i in range(50)] + [f"k{i}" for i in range(200)])


MULTIPROCESSING_CHILD = """
    import multiprocessing, sys
    from pipeline import Emitter, Settings

    emitter = Emitter(sys.argv[1], sys.argv[2], settings=Settings.from_env({}))

    def work(prefix):
        for i in range(300):
            emitter.request(source_service="orders", target_service="payments",
                            correlation_id=f"{prefix}{i}", ts=1_763_900_000.0 + i)
        # no close(): the worker process ends with os._exit, where atexit does not run

    if __name__ == "__main__":
        context = multiprocessing.get_context("fork")
        workers = [context.Process(target=work, args=(p,)) for p in ("x", "y")]
        for w in workers:
            w.start()
        for w in workers:
            w.join(60)
        sys.exit(max(w.exitcode for w in workers))
"""


def test_multiprocessing_children_deliver_what_they_emitted_without_close(
        kafka_bootstrap: str, topic_factory: Callable[..., str]) -> None:
    topic = topic_factory(4)
    done = run_script(MULTIPROCESSING_CHILD, kafka_bootstrap, topic)
    assert done.returncode == 0, done.stderr
    received = read_back(kafka_bootstrap, topic, 600)
    assert sorted(e.correlation_id for _, _, e in received) == sorted(
        [f"x{i}" for i in range(300)] + [f"y{i}" for i in range(300)])
