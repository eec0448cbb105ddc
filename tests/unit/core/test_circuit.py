"""StateTrack and the derived Breaker, in event time."""

from __future__ import annotations

import random

import orjson
import pytest

from pipeline.core.circuit import Breaker, BreakerConfig, StateTrack
from pipeline.errors import ConfigError

CFG = BreakerConfig(failure_threshold=3, recovery_timeout_s=1.0, half_open_probes=1)
OK, FAIL, OTHER = True, False, None


def _run(events: list[tuple[float, bool | None]], cfg: BreakerConfig = CFG) -> Breaker:
    b = Breaker()
    for ts, outcome in events:
        b.observe(ts, outcome, cfg)
    return b


# --- StateTrack ---------------------------------------------------------------------------

def test_state_track_first_enter_of_same_state_only_sets_since() -> None:
    t = StateTrack()
    assert t.enter("closed", 100.0) is False
    assert (t.state, t.since, t.entered, t.seconds) == ("closed", 100.0, {}, {})


def test_state_track_enter_seconds_entered_exact() -> None:
    t = StateTrack()
    assert t.enter("closed", 10.0) is False
    assert t.enter("open", 12.5) is True
    assert (t.state, t.since) == ("open", 12.5)
    assert t.entered == {"open": 1}
    assert t.seconds == {"closed": 2.5}
    assert t.enter("open", 13.0) is False  # same state: nothing moves
    assert (t.since, t.entered, t.seconds) == (12.5, {"open": 1}, {"closed": 2.5})
    assert t.enter("half_open", 14.0) is True
    assert t.enter("closed", 14.25) is True
    assert t.enter("open", 20.0) is True
    assert t.entered == {"open": 2, "half_open": 1, "closed": 1}
    assert t.seconds == {"closed": 2.5 + 5.75, "open": 1.5, "half_open": 0.25}
    assert (t.state, t.since) == ("open", 20.0)
    assert t.seconds_in("open") == 1.5
    assert t.seconds_in("open", now=21.0) == 2.5
    assert t.seconds_in("closed", now=21.0) == 8.25  # not the current state: now ignored
    assert t.seconds_in("half_open", now=100.0) == 0.25
    assert t.seconds_in("open", now=19.0) == 1.5  # never negative


def test_state_track_never_moves_before_current_stretch() -> None:
    t = StateTrack(since=50.0)
    assert t.enter("open", 40.0) is True  # earlier ts clamps to since
    assert (t.since, t.seconds, t.entered) == (50.0, {"closed": 0.0}, {"open": 1})
    assert t.enter("closed", 45.0) is True
    assert (t.since, t.seconds) == (50.0, {"closed": 0.0, "open": 0.0})


def test_state_track_random_walk_matches_independent_bookkeeping() -> None:
    r = random.Random(7)
    t = StateTrack()
    state, since = "closed", None
    entered: dict[str, int] = {}
    seconds: dict[str, float] = {}
    ts = 0.0
    for _ in range(500):
        ts += r.choice([0.0, 0.5, 1.0, 2.0, 3.5])
        new = r.choice(["closed", "open", "half_open"])
        if since is None:
            since = ts
        changed = new != state
        if changed:
            seconds[state] = seconds.get(state, 0.0) + (ts - since)
            entered[new] = entered.get(new, 0) + 1
            state, since = new, ts
        assert t.enter(new, ts) is changed
    assert (t.state, t.since, t.entered) == (state, since, entered)
    assert t.seconds == seconds


def test_state_track_json_round_trip() -> None:
    t = StateTrack()
    t.enter("closed", 1.0)
    t.enter("open", 2.0)
    t.enter("half_open", 3.5)
    back = StateTrack.from_json(orjson.loads(orjson.dumps(t.to_json())))
    assert back == t
    assert back.to_json() == t.to_json()
    back.enter("closed", 4.0)
    assert t.state == "half_open"  # independent copies


# --- Breaker ------------------------------------------------------------------------------

def test_three_consecutive_failures_open_at_third_failure() -> None:
    b = _run([(0.0, OK), (1.0, FAIL), (1.5, FAIL), (2.25, FAIL)])
    assert b.track.state == "open"
    assert b.track.since == 2.25
    assert b.track.entered == {"open": 1}
    assert b.track.seconds == {"closed": 2.25}


