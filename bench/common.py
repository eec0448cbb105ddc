"""What every benchmark case shares: result rows, services, synthetic records, worker processes.

- :class:`Row`: one printed figure, its baseline from the same run, the ratio and the target.
- :class:`Context`: the run's size (``quick``), a fresh broker per case (embedded Tansu,
  or Apache Kafka with ``--broker kafka``), one embedded PostgreSQL for the run (started
  on first use), a scratch directory.
- :func:`make_records`: shim-format records (JSON arrays of one edge's events, encoded by
  the shim's own :meth:`pipeline.shim.outbox.Outbox.encode`), and :func:`produce` to write them.
- :class:`WorkerProcess`: a worker subprocess from :mod:`bench.workers` (the real commpipe
  worker, or the naive agent), its progress page, CPU seconds and RSS from ``/proc``;
  :func:`measure` times workers from the first event they consume to the last.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.dev.broker import EmbeddedBroker
from pipeline.dev.process import free_port, run_sync, terminate_process
from pipeline.shim.outbox import Outbox

# Quick group joins on any broker (see tests/integration/workers.py); what a worker needs on
# the broker itself comes from its class (Tansu: one record per producer batch, because it
# misreports end offsets otherwise; Apache Kafka: nothing) and is added per bootstrap address.
FAST_JOIN = {"COMMPIPE_BROKER_SESSION_TIMEOUT_S": "6", "COMMPIPE_BROKER_HEARTBEAT_INTERVAL_S": "1"}
BROKERS = ("tansu", "kafka")
_BROKER_ENV: dict[str, dict[str, str]] = {}
# The share of each kind in synthetic traffic: calls, a few failures, some retries.
KIND_MIX = (("request", 0.48), ("response", 0.45), ("error", 0.03), ("timeout", 0.01),
            ("retry", 0.03))


@dataclass
class Row:
    """One figure beside its baseline from the same run; ``ratio`` = value / baseline."""

    case: str
    metric: str
    value: float | None
    baseline: float | None
    baseline_is: str
    target: str = "-"
    met: bool | None = None
    note: str = ""
    broker: str = "tansu"
    """The broker the case ran against (``tansu`` or ``kafka``)."""

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.baseline:
            return None
        return self.value / self.baseline

    def to_json(self) -> dict[str, Any]:
        return {"case": self.case, "broker": self.broker, "metric": self.metric,
                "value": self.value,
                "baseline": self.baseline, "baseline_is": self.baseline_is,
                "ratio": self.ratio, "target": self.target, "met": self.met, "note": self.note}


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile of ``values`` (nearest rank, as bench/shim.py reports)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Context:
    """One ``python -m bench`` run: its size, its services and its scratch directory."""

    quick: bool = False
    say: Callable[[str], None] = print
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="commpipe-bench-")))
    engine: str = "tansu"
    """The broker of the cases run now: ``tansu`` (embedded) or ``kafka`` (Apache Kafka)."""
    _postgres: Any = None

    def size(self, default: int, quick: int) -> int:
        return quick if self.quick else default

    @contextlib.contextmanager
    def broker(self) -> Iterator[Any]:
        """A fresh broker for one case (Tansu keeps every record in memory; a Kafka node's
        storage goes in the scratch directory). Workers started with :func:`worker_env` on
        its address get what they need on it."""
        log_path = self.workdir / f"{self.engine}-{uuid.uuid4().hex[:6]}.log"
        if self.engine == "kafka":
            from pipeline.dev.kafka import KafkaBroker

            broker: Any = KafkaBroker(data_dir=log_path.with_suffix(""), heap="1g",
                                      log_path=log_path)
        else:
            broker = EmbeddedBroker(log_path=log_path)
        with broker as b:
            _BROKER_ENV[b.bootstrap] = dict(b.WORKER_ENV)
            yield b

    def postgres_database(self) -> str:
        """DSN of a new database in the run's embedded PostgreSQL (started on first use)."""
        import psycopg
        from psycopg.conninfo import make_conninfo

        from pipeline.dev.postgres import EmbeddedPostgres

        if self._postgres is None:
            self._postgres = EmbeddedPostgres().start()
        name = f"bench_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self._postgres.dsn, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        return make_conninfo(self._postgres.dsn, dbname=name)

    def postgres_server(self) -> Any:
        """The run's :class:`~pipeline.dev.postgres.EmbeddedPostgres` (started on first use;
        a case may stop and start it)."""
        if self._postgres is None:
            self.postgres_database()
        return self._postgres

    def close(self, *, keep: bool = False) -> None:
        """Stop PostgreSQL; remove the scratch directory (worker logs) unless ``keep``."""
        if self._postgres is not None:
            self._postgres.close()
            self._postgres = None
        if not keep:
            shutil.rmtree(self.workdir, ignore_errors=True)


