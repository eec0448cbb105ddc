"""Apache Kafka itself for dev and tests: one KRaft node on loopback, run with ``java``.

:class:`KafkaBroker` is one node that is broker and controller at once, with the
same surface as the Tansu :class:`~pipeline.dev.broker.EmbeddedBroker` (``bootstrap``,
``start``, ``stop``, ``restart``, ``pause``, ``resume``, ``close``), and more of what a
real broker has: its data survives a stop (:meth:`~KafkaBroker.restart` keeps topics and
records), and :meth:`~KafkaBroker.kill` is a crash (SIGKILL). Three of them make a
cluster (:class:`pipeline.dev.kafka_cluster.KafkaCluster`).

On first use the broker's jars are fetched with Maven into a cache outside the
repository (:func:`pipeline.dev.kafka_dist.kafka_libs`). Each start writes the node's
``server.properties`` from the template ``kafka-dist/server.properties``, formats the
storage once (``kafka.tools.StorageTool format``, with a cluster id kept in the data
directory), starts ``kafka.Kafka`` and waits until the node answers a metadata request
naming itself. :meth:`~KafkaBroker.stop` sends SIGTERM (Kafka's controlled shutdown)
and SIGKILL after ``stop_timeout``. The JVM runs in its own process group, so Ctrl-C
reaches the Python process, which stops the broker in order; an ``atexit`` hook stops
a broker still running when the interpreter exits.
"""

from __future__ import annotations

import base64
import logging
import signal
import string
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from pipeline.dev.kafka_dist import DIST_DIR, java_binary, kafka_libs
from pipeline.dev.process import (
    BrokerProcess,
    free_port,
    log_tail,
    port_open,
    run_sync,
    terminate_process,
)
from pipeline.errors import ServiceError

__all__ = ["KafkaBroker", "new_cluster_id"]

log = logging.getLogger(__name__)


def new_cluster_id() -> str:
    """A KRaft cluster id: a random UUID, URL-safe base64 without padding (22 characters),
    never starting with ``-`` (command lines would take it for an option; Kafka's own
    ``Uuid.randomUuid`` avoids it too)."""
    while True:
        found = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not found.startswith("-"):
            return found


