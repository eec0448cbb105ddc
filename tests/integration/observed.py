"""One observed run for the dashboard and alert tests: a real worker, a service's shim and a
real Prometheus scraping both, fed known traffic in two phases.

Phase 1 is sent and applied before Prometheus starts, so the first sample of every series
holds phase 1's totals; Prometheus then scrapes (``t_first``), phase 2 is sent, and once it
is applied and its windows are closed Prometheus scrapes again (``t_last``). A rate over
exactly ``[t_first, t_last]`` is phase 2's increase over that time, which this module
knows from the events it sent (plain counting, never the code under test).

What goes in, besides the shared seeded traffic (tests/integration/traffic.py):

- orders → inventory ends with three errors in a row (the derived breaker opens) and
  payments → bank with a reported ``open`` (its circuit-reaction objective is judged);
- a late request on gateway → orders (its window closed long ago);
- records that are not JSON, and responses without a latency (dead letters ``record`` and
  ``latency_ms``), from a plain producer;
- a record of a fifth edge (audit → ledger) sent twice with the same shim headers (the
  copy is skipped as a duplicate);
- a shim with a 10-event buffer and no broker, whose drops its own ``/metrics`` shows;
- a sink writing DuckDB and failing to reach PostgreSQL (a closed port).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from pipeline import Emitter, Settings
from pipeline.dev.process import free_port
from tests.integration import prom
from tests.integration.traffic import EDGES, GRACE, OUTCOME, WINDOW, Expected, emit_all, traffic
from tests.integration.workers import wait_until, worker_environment, worker_starter

ROOT = Path(__file__).resolve().parents[2]
SEED = 21  # its traffic meets the preconditions the tests check (no margin too close)
AUDIT = ("audit", "ledger", "kafka")
ALL_EDGES = [*EDGES, AUDIT]
BUFFER = 10
DROPS = (15, 7)  # shim events emitted in phase 1 and 2; all beyond BUFFER are dropped
DEAD = ({"record": 2, "latency_ms": 1}, {"record": 3, "latency_ms": 2})


@dataclass
class Phase:
    """What one phase sent: the valid events (the worker's view) and the rest."""

    events: Expected = field(default_factory=Expected)
    dead: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    late: int = 0
    shim_emitted: int = 0

    @property
    def valid(self) -> int:
        return len(self.events.events)


@dataclass
class Observed:
    server: prom.Prometheus
    phases: tuple[Phase, Phase]
    t0: float
    t_first: float
    t_last: float
    s_first: float
    s_last: float
    worker: str
    """The worker's ``instance`` label; ``shim`` the shim's."""
    shim: str

    @property
    def window_s(self) -> float:
        return self.t_last - self.t_first

    @property
    def shim_window_s(self) -> float:
        return self.s_last - self.s_first

    def delta(self) -> Expected:
        return self.phases[1].events

    def everything(self) -> Expected:
        both = Expected()
        for phase in self.phases:
            for event in phase.events.events:
                both.add(event)
        return both


def _event(edge: tuple[str, str, str], kind: str, ts: float, **extra: Any) -> dict[str, Any]:
    s, t, p = edge
    return {"kind": kind, "source_service": s, "target_service": t, "protocol": p, "ts": ts,
            **extra}


def _wire(event: dict[str, Any], n: int) -> dict[str, Any]:
    return {"v": 1, "event_id": f"raw{n}{event['ts']:.3f}".replace(".", "x"),
            "correlation_id": f"raw-{n}", **event}


async def _produce(bootstrap: str, topic: str, phase: int, t0: float, out: Phase) -> None:
    """The plain producer's records of one phase: dead letters and a duplicated record."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        n = 0
        for _ in range(DEAD[phase]["record"]):
            await producer.send_and_wait(topic, b"not json {", partition=n % 4)
            n += 1
        for _ in range(DEAD[phase]["latency_ms"]):
            bad = _wire(_event(EDGES[0], "response", t0 + 5.0), n)
            await producer.send_and_wait(topic, orjson.dumps(bad), partition=n % 4)
            n += 1
        out.dead = dict(DEAD[phase])
        # one record of AUDIT, written twice with the same producer numbering
        start = t0 + (15.0 if phase == 0 else 35.0)
        batch = [_wire(_event(AUDIT, "response", start + 0.1 * i, latency_ms=3.0 + i),
                       100 * phase + i) for i in range(2 + phase)]
        key = "\x1f".join(AUDIT).encode()
        headers = [("commpipe-producer", b"observed-test"),
                   ("commpipe-seq", str(phase + 1).encode())]
        for _ in range(2):
            await producer.send_and_wait(topic, orjson.dumps(batch), key=key, headers=headers)
        for event in batch:
            out.events.add({k: v for k, v in event.items()
                            if k not in ("v", "event_id", "correlation_id")})
        out.duplicates = len(batch)
    finally:
        await producer.stop()


def shim_events(rng: random.Random, t0: float) -> tuple[list[list[dict[str, Any]]],
                                                        list[list[dict[str, Any]]]]:
    """The shim's events of both phases, window by window (windows 0-1, then 2-3 and the
    additions). Each window is sent and delivered before the next: an edge's record of a
    later window could otherwise move its partition's watermark past another edge's
    earlier window, making those events late."""
    windows, _ = traffic(rng, t0)
    end = t0 + 39.0
    inventory = ("orders", "inventory", "http")
    windows[3] += [_event(inventory, "error", end + 0.5 + 0.1 * i, error_type="connection",
                          latency_ms=20.0 + i) for i in range(3)]
    windows[3].append(_event(("payments", "bank", "amqp"), "circuit", end + 0.8,
                             circuit_state="open"))
    return windows[:2], windows[2:]


def _scrape(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as r:  # noqa: S310
            return r.read().decode()
    except OSError:
        return ""


def _value(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def _latest(server: prom.Prometheus, selector: str) -> tuple[float, float]:
    return server.samples(selector)[-1]


@dataclass
class _Shim:
    emitter: Emitter
    port: int
    stop: Callable[[], None]


def _start_shim() -> _Shim:
    """An emitter with a small buffer and no broker, its counts on its own /metrics."""
    import prometheus_client
    from prometheus_client import CollectorRegistry

    from pipeline.shim.metrics import register

    dead = f"127.0.0.1:{free_port()}"
    emitter = Emitter(dead, "comm.events", settings=Settings.from_env(
        {}, shim_buffer_size=BUFFER, shim_close_timeout_s=0.5))
    registry = CollectorRegistry()
    register(emitter, registry=registry)
    port = free_port()
    server, thread = prometheus_client.start_http_server(port, addr="127.0.0.1",
                                                         registry=registry)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)
        emitter.close()

    return _Shim(emitter, port, stop)


def _emit_shim(emitter: Emitter, n: int, t0: float) -> None:
    for i in range(n):
        emitter.request(source_service="orders", target_service="audit", protocol="http",
                        ts=t0 + i * 0.01)


def observe(kafka_bootstrap: str, make_topic: Callable[[int], str], workdir: Path
            ) -> Iterator[Observed]:
    """Run the whole scenario (see the module docstring); everything stops afterwards."""
    wport = free_port()
    env = worker_environment(
        kafka_bootstrap, make_topic, workdir, window_s=WINDOW, grace_s=GRACE, idle_close_s=2,
        COMMPIPE_METRICS_PORT=str(wport), COMMPIPE_METRICS_HOST="127.0.0.1",
        COMMPIPE_DUCKDB_PATH=str(workdir / "observed.duckdb"),
        COMMPIPE_POSTGRES_DSN=f"postgresql://commpipe@127.0.0.1:{free_port()}/commpipe",
        COMMPIPE_SINK_INTERVAL_S="0.5", COMMPIPE_SINK_BACKOFF_MAX_S="1")
    t0 = math.floor(time.time() / WINDOW) * WINDOW - 600
    first, second = shim_events(random.Random(SEED), t0)
    phases = (Phase(), Phase())
    phases[1].late = 1
    second[-1].append(_event(EDGES[0], "request", t0 + 1.0))  # window 0: closed long ago
    topic = env["COMMPIPE_TOPIC"]
    shim = _start_shim()
    try:
        with worker_starter(env, workdir) as start:
            worker = start()
            emitter = Emitter(kafka_bootstrap, topic, settings=Settings.from_env(
                {}, shim_linger_ms=5))
            try:
                for window in first:
                    emit_all(emitter, window, phases[0].events)
                asyncio.run(_produce(kafka_bootstrap, topic, 0, t0, phases[0]))
                _emit_shim(shim.emitter, DROPS[0], t0)
                phases[0].shim_emitted = DROPS[0]
                wait_until(lambda: _value(_scrape(wport), "commpipe_events_consumed_total")
                           == phases[0].valid, timeout=120, what="phase 1 applied",
                           logs=worker.log)
                time.sleep(2)  # (the table is written just after the count)
                jobs = {"commpipe-worker": [f"127.0.0.1:{wport}"],
                        "commpipe-shim": [f"127.0.0.1:{shim.port}"]}
                with prom.running(workdir / "prometheus", jobs,
                                  rule_files=[ROOT / "prometheus/alerts.yml"]) as server:
                    consumed, dropped = ("commpipe_events_consumed_total",
                                         "commpipe_shim_events_dropped_total")
                    wait_until(lambda: len(server.query(f"{consumed}[1m]")) == 1
                               and len(server.query(f"{dropped}[1m]")) == 1
                               and len(server.samples(consumed, 60)) >= 2
                               and len(server.samples(dropped, 60)) >= 2,
                               timeout=30, what="two scrapes of each target", logs=server.log)
                    t_first, n1 = _latest(server, consumed)
                    s_first, d1 = _latest(server, dropped)
                    assert (n1, d1) == (phases[0].valid, DROPS[0] - BUFFER)
                    for window in second:
                        emit_all(emitter, window, phases[1].events)
                    asyncio.run(_produce(kafka_bootstrap, topic, 1, t0, phases[1]))
                    _emit_shim(shim.emitter, DROPS[1], t0 + 1)
                    phases[1].shim_emitted = DROPS[1]
                    total = phases[0].valid + phases[1].valid
                    last = last_windows(phases)

                    def settled() -> bool:
                        ratios = server.vector("commpipe_communication_error_ratio")
                        return (server.vector(consumed) == {frozenset(
                                    {("job", "commpipe-worker"),
                                     ("instance", f"127.0.0.1:{wport}")}): total}
                                and set(server.vector(dropped).values()) == {
                                    sum(DROPS) - BUFFER}
                                and {edge_of(k): v for k, v in ratios.items()} == last)

                    wait_until(settled, timeout=120, what="phase 2 applied, windows closed",
                               logs=lambda: worker.log() + server.log()[-2000:])
                    time.sleep(3)  # a few more scrapes of the settled state
                    t_last = _latest(server, consumed)[0]
                    s_last = _latest(server, dropped)[0]
                    yield Observed(server, phases, t0, t_first, t_last, s_first, s_last,
                                   f"127.0.0.1:{wport}", f"127.0.0.1:{shim.port}")
            finally:
                emitter.close()
    finally:
        shim.stop()


def last_windows(phases: tuple[Phase, Phase]) -> dict[tuple[str, str, str], float]:
    """Each edge's error ratio over its newest window (the exporter's last closed one)."""
    both = Expected()
    for phase in phases:
        for e in phase.events.events:
            both.add(e)
    out = {}
    for edge in ALL_EDGES:
        start = max(s for s, e in both.counts if e == edge)
        c = both.counts[(start, edge)]
        failed = c["error"] + c["timeout"]
        out[edge] = failed / max(c["response"] + failed, 1)
    return out


def edge_of(labels: frozenset[tuple[str, str]]) -> tuple[str, str, str]:
    d = dict(labels)
    return d["source_service"], d["target_service"], d["protocol"]


def window_events(expected: Expected, edge: tuple[str, str, str], start: float
                  ) -> list[dict[str, Any]]:
    return [e for e in expected.events
            if (e["source_service"], e["target_service"], e["protocol"]) == edge
            and math.floor(e["ts"] / WINDOW) * WINDOW == start]


def kinds(events: list[dict[str, Any]]) -> Counter[str]:
    return Counter(e["kind"] for e in events)


def outcome_latencies_s(events: list[dict[str, Any]]) -> list[float]:
    return [e["latency_ms"] / 1000 for e in events if e["kind"] in OUTCOME and "latency_ms" in e]
