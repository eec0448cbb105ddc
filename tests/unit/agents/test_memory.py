"""The worker's garbage collection policy (agents/memory.py)."""

from __future__ import annotations

import gc
import subprocess
import sys
from collections.abc import Iterator

import pytest

from agents import memory

# A stream-like load in a fresh interpreter (this one's heap would decide how often a full
# collection runs): batches of short-lived objects (4,000 per batch, alive while the batch
# is) and a table that keeps one per batch. Prints the full collections it caused.
LOAD = """
import gc, sys
if sys.argv[1] == "tuned":
    from agents import memory
    memory.tune()
full = []
gc.callbacks.append(lambda phase, info: phase == "start" and info["generation"] == 2
                    and full.append(1))
table = []
for i in range(400):
    batch = [{"event": j, "edge": [i, j]} for j in range(2_000)]
    table.append({"window": i, "last": batch[-1]})
    del batch
print(len(full))
"""


def full_collections(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", LOAD, mode], capture_output=True, text=True,
                          timeout=120, check=True)
    return int(done.stdout)


@pytest.fixture
def restore_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def test_tune_sets_the_thresholds_and_freezes_what_exists(restore_gc: None) -> None:
    memory.tune()
    assert gc.get_threshold() == memory.THRESHOLDS
    assert gc.get_freeze_count() > 0  # what existed is out of every scan


def test_tuned_puts_cpythons_policy_back() -> None:
    before = gc.get_threshold()
    with memory.tuned():
        assert gc.get_threshold() == memory.THRESHOLDS
        assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_short_lived_objects_no_longer_make_full_collections() -> None:
    # CPython's thresholds: the batches' objects outlive two young collections, reach the
    # old generation and make it collect in full again and again
    assert full_collections("default") >= 10
    assert full_collections("tuned") == 0
