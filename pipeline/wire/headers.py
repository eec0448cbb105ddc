"""The record headers of wire format v1: how a producer numbers its records.

A record whose send timed out may still have been written, and sending it again
writes it twice. A producer that numbers its records lets the worker apply each
once: ``commpipe-producer`` is a random id of one producer (the shim's outbox),
``commpipe-seq`` the record's number among that producer's records of the same
edge (decimal ASCII, from 1), fixed when the record is first encoded and kept on
every retry. Records without both headers are applied as they come.
"""

from __future__ import annotations

from typing import Any, Final

__all__ = ["PRODUCER_HEADER", "SEQ_HEADER", "producer_of"]

PRODUCER_HEADER: Final = "commpipe-producer"
SEQ_HEADER: Final = "commpipe-seq"


def producer_of(headers: Any) -> tuple[str, int] | None:
    """``(producer id, seq)`` from a record's headers (pairs or a dict of bytes); None
    without both, or with bad ones."""
    if not headers:
        return None
    if isinstance(headers, dict):
        producer, seq = headers.get(PRODUCER_HEADER), headers.get(SEQ_HEADER)
    else:  # pairs, the last of a name winning (as dict(headers) would), without the dict
        producer = seq = None
        for name, value in headers:
            if name == PRODUCER_HEADER:
                producer = value
            elif name == SEQ_HEADER:
                seq = value
    if producer is None or seq is None:
        return None
    try:
        return producer.decode("ascii"), int(seq)
    except (UnicodeDecodeError, ValueError, AttributeError):
        return None
