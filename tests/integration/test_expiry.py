"""Silent edges leave the worker's memory, exactly, with a SIGKILL right after an expiry
(COMMPIPE_EDGE_EXPIRE_S; agents/expiry.py), against the real broker, PostgreSQL and DuckDB.

Edge names churn (one per pod), each edge says a few things and falls silent; steady
edges, one in each partition, stream all along (a window leaves the table once the
partition's watermark has passed it, so a partition needs traffic for its silent edges to
expire). Expected counts are plain counting of what was sent."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from aiokafka.partitioner import DefaultPartitioner

from pipeline import Emitter, Settings
from pipeline.core.edge import EdgeMeta
from pipeline.core.store import parse_id
from pipeline.dev.process import free_port
from pipeline.wire.events import edge_key, split_edge_key
from tests.integration.test_metrics import try_scrape
from tests.integration.test_sink import Databases
from tests.integration.workers import read_state, wait_until, worker_environment, worker_starter

pytestmark = pytest.mark.integration

Edge = tuple[str, str, str]
CHURNED = [("api", f"pod-{i}", "http") for i in range(30)]
PARTITIONS = 4


def one_per_partition() -> list[Edge]:
    """Steady edges whose records land one in each partition (Kafka's default partitioner:
    murmur2 of the record key, the edge key the shim sends)."""
    partitioner = DefaultPartitioner()
    found: dict[int, Edge] = {}
    for i in range(100):
        edge = ("api", f"steady-{i}", "http")
        found.setdefault(partitioner(edge_key(*edge).encode(), list(range(PARTITIONS)),
                                     list(range(PARTITIONS))), edge)
    assert len(found) == PARTITIONS
    return sorted(found.values())


STEADY = one_per_partition()
REQUESTS_SQL = ("SELECT source_service, target_service, protocol, sum(requests) "
                "FROM communication_rollups GROUP BY 1, 2, 3")


class Steady(threading.Thread):
    """One request on each steady edge every 20 ms, each counted."""

    def __init__(self, emitter: Emitter) -> None:
        super().__init__(daemon=True)
        self.emitter, self.stop = emitter, threading.Event()
        self.sent: Counter[Edge] = Counter()

    def run(self) -> None:
        while not self.stop.is_set():
            for edge in STEADY:
                self.emitter.request(source_service=edge[0], target_service=edge[1],
                                     protocol=edge[2], ts=time.time(),
                                     correlation_id=f"{edge[1]}-{self.sent[edge]}")
                self.sent[edge] += 1
            time.sleep(0.02)


def edge_requests(bootstrap: str, app_id: str) -> dict[Edge, int]:
    """Per edge key in the changelog's table, its requests (edges in one partition each)."""
    out: dict[Edge, int] = Counter()
    for key, value in read_state(bootstrap, app_id).items():
        kind, _, edge, _ = parse_id(key)
        if kind == "e":
            assert isinstance(value, EdgeMeta)
            out[split_edge_key(edge or "")] += value.totals.requests
    return dict(out)


def why_not(bootstrap: str, app_id: str) -> str:
    """What the changelog's table holds that keeps silent edges in (for a failure)."""
    from pipeline.core.edge import PartitionMeta

    lines = []
    for key, value in sorted(read_state(bootstrap, app_id).items()):
        kind, partition, edge, _ = parse_id(key)
        if isinstance(value, EdgeMeta) and "pod-" in (edge or ""):
            lines.append(f"edge {partition} {edge!r}: offset {value.offset}, last_seen "
                         f"{value.last_seen}")
        elif kind == "w" and "pod-" in (edge or ""):
            lines.append(f"window {key!r}")
        elif isinstance(value, PartitionMeta):
            lines.append(f"partition {partition}: offset {value.offset}, watermark "
                         f"{value.watermark}")
    return "\n".join(lines[:40])


def test_silent_edges_leave_the_table_and_stay_gone_across_a_kill(
        kafka_bootstrap: str, topic_factory: Callable[..., str], tmp_path: Path,
        pg_database: str) -> None:
    db = Databases(pg_database, str(tmp_path / "commpipe.duckdb"))
    env = worker_environment(
        kafka_bootstrap, topic_factory, tmp_path, window_s=2.0, grace_s=1.0, idle_close_s=1.0,
        COMMPIPE_EDGE_EXPIRE_S="4", COMMPIPE_METRICS_PORT=str(free_port()),
        COMMPIPE_POSTGRES_DSN=pg_database, COMMPIPE_DUCKDB_PATH=db.duckdb_path,
        COMMPIPE_SINK_INTERVAL_S="0.5")
    app_id = env["COMMPIPE_APP_ID"]
    emitter = Emitter(kafka_bootstrap, env["COMMPIPE_TOPIC"],
                      settings=Settings.from_env({}, shim_linger_ms=5))
    steady = Steady(emitter)
    sent: Counter[Edge] = Counter()

    def metric(name: str, **labels: str) -> float:
        return try_scrape(env).get((name, tuple(sorted(labels.items()))), -1.0)

    with worker_starter(env, tmp_path) as start:
        first = start()
        try:
            steady.start()
            for n in range(3):
                for edge in CHURNED:
                    emitter.request(source_service=edge[0], target_service=edge[1],
                                    protocol=edge[2], correlation_id=f"{edge[1]}-{n}",
                                    ts=time.time())
                    sent[edge] += 1
            assert emitter.flush(timeout=30)
            wait_until(lambda: metric("commpipe_worker_edges_expired_total") >= len(CHURNED),
                       timeout=90, what="the churned edges expired",
                       logs=lambda: f"{first.log()[-1000:]}\n{why_not(kafka_bootstrap, app_id)}")
            first.kill()  # the tombstones may be on their way; the steady edge's writes are
            second = start()
            # recovered, the churned edges are gone (their tombstones, or expired again)
            wait_until(lambda: set(edge_requests(kafka_bootstrap, app_id)) == set(STEADY),
                       timeout=90, what="only the steady edges in the table", logs=second.log)
            revived = CHURNED[0]  # speaks again: from zero
            emitter.request(source_service=revived[0], target_service=revived[1],
                            protocol=revived[2], correlation_id="again", ts=time.time())
            sent[revived] += 1
            time.sleep(1.0)
        finally:
            steady.stop.set()
            steady.join(10)
            assert emitter.flush(timeout=30)
            emitter.close()
        sent.update(steady.sent)
        want_table = {**steady.sent, revived: 1}
        wait_until(lambda: edge_requests(kafka_bootstrap, app_id) == want_table, timeout=60,
                   what=f"the table holding {want_table}", logs=second.log)
        # memory: the second worker holds the live edges only
        wait_until(lambda: metric("commpipe_state_keys", kind="edge") == len(STEADY) + 1,
                   timeout=30, what="the live edge keys only in the worker's memory",
                   logs=second.log)

        def stored() -> bool:
            try:
                return all({(s, t, p): int(n) for s, t, p, n in rows} == dict(sent)
                           for rows in db.both(REQUESTS_SQL))
            except Exception:  # noqa: BLE001 - not migrated yet, or the file being written
                return False

        # the history in SQL keeps every request of every edge, once
        wait_until(stored, timeout=60, what="every request in both databases",
                   logs=second.log)
