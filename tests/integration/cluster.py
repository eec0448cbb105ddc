"""Helpers for the three-broker tests (test_kafka_cluster.py) and the rebalance tests
(test_rebalance.py): topics led by one broker, a consumer group coordinated by it, load
through the shim, the exact expectation of what the table and both databases must hold,
computed from the events emitted, and what the table and ``/metrics`` hold per edge."""

from __future__ import annotations

import math
import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from pipeline import Emitter, Settings
from pipeline.core.edge import EdgeMeta
from pipeline.core.store import parse_id
from pipeline.dev.kafka_cluster import KafkaCluster
from pipeline.dev.process import run_sync
from pipeline.wire.events import split_edge_key
from tests.integration.test_metrics import scrape
from tests.integration.traffic import random_call_event
from tests.integration.workers import read_state

BUFFER = 50_000  # the shim's bound: far above what a failover holds back at 400 events/s
WINDOW = 10.0
# No event may count as late: the tests compare every window's counts, and records the shim
# sends again after a failover may arrive behind newer ones. Windows close for idleness.
GRACE = 600.0
ROLLUPS_SQL = """
SELECT extract(epoch FROM window_start), source_service, target_service, protocol, requests,
       responses, errors, timeouts, latency_count, late_events, errors_by_type
FROM communication_rollups ORDER BY 1, 2, 3, 4"""


def java_hash(text: str) -> int:
    """Java's ``String.hashCode`` (ASCII text), which Kafka uses to place a group."""
    h = 0
    for ch in text:
        h = (31 * h + ord(ch)) & 0xFFFFFFFF
    return h - (1 << 32) if h >= 1 << 31 else h


def offsets_partition(group: str, partitions: int = 8) -> int:
    """The ``__consumer_offsets`` partition whose leader coordinates ``group``
    (``offsets.topic.num.partitions`` is 8 in the dev config)."""
    return (java_hash(group) & 0x7FFFFFFF) % partitions


def warm_up_offsets_topic(cluster: KafkaCluster) -> None:
    """Make Kafka create ``__consumer_offsets`` (a group coordinator look-up does)."""
    from aiokafka import AIOKafkaConsumer

    async def main() -> None:
        consumer = AIOKafkaConsumer(bootstrap_servers=cluster.bootstrap, group_id="warm-up")
        await consumer.start()
        try:
            await consumer._coordinator.ensure_coordinator_known()  # noqa: SLF001
        finally:
            await consumer.stop()

    run_sync(main)


def group_led_by(cluster: KafkaCluster, node_id: int, rng: random.Random) -> str:
    """A new group id (app id) whose coordinator is ``node_id``."""
    leaders = cluster.partition_leaders("__consumer_offsets")
    for _ in range(1000):
        group = f"t{rng.getrandbits(40):010x}"
        if leaders[offsets_partition(group)] == node_id:
            return group
    raise AssertionError(f"no group id found that node {node_id} coordinates: {leaders}")


def create_topics_led_by(cluster: KafkaCluster, settings: Settings, node_id: int) -> None:
    """Every topic of the worker (:func:`agents.topics.commpipe_topics`, same configs) with
    ``node_id`` first in each partition's replicas: its preferred leader."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    from agents.topics import commpipe_topics

    others = [n for n in sorted(cluster.nodes) if n != node_id]
    replicas = [node_id, *others][:settings.topic_replication_factor]

    async def main() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=cluster.bootstrap)
        await admin.start()
        try:
            topics = [NewTopic(name, -1, -1, replica_assignments={p: replicas for p in range(n)},
                               topic_configs=configs)
                      for name, (n, configs) in commpipe_topics(settings).items()]
            response = await admin.create_topics(topics)
            assert all(e[1] == 0 for e in response.topic_errors), response.topic_errors
        finally:
            await admin.close()

    run_sync(main)
    for name in (settings.topic, f"{settings.app_id}-state-changelog"):
        leaders = cluster.partition_leaders(name)
        assert set(leaders.values()) == {node_id}, (name, leaders)


def table_totals(bootstrap: str, app_id: str) -> dict[tuple[str, str, str], Counter[str]]:
    """Per edge, the cumulative counts in the worker's changelog (all partitions added);
    :func:`read_state` also checks each key is in its source partition's changelog."""
    out: dict[tuple[str, str, str], Counter[str]] = defaultdict(Counter)
    for key, value in read_state(bootstrap, app_id).items():
        if parse_id(key)[0] != "e":
            continue
        assert isinstance(value, EdgeMeta)
        t = value.totals
        counts = out[split_edge_key(parse_id(key)[2] or "")]
        counts.update({"request": t.requests, "response": t.responses, "timeout": t.timeouts})
        counts.update({f"error:{k}": n for k, n in t.errors.items()})
    return {edge: +counts for edge, counts in out.items()}


