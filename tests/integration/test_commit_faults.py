"""The commit's two narrowest moments, forced on the session broker under steady load:

- the worker killed after its changelog writes were delivered and before the input offsets
  covering them were committed (agents/checkpoint.py, between steps 3 and 4);
- a partition revoked while a fetch of its records waits, handed over but not yet applied
  (agents/intake.py).

Each must count every event once: the table read back from its changelog and a worker's
``/metrics`` must equal the totals of what the shim emitted, counted here. The faults come
from ``tests.integration.faulty_worker``.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from pipeline import Emitter, Settings
from pipeline.core.edge import PartitionMeta
from pipeline.core.store import parse_id
from pipeline.dev.process import free_port, run_sync
from tests.integration.cluster import (
    BUFFER,
    GRACE,
    WINDOW,
    Load,
    expected_edge_totals,
    finish_load,
    reported_totals,
    table_totals,
    wait_for,
)
from tests.integration.test_metrics import try_scrape
from tests.integration.workers import WorkerProcess, assigned, read_state, worker_environment

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

FAULTY = "tests.integration.faulty_worker"


def _committed(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """The group's committed offset of each partition of ``topic`` that has one."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    async def main() -> dict[int, int]:
        # a consumer of the group that never subscribes: it reads offsets, joins nothing
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group,
                                    enable_auto_commit=False)
        await consumer.start()
        try:
            found = {p: await consumer.committed(TopicPartition(topic, p)) for p in range(4)}
        finally:
            await consumer.stop()
        return {p: n for p, n in found.items() if n is not None}

    return run_sync(main)


def _applied(bootstrap: str, app_id: str) -> dict[int, int]:
    """Per input partition, the highest offset its changelog's partition meta covers."""
    return {parse_id(key)[1]: value.offset for key, value in read_state(bootstrap, app_id).items()
            if isinstance(value, PartitionMeta)}


def _counter(port: int, name: str) -> float:
    return try_scrape({"COMMPIPE_METRICS_PORT": str(port)}).get((name, ()), 0.0)


def _check_totals(bootstrap: str, app_id: str, port: int, load: Load) -> None:
    want = expected_edge_totals(load.emitted)
    got: dict[str, Any] = {}

    def table() -> bool:
        got["table"] = table_totals(bootstrap, app_id)
        return bool(got["table"] == want)

    def metrics() -> bool:
        got["metrics"] = reported_totals(port)
        return bool(got["metrics"] == want)

    wait_for(table, timeout=90, what=f"the changelog's totals {got.get('table')} == {want}")
    wait_for(metrics, timeout=90, what=f"/metrics' totals {got.get('metrics')} == {want}")


def _env(kafka_bootstrap: str, topic_factory: Any, tmp_path: Path) -> dict[str, str]:
    return worker_environment(kafka_bootstrap, topic_factory, tmp_path, window_s=WINDOW,
                              grace_s=GRACE, idle_close_s=3, COMMPIPE_WORKER_LOGLEVEL="info",
                              COMMPIPE_METRICS_HOST="127.0.0.1")


