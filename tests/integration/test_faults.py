"""Faults and bad input against the real broker, a real worker and the real databases.

Every expectation is computed here from what was sent (or, where the shim may
drop, from what the topic holds, read back with a plain consumer), never with
the code under test. Related fault tests live beside the features they break:
a worker killed mid-run (test_sink.py, test_stream_job.py) and PostgreSQL away
during flushes (test_sink.py).
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline import Emitter, Settings
from pipeline.core.edge import EdgeMeta
from pipeline.core.store import parse_id
from pipeline.wire.decode import decode_record
from pipeline.wire.events import split_edge_key
from pipeline.wire.headers import PRODUCER_HEADER, SEQ_HEADER
from tests.integration.traffic import CALL_SERVICES, random_call_event
from tests.integration.workers import (
    WorkerProcess,
    read_state,
    read_topic,
    wait_until,
    worker_environment,
    worker_starter,
)

pytestmark = pytest.mark.integration

SERVICES = CALL_SERVICES


@pytest.fixture
def env(kafka_bootstrap: str, topic_factory: Callable[..., str], tmp_path: Path
        ) -> dict[str, str]:
    return worker_environment(kafka_bootstrap, topic_factory, tmp_path, window_s=10.0,
                              grace_s=5.0)


@pytest.fixture
def workers(env: dict[str, str], tmp_path: Path) -> Iterator[Callable[[], WorkerProcess]]:
    with worker_starter(env, tmp_path) as start:
        yield start


def edge_totals(bootstrap: str, app_id: str) -> dict[tuple[str, str, str], Counter[str]]:
    """Per edge, the worker's cumulative counts (all partitions added), from its changelog."""
    out: dict[tuple[str, str, str], Counter[str]] = defaultdict(Counter)
    for key, value in read_state(bootstrap, app_id).items():
        if parse_id(key)[0] != "e":
            continue
        assert isinstance(value, EdgeMeta)
        t = value.totals
        counts = out[split_edge_key(parse_id(key)[2] or "")]
        counts.update({"request": t.requests, "response": t.responses, "timeout": t.timeouts,
                       "retry": t.retries})
        counts.update({f"error:{k}": n for k, n in t.errors.items()})
    return {edge: +counts for edge, counts in out.items()}


def expected_totals(events: list[dict[str, Any]]) -> dict[tuple[str, str, str], Counter[str]]:
    out: dict[tuple[str, str, str], Counter[str]] = defaultdict(Counter)
    for e in events:
        kind = e["kind"] if e["kind"] != "error" else f"error:{e['error_type']}"
        out[(e["source_service"], e["target_service"], e["protocol"])][kind] += 1
    return dict(out)


KINDS = ["request", "response", "error"]
"""What the load emits, as often as listed."""


class Traffic(threading.Thread):
    """A service emitting steadily (about ``rate`` events/s) through the shim, recording the
    slowest emit call; every event has its own correlation id."""

    def __init__(self, emitter: Emitter, rate: float, seed: int) -> None:
        super().__init__(daemon=True)
        self.emitter = emitter
        self.rate = rate
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.emitted: dict[str, dict[str, Any]] = {}
        self.calls: list[float] = []

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            for _ in range(10):
                kind, event = random_call_event(self.rng, n, KINDS, time.time())
                started = time.perf_counter()
                getattr(self.emitter, kind)(**event)
                self.calls.append(time.perf_counter() - started)
                self.emitted[f"c{n}"] = {"kind": kind, "protocol": "http", **event}
                n += 1
            time.sleep(10 / self.rate)


