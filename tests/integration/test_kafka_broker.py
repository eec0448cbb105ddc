"""Apache Kafka for dev and tests (pipeline/dev/kafka.py) and ``commpipe broker --engine
kafka``, for real: a JVM per test, its storage in the test's directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from pipeline.dev.kafka import KafkaBroker
from pipeline.dev.process import free_port, run_sync
from pipeline.errors import ServiceError

pytestmark = [pytest.mark.integration, pytest.mark.kafka, pytest.mark.timeout(240)]


def _commpipe() -> list[str]:
    script = Path(sys.executable).with_name("commpipe")
    return [str(script)] if script.exists() else [sys.executable, "-m", "pipeline.cli"]


def _jvms(needle: str) -> list[str]:
    """Command lines of running java processes that mention ``needle``."""
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines()
            if needle in line and "kafka.Kafka" in line and "ps -eo" not in line]


async def _send(bootstrap: str, topic: str, values: list[bytes]) -> list[int]:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        return [(await producer.send_and_wait(topic, v, partition=2)).offset for v in values]
    finally:
        await producer.stop()


async def _read(bootstrap: str, topic: str, partition: int) -> list[bytes]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        out: list[bytes] = []
        while await consumer.position(tp) < end:
            for messages in (await consumer.getmany(tp, timeout_ms=1000)).values():
                out.extend(m.value for m in messages)
        return out
    finally:
        await consumer.stop()


def test_commpipe_broker_engine_kafka_keeps_data_and_stops_cleanly(tmp_path: Path) -> None:
    """Two runs on one data directory, stopped with Ctrl-C (SIGINT) and then SIGTERM: each
    exits 0 with no JVM left, and the second still has the first one's topics and records."""
    data_dir = tmp_path / "kafka"
    env = {**os.environ, "COMMPIPE_TOPIC": "cli.events", "COMMPIPE_DLQ_TOPIC": "cli.dlq"}

    def run(sig: int, value: bytes) -> tuple[list[int], list[bytes], str]:
        port = free_port()
        proc = subprocess.Popen(
            [*_commpipe(), "broker", "--engine", "kafka", "--port", str(port), "--partitions",
             "3", "--data-dir", str(data_dir)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()  # printed once broker and topics are ready
            assert line == f"127.0.0.1:{port}", proc.stderr.read() if proc.stderr else ""
            offsets = run_sync(lambda: _send(line, "cli.events", [value]))
            stored = run_sync(lambda: _read(line, "cli.events", 2))
            proc.send_signal(sig)
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        err = proc.stderr.read() if proc.stderr else ""
        assert code == 0, err
        assert _jvms(str(data_dir)) == []
        return offsets, stored, err

    assert run(signal.SIGINT, b"first")[:2] == ([0], [b"first"])
    offsets, stored, err = run(signal.SIGTERM, b"second")
    assert (offsets, stored) == ([1], [b"first", b"second"])  # the first run's record is kept
    assert "SIGTERM received; stopping." in err
    assert "Apache Kafka 4." in err and "kept when it stops" in err


def test_a_killed_node_comes_back_with_every_acknowledged_record(tmp_path: Path) -> None:
    from agents.topics import ensure_topics

    broker = KafkaBroker(data_dir=tmp_path / "node", heap="512m")
    with broker:
        run_sync(lambda: ensure_topics({"kept": 4}, client_options={
            "bootstrap_servers": broker.bootstrap}))
        values = [f"r{i}".encode() for i in range(50)]
        assert run_sync(lambda: _send(broker.bootstrap, "kept", values)) == list(range(50))
        pid = broker.pid
        broker.kill()
        assert not broker.is_running and _jvms(str(tmp_path / "node")) == []
        broker.start()
        assert broker.pid != pid
        assert run_sync(lambda: _read(broker.bootstrap, "kept", 2)) == values
    assert _jvms(str(tmp_path / "node")) == []


def test_a_broker_that_cannot_start_quotes_its_log(tmp_path: Path) -> None:
    broker = KafkaBroker(data_dir=tmp_path / "node", heap="1k")  # the JVM refuses this heap
    with pytest.raises(ServiceError) as info:
        broker.start()
    first, _, rest = str(info.value).partition("\n")
    assert first.startswith("Apache Kafka node 1 on 127.0.0.1:") and "exited with code" in first
    assert "heap" in rest.lower()
    assert not broker.is_running
    broker.close()


def _path_without(tmp_path: Path, *tools: str) -> str:
    """A PATH holding this Python's scripts and the system's tools, less ``tools``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for directory in ("/usr/local/bin", "/usr/bin", "/bin"):
        for entry in Path(directory).iterdir() if Path(directory).is_dir() else []:
            target = bin_dir / entry.name
            if entry.name not in tools and not target.exists():
                target.symlink_to(entry)
    return f"{Path(sys.executable).parent}{os.pathsep}{bin_dir}"


@pytest.mark.parametrize(("missing", "message"), [
    ("java", "Apache Kafka needs Java 17 or newer, and no java was found"),
    ("mvn", "fetching Apache Kafka's jars needs Maven, and no mvn was found on PATH"),
])
def test_commpipe_broker_names_what_is_missing(tmp_path: Path, missing: str,
                                               message: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "JAVA_HOME"}
    env |= {"PATH": _path_without(tmp_path, missing), "XDG_CACHE_HOME": str(tmp_path / "cache"),
            "COLUMNS": "500"}  # an empty cache: the jars would have to be fetched
    done = subprocess.run([*_commpipe(), "broker", "--engine", "kafka", "--port", "0",
                           "--data-dir", str(tmp_path / "kafka")], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), done.stderr
    assert done.stdout == ""
