"""Session services for every test directory: Kafka and PostgreSQL, started lazily, once.

Where they come from is decided by :func:`pipeline.dev.process.choose_test_services`
from ``COMMPIPE_TEST_SERVICES`` (``auto`` | ``embedded`` | ``containers``):
testcontainers when a Docker engine answers (or when asked), the embedded
Tansu broker and PostgreSQL otherwise. Nothing starts unless a test asks for
one of these fixtures, so a unit-only run starts nothing. Everything started
here is stopped and removed at the end of the session.

Fixtures:

* ``test_services`` (session): ``"embedded"`` or ``"containers"``.
* ``kafka_bootstrap`` (session): ``"host:port"`` of the session broker.
* ``broker`` (function): the session :class:`EmbeddedBroker`, for pause/resume
  tests; resumed (or started again) after each test; skipped with containers.
* ``postgres_dsn`` (session): DSN of the session database.
* ``postgres`` (function): the session :class:`EmbeddedPostgres`, for stop/start
  tests; started again after each test if needed; skipped with containers.
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
    TEST_SERVICES_ENV,
    TestServices,
    choose_test_services,
    docker_available,
)


@dataclass
class _Service:
    """A started session service: its address, and the embedded object when there is one."""

    address: str
    embedded: Any | None


@pytest.fixture(scope="session")
def test_services() -> TestServices:
    """``"embedded"`` or ``"containers"``, from ``COMMPIPE_TEST_SERVICES`` and a Docker probe."""
    return choose_test_services(os.environ.get(TEST_SERVICES_ENV), docker_available)


@pytest.fixture(scope="session")
def _kafka_service(test_services: TestServices) -> Iterator[_Service]:
    if test_services == "containers":
        try:
            from testcontainers.community.kafka import KafkaContainer
        except ImportError:  # testcontainers < 4.10 kept it at the top level
            from testcontainers.kafka import KafkaContainer

        with KafkaContainer() as kafka:
            yield _Service(kafka.get_bootstrap_server(), None)
        return
    from pipeline.dev.broker import EmbeddedBroker

    with EmbeddedBroker() as broker:
        yield _Service(broker.bootstrap, broker)


@pytest.fixture(scope="session")
def _postgres_service(test_services: TestServices) -> Iterator[_Service]:
    if test_services == "containers":
        try:
            from testcontainers.community.postgres import PostgresContainer
        except ImportError:
            from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as pg:
            yield _Service(pg.get_connection_url(), None)
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
    """The session's :class:`~pipeline.dev.broker.EmbeddedBroker` (embedded services only).

    After the test it is resumed if paused, or started again (same port, no
    topics) if the test stopped it.
    """
    b = _kafka_service.embedded
    if b is None:
        pytest.skip("needs the embedded broker (pause/resume); "
                    "this session runs Kafka in a container")
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
    """The session's :class:`~pipeline.dev.postgres.EmbeddedPostgres` (embedded only).

    Started again after the test (same port and data) if the test stopped it.
    """
    pg = _postgres_service.embedded
    if pg is None:
        pytest.skip("needs the embedded PostgreSQL (stop/start); "
                    "this session runs PostgreSQL in a container")
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