def test_broker_away_30s_buffers_drops_and_delivers_each_event_once(
        env: dict[str, str], workers: Callable[[], WorkerProcess], broker: Any) -> None:
    worker = workers()
    pid = worker.proc.pid if worker.proc else None
    emitter = Emitter(env["COMMPIPE_KAFKA_BOOTSTRAP"], env["COMMPIPE_TOPIC"],
                      settings=Settings.from_env({}, shim_buffer_size=3_000,
                                                 shim_linger_ms=5))
    traffic = Traffic(emitter, rate=400, seed=8)
    traffic.start()
    try:
        time.sleep(5)
        broker.pause()
        time.sleep(30)  # 30 s × 400 events/s: far beyond the 3,000-event buffer
        during = emitter.stats()
        broker.resume()
        time.sleep(5)
    finally:
        traffic.stop.set()
        traffic.join(10)
        broker.resume()
    assert emitter.flush(timeout=60) is True
    emitter.close()
    stats = emitter.stats()
    emitted = len(traffic.emitted)

    # the host stayed responsive: emit never waited for the broker (seconds if it had)
    calls = sorted(traffic.calls)
    assert calls[int(len(calls) * 0.99)] < 0.01 and calls[-1] < 0.5, calls[-5:]
    # bounded buffer, every event accounted for: sent or counted as dropped
    assert during.buffered <= 3_000
    assert stats.dropped > 0 and (stats.failed, stats.invalid, stats.buffered) == (0, 0, 0)
    assert stats.sent + stats.dropped == emitted

    # what the topic holds, read with a plain consumer: each sent event (maybe twice, if a
    # timed-out send had landed after all), every record with the shim's numbering
    records = read_topic(env["COMMPIPE_KAFKA_BOOTSTRAP"], env["COMMPIPE_TOPIC"])
    delivered: dict[str, dict[str, Any]] = {}
    copies = Counter[tuple[bytes, bytes, bytes]]()
    for record in records:
        headers = dict(record.headers)
        copies[(record.key, headers[PRODUCER_HEADER], headers[SEQ_HEADER])] += 1
        for event in decode_record(record.value).events:
            delivered[event.correlation_id] = traffic.emitted[event.correlation_id]
    assert len(delivered) == stats.sent
    second_copies = sum(n - 1 for n in copies.values())

    # the worker (never restarted) reconnected by itself and counted each event once
    want = expected_totals(list(delivered.values()))
    app_id = env["COMMPIPE_APP_ID"]
    try:
        wait_until(lambda: edge_totals(env["COMMPIPE_KAFKA_BOOTSTRAP"], app_id) == want,
                   timeout=120, what=f"{stats.sent} events ({second_copies} records sent twice)",
                   logs=worker.log)
    except AssertionError as e:
        got = edge_totals(env["COMMPIPE_KAFKA_BOOTSTRAP"], app_id)
        diff = {edge: dict(got.get(edge, Counter()) - want.get(edge, Counter()))
                | {f"-{k}": n for k, n in (want.get(edge, Counter())
                                           - got.get(edge, Counter())).items()}
                for edge in set(got) | set(want) if got.get(edge) != want.get(edge)}
        raise AssertionError(f"{e}\nthe changelog minus what was delivered: {diff}") from None
    assert worker.alive and worker.proc is not None and worker.proc.pid == pid
    assert "Traceback" not in worker.log(), worker.log()[-3000:]


# --- bad input at scale, hostile names --------------------------------------------------------

EDGES = [(s, t, "http" if i % 2 else "grpc")
         for i, (s, t) in enumerate((a, b) for a in SERVICES for b in SERVICES if a != b)][:10]
# valid, and hostile to anything that pastes strings into SQL, JSON or the exposition format
HOSTILE_METHOD = "GET /a'); DROP TABLE communication_rollups;--\"\\ {x=\"1\"}"
HOSTILE_CORRELATION = "x';DROP/**/TABLE/**/communication_events;--\"\\{}"


