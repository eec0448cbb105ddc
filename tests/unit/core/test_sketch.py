"""LatencySketch: quantiles within ALPHA of the exact rank, exact moments, exact merges."""

from __future__ import annotations

import math
import random

import orjson
import pytest

from pipeline.core.sketch import ALPHA, GAMMA, ZERO_MS, LatencySketch, bucket_of, value_of

QUANTILES = (0.0, 0.1, 0.5, 0.9, 0.95, 0.99, 1.0)


def _dyadic(x: float) -> float:
    """Round to a multiple of 1/1024 so float sums are exact whatever the order."""
    return round(x * 1024) / 1024


def _exact_summable(values: list[float]) -> list[float]:
    """Round every value to a multiple of one power of two small enough that every partial
    sum is exactly representable: then float sums do not depend on the order of addition."""
    total = sum(abs(v) for v in values) or 1.0
    scale = 2.0 ** math.floor(math.log2(2.0**50 / total))
    return [round(v * scale) / scale for v in values]


def _loop_sum(values: list[float]) -> float:
    total = 0.0
    for v in values:
        total += v
    return total


def _datasets() -> dict[str, list[float]]:
    r = random.Random(20240601)
    return {
        "uniform": [r.uniform(0.5, 500.0) for _ in range(3000)],
        "lognormal": [r.lognormvariate(3.0, 1.2) for _ in range(3000)],
        "exponential": [r.expovariate(1 / 40.0) for _ in range(3000)],
        "constant": [12.5] * 500,
        "with_zeros": [0.0] * 300 + [r.uniform(1.0, 100.0) for _ in range(700)],
        "tiny": [1e-4 * (1 + r.random()) for _ in range(1000)],
        "large": [1e7 * (1 + 9 * r.random()) for _ in range(1000)],
        "one_value": [37.25],
        "two_values": [3.0, 4000.0],
        "spread": [10 ** r.uniform(-3, 8) for _ in range(2000)],
    }


DATASETS = _datasets()


