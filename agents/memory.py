"""The worker's garbage collection: rare full collections, none over what startup built.

CPython collects a generation each time its allocation count passes a threshold (700
container objects for the youngest, by default), promotes what survives, and scans every
tracked object of the process in a full collection once a quarter of the old generation
is new. In the worker almost everything is either short-lived (a record's events, decoded
dicts, futures) or the table (windows, sketches, edge states): nearly nothing forms
reference cycles. With the default thresholds a record batch in flight outlives two
young collections, so its objects reach the old generation and make full collections
frequent: measured at 10,000 edges (``python -m bench --cases metrics``), 26-29 full
collections in a minute-long run, each 150-415 ms of the event loop, during which
nothing is read, flushed or scraped.

:func:`tune` (the ``commpipe worker`` command calls it before the worker starts) collects
once, freezes what startup built (modules, classes, Faust's and aiokafka's objects: never
scanned again), and raises the young generation's threshold so that short-lived objects
die young: 3-4 full collections in the same run, the event loop's longest wait for a
scrape from 0.5-1.0 s down to 0-170 ms. Cyclic garbage is still collected, only later.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

__all__ = ["THRESHOLDS", "tune", "tuned"]

THRESHOLDS = (50_000, 20, 10)
"""``gc.set_threshold``: young collections every 50,000 allocations (CPython: 700), the
middle generation every 20 of them (10); the oldest as CPython does."""


def tune() -> None:
    """Collect, freeze what exists, and set :data:`THRESHOLDS` (see the module docstring)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)


@contextlib.contextmanager
def tuned() -> Iterator[None]:
    """:func:`tune` for a while (a benchmark running the worker's code in its own process),
    then CPython's policy back."""
    thresholds = gc.get_threshold()
    tune()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