def _good_events(rng: random.Random, n: int, t0: float) -> list[dict[str, Any]]:
    events = []
    for i in range(n):
        source, target, protocol = rng.choice(EDGES)
        kind = rng.choices(["request", "response", "error", "timeout"], [40, 45, 10, 5])[0]
        event: dict[str, Any] = {
            "v": 1, "kind": kind, "event_id": f"g{i}", "correlation_id": f"g{i}",
            "source_service": source, "target_service": target, "protocol": protocol,
            "ts": round(t0 + 60.0 * i / n, 6)}
        if kind != "request":
            event["latency_ms"] = round(rng.uniform(1, 500), 2)
        if kind == "error":
            event["error_type"] = rng.choice(["connection", "http_5xx", "rejected"])
            if i % 500 == 0:
                event |= {"method": HOSTILE_METHOD, "correlation_id": HOSTILE_CORRELATION + str(i)}
        events.append(event)
    return events


def _bad_event(i: int, rng: random.Random, now: float) -> tuple[dict[str, Any] | int, str]:
    """One bad element of a batch and the field the dead letter must name ('' = none)."""
    source, target, protocol = rng.choice(EDGES)
    e: dict[str, Any] = {"v": 1, "kind": "response", "event_id": f"b{i}",
                         "correlation_id": f"bad{i}", "source_service": source,
                         "target_service": target, "protocol": protocol,
                         "ts": now - 100, "latency_ms": 5.0}
    cases: list[tuple[dict[str, Any] | int, str]] = [
        ({**e, "latency_ms": "12"}, "latency_ms"),              # wrong type
        ({**e, "status_code": 2.5}, "status_code"),
        ({k: v for k, v in e.items() if k != "source_service"}, "source_service"),  # missing
        ({**e, "kind": "teleport"}, "kind"),                    # unknown kind
        ({**e, "method": "x" * 5000}, "method"),                # huge strings
        ({**e, "source_service": "s" * 500}, "source_service"),
        ({**e, "latency_ms": -5.0}, "latency_ms"),              # negative, absurd, NaN
        ({**e, "latency_ms": 1e12}, "latency_ms"),
        ({**e, "latency_ms": float("nan")}, "latency_ms"),      # (orjson writes null)
        ({**e, "ts": 631_152_000.0}, "ts"),                     # 1990: far past
        ({**e, "ts": 7_258_118_400.0}, "ts"),                   # 2200: far future
        ({**e, "ts": now + 86_400.0}, "ts"),                    # valid, a day ahead: refused
        ({**e, "source_service": "orders'; DROP TABLE communication_events;--"},
         "source_service"),                                     # hostile names
        ({**e, "kind": "error", "error_type": 'x"} 1\n# EOF'}, "error_type"),
        ({**e, "target_service": 'a{b="c"}'}, "target_service"),
        ({**e, "protocol": "HTTP/1.1"}, "protocol"),
        (7, ""),                                                # not an object
    ]
    return cases[i % len(cases)]


def _bad_records(n: int, now: float) -> list[tuple[bytes, str]]:
    """Whole records that cannot be read, and the field the dead letter must name."""
    import orjson

    sample = {"v": 1, "kind": "response", "event_id": "r1", "correlation_id": "r1",
              "source_service": "orders", "target_service": "payments", "protocol": "grpc",
              "ts": now - 100, "latency_ms": 5.0}
    one = orjson.dumps([sample])
    cases: list[tuple[bytes, str]] = [
        (b"not json", ""), (one[: len(one) // 2], ""),                  # not JSON, truncated
        (one.replace(b'"grpc"', b'"gr\xffpc"'), ""),
        (b"", ""), (b"null", ""), (b"42", ""), (b"[]", ""),
        (one.replace(b'"latency_ms":5.0', b'"latency_ms":NaN'), ""),
        (one.replace(b'"latency_ms":5.0', b'"latency_ms":1e400'), ""),
        (orjson.dumps({**sample, "v": 2}), "v"),
        (orjson.dumps({**sample, "kind": "teleport"}), "kind"),
    ]
    out = [cases[i % len(cases)] for i in range(n - 1)]
    out.append((b"[" + b" " * (1024 * 1024) + b"]", ""))  # over the 1 MiB record limit
    return out


async def _produce(bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes]]
                   ) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_request_size=4 * 1024 * 1024,
                                acks="all")
    await producer.start()
    try:
        for i in range(0, len(records), 200):
            futures = [await producer.send(topic, value, key=key)
                       for key, value in records[i:i + 200]]
            for fut in futures:
                await fut
    finally:
        await producer.stop()


