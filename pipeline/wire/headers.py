"""The record headers of wire format v1: how a producer numbers its records.

A record whose send timed out may still have been written, and sending it again
writes it twice. A producer that numbers its records lets the worker apply each
once: ``commpipe-producer`` is a random id of one producer (the shim's outbox),
``commpipe-seq`` the record's number among that producer's records of the same
edge (decimal ASCII, from 1), fixed when the record is first encoded and kept on
every retry. Records without both headers are applied as they come.
"""

from __future__ import annotations

from typing import Final

__all__ = ["PRODUCER_HEADER", "SEQ_HEADER"]

PRODUCER_HEADER: Final = "commpipe-producer"
SEQ_HEADER: Final = "commpipe-seq"
