"""Which events the worker keeps for the databases, and that it masks their messages again."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from pipeline.core.batch import PartitionBatch
from pipeline.core.details import DetailBatch, detail_of, keeps_detail
from pipeline.core.store import decode_state, parse_id
from pipeline.core.window import WindowConfig
from pipeline.wire.decode import decode_record
from pipeline.wire.events import Event

TS = 1_700_000_000.0


def ev(kind: str, n: int = 1, **optional: Any) -> Event:
    return Event(kind, f"e{n}", "chain-1", "orders", "payments", "http", TS + n,  # type: ignore[arg-type]
                 **optional)


@pytest.mark.parametrize(("event", "kept"), [
    (ev("error", error_type="connection"), True),
    (ev("timeout", latency_ms=5.0), True),
    (ev("retry", attempt=1, backoff_ms=200.0), True),
    (ev("health", health_status="healthy"), True),
    (ev("response", latency_ms=3.0, attempt=2), True),  # ends a retried call
    (ev("response", latency_ms=3.0, attempt=1), False),  # first try: nothing to trace
    (ev("response", latency_ms=3.0), False),
    (ev("request", attempt=3), False),
    (ev("circuit", circuit_state="open"), False),
])
def test_keeps_detail(event: Event, kept: bool) -> None:
    assert keeps_detail(event) is kept


def test_worker_masks_what_a_non_shim_producer_sent() -> None:
    # a producer that does not use the shim: valid v1, but with secrets in its messages
    record = orjson.dumps([
        {"v": 1, "kind": "error", "event_id": "x1", "correlation_id": "chain-1",
         "source_service": "orders", "target_service": "payments", "protocol": "http",
         "ts": TS, "error_type": "connection",
         "error_message": "connect postgresql://u:secret@h/db failed; Bearer abc.def"},
        {"v": 1, "kind": "retry", "event_id": "x2", "correlation_id": "chain-1",
         "source_service": "orders", "target_service": "payments", "protocol": "http",
         "ts": TS + 0.5, "attempt": 1, "backoff_ms": 200, "error_message": "m" * 1012 + " x://u:ab@h/"},
        {"v": 1, "kind": "response", "event_id": "x3", "correlation_id": "chain-1",
         "source_service": "orders", "target_service": "payments", "protocol": "http",
         "ts": TS + 1, "latency_ms": 4.5, "attempt": 2},
        {"v": 1, "kind": "response", "event_id": "x4", "correlation_id": "other",
         "source_service": "orders", "target_service": "payments", "protocol": "http",
         "ts": TS + 1, "latency_ms": 4.5},
    ])
    events, errors = decode_record(record)
    assert errors == []
    store: dict[str, Any] = {}
    batch = PartitionBatch(2, WindowConfig(), store)
    assert batch.apply(7, events, record_ts=TS, now=TS) == []
    kept = [v for k, v in batch.changes() if parse_id(k)[0] == "d"]
    assert len(kept) == 1 and isinstance(kept[0], DetailBatch)
    # what goes to the changelog is already masked
    copy = decode_state(orjson.dumps({"t": "d", "d": kept[0].to_json()}))
    assert isinstance(copy, DetailBatch)
    assert [(e["event_id"], e.get("error_message")) for e in copy.events] == [
        ("x1", "connect postgresql://u:***@h/db failed; Bearer ***"),
        # 1,024 characters, masked to 1,025: cut again to the bound
        ("x2", "m" * 1012 + " x://u:***@…"),
        ("x3", None)]
    assert copy.events[1]["backoff_ms"] == 200.0 and copy.events[2]["attempt"] == 2


def test_detail_of_keeps_every_other_field() -> None:
    event = ev("timeout", latency_ms=1000.0, error_type="timeout", status_code=504,
               trace_id="4bf92f3577b34da6a3ce929d0e0e4736", error_message="password=x y")
    assert detail_of(event) == {**event.to_wire(), "error_message": "password=*** y"}
