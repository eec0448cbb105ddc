"""A producer's second copy of a record (a retried send that had landed after all) is
applied once: per (producer, edge, seq), across batches and across crash replays."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import pytest

from pipeline.core.batch import PartitionBatch
from pipeline.core.dedup import MAX_GAPS, MAX_PRODUCERS, PRODUCER_HORIZON_S, ProducerSeqs
from pipeline.core.edge import EdgeMeta
from pipeline.core.store import edge_id, parse_id
from pipeline.wire.events import Event
from tests.unit.core.test_batch import (
    CFG,
    EDGES,
    REPLAY_LATER_S,
    T0,
    _copy,
    dump,
    ev,
    make_records,
    persist,
)

Delivered = tuple[int, list[Event], float, tuple[str, int] | None]


def numbered(records: Sequence[tuple[int, list[Event], float]], producer: str = "p1"
             ) -> list[tuple[list[Event], float, tuple[str, int]]]:
    """The shim's numbering: per edge, 1, 2, 3 ... in send order."""
    seqs: dict[str, int] = {}
    out = []
    for _, events, now in records:
        edge = events[0].edge
        seqs[edge] = seqs.get(edge, 0) + 1
        out.append((events, now, (producer, seqs[edge])))
    return out


def with_copies(records: list[tuple[list[Event], float, tuple[str, int]]], seed: int
                ) -> tuple[list[Delivered], int]:
    """Each record, plus (for some) a second copy a few records later; offsets renumbered in
    delivery order. Returns the stream and how many events the copies hold."""
    r = random.Random(seed)
    due: dict[int, list[tuple[list[Event], tuple[str, int]]]] = {}
    stream: list[Delivered] = []
    copied = 0
    for i, (events, now, producer) in enumerate(records):
        stream.append((len(stream), events, now, producer))
        if r.random() < 0.2:
            due.setdefault(i + r.randint(0, 5), []).append((events, producer))
        for copy_events, copy_producer in due.pop(i, []):
            stream.append((len(stream), copy_events, now, copy_producer))
            copied += len(copy_events)
    return stream, copied


def run(stream: Sequence[Delivered], store: dict[str, Any], sizes: Sequence[int] = (), *,
        late_by: float = 0.0) -> int:
    """Apply in batches, persisting each, the worker's clock ``late_by`` seconds after each
    record's timestamp; returns the events skipped as copies."""
    sizes, i, copies = list(sizes), 0, 0
    while i < len(stream):
        n = sizes.pop(0) if sizes else len(stream) - i
        batch = PartitionBatch(0, CFG, store)
        for offset, events, ts, producer in stream[i:i + n]:
            batch.apply(offset, events, record_ts=ts, now=ts + late_by, producer=producer)
        persist(store, batch.changes(), copy=True)
        copies += batch.duplicates
        i += n
    return copies


BOOKKEEPING = {"offset", "producers", "duplicates", "dup_offsets"}


def without_dup_offsets(store: dict[str, Any]) -> dict[str, Any]:
    out = dump(store, clock=False)
    return {k: ({f: x for f, x in v.items() if f != "dup_offsets"} if k != "details" else v)
            for k, v in out.items()}


def aggregates(store: dict[str, Any]) -> dict[str, Any]:
    """The store without offsets and the copy bookkeeping (which differ by construction)."""
    out = dump(store)
    for key, value in out.items():
        if key != "details":
            out[key] = {k: v for k, v in value.items() if k not in BOOKKEEPING}
    return out


SEEDS = [1, 2, 3, 4]


@pytest.mark.parametrize("seed", SEEDS)
def test_copies_are_applied_once(seed: int) -> None:
    records = numbered(make_records(seed))
    clean = [(i, events, now, producer) for i, (events, now, producer) in enumerate(records)]
    want: dict[str, Any] = {}
    run(clean, want)

    stream, copied = with_copies(records, seed)
    assert copied > 0
    got: dict[str, Any] = {}
    assert run(stream, got, sizes=[random.Random(seed).randint(1, 30) for _ in stream]) == copied
    assert aggregates(got) == aggregates(want)
    assert sum(v.duplicates for k, v in got.items() if parse_id(k)[0] == "e") == copied


