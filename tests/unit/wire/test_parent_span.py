"""``parent_span_id``: an optional v1 field, checked like ``span_id`` by this decoder and
ignored, as every unknown field, by the decoder of before it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.errors import EventValidationError
from pipeline.wire.decode import decode_record, validate_event
from tests.before_parent_span import tree_before

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def event(i: int, **extra: Any) -> dict[str, Any]:
    return {"v": 1, "kind": "error", "event_id": f"e{i}", "correlation_id": f"c{i}",
            "source_service": "orders", "target_service": "payments", "protocol": "grpc",
            "ts": 1_763_900_000.0 + i, "latency_ms": 3.0, "error_type": "unavailable",
            "trace_id": TRACE, "span_id": f"{i + 1:016x}", **extra}


def test_parent_span_id_is_decoded_and_checked_like_a_span_id() -> None:
    decoded = validate_event(event(1, parent_span_id="00f067aa0ba902b7"))
    assert decoded.parent_span_id == "00f067aa0ba902b7"
    assert decoded.to_wire()["parent_span_id"] == "00f067aa0ba902b7"
    assert validate_event(event(2)).parent_span_id is None
    assert validate_event(event(3, parent_span_id=None)).parent_span_id is None
    for bad, reason in (("0" * 16, "must not be all zero"), ("ABC", "16 lower-case hex"),
                        (7, "expected a string")):
        with pytest.raises(EventValidationError) as info:
            validate_event(event(4, parent_span_id=bad))
        assert info.value.field == "parent_span_id" and reason in info.value.reason


DECODE_BEFORE = """
import json, sys
import pipeline.wire.decode as d
import pipeline.wire.events as e
assert "parent_span_id" not in e.Event._fields, e.__file__
record = d.decode_record(sys.stdin.buffer.read())
print(json.dumps({"file": d.__file__, "events": [ev.to_wire() for ev in record.events],
                  "errors": [str(x) for x in record.errors]}))
"""


def test_the_decoder_of_before_accepts_it_as_an_unknown_field(tmp_path: Path) -> None:
    before = tree_before(tmp_path / "before")
    with_parent = [event(i, parent_span_id=f"{i + 100:016x}") for i in range(5)]
    record = orjson.dumps(with_parent)
    done = subprocess.run([sys.executable, "-c", DECODE_BEFORE], input=record, cwd=before,
                          capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    old = json.loads(done.stdout)
    assert Path(old["file"]).resolve().is_relative_to(before.resolve())
    assert old["errors"] == []
    # what it read is each event as sent, less the field it does not know
    assert old["events"] == [{k: v for k, v in e.items() if k != "parent_span_id"}
                             for e in with_parent]
    # and this decoder keeps it
    assert [e.parent_span_id for e in decode_record(record).events] == [
        f"{i + 100:016x}" for i in range(5)]