class KafkaBroker(BrokerProcess):
    """One Apache Kafka node in KRaft mode (broker and controller), on loopback.

    ``port``: the client listener (``None``: a free port at the first start, kept after).
    ``host``: listen and advertised address (default ``127.0.0.1``).
    ``node_id``: the node's id (default 1). ``controller_port``: its controller listener
    (default: a free port). ``voters``: the quorum, ``id@host:port,...`` (default: this node
    alone). ``cluster_id``: given to a cluster's nodes; default: read from the formatted
    storage, else new.
    ``data_dir``: the node's storage, formatted once and kept (default: a temporary
    directory that :meth:`close` removes).
    ``replication_factor`` / ``min_insync_replicas``: the broker defaults for new topics and
    for Kafka's internal topics (1 / 1 for one node).
    ``version``: Kafka version to fetch (default: the pom's); ``cache_dir``: where jars go.
    ``heap``: the JVM's ``-Xmx`` (default ``768m``).
    ``start_timeout``: seconds to wait for the node to answer (default 120: the first start
    may include the jars' download, counted apart). ``stop_timeout``: seconds between
    SIGTERM and SIGKILL (default 30). ``log_path``: the JVM's output (default: in the
    node's directory).
    """

    SERVICE = "Apache Kafka broker"
    ENGINE = "kafka"
    WORKER_ENV: dict[str, str] = {}
    """Settings a commpipe worker needs on this broker: none (compare Tansu's)."""
    ATEXIT_STOP_TIMEOUT = 10.0

    def __init__(
        self,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        node_id: int = 1,
        controller_port: int | None = None,
        voters: str | None = None,
        cluster_id: str | None = None,
        data_dir: Path | str | None = None,
        replication_factor: int = 1,
        min_insync_replicas: int = 1,
        version: str | None = None,
        cache_dir: Path | None = None,
        heap: str = "768m",
        start_timeout: float = 120.0,
        stop_timeout: float = 30.0,
        log_path: Path | str | None = None,
    ) -> None:
        super().__init__(host=host, port=port, start_timeout=start_timeout,
                         stop_timeout=stop_timeout)
        self.node_id = node_id
        self._controller_port = controller_port or None
        self._voters = voters
        self._cluster_id = cluster_id
        if data_dir is None:
            self._tmpdir = Path(tempfile.mkdtemp(prefix=f"commpipe-kafka{node_id}-"))
            data_dir = self._tmpdir
        self.node_dir = Path(data_dir).resolve()
        self.replication_factor = replication_factor
        self.min_insync_replicas = min_insync_replicas
        self.version = version
        self.cache_dir = cache_dir
        self.heap = heap
        self._log_path = Path(log_path) if log_path else self.node_dir / "kafka.log"

    # -- state ---------------------------------------------------------------

    @property
    def bootstrap(self) -> str:
        """``host:port`` for Kafka clients' ``bootstrap_servers``."""
        return f"{self.host}:{self.port}"

    @property
    def controller_port(self) -> int:
        if self._controller_port is None:
            raise ServiceError("the Kafka node has no controller port yet; call start() first")
        return self._controller_port

    @property
    def log_path(self) -> Path:
        """The file receiving the JVM's stdout and stderr."""
        return self._log_path

    @property
    def _log4j(self) -> Path:
        return DIST_DIR / "log4j2.properties"

    @property
    def config_path(self) -> Path:
        return self.node_dir / "server.properties"

    @property
    def log_dir(self) -> Path:
        """Kafka's ``log.dirs``: the topics' data and the KRaft metadata log."""
        return self.node_dir / "data"

    # -- lifecycle -----------------------------------------------------------

    def start(self, *, wait: bool = True) -> KafkaBroker:
        """Fetch the jars if needed, write the config, format the storage once, start the
        JVM and (``wait``) wait until the node answers. No-op while it runs."""
        if self.is_running:
            return self
        java = java_binary()
        libs = kafka_libs(self.version, cache_dir=self.cache_dir)  # before the clock starts
        self._claim_ports()
        self._write_config()
        self._format(java, libs)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [str(java), f"-Xmx{self.heap}", "-Xms128m", "-XX:+UseG1GC",
               "-XX:MaxGCPauseMillis=20", "-XX:+ExitOnOutOfMemoryError",
               "-Djava.awt.headless=true",
               f"-Dlog4j2.configurationFile={self._log4j}",
               "-cp", f"{libs}/*", "kafka.Kafka", str(self.config_path)]
        self._began = time.monotonic()
        with open(self.log_path, "ab") as out:
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=self.node_dir, start_new_session=True)
        self._paused = False
        self._register_atexit()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float | None = None) -> None:
        """Until the node answers a metadata request that lists it; :class:`ServiceError`
        (quoting its log) when it exits or does not answer within ``timeout``."""
        assert self._proc is not None, "start() first"
        deadline = time.monotonic() + (self.start_timeout if timeout is None else timeout)
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc, code = None, self._proc.returncode
                raise self._start_error(f"exited with code {code}")
            if port_open(self.host, self.port):
                try:
                    if self.node_id in run_sync(self._broker_ids):
                        log.info("Kafka node %s ready on %s in %.1f s (pid %s)", self.node_id,
                                 self.bootstrap, time.monotonic() - self._began, self.pid)
                        return
                except Exception as e:  # noqa: BLE001 - not ready yet: retried until the deadline
                    last = e
            time.sleep(0.2)
        self.stop()
        raise self._start_error(
            f"did not answer a metadata request within {timeout or self.start_timeout:.0f} s"
            + (f" (last error: {type(last).__name__}: {last})" if last else ""))

    async def _broker_ids(self) -> set[int]:
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=3000)
        try:
            await admin.start()
            cluster = await admin.describe_cluster()
            return {int(b["node_id"]) for b in cluster["brokers"]}
        finally:
            await admin.close()

    def stop(self) -> None:
        """SIGTERM (controlled shutdown), SIGKILL after ``stop_timeout``; data is kept.
        A paused node is resumed so it can stop. Safe when not running."""
        proc = self._take_process()
        if proc is None:
            return
        code = terminate_process(proc, timeout=self.stop_timeout, group=True)
        log.info("Kafka node %s on %s stopped (exit code %s)", self.node_id,
                 self.bootstrap, code)

    def kill(self) -> None:
        """SIGKILL the JVM at once (a crash: no controlled shutdown); data on disk stays."""
        proc = self._take_process()
        if proc is None:
            return
        terminate_process(proc, sig=signal.SIGKILL, timeout=10, group=True)
        log.info("Kafka node %s on %s killed", self.node_id, self.bootstrap)

    # -- internals -----------------------------------------------------------

    def _claim_ports(self) -> None:
        self._claim_port()
        if self._controller_port is None:
            self._controller_port = free_port(self.host)
            while self._controller_port == self._port:
                self._controller_port = free_port(self.host)
        if port_open(self.host, self._controller_port):
            raise ServiceError(
                f"cannot start the Kafka node: its controller port {self.host}:"
                f"{self._controller_port} is already in use; stop what listens there")

    def _write_config(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        template = string.Template((DIST_DIR / "server.properties").read_text())
        self.config_path.write_text(template.substitute(
            node_id=self.node_id, host=self.host, port=self.port,
            controller_port=self.controller_port,
            voters=self._voters or f"{self.node_id}@{self.host}:{self.controller_port}",
            log_dir=self.log_dir, replication_factor=self.replication_factor,
            min_insync_replicas=self.min_insync_replicas))

    def _format(self, java: Path, libs: Path) -> None:
        """Format the storage unless it already is (then keep its cluster id)."""
        meta = self.log_dir / "meta.properties"
        if meta.exists():
            for line in meta.read_text().splitlines():
                if line.startswith("cluster.id="):
                    self._cluster_id = line.split("=", 1)[1].strip()
            return
        self._cluster_id = self._cluster_id or new_cluster_id()
        cmd = [str(java), "-Xmx256m", f"-Dlog4j2.configurationFile={self._log4j}",
               "-cp", f"{libs}/*", "kafka.tools.StorageTool", "format", "-t", self._cluster_id,
               "-c", str(self.config_path)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False,
                              stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-10:])
            raise ServiceError(f"could not format Kafka's storage in {self.log_dir} (exit code "
                               f"{done.returncode}); remove the directory and retry:\n{tail}")

    def _start_error(self, what: str) -> ServiceError:
        tail = log_tail(self.log_path, lines=25)
        return ServiceError(
            f"Apache Kafka node {self.node_id} on {self.host}:{self._port} {what}; last lines "
            f"of {self.log_path}:\n" + (tail or "(log is empty)"))


    def _repr_extra(self) -> str:
        return f", node {self.node_id}"