@pytest.fixture
def sink_env(env: dict[str, str], pg_database: str, tmp_path: Path) -> dict[str, str]:
    from pipeline.dev.process import free_port

    return {**env, "COMMPIPE_POSTGRES_DSN": pg_database,
            "COMMPIPE_DUCKDB_PATH": str(tmp_path / "commpipe.duckdb"),
            "COMMPIPE_IDLE_CLOSE_S": "3", "COMMPIPE_SINK_INTERVAL_S": "0.5",
            "COMMPIPE_METRICS_PORT": str(free_port()), "COMMPIPE_METRICS_HOST": "127.0.0.1"}


ROLLUP_SUMS = """
SELECT source_service, target_service, protocol, sum(requests), sum(responses), sum(errors),
       sum(timeouts), sum(latency_count)
FROM communication_rollups GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"""


def test_one_percent_bad_input_in_100k_events(sink_env: dict[str, str], tmp_path: Path) -> None:
    import asyncio

    import orjson

    from tests.integration.test_metrics import scrape
    from tests.integration.test_sink import Databases

    rng = random.Random(100)
    now = time.time()
    good = _good_events(rng, 99_000, now - 120)
    bad_events = [_bad_event(i, rng, now) for i in range(720)]
    bad_records = _bad_records(280, now)
    # good events in time order, 200 per record of one edge; bad elements slipped in
    records: list[tuple[bytes | None, bytes]] = []
    open_batches: dict[tuple[str, str, str], list[Any]] = defaultdict(list)
    slots = sorted(rng.sample(range(len(good)), len(bad_events)))
    bad_at = dict(zip(slots, (b for b, _ in bad_events), strict=True))
    for i, event in enumerate(good):
        edge = (event["source_service"], event["target_service"], event["protocol"])
        batch = open_batches[edge]
        batch.append(event)
        if i in bad_at:
            batch.append(bad_at[i])
        if len(batch) >= 200:
            records.append(("\x1f".join(edge).encode(), orjson.dumps(batch)))
            open_batches[edge] = []
    records += [("\x1f".join(e).encode(), orjson.dumps(b)) for e, b in open_batches.items() if b]
    for value, _ in bad_records:
        records.insert(rng.randrange(len(records) + 1), (None, value))

    with worker_starter(sink_env, tmp_path) as start:
        worker = start()
        pid = worker.proc.pid if worker.proc else None
        bootstrap, app_id = sink_env["COMMPIPE_KAFKA_BOOTSTRAP"], sink_env["COMMPIPE_APP_ID"]
        asyncio.run(_produce(bootstrap, sink_env["COMMPIPE_TOPIC"], records))

        # every good event counted, once
        want = expected_totals(good)
        wait_until(lambda: edge_totals(bootstrap, app_id) == want, timeout=180,
                   what="99,000 good events", logs=worker.log)
        # every bad one in the dead-letter topic, with its reason
        dead = read_topic(bootstrap, sink_env["COMMPIPE_DLQ_TOPIC"])
        assert len(dead) == len(bad_events) + len(bad_records)
        by_record, by_event, not_objects = Counter[tuple[bytes, str]](), {}, 0
        for message in dead:
            headers = {k: v.decode() for k, v in message.headers}
            assert headers["commpipe-reason"], headers
            value = message.value
            if "commpipe-truncated" in headers:  # the oversized record: its first 64 KiB
                value = next(v for v, _ in bad_records if v.startswith(value)
                             and len(v) == int(headers["commpipe-truncated"]) > len(value))
            if "commpipe-index" not in headers and headers.get("commpipe-field") != "ts":
                by_record[(value, headers.get("commpipe-field", ""))] += 1
            elif message.value == b"7":
                not_objects += 1
            else:
                by_event[orjson.loads(message.value)["correlation_id"]] = headers["commpipe-field"]
        assert by_record == Counter(bad_records)
        assert by_event == {e["correlation_id"]: f for e, f in bad_events if e != 7}
        assert not_objects == sum(1 for e, _ in bad_events if e == 7)

        # both databases: the rollups add up, hostile strings stored as sent, nothing dropped
        db = Databases(sink_env["COMMPIPE_POSTGRES_DSN"], sink_env["COMMPIPE_DUCKDB_PATH"])
        sums = sorted((*edge, c["request"], c["response"],
                       sum(n for k, n in c.items() if k.startswith("error:")), c["timeout"],
                       c["response"] + c["timeout"]
                       + sum(n for k, n in c.items() if k.startswith("error:")))
                      for edge, c in want.items())
        for which in ("pg", "duck"):
            wait_until(lambda w=which: [tuple(int(x) if not isinstance(x, str) else x
                                              for x in r) for r in getattr(db, w)(ROLLUP_SUMS)]
                       == sums, timeout=120, what=f"rollups in {which}", logs=worker.log)
        hostile = sorted((e["correlation_id"], e["method"]) for e in good if "method" in e)
        assert hostile
        query = ("SELECT correlation_id, method FROM communication_events "
                 "WHERE method IS NOT NULL ORDER BY 1")
        assert db.pg(query) == db.duck(query) == hostile
        assert db.count("pg", "communication_events") == sum(
            1 for e in good if e["kind"] in ("error", "timeout"))

        # /metrics still parses; the worker never restarted
        metrics = scrape(sink_env)
        assert metrics[("commpipe_events_consumed_total", ())] == len(good)
        assert sum(v for (name, _), v in metrics.items()
                   if name == "commpipe_dead_letters_total") == len(dead)
        assert worker.alive and worker.proc is not None and worker.proc.pid == pid
        assert "Traceback" not in worker.log(), worker.log()[-3000:]


