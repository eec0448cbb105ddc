"""The one validating decoder of wire format v1: bytes in, events or precise reasons out.

:func:`decode_record` reads a whole Kafka record value: one event (a JSON object)
or a batch (a JSON array of events). A bad event inside a batch is reported
alone, so the good events of the same record still count. :func:`decode_event`
reads a single-event record; :func:`validate_event` checks an already-parsed
JSON value (the shim uses it on what it is about to send).

Whatever the input, these functions raise nothing but
:class:`~pipeline.errors.EventValidationError`, whose ``field`` and ``reason``
say exactly what is wrong. Unknown fields are ignored (a v1 reader tolerates
additions); a JSON ``null`` in an optional field means "absent". Values the
shim hands over may be subclasses (``HTTPStatus.OK``, a ``StrEnum`` member,
a float subclass such as ``numpy.float64``): they are checked and kept as the
plain ``int``, ``float`` or ``str`` they hold (their own ``__str__``, ``__eq__``
or ``__hash__`` are never called); ``bool`` is not a number.

Field rules (DESIGN.md, "The event"):

=================  ==========================================================
``v``              integer ``1``
``kind``           one of ``KINDS``
``event_id``       ``[A-Za-z0-9_-]{1,64}``
``correlation_id`` 1-128 printable ASCII characters, no spaces
``trace_id``       32 lower-case hex, not all zero (W3C trace context)
``span_id``        16 lower-case hex, not all zero (same for ``parent_span_id``,
                   optional: v1 readers before it ignore it as an unknown field)
``source_service`` ``[A-Za-z0-9._:-]{1,100}`` (same for ``target_service``,
                   ``error_type`` and ``check_type``)
``protocol``       ``[a-z][a-z0-9._-]{0,31}``
``method``         1-200 characters, no control characters
``ts``             number, 2000-01-01 <= ts < 2100-01-01 (epoch seconds)
``latency_ms``     finite number, 0 <= x <= 86,400,000 (one day);
                   required for ``response``; same rule for ``backoff_ms``
``status_code``    integer 0-999 (HTTP or gRPC code)
``error_message``  1-1024 characters, no control characters (C0, DEL, C1);
                   the reason never repeats the text, which may hold secrets
``attempt``        integer 1-10,000; required for ``retry``
``payload_size``   integer 0 - 2**40
``circuit_state``  ``closed | open | half_open``; required for ``circuit``
``health_status``  ``healthy | degraded | unhealthy``; required for ``health``
=================  ==========================================================
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, Final, NamedTuple

import orjson

from pipeline.errors import EventValidationError
from pipeline.wire.events import CIRCUIT_STATES, HEALTH_STATUSES, KINDS, SCHEMA_VERSION, Event
from pipeline.wire.redact import MAX_MESSAGE_CHARS

__all__ = [
    "MAX_BATCH_EVENTS",
    "MAX_RECORD_BYTES",
    "DecodedRecord",
    "decode_event",
    "decode_record",
    "validate_event",
]

MAX_RECORD_BYTES: Final = 1024 * 1024
"""Largest record value accepted (Kafka's default message.max.bytes is about this)."""
MAX_BATCH_EVENTS: Final = 10_000
"""Most events in one batch record."""

TS_MIN: Final = 946_684_800.0  # 2000-01-01T00:00:00Z
TS_MAX: Final = 4_102_444_800.0  # 2100-01-01T00:00:00Z
MS_MAX: Final = 86_400_000.0  # one day in milliseconds
PAYLOAD_MAX: Final = 2**40

_NAME = re.compile(r"[A-Za-z0-9._:-]{1,100}")
_PROTOCOL = re.compile(r"[a-z][a-z0-9._-]{0,31}")
_EVENT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_CORRELATION_ID = re.compile(r"[!-~]{1,128}")
_METHOD = re.compile(r"[^\x00-\x1f\x7f]{1,200}")
_TRACE_ID = re.compile(r"[0-9a-f]{32}")
_SPAN_ID = re.compile(r"[0-9a-f]{16}")
_CONTROL_CHAR = re.compile(r"[\x00-\x1f\x7f-\x9f]")

# Service names, protocols and error types repeat endlessly: each such check
# remembers the strings it has passed, so its regular expression runs once per
# distinct string (bounded: the memory is cleared when it fills up).
_REMEMBER_MAX: Final = 100_000


class _Bad(Exception):
    """Internal: a field check failed with this reason."""


class DecodedRecord(NamedTuple):
    """What one record held: its valid events and, per bad event, why it was refused."""

    events: list[Event]
    errors: list[EventValidationError]


def _describe(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _plain_str(value: Any) -> str | None:
    """``value`` as an exact ``str`` (a subclass gives up its characters, nothing it overrides
    is called); ``None`` when it is not a string at all."""
    if type(value) is str:
        return value
    return str.__str__(value) if isinstance(value, str) else None


def _string(value: Any, pattern: re.Pattern[str], rule: str) -> str:
    if value is None:
        raise _Bad("missing (required)")
    plain = _plain_str(value)
    if plain is None:
        raise _Bad(f"expected a string ({rule}), got {_describe(value)}")
    value = plain
    if pattern.fullmatch(value) is None:
        shown = value if len(value) <= 40 else value[:40] + "..."
        raise _Bad(f"{shown!r} does not match {rule}")
    return value


def _checker(pattern: re.Pattern[str], rule: str, *, remember: bool = False,
             fast: Callable[[str], bool] | None = None) -> Callable[[Any], str]:
    """A string check; ``remember`` caches good values (for names that repeat, not ids);
    ``fast`` is a cheap test that only ever accepts strings the pattern accepts (anything
    it does not accept goes through the pattern, so the errors stay the same)."""
    if fast is not None:
        def check_fast(value: Any) -> str:
            if type(value) is str and fast(value):
                return value
            return _string(value, pattern, rule)

        return check_fast

    if not remember:
        def check(value: Any) -> str:
            return _string(value, pattern, rule)

        return check

    known_good: set[str] = set()

    def check_remembered(value: Any) -> str:
        if type(value) is str and value in known_good:
            return value
        value = _string(value, pattern, rule)
        if len(known_good) >= _REMEMBER_MAX:
            known_good.clear()
        known_good.add(value)
        return value

    return check_remembered


def _number(low: float, high: float, *, high_inclusive: bool = True) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        if type(value) is float and low <= value < high:  # the usual case: finite, in range
            return value
        if value is None:
            raise _Bad("missing (required)")
        if type(value) is not float and type(value) is not int:
            if isinstance(value, float):
                value = float.__float__(value)
            elif isinstance(value, int) and not isinstance(value, bool):
                value = int.__int__(value)
            else:
                raise _Bad(f"expected a number, got {_describe(value)}")
        value = float(value)
        if not math.isfinite(value):
            raise _Bad(f"must be finite, got {value}")
        if value < low or value > high or (value == high and not high_inclusive):
            closing = "]" if high_inclusive else ")"
            raise _Bad(f"{value!r} is outside [{low:g}, {high:g}{closing}")
        return value

    return check


def _integer(low: int, high: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if type(value) is not int:
            if not isinstance(value, int) or isinstance(value, bool):
                raise _Bad(f"expected an integer, got {_describe(value)}")
            value = int.__int__(value)
        if value < low or value > high:
            raise _Bad(f"{value} is outside [{low}, {high}]")
        return value

    return check


def _one_of(allowed: frozenset[str]) -> Callable[[Any], str]:
    rule = " | ".join(sorted(allowed))

    def check(value: Any) -> str:
        if type(value) is str and value in allowed:
            return value
        if value is None:
            raise _Bad("missing (required)")
        plain = _plain_str(value)
        if plain is None or plain not in allowed:
            shown = value if plain is None else plain
            raise _Bad(f"expected one of {rule}, got {shown!r}"[:200])
        return plain

    return check


def _hex_id(pattern: re.Pattern[str], length: int) -> Callable[[Any], str]:
    rule = f"{length} lower-case hex digits, not all zero"

    def check(value: Any) -> str:
        value = _string(value, pattern, rule)
        if value.count("0") == length:
            raise _Bad(f"must not be all zero ({rule})")
        return value

    return check


def _check_message(value: Any) -> str:
    """``error_message``: its faults are described, never quoted (it may hold secrets)."""
    plain = _plain_str(value)
    if plain is None:
        raise _Bad(f"expected a string, got {_describe(value)}")
    value = plain
    if not 1 <= len(value) <= MAX_MESSAGE_CHARS:
        raise _Bad(f"{len(value)} characters; 1-{MAX_MESSAGE_CHARS} are accepted")
    bad = _CONTROL_CHAR.search(value)
    if bad is not None:
        raise _Bad(f"control character U+{ord(bad[0]):04X} at position {bad.start()} "
                   "(one line of printable text is accepted)")
    return value


_check_name = _checker(_NAME, "[A-Za-z0-9._:-]{1,100}", remember=True)
_check_protocol = _checker(_PROTOCOL, "[a-z][a-z0-9._-]{0,31}", remember=True)
# Ids are new in every event, so they are not remembered; str and bytes methods (C, no
# regex) accept the usual ones: ASCII letters and digits are within [A-Za-z0-9_-], and
# ASCII printable characters other than the space are exactly [!-~].
_EVENT_ID_RULE: Final = "[A-Za-z0-9_-]{1,64}"
_CORRELATION_ID_RULE: Final = "1-128 printable ASCII characters, no spaces"


def _check_event_id(v: Any) -> str:
    # ASCII letters and digits (bytes.isalnum is ASCII-only, and 4x str.isalnum's speed)
    if type(v) is str and 0 < len(v) <= 64 and v.isascii() and v.encode().isalnum():
        return v
    return _string(v, _EVENT_ID, _EVENT_ID_RULE)


def _check_correlation_id(v: Any) -> str:
    if type(v) is str and 0 < len(v) <= 128 and v.isascii() and v.isprintable() and " " not in v:
        return v
    return _string(v, _CORRELATION_ID, _CORRELATION_ID_RULE)



_check_ts = _number(TS_MIN, TS_MAX, high_inclusive=False)
_check_ms = _number(0.0, MS_MAX)
_check_kind = _one_of(KINDS)

# Optional fields in Event order; the decoder visits only the keys an event has.
_OPTIONAL: Final[tuple[tuple[str, Callable[[Any], Any]], ...]] = (
    ("trace_id", _hex_id(_TRACE_ID, 32)),
    ("span_id", _hex_id(_SPAN_ID, 16)),
    ("parent_span_id", _hex_id(_SPAN_ID, 16)),
    # a printable string has no control characters
    ("method", _checker(_METHOD, "1-200 characters, no control characters",
                        fast=lambda v: 0 < len(v) <= 200 and v.isprintable())),
    ("latency_ms", _check_ms),
    ("status_code", _integer(0, 999)),
    ("error_type", _check_name),
    ("error_message", _check_message),
    ("attempt", _integer(1, 10_000)),
    ("backoff_ms", _check_ms),
    ("payload_size", _integer(0, PAYLOAD_MAX)),
    ("circuit_state", _one_of(CIRCUIT_STATES)),
    ("health_status", _one_of(HEALTH_STATUSES)),
    ("check_type", _check_name),
)
_OPTIONAL_AT: Final[dict[str, tuple[int, Callable[[Any], Any]]]] = {
    name: (i, check) for i, (name, check) in enumerate(_OPTIONAL)
}
_NO_OPTIONAL: Final = (None,) * len(_OPTIONAL)
_new_event = tuple.__new__
assert Event._fields[7:-1] == tuple(name for name, _ in _OPTIONAL) and Event._fields[-1] == "v"
_REQUIRED_BY_KIND: Final[dict[str, str]] = {
    "response": "latency_ms",
    "retry": "attempt",
    "circuit": "circuit_state",
    "health": "health_status",
}


def _validate_in_order(obj: Any, index: int | None) -> Event:
    """:func:`validate_event`, field by field in the order of the rules: its error is the
    first rule broken in that order."""
    if type(obj) is not dict:
        raise EventValidationError(None, f"expected a JSON object, got {_describe(obj)}",
                                   index=index)
    get = obj.get
    name = "v"
    try:
        version = get("v")
        if type(version) is not int or version != SCHEMA_VERSION:
            if version is None:
                raise _Bad("missing (required)")
            raise _Bad(f"unsupported schema version {version!r}; this reader reads v1"[:200])
        name = "kind"
        kind = _check_kind(get("kind"))
        name = "event_id"
        event_id = _check_event_id(get("event_id"))
        name = "correlation_id"
        correlation_id = _check_correlation_id(get("correlation_id"))
        name = "source_service"
        source = _check_name(get("source_service"))
        name = "target_service"
        target = _check_name(get("target_service"))
        name = "protocol"
        protocol = _check_protocol(get("protocol"))
        name = "ts"
        ts = _check_ts(get("ts"))
        optional = list(_NO_OPTIONAL)
        for name, value in obj.items():
            slot = _OPTIONAL_AT.get(name)
            if slot is not None and value is not None:
                optional[slot[0]] = slot[1](value)
        needed = _REQUIRED_BY_KIND.get(kind)
        if needed is not None and get(needed) is None:
            name = needed
            raise _Bad(f"missing (required for {kind} events)")
    except _Bad as bad:
        raise EventValidationError(name, str(bad), index=index) from None
    # what Event(...) does, without its keyword handling (this runs once per event)
    return _new_event(Event, (kind, event_id, correlation_id, source, target, protocol, ts,
                              *optional, SCHEMA_VERSION))


_SLOTS: Final[dict[str, tuple[int, Callable[[Any], Any]]]] = {
    "kind": (0, _check_kind), "event_id": (1, _check_event_id),
    "correlation_id": (2, _check_correlation_id), "source_service": (3, _check_name),
    "target_service": (4, _check_name), "protocol": (5, _check_protocol), "ts": (6, _check_ts),
    **{name: (7 + i, check) for name, (i, check) in _OPTIONAL_AT.items()},
}
"""Every field the decoder reads (``v`` aside), with its slot in :class:`Event`."""
_TEMPLATE: Final = [None] * (len(Event._fields) - 1) + [SCHEMA_VERSION]
_NEEDED_AT: Final[dict[str, int]] = {kind: _SLOTS[name][0]
                                     for kind, name in _REQUIRED_BY_KIND.items()}


def validate_event(obj: Any, *, index: int | None = None) -> Event:
    """Check one parsed JSON value against wire format v1 and return it as an :class:`Event`.

    A valid event is read in one pass over its fields; anything else is read again rule
    by rule (:func:`_validate_in_order`), so an error names the first rule broken."""
    if type(obj) is dict and type(obj.get("v")) is int and obj["v"] == SCHEMA_VERSION:
        row = _TEMPLATE.copy()
        slots = _SLOTS
        try:
            for name, value in obj.items():
                slot = slots.get(name)
                if slot is not None and value is not None:
                    row[slot[0]] = slot[1](value)
        except _Bad:
            pass
        else:
            kind = row[0]
            if (kind is not None and row[1] is not None and row[2] is not None
                    and row[3] is not None and row[4] is not None and row[5] is not None
                    and row[6] is not None):
                needed = _NEEDED_AT.get(kind)
                if needed is None or row[needed] is not None:
                    return _new_event(Event, row)
    return _validate_in_order(obj, index)


def _parse(value: bytes | bytearray | memoryview | str | None) -> Any:
    if value is None:
        raise EventValidationError(None, "record has no value")
    if len(value) > MAX_RECORD_BYTES:
        raise EventValidationError(
            None, f"record is {len(value)} bytes; at most {MAX_RECORD_BYTES} are accepted")
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError as e:
        raise EventValidationError(None, f"not valid JSON: {e}"[:300]) from None
    except TypeError as e:  # not bytes/str at all
        raise EventValidationError(None, f"record value is not bytes: {e}") from None


def decode_event(value: bytes | bytearray | memoryview | str | None) -> Event:
    """Decode a record that holds exactly one event (a JSON object)."""
    return validate_event(_parse(value))


def decode_record(value: bytes | bytearray | memoryview | str | None) -> DecodedRecord:
    """Decode a record holding one event or a batch; bad events of a batch come back as errors.

    Raises :class:`EventValidationError` only when the record as a whole is unusable
    (no value, too large, not JSON, neither an object nor a non-empty array, or a
    batch of more than :data:`MAX_BATCH_EVENTS` events).
    """
    parsed = _parse(value)
    if type(parsed) is dict:
        return DecodedRecord([validate_event(parsed)], [])
    if type(parsed) is not list:
        raise EventValidationError(
            None, f"expected a JSON object or array of objects, got {_describe(parsed)}")
    if not parsed:
        raise EventValidationError(None, "empty batch (a JSON array with no events)")
    if len(parsed) > MAX_BATCH_EVENTS:
        raise EventValidationError(
            None, f"batch holds {len(parsed)} events; at most {MAX_BATCH_EVENTS} are accepted")
    events: list[Event] = []
    errors: list[EventValidationError] = []
    for i, obj in enumerate(parsed):
        try:
            events.append(validate_event(obj, index=i))
        except EventValidationError as e:
            errors.append(e)
    return DecodedRecord(events, errors)