# ---- synthetic shim-format records -------------------------------------------------------

def edge_names(n: int) -> list[tuple[str, str, str]]:
    return [(f"svc{i}", f"dep{i % 97}", ("http", "grpc", "amqp", "kafka")[i % 4])
            for i in range(n)]


def make_events(n: int, edges: int, *, span_s: float, t0: float | None = None,
                seed: int = 7) -> list[dict[str, Any]]:
    """``n`` events spread round-robin over ``edges`` edges and evenly over ``span_s``
    seconds of event time ending now (``t0``: the first event's time instead)."""
    rng = random.Random(seed)
    names = edge_names(edges)
    kinds = rng.choices([k for k, _ in KIND_MIX], [w for _, w in KIND_MIX], k=n)
    start = time.time() - span_s if t0 is None else t0
    step = span_s / max(n, 1)
    events = []
    for i, kind in enumerate(kinds):
        source, target, protocol = names[i % edges]
        event: dict[str, Any] = {"v": 1, "kind": kind, "source_service": source,
                                 "target_service": target, "protocol": protocol,
                                 "ts": start + i * step, "method": "POST /v1/items"}
        if kind in ("response", "error", "timeout"):
            event["latency_ms"] = round(rng.lognormvariate(3.0, 0.8), 3)
        if kind == "response":
            event["status_code"] = 200
        elif kind == "error":
            event.update(error_type="http_5xx", status_code=503)
        elif kind == "retry":
            event.update(attempt=1, backoff_ms=100.0, error_type="connection")
        events.append(event)
    return events


def make_records(events: list[dict[str, Any]], *, edges: int, per_record: int) -> list[Any]:
    """Records as the shim sends them: each "flush" of ``per_record * edges`` events is
    grouped by edge into one record per edge (about ``per_record`` events each)."""
    outbox = Outbox(topic="-", capacity=len(events) + 1, batch_events=max(per_record, 500),
                    batch_bytes=512 * 1024, linger_s=0.0, producer_options={})
    flush = per_record * edges
    records = []
    for start in range(0, len(events), flush):
        records.extend(outbox.encode(events[start:start + flush]))
    assert sum(r.events for r in records) == len(events), "the shim refused synthetic events"
    return records


def create_topics(bootstrap: str, names: Sequence[str], partitions: int = 4) -> None:
    from agents.topics import ensure_topics

    run_sync(lambda: ensure_topics({n: partitions for n in names},
                                   client_options={"bootstrap_servers": bootstrap}))


def produce(bootstrap: str, topic: str, records: Sequence[Any], *,
            with_headers: bool = False) -> None:
    """Write the records (key = edge), waiting for every acknowledgement; ``with_headers``:
    with each record's ``headers`` too (the producer and sequence numbers the worker's
    dedup reads; without them a record is taken as it comes)."""
    from aiokafka import AIOKafkaProducer

    async def main() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5,
                                    max_batch_size=256 * 1024, max_request_size=2 * 1024 * 1024)
        await producer.start()
        try:
            futures = [await producer.send(topic, r.value, key=r.key,
                                           headers=r.headers if with_headers else None)
                       for r in records]
            await asyncio.gather(*futures)
        finally:
            await producer.stop()

    asyncio.run(main())


# ---- worker processes ----------------------------------------------------------------------

