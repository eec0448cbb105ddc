"""Values as people read them, and as programs read them.

For people (:func:`cell`), a value is rounded to what it means, and what it
means comes from its column's name (the schema names columns after their unit,
``latency_p95_ms``, ``error_ratio``; :func:`kind_of` reads the name's words):

- ``ms`` (a word ``ms``: ``p99_ms``, ``avg(latency_ms)``): milliseconds to 0.1,
  ``518.094855`` -> ``518.1``;
- ``ratio`` (a word ``ratio``): a 0-1 ratio as a percentage, ``0.0123`` -> ``1.2 %``;
- ``percent`` (``error_rate``, ``success_rate``, ``*_percent``, ``*_pct``): already a
  percentage, ``0.25`` -> ``0.25 %``;
- ``epoch`` (``ts``, ``*_ts``, a word ``epoch``): epoch seconds as an ISO time;
- ``seconds`` (``*_s``, ``*_seconds``): to the millisecond;
- ``score`` and ``rate`` (``*_rps``, ``throughput``): to 0.1, ``65.00`` -> ``65``;
- ``id`` (``status_code``, ``version``, ``partition``, ...): digits as they are;
- anything else (``count``): integers with thousands separators, other numbers to four
  significant digits (all of the integer part).

A percentage never rounds to 0 % or 100 % unless it is exactly that (99.95 %
stays 99.95 %, not 100.0 %). Times are ISO 8601 in UTC, written with ``Z``
(a value stored without a zone is shown as stored). Lists are joined with
commas, mappings are JSON, control characters become spaces (a value from the
database cannot move the terminal's cursor).

For programs (:func:`plain` for JSON, :func:`csv_text` for CSV), nothing is
rounded: floats as Python's shortest exact form, decimals as their digits,
times as ISO 8601 with their offset and microseconds, mappings and lists (JSONB,
arrays) as JSON.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, Final, Literal

__all__ = ["Kind", "cell", "csv_text", "is_number", "kind_of", "plain"]

Kind = Literal["ms", "ratio", "percent", "seconds", "epoch", "score", "rate", "count",
               "id", "number"]

_WORD = re.compile(r"[a-z0-9]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_ID_WORDS: Final = {"id", "code", "version", "partition", "offset", "port", "attempt", "seq",
                    "year", "pid"}
_EPOCH_RANGE: Final = (0.0, 4_102_444_800.0)  # 1970 to 2100


def kind_of(column: str) -> Kind:
    """What a column's values mean, from its name (see the module docstring)."""
    name = column.lower()
    words = _WORD.findall(name.replace("_", " "))
    last = words[-1] if words else ""
    if "ms" in words:
        return "ms"
    if "ratio" in words:
        return "ratio"
    if {"percent", "pct"} & set(words) or (
            "rate" in words and {"error", "success", "failure"} & set(words)):
        return "percent"
    if "epoch" in words or last == "ts":
        return "epoch"
    if "seconds" in words or last == "s":
        return "seconds"
    if "score" in words:
        return "score"
    if "rps" in words or "throughput" in words:
        return "rate"
    if _ID_WORDS & set(words):
        return "id"
    return "count"


def is_number(value: Any) -> bool:
    return isinstance(value, int | float | Decimal) and not isinstance(value, bool)


def _text(value: str) -> str:
    return _CONTROL.sub(" ", value)


def _time(value: dt.datetime) -> str:
    if value.tzinfo is None:  # a TIMESTAMP without a zone: shown as stored
        return value.isoformat(timespec="milliseconds" if value.microsecond else "seconds")
    utc = value.astimezone(dt.UTC).replace(tzinfo=None)
    return utc.isoformat(timespec="milliseconds" if utc.microsecond else "seconds") + "Z"


def _percent(p: float) -> str:
    """``p`` percent with one decimal (two under 1 %), or more while rounding would say
    0 or 100 falsely."""
    for decimals in (1, 2, 3, 4) if abs(p) >= 1 else (2, 3, 4):
        text = f"{p:,.{decimals}f}"
        rounded = float(text.replace(",", ""))
        if not ((rounded == 0.0 and p != 0.0) or (rounded == 100.0 and p != 100.0)):
            break
    return f"{text} %"


def _significant(v: float) -> str:
    """Four significant digits, all of the integer part, no exponent for ordinary sizes."""
    if v == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(v)))
    if magnitude >= 3:
        return f"{v:,.0f}"
    if magnitude >= -4:
        text = f"{v:.{max(3 - magnitude, 0)}f}"
        return text.rstrip("0").rstrip(".") if "." in text else text
    return f"{v:.3g}"


def _trimmed(v: float, decimals: int) -> str:
    text = f"{v:,.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def _number(value: float | int | Decimal, kind: Kind) -> str:
    if isinstance(value, int) and kind in ("count", "id", "number"):
        return f"{value:,}" if kind == "count" else str(value)
    v = float(value)
    if not math.isfinite(v):
        return str(v)
    if kind == "ms":
        return f"{v:,.1f}"
    if kind == "ratio":
        return _percent(v * 100.0)
    if kind == "percent":
        return _percent(v)
    if kind == "seconds":
        return f"{v:,.3f}"
    if kind == "epoch" and _EPOCH_RANGE[0] <= v < _EPOCH_RANGE[1]:
        return _time(dt.datetime.fromtimestamp(v, dt.UTC))
    if kind in ("score", "rate"):
        return _trimmed(v, 1)
    if v.is_integer() and abs(v) < 1e15:
        return f"{int(v):,}" if kind == "count" else str(int(v))
    return _significant(v)


def cell(value: Any, kind: Kind = "count") -> str:
    """``value`` as people read it in a column of ``kind`` (see the module docstring)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if is_number(value):
        return _number(value, kind)
    if isinstance(value, dt.datetime):
        return _time(value)
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return f"{value.total_seconds():,.3f} s"
    if isinstance(value, list | tuple):
        return ", ".join(cell(v, kind) for v in value)
    if isinstance(value, Mapping):
        return _text(json.dumps(plain(value), ensure_ascii=False))
    if isinstance(value, bytes | bytearray | memoryview):
        return "\\x" + bytes(value).hex()
    return _text(str(value))


def plain(value: Any) -> Any:
    """``value`` for JSON, at full precision: Decimal as its digits (a string), times as
    ISO 8601 with offset, non-finite floats as strings, everything else as JSON has it."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, bytes | bytearray | memoryview):
        return "\\x" + bytes(value).hex()
    return str(value)


def csv_text(value: Any) -> str:
    """``value`` as one CSV field, at full precision; mappings and lists as JSON."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list | tuple | Mapping):
        return json.dumps(plain(value), ensure_ascii=False, separators=(",", ":"))
    p = plain(value)
    return p if isinstance(p, str) else str(p)
