"""How state is laid out in the worker's store: its keys, and its values' bytes.

State lives in one store (the worker's Faust table, or a dict in tests) under
four kinds of keys, each owned by exactly one source partition (the partition
is part of every key, so an edge that arrives on several partitions — a
producer with another partitioner — never mixes):

- :func:`window_id` ``w|partition|edge|window_start`` -> :class:`~pipeline.core.window.WindowStats`
- :func:`edge_id` ``e|partition|edge`` -> :class:`~pipeline.core.edge.EdgeMeta` (circuit
  state, late events, totals, producer numbering)
- :func:`partition_id` ``p|partition`` -> :class:`~pipeline.core.edge.PartitionMeta`
  (event-time watermark)
- :func:`detail_id` ``d|partition|first_offset[|part]`` ->
  :class:`~pipeline.core.details.DetailBatch`: the events of one batch the sink stores
  one by one

A value's bytes (:func:`encode_state`, the changelog's) are JSON with a type tag.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from pipeline.core.details import DetailBatch
from pipeline.core.edge import EdgeMeta, PartitionMeta
from pipeline.core.window import WindowStats

__all__ = ["SEP", "State", "decode_state", "detail_id", "edge_id", "encode_state", "parse_id",
           "partition_id", "window_id"]

SEP: Final = "\x1e"  # record separator: cannot occur in an edge key or a number


def window_id(partition: int, edge: str, window_start: float) -> str:
    return f"w{SEP}{partition}{SEP}{edge}{SEP}{float(window_start)!r}"


def edge_id(partition: int, edge: str) -> str:
    return f"e{SEP}{partition}{SEP}{edge}"


def partition_id(partition: int) -> str:
    return f"p{SEP}{partition}"


def detail_id(partition: int, first_offset: int, part: int = 0) -> str:
    return f"d{SEP}{partition}{SEP}{first_offset}" + (f"{SEP}{part}" if part else "")


def parse_id(key: str) -> tuple[str, int, str | None, float | None]:
    """``(kind, partition, edge, window_start)`` of a state key (edge/start None if absent)."""
    parts = key.split(SEP)
    kind, partition = parts[0], int(parts[1])
    edge = parts[2] if len(parts) > 2 else None
    start = float(parts[3]) if len(parts) > 3 else None
    return kind, partition, edge, start

State = WindowStats | EdgeMeta | PartitionMeta | DetailBatch

_TAGS: Final[dict[type, str]] = {WindowStats: "w", EdgeMeta: "e", PartitionMeta: "p",
                                 DetailBatch: "d"}
_TYPES: Final[dict[str, Any]] = {tag: cls for cls, tag in _TAGS.items()}


def encode_state(value: State) -> bytes:
    """Changelog bytes of a state value (JSON with a type tag)."""
    return orjson.dumps({"t": _TAGS[type(value)], "d": value.to_json()})


def decode_state(data: bytes) -> State:
    """Inverse of :func:`encode_state`."""
    obj = orjson.loads(data)
    return _TYPES[obj["t"]].from_json(obj["d"])  # type: ignore[no-any-return]
