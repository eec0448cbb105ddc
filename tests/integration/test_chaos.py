"""Chaos: a worker SIGKILLed at seeded random moments while it works, many times in one run.

Steady load comes from the shim (numbered records, one edge per record) and from a
foreign producer (single-event records on partitions it picks itself, no headers;
among them events stamped 303 s ahead of their record, events a minute late, and
records that are not valid v1). Meanwhile the worker is killed with SIGKILL over and
over, at moments drawn from a seeded generator: during start-up and recovery, and
while it is applying batches and writing its changelog; the sink is on, and
PostgreSQL is stopped and started again in between. At the end one worker runs to
completion, and the table (read back from its changelog), ``/metrics`` and both
databases must equal totals computed here from what was sent, and the dead-letter
topic must hold exactly the bad input (each dead letter once, by its id, whatever a
replay sent again).

``COMMPIPE_CHAOS_KILLS`` (20) sets the kills of the CI run; the ``soak`` variant
(``python -m pytest -m soak``) kills 60 times over a longer run.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from pipeline import Emitter, Settings
from pipeline.core.edge import EdgeMeta
from pipeline.core.store import parse_id
from pipeline.core.totals import EdgeTotals
from pipeline.dev.process import free_port
from pipeline.wire.events import split_edge_key
from tests.integration.cluster import dump_for_reproduction
from tests.integration.test_metrics import scrape, try_scrape
from tests.integration.test_sink import Databases
from tests.integration.workers import (
    WorkerProcess,
    read_state,
    read_topic,
    wait_until,
    worker_environment,
    worker_starter,
)

WINDOW, GRACE = 2.0, 10.0
SHIM_EDGES = [("gateway", "orders", "http"), ("orders", "payments", "grpc"),
              ("orders", "inventory", "http"), ("payments", "bank", "amqp"),
              ("inventory", "db", "grpc")]
FOREIGN = ("legacy", "warehouse", "kafka")
Edge = tuple[str, str, str]


@dataclass
class Sent:
    """What was sent, counted here: the expectation every store must meet."""

    windows: dict[tuple[float, Edge], Counter[str]] = field(
        default_factory=lambda: defaultdict(Counter))
    latencies: dict[tuple[float, Edge], list[float]] = field(
        default_factory=lambda: defaultdict(list))
    totals: dict[Edge, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    late: Counter[Edge] = field(default_factory=Counter)
    kept: Counter[str] = field(default_factory=Counter)  # stored one by one, by kind
    dead: dict[str, str] = field(default_factory=dict)  # dead-letter id -> field at fault
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, event: dict[str, Any], *, late: bool = False) -> None:
        edge = (event["source_service"], event["target_service"], event["protocol"])
        kind = event["kind"]
        with self.lock:
            name = f"error:{event['error_type']}" if kind == "error" else kind
            self.totals[edge][name] += 1
            if kind in ("error", "timeout", "retry"):
                self.kept[kind] += 1
            if late:
                self.late[edge] += 1
                return
            key = (math.floor(event["ts"] / WINDOW) * WINDOW, edge)
            self.windows[key][name] += 1
            if "latency_ms" in event:
                self.latencies[key].append(event["latency_ms"])


def _event(rng: random.Random, edge: Edge, ts: float) -> dict[str, Any]:
    s, t, p = edge
    kind = rng.choices(("request", "response", "error", "timeout", "retry"),
                       (40, 40, 8, 4, 8))[0]
    event: dict[str, Any] = {"kind": kind, "source_service": s, "target_service": t,
                             "protocol": p, "ts": ts}
    if kind in ("response", "error", "timeout"):
        event["latency_ms"] = round(rng.lognormvariate(3.0, 0.8), 3)
    if kind == "error":
        event["error_type"] = rng.choice(("http_5xx", "connection", "rejected"))
    if kind == "retry":
        event.update(attempt=rng.randint(1, 3), backoff_ms=float(rng.choice((100, 200, 400))))
    return event


def shim_load(env: dict[str, str], sent: Sent, stop: threading.Event, seed: int,
              rate: float, out: list[Any]) -> None:
    """Steady traffic through the real shim at its defaults, ``rate`` events a second."""
    rng = random.Random(seed)
    emitter = Emitter(env["COMMPIPE_KAFKA_BOOTSTRAP"], env["COMMPIPE_TOPIC"],
                      settings=Settings.from_env({}))
    kinds = {"request": emitter.request, "response": emitter.response,
             "error": emitter.error, "timeout": emitter.timeout, "retry": emitter.retry}
    try:
        while not stop.is_set():
            started = time.monotonic()
            for _ in range(int(rate / 10)):
                event = _event(rng, rng.choice(SHIM_EDGES), time.time())
                fields = {k: v for k, v in event.items() if k != "kind"}
                assert kinds[event["kind"]](**fields)
                sent.count(event)
            stop.wait(max(0.0, 0.1 - (time.monotonic() - started)))
    finally:
        emitter.close(timeout=60)
        out.append(emitter.stats())


# (value, the dead letters it makes: id suffix and field at fault); a batch of three
# non-objects is three bad events, each dead-lettered alone
BAD_RECORDS = [(b"not json at all", [("", "record")]),
               (b'{"v": 1, "kind": "request"}', [("", "event_id")]),
               (b"[1, 2, 3]", [("/0", "record"), ("/1", "record"), ("/2", "record")]),
               (b"", [("", "record")])]


def foreign_load(env: dict[str, str], sent: Sent, stop: threading.Event, seed: int,
                 rate: float, errors: list[BaseException]) -> None:
    """A producer that is not the shim: one event per record, partitions of its own
    choosing, no producer headers; every second an event 303 s ahead of its record, a
    late event (a minute old) every two seconds, a bad record every three."""
    rng = random.Random(seed)
    topic = env["COMMPIPE_TOPIC"]

    async def run() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=env["COMMPIPE_KAFKA_BOOTSTRAP"],
                                    acks="all")
        await producer.start()
        try:
            n = 0
            warm = time.monotonic() + 3.0  # every partition has seen events before a late one
            while not stop.is_set():
                started = time.monotonic()
                for _ in range(int(rate / 10)):
                    n += 1
                    now = time.time()
                    event = _event(rng, FOREIGN, now)
                    special = ""
                    if n % int(rate) == 0:
                        event, special = {**event, "ts": now + 303.0}, "future"
                    elif n % int(rate * 2) == 7 and time.monotonic() > warm:
                        event, special = {**event, "ts": now - 60.0}, "late"
                    event.update(v=1, event_id=f"f{seed}-{n}", correlation_id=f"f{seed}-{n}")
                    value = orjson.dumps(event)
                    bad: list[tuple[str, str]] = []
                    if n % int(rate * 3) == 11:
                        value, bad = BAD_RECORDS[(n // int(rate * 3)) % len(BAD_RECORDS)]
                    meta = await producer.send_and_wait(topic, value,
                                                        partition=rng.randrange(4))
                    dlq_id = f"{topic}/{meta.partition}/{meta.offset}"
                    if bad:
                        sent.dead.update({dlq_id + suffix: at_fault for suffix, at_fault in bad})
                    elif special == "future":
                        sent.dead[dlq_id] = "ts"
                    else:
                        sent.count(event, late=special == "late")
                stop.wait(max(0.0, 0.1 - (time.monotonic() - started)))
        finally:
            await producer.stop()

    try:
        asyncio.run(run())
    except BaseException as e:  # noqa: BLE001 - reported by the test
        errors.append(e)


def batches(env: dict[str, str]) -> float:
    return try_scrape(env).get(("commpipe_worker_batches_total", ()), 0.0)


def kill_repeatedly(start: Callable[[], WorkerProcess], env: dict[str, str], kills: int,
                    seed: int, postgres: Any) -> list[str]:
    """SIGKILL ``kills`` workers in turn at seeded moments; PostgreSQL goes away for a
    third of them. Returns what each kill interrupted, for the report."""
    rng = random.Random(seed)
    down, up = kills // 3, 2 * kills // 3
    log = []
    for n in range(kills):
        worker = start()
        if rng.random() < 0.3:  # during start-up, group join or table recovery
            time.sleep(rng.uniform(0.3, 4.0))
            log.append("start-up")
        else:  # while it applies batches and writes its changelog
            wait_until(lambda: batches(env) > 0, timeout=90, what="a worker processing",
                       logs=worker.log)
            time.sleep(rng.uniform(0.0, 2.5))
            log.append(f"after {batches(env):.0f} batches")
        assert worker.alive, worker.log()[-3000:]
        worker.kill()
        if n == down:
            postgres.stop()
        if n == up:
            postgres.start()
    return log


def explain_shortfall(env: dict[str, str]) -> str:
    """Per (partition, edge) that the changelog holds short: by how much, the offsets the
    state and the group's commit reached, and the input records whose events would make
    up the difference (for the report of a failed run)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from pipeline.core.edge import PartitionMeta
    from pipeline.wire.decode import decode_record

    bootstrap, topic, app_id = (env["COMMPIPE_KAFKA_BOOTSTRAP"], env["COMMPIPE_TOPIC"],
                                env["COMMPIPE_APP_ID"])
    sent: dict[tuple[int, Edge], Counter[str]] = defaultdict(Counter)
    records: dict[tuple[int, Edge], list[tuple[int, int]]] = defaultdict(list)
    for record in read_topic(bootstrap, topic):
        try:
            events = decode_record(record.value).events
        except Exception:  # noqa: BLE001 - bad input: dead-lettered, counts nothing
            continue
        # the ones stamped too far ahead of their record are dead-lettered, not counted
        events = [e for e in events if e.ts - record.timestamp / 1000 <= 300]
        for event in events:
            edge = (event.source_service, event.target_service, event.protocol)
            sent[(record.partition, edge)][event.kind] += 1
        if events:
            edge = (events[0].source_service, events[0].target_service, events[0].protocol)
            records[(record.partition, edge)].append((record.offset, len(events)))
    state = read_state(bootstrap, app_id)
    held: dict[tuple[int, Edge], EdgeMeta] = {}
    metas: dict[int, int] = {}
    for key, value in state.items():
        _, partition, rest, _ = parse_id(key)
        if isinstance(value, EdgeMeta):
            held[(partition, split_edge_key(rest or ""))] = value
        elif isinstance(value, PartitionMeta):
            metas[partition] = value.offset

    async def committed() -> dict[int, int | None]:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=app_id,
                                    enable_auto_commit=False)
        await consumer.start()
        try:
            return {p: await consumer.committed(TopicPartition(topic, p)) for p in range(4)}
        finally:
            await consumer.stop()

    commits = asyncio.run(committed())
    history: dict[tuple[int, Edge], list[tuple[int, int, int]]] = defaultdict(list)
    from pipeline.core.store import decode_state
    from tests.integration.workers import _read_all

    for message in asyncio.run(_read_all(bootstrap, f"{app_id}-state-changelog")):
        _, partition, rest, _ = parse_id(message.key.decode())
        if message.key.startswith(b"e") and message.value is not None:
            value = decode_state(message.value)
            t = value.totals  # type: ignore[union-attr]
            history[(partition, split_edge_key(rest or ""))].append(
                (message.offset, value.offset,  # type: ignore[union-attr]
                 t.requests + t.responses + t.timeouts + t.retries + sum(t.errors.values())))
    lines = []
    for (partition, edge), want in sorted(sent.items()):
        meta = held.get((partition, edge))
        t = meta.totals if meta is not None else EdgeTotals()
        got = t.requests + t.responses + t.timeouts + t.retries + sum(t.errors.values())
        short = sum(want.values()) - want["circuit"] - want["health"] - got
        if short:
            fits = [o for o, n in records[(partition, edge)] if n == short][:10]
            lines.append(f"partition {partition} {edge}: {short} events short; edge offset "
                         f"{meta.offset if meta else None}, partition meta offset "
                         f"{metas.get(partition)}, committed {commits.get(partition)}; "
                         f"records of exactly that many events: {fits}; the key's values "
                         f"(changelog offset, value offset, events): "
                         f"{history[(partition, edge)][-12:]}")
    return "\n".join(lines) or "the changelog holds every (partition, edge) in full"


