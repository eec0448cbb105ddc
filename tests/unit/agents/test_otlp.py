"""The OTLP bridge without Kafka: what it publishes, in which rounds, when it commits, and
that the worker's exactly-once core applies every call once whatever landed twice or not
at all before a replay."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaTimeoutError

from agents.otlp import ROUND_OFFSETS, OtlpBridge, Publication, publications, rounds
from pipeline.core.batch import PartitionBatch
from pipeline.core.dedup import MAX_GAPS
from pipeline.core.store import parse_id
from pipeline.core.window import WindowConfig
from pipeline.settings import Settings
from pipeline.wire.decode import decode_record, validate_event
from pipeline.wire.events import Event
from pipeline.wire.headers import PRODUCER_HEADER, SEQ_HEADER
from pipeline.wire.otlp import decode_otlp
from tests.unit.wire.test_otlp import Client, encode

T0 = 1_763_900_000.0
EDGES = [("orders", "payments", "grpc"), ("orders", "stock", "http"), ("web", "orders", "http")]
CFG = WindowConfig(size_s=10.0, grace_s=3600.0, max_future_s=300.0)


def call(i: int, edge: tuple[str, str, str], ts: float) -> tuple[Event, Event]:
    s, t, p = edge
    base = {"v": 1, "correlation_id": f"c{i}", "source_service": s, "target_service": t,
            "protocol": p}
    return (validate_event({**base, "kind": "request", "event_id": f"q{i}", "ts": ts}),
            validate_event({**base, "kind": "response", "event_id": f"r{i}", "ts": ts + 0.01,
                            "latency_ms": 10.0}))


def test_one_record_per_edge_keyed_by_the_edge_numbered_by_source_and_offset() -> None:
    c = Client()
    spans = [c.span("a", peer__service="payments", rpc__system="grpc"),
             c.span("b", peer__service="stock", http__request__method="GET"),
             c.span("c", peer__service="payments", rpc__system="grpc", error="")]
    calls = decode_otlp(encode(spans, "proto")).calls
    out = publications("otlp_spans", 2, 41, calls, max_events=500, max_bytes=512 * 1024)
    assert [p.key for p in out] == [b"orders\x1fpayments\x1fgrpc", b"orders\x1fstock\x1fhttp"]
    assert [p.headers for p in out] == [[(PRODUCER_HEADER, b"otlp:otlp_spans:2"),
                                         (SEQ_HEADER, b"42")]] * 2
    assert [p.events for p in out] == [4, 2]
    first = decode_record(out[0].value)
    assert first.errors == [] and first.events == [calls[0][0], calls[0][1], calls[2][0],
                                                   calls[2][1]]
    assert publications("otlp_spans", 2, 41, calls, max_events=500,
                        max_bytes=512 * 1024) == out  # a replay publishes the same records


def test_an_edge_beyond_one_records_bounds_goes_out_in_lanes_each_its_own_producer() -> None:
    calls = [call(i, EDGES[0], T0 + i) for i in range(4)]
    out = publications("t", 1, 9, calls, max_events=3, max_bytes=512 * 1024)
    assert [(p.headers[0][1], p.headers[1][1], p.events) for p in out] == [
        (b"otlp:t:1", b"10", 3), (b"otlp:t:1:1", b"10", 3), (b"otlp:t:1:2", b"10", 2)]
    assert [e for p in out for e in decode_record(p.value).events] == [e for c in calls
                                                                       for e in c]
    size = max(len(orjson.dumps(e.to_wire())) for c in calls for e in c)
    by_bytes = publications("t", 1, 9, calls, max_events=500, max_bytes=2 * size + 3)
    assert all(len(p.value) <= 2 * size + 3 for p in by_bytes) and len(by_bytes) == 4


@dataclass
class Rec:
    """What the bridge reads of a Kafka record (aiokafka's ConsumerRecord has these)."""

    topic: str
    partition: int
    offset: int
    value: bytes
    timestamp: int
    key: bytes | None = None


def test_rounds_span_fewer_offsets_than_the_worker_remembers_as_gaps() -> None:
    assert ROUND_OFFSETS == MAX_GAPS
    r = random.Random(3)
    tps = [TopicPartition("t", p) for p in range(3)]
    batch = {tp: [Rec("t", tp.partition, o, b"", 0)
                  for o in sorted(r.sample(range(1000), 150))] for tp in tps}
    seen: dict[TopicPartition, list[int]] = {tp: [] for tp in tps}
    for this in rounds(batch):
        for tp, records in this.items():
            assert records[-1].offset - records[0].offset < MAX_GAPS
            seen[tp] += [x.offset for x in records]
    assert seen == {tp: [x.offset for x in batch[tp]] for tp in tps}


def _apply(log: list[Publication], store: dict[str, Any], seed: int) -> int:
    """The worker's core over the events topic (one partition holds every edge here: the
    bookkeeping is per edge), in batches of random size; returns the copies it skipped."""
    r = random.Random(seed)
    i, copies = 0, 0
    while i < len(log):
        n = r.randint(1, 40)
        work = PartitionBatch(0, CFG, store)
        for offset in range(i, min(i + n, len(log))):
            p = log[offset]
            headers = dict(p.headers)
            producer = (headers[PRODUCER_HEADER].decode(), int(headers[SEQ_HEADER]))
            work.apply(offset, decode_record(p.value).events, record_ts=T0 + 100, now=T0,
                       producer=producer)
        copies += work.duplicates
        store.update(work.changes())
        i += n
    return copies


def _totals(store: dict[str, Any]) -> Counter[str]:
    out: Counter[str] = Counter()
    for key, value in store.items():
        if parse_id(key)[0] == "w":
            out["request"] += value.requests
            out["response"] += value.responses
    return out


@pytest.mark.parametrize("seed", range(6))
def test_a_round_that_partly_landed_then_replayed_is_applied_exactly_once(seed: int) -> None:
    """Rounds of one OTLP partition (sparse offsets, lanes): the first attempt loses some
    sends of one round and delivers the rest in any order, then the bridge replays from the
    last commit; a stale owner also sends an old round again. Each call counts once."""
    r = random.Random(seed)
    offsets = sorted(r.sample(range(3000), 300))
    records, n_calls = [], 0
    for offset in offsets:
        calls = [call(n_calls + k, r.choice(EDGES), T0 + offset / 100) for k in
                 range(r.randint(1, 4))]
        n_calls += len(calls)
        records.append(Rec("otlp", 5, offset, b"", 0))
        records[-1].calls = calls  # type: ignore[attr-defined]
    plan = list(rounds({TopicPartition("otlp", 5): records}))
    pubs = [[p for rec in this[TopicPartition("otlp", 5)]
             for p in publications("otlp", 5, rec.offset, rec.calls, max_events=3,
                                   max_bytes=512 * 1024)] for this in plan]
    failed = r.randrange(len(plan))
    log: list[Publication] = []
    for k, round_pubs in enumerate(pubs[:failed]):
        log += round_pubs
        if k and r.random() < 0.2:
            log += pubs[k - 1]  # a stale owner's copy of an earlier round
    landed = [p for p in pubs[failed] if r.random() < 0.6]
    r.shuffle(landed)
    log += landed
    for round_pubs in pubs[failed:]:  # the replay from the last commit
        log += round_pubs
    store: dict[str, Any] = {}
    copies = _apply(log, store, seed)
    assert _totals(store) == {"request": n_calls, "response": n_calls}
    assert copies == sum(p.events for p in log) - 2 * n_calls


def test_without_rounds_a_send_lost_before_later_ones_landed_would_be_dropped() -> None:
    """Why rounds are bounded: a number more than MAX_GAPS below the highest is taken for a
    copy, so a lost send replayed after later ones landed would be skipped."""
    lost, later = call(0, EDGES[0], T0), call(1, EDGES[0], T0 + 1)
    first = publications("otlp", 0, 10, [lost], max_events=500, max_bytes=1 << 19)
    far = publications("otlp", 0, 10 + MAX_GAPS + 1, [later], max_events=500, max_bytes=1 << 19)
    store: dict[str, Any] = {}
    _apply([*far, *first], store, 0)  # the replay brings the lost one after the later one
    assert _totals(store) == {"request": 1, "response": 1}  # one call lost
    near = publications("otlp", 0, 10 + MAX_GAPS - 1, [later], max_events=500,
                        max_bytes=1 << 19)
    store = {}
    _apply([*near, *first], store, 0)
    assert _totals(store) == {"request": 2, "response": 2}


class FakeConsumer:
    """One OTLP partition; ``committed`` outlives the consumer, like the group's offsets."""

    def __init__(self, records: list[Rec], committed: dict[TopicPartition, int]) -> None:
        self.records = records
        self.committed = committed
        self.tp = TopicPartition(records[0].topic, records[0].partition)
        self.position = committed.get(self.tp, 0)

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def getmany(self, *, timeout_ms: int, max_records: int) -> dict[Any, list[Rec]]:
        batch = [x for x in self.records if x.offset >= self.position][:7]
        if not batch:
            raise asyncio.CancelledError  # the test is over
        self.position = batch[-1].offset + 1
        return {self.tp: batch}

    def assignment(self) -> set[TopicPartition]:
        return {self.tp}

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.committed.update(offsets)

    def highwater(self, tp: TopicPartition) -> int:
        return self.records[-1].offset + 1


class FakeProducer:
    """Sends land in ``log`` at once, except the ``fail``-th send of this producer, which
    fails after the sends before it landed; what was sent after it lands as well."""

    def __init__(self, log: list[tuple[str, Any]], fail: int | None) -> None:
        self.log = log
        self.fail = fail
        self.sent = 0

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def send(self, topic: str, *, value: bytes, key: bytes | None, headers: Any,
                   timestamp_ms: int | None = None) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.sent += 1
        if self.sent == self.fail:
            future.set_exception(KafkaTimeoutError())
        else:
            self.log.append((topic, Publication(key or b"", value, list(headers), 0)))
            future.set_result(None)
        return future


def test_the_bridge_commits_only_what_was_delivered_and_replays_the_rest() -> None:
    c = Client()
    records = []
    for i in range(40):
        spans = [c.span(f"s{i}", start=int((T0 + i) * 1e9), peer__service=t,
                        rpc__system="grpc") for t in ("payments", "stock")[: 1 + i % 2]]
        records.append(Rec("otlp", 0, 3 * i, encode(spans, "proto" if i % 3 else "json"),
                           int((T0 + i) * 1000) + 5000))
    records[7].value = b"not an OTLP record"
    committed: dict[TopicPartition, int] = {}
    log: list[tuple[str, Any]] = []
    fails = iter([9, None])
    settings = Settings.from_env({}, otlp_topic="otlp", topic="events", dlq_topic="dlq")
    bridge = OtlpBridge(settings, consumer_factory=lambda: FakeConsumer(records, committed),
                        producer_factory=lambda: FakeProducer(log, next(fails)))
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(bridge.run())
    assert bridge.failures == 1 and committed == {TopicPartition("otlp", 0): 3 * 39 + 1}
    events = [p for topic, p in log if topic == "events"]
    letters = [p for topic, p in log if topic == "dlq"]
    store: dict[str, Any] = {}
    copies = _apply(events, store, 1)
    want = sum(1 + i % 2 for i in range(40) if i != 7)
    assert _totals(store) == {"request": want, "response": want}
    assert copies > 0  # the first session's round had landed in part: replayed, skipped
    assert {dict(p.headers)["commpipe-dlq-id"] for p in letters} == {b"otlp/0/21"}
    assert bridge.spans["call"] >= want and bridge.dead_letter_counts["record"] >= 1
