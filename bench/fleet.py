"""Record shapes a fleet sends: events/s and CPU per event through one worker.

The records are built exactly as N service instances' shims send them at the shim's
defaults: each instance is its own :class:`~pipeline.shim.outbox.Outbox` (its own
producer id and per-edge sequence headers), calls a few edges at rates drawn from a
skewed distribution (a few hot edges, a long tail), and every ``COMMPIPE_SHIM_LINGER_MS``
sends one record per edge holding what it emitted since its last round. Time is
simulated, so the run is deterministic: Poisson arrivals per (instance, edge), rounds at
a per-instance phase. The records are produced first, then read by one worker (sink
off), beside the naive agent and the bare consumer on the same records.

A sweep reads the shim format at 1, 3, 10 and 100 events per record (100 edges), and a
foreign producer's records (one event per record, no producer headers). Targets (issue
16): the fleet >= 50,000 events/s; CPU per event at the fleet's shape <= 2x that at 100
events per record; at one event per record >= 2x the naive agent's events/s.

Run: ``python -m bench --cases fleet``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from bench.common import (
    Context,
    Measured,
    Row,
    create_topics,
    edge_names,
    make_events,
    make_records,
    measure,
    produce,
    worker_env,
    workers,
)
from bench.stream import bare_consumer
from pipeline.settings import Settings
from pipeline.shim.outbox import Outbox

NAME = "fleet"


@dataclass(frozen=True)
class Fleet:
    instances: int = 400
    edges: int = 200
    per_instance: int = 4
    rate: float = 20_000.0
    """Events per second offered, over all instances."""
    span_s: float = 60.0
    """Seconds of event time."""
    linger_s: float = Settings().shim_linger_ms / 1000.0
    skew: float = 1.1
    """Zipf exponent of the edges' popularity."""
    seed: int = 16


@dataclass
class Built:
    records: list[Any]
    events: int

    @property
    def per_record(self) -> float:
        return self.events / len(self.records)


def fleet_records(fleet: Fleet) -> Built:
    """The records ``fleet``'s shims send, in the order their rounds happen."""
    rng = random.Random(fleet.seed)
    names = edge_names(fleet.edges)
    popularity = [1.0 / (i + 1) ** fleet.skew for i in range(fleet.edges)]
    streams: list[tuple[int, int, float]] = []
    for instance in range(fleet.instances):
        chosen: set[int] = set()
        while len(chosen) < fleet.per_instance:
            chosen.add(rng.choices(range(fleet.edges), popularity)[0])
        streams += [(instance, e, popularity[e]) for e in sorted(chosen)]
    weight = sum(w for _, _, w in streams)
    t0 = time.time() - fleet.span_s
    kinds = ("request", "response", "error", "timeout", "retry")
    mix = (0.48, 0.45, 0.03, 0.01, 0.03)
    by_instance: dict[int, list[tuple[float, dict[str, Any]]]] = {}
    for instance, e, w in streams:
        rate = fleet.rate * w / weight
        source, target, protocol = names[e]
        t = rng.expovariate(rate)
        while t < fleet.span_s:
            kind = rng.choices(kinds, mix)[0]
            event: dict[str, Any] = {"v": 1, "kind": kind, "source_service": source,
                                     "target_service": target, "protocol": protocol,
                                     "ts": t0 + t, "method": "POST /v1/items"}
            if kind in ("response", "error", "timeout"):
                event["latency_ms"] = round(rng.lognormvariate(3.0, 0.8), 3)
            if kind == "error":
                event["error_type"] = "http_5xx"
            elif kind == "retry":
                event.update(attempt=1, backoff_ms=100.0)
            by_instance.setdefault(instance, []).append((t, event))
            t += rng.expovariate(rate)
    timed: list[tuple[float, int, Any]] = []
    n = 0
    for events in by_instance.values():
        events.sort(key=lambda te: te[0])
        box = Outbox(topic="-", capacity=len(events) + 1, batch_events=500,
                     batch_bytes=512 * 1024, linger_s=fleet.linger_s, producer_options={})
        phase = rng.random() * fleet.linger_s
        i = 0
        round_at = phase
        while i < len(events):
            j = i
            while j < len(events) and events[j][0] < round_at:
                j += 1
            if j > i:
                for record in box.encode([e for _, e in events[i:j]]):
                    timed.append((round_at, len(timed), record))
                n += j - i
                i = j
            round_at += fleet.linger_s
    timed.sort(key=lambda x: (x[0], x[1]))
    return Built([r for _, _, r in timed], n)