def table_totals(bootstrap: str, app_id: str) -> dict[Edge, Counter[str]]:
    """Each edge's cumulative totals as the changelog holds them, merged across partitions."""
    merged: dict[Edge, EdgeTotals] = defaultdict(EdgeTotals)
    for key, value in read_state(bootstrap, app_id).items():
        if isinstance(value, EdgeMeta):
            merged[split_edge_key(parse_id(key)[2])].merge(value.totals)  # type: ignore[arg-type]
    out: dict[Edge, Counter[str]] = {}
    for edge, t in merged.items():
        c = Counter({"request": t.requests, "response": t.responses, "timeout": t.timeouts,
                     "retry": t.retries})
        c.update({f"error:{k}": n for k, n in t.errors.items()})
        out[edge] = +c
    return out


def _difference(got: dict[Edge, Counter[str]], want: dict[Edge, Counter[str]]
                ) -> dict[Edge, dict[str, int]]:
    out = {}
    for edge in sorted(set(got) | set(want)):
        g, w = got.get(edge, Counter()), want.get(edge, Counter())
        diff = {k: g[k] - w[k] for k in sorted(set(g) | set(w)) if g[k] != w[k]}
        if diff:
            out[edge] = diff
    return out


def metric_totals(env: dict[str, str]) -> dict[Edge, Counter[str]]:
    out: dict[Edge, Counter[str]] = defaultdict(Counter)
    names = {"requests": "request", "responses": "response", "timeouts": "timeout",
             "retries": "retry"}
    for (name, labels), value in scrape(env).items():
        lab = dict(labels)
        if "source_service" not in lab or not name.endswith("_total"):
            continue
        edge = (lab["source_service"], lab["target_service"], lab["protocol"])
        kind = name.removeprefix("commpipe_communication_").removesuffix("_total")
        if kind in names:
            out[edge][names[kind]] += int(value)
        elif kind == "errors":
            out[edge][f"error:{lab['error_type']}"] += int(value)
        elif kind == "late_events":
            out[edge]["late"] += int(value)
    return {e: +c for e, c in out.items()}


