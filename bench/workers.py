"""The worker processes benchmarks start: ``python -m bench.workers commpipe|naive``.

Both read ``COMMPIPE_*`` settings from the environment and serve
``GET /bench/progress`` on ``COMMPIPE_METRICS_PORT``: events consumed so far, the
input partitions owned, the table's key count. It is read instead of ``/metrics``
because a scrape renders every edge (10,000 in the growth case), which would bill
the worker for the benchmark's polling.

- ``commpipe``: the real worker, :func:`agents.app.create_app` as ``commpipe worker``
  runs it (creates the topics, then a Faust worker); the page adds nothing to its path.
- ``bare``: a bare aiokafka consumer of every input partition, ``orjson.loads`` of each
  record and nothing else: what reading the records costs at all (the floor of a live
  case's CPU per event).
- ``naive``: the baseline a first attempt would write: a Faust agent reading the same
  batch records, ``orjson.loads`` and nothing else to decode (no validation), and one
  read-modify-write of a windowed table per event (a changelog record per event).
  It reads the same batch records rather than one event per record so that the
  comparison isolates the per-event table write: with one event per record Faust's
  own per-record cost alone caps it at ~8,000 events/s (DESIGN.md).

The naive agent runs with Faust's defaults, its fetch wait of 1.5 s included (the
commpipe worker sets ``COMMPIPE_WORKER_FETCH_WAIT_MS``, 100 ms); the agent is CPU-bound,
so the wait costs it little.
"""

from __future__ import annotations

import sys
from typing import Any

from pipeline.settings import Settings


def _progress_page(app: Any, topic: str, read: Any) -> Any:
    import json

    def page() -> tuple[bytes, str]:
        owned = sorted(tp.partition for tp in app.assignor.assigned_actives()
                       if tp.topic == topic)
        return json.dumps({**read(), "partitions": owned}).encode(), "application/json"

    return page


def _serve_progress(app: Any, topic: str, read: Any) -> None:
    @app.page("/bench/progress")
    async def progress(view: Any, request: Any) -> Any:
        owned = sorted(tp.partition for tp in app.assignor.assigned_actives()
                       if tp.topic == topic)
        return view.json({**read(), "partitions": owned})


def run_commpipe(settings: Settings) -> None:
    from agents.app import create_app
    from agents.topics import ensure_commpipe_topics
    from pipeline.dev.process import run_sync

    run_sync(lambda: ensure_commpipe_topics(settings))
    pipeline = create_app(settings)
    # the worker's own HTTP server (agents/app.py serves no Faust pages), in its threads
    pipeline.metrics_server.routes["/bench/progress"] = _progress_page(
        pipeline.app, settings.topic,
        lambda: {"events": pipeline.events_in, "records": pipeline.batch_records,
                 "batches": pipeline.batches, "keys": len(pipeline.state.data)})
    _run(pipeline.app, settings)


def _run(app: Any, settings: Settings) -> None:
    """As ``commpipe worker`` runs a worker: without Faust's terminal spinner, which sets
    the root logger to DEBUG (every library then builds debug records it drops), and with
    rare full garbage collections (agents/memory.py; the naive agent too: a baseline gets
    what costs nothing to copy)."""
    from faust import Worker

    from agents import memory

    worker = Worker(app, loglevel=settings.worker_loglevel)
    worker.spinner = None
    memory.tune()
    worker.execute_from_commandline()


def run_naive(settings: Settings) -> None:
    import faust
    import orjson

    app = faust.App(
        settings.app_id, broker=f"kafka://{settings.kafka_bootstrap}", store="memory://",
        topic_partitions=settings.partitions, datadir=settings.worker_datadir,
        web_port=settings.metrics_port, web_bind=settings.metrics_host,
        web_host=settings.metrics_host, consumer_auto_offset_reset="earliest",
        broker_session_timeout=settings.broker_session_timeout_s,
        broker_heartbeat_interval=settings.broker_heartbeat_interval_s)
    events = app.topic(settings.topic, key_type=bytes, value_type=bytes, key_serializer="raw",
                       value_serializer="raw", partitions=settings.partitions)
    # acks=True: Faust's default acks=0 changelog breaks aiokafka's connection on Tansu
    changelog = app.topic(f"{settings.app_id}-naive-changelog", partitions=settings.partitions,
                          compacting=True, deleting=True, acks=True, internal=True)
    now = {"ts": 0.0}  # the event being applied: windows in event time, as ours are
    table = app.Table("naive", default=lambda: None, partitions=settings.partitions,
                      changelog_topic=changelog).tumbling(
        settings.window_s, expires=3600.0).relative_to(lambda event: now["ts"])
    counted = {"events": 0}

    @app.agent(events)
    async def aggregate(stream: Any) -> None:
        async for value in stream:
            batch = orjson.loads(value)
            for event in batch if type(batch) is list else [batch]:
                now["ts"] = event["ts"]
                edge = (event["source_service"], event["target_service"], event["protocol"])
                key = "\x1f".join(edge)
                stats = table[key].value() or [0, 0, 0, 0.0]
                stats[0] += 1
                if event["kind"] in ("error", "timeout"):
                    stats[1] += 1
                if "latency_ms" in event:
                    stats[2] += 1
                    stats[3] += event["latency_ms"]
                table[key] = stats
                counted["events"] += 1

    _serve_progress(app, settings.topic, lambda: {"events": counted["events"], "records": 0,
                                                  "keys": len(table.table)})
    _run(app, settings)


def run_bare(settings: Settings) -> None:
    import asyncio
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import orjson
    from aiokafka import AIOKafkaConsumer, TopicPartition

    counted = {"events": 0, "records": 0}

    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            body = json.dumps({**counted, "partitions": list(range(settings.partitions))})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((settings.metrics_host, settings.metrics_port), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    async def main() -> None:
        consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap,
                                    enable_auto_commit=False, auto_offset_reset="earliest",
                                    fetch_max_wait_ms=settings.worker_fetch_wait_ms)
        await consumer.start()
        consumer.assign([TopicPartition(settings.topic, p) for p in range(settings.partitions)])
        while True:
            for records in (await consumer.getmany(timeout_ms=1000)).values():
                for record in records:
                    value = orjson.loads(record.value)
                    counted["events"] += len(value) if type(value) is list else 1
                counted["records"] += len(records)

    asyncio.run(main())


if __name__ == "__main__":
    kind = sys.argv[1] if len(sys.argv) > 1 else ""
    runners = {"commpipe": run_commpipe, "naive": run_naive, "bare": run_bare}
    if kind not in runners:
        sys.exit(f"usage: python -m bench.workers {'|'.join(runners)}")
    runners[kind](Settings.from_env())