def test_killed_after_the_changelog_was_delivered_and_before_the_offsets_were_committed(
        kafka_bootstrap: str, topic_factory: Any, tmp_path: Path) -> None:
    env = _env(kafka_bootstrap, topic_factory, tmp_path)
    topic, app_id = env["COMMPIPE_TOPIC"], env["COMMPIPE_APP_ID"]
    port = free_port()
    emitter = Emitter(kafka_bootstrap, topic, settings=Settings.from_env(
        {}, shim_buffer_size=BUFFER, shim_linger_ms=20))
    load = Load(emitter, rate=400, seed=3101)
    faulty = WorkerProcess({**env, "COMMPIPE_TEST_FAULT": "kill-before-offset-commit:12"},
                           tmp_path / "faulty.log", module=FAULTY)
    second = WorkerProcess({**env, "COMMPIPE_METRICS_PORT": str(port)}, tmp_path / "second.log")
    try:
        faulty.start()
        load.start()
        wait_for(lambda: not faulty.alive, timeout=180, what="the fault to kill the worker",
                 logs=faulty.log)
        assert faulty.proc is not None and faulty.proc.returncode == -signal.SIGKILL
        assert "fault: killed before committing" in faulty.log()
        # What the kill left: changes in the changelog past what the group committed.
        applied = _applied(kafka_bootstrap, app_id)
        committed = _committed(kafka_bootstrap, app_id, topic)
        ahead = {p: (n, committed.get(p)) for p, n in applied.items()
                 if n + 1 > committed.get(p, 0)}
        assert ahead, f"no partition's changelog was past its commit: {applied} {committed}"
        second.start()
        wait_for(lambda: assigned(second, topic) == {0, 1, 2, 3}, timeout=90,
                 what="the second worker's partitions", logs=second.log)
        wait_for(lambda: _counter(port, "commpipe_worker_commits_total") >= 4, timeout=60,
                 what="the second worker's commits", logs=second.log)
        finish_load(load, emitter)
        _check_totals(kafka_bootstrap, app_id, port, load)
        # the records after the commit were read again, and skipped whole
        assert _counter(port, "commpipe_worker_replayed_records_total") > 0
    finally:
        load.finish()
        emitter.close()
        faulty.kill()
        second.stop(timeout=20)


def test_a_partition_revoked_while_its_fetched_records_wait(
        kafka_bootstrap: str, topic_factory: Any, tmp_path: Path) -> None:
    env = _env(kafka_bootstrap, topic_factory, tmp_path)
    topic, app_id = env["COMMPIPE_TOPIC"], env["COMMPIPE_APP_ID"]
    port = free_port()
    marker = tmp_path / "held.json"
    emitter = Emitter(kafka_bootstrap, topic, settings=Settings.from_env(
        {}, shim_buffer_size=BUFFER, shim_linger_ms=20))
    load = Load(emitter, rate=400, seed=3102)
    first = WorkerProcess({**env, "COMMPIPE_METRICS_PORT": str(port),
                           "COMMPIPE_TEST_FAULT": "hold-fetch:20",
                           "COMMPIPE_TEST_FAULT_FILE": str(marker)},
                          tmp_path / "first.log", module=FAULTY)
    second_port = free_port()
    second = WorkerProcess({**env, "COMMPIPE_METRICS_PORT": str(second_port)},
                           tmp_path / "second.log")
    try:
        first.start()
        wait_for(lambda: assigned(first, topic) == {0, 1, 2, 3}, timeout=90,
                 what="the first worker's partitions", logs=first.log)
        load.start()
        wait_for(marker.exists, timeout=120, what="a fetch held", logs=first.log)
        held = {int(p): n for p, n in json.loads(marker.read_text()).items()}
        assert sum(held.values()) > 0
        second.start()
        wait_for(lambda: bool(assigned(second, topic)), timeout=90,
                 what="the second worker's partitions", logs=second.log)
        # the held records were dropped at the hand-over, never applied
        taken = Path(f"{marker}.taken")
        wait_for(taken.exists, timeout=60, what="the held fetch taken", logs=first.log)
        assert json.loads(taken.read_text()) == {}
        assert _counter(port, "commpipe_worker_dropped_records_total") >= sum(held.values())
        moved = assigned(second, topic) or set()
        assert moved and not moved & (assigned(first, topic) or set())
        print(f"held {held}; moved to the second worker: {sorted(moved)}")
        wait_for(lambda: _counter(second_port, "commpipe_worker_commits_total") >= 4,
                 timeout=60, what="the second worker's commits", logs=second.log)
        second.stop(timeout=30)
        wait_for(lambda: assigned(first, topic) == {0, 1, 2, 3}, timeout=90,
                 what="every partition back with the first worker", logs=first.log)
        finish_load(load, emitter)
        _check_totals(kafka_bootstrap, app_id, port, load)
        assert first.alive
    finally:
        load.finish()
        emitter.close()
        first.stop(timeout=20)
        second.stop(timeout=20)
