"""Fault controls for testcontainers services, so fault tests run in containers mode too.

The embedded services can be paused (:class:`~pipeline.dev.broker.EmbeddedBroker`,
:class:`~pipeline.dev.kafka.KafkaBroker`) or stopped and started again on the same
address (:class:`~pipeline.dev.postgres.EmbeddedPostgres`); the fault tests use exactly
that. These wrappers give a running testcontainers container the same methods through
the Docker engine:

* :class:`ContainerBroker` — a Kafka container: :meth:`~ContainerBroker.pause` /
  :meth:`~ContainerBroker.resume` are ``docker pause`` / ``unpause`` (the cgroup
  freezer: what SIGSTOP / SIGCONT are to a local process; connections stay open).
* :class:`ContainerPostgres` — a PostgreSQL container published on a fixed host port
  (:func:`postgres_container` sets it up), so :meth:`~ContainerPostgres.stop` /
  :meth:`~ContainerPostgres.start` (``docker stop`` / ``start``) keep its DSN and data.

The wrapped object is the testcontainers container; its ``get_wrapped_container()`` is
the Docker SDK's, whose ``pause``, ``unpause``, ``stop``, ``start``, ``reload`` and
``status`` are all that is used.
"""

from __future__ import annotations

import time
from typing import Any

from pipeline.errors import ServiceError

__all__ = ["ContainerBroker", "ContainerPostgres", "postgres_container"]


class _Container:
    SERVICE = "container"

    def __init__(self, container: Any) -> None:
        self.container = container
        self._paused = False

    def _docker(self) -> Any:
        return self.container.get_wrapped_container()

    def _status(self) -> str:
        docker = self._docker()
        docker.reload()
        return str(docker.status)

    @property
    def is_running(self) -> bool:
        """True while the container runs (paused counts: its processes still exist)."""
        return self._status() in ("running", "paused")

    @property
    def paused(self) -> bool:
        return self._paused and self.is_running


class ContainerBroker(_Container):
    """A testcontainers ``KafkaContainer`` that can be paused like the embedded brokers."""

    SERVICE = "Kafka container"
    ENGINE = "kafka"
    WORKER_ENV: dict[str, str] = {}

    @property
    def bootstrap(self) -> str:
        return str(self.container.get_bootstrap_server())

    def pause(self) -> None:
        """Freeze the container (``docker pause``): nothing is answered, data kept."""
        if not self.is_running:
            raise ServiceError("cannot pause the Kafka container: it is not running")
        self._docker().pause()
        self._paused = True

    def resume(self) -> None:
        """Unfreeze a paused container (``docker unpause``); no-op when not paused."""
        if self._paused:
            self._docker().unpause()
        self._paused = False

    def start(self) -> ContainerBroker:
        """No-op while it runs. A stopped Kafka container cannot be started again on the
        same address (its advertised port is fixed at creation): use pause/resume."""
        if not self.is_running:
            raise ServiceError("the Kafka container was stopped and cannot come back on the "
                               "same address; pause and resume it instead, or use "
                               "COMMPIPE_TEST_SERVICES=embedded")
        return self

    def stop(self) -> None:
        raise ServiceError("stopping the session's Kafka container would lose its address; "
                           "pause it instead, or use COMMPIPE_TEST_SERVICES=embedded")


class ContainerPostgres(_Container):
    """A testcontainers ``PostgresContainer`` on a fixed host port, stopped and started
    with its data and DSN kept, like :class:`~pipeline.dev.postgres.EmbeddedPostgres`."""

    SERVICE = "PostgreSQL container"

    def __init__(self, container: Any, *, start_timeout: float = 60.0,
                 connect: Any = None) -> None:
        super().__init__(container)
        self.start_timeout = start_timeout
        self._connect = connect

    @property
    def dsn(self) -> str:
        return str(self.container.get_connection_url())

    def stop(self) -> None:
        """``docker stop`` (PostgreSQL's fast shutdown); the data stays in the container."""
        if self.is_running:
            self._docker().stop(timeout=10)

    def start(self) -> ContainerPostgres:
        """``docker start``, then wait until PostgreSQL accepts a connection."""
        if self.is_running:
            return self
        self._docker().start()
        deadline = time.monotonic() + self.start_timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                self._ready()
                return self
            except Exception as e:  # noqa: BLE001 - starting up: retried until the deadline
                last = e
                time.sleep(0.3)
        raise ServiceError(f"the PostgreSQL container did not accept connections within "
                           f"{self.start_timeout:g} s after a start"
                           + (f" (last error: {type(last).__name__})" if last else ""))

    def _ready(self) -> None:
        if self._connect is not None:
            self._connect(self.dsn)
            return
        import psycopg

        with psycopg.connect(self.dsn, connect_timeout=2) as conn:
            conn.execute("SELECT 1")


def postgres_container(image: str, host_port: int) -> Any:
    """A testcontainers ``PostgresContainer`` (not started) published on ``host_port``, so a
    ``docker stop`` / ``start`` keeps its address."""
    try:
        from testcontainers.community.postgres import PostgresContainer
    except ImportError:  # testcontainers < 4.10 kept it at the top level
        from testcontainers.postgres import PostgresContainer  # type: ignore[no-redef]
    return PostgresContainer(image, driver=None).with_bind_ports(5432, host_port)
