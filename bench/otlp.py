"""OpenTelemetry spans in: events/s from OTLP records beside shim records of the same calls.

The same calls (``calls`` of them round-robin over 100 edges: a request and a response,
error or timeout each) are encoded as shim records (JSON arrays of one edge's events, the
shim's own :meth:`~pipeline.shim.outbox.Outbox.encode`, ~200 events each) and as OTLP
trace records as the Collector's Kafka exporter writes them, ``otlp_proto`` and
``otlp_json`` (one ``ExportTraceServiceRequest`` per record, one resource per service, built
with the generated classes of ``opentelemetry-proto``), in two sizes: ``LARGE`` spans per
record (a Collector batch well under the exporter's default 1 MB ``max_message_bytes``:
~160 bytes a span in protobuf, ~420 in JSON) and ``SMALL`` spans per record (2 calls per
edge in each). In one run:

- decode: events/s of :func:`pipeline.wire.otlp.decode_otlp` on the large records
  (protobuf on the ``upb`` runtime, and JSON) beside :func:`pipeline.wire.decode.decode_record`
  on the shim records, in this process, one core;
- worker: events/s through a real worker, timed from the first event consumed to the
  last, or over at most 20 s (quick: 10 s): on the shim records (baseline); bridging the
  large and the small protobuf records (``COMMPIPE_OTLP_TOPIC``: the worker's bridge
  publishes one record per edge per OTLP record to the events topic that the same worker
  applies; its decoding and publishing are on the worker's CPU too); and on the records
  the bridge publishes for the small ones (:func:`agents.otlp.publications`) written to
  the events topic beforehand, which tells the cost of their shape (~4 events a record)
  from the bridge's own.

Run: ``python -m bench --cases otlp`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from typing import Any

from bench.common import (
    Context,
    Measured,
    Row,
    create_topics,
    edge_names,
    measure,
    produce,
    worker_env,
    workers,
)
from pipeline.shim.outbox import Outbox

NAME = "otlp"
EDGES = 100
LARGE = 2_000
"""Spans per OTLP record, the usual shape: 20 calls of each edge in a record."""
SMALL = 200
"""Spans per OTLP record, a small shape: 2 calls of each edge in a record."""


def make_calls(n: int, seed: int = 11) -> list[dict[str, Any]]:
    """``n`` calls round-robin over the edges, in time order over the last minute."""
    rng = random.Random(seed)
    names = edge_names(EDGES)
    start = time.time() - 60.0
    calls = []
    for i in range(n):
        source, target, protocol = names[i % EDGES]
        outcome = rng.choices(("response", "error", "timeout"), (94, 5, 1))[0]
        calls.append({"i": i, "source": source, "target": target, "protocol": protocol,
                      "start": start + 60.0 * i / n,
                      "latency_ms": 1000.0 if outcome == "timeout"
                      else round(rng.lognormvariate(3.0, 0.8), 3), "outcome": outcome})
    return calls


def shim_records(calls: list[dict[str, Any]]) -> list[Any]:
    """The calls' events as the shim sends them: per flush of 100 calls per edge, one
    record per edge."""
    events = []
    for c in calls:
        base = {"v": 1, "source_service": c["source"], "target_service": c["target"],
                "protocol": c["protocol"], "method": "POST /v1/items",
                "trace_id": f"{c['i'] + 1:032x}", "span_id": f"{c['i'] + 1:016x}"}
        events.append({**base, "kind": "request", "ts": c["start"]})
        outcome = {**base, "kind": c["outcome"], "ts": c["start"] + c["latency_ms"] / 1000,
                   "latency_ms": c["latency_ms"]}
        if c["outcome"] == "error":
            outcome |= {"error_type": "http_5xx", "status_code": 503}
        elif c["outcome"] == "response":
            outcome["status_code"] = 200
        events.append(outcome)
    outbox = Outbox(topic="-", capacity=len(events) + 1, batch_events=500,
                    batch_bytes=512 * 1024, linger_s=0.0, producer_options={})
    flush = 2 * 100 * EDGES
    records = []
    for i in range(0, len(events), flush):
        records.extend(outbox.encode(events[i:i + flush]))
    return records


_PROTOCOL_ATTRIBUTES = {"http": ("http.request.method", "POST"), "grpc": ("rpc.system", "grpc"),
                        "amqp": ("messaging.system", "rabbitmq"),
                        "kafka": ("messaging.system", "kafka")}


def otlp_records(calls: list[dict[str, Any]], per_record: int
                 ) -> tuple[list[bytes], list[bytes]]:
    """The same calls as CLIENT spans, ``per_record`` per ExportTraceServiceRequest
    (one resource per source service): protobuf and OTLP/JSON encodings of each."""
    import orjson
    from google.protobuf.json_format import MessageToDict
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )
    from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

    proto, json = [], []
    for i in range(0, len(calls), per_record):
        by_service: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for c in calls[i:i + per_record]:
            by_service[c["source"]].append(c)
        request = ExportTraceServiceRequest()
        for service, mine in by_service.items():
            rs = request.resource_spans.add()
            rs.resource.attributes.add(key="service.name").value.string_value = service
            spans = rs.scope_spans.add().spans
            for c in mine:
                start = int(c["start"] * 1e9)
                span = spans.add(trace_id=(c["i"] + 1).to_bytes(16, "big"),
                                 span_id=(c["i"] + 1).to_bytes(8, "big"),
                                 name="POST /v1/items", kind=Span.SPAN_KIND_CLIENT,
                                 start_time_unix_nano=start,
                                 end_time_unix_nano=start + int(c["latency_ms"] * 1e6))
                key, value = _PROTOCOL_ATTRIBUTES[c["protocol"]]
                for k, v in (("peer.service", c["target"]), (key, value)):
                    span.attributes.add(key=k).value.string_value = v
                if c["protocol"] in ("amqp", "kafka"):
                    span.attributes.add(key="messaging.destination.name").value \
                        .string_value = "q"
                code = {"response": 200, "error": 503}.get(c["outcome"])
                if code is not None and c["protocol"] == "http":
                    span.attributes.add(key="http.response.status_code").value \
                        .int_value = code
                if c["outcome"] == "timeout":
                    span.attributes.add(key="error.type").value.string_value = "timeout"
                if c["outcome"] != "response":
                    span.status.code = Status.STATUS_CODE_ERROR
        proto.append(request.SerializeToString())
        doc = MessageToDict(request)  # protobuf's JSON mapping, then OTLP/JSON's ids
        for rs in doc["resourceSpans"]:
            for s in rs["scopeSpans"][0]["spans"]:
                s["traceId"] = _b64_hex(s["traceId"])
                s["spanId"] = _b64_hex(s["spanId"])
                s["kind"] = Span.SPAN_KIND_CLIENT
                if "status" in s:
                    s["status"]["code"] = Status.STATUS_CODE_ERROR
        json.append(orjson.dumps(doc))
    return proto, json


def _b64_hex(value: str) -> str:
    import base64

    return base64.b64decode(value).hex()


def decode_rate(decode: Any, values: list[bytes], events: int) -> float:
    """Events/s of ``decode`` over every value (best of three passes)."""
    best = float("inf")
    for _ in range(3):
        began = time.perf_counter()
        for v in values:
            decode(v)
        best = min(best, time.perf_counter() - began)
    return events / best


def bridge_records(proto: list[bytes], partitions: int = 4) -> list[Any]:
    """What the bridge publishes for ``proto`` (the OTLP records spread over ``partitions``
    partitions in turn, as offsets 0, 1, ...): one record per edge per OTLP record."""
    from agents.otlp import publications
    from pipeline.settings import Settings
    from pipeline.wire.otlp import decode_otlp

    defaults = Settings()  # the bridge's bounds: the shim's batch settings, as defaults
    out: list[Any] = []
    for k, value in enumerate(proto):
        out.extend(publications("bench.otlp.spans", k % partitions, k // partitions,
                                decode_otlp(value).calls,
                                max_events=defaults.shim_batch_events,
                                max_bytes=defaults.shim_batch_bytes))
    return out


def run(ctx: Context) -> list[Row]:
    from google.protobuf.internal import api_implementation

    from pipeline.wire.decode import decode_record
    from pipeline.wire.otlp import decode_otlp

    n = ctx.size(50_000, 10_000)
    cap_s = ctx.size(20, 10)
    calls = make_calls(n)
    shim = shim_records(calls)
    large, large_json = otlp_records(calls, LARGE)
    small, _ = otlp_records(calls, SMALL)
    events = 2 * n
    runtime = api_implementation.Type()
    ctx.say(f"otlp: {n:,} calls; decoding (protobuf runtime: {runtime})")
    if runtime != "upb":
        ctx.say(f"otlp: protobuf runs on its {runtime!r} runtime, not the C-backed upb: "
                "the decode figures are not the ones commpipe is meant to give")
    for what, values in (("otlp_proto", large), ("otlp_json", large_json),
                         ("small otlp_proto", small)):
        check = sum(len(decode_otlp(v).calls) for v in values)
        assert check == n, f"{check} of {n} calls decoded ({what})"
    shim_rate = decode_rate(decode_record, [r.value for r in shim], events)
    proto_rate = decode_rate(decode_otlp, large, events)
    json_rate = decode_rate(decode_otlp, large_json, events)
    shaped = bridge_records(small)
    assert sum(p.events for p in shaped) == events
    with ctx.broker() as broker:
        bootstrap = broker.bootstrap
        topics = ("bench.otlp.shim", "bench.otlp.shaped", "bench.otlp.events1",
                  "bench.otlp.events2", "bench.otlp.large", "bench.otlp.small")
        create_topics(bootstrap, [*topics, *(f"{t}.dlq" for t in topics[:4])])
        produce(bootstrap, topics[0], shim, with_headers=True)
        produce(bootstrap, topics[1], shaped, with_headers=True)
        produce(bootstrap, topics[4], [_Value(v) for v in large])
        produce(bootstrap, topics[5], [_Value(v) for v in small])
        measured: list[Measured] = []
        for what, env in (
                ("the shim records", worker_env(bootstrap, topics[0])),
                (f"OTLP records of {LARGE:,} spans, bridging them",
                 worker_env(bootstrap, topics[2], COMMPIPE_OTLP_TOPIC=topics[4])),
                (f"OTLP records of {SMALL:,} spans, bridging them",
                 worker_env(bootstrap, topics[3], COMMPIPE_OTLP_TOPIC=topics[5])),
                (f"the bridge's records for those of {SMALL:,} spans, written beforehand",
                 worker_env(bootstrap, topics[1]))):
            ctx.say(f"otlp: worker on {what}")
            with workers("commpipe", env, ctx) as procs:
                measured.append(measure(procs, events, cap_s=cap_s, timeout=300,
                                        poll_s=0.01))
    baseline, bridged_large, bridged_small, prepublished = measured
    shim_is = "the same worker on shim records of the same calls"
    note = (f"{n:,} calls ({events:,} events), {EDGES} edges, shim records of ~200 events, "
            f"OTLP records of {LARGE:,} spans; protobuf runtime {runtime}")

    def cpu(m: Measured) -> str:
        return (f"{m.cpu_us_per_event:.1f} CPU us/event (shim records: "
                f"{baseline.cpu_us_per_event:.1f}); {m.events:,} events in {m.seconds:.1f} s")

    return [
        Row(NAME, "decode events/s, otlp_proto", proto_rate, shim_rate,
            "decode_record on shim records of the same calls", "-", None, note),
        Row(NAME, "decode events/s, otlp_json", json_rate, shim_rate,
            "decode_record on shim records of the same calls"),
        Row(NAME, "protobuf runtime is upb (C)", 1.0 if runtime == "upb" else 0.0, None,
            f"google.protobuf api_implementation: {runtime}", "upb", runtime == "upb"),
        Row(NAME, f"worker events/s, bridging records of {LARGE:,} spans", bridged_large.rate,
            baseline.rate, shim_is, "-", None,
            "bridge and worker in one process: " + cpu(bridged_large)),
        Row(NAME, f"worker events/s, bridging records of {SMALL:,} spans", bridged_small.rate,
            baseline.rate, shim_is, "-", None, cpu(bridged_small)),
        Row(NAME, f"worker events/s, the bridge's records for {SMALL:,}-span ones",
            prepublished.rate, baseline.rate, shim_is, "-", None,
            f"{len(shaped):,} records of {events / len(shaped):.1f} events, written "
            "beforehand: the cost of that shape without the bridge's; " + cpu(prepublished)),
    ]


class _Value:
    """A record for :func:`bench.common.produce`: OTLP records have no key (the exporter's
    default)."""

    key = None

    def __init__(self, value: bytes) -> None:
        self.value = value
