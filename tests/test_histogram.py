"""The response-time histogram: bucket edges, percentiles against a sorted reference,
merging, and the exact Prometheus counts."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wunderproxy.histogram import (
    MAX_EXPONENT,
    MIN_EXPONENT,
    PROMETHEUS_BOUNDS,
    SUB_BUCKETS,
    Histogram,
    bucket_bounds,
    bucket_of,
)

LAST = (MAX_EXPONENT - MIN_EXPONENT) * SUB_BUCKETS - 1
# The middle of a bucket is within half its width of anything in it: 1/64 of the low edge.
TOLERANCE = 1 / (2 * SUB_BUCKETS)
times = st.floats(min_value=2.0**MIN_EXPONENT, max_value=2.0**MAX_EXPONENT, exclude_max=True)


def reference_percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(fraction * len(ordered))) - 1]


@given(times)
def test_a_time_falls_inside_the_bounds_of_its_bucket(seconds: float) -> None:
    low, high = bucket_bounds(bucket_of(seconds))
    assert low <= seconds < high
    assert (high - low) / low <= 1 / SUB_BUCKETS


@pytest.mark.parametrize("seconds", [0.0, -1.0, 1e-12, 2.0**MIN_EXPONENT / 2])
def test_times_below_the_range_go_to_the_first_bucket(seconds: float) -> None:
    assert bucket_of(seconds) == 0


@pytest.mark.parametrize("seconds", [2.0**MAX_EXPONENT, 1e9])
def test_times_above_the_range_go_to_the_last_bucket(seconds: float) -> None:
    assert bucket_of(seconds) == LAST


@given(st.lists(times, min_size=1, max_size=400), st.sampled_from([0.5, 0.9, 0.99, 1.0]))
def test_percentiles_are_within_a_sixty_fourth_of_the_sorted_reference(
    values: list[float], fraction: float
) -> None:
    histogram = Histogram()
    for value in values:
        histogram.add(value)
    expected = reference_percentile(values, fraction)
    found = histogram.percentile(fraction)
    assert found is not None
    assert abs(found - expected) <= TOLERANCE * expected


def test_percentiles_of_a_realistic_mix_are_within_two_percent() -> None:
    rng = random.Random(7)
    values = [rng.lognormvariate(math.log(0.004), 0.6) for _ in range(50_000)]
    values += [rng.uniform(1.0, 2.0) for _ in range(600)]  # a slow tail
    histogram = Histogram()
    for value in values:
        histogram.add(value)
    for fraction in (0.5, 0.9, 0.99, 0.999):
        expected = reference_percentile(values, fraction)
        found = histogram.percentile(fraction)
        assert found is not None
        assert abs(found - expected) / expected < 0.02, fraction


def test_an_empty_histogram_has_no_percentile() -> None:
    assert Histogram().percentile(0.5) is None


def test_memory_stays_bounded_whatever_the_count() -> None:
    histogram = Histogram()
    rng = random.Random(1)
    for _ in range(100_000):
        histogram.add(rng.expovariate(10.0))
    assert len(histogram.buckets) <= LAST + 1
    assert histogram.count == 100_000


def test_merging_equals_counting_everything_in_one() -> None:
    rng = random.Random(3)
    parts = [[rng.expovariate(50.0) for _ in range(300)] for _ in range(4)]
    histograms = []
    for part in parts:
        histogram = Histogram()
        for value in part:
            histogram.add(value)
        histograms.append(histogram)
    whole = Histogram()
    for value in (v for part in parts for v in part):
        whole.add(value)
    total = Histogram()
    for histogram in histograms:
        total.merge(histogram)
    assert total.buckets == whole.buckets
    assert total.prometheus == whole.prometheus
    assert total.count == whole.count == 1200
    assert total.total_seconds == pytest.approx(whole.total_seconds)


@given(st.lists(st.floats(min_value=0.0, max_value=20.0), max_size=200))
def test_prometheus_counts_are_exact_cumulative_counts_at_each_bound(values: list[float]) -> None:
    histogram = Histogram()
    for value in values:
        histogram.add(value)
    cumulative = histogram.cumulative_prometheus()
    assert [bound for bound, _ in cumulative] == [*PROMETHEUS_BOUNDS, math.inf]
    for bound, count in cumulative:
        assert count == sum(1 for v in values if v <= bound)


def test_a_time_on_a_prometheus_bound_counts_in_that_bound() -> None:
    histogram = Histogram()
    histogram.add(0.005)
    assert dict(histogram.cumulative_prometheus())[0.005] == 1
    assert dict(histogram.cumulative_prometheus())[0.0025] == 0