ROLLUPS_SQL = """
SELECT extract(epoch FROM window_start), source_service, target_service, protocol, requests,
       responses, timeouts, retries, errors_by_type, late_events, latency_count,
       CAST(latency_sum_ms AS DOUBLE PRECISION), latency_min_ms, latency_max_ms
FROM communication_rollups ORDER BY 1, 2, 3, 4"""


def db_windows(db: Databases, which: str) -> tuple[dict[tuple[float, Edge], Counter[str]],
                                                   dict[tuple[float, Edge], tuple[Any, ...]],
                                                   Counter[Edge]]:
    rows = (db.pg if which == "pg" else db.duck)(ROLLUPS_SQL)
    counts: dict[tuple[float, Edge], Counter[str]] = {}
    latency: dict[tuple[float, Edge], tuple[Any, ...]] = {}
    late: Counter[Edge] = Counter()
    for r in rows:
        key = (float(r[0]), (r[1], r[2], r[3]))
        errors = orjson.loads(r[8]) if isinstance(r[8], str) else r[8]
        c = Counter({"request": r[4], "response": r[5], "timeout": r[6], "retry": r[7]})
        c.update({f"error:{k}": n for k, n in errors.items()})
        if +c:
            counts[key] = +c
        late[key[1]] += r[9]
        if r[10]:
            latency[key] = (r[10], r[11], r[12], r[13])
    return counts, latency, +late


