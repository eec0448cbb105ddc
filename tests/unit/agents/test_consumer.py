"""Records fetched before a seek never reach a stream (agents/consumer.py), on aiokafka's
own subscription state: a seek, a position reset or a new assignment after the fetch
drops the rest of that partition's records, and nothing else does (not another fetch)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.consumer.subscription_state import SubscriptionState

from agents.consumer import (
    FETCH_MARK,
    FreshRecords,
    count_seeks,
    fetch_mark,
    fetched_since,
    fresh_only,
    positions_readable,
    scheduler,
)

count_seeks()  # what patch_consumers does in a worker


@dataclass
class Record:
    """What aiokafka's fetch hands on (a plain dataclass, as its ConsumerRecord)."""

    offset: int

A, B = TopicPartition("in", 0), TopicPartition("in", 1)


def in_loop(test: Callable[[], None]) -> Callable[[], None]:
    """aiokafka's subscription state wants a running event loop."""
    @functools.wraps(test)
    def run() -> None:
        async def main() -> None:
            test()
        asyncio.run(main())
    return run


def subscribed(*tps: TopicPartition) -> SubscriptionState:
    state = SubscriptionState()
    state.subscribe({tp.topic for tp in tps})
    state.assign_from_subscribed(set(tps))
    return state


def fetched(state: SubscriptionState, records: dict[TopicPartition, list[int]]
            ) -> FreshRecords:
    """What a fetch leaves: each partition's position just past its records."""
    for tp, offsets in records.items():
        state.seek(tp, offsets[0])
        state.subscription.assignment.state_value(tp).consumed_to(offsets[-1] + 1)
    return FreshRecords({tp: [Record(o) for o in offsets] for tp, offsets in records.items()},
                        state)


@in_loop
def test_records_nobody_sought_since_the_fetch_all_pass() -> None:
    state = subscribed(A, B)
    records = fetched(state, {A: [5, 6, 7], B: [10, 11]})
    out = [(tp.partition, r.offset) for tp, r in
           fresh_only(records, scheduler()().iterate(records))]
    assert sorted(out) == [(0, 5), (0, 6), (0, 7), (1, 10), (1, 11)]


@in_loop
def test_a_seek_during_delivery_drops_the_rest_of_that_partition_only() -> None:
    state = subscribed(A, B)
    records = fetched(state, {A: [5, 6, 7], B: [10, 11, 12]})
    out = []
    for tp, record in fresh_only(records, ((p, r) for p in (A, B) for r in records[p])):
        out.append((tp.partition, record.offset))
        if (tp, record.offset) == (A, 5):
            state.seek(A, 3)  # e.g. to the committed offset, by a rebalance
    assert out == [(0, 5), (1, 10), (1, 11), (1, 12)]


@in_loop
def test_another_fetch_moving_the_position_is_no_seek() -> None:
    # a fetch whose records never reached the stream (cancelled) still moved the position:
    # the records of the fetch being delivered are no less fresh for it
    state = subscribed(A)
    records = fetched(state, {A: [5, 6]})
    state.subscription.assignment.state_value(A).consumed_to(20)
    assert [r.offset for _, r in fresh_only(records, iter([(A, r) for r in records[A]]))] == [
        5, 6]


@in_loop
def test_a_seek_to_the_start_drops_what_a_standby_fetched() -> None:
    # a changelog partition a standby read up to 965, then recovered from offset 0
    state = subscribed(A)
    records = fetched(state, {A: [946, 965]})
    state.seek(A, 0)
    assert list(fresh_only(records, scheduler()().iterate(records))) == []


@in_loop
def test_a_new_assignment_or_a_reset_drops_records_fetched_before_it() -> None:
    state = subscribed(A, B)
    records = fetched(state, {A: [5], B: [10]})
    state.assign_from_subscribed({A, B})  # a rebalance: same partitions, new positions
    assert list(fresh_only(records, iter([(A, records[A][0])]))) == []
    state.seek(B, 10)
    again = fetched(state, {B: [10]})
    state.subscription.assignment.state_value(B).await_reset(0)  # seek_to_beginning
    assert list(fresh_only(again, iter([(B, again[B][0])]))) == []


@in_loop
def test_plain_mappings_pass_through() -> None:
    plain = {A: [Record(1)]}
    assert list(fresh_only(plain, scheduler()().iterate(plain))) == [(A, plain[A][0])]


@in_loop
def test_positions_must_be_readable_from_the_consumer() -> None:
    positions_readable(AIOKafkaConsumer(bootstrap_servers="127.0.0.1:1"))

    class Renamed:
        pass

    with pytest.raises(RuntimeError, match="_subscription"):
        positions_readable(Renamed())


@in_loop
def test_records_handed_on_tell_whether_they_were_fetched_after_a_seek() -> None:
    state = subscribed(A)
    before = fetched(state, {A: [1, 2]})
    sent_before = [record for _, record in fresh_only(before, scheduler()().iterate(before))]
    state.seek(A, 1)
    after_seek = fetch_mark(state, A)
    again = fetched(state, {A: [1]})
    sent_after = [record for _, record in fresh_only(again, scheduler()().iterate(again))]
    assert [fetched_since(r, after_seek) for r in sent_before + sent_after] == [
        False, False, True]
    assert all(getattr(r, FETCH_MARK)[0] is state.subscription.assignment.state_value(A)
               for r in sent_before + sent_after)
    state.assign_from_subscribed({A})  # a new assignment: a new partition state
    assert not fetched_since(sent_after[0], fetch_mark(state, A))
