"""The embedded dev services, topic creation and the ``commpipe`` service commands, for real."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError

from agents.topics import ensure_commpipe_topics, ensure_topics
from pipeline.dev.broker import EmbeddedBroker
from pipeline.dev.postgres import EmbeddedPostgres
from pipeline.dev.process import free_port, run_sync
from pipeline.errors import ConfigError, ServiceError
from pipeline.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def _ps_lines(needle: str) -> list[str]:
    """Command lines of running processes that contain ``needle``."""
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if needle in line and "ps -eo" not in line]


def _commpipe() -> list[str]:
    script = Path(sys.executable).with_name("commpipe")
    return [str(script)] if script.exists() else [sys.executable, "-m", "pipeline.cli"]


async def _partitions(bootstrap: str, topic: str) -> set[int]:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        return set(await producer.partitions_for(topic))
    finally:
        await producer.stop()


# -- broker ------------------------------------------------------------------


@pytest.mark.parametrize("count", [4, 1, 6])
def test_topic_has_exactly_the_partitions_asked_for(topic_factory, kafka_bootstrap, count) -> None:
    topic = topic_factory(count)
    assert run_sync(lambda: _partitions(kafka_bootstrap, topic)) == set(range(count))


def test_produce_consume_round_trip(topic_factory, kafka_bootstrap) -> None:
    topic = topic_factory(4)
    sent = [(b"k%d" % (i % 3), b"value-%d" % i) for i in range(7)]

    async def go() -> list[tuple[bytes, bytes]]:
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        try:
            for key, value in sent:
                await producer.send_and_wait(topic, value, key=key)
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        got: list[tuple[bytes, bytes]] = []
        try:
            async with asyncio.timeout(20):
                while len(got) < len(sent):
                    batch = await consumer.getmany(timeout_ms=500)
                    got += [(r.key, r.value) for recs in batch.values() for r in recs]
        finally:
            await consumer.stop()
        return got

    got = run_sync(go)
    assert sorted(got) == sorted(sent)
    # Records with one key keep their order (same partition).
    for key in (b"k0", b"k1", b"k2"):
        assert [v for k, v in got if k == key] == [v for k, v in sent if k == key]


def test_pause_makes_produce_time_out_and_resume_lets_it_through(broker, topic_factory) -> None:
    topic = topic_factory(1)

    async def go() -> tuple[type[BaseException], float, int]:
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, request_timeout_ms=1000)
        await producer.start()
        try:
            await producer.send_and_wait(topic, b"before")
            broker.pause()
            began = time.monotonic()
            try:
                await asyncio.wait_for(producer.send_and_wait(topic, b"during"), 15)
            except KafkaError as e:
                error, waited = type(e), time.monotonic() - began
            else:
                pytest.fail("a produce to a paused broker succeeded")
            broker.resume()
            meta = await asyncio.wait_for(producer.send_and_wait(topic, b"after"), 15)
            return error, waited, meta.offset
        finally:
            broker.resume()
            await producer.stop()

    error, waited, offset = run_sync(go)
    assert issubclass(error, KafkaError)
    assert waited < 10
    assert offset >= 1  # "before" is offset 0; "after" lands behind it


def test_restart_keeps_the_port_and_loses_topics(topic_factory) -> None:
    with EmbeddedBroker() as b:
        bootstrap = b.bootstrap
        run_sync(lambda: ensure_topics({"kept.or.not": 2}, client_options={
            "bootstrap_servers": bootstrap}))
        first_pid = b.pid
        b.restart()
        assert b.bootstrap == bootstrap
        assert b.pid != first_pid

        async def topics() -> list[str]:
            from aiokafka.admin import AIOKafkaAdminClient

            admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
            await admin.start()
            try:
                return await admin.list_topics()
            finally:
                await admin.close()

        assert run_sync(topics) == []
        pid = b.pid
    assert not b.is_running
    assert _ps_lines(f"tcp://{bootstrap} ") == []
    assert pid is not None and not Path(f"/proc/{pid}").exists()


def test_start_failure_quotes_the_broker_log(tmp_path) -> None:
    fake = tmp_path / "fake-tansu"
    fake.write_text("#!/bin/sh\necho 'first line'\necho 'broker could not bind' >&2\nexit 3\n")
    fake.chmod(0o755)
    b = EmbeddedBroker(binary=fake, start_timeout=5)
    with pytest.raises(ServiceError) as info:
        b.start()
    message = str(info.value)
    assert "exited with code 3" in message
    assert message.endswith("first line\nbroker could not bind")
    b.close()


def test_start_on_a_busy_port_says_so() -> None:
    with EmbeddedBroker() as running:
        with pytest.raises(ServiceError, match=f"{running.bootstrap} is already in use"):
            EmbeddedBroker(running.port).start()


def test_ensure_topics_is_idempotent_and_rejects_another_count(topic_factory, kafka_bootstrap):
    topic = topic_factory(2)
    options = {"bootstrap_servers": kafka_bootstrap}
    assert run_sync(lambda: ensure_topics({topic: 2}, client_options=options)) == {topic: False}
    with pytest.raises(ConfigError) as info:
        run_sync(lambda: ensure_topics({topic: 4}, client_options=options))
    assert str(info.value) == (
        f"topic {topic!r} exists with 2 partitions but 4 are wanted; "
        "delete the topic or use 2 partitions"
    )
    fresh = topic + ".new"
    assert run_sync(lambda: ensure_topics({fresh: 3, topic: 2}, client_options=options)) == {
        fresh: True, topic: False}
    assert run_sync(lambda: _partitions(kafka_bootstrap, fresh)) == {0, 1, 2}


def test_the_otlp_topic_is_created_when_missing_and_left_alone_when_it_exists(
        topic_factory, kafka_bootstrap) -> None:
    """The Collector may have made the OTLP topic with any count; the bridge reads any."""
    events, theirs = topic_factory(4), topic_factory(2)
    app = f"t{uuid.uuid4().hex[:10]}"
    own = [f"{app}-state-changelog", f"{app}-__assignor-__leader"]
    settings = Settings(kafka_bootstrap=kafka_bootstrap, topic=events, dlq_topic=events + ".dlq",
                        partitions=4, otlp_topic=theirs, app_id=app)
    assert run_sync(lambda: ensure_commpipe_topics(settings)) == {
        events: False, events + ".dlq": True, theirs: False, **dict.fromkeys(own, True)}
    assert run_sync(lambda: _partitions(kafka_bootstrap, theirs)) == {0, 1}
    missing = events + ".spans"
    settings = Settings(kafka_bootstrap=kafka_bootstrap, topic=events, dlq_topic=events + ".dlq",
                        partitions=4, otlp_topic=missing, app_id=app)
    assert run_sync(lambda: ensure_commpipe_topics(settings)) == {
        events: False, events + ".dlq": False, missing: True, **dict.fromkeys(own, False)}
    assert run_sync(lambda: _partitions(kafka_bootstrap, missing)) == {0, 1, 2, 3}
    # a topic of commpipe's own still has to have the count asked for
    with pytest.raises(ConfigError, match="exists with 2 partitions but 4 are wanted"):
        run_sync(lambda: ensure_commpipe_topics(Settings(
            kafka_bootstrap=kafka_bootstrap, topic=theirs, dlq_topic=events + ".dlq",
            partitions=4, otlp_topic=missing, app_id=app)))


def test_ensure_topics_without_a_broker_is_a_service_error() -> None:
    options = {"bootstrap_servers": f"127.0.0.1:{free_port()}"}
    with pytest.raises(ServiceError, match="could not create topics on Kafka at 127.0.0.1:"):
        run_sync(lambda: ensure_topics({"t": 1}, client_options=options, timeout_ms=2000))


# -- postgres ----------------------------------------------------------------


def test_postgres_data_survives_stop_and_start(postgres) -> None:
    import psycopg

    dsn = postgres.dsn
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS survive")
        conn.execute("CREATE TABLE survive (id int PRIMARY KEY, name text)")
        conn.execute("INSERT INTO survive VALUES (1, 'a'), (2, 'b'), (3, 'c')")
    postgres.stop()
    assert not postgres.is_running
    with pytest.raises(psycopg.OperationalError, match="Connection refused"):
        psycopg.connect(dsn, connect_timeout=2)
    postgres.start()
    assert postgres.dsn == dsn
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT id, name FROM survive ORDER BY id").fetchall()
        conn.execute("DROP TABLE survive")
    assert rows == [(1, "a"), (2, "b"), (3, "c")]


def test_postgres_dsn_fixture_connects_as_postgres(postgres_dsn) -> None:
    import psycopg

    with psycopg.connect(postgres_dsn) as conn:
        assert conn.execute("SELECT 20 + 22").fetchone() == (42,)


def test_private_postgres_leaves_nothing_behind() -> None:
    import psycopg

    pg = EmbeddedPostgres()
    with pg:
        with psycopg.connect(pg.dsn) as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
        data_dir, pid = pg.data_dir, pg.pid
    assert pid is not None and not Path(f"/proc/{pid}").exists()
    assert _ps_lines(str(data_dir)) == []
    assert not data_dir.exists()


# -- the commpipe command ----------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_commpipe_broker_serves_and_stops_cleanly(sig) -> None:
    port = free_port()
    env = {**os.environ, "COMMPIPE_TOPIC": "cli.events", "COMMPIPE_DLQ_TOPIC": "cli.dlq"}
    proc = subprocess.Popen(
        [*_commpipe(), "broker", "--port", str(port), "--partitions", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()  # printed once the broker and topics are ready
        assert line == f"127.0.0.1:{port}"

        async def produce() -> tuple[set[int], set[int], int]:
            producer = AIOKafkaProducer(bootstrap_servers=line)
            await producer.start()
            try:
                meta = await producer.send_and_wait("cli.events", b"hello", partition=2)
                return (set(await producer.partitions_for("cli.events")),
                        set(await producer.partitions_for("cli.dlq")), meta.offset)
            finally:
                await producer.stop()

        assert run_sync(produce) == ({0, 1, 2}, {0, 1, 2}, 0)
        began = time.monotonic()
        proc.send_signal(sig)
        code = proc.wait(timeout=10)
        took = time.monotonic() - began
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0, proc.stderr.read() if proc.stderr else ""
    assert took < 5
    assert _ps_lines(f"tcp://127.0.0.1:{port} ") == []


def test_commpipe_postgres_keeps_data_across_runs(tmp_path) -> None:
    import psycopg

    data_dir = tmp_path / "pgdata"

    def run(statement: str) -> list[tuple[object, ...]]:
        port = free_port()
        proc = subprocess.Popen(
            [*_commpipe(), "postgres", "--port", str(port), "--data-dir", str(data_dir)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            assert proc.stdout is not None
            dsn = proc.stdout.readline().strip()
            assert dsn == f"postgresql://postgres@127.0.0.1:{port}/postgres"
            with psycopg.connect(dsn, autocommit=True) as conn:
                cur = conn.execute(statement)
                rows = cur.fetchall() if cur.description else []
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return rows

    run("CREATE TABLE kept AS SELECT 7 AS n")
    assert run("SELECT n FROM kept") == [(7,)]
    assert _ps_lines(str(data_dir)) == []


def test_commpipe_without_typer_names_the_extra() -> None:
    code = "import sys; sys.modules['typer'] = None; from pipeline.cli import main; main()"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 1
    assert result.stderr == (
        "commpipe's command line needs the server extra: pip install 'commpipe[server]'\n"
    )
