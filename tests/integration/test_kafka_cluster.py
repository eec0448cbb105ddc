"""Faults a single node cannot show, on a three-broker Apache Kafka cluster (KRaft, loopback).

One cluster for the module: replication factor 3, ``min.insync.replicas`` 2, acks=all
from the shim and from the worker, the worker's changelog producer batching as in
production. Load comes through the shim from a seeded generator; what the worker's table
(its changelog) and both databases must hold is counted from the events emitted, never
with the code under test:

* the broker leading every input and changelog partition, and the group's coordinator,
  is SIGKILLed while writes are in flight and started again later; the worker is never
  restarted;
* workers join and leave under load (a second joins and leaves with SIGTERM, a third is
  SIGKILLed); the last one left reports every edge's totals from state it recovered;
* ``commpipe_consumer_lag`` equals Kafka's end offsets minus the group's committed offsets.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from agents.topics import commpipe_topics, ensure_commpipe_topics
from pipeline import Emitter, Settings
from pipeline.dev.kafka_cluster import KafkaCluster
from pipeline.dev.process import free_port, run_sync
from tests.integration.cluster import (
    BUFFER,
    GRACE,
    ROLLUPS_SQL,
    WINDOW,
    Load,
    create_topics_led_by,
    dump_for_reproduction,
    expected_edge_totals,
    expected_windows,
    finish_load,
    first_divergence,
    group_led_by,
    reported_totals,
    rollup_rows,
    table_totals,
    wait_for,
    warm_up_offsets_topic,
)
from tests.integration.test_metrics import scrape
from tests.integration.test_sink import Databases
from tests.integration.workers import WorkerProcess, assigned, read_state, worker_environment

pytestmark = [pytest.mark.integration, pytest.mark.kafka, pytest.mark.timeout(900)]

PARTITIONS = 6  # of the scale-out test's topics


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster]:
    with KafkaCluster(data_dir=tmp_path_factory.mktemp("kraft")) as c:
        warm_up_offsets_topic(c)
        yield c


def cluster_env(cluster: KafkaCluster, tmp_path: Path, app_id: str, **extra: str
                ) -> dict[str, str]:
    stem = uuid.uuid4().hex[:8]
    names = iter([f"cluster.{stem}.events", f"cluster.{stem}.dlq"])
    return worker_environment(
        cluster.bootstrap, lambda partitions=4: next(names), tmp_path, window_s=WINDOW,
        grace_s=GRACE, idle_close_s=3, COMMPIPE_APP_ID=app_id,
        COMMPIPE_TOPIC_REPLICATION_FACTOR="3", COMMPIPE_TOPIC_MIN_INSYNC_REPLICAS="2",
        COMMPIPE_WORKER_LOGLEVEL="info", **extra)


def sink_settings(db: Databases) -> dict[str, str]:
    return {"COMMPIPE_POSTGRES_DSN": db.dsn, "COMMPIPE_DUCKDB_PATH": db.duckdb_path,
            "COMMPIPE_SINK_INTERVAL_S": "0.5", "COMMPIPE_SINK_BACKOFF_MAX_S": "2"}


@pytest.fixture
def db(pg_database: str, tmp_path: Path) -> Databases:
    return Databases(pg_database, str(tmp_path / "commpipe.duckdb"))


def emitter_for(cluster: KafkaCluster, topic: str) -> Emitter:
    return Emitter(cluster.bootstrap, topic, settings=Settings.from_env(
        {}, shim_buffer_size=BUFFER, shim_linger_ms=20))


def check_exact(cluster: KafkaCluster, app_id: str, topic: str, load: Load, db: Databases,
                logs: Any, *, metrics_port: int | None = None,
                full_logs: Callable[[], str] | None = None) -> None:
    """The table, both databases and (``metrics_port``) a worker's ``/metrics`` hold exactly
    the events emitted, each once. All are looked at before failing, so the message says
    which of them is wrong; the records, changelog and offsets are then written beside the
    DuckDB file (:func:`dump_for_reproduction`), and where the changelog first went wrong
    is in the message (:func:`first_divergence`, with ``full_logs``, else ``logs``)."""
    want = expected_edge_totals(load.emitted)
    rows = expected_windows(load.emitted)
    got: dict[str, Any] = {}
    problems: list[str] = []

    def table_done() -> bool:
        got["table"] = table_totals(cluster.bootstrap, app_id)
        return bool(got["table"] == want)

    def stored(which: str) -> bool:
        try:
            got[which] = rollup_rows((db.pg if which == "pg" else db.duck)(ROLLUPS_SQL))
        except Exception:  # noqa: BLE001 - not migrated yet, or the file is being written
            return False
        return bool(got[which] == rows)

    def metrics_done() -> bool:
        assert metrics_port is not None
        got["metrics"] = reported_totals(metrics_port)
        return bool(got["metrics"] == want)

    checks: list[tuple[str, Callable[[], bool]]] = [
        ("table", table_done), ("pg", lambda: stored("pg")), ("duck", lambda: stored("duck"))]
    if metrics_port is not None:
        checks.append(("metrics", metrics_done))
    timeout = 120.0
    for name, check in checks:
        try:
            wait_for(check, timeout=timeout, what=name)
        except AssertionError:
            timeout = 20.0  # the others have had their time already
            if name in ("table", "metrics"):
                problems.append(f"{name}: {_edge_diff(got.get(name, {}), want)}")
            else:
                have, need = set(map(_shown, got.get(name, []))), set(map(_shown, rows))
                problems.append(f"{name}: missing or different rows {sorted(need - have)[:6]}; "
                                f"unexpected rows {sorted(have - need)[:6]}")
    if problems:
        dump = dump_for_reproduction(Path(db.duckdb_path).parent / "reproduction.jsonl",
                                     cluster.bootstrap, app_id, topic, load.emitted)
        where = first_divergence(dump, (full_logs or logs)())
        raise AssertionError("\n".join(problems) + f"\nrecords, changelog and offsets in "
                             f"{dump}\n{where}\n{logs()[-3000:]}")


def _shown(row: tuple[Any, ...]) -> str:
    """A row as text, its dicts in key order (rows that are equal look equal)."""
    return repr(tuple(sorted(v.items()) if isinstance(v, dict) else v for v in row))


def _edge_diff(got: dict[Any, Counter[str]], want: dict[Any, Counter[str]]) -> str:
    """The edges whose counts differ: what the table holds beside what was emitted."""
    lines = [f"holds {sum(sum(c.values()) for c in got.values())} events, "
             f"{sum(sum(c.values()) for c in want.values())} were emitted"]
    for edge in sorted(set(got) | set(want)):
        if got.get(edge) != want.get(edge):
            lines.append(f"  {edge}: holds {dict(got.get(edge, {}))}, emitted "
                         f"{dict(want.get(edge, {}))}")
    return "\n".join(lines)


# --- topic configs ------------------------------------------------------------------------


def test_topics_are_created_with_their_configs_and_three_replicas(cluster: KafkaCluster
                                                                  ) -> None:
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    settings = Settings.from_env(
        {"COMMPIPE_TOPIC_REPLICATION_FACTOR": "3", "COMMPIPE_TOPIC_MIN_INSYNC_REPLICAS": "2",
         "COMMPIPE_TOPIC_RETENTION_MS": "3600000", "COMMPIPE_DLQ_RETENTION_MS": "86400000"},
        kafka_bootstrap=cluster.bootstrap, topic="cfg.events", dlq_topic="cfg.dlq",
        app_id="cfgapp", partitions=4)
    assert run_sync(lambda: ensure_commpipe_topics(settings)) == dict.fromkeys(
        ["cfg.events", "cfg.dlq", "cfgapp-state-changelog", "cfgapp-__assignor-__leader"], True)
    for name, (partitions, _) in commpipe_topics(settings).items():  # (waits for metadata)
        isr = cluster.in_sync_replicas(name)
        assert sorted(isr) == list(range(partitions)), (name, isr)
        assert all(sorted(r) == [1, 2, 3] for r in isr.values()), (name, isr)
    wanted = {"cleanup.policy", "retention.ms", "min.insync.replicas"}

    async def describe() -> dict[str, dict[str, str]]:
        admin = AIOKafkaAdminClient(bootstrap_servers=cluster.bootstrap)
        await admin.start()
        try:
            out: dict[str, dict[str, str]] = {}
            for response in await admin.describe_configs(
                    [ConfigResource(ConfigResourceType.TOPIC, name) for name in
                     commpipe_topics(settings)]):
                for resource in response.resources:
                    assert resource[0] == 0, resource  # no error
                    out[resource[3]] = {c[0]: c[1] for c in resource[4] if c[0] in wanted}
            return out
        finally:
            await admin.close()

    assert run_sync(describe) == {
        "cfg.events": {"cleanup.policy": "delete", "retention.ms": "3600000",
                       "min.insync.replicas": "2"},
        "cfg.dlq": {"cleanup.policy": "delete", "retention.ms": "86400000",
                    "min.insync.replicas": "2"},
        "cfgapp-state-changelog": {"cleanup.policy": "compact", "retention.ms": "604800000",
                                   "min.insync.replicas": "2"},  # (Kafka's default retention)
        "cfgapp-__assignor-__leader": {"cleanup.policy": "delete", "retention.ms": "604800000",
                                       "min.insync.replicas": "2"},
    }
    # a second run finds them all and changes nothing
    assert run_sync(lambda: ensure_commpipe_topics(settings)) == dict.fromkeys(
        commpipe_topics(settings), False)


# --- the leader of everything crashes mid-run ------------------------------------------------


def test_leader_killed_mid_run_every_event_counted_once_without_a_worker_restart(
        cluster: KafkaCluster, db: Databases, tmp_path: Path) -> None:
    seed = 1701
    app_id = group_led_by(cluster, 1, random.Random(seed))
    env = cluster_env(cluster, tmp_path, app_id, **sink_settings(db))
    settings = Settings.from_env(env)
    create_topics_led_by(cluster, settings, 1)  # node 1 leads input, changelog, dead letters
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    assert worker.proc is not None
    pid = worker.proc.pid
    emitter = emitter_for(cluster, settings.topic)
    load = Load(emitter, rate=400, seed=seed)
    load.start()
    try:
        _kill_and_restart_the_leader(cluster, settings, app_id, worker, load, emitter, db,
                                     pid, seed)
    finally:
        worker.stop(timeout=20)
        if cluster.running() != [1, 2, 3]:
            cluster.start_node(1)


def _kill_and_restart_the_leader(cluster: KafkaCluster, settings: Settings, app_id: str,
                                 worker: WorkerProcess, load: Load, emitter: Emitter,
                                 db: Databases, pid: int, seed: int) -> None:
    changelog = f"{app_id}-state-changelog"
    try:
        wait_for(lambda: bool(read_state(cluster.bootstrap, app_id)), timeout=90,
                 what="the worker's first changelog writes", logs=worker.log)
        time.sleep(4)
        assert time.monotonic() - load.last_emit < 0.5  # events are being sent right now
        assert cluster.partition_leaders(settings.topic) == dict.fromkeys(range(4), 1)
        cluster.kill(1)
        killed = time.monotonic()
        wait_for(lambda: set(cluster.partition_leaders(settings.topic).values()) <= {2, 3}
                 and set(cluster.partition_leaders(changelog).values()) <= {2, 3},
                 timeout=60, what="new leaders on nodes 2 and 3", logs=worker.log)
        failover = time.monotonic() - killed
        time.sleep(max(0.0, 20 - failover))  # 20 s on two brokers, under load
        cluster.start_node(1)
        # node 1 takes its preferred leaderships back: one more leader change under load
        wait_for(lambda: set(cluster.partition_leaders(settings.topic).values()) == {1}
                 and set(cluster.partition_leaders(changelog).values()) == {1},
                 timeout=90, what="node 1 leading again", logs=worker.log)
        time.sleep(8)
    finally:
        finish_load(load, emitter)
    check_exact(cluster, app_id, settings.topic, load, db, worker.log)
    assert worker.alive and worker.proc is not None and worker.proc.pid == pid  # never restarted
    log = worker.log()
    assert "stopping, so that a restart" not in log, log[-4000:]
    print(f"seed {seed}: {len(load.emitted)} events, failover {failover:.1f} s, "
          f"shim held at most {load.max_buffered} events")


# --- workers join and leave under load ---------------------------------------------------------


def test_workers_join_leave_and_crash_under_load_totals_stay_exact(
        cluster: KafkaCluster, db: Databases, tmp_path: Path) -> None:
    seed = 2203
    app_id = f"t{uuid.uuid4().hex[:10]}"
    # six partitions: Faust's sticky assignor lets each member keep ceil(partitions /
    # members), so with four a third worker would get none (2 + 2 + 0) and its crash
    # would show nothing; with six it is 2 + 2 + 2
    env = cluster_env(cluster, tmp_path, app_id, COMMPIPE_PARTITIONS=str(PARTITIONS),
                      **sink_settings(db))
    settings = Settings.from_env(env)
    run_sync(lambda: ensure_commpipe_topics(settings))
    topic = settings.topic
    port = free_port()
    first = WorkerProcess({**env, "COMMPIPE_METRICS_PORT": str(port)},
                          tmp_path / "first.log").start()
    second = WorkerProcess(env, tmp_path / "second.log")
    third = WorkerProcess(env, tmp_path / "third.log")
    everyone = (first, second, third)

    def logs(tail: int | None = 3000) -> str:
        return "\n".join(f"=== {w.log_path.name}\n{w.log()[-tail if tail else 0:]}"
                         for w in everyone if w.proc is not None)

    def owned() -> list[set[int] | None]:
        return [assigned(w, topic) if w.alive else None for w in everyone]

    def split_between(*workers: WorkerProcess) -> bool:
        """Each of ``workers`` owns partitions, together all of them, no one else any."""
        parts = [assigned(w, topic) or set() for w in workers]
        others = [assigned(w, topic) or set() for w in everyone
                  if w not in workers and w.alive]
        return (all(parts) and sum(len(p) for p in parts) == PARTITIONS
                and set().union(*parts) == set(range(PARTITIONS)) and not any(others))

    emitter = emitter_for(cluster, topic)
    load = Load(emitter, rate=400, seed=seed)
    try:
        code = _scale_out_and_in(first, second, third, load, emitter, split_between, logs)
        # the first worker's /metrics too: it reports every edge from its own table, so the
        # state of the partitions it took over came with them (from their changelogs)
        check_exact(cluster, app_id, topic, load, db, logs, metrics_port=port,
                    full_logs=lambda: logs(None))
    finally:
        for w in everyone:
            w.stop(timeout=20)
    print(f"seed {seed}: {len(load.emitted)} events; the second worker's exit code after "
          f"SIGTERM: {code} (None: hard-killed after 30 s)")


def _scale_out_and_in(first: WorkerProcess, second: WorkerProcess, third: WorkerProcess,
                      load: Load, emitter: Emitter, split_between: Any, logs: Any
                      ) -> int | None:
    try:
        wait_for(lambda: split_between(first), timeout=90, what="the first worker's partitions",
                 logs=logs)
        load.start()
        time.sleep(6)
        second.start()
        wait_for(lambda: split_between(first, second), timeout=90,
                 what="the second worker's partitions", logs=logs)
        time.sleep(6)
        third.start()
        wait_for(lambda: split_between(first, second, third), timeout=90,
                 what="the third worker's partitions", logs=logs)
        time.sleep(6)
        third.kill()  # a crash: its partitions come back after the session timeout
        wait_for(lambda: split_between(first, second), timeout=90,
                 what="the third worker's partitions back with the others", logs=logs)
        time.sleep(6)
        code = second.stop(timeout=30)  # leaves the group (hard-killed if it hangs)
        wait_for(lambda: split_between(first), timeout=90,
                 what="every partition back with the first worker", logs=logs)
        time.sleep(6)
    finally:
        finish_load(load, emitter)
    assert first.alive
    return code


# --- consumer lag ------------------------------------------------------------------------------


def test_consumer_lag_is_kafka_end_offsets_minus_committed_offsets(
        cluster: KafkaCluster, tmp_path: Path) -> None:
    app_id = f"t{uuid.uuid4().hex[:10]}"
    port = free_port()
    env = cluster_env(cluster, tmp_path, app_id, COMMPIPE_METRICS_PORT=str(port))
    settings = Settings.from_env(env)
    run_sync(lambda: ensure_commpipe_topics(settings))
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        exact, other = _sample_lag(cluster, settings, app_id, worker, port)
    finally:
        worker.stop(timeout=20)
    assert other == [], other[:5]
    assert any(any(truth.values()) for _, truth in exact), exact  # records not committed yet
    assert any(not any(truth.values()) for _, truth in exact), exact  # and all committed
    print(f"{len(exact)} exact samples; nonzero: "
          f"{sum(1 for _, t in exact if any(t.values()))}")


def _sample_lag(cluster: KafkaCluster, settings: Settings, app_id: str, worker: WorkerProcess,
                port: int) -> tuple[list[Any], list[Any]]:
    """Bursts of records, then samples of ``/metrics`` between two identical views of
    Kafka's end offsets and the group's committed offsets: (equal samples, the others)."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    wait_for(lambda: assigned(worker, settings.topic) == {0, 1, 2, 3}, timeout=90,
             what="the worker's assignment", logs=worker.log)
    tps = [TopicPartition(settings.topic, p) for p in range(4)]

    def metrics() -> tuple[dict[int, int], int]:
        samples = scrape({"COMMPIPE_METRICS_PORT": str(port)})
        lag = {int(dict(labels)["partition"]): int(v) for (name, labels), v in samples.items()
               if name == "commpipe_consumer_lag"}
        return lag, int(samples[("commpipe_events_consumed_total", ())])

    async def main() -> tuple[list[Any], list[Any]]:
        producer = AIOKafkaProducer(bootstrap_servers=cluster.bootstrap, acks="all")
        reader = AIOKafkaConsumer(bootstrap_servers=cluster.bootstrap)
        admin = AIOKafkaAdminClient(bootstrap_servers=cluster.bootstrap)
        for client in (producer, reader, admin):
            await client.start()
        exact: list[Any] = []
        other: list[Any] = []
        sent = 0
        try:
            async def kafka_view() -> tuple[dict[int, int], dict[int, int]]:
                ends = await reader.end_offsets(tps)
                committed = await admin.list_consumer_group_offsets(app_id, partitions=tps)
                return ({tp.partition: ends[tp] for tp in tps},
                        {tp.partition: (committed[tp].offset if tp in committed
                                        and committed[tp].offset >= 0 else 0) for tp in tps})

            rng = random.Random(31)
            for burst in range(8):
                for p in range(4):
                    for i in range(rng.randint(5, 40)):  # a different backlog per partition
                        event = {"v": 1, "kind": "request", "event_id": f"b{burst}p{p}i{i}",
                                 "correlation_id": f"c{burst}-{p}-{i}", "ts": time.time(),
                                 "source_service": f"s{p}", "target_service": "t",
                                 "protocol": "http"}
                        await producer.send(settings.topic, orjson.dumps(event), partition=p)
                        sent += 1
                await producer.flush()
                deadline = time.monotonic() + 4.0  # past Faust's 2.8 s commit interval
                while time.monotonic() < deadline:
                    ends0, committed0 = await kafka_view()
                    await asyncio.sleep(0.05)
                    lag, consumed = await asyncio.to_thread(metrics)
                    ends1, committed1 = await kafka_view()
                    # a sample counts when nothing moved meanwhile and the worker has read
                    # everything sent (its high watermarks are then the end offsets)
                    if (ends0, committed0) == (ends1, committed1) and consumed == sent:
                        truth = {p: ends0[p] - committed0[p] for p in range(4)}
                        (exact if lag == truth else other).append((lag, truth))
                    await asyncio.sleep(0.05)
        finally:
            for client in (producer, reader, admin):
                await client.stop() if client is not admin else await client.close()
        return exact, other

    return asyncio.run(main())

