"""Property tests: whatever bytes or JSON arrive, the decoder raises only its own error."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.errors import EventValidationError
from pipeline.wire.decode import DecodedRecord, decode_event, decode_record, validate_event
from pipeline.wire.events import KINDS, Event

json_scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30))
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=15), children, max_size=5),
    max_leaves=25,
)
FIELDS = ["v", "kind", "event_id", "correlation_id", "trace_id", "span_id", "source_service",
          "target_service", "protocol", "method", "ts", "latency_ms", "status_code",
          "error_type", "error_message", "attempt", "backoff_ms", "payload_size", "circuit_state",
          "health_status", "check_type"]
# Objects that look like events: real field names, random values (often nearly valid).
near_events = st.fixed_dictionaries(
    {"v": st.sampled_from([1, 1, 1, 2, "1", None, True]),
     "kind": st.sampled_from(sorted(KINDS) + ["bogus", ""]),
     "event_id": st.sampled_from(["e1", "", "a b"]) | st.text(max_size=70),
     "correlation_id": st.sampled_from(["c1"]) | st.text(max_size=5),
     "source_service": st.sampled_from(["orders", "a b", ""]) | st.text(max_size=5),
     "target_service": st.sampled_from(["payments"]) | st.text(max_size=5),
     "protocol": st.sampled_from(["http", "grpc", "HTTP"]),
     "ts": st.sampled_from([1.7e9, 0, -1.0, 5e9]) | st.floats() | st.integers()},
    optional={name: json_values | st.floats() | st.integers() | st.text(max_size=40)
              for name in FIELDS[11:]},
)


def _check_record(value: bytes) -> None:
    try:
        result = decode_record(value)
    except EventValidationError as e:
        assert str(e)
        return
    assert isinstance(result, DecodedRecord)
    for event in result.events:
        assert isinstance(event, Event)
        # whatever passed must pass again from its own wire form: validation is stable
        assert validate_event(orjson.loads(orjson.dumps(event.to_wire()))) == event
    for error in result.errors:
        assert isinstance(error, EventValidationError) and error.index is not None


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_random_bytes_never_raise_anything_else(value: bytes) -> None:
    _check_record(value)
    try:
        decode_event(value)
    except EventValidationError:
        pass


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_random_json_never_raises_anything_else(value: Any) -> None:
    _check_record(orjson.dumps(value))


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(near_events, min_size=1, max_size=6))
def test_near_valid_batches_split_into_events_and_reasons(batch: list[dict[str, Any]]) -> None:
    try:
        raw = orjson.dumps(batch)
    except TypeError:  # e.g. integers beyond 64 bits cannot even be encoded
        return
    result = decode_record(raw)
    assert len(result.events) + len(result.errors) == len(batch)
    assert sorted(e.index for e in result.errors) == [e.index for e in result.errors]
    for error in result.errors:
        assert error.field is None or error.field in FIELDS


@settings(max_examples=200)
@given(st.binary(min_size=1, max_size=60), st.binary(max_size=60))
def test_corrupted_valid_records(prefix: bytes, suffix: bytes) -> None:
    good = orjson.dumps([{"v": 1, "kind": "request", "event_id": "e", "correlation_id": "c",
                          "source_service": "a", "target_service": "b", "protocol": "http",
                          "ts": 1.7e9}])
    _check_record(prefix + good + suffix)
    _check_record(good[: len(prefix)] + suffix)


def _outcome(check: Any, obj: Any) -> Any:
    try:
        return check(obj)
    except EventValidationError as e:
        return ("error", e.field, e.reason)


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(near_events | json_values)
def test_the_one_pass_reading_decides_as_the_rules_in_order(obj: Any) -> None:
    """validate_event reads a valid event in one pass and anything else rule by rule: both
    must give the same event, or the same first broken rule."""
    from pipeline.wire.decode import _validate_in_order

    assert _outcome(validate_event, obj) == _outcome(lambda o: _validate_in_order(o, None), obj)
