"""Three Apache Kafka nodes in KRaft mode on loopback: a cluster for fault tests.

Each node (:class:`~pipeline.dev.kafka.KafkaBroker`) is broker and controller, and the
three form the controller quorum, so any one of them can crash (:meth:`KafkaCluster.kill`)
while the other two keep a quorum, elect new partition leaders and serve clients. New
topics default to replication factor 3 and ``min.insync.replicas`` 2, Kafka's internal
topics likewise, so a write acknowledged with ``acks=all`` is on at least two nodes.
A killed node started again (:meth:`KafkaCluster.start_node`) keeps its data, catches
up from the others and, within seconds, takes back the leadership of its preferred
partitions.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from pipeline.dev.kafka import KafkaBroker, new_cluster_id
from pipeline.dev.process import free_port, run_sync
from pipeline.errors import ServiceError

__all__ = ["KafkaCluster"]

log = logging.getLogger(__name__)


class KafkaCluster:
    """``size`` Kafka nodes on ``host`` (default three), one data directory each.

    ``data_dir``: the parent of the nodes' directories (default: a temporary one that
    :meth:`close` removes). ``replication_factor`` / ``min_insync_replicas``: the broker
    defaults (3 / 2). ``heap``: each JVM's ``-Xmx``. ``version`` / ``cache_dir``: as for
    :class:`~pipeline.dev.kafka.KafkaBroker`.
    """

    def __init__(self, size: int = 3, *, host: str = "127.0.0.1",
                 data_dir: Path | str | None = None, replication_factor: int = 3,
                 min_insync_replicas: int = 2, heap: str = "512m",
                 version: str | None = None, cache_dir: Path | None = None,
                 start_timeout: float = 180.0) -> None:
        if size < 1 or replication_factor > size or min_insync_replicas > replication_factor:
            raise ServiceError(f"a Kafka cluster of {size} nodes cannot have replication "
                               f"factor {replication_factor} and min.insync.replicas "
                               f"{min_insync_replicas}; choose smaller numbers")
        self.host = host
        self._tmpdir = None if data_dir else Path(tempfile.mkdtemp(prefix="commpipe-kraft-"))
        root = Path(data_dir) if data_dir else self._tmpdir
        assert root is not None
        self.data_dir = root.resolve()
        self.start_timeout = start_timeout
        ports = _distinct_ports(host, 2 * size)
        voters = ",".join(f"{i + 1}@{host}:{ports[size + i]}" for i in range(size))
        cluster_id = new_cluster_id()
        self.nodes = {
            i + 1: KafkaBroker(ports[i], host=host, node_id=i + 1,
                               controller_port=ports[size + i], voters=voters,
                               cluster_id=cluster_id, data_dir=self.data_dir / f"node{i + 1}",
                               replication_factor=replication_factor,
                               min_insync_replicas=min_insync_replicas, version=version,
                               cache_dir=cache_dir, heap=heap, start_timeout=start_timeout)
            for i in range(size)}

    @property
    def bootstrap(self) -> str:
        """Every node's ``host:port``, comma-separated (clients find the others themselves)."""
        return ",".join(n.bootstrap for n in self.nodes.values())

    def node(self, node_id: int) -> KafkaBroker:
        try:
            return self.nodes[node_id]
        except KeyError:
            raise ServiceError(f"the cluster has no node {node_id}; its nodes are "
                               f"{sorted(self.nodes)}") from None

    def start(self) -> KafkaCluster:
        """Start every node, then wait until each answers (they need each other for a quorum)."""
        try:
            for node in self.nodes.values():
                node.start(wait=False)
            deadline = time.monotonic() + self.start_timeout
            for node in self.nodes.values():
                node.wait_ready(max(deadline - time.monotonic(), 1.0))
            self.wait_brokers(set(self.nodes), timeout=max(deadline - time.monotonic(), 5.0))
        except BaseException:
            self.stop()
            raise
        return self

    def kill(self, node_id: int) -> None:
        """SIGKILL one node (a crash); its data stays for :meth:`start_node`."""
        self.node(node_id).kill()

    def start_node(self, node_id: int) -> None:
        """Start a stopped or killed node again (same ports, same data)."""
        self.node(node_id).start()

    def stop(self) -> None:
        """Stop every node at once; the data stays until :meth:`close`. (One by one, the
        last node's controlled shutdown would wait for a controller quorum that is gone.)"""
        threads = [threading.Thread(target=n.stop, name=f"stop-kafka-{i}")
                   for i, n in self.nodes.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def close(self) -> None:
        """Stop every node and remove the temporary data directory, if one was made."""
        self.stop()
        for node in self.nodes.values():
            node.close()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def running(self) -> list[int]:
        return [i for i, n in self.nodes.items() if n.is_running]

    def wait_brokers(self, wanted: set[int], *, timeout: float = 60.0) -> None:
        """Until the cluster's metadata lists exactly the ``wanted`` node ids as brokers."""
        deadline = time.monotonic() + timeout
        seen: set[int] = set()
        while time.monotonic() < deadline:
            try:
                seen = run_sync(self._broker_ids)
                if seen == wanted:
                    return
            except Exception as e:  # noqa: BLE001 - nodes coming and going: retried
                log.debug("cluster metadata not yet available: %s", e)
            time.sleep(0.5)
        raise ServiceError(f"the Kafka cluster listed brokers {sorted(seen)}, not "
                           f"{sorted(wanted)}, after {timeout:.0f} s; see the nodes' logs under "
                           f"{self.data_dir}")

    def partition_leaders(self, topic: str) -> dict[int, int]:
        """``{partition: leader node id}`` of ``topic`` (``-1``: no leader right now)."""
        return run_sync(lambda: self._leaders(topic))

    def in_sync_replicas(self, topic: str) -> dict[int, list[int]]:
        """``{partition: in-sync replica ids}`` of ``topic``."""
        return {p: isr for p, (_, isr) in run_sync(lambda: self._describe(topic)).items()}

    async def _broker_ids(self) -> set[int]:
        admin = await self._admin()
        try:
            cluster = await admin.describe_cluster()
            return {int(b["node_id"]) for b in cluster["brokers"]}
        finally:
            await admin.close()

    async def _leaders(self, topic: str) -> dict[int, int]:
        return {p: leader for p, (leader, _) in (await self._describe(topic)).items()}

    async def _describe(self, topic: str) -> dict[int, tuple[int, list[int]]]:
        from aiokafka.errors import KafkaError

        admin = await self._admin()
        try:
            deadline = time.monotonic() + 15
            while True:  # a topic just created reaches every node's metadata in a moment
                try:
                    (found,) = await admin.describe_topics([topic])
                except KafkaError as e:  # asked a node that just died: ask another
                    if time.monotonic() > deadline:
                        raise ServiceError(f"could not describe topic {topic!r}: {e!r}") from e
                    await asyncio.sleep(0.2)
                    continue
                if not found["error_code"]:
                    return {p["partition"]: (p["leader"], list(p["isr"]))
                            for p in found["partitions"]}
                if time.monotonic() > deadline:
                    raise ServiceError(f"could not describe topic {topic!r} (error "
                                       f"{found['error_code']}); does it exist?")
                await asyncio.sleep(0.2)
        finally:
            await admin.close()

    async def _admin(self) -> Any:
        from aiokafka.admin import AIOKafkaAdminClient

        live = ",".join(n.bootstrap for n in self.nodes.values() if n.is_running)
        admin = AIOKafkaAdminClient(bootstrap_servers=live or self.bootstrap,
                                    request_timeout_ms=5000)
        await admin.start()
        return admin

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        states = ", ".join(f"{i}: {'up' if n.is_running else 'down'}"
                           for i, n in self.nodes.items())
        return f"KafkaCluster({self.bootstrap}; {states})"


def _distinct_ports(host: str, n: int) -> list[int]:
    """``n`` different free ports (the OS may hand the same one out twice in a row)."""
    ports: list[int] = []
    while len(ports) < n:
        port = free_port(host)
        if port not in ports:
            ports.append(port)
    return ports
