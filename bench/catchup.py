"""Catch-up: PostgreSQL away while N windows pile up in the worker, then back.

One real worker (``bench.workers commpipe``) with PostgreSQL as its only database. The
run's embedded PostgreSQL is stopped, N windows' worth of shim records (1,000 edges, a
request and a response per edge per window, 10 s windows) are produced and read, and
the worker holds every closed window for PostgreSQL (``COMMPIPE_SINK_MAX_BACKLOG`` is set
above N: this measures the catch-up, not the bound). Then PostgreSQL starts again and
the case times until ``communication_rollups`` holds every window.

Printed: the drain rate beside the rate at which the worker read the same windows while
PostgreSQL was away (below 1x, a worker at full input could not catch up), the drain
time beside the outage, the worker's peak RSS beside its RSS before the traffic, and
what was lost: the table's row count and its sums of requests, responses and latency
counts, checked against the events produced (the target is 0).
"""

from __future__ import annotations

import time
from collections import Counter

from bench.common import (
    Context,
    Row,
    create_topics,
    make_events,
    make_records,
    produce,
    wait_ready,
    worker_env,
    workers,
)
from pipeline.sink import migrations

NAME = "catchup"
EDGES = 1_000
WINDOW_S = 10.0
PER_RECORD = 10  # events per edge per shim record: 5 windows of one edge
MIB = 1024 * 1024
SUMS = ("SELECT count(*), coalesce(sum(requests), 0), coalesce(sum(responses), 0), "
        "coalesce(sum(latency_count), 0) FROM communication_rollups")


def _table(dsn: str) -> tuple[int, int, int, int] | None:
    """Rows and sums of ``communication_rollups``; None while PostgreSQL does not answer."""
    import psycopg

    try:
        with psycopg.connect(dsn, connect_timeout=2) as conn:
            row = conn.execute(SUMS).fetchone()
    except psycopg.Error:
        return None
    assert row is not None
    return (int(row[0]), int(row[1]), int(row[2]), int(row[3]))


def run(ctx: Context) -> list[Row]:
    # per edge: N = windows x 1,000. Reading them is bound by the changelog on the embedded
    # broker (one produce request per changed window: ~200 windows/s here), so N stays small
    windows = ctx.size(40, 20)
    n = windows * EDGES
    span = windows * WINDOW_S
    t0 = (time.time() // WINDOW_S) * WINDOW_S - span - 120.0
    events = make_events(2 * n, EDGES, span_s=span, t0=t0)
    for e in events:  # a request and a response per edge per window: sums known exactly
        e["kind"] = "response" if int((e["ts"] - t0) // 5.0) % 2 else "request"
        for k in ("error_type", "status_code", "attempt", "backoff_ms"):
            e.pop(k, None)
        if e["kind"] == "response":
            e["latency_ms"] = 5.0
            e["status_code"] = 200
        else:
            e.pop("latency_ms", None)
    kinds = Counter(e["kind"] for e in events)
    keys = {(int((e["ts"] - t0) // WINDOW_S), e["source_service"]) for e in events}
    want = (len(keys), kinds["request"], kinds["response"], kinds["response"])
    records = make_records(events, edges=EDGES, per_record=PER_RECORD)
    del events
    dsn = ctx.postgres_database()
    migrations.migrate_postgres(dsn)
    server = ctx.postgres_server()
    with ctx.broker() as broker:
        topic = "bench.catchup"
        create_topics(broker.bootstrap, [topic, f"{topic}.dlq"])
        # grace over one record's span of event time (5 windows): nothing arrives late
        env = worker_env(broker.bootstrap, topic, COMMPIPE_WINDOW_S=WINDOW_S,
                         COMMPIPE_GRACE_S=60, COMMPIPE_IDLE_CLOSE_S=2,
                         COMMPIPE_POSTGRES_DSN=dsn, COMMPIPE_SINK_MAX_BACKLOG=4 * n,
                         COMMPIPE_SINK_BACKOFF_MAX_S=1, COMMPIPE_PATTERNS_LOOKBACK_S=300)
        try:
            with workers("commpipe", env, ctx) as procs:
                worker = procs[0]
                wait_ready(procs)
                rss_idle = worker.memory()[0]
                server.stop()
                ctx.say(f"catchup: PostgreSQL away, {n:,} windows ({2 * n:,} events) in")
                away = time.monotonic()
                produce(broker.bootstrap, topic, records)
                first = None
                while (done := (worker.progress() or {}).get("events", 0)) < 2 * n:
                    if first is None and done:
                        first = time.monotonic()
                    if time.monotonic() - away > 600:
                        raise TimeoutError(f"{done:,} of {2 * n:,} events read in 600 s; logs in "
                                           f"{worker.log_path.parent}")
                    time.sleep(0.05)
                read_s = time.monotonic() - (first or away)
                time.sleep(3.0)  # each edge's last window closes for idleness (2 s)
                outage = time.monotonic() - away
                rss_away = worker.memory()[0]
                ctx.say("catchup: PostgreSQL back")
                server.start()
                back = time.monotonic()
                got = None
                while (got := _table(dsn)) is None or got[0] < want[0]:
                    if time.monotonic() - back > 900:
                        raise TimeoutError(f"PostgreSQL holds {got} of {want} after 900 s; logs "
                                           f"in {worker.log_path.parent}")
                    time.sleep(0.2)
                drain = time.monotonic() - back
                time.sleep(1.0)  # a last round could still be writing: read the table settled
                got = _table(dsn)
                _, peak = worker.memory()
        finally:
            server.start()  # a failed case leaves it running for the next ones
    lost = want[0] - (got[0] if got else 0)
    exact = got == want
    note = (f"{n:,} windows of {EDGES:,} edges ({windows} per edge), {2 * n:,} events; "
            f"worker RSS {rss_idle / MIB:.0f} MiB idle, {rss_away / MIB:.0f} MiB holding them, "
            f"peak {peak / MIB:.0f} MiB; table (rows, requests, responses, latency count) "
            f"{got} against {want} from the events")
    return [
        Row(NAME, "windows/s draining into PostgreSQL", n / drain, n / read_s,
            "windows/s read while PostgreSQL was away", "-", None, note),
        Row(NAME, "seconds to drain", drain, outage, "the outage (s)"),
        Row(NAME, "worker peak RSS MiB", peak / MIB, rss_idle / MIB, "RSS before the traffic"),
        Row(NAME, "windows lost (rows and sums vs events)", lost, want[0],
            "windows sent", "0, sums exact", lost == 0 and exact),
    ]