def test_two_failures_do_not_open() -> None:
    b = _run([(0.0, FAIL), (1.0, FAIL)])
    assert (b.track.state, b.failures, b.track.entered) == ("closed", 2, {})


def test_success_in_between_resets_failure_count() -> None:
    b = _run([(0.0, FAIL), (1.0, FAIL), (2.0, OK), (3.0, FAIL), (4.0, FAIL)])
    assert b.track.state == "closed" and b.failures == 2
    b.observe(5.0, FAIL, CFG)
    assert (b.track.state, b.track.since) == ("open", 5.0)


def test_other_events_do_not_reset_failure_count() -> None:
    b = _run([(0.0, FAIL), (1.0, OTHER), (2.0, FAIL), (3.0, OTHER), (4.0, FAIL)])
    assert (b.track.state, b.track.since) == ("open", 4.0)


def test_open_ignores_outcomes_before_recovery_timeout() -> None:
    b = _run([(10.0, FAIL), (10.0, FAIL), (10.0, FAIL)])
    assert (b.track.state, b.track.since) == ("open", 10.0)
    for ts, outcome in [(10.2, OK), (10.5, FAIL), (10.99, OK), (10.999999, OTHER)]:
        b.observe(ts, outcome, CFG)
        assert (b.track.state, b.track.since) == ("open", 10.0)
    assert b.track.entered == {"open": 1}


@pytest.mark.parametrize("later", [0.0, 0.75, 5.0])
def test_first_event_after_timeout_moves_to_half_open_as_of_timeout(later: float) -> None:
    b = _run([(10.0, FAIL), (10.0, FAIL), (10.0, FAIL)])
    b.observe(11.0 + later, OTHER, CFG)
    assert b.track.state == "half_open"
    assert b.track.since == 11.0  # as of opened + recovery_timeout_s, not the event's ts
    assert b.track.seconds == {"closed": 0.0, "open": 1.0}
    assert b.track.entered == {"open": 1, "half_open": 1}


def test_half_open_success_closes_at_event_ts() -> None:
    b = _run([(0.0, OK), (1.0, FAIL), (2.0, FAIL), (3.0, FAIL)])  # open at 3.0
    b.observe(4.5, OK, CFG)  # half_open as of 4.0, then closed at 4.5
    assert (b.track.state, b.track.since) == ("closed", 4.5)
    assert b.track.entered == {"open": 1, "half_open": 1, "closed": 1}
    assert b.track.seconds == {"closed": 3.0, "open": 1.0, "half_open": 0.5}
    assert b.failures == 0


def test_half_open_failure_reopens_at_event_ts() -> None:
    b = _run([(1.0, FAIL), (2.0, FAIL), (3.0, FAIL)])  # open at 3.0 (closed since 1.0)
    b.observe(4.25, FAIL, CFG)  # half_open as of 4.0, open again at 4.25
    assert (b.track.state, b.track.since) == ("open", 4.25)
    assert b.track.entered == {"open": 2, "half_open": 1}
    assert b.track.seconds == {"closed": 2.0, "open": 1.0, "half_open": 0.25}
    b.observe(5.0, OK, CFG)  # before 4.25 + 1.0: ignored
    assert b.track.state == "open"
    b.observe(5.25, OK, CFG)  # exactly at the timeout: half_open as of 5.25, then closed
    assert (b.track.state, b.track.since) == ("closed", 5.25)
    assert b.track.entered == {"open": 2, "half_open": 2, "closed": 1}
    assert b.track.seconds == {"closed": 2.0, "open": 2.0, "half_open": 0.25}


def test_half_open_other_events_keep_half_open() -> None:
    b = _run([(0.0, FAIL), (0.0, FAIL), (0.0, FAIL), (2.0, OTHER), (3.0, OTHER)])
    assert (b.track.state, b.track.since) == ("half_open", 1.0)


def test_two_probes_needed_to_close() -> None:
    cfg = BreakerConfig(failure_threshold=3, recovery_timeout_s=1.0, half_open_probes=2)
    b = _run([(0.0, FAIL), (0.0, FAIL), (0.0, FAIL)], cfg)
    b.observe(1.5, OK, cfg)
    assert (b.track.state, b.track.since, b.probes_ok) == ("half_open", 1.0, 1)
    b.observe(1.75, OK, cfg)
    assert (b.track.state, b.track.since) == ("closed", 1.75)
    # a failure between probes re-opens and the probe count starts over
    b = _run([(0.0, FAIL), (0.0, FAIL), (0.0, FAIL), (1.5, OK), (1.6, FAIL)], cfg)
    assert (b.track.state, b.track.since) == ("open", 1.6)
    b.observe(2.6, OK, cfg)
    assert (b.track.state, b.probes_ok) == ("half_open", 1)
    b.observe(2.7, OK, cfg)
    assert (b.track.state, b.track.since) == ("closed", 2.7)
    assert b.track.entered == {"open": 2, "half_open": 2, "closed": 1}


