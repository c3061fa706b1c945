"""Response times in fixed log-scale buckets: percentiles within 1.6 % at constant memory.

A time ``t = m * 2**e`` (``0.5 <= m < 1``, from :func:`math.frexp`) falls in one of
``SUB_BUCKETS`` equal slices of its power of two, so every bucket is at most 1/32 of its
lower bound wide, and reporting a bucket's middle is off by at most half of that. Times
below ``2**MIN_EXPONENT`` s (about 1 µs) or above ``2**MAX_EXPONENT`` s (68 min) are kept in
the first or last bucket. Only buckets that were hit are stored: a minute of traffic
typically touches a few dozen of the 1,024 possible.

Prometheus wants cumulative counts at fixed bounds that are rarely a bucket edge here, so
each histogram also counts times per Prometheus bound (``PROMETHEUS_BOUNDS``), exactly.
"""

from __future__ import annotations

import math
from bisect import bisect_left

SUB_BUCKETS = 32
MIN_EXPONENT = -20
MAX_EXPONENT = 12
_LAST = (MAX_EXPONENT - MIN_EXPONENT) * SUB_BUCKETS - 1

# prometheus-client's default bounds (seconds), with 1 ms and 2.5 ms added below them:
# answers of a fast app take less than the default's first bound of 5 ms.
PROMETHEUS_BOUNDS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
)


def bucket_of(seconds: float) -> int:
    """The index of the bucket that holds ``seconds``."""
    mantissa, exponent = math.frexp(seconds)
    if exponent <= MIN_EXPONENT or seconds <= 0.0:
        return 0
    index = (exponent - MIN_EXPONENT - 1) * SUB_BUCKETS + int((mantissa - 0.5) * 2 * SUB_BUCKETS)
    return index if index < _LAST else _LAST


def bucket_bounds(index: int) -> tuple[float, float]:
    """The lowest and highest time (seconds) kept in bucket ``index``."""
    octave, slot = divmod(index, SUB_BUCKETS)
    scale = math.ldexp(1.0, octave + MIN_EXPONENT)
    return scale * (1 + slot / SUB_BUCKETS), scale * (1 + (slot + 1) / SUB_BUCKETS)


class Histogram:
    """Counts of response times; mergeable, so minutes and revisions add up."""

    __slots__ = ("buckets", "count", "prometheus", "total_seconds")

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.prometheus = [0] * (len(PROMETHEUS_BOUNDS) + 1)  # the last: above every bound
        self.count = 0
        self.total_seconds = 0.0

    def add(self, seconds: float) -> None:
        """Count one response time."""
        index = bucket_of(seconds)
        buckets = self.buckets
        buckets[index] = buckets.get(index, 0) + 1
        self.prometheus[bisect_left(PROMETHEUS_BOUNDS, seconds)] += 1
        self.count += 1
        self.total_seconds += seconds

    def merge(self, other: Histogram) -> None:
        """Add every count of ``other`` to this one."""
        buckets = self.buckets
        for index, n in other.buckets.items():
            buckets[index] = buckets.get(index, 0) + n
        self.prometheus = [a + b for a, b in zip(self.prometheus, other.prometheus, strict=True)]
        self.count += other.count
        self.total_seconds += other.total_seconds

    def percentile(self, fraction: float) -> float | None:
        """The time below which ``fraction`` (0 to 1) of the counted ones fall; None if empty.

        It is the middle of the bucket holding the ``ceil(fraction * count)``-th smallest
        time, so within 1/64 of that time (relative), except where it was clamped.
        """
        if self.count == 0:
            return None
        rank = max(1, math.ceil(fraction * self.count))
        seen = 0
        for index in sorted(self.buckets):
            seen += self.buckets[index]
            if seen >= rank:
                low, high = bucket_bounds(index)
                return (low + high) / 2
        raise AssertionError("bucket counts do not add up to count")

    def cumulative_prometheus(self) -> list[tuple[float, int]]:
        """``(bound, times <= bound)`` for every Prometheus bound, then ``(inf, count)``."""
        result = []
        seen = 0
        for bound, n in zip((*PROMETHEUS_BOUNDS, math.inf), self.prometheus, strict=True):
            seen += n
            result.append((bound, seen))
        return result