def reported_totals(port: int) -> dict[tuple[str, str, str], Counter[str]]:
    """Per edge, the counts a worker's ``/metrics`` reports (requests, responses, errors)."""
    reported: dict[tuple[str, str, str], Counter[str]] = defaultdict(Counter)
    for (name, labels), value in scrape({"COMMPIPE_METRICS_PORT": str(port)}).items():
        label = dict(labels)
        if not name.startswith("commpipe_communication_") or "source_service" not in label:
            continue
        edge = (label["source_service"], label["target_service"], label["protocol"])
        kind = name.removeprefix("commpipe_communication_").removesuffix("_total")
        if kind in ("requests", "responses"):
            reported[edge][kind[:-1]] += int(value)
        elif kind == "errors":
            reported[edge][f"error:{label['error_type']}"] += int(value)
    return {e: +c for e, c in reported.items()}


def finish_load(load: Load, emitter: Emitter) -> None:
    """Stop the load, deliver what the shim holds, check nothing was lost or held unbounded."""
    load.finish()
    assert emitter.flush(timeout=120) is True
    emitter.close()
    stats = emitter.stats()
    assert (stats.sent, stats.dropped, stats.failed, stats.invalid, stats.buffered) == (
        len(load.emitted), 0, 0, 0, 0), stats
    assert load.max_buffered <= BUFFER
    assert load.slowest_emit < 0.5, load.slowest_emit  # emit never waited for the brokers


KINDS = ["request", "response", "response", "error"]
"""What the load emits, as often as listed."""


class Load(threading.Thread):
    """Services emitting about ``rate`` events/s through one shim (seeded), recording every
    event, the slowest emit call and the most events the shim held at once."""

    def __init__(self, emitter: Emitter, rate: float, seed: int) -> None:
        super().__init__(daemon=True)
        self.emitter = emitter
        self.rate = rate
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.emitted: list[dict[str, Any]] = []
        self.slowest_emit = 0.0
        self.max_buffered = 0
        self.last_emit = 0.0

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            for _ in range(10):
                kind, event = random_call_event(self.rng, n, KINDS, time.time())
                started = time.perf_counter()
                getattr(self.emitter, kind)(**event)
                self.slowest_emit = max(self.slowest_emit, time.perf_counter() - started)
                self.emitted.append({"kind": kind, **event})
                n += 1
            self.last_emit = time.monotonic()
            self.max_buffered = max(self.max_buffered, self.emitter.stats().buffered)
            time.sleep(10 / self.rate)

    def finish(self) -> None:
        self.stop.set()
        self.join(10)