def _reference(events: list[tuple[float, bool | None]], threshold: int, timeout: float,
               probes: int) -> tuple[str, float, dict[str, int], dict[str, float]]:
    """A straightforward re-statement of the documented machine (events in ts order)."""
    state, since = "closed", events[0][0]
    failures = oks = 0
    entered: dict[str, int] = {}
    seconds: dict[str, float] = {}

    def move(new: str, at: float) -> None:
        nonlocal state, since
        seconds[state] = seconds.get(state, 0.0) + (at - since)
        entered[new] = entered.get(new, 0) + 1
        state, since = new, at

    for ts, outcome in events:
        if state == "open":
            if ts < since + timeout:
                continue
            move("half_open", since + timeout)
            oks = 0
        if outcome is None:
            continue
        if state == "closed":
            failures = 0 if outcome else failures + 1
            if failures >= threshold:
                move("open", ts)
                failures = 0
        elif outcome:
            oks += 1
            if oks >= probes:
                move("closed", ts)
                failures = 0
        else:
            move("open", ts)
    return state, since, entered, seconds


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("probes", [1, 2])
def test_breaker_random_stream_matches_reference(seed: int, probes: int) -> None:
    r = random.Random(seed)
    ts = 0.0
    events = []
    for _ in range(400):
        ts += r.choice([0.0, 0.25, 0.5, 1.0])  # dyadic steps: float sums are exact
        events.append((ts, r.choices([True, False, None], weights=[4, 5, 2])[0]))
    cfg = BreakerConfig(failure_threshold=3, recovery_timeout_s=1.0, half_open_probes=probes)
    b = _run(events, cfg)
    state, since, entered, seconds = _reference(events, 3, 1.0, probes)
    assert (b.track.state, b.track.since) == (state, since)
    assert b.track.entered == entered
    assert b.track.seconds == seconds
    assert entered.get("open", 0) >= 1  # the stream actually exercised the machine


def test_breaker_json_round_trip() -> None:
    b = _run([(0.0, FAIL), (1.0, FAIL), (2.0, FAIL), (3.5, OTHER), (3.6, FAIL), (5.0, FAIL)])
    b.observe(5.5, FAIL, CFG)
    data = b.to_json()
    back = Breaker.from_json(orjson.loads(orjson.dumps(data)))
    assert back == b
    assert back.to_json() == data
    # the copy continues exactly like the original
    for ts, outcome in [(6.0, OTHER), (7.0, OK), (7.5, FAIL), (8.0, FAIL)]:
        b.observe(ts, outcome, CFG)
        back.observe(ts, outcome, CFG)
    assert back.to_json() == b.to_json()


def test_breaker_json_round_trip_mid_count() -> None:
    cfg = BreakerConfig(half_open_probes=2)
    b = _run([(0.0, FAIL), (0.0, FAIL), (0.0, FAIL), (1.0, OK)], cfg)
    b2 = _run([(0.0, FAIL), (0.5, FAIL)], cfg)
    for x in (b, b2):
        back = Breaker.from_json(x.to_json())
        assert (back.failures, back.probes_ok) == (x.failures, x.probes_ok)
        assert back == x
    assert (b.probes_ok, b2.failures) == (1, 2)


@pytest.mark.parametrize("kwargs", [
    {"failure_threshold": 0}, {"failure_threshold": -1}, {"recovery_timeout_s": -0.001},
    {"recovery_timeout_s": -5.0}, {"half_open_probes": 0},
])
def test_breaker_config_rejects_invalid(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        BreakerConfig(**kwargs)  # type: ignore[arg-type]


def test_breaker_config_accepts_boundaries() -> None:
    cfg = BreakerConfig(failure_threshold=1, recovery_timeout_s=0.0, half_open_probes=1)
    assert (cfg.failure_threshold, cfg.recovery_timeout_s, cfg.half_open_probes) == (1, 0.0, 1)
    assert BreakerConfig() == CFG
