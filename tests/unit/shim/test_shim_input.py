"""The shim with unusual but valid input, and with input that is not an event at all.

Whatever a caller passes, ``emit()`` and the helpers return (True or False) and never
raise; what cannot be sent is counted (``invalid`` or ``dropped``) and logged, and the
sender keeps going for the events after it.
"""

from __future__ import annotations

import enum
from http import HTTPStatus
from typing import Any

from pipeline.shim.outbox import Outbox
from pipeline.wire.decode import decode_record


class Service(enum.StrEnum):
    ORDERS = "orders"
    PAYMENTS = "payments"


def outbox(**overrides: Any) -> Outbox:
    options: dict[str, Any] = dict(topic="t", capacity=100, batch_events=100,
                                   batch_bytes=100_000, linger_s=0.01, producer_options={})
    options.update(overrides)
    return Outbox(**options)


def wire(**fields: Any) -> dict[str, Any]:
    return {"v": 1, "kind": "response", "source_service": "orders",
            "target_service": "payments", "protocol": "http", "ts": 1.7e9, "latency_ms": 5.0,
            **fields}


def test_int_and_str_subclasses_are_sent_as_plain_values() -> None:
    box = outbox()
    events = [wire(status_code=HTTPStatus.OK, correlation_id="c1"),
              wire(source_service=Service.ORDERS, target_service=Service.PAYMENTS,
                   correlation_id="c2")]
    decoded = [e for r in box.encode(events) for e in decode_record(r.value).events]
    assert box.stats().invalid == 0
    assert [(e.correlation_id, e.source_service, e.target_service, e.status_code)
            for e in decoded] == [("c1", "orders", "payments", 200),
                                  ("c2", "orders", "payments", None)]