def dead_letters(bootstrap: str, topic: str) -> dict[str, str]:
    """Dead-letter id -> field at fault; every copy a replay sent must agree."""
    out: dict[str, str] = {}
    for message in read_topic(bootstrap, topic):
        headers = dict(message.headers)
        dlq_id = headers["commpipe-dlq-id"].decode()
        field_at_fault = headers.get("commpipe-field", b"record").decode()
        assert out.setdefault(dlq_id, field_at_fault) == field_at_fault, dlq_id
    return out


def run_chaos(kafka_bootstrap: str, topic_factory: Callable[..., str], tmp_path: Path,
              pg_database: str, postgres: Any, *, kills: int, seed: int,
              shim_rate: float = 250.0, foreign_rate: float = 20.0) -> None:
    port = free_port()
    env = worker_environment(
        kafka_bootstrap, topic_factory, tmp_path, window_s=WINDOW, grace_s=GRACE,
        idle_close_s=3.0, COMMPIPE_POSTGRES_DSN=pg_database,
        COMMPIPE_DUCKDB_PATH=str(tmp_path / "chaos.duckdb"), COMMPIPE_METRICS_PORT=str(port),
        COMMPIPE_METRICS_HOST="127.0.0.1", COMMPIPE_SINK_BACKOFF_MAX_S="2")
    sent = Sent()
    stop = threading.Event()
    shim_stats: list[Any] = []
    foreign_errors: list[BaseException] = []
    loads = [threading.Thread(target=shim_load, args=(env, sent, stop, seed, shim_rate,
                                                      shim_stats), daemon=True),
             threading.Thread(target=foreign_load, args=(env, sent, stop, seed + 1,
                                                         foreign_rate, foreign_errors),
                              daemon=True)]
    db = Databases(pg_database, env["COMMPIPE_DUCKDB_PATH"])
    with worker_starter(env, tmp_path) as start:
        for thread in loads:
            thread.start()
        try:
            interrupted = kill_repeatedly(start, env, kills, seed, postgres)
        finally:
            stop.set()
            for thread in loads:
                thread.join(90)
            if not postgres.is_running:
                postgres.start()
        assert foreign_errors == []
        (stats,) = shim_stats
        assert (stats.dropped, stats.failed, stats.invalid) == (0, 0, 0), stats
        total = sum(sum(c.values()) for c in sent.totals.values())
        assert stats.sent + sum(sent.totals[FOREIGN].values()) == total
        assert len(interrupted) == kills and sum(i != "start-up" for i in interrupted) >= kills // 2
        final = start()
        want = {e: +c for e, c in sent.totals.items()}
        want_metrics = {e: +Counter({**c, "late": sent.late[e]}) for e, c in want.items()}
        try:
            wait_until(lambda: metric_totals(env) == want_metrics if try_scrape(env) else False,
                       timeout=180, what="every event in /metrics", logs=final.log)
        except AssertionError as e:
            dump = dump_for_reproduction(tmp_path / "reproduction.jsonl", kafka_bootstrap,
                                         env["COMMPIPE_APP_ID"], env["COMMPIPE_TOPIC"], [])
            raise AssertionError(f"{e}\n/metrics minus sent, per edge: "
                                 f"{_difference(metric_totals(env), want_metrics)}\n"
                                 f"{explain_shortfall(env)}\nrecords, changelog and offsets "
                                 f"in {dump}") from None
        # the databases get every window once the last ones close (idle 3 s)
        want_windows = {k: +c for k, c in sent.windows.items()}

        def stored(which: str) -> bool:
            try:
                return db_windows(db, which)[0] == want_windows
            except Exception:  # noqa: BLE001 - not migrated yet, or PostgreSQL restarting
                return False

        wait_until(lambda: stored("pg") and stored("duck"), timeout=180,
                   what="every window in both databases", logs=final.log)
        assert final.alive
    for which in ("pg", "duck"):
        counts, latency, late = db_windows(db, which)
        assert counts == want_windows, which
        assert late == +sent.late, which
        for key, values in sent.latencies.items():
            n, total_ms, low, high = latency[key]
            assert (n, low, high) == (len(values), min(values), max(values)), (which, key)
            assert total_ms == pytest.approx(sum(values)), (which, key)
        assert set(latency) == set(sent.latencies), which
    kept = Counter({k: v for k, v in db.pg("SELECT event_type, count(*) FROM "
                                            "communication_events GROUP BY 1")})
    assert kept == sent.kept
    assert Counter(dict(db.duck("SELECT event_type, count(*) FROM communication_events "
                                "GROUP BY 1"))) == sent.kept
    assert table_totals(kafka_bootstrap, env["COMMPIPE_APP_ID"]) == want
    assert dead_letters(kafka_bootstrap, env["COMMPIPE_DLQ_TOPIC"]) == sent.dead
    print(f"\nchaos: {kills} kills ({', '.join(interrupted)}); {total} events counted, "
          f"{len(sent.dead)} dead letters, {sum(sent.late.values())} late")


@pytest.mark.timeout(1500)
def test_sigkill_at_random_moments_under_load_neither_loses_nor_doubles(
        kafka_bootstrap: str, topic_factory: Callable[..., str], tmp_path: Path,
        pg_database: str, postgres: Any) -> None:
    run_chaos(kafka_bootstrap, topic_factory, tmp_path, pg_database, postgres,
              kills=int(os.environ.get("COMMPIPE_CHAOS_KILLS", "20")), seed=20261201)


@pytest.mark.soak
@pytest.mark.timeout(5400)
def test_soak_sixty_kills(kafka_bootstrap: str, topic_factory: Callable[..., str],
                          tmp_path: Path, pg_database: str, postgres: Any) -> None:
    run_chaos(kafka_bootstrap, topic_factory, tmp_path, pg_database, postgres, kills=60,
              seed=7, shim_rate=400.0)