def worker_env(bootstrap: str, topic: str, **extra: Any) -> dict[str, str]:
    """Environment of a bench worker: fast joins and the broker's own needs (see
    :meth:`Context.broker`), no database unless ``extra`` sets one."""
    env = {**FAST_JOIN, **_BROKER_ENV.get(bootstrap, {}), "COMMPIPE_KAFKA_BOOTSTRAP": bootstrap,
           "COMMPIPE_TOPIC": topic,
           "COMMPIPE_DLQ_TOPIC": f"{topic}.dlq", "COMMPIPE_PARTITIONS": "4",
           "COMMPIPE_APP_ID": f"bench{uuid.uuid4().hex[:8]}", "COMMPIPE_DUCKDB_PATH": "",
           "COMMPIPE_POSTGRES_DSN": "", "COMMPIPE_METRICS_HOST": "127.0.0.1",
           "COMMPIPE_WORKER_LOGLEVEL": "warn"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


class WorkerProcess:
    """One ``python -m bench.workers KIND`` subprocess (always hard-killed in the end)."""

    def __init__(self, kind: str, env: dict[str, str], workdir: Path) -> None:
        self.kind = kind
        self.port = free_port()
        self.env = {**env, "COMMPIPE_METRICS_PORT": str(self.port),
                    "COMMPIPE_WORKER_DATADIR": str(workdir / f"w{self.port}")}
        self.log_path = workdir / f"{kind}-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench.workers", self.kind], env={**os.environ, **self.env},
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def progress(self) -> dict[str, Any] | None:
        """The worker's progress page (events, partitions, ...); None until it answers."""
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"{self.kind} worker exited; log {self.log_path}:\n"
                               + self.log_path.read_text(errors="replace")[-2000:])
        try:
            url = f"http://127.0.0.1:{self.port}/bench/progress"
            with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310 - loopback
                return json.loads(r.read())  # type: ignore[no-any-return]
        except OSError:
            return None

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def memory(self) -> tuple[int, int]:
        """(RSS, peak RSS) in bytes, from /proc/PID/status."""
        values = dict(line.split(":", 1) for line in
                      Path(f"/proc/{self.pid}/status").read_text().splitlines() if ":" in line)
        return (int(values["VmRSS"].split()[0]) * 1024, int(values["VmHWM"].split()[0]) * 1024)

    def stop(self) -> None:
        """SIGTERM, SIGKILL to the group after 10 s (a worker in wait_empty ignores TERM)."""
        if self.proc is not None:
            terminate_process(self.proc, timeout=10, group=True)


@contextlib.contextmanager
def workers(kind: str, env: dict[str, str], ctx: Context, count: int = 1
            ) -> Iterator[list[WorkerProcess]]:
    started = [WorkerProcess(kind, env, ctx.workdir) for _ in range(count)]
    try:
        for w in started:
            w.start()
        yield started
    finally:
        for w in started:
            w.stop()


@dataclass
class Measured:
    """Events consumed between the first and the last observation, and what it cost."""

    events: int
    seconds: float
    cpu_seconds: float
    per_worker: list[int]

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else math.nan

    @property
    def cpu_us_per_event(self) -> float:
        return 1e6 * self.cpu_seconds / self.events if self.events else math.nan


def wait_ready(procs: Sequence[WorkerProcess], *, partitions: int = 4,
               timeout: float = 90.0) -> None:
    """Until the workers together own every input partition, each at least one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        owned = [len(p["partitions"]) if p else 0 for p in (w.progress() for w in procs)]
        if sum(owned) >= partitions and min(owned) > 0:
            return
        time.sleep(0.2)
    raise TimeoutError(f"workers did not own all {partitions} partitions within {timeout:.0f} s; "
                       f"logs in {procs[0].log_path.parent}")


def measure(procs: Sequence[WorkerProcess], total: int, *, timeout: float = 180.0,
            cap_s: float | None = None, poll_s: float = 0.05,
            on_poll: Callable[[int], None] | None = None) -> Measured:
    """Poll the workers' progress from their first consumed event until ``total`` events
    (or ``cap_s`` seconds after the first). Events of the first poll that saw any are
    not counted: the interval starts there. ``on_poll(events)`` is called at every poll
    from the first on."""
    deadline = time.monotonic() + timeout
    first: tuple[float, int, float] | None = None
    while True:
        now = time.monotonic()
        pages = [w.progress() for w in procs]
        if first is not None and None in pages:  # a page that did not answer in time: no
            time.sleep(poll_s)                   # count at all, not a count of 0
            continue
        counts = [(p or {}).get("events", 0) for p in pages]
        done = sum(counts)
        cpu = sum(w.cpu_seconds() for w in procs)
        if first is None and done > 0:
            first = (now, done, cpu)
        if first is not None and on_poll is not None:
            on_poll(done)
        if first is not None and (done >= total or (cap_s is not None and now - first[0] >= cap_s)):
            return Measured(done - first[1], now - first[0], cpu - first[2], counts)
        if now > deadline:
            raise TimeoutError(f"{done} of {total} events consumed after {timeout:.0f} s; "
                               f"logs in {procs[0].log_path.parent}")
        time.sleep(poll_s)