@dataclass
class _Foreign:
    key: bytes
    value: bytes
    events: int = 1


def foreign_records(events: Sequence[dict[str, Any]]) -> list[_Foreign]:
    """A producer that is not the shim: one event per record (a JSON object), no headers."""
    out = []
    for i, event in enumerate(events):
        wire = {**event, "event_id": f"x{i}", "correlation_id": f"x{i}"}
        key = "\x1f".join((event["source_service"], event["target_service"], event["protocol"]))
        out.append(_Foreign(key.encode(), orjson.dumps(wire)))
    return out


def _read(ctx: Context, records: Sequence[Any], events: int, topic: str,
          *, naive_cap: float | None = None, bare: bool = False
          ) -> tuple[Measured, Measured | None, Measured | None]:
    with ctx.broker() as broker:
        create_topics(broker.bootstrap, [topic, f"{topic}.dlq"])
        produce(broker.bootstrap, topic, records)
        ceiling = bare_consumer(broker.bootstrap, topic, events) if bare else None
        with workers("commpipe", worker_env(broker.bootstrap, topic), ctx) as procs:
            ours = measure(procs, events, timeout=600)
        naive = None
        if naive_cap is not None:
            with workers("naive", worker_env(broker.bootstrap, topic), ctx) as procs:
                naive = measure(procs, events, cap_s=naive_cap, timeout=600)
    return ours, naive, ceiling


def run(ctx: Context) -> list[Row]:
    fleet = Fleet(span_s=ctx.size(60, 15))
    cap = ctx.size(10, 4)
    built = fleet_records(fleet)
    ctx.say(f"fleet: {fleet.instances} instances x {fleet.per_instance} of {fleet.edges} edges,"
            f" {fleet.rate:,.0f} events/s for {fleet.span_s:.0f} s: {built.events:,} events in "
            f"{len(built.records):,} records ({built.per_record:.1f} per record)")
    ours, naive, bare = _read(ctx, built.records, built.events, "bench.fleet",
                              naive_cap=cap, bare=True)
    assert naive is not None and bare is not None
    sweep: dict[int, Measured] = {}
    naive_one: Measured | None = None
    n = ctx.size(300_000, 60_000)  # at ~150,000 events/s: 2 s, long enough to time
    for per in (1, 3, 10, 100):
        ctx.say(f"fleet: sweep, {per} events per record")
        records = make_records(make_events(n, 100, span_s=60.0), edges=100, per_record=per)
        got, naive_got, _ = _read(ctx, records, n, f"bench.sweep{per}",
                                  naive_cap=cap if per == 1 else None)
        sweep[per] = got
        if per == 1:
            naive_one = naive_got
    ctx.say("fleet: a foreign producer, one event per record without headers")
    foreign, _, _ = _read(ctx, foreign_records(make_events(n, 100, span_s=60.0)), n,
                          "bench.foreign")
    assert naive_one is not None
    shape = (f"{built.events:,} events, {len(built.records):,} records "
             f"({built.per_record:.1f} events/record), linger {fleet.linger_s * 1000:.0f} ms")
    rows = [
        Row(NAME, "fleet events/s, one worker", ours.rate, bare.rate,
            "bare consumer, same records", ">= 50,000", ours.rate >= 50_000, shape),
        Row(NAME, "fleet events/s vs naive agent", ours.rate, naive.rate,
            f"naive agent, same records (first {cap} s)", "-", None),
        Row(NAME, "fleet CPU us/event vs 100 events/record", ours.cpu_us_per_event,
            sweep[100].cpu_us_per_event, "the worker at 100 events/record", "<= 2x",
            ours.cpu_us_per_event <= 2 * sweep[100].cpu_us_per_event),
        Row(NAME, "1 event/record events/s vs naive agent", sweep[1].rate, naive_one.rate,
            f"naive agent, same records (first {cap} s)", ">= 2x",
            sweep[1].rate >= 2 * naive_one.rate),
    ]
    for per, got in sweep.items():
        rows.append(Row(NAME, f"{per} events/record: events/s", got.rate, None, "-", "-", None,
                        f"{got.cpu_us_per_event:.1f} CPU us/event"))
    rows.append(Row(NAME, "foreign producer (1 event/record, no headers): events/s",
                    foreign.rate, sweep[1].rate, "shim records of 1 event", "-", None,
                    f"{foreign.cpu_us_per_event:.1f} CPU us/event"))
    return rows