def expected_windows(events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """Rows of :data:`ROLLUPS_SQL`, computed from the events: plain counting per window."""
    counts: dict[tuple[float, str, str, str], Counter[str]] = defaultdict(Counter)
    errors: dict[tuple[float, str, str, str], Counter[str]] = defaultdict(Counter)
    for e in events:
        key = (math.floor(e["ts"] / WINDOW) * WINDOW, e["source_service"], e["target_service"],
               e["protocol"])
        counts[key][e["kind"]] += 1
        if e["kind"] == "error":
            errors[key][e["error_type"]] += 1
    return [(*key, c["request"], c["response"], c["error"], c["timeout"],
             c["response"], 0, dict(errors[key]))
            for key, c in sorted(counts.items())]


def expected_edge_totals(events: list[dict[str, Any]]) -> dict[tuple[str, str, str],
                                                                Counter[str]]:
    out: dict[tuple[str, str, str], Counter[str]] = defaultdict(Counter)
    for e in events:
        kind = e["kind"] if e["kind"] != "error" else f"error:{e['error_type']}"
        out[(e["source_service"], e["target_service"], e["protocol"])][kind] += 1
    return dict(out)


def rollup_rows(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Database rows as :func:`expected_windows` writes them (epochs as floats, JSON parsed)."""
    import orjson

    out = []
    for r in rows:
        by_type = orjson.loads(r[10]) if isinstance(r[10], str) else r[10]
        out.append((float(r[0]), *r[1:10], {k: v for k, v in by_type.items() if v}))
    return out


def wait_for(check: Callable[[], bool], *, timeout: float, what: str,
             logs: Callable[[], str] = lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(1.0)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{logs()[-4000:]}")


def dump_for_reproduction(path: Path, bootstrap: str, app_id: str, topic: str,
                          emitted: list[dict[str, Any]]) -> Path:
    """Everything needed to find where a count went wrong, as JSON lines in ``path`` (field
    ``what``): the events emitted, the input topic's records (partition, offset, timestamp,
    shim headers, events' correlation ids, events per edge), every changelog record of an
    edge or partition key (partition, offset, source offset applied, its whole value) and
    the group's committed offsets."""
    from aiokafka import TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    from pipeline.core.edge import PartitionMeta
    from pipeline.core.store import decode_state
    from pipeline.wire.decode import decode_record
    from pipeline.wire.events import edge_key
    from tests.integration.workers import read_topic

    with open(path, "wb") as out:
        def line(what: str, **data: Any) -> None:
            out.write(orjson.dumps({"what": what, **data}) + b"\n")

        for e in emitted:
            line("emitted", **e)
        for r in read_topic(bootstrap, topic):
            headers = {k: v.decode(errors="replace") for k, v in (r.headers or ())}
            try:
                events = decode_record(r.value).events
            except Exception:  # noqa: BLE001 - a bad record (a dead letter)
                events = []
            per_edge = Counter(edge_key(ev.source_service, ev.target_service, ev.protocol)
                               for ev in events)
            line("input", partition=r.partition, offset=r.offset, timestamp=r.timestamp,
                 key=r.key.decode(errors="replace") if r.key else None, headers=headers,
                 events=[ev.correlation_id for ev in events], edges=dict(per_edge))
        for r in read_topic(bootstrap, f"{app_id}-state-changelog"):
            key = r.key.decode()
            if parse_id(key)[0] not in ("e", "p"):
                continue
            value = decode_state(r.value) if r.value is not None else None
            known = isinstance(value, EdgeMeta | PartitionMeta)
            line("changelog", partition=r.partition, offset=r.offset, timestamp=r.timestamp,
                 key=key, applied=value.offset if known else None,
                 value=orjson.loads(orjson.dumps(value.to_json())) if known else None)

        async def committed() -> dict[str, int]:
            admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
            await admin.start()
            try:
                found = await admin.list_consumer_group_offsets(app_id)
                return {f"{tp.topic}:{tp.partition}": m.offset for tp, m in found.items()
                        if isinstance(tp, TopicPartition)}
            finally:
                await admin.close()

        try:
            line("committed", offsets=run_sync(committed))
        except Exception as e:  # noqa: BLE001 - Tansu cannot always answer; keep the rest
            line("committed", error=f"{type(e).__name__}: {e}")
    return path


def first_divergence(path: Path, logs: str = "") -> str:
    """Where the changelog first went wrong, from a :func:`dump_for_reproduction` file: per
    (partition, edge), the first edge value whose totals differ from the events of the input
    records up to the offset it says it applied (copies of one shim record counted once),
    with the value before it and the input records in between; and the lines of the
    workers' ``logs`` that name that partition."""
    lines = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    inputs: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for line in lines:
        if line["what"] == "input":
            inputs[line["partition"]].append(line)
    out: list[str] = []
    for line in lines:
        if line["what"] == "committed":
            out.append(f"committed: {line.get('offsets', line.get('error'))}")
    history: dict[tuple[int, str], list[dict[str, Any]]] = defaultdict(list)
    for line in lines:
        if line["what"] == "changelog" and line["key"].startswith("e"):
            _, partition, edge, _ = parse_id(line["key"])
            history[(partition, edge or "")].append(line)
    for (partition, edge), values in sorted(history.items()):
        seen: set[tuple[str, str]] = set()
        upto: list[tuple[int, int]] = []  # (offset, events of the edge up to it)
        total = 0
        for record in sorted(inputs[partition], key=lambda r: r["offset"]):
            copy = (record["headers"].get("commpipe-producer", ""),
                    record["headers"].get("commpipe-seq", str(record["offset"])))
            if edge in record["edges"] and copy not in seen:
                seen.add(copy)
                total += record["edges"][edge]
            upto.append((record["offset"], total))
        before: dict[str, Any] | None = None
        for value in sorted(values, key=lambda v: v["offset"]):
            if value["value"] is None:
                continue
            held = value["value"]["totals"]["events"] + value["value"]["late_events"]
            applied = value["applied"]
            want = max((n for o, n in upto if o <= applied), default=0)
            if held != want:
                lo = before["applied"] if before else -1
                between = [(r["offset"], r["edges"].get(edge, 0), r["timestamp"])
                           for r in inputs[partition] if lo < r["offset"] <= applied
                           and edge in r["edges"]]
                out.append(
                    f"partition {partition} edge {edge!r}: changelog offset {value['offset']} "
                    f"(written at {value['timestamp']}) says it applied input up to "
                    f"{applied} and holds {held} events, the input has {want}; the value "
                    f"before: {None if before is None else (before['offset'], before['applied'], before['value']['totals']['events'] + before['value']['late_events'])}; "  # noqa: E501
                    f"input records of the edge in between (offset, events, timestamp): "
                    f"{between[:20]}")
                named = [t for t in logs.splitlines()
                         if t.startswith("===") or f"/{partition} " in t]
                out.append(f"--- log lines naming partition {partition}:\n"
                           + "\n".join(named[-60:]))
                break
            before = value
    return "\n".join(out) or "the changelog's edge values all agree with the input"