@pytest.mark.parametrize("seed", SEEDS)
def test_crash_with_copies_in_the_batch_replays_exactly(seed: int) -> None:
    stream, _ = with_copies(numbered(make_records(seed, n=80)), seed)
    want: dict[str, Any] = {}
    run(stream, want)
    for start, length in ((0, 20), (20, 40), (60, len(stream) - 60)):
        base: dict[str, Any] = {}
        run(stream[:start], base)
        batch = PartitionBatch(0, CFG, {k: _copy(v) for k, v in base.items()})
        for offset, events, now, producer in stream[start:start + length]:
            batch.apply(offset, events, record_ts=now, now=now, producer=producer)
        persisted = [(k, _copy(v)) for k, v in batch.changes()]
        for cut in range(len(persisted) + 1):  # crash after any prefix of the writes
            store = {k: _copy(v) for k, v in base.items()}
            persist(store, persisted[:cut], copy=True)
            # replayed later than every horizon (a restart, or a worker behind)
            run(stream[start:], store, sizes=[length], late_by=REPLAY_LATER_S)
            # which skipped offsets an edge still lists depends on where writes happened
            # (offsets up to the written partition meta are forgotten): the rest must agree
            assert without_dup_offsets(store) == without_dup_offsets(want), (start, cut)


def test_a_record_overtaken_by_a_later_one_still_counts() -> None:
    """seq 2 failed in flight and is retried after seq 3 landed: 2 counts, copies do not."""
    a = [ev("request", T0 + i, EDGES[0], i) for i in range(4)]
    stream: list[Delivered] = [
        (0, [a[0]], T0, ("p", 1)), (1, [a[2]], T0, ("p", 3)), (2, [a[1]], T0, ("p", 2)),
        (3, [a[1]], T0, ("p", 2)), (4, [a[2]], T0, ("p", 3)), (5, [a[3]], T0, ("q", 1))]
    store: dict[str, Any] = {}
    assert run(stream, store, sizes=[1] * 6) == 2
    meta = store[edge_id(0, a[0].edge)]
    assert meta.totals.requests == 4
    assert (meta.producers["p"].high, meta.producers["p"].gaps) == (3, [])
    # each write's partition meta covers the copies before it: they need not be listed
    assert meta.dup_offsets == []
    # written at once, the copies a replay would find held by the edge stay listed
    whole: dict[str, Any] = {}
    assert run(stream, whole) == 2
    assert whole[edge_id(0, a[0].edge)].dup_offsets == [3, 4]


def test_records_without_producer_headers_are_at_least_once() -> None:
    event = ev("request", T0, EDGES[0])
    store: dict[str, Any] = {}
    run([(0, [event], T0, None), (1, [event], T0, None)], store)
    assert store[edge_id(0, event.edge)].totals.requests == 2


def test_producer_seqs() -> None:
    seqs = ProducerSeqs()
    assert [seqs.first_time(s) for s in (1, 2, 2, 5, 3, 3, 1, 4, 5)] == [
        True, True, False, True, True, False, False, True, False]
    assert (seqs.high, seqs.gaps) == (5, [])
    seqs.first_time(5 + 3 * MAX_GAPS)  # a huge jump keeps only the latest MAX_GAPS numbers
    assert len(seqs.gaps) == MAX_GAPS and seqs.gaps[-1] == 4 + 3 * MAX_GAPS
    assert seqs.first_time(6) is False  # forgotten gap: treated as seen


def test_producers_are_bounded_and_forgotten_after_the_horizon() -> None:
    meta = EdgeMeta()
    for i in range(MAX_PRODUCERS + 5):
        assert meta.first_time(f"p{i}", 1, at=float(i))
    assert len(meta.producers) == MAX_PRODUCERS
    assert "p0" not in meta.producers and f"p{MAX_PRODUCERS + 4}" in meta.producers
    assert meta.first_time("new", 1, at=PRODUCER_HORIZON_S + 10.5)  # p0 ... p10 expire
    assert set(meta.producers) == {"new"} | {f"p{i}" for i in range(11, MAX_PRODUCERS + 5)}
    assert EdgeMeta.from_json(meta.to_json()) == meta