def _exact(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[math.floor(q * (len(values) - 1))]


def _sketch(values: list[float]) -> LatencySketch:
    s = LatencySketch()
    for v in values:
        s.add(v)
    return s


def _expected_bins(values: list[float]) -> tuple[dict[int, int], int]:
    """Bins by the documented formula ``ceil(ln(x) / ln(GAMMA))``, computed independently."""
    bins: dict[int, int] = {}
    zero = 0
    for v in values:
        if v <= ZERO_MS:
            zero += 1
        else:
            b = math.ceil(math.log(v) / math.log(GAMMA))
            bins[b] = bins.get(b, 0) + 1
    return bins, zero


@pytest.mark.parametrize("name", sorted(DATASETS))
@pytest.mark.parametrize("q", QUANTILES)
def test_quantile_within_alpha_of_exact_rank(name: str, q: float) -> None:
    values = DATASETS[name]
    s = _sketch(values)
    exact = _exact(values, q)
    got = s.quantile(q)
    assert got is not None
    assert abs(got - exact) <= ALPHA * exact + 1e-9, (name, q, got, exact)


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_count_sum_min_max_and_bins_exact(name: str) -> None:
    values = DATASETS[name]
    s = _sketch(values)
    assert s.count == len(values)
    assert s.sum == _loop_sum(values)
    assert s.min == min(values)
    assert s.max == max(values)
    bins, zero = _expected_bins(values)
    assert s.bins == bins
    assert s.zero == zero
    assert s.mean == pytest.approx(math.fsum(values) / len(values), rel=1e-12)


def test_sum_is_exact_for_dyadic_values() -> None:
    r = random.Random(5)
    values = [_dyadic(r.uniform(0, 1000)) for _ in range(500)]
    s = _sketch(values)
    total = 0.0
    for v in values:
        total += v
    assert s.sum == total == math.fsum(values)


@pytest.mark.parametrize("name", sorted(DATASETS))
@pytest.mark.parametrize("cut_frac", [0.0, 1 / 3, 0.5, 1.0])
def test_merge_of_split_halves_equals_whole(name: str, cut_frac: float) -> None:
    # Values rounded so float sums are exact: the whole to_json must match, sum included.
    values = _exact_summable(DATASETS[name])
    whole = _sketch(values)
    cut = math.floor(cut_frac * len(values))
    left, right = _sketch(values[:cut]), _sketch(values[cut:])
    left.merge(right)
    assert left.bins == whole.bins
    assert left.zero == whole.zero
    assert (left.count, left.min, left.max) == (whole.count, whole.min, whole.max)
    assert left.to_json() == whole.to_json()
    assert left == whole


def test_merge_many_parts_equals_whole_exactly() -> None:
    r = random.Random(99)
    values = [_dyadic(r.lognormvariate(2, 1)) for _ in range(2000)] + [0.0] * 10
    r.shuffle(values)
    whole = _sketch(values)
    parts = [values[i::7] for i in range(7)]
    total = LatencySketch()
    for p in parts:
        total.merge(_sketch(p))
    assert total.to_json() == whole.to_json()
    assert total == whole


def test_merge_with_empty_both_ways() -> None:
    s = _sketch([1.0, 2.0, 3.0])
    before = s.to_json()
    s.merge(LatencySketch())
    assert s.to_json() == before
    e = LatencySketch()
    e.merge(s)
    assert e.to_json() == before
    both = LatencySketch()
    both.merge(LatencySketch())
    assert both.count == 0 and both.quantile(0.5) is None
    assert both.to_json() == {"k": [], "n": [], "z": 0, "count": 0, "sum": 0.0,
                              "min": None, "max": None}


def test_merge_does_not_change_argument() -> None:
    r = random.Random(3)
    a = _sketch([r.uniform(1, 10) for _ in range(100)])
    b = _sketch([r.uniform(5, 50) for _ in range(100)] + [0.0])
    b_before = b.to_json()
    b_bins = dict(b.bins)
    a.merge(b)
    assert b.to_json() == b_before
    assert b.bins == b_bins
    assert a.bins is not b.bins


@pytest.mark.parametrize("other", [None, 3.0, {"k": [], "n": []}, [1.0]])
def test_merge_with_non_sketch_raises_type_error(other: object) -> None:
    s = _sketch([1.0])
    with pytest.raises(TypeError):
        s.merge(other)  # type: ignore[arg-type]
    assert s.count == 1


def test_empty_sketch() -> None:
    s = LatencySketch()
    for q in QUANTILES:
        assert s.quantile(q) is None
    assert s.mean is None
    assert s.count == 0


@pytest.mark.parametrize("q", [-0.01, 1.0001, -1.0, 2.0, math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("values", [[], [1.0, 2.0]])
def test_quantile_outside_unit_interval_raises(q: float, values: list[float]) -> None:
    s = _sketch(values)
    with pytest.raises(ValueError):
        s.quantile(q)


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_json_round_trip(name: str) -> None:
    s = _sketch(DATASETS[name])
    data = s.to_json()
    assert data["k"] == sorted(s.bins)
    assert data["n"] == [s.bins[k] for k in sorted(s.bins)]
    back = LatencySketch.from_json(data)
    assert back.to_json() == data
    assert back == s
    wire = orjson.loads(orjson.dumps(data))
    back2 = LatencySketch.from_json(wire)
    assert back2.to_json() == data
    assert back2.bins == s.bins
    for q in QUANTILES:
        assert back2.quantile(q) == s.quantile(q)


def test_json_round_trip_of_empty_sketch() -> None:
    s = LatencySketch()
    back = LatencySketch.from_json(orjson.loads(orjson.dumps(s.to_json())))
    assert back == s
    assert back.count == 0 and back.min == math.inf and back.max == -math.inf
    back.add(5.0)
    assert (back.min, back.max, back.count) == (5.0, 5.0, 1)


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_add_many_equals_add_loop(name: str) -> None:
    values = DATASETS[name]
    a = _sketch(values)
    b = LatencySketch()
    b.add_many(values)
    assert b.to_json() == a.to_json()
    c = LatencySketch()
    c.add_many(iter(values))  # any iterable, including a one-shot iterator
    assert c.to_json() == a.to_json()


def test_bucket_value_round_trip_within_alpha() -> None:
    r = random.Random(11)
    xs = [10 ** r.uniform(-5, 9) for _ in range(20000)] + [1.0, GAMMA, GAMMA**2, 1e-5, 1e9]
    for x in xs:
        v = value_of(bucket_of(x))
        assert abs(v - x) <= ALPHA * x * (1 + 1e-12), (x, v)


def test_bucket_of_matches_documented_formula() -> None:
    assert GAMMA == (1 + ALPHA) / (1 - ALPHA)
    r = random.Random(12)
    for _ in range(2000):
        x = 10 ** r.uniform(-5, 9)
        assert bucket_of(x) == math.ceil(math.log(x) / math.log((1.01) / (0.99)))
    assert bucket_of(1.0) == 0
    assert value_of(0) == 2.0 / (GAMMA + 1.0)


def test_zero_bucket_values_report_zero() -> None:
    s = _sketch([0.0, ZERO_MS, 5.0])
    assert s.zero == 2
    assert s.bins == {bucket_of(5.0): 1}
    assert s.quantile(0.0) == 0.0
    assert s.quantile(0.5) == 0.0
    assert s.quantile(1.0) == 5.0


def test_quantile_clamped_to_min_and_max() -> None:
    s = _sketch([100.0, 100.0, 100.0])
    for q in QUANTILES:
        assert s.quantile(q) == 100.0


def _walked(sketch: LatencySketch, q: float) -> float:
    """The rank's bucket found by walking the buckets one by one (the definition)."""
    rank = q * (sketch.count - 1)
    seen = sketch.zero
    if seen > rank:
        return 0.0
    for b in sorted(sketch.bins):
        seen += sketch.bins[b]
        if seen > rank:
            return min(max(value_of(b), sketch.min), sketch.max)
    raise AssertionError("counts are inconsistent")


@pytest.mark.parametrize("seed", range(30))
def test_quantiles_in_one_pass_equal_the_bucket_walk(seed: int) -> None:
    r = random.Random(seed)
    sketch = LatencySketch()
    for _ in range(r.choice((1, 2, 7, 300))):
        sketch.add(r.choice((0.0, ZERO_MS / 2, r.uniform(0.01, 3.0), r.lognormvariate(3, 2))))
    qs = tuple(sorted(r.random() for _ in range(5))) + (1.0,)
    assert sketch.quantiles((0.0, *qs)) == [_walked(sketch, q) for q in (0.0, *qs)]
    assert [sketch.quantile(q) for q in qs] == [_walked(sketch, q) for q in qs]
