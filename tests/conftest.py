"""Session services for every test directory: Kafka and PostgreSQL, started lazily, once.

Where they come from is decided by :func:`pipeline.dev.process.choose_test_services`
from ``COMMPIPE_TEST_SERVICES`` (``auto`` | ``embedded`` | ``containers``):
testcontainers when a Docker engine answers (or when asked), the embedded
services otherwise. Which broker runs is ``COMMPIPE_TEST_BROKER``
(:func:`pipeline.dev.process.choose_test_broker`): ``tansu`` (the embedded Tansu
broker; the default without containers) or ``kafka`` (Apache Kafka: a local KRaft
node from :mod:`pipeline.dev.kafka`, or a container). Nothing starts unless a test
asks for one of these fixtures, so a unit-only run starts nothing. Everything
started here is stopped and removed at the end of the session.

Fixtures:

* ``test_services`` (session): ``"embedded"`` or ``"containers"``.
* ``test_broker`` (session): ``"tansu"`` or ``"kafka"``.
* ``kafka_bootstrap`` (session): ``"host:port"`` of the session broker. Workers started
  by ``tests/integration/workers.py`` get the settings that broker needs
  (``broker_env``): on Tansu only, one record per producer batch.
* ``broker`` (function): the session broker, for pause/resume tests; resumed (or
  started again) after each test. In containers mode a :class:`ContainerBroker`
  (``docker pause``), so these tests run in every mode.
* ``postgres_dsn`` (session): DSN of the session database.
* ``postgres`` (function): the session PostgreSQL, for stop/start tests; started again
  after each test if needed. In containers mode a :class:`ContainerPostgres` on a fixed
  host port (``docker stop`` / ``start`` keep its DSN and data).
* ``topic_factory`` (function): ``make(partitions=4) -> name`` creates a fresh,
  uniquely named topic on the session broker.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from pipeline.dev.process import (
    TEST_BROKER_ENV,
    TEST_SERVICES_ENV,
    TestBroker,
    TestServices,
    choose_test_broker,
    choose_test_services,
    docker_available,
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``kafka`` run Apache Kafka themselves (a cluster, the ``commpipe broker
    --engine kafka`` command): they run in a session on Apache Kafka (``COMMPIPE_TEST_BROKER
    =kafka``) or when ``-m`` names them, and are deselected (not skipped) in a Tansu session,
    whose run must pass without Java. ``.ci/run`` runs both sessions."""
    if "kafka" in (config.option.markexpr or ""):
        return
    services = choose_test_services(os.environ.get(TEST_SERVICES_ENV), docker_available)
    if choose_test_broker(os.environ.get(TEST_BROKER_ENV), services) == "kafka":
        return
    chosen = [item for item in items if item.get_closest_marker("kafka")]
    if chosen:
        config.hook.pytest_deselected(items=chosen)
        items[:] = [item for item in items if not item.get_closest_marker("kafka")]


@dataclass
class _Service:
    """A started session service: its address, and the object that controls it (an
    embedded service, or a container wrapper with the same fault methods)."""

    address: str
    control: Any


@pytest.fixture(scope="session")
def test_services() -> TestServices:
    """``"embedded"`` or ``"containers"``, from ``COMMPIPE_TEST_SERVICES`` and a Docker probe."""
    return choose_test_services(os.environ.get(TEST_SERVICES_ENV), docker_available)


@pytest.fixture(scope="session")
def test_broker(test_services: TestServices) -> TestBroker:
    """``"tansu"`` or ``"kafka"``, from ``COMMPIPE_TEST_BROKER`` (default: see the module doc)."""
    return choose_test_broker(os.environ.get(TEST_BROKER_ENV), test_services)


@pytest.fixture(scope="session")
def _kafka_service(test_services: TestServices, test_broker: TestBroker) -> Iterator[_Service]:
    from tests.integration.workers import register_broker

    if test_broker == "kafka" and test_services == "containers":
        try:
            from testcontainers.community.kafka import KafkaContainer
        except ImportError:  # testcontainers < 4.10 kept it at the top level
            from testcontainers.kafka import KafkaContainer

        from pipeline.dev.containers import ContainerBroker

        with KafkaContainer() as kafka:
            control = ContainerBroker(kafka)
            register_broker(control.bootstrap, control.WORKER_ENV)
            yield _Service(control.bootstrap, control)
        return
    if test_broker == "kafka":
        from pipeline.dev.kafka import KafkaBroker

        broker: Any = KafkaBroker(heap="1g")
    else:
        from pipeline.dev.broker import EmbeddedBroker

        broker = EmbeddedBroker()
    with broker:
        register_broker(broker.bootstrap, broker.WORKER_ENV)
        yield _Service(broker.bootstrap, broker)


@pytest.fixture(scope="session")
def _postgres_service(test_services: TestServices) -> Iterator[_Service]:
    if test_services == "containers":
        from pipeline.dev.containers import ContainerPostgres, postgres_container
        from pipeline.dev.process import free_port

        # a fixed host port: a docker stop / start (the postgres fixture) keeps the DSN
        with postgres_container("postgres:16-alpine", free_port()) as pg:
            control = ContainerPostgres(pg)
            yield _Service(control.dsn, control)
        return
    from pipeline.dev.postgres import EmbeddedPostgres

    with EmbeddedPostgres() as pg:
        yield _Service(pg.dsn, pg)


@pytest.fixture(scope="session")
def kafka_bootstrap(_kafka_service: _Service) -> str:
    """``host:port`` of the session's Kafka broker."""
    return _kafka_service.address


@pytest.fixture
def broker(_kafka_service: _Service) -> Iterator[Any]:
    """The session broker's control: ``pause``/``resume`` (and, embedded, ``stop``/``start``).

    After the test it is resumed if paused, or started again (same port) if the test
    stopped it.
    """
    b = _kafka_service.control
    yield b
    if b.paused:
        b.resume()
    if not b.is_running:
        b.start()


@pytest.fixture(scope="session")
def postgres_dsn(_postgres_service: _Service) -> str:
    """DSN of the session's PostgreSQL (no password with the embedded server)."""
    return _postgres_service.address


@pytest.fixture
def postgres(_postgres_service: _Service) -> Iterator[Any]:
    """The session PostgreSQL's control: ``stop``/``start`` keep its DSN and data
    (:class:`EmbeddedPostgres`, or :class:`ContainerPostgres` in containers mode).

    Started again after the test (same port and data) if the test stopped it.
    """
    pg = _postgres_service.control
    yield pg
    if not pg.is_running:
        pg.start()


@pytest.fixture
def topic_factory(kafka_bootstrap: str, request: pytest.FixtureRequest) -> Callable[..., str]:
    """``make(partitions=4) -> str``: create a new topic named after the test, return its name.

    Topics are created explicitly (:func:`agents.topics.ensure_topics`) with
    exactly ``partitions`` partitions; names are unique, so tests never share one.
    """
    from agents.topics import ensure_topics
    from pipeline.dev.process import run_sync

    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", request.node.name)[:80].strip("-.")

    def make(partitions: int = 4) -> str:
        name = f"test.{stem}.{uuid.uuid4().hex[:8]}"
        options = {"bootstrap_servers": kafka_bootstrap}
        run_sync(lambda: ensure_topics({name: partitions}, client_options=options))
        return name

    return make
