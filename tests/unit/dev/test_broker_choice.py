"""Which broker the test session runs (``COMMPIPE_TEST_BROKER``), and the fault controls
that let the fault tests run against containers too (Docker replaced by a recording fake)."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline.dev.broker import EmbeddedBroker
from pipeline.dev.containers import ContainerBroker, ContainerPostgres
from pipeline.dev.kafka import KafkaBroker
from pipeline.dev.process import choose_test_broker
from pipeline.errors import ConfigError, ServiceError


@pytest.mark.parametrize(("env_value", "services", "expected"), [
    (None, "embedded", "tansu"),
    ("", "embedded", "tansu"),
    (None, "containers", "kafka"),
    ("  ", "containers", "kafka"),
    ("kafka", "embedded", "kafka"),
    (" Kafka ", "embedded", "kafka"),
    ("tansu", "containers", "tansu"),
    ("TANSU", "embedded", "tansu"),
])
def test_choice(env_value: str | None, services: Any, expected: str) -> None:
    assert choose_test_broker(env_value, services) == expected


@pytest.mark.parametrize("bad", ["apache", "redpanda", "kafka,tansu"])
def test_unknown_broker_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        choose_test_broker(bad, "embedded")
    assert str(info.value) == f"COMMPIPE_TEST_BROKER must be tansu or kafka; got {bad!r}"


def test_only_tansu_needs_a_worker_workaround() -> None:
    assert EmbeddedBroker.WORKER_ENV == {"COMMPIPE_WORKER_CHANGELOG_LAST_ALONE": "true"}
    assert KafkaBroker.WORKER_ENV == {} and ContainerBroker.WORKER_ENV == {}


class FakeDocker:
    """The Docker SDK container: records calls, keeps a status as the engine would."""

    def __init__(self) -> None:
        self.status = "running"
        self.calls: list[str] = []

    def reload(self) -> None:
        self.calls.append("reload")

    def pause(self) -> None:
        self.calls.append("pause")
        self.status = "paused"

    def unpause(self) -> None:
        self.calls.append("unpause")
        self.status = "running"

    def stop(self, timeout: int = 10) -> None:
        self.calls.append(f"stop({timeout})")
        self.status = "exited"

    def start(self) -> None:
        self.calls.append("start")
        self.status = "running"


class FakeContainer:
    """A testcontainers container around :class:`FakeDocker`."""

    def __init__(self) -> None:
        self.docker = FakeDocker()

    def get_wrapped_container(self) -> FakeDocker:
        return self.docker

    def get_bootstrap_server(self) -> str:
        return "localhost:32771"

    def get_connection_url(self) -> str:
        return "postgresql://test:test@localhost:41000/test"


def _actions(docker: FakeDocker) -> list[str]:
    return [c for c in docker.calls if c != "reload"]


def test_the_kafka_container_pauses_and_resumes_like_a_local_broker() -> None:
    c = FakeContainer()
    broker = ContainerBroker(c)
    assert broker.bootstrap == "localhost:32771"
    assert broker.is_running and not broker.paused
    broker.pause()
    assert broker.paused and broker.is_running
    broker.resume()
    broker.resume()  # no-op when not paused
    assert not broker.paused
    assert _actions(c.docker) == ["pause", "unpause"]
    assert broker.start() is broker  # running: nothing to do
    with pytest.raises(ServiceError, match="pause it instead"):
        broker.stop()


def test_a_stopped_kafka_container_is_not_started_on_another_address() -> None:
    c = FakeContainer()
    c.docker.status = "exited"
    with pytest.raises(ServiceError, match="cannot come back on the same address"):
        ContainerBroker(c).start()
    assert _actions(c.docker) == []


def test_pausing_a_stopped_container_says_so() -> None:
    c = FakeContainer()
    c.docker.status = "exited"
    with pytest.raises(ServiceError, match="not running"):
        ContainerBroker(c).pause()


def test_the_postgres_container_stops_and_starts_keeping_its_dsn() -> None:
    c = FakeContainer()
    attempts: list[str] = []

    def connect(dsn: str) -> None:  # refuses twice, as a starting server does
        attempts.append(dsn)
        if len(attempts) < 3:
            raise OSError("connection refused")

    pg = ContainerPostgres(c, connect=connect, start_timeout=10)
    dsn = pg.dsn
    pg.stop()
    assert not pg.is_running
    pg.start()
    assert pg.is_running and pg.dsn == dsn
    assert attempts == [dsn] * 3
    assert _actions(c.docker) == ["stop(10)", "start"]
    pg.start()  # running: no second docker start
    assert _actions(c.docker) == ["stop(10)", "start"]


def test_a_postgres_container_that_never_answers_is_an_error() -> None:
    c = FakeContainer()
    c.docker.status = "exited"

    def refuse(dsn: str) -> None:
        raise OSError("connection refused")

    with pytest.raises(ServiceError) as info:
        ContainerPostgres(c, connect=refuse, start_timeout=0.5).start()
    assert str(info.value) == ("the PostgreSQL container did not accept connections within 0.5 s "
                               "after a start (last error: OSError)")
