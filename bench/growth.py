"""Cost growth: the worker's memory and CPU per event as events grow 10x and edges grow 10x.

Each step runs one real worker (``bench.workers commpipe``) over its own pre-produced
records, all spanning the same 60 s of event time (10 s windows, 10 s grace), so the
number of windows per edge is the same in every step, and the DuckDB sink on (as
``commpipe worker`` runs by default: it stores closed windows and kept error events,
which then leave the table). Records hold ~100 events of one edge in every step.

- A: 100 edges, N events          B: 100 edges, 10 N events (events x10)
- C: 1,000 edges, 10 N events      D: 10,000 edges, 10 N events (edges x10, twice)

Memory is the worker process's own RSS (the broker's is not counted: Tansu keeps every
record in memory), read from /proc when the last event is consumed, each step beside
the step it grows from, with the table's key count (windows, edge states, partition
metas, kept-event batches); the detail line adds the RSS at the first event and the
peak. Part of the RSS is fixed (Python, Faust, aiokafka's fetch buffers, DuckDB). CPU is
the worker's user + system time from the first event to the last, per event. The
claim under test: memory follows edges x open windows, not events.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.common import (
    Context,
    Row,
    create_topics,
    make_events,
    make_records,
    measure,
    produce,
    worker_env,
    workers,
)

NAME = "growth"
PER_RECORD = 100
MIB = 1024 * 1024


@dataclass
class Step:
    label: str
    edges: int
    events: int
    rss_first: int = 0
    rss_half: int = 0
    rss_last: int = 0
    peak: int = 0
    keys: int = 0
    cpu_us: float = 0.0

    @property
    def rss_mib(self) -> float:
        return self.rss_last / MIB


def run_step(ctx: Context, bootstrap: str, step: Step) -> Step:
    topic = f"bench.growth.{step.label}"
    create_topics(bootstrap, [topic, f"{topic}.dlq"])
    events = make_events(step.events, step.edges, span_s=60.0)
    records = make_records(events, edges=step.edges, per_record=PER_RECORD)
    del events
    produce(bootstrap, topic, records)
    env = worker_env(bootstrap, topic, COMMPIPE_WINDOW_S=10, COMMPIPE_GRACE_S=10,
                     COMMPIPE_DUCKDB_PATH=ctx.workdir / f"growth-{step.label}.duckdb")
    ctx.say(f"growth {step.label}: {step.edges:,} edges, {step.events:,} events")
    with workers("commpipe", env, ctx) as procs:
        worker = procs[0]
        def note(done: int) -> None:
            if not step.rss_first:
                step.rss_first = worker.memory()[0]
            if not step.rss_half and done >= step.events // 2:
                step.rss_half = worker.memory()[0]

        measured = measure(procs, step.events, timeout=300, on_poll=note)
        step.rss_last, step.peak = worker.memory()
        step.keys = (worker.progress() or {}).get("keys", 0)
        step.cpu_us = measured.cpu_us_per_event
    return step


def run(ctx: Context) -> list[Row]:
    n = ctx.size(100_000, 40_000)  # N >> one worker batch (up to 500 records of ~100)
    steps = [Step("A", 100, n), Step("B", 100, 10 * n), Step("C", 1_000, 10 * n)]
    if not ctx.quick:
        steps.append(Step("D", 10_000, 10 * n))
    with ctx.broker() as broker:
        for step in steps:
            run_step(ctx, broker.bootstrap, step)
    a, b, c = steps[:3]
    detail = "; ".join(f"{s.label}: {s.edges:,} edges, {s.events:,} events, RSS "
                       f"{s.rss_first / MIB:.0f} -> {s.rss_half / MIB:.0f} (half) -> "
                       f"{s.rss_last / MIB:.0f} MiB (peak "
                       f"{s.peak / MIB:.0f}), {s.keys:,} table keys, {s.cpu_us:.1f} us/event"
                       for s in steps)
    rows = [
        Row(NAME, "worker RSS MiB, events x10 (B vs A)", b.rss_mib, a.rss_mib,
            "A: 100 edges, N events", "-", None, detail),
        Row(NAME, "worker RSS MiB, B after 10 N vs 5 N events", b.rss_mib, b.rss_half / MIB,
            "B halfway", "ratio <= 1.05 (flat)", b.rss_last <= 1.05 * b.rss_half),
        Row(NAME, "CPU us/event, events x10 (B vs A)", b.cpu_us, a.cpu_us, "A", "ratio <= 1.5",
            b.cpu_us <= 1.5 * a.cpu_us),
        Row(NAME, "table keys, edges x10 (C vs B)", c.keys, b.keys, "B: 100 edges, 10 N events",
            "-", None, "table keys: windows + edge states + partition metas + kept-event batches"),
        Row(NAME, "worker RSS MiB, edges x10 (C vs B)", c.rss_mib, b.rss_mib, "B", "-", None),
        Row(NAME, "CPU us/event, edges x10 (C vs B)", c.cpu_us, b.cpu_us, "B", "ratio <= 1.5",
            c.cpu_us <= 1.5 * b.cpu_us),
    ]
    if len(steps) > 3:
        d = steps[3]
        per_key = (d.rss_last - b.rss_last) / max(d.keys - b.keys, 1) / 1024
        rows += [
            Row(NAME, "table keys, edges x10 (D vs C)", d.keys, c.keys, "C: 1,000 edges", "-"),
            Row(NAME, "worker RSS MiB, edges x10 (D vs C)", d.rss_mib, c.rss_mib, "C", "-", None,
                f"{per_key:.1f} KiB of RSS per table key (D vs B)"),
            Row(NAME, "CPU us/event, edges x10 (D vs C)", d.cpu_us, c.cpu_us, "C",
                "ratio <= 1.5", d.cpu_us <= 1.5 * c.cpu_us),
        ]
    return rows
