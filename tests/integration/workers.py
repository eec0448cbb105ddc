"""Real ``commpipe worker`` processes for tests, and readers of what they wrote to Kafka."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from pipeline.core.store import State, decode_state, parse_id

# Test settings that make a worker join a group within seconds, on any broker.
FAST_JOIN = {"COMMPIPE_BROKER_SESSION_TIMEOUT_S": "6", "COMMPIPE_BROKER_HEARTBEAT_INTERVAL_S": "1"}

_BROKER_ENV: dict[str, dict[str, str]] = {}
"""What a worker needs on each broker the session started, by bootstrap address: the
broker class's ``WORKER_ENV`` (Tansu: one record per producer batch, as its end offsets
are right only then; Apache Kafka: nothing, the changelog producer batches)."""


def register_broker(bootstrap: str, worker_env: dict[str, str]) -> None:
    """Record the worker settings the broker at ``bootstrap`` needs (session fixtures)."""
    _BROKER_ENV[bootstrap] = dict(worker_env)


def broker_env(bootstrap: str) -> dict[str, str]:
    """Fast joins, plus the workarounds of the broker at ``bootstrap`` (none unless it was
    registered with some: a broker no fixture registered is taken for Apache Kafka)."""
    return {**FAST_JOIN, **_BROKER_ENV.get(bootstrap, {})}


# COMMPIPE_TEST_WORKER_LOGLEVEL=info keeps the rebalances and recoveries in the workers' logs
LOGLEVEL = os.environ.get("COMMPIPE_TEST_WORKER_LOGLEVEL", "warn")


def worker_environment(kafka_bootstrap: str, topic_factory: Callable[..., str], tmp_path: Path,
                       *, window_s: float, grace_s: float, idle_close_s: float = 3600.0,
                       **extra: str) -> dict[str, str]:
    """Environment of a test worker: fresh topics and app id, fast joins (and the broker's
    workarounds), no database unless ``extra`` configures one (``COMMPIPE_DUCKDB_PATH`` is
    empty by default)."""
    return {**broker_env(kafka_bootstrap), "COMMPIPE_KAFKA_BOOTSTRAP": kafka_bootstrap,
            "COMMPIPE_TOPIC": topic_factory(4), "COMMPIPE_DLQ_TOPIC": topic_factory(4),
            "COMMPIPE_PARTITIONS": "4", "COMMPIPE_APP_ID": f"t{uuid.uuid4().hex[:10]}",
            "COMMPIPE_WINDOW_S": str(window_s), "COMMPIPE_GRACE_S": str(grace_s),
            "COMMPIPE_IDLE_CLOSE_S": str(idle_close_s),
            "COMMPIPE_WORKER_DATADIR": str(tmp_path / "w"), "COMMPIPE_WORKER_LOGLEVEL": LOGLEVEL,
            "COMMPIPE_DUCKDB_PATH": "", "COMMPIPE_POSTGRES_DSN": "", "COMMPIPE_METRICS_PORT": "0",
            **extra}


@contextlib.contextmanager
def worker_starter(env: dict[str, str], tmp_path: Path
                   ) -> Iterator[Callable[[], WorkerProcess]]:
    """``start()`` runs one more worker with ``env``; every one is stopped at the end."""
    started: list[WorkerProcess] = []

    def start() -> WorkerProcess:
        worker = WorkerProcess(env, tmp_path / f"worker{len(started)}.log").start()
        started.append(worker)
        return worker

    try:
        yield start
    finally:
        for worker in started:
            worker.stop(timeout=15)


class WorkerProcess:
    """One ``commpipe worker`` subprocess; always killed at the end of the test.
    ``module``: what runs it (``tests.integration.faulty_worker``: one with a fault)."""

    def __init__(self, env: dict[str, str], log_path: Path, *,
                 module: str = "pipeline.cli") -> None:
        self.env = env
        self.log_path = log_path
        self.module = module
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module, "worker"], env={**os.environ, **self.env},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: the crash case."""
        if self.alive:
            assert self.proc is not None
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout`` (a worker in wait_empty may ignore TERM)."""
        if not self.alive:
            return self.proc.returncode if self.proc else None
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def assigned(worker: WorkerProcess, topic: str) -> set[int] | None:
    """The input partitions of the worker's latest assignment (None before its first; the
    worker logs it at ``COMMPIPE_WORKER_LOGLEVEL=info``)."""
    chunks = worker.log().split("Setting newly assigned partitions")
    if len(chunks) < 2:
        return None
    table = chunks[-1].split("for group")[0]
    found = re.search(rf"\|\s*{re.escape(topic)}\s*\|\s*\{{([0-9, -]+)\}}", table)
    out: set[int] = set()
    for part in (found.group(1).split(",") if found else []):
        low, _, high = part.strip().partition("-")
        out.update(range(int(low), int(high or low) + 1))
    return out


def run(coro_factory: Callable[[], Any]) -> Any:
    return asyncio.run(coro_factory())


async def _read_all(bootstrap: str, topic: str) -> list[Any]:
    """Every record of ``topic`` from the beginning to its current end."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic)
        if partitions is None:
            await consumer._client.force_metadata_update()  # noqa: SLF001
            partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        if not tps:
            return []
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out: list[Any] = []
        deadline = time.monotonic() + 30
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read {topic} to its end")
            for messages in (await consumer.getmany(timeout_ms=300)).values():
                out.extend(messages)
        return out
    finally:
        await consumer.stop()


def read_state(bootstrap: str, app_id: str) -> dict[str, State]:
    """The table as its changelog holds it (latest value per key), checking that every key
    sits in the changelog partition of its source partition."""
    store: dict[str, State] = {}
    for message in run(lambda: _read_all(bootstrap, f"{app_id}-state-changelog")):
        key = message.key.decode()
        assert parse_id(key)[1] == message.partition, (key, message.partition)
        if message.value is None:
            store.pop(key, None)
        else:
            store[key] = decode_state(message.value)
    return store


def read_topic(bootstrap: str, topic: str) -> list[Any]:
    return run(lambda: _read_all(bootstrap, topic))


def wait_until(check: Callable[[], bool], *, timeout: float, what: str,
               logs: Callable[[], str] = lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{logs()[-3000:]}")