def _listening(port: int) -> set[str]:
    """Addresses a local TCP socket listens on at ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:  # 0A = LISTEN
                    found.add(address)
    return found


def test_secrets_stay_out_of_the_worker_log_and_metrics_bind_loopback(
        env: dict[str, str], tmp_path: Path) -> None:
    from pipeline.dev.process import free_port

    port, dead_port = free_port(), free_port()
    secret = "Pw-5e3cf1"
    sink_env = {**env, "COMMPIPE_POSTGRES_DSN": f"postgresql://app:{secret}@127.0.0.1:{dead_port}/x",
                "COMMPIPE_METRICS_PORT": str(port), "COMMPIPE_WORKER_LOGLEVEL": "info",
                "COMMPIPE_IDLE_CLOSE_S": "1", "COMMPIPE_SINK_INTERVAL_S": "0.5",
                "COMMPIPE_SINK_BACKOFF_MAX_S": "1"}
    with worker_starter(sink_env, tmp_path) as start:
        worker = start()
        emitter = Emitter(env["COMMPIPE_KAFKA_BOOTSTRAP"], env["COMMPIPE_TOPIC"],
                          settings=Settings.from_env({}, shim_linger_ms=5))
        emitter.request(source_service="a", target_service="b", ts=time.time() - 60)
        assert emitter.flush(timeout=30)
        emitter.close()
        wait_until(lambda: worker.log().count("sink postgres: flush failed") >= 1, timeout=60,
                   what="the sink to fail on the unreachable PostgreSQL", logs=worker.log)
        assert _listening(port) == {"0100007F"}  # 127.0.0.1 only, nothing on other addresses
    assert secret not in worker.log()
