"""What the proxy served, per revision: since start, and minute by minute for the last hour.

The forwarder calls :meth:`Traffic.record` once per answered request. Counting each request
into its figures at once cost about 5 µs there, five times what the same code costs in a
tight loop: between two requests the proxy's other work evicts the dozen objects it touches
from the CPU caches. So a request is only appended to a list, and the list is counted in
batches of ``BATCH`` (or when the minute turns, or somebody asks), while those objects stay
in cache. Everything else (sums over revisions, percentiles, the hour's series) is computed
when somebody asks: ``/status``, the status page or ``/metrics``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from wunderproxy.histogram import Histogram
from wunderproxy.timestamps import rfc3339

MINUTES_KEPT = 60
BATCH = 256  # requests recorded before they are counted into the figures
# Stands for "no container": answers the proxy gave itself before any was deployed.
NO_REVISION = "-"


class Figures:
    """Requests, status codes, response times and bytes of one revision over some time."""

    __slots__ = ("by_status", "bytes_in", "bytes_out", "latency")

    def __init__(self) -> None:
        self.by_status: dict[int, int] = {}
        self.latency = Histogram()
        self.bytes_in = 0
        self.bytes_out = 0

    @property
    def requests(self) -> int:
        return self.latency.count

    def add(self, status: int, seconds: float, bytes_in: int, bytes_out: int) -> None:
        """Count one answered request."""
        by_status = self.by_status
        by_status[status] = by_status.get(status, 0) + 1
        self.latency.add(seconds)
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out

    def merge(self, other: Figures) -> None:
        """Add everything counted in ``other``."""
        for status, n in other.by_status.items():
            self.by_status[status] = self.by_status.get(status, 0) + n
        self.latency.merge(other.latency)
        self.bytes_in += other.bytes_in
        self.bytes_out += other.bytes_out


def merged(figures: Iterable[Figures]) -> Figures:
    """The sum of ``figures``."""
    total = Figures()
    for part in figures:
        total.merge(part)
    return total


@dataclass(frozen=True)
class Minute:
    """One minute of traffic: its start (Unix time) and the figures of each revision."""

    start: float
    by_revision: dict[str, Figures]


class Traffic:
    """Per-revision figures since start, and in one-minute buckets for the last hour.

    ``clock`` gives Unix time; tests pass their own to turn minutes over.
    """

    def __init__(
        self, clock: Callable[[], float] = time.time, minutes_kept: int = MINUTES_KEPT
    ) -> None:
        self._clock = clock
        self._minutes_kept = minutes_kept
        self._past: deque[Minute] = deque(maxlen=minutes_kept - 1)
        # Finished minutes folded in; the running minute is added when asked.
        self._before_this_minute: dict[str, Figures] = {}
        self._minute = self._first_minute = self._minute_of(clock())
        self._this_minute: dict[str, Figures] = {}
        self._uncounted: list[tuple[str, int, float, int, int]] = []

    def record(
        self, revision: str, status: int, seconds: float, bytes_in: int, bytes_out: int
    ) -> None:
        """Count one answered request of ``revision`` (in the running minute)."""
        if self._clock() >= self._minute + 60.0:
            self._turn_minute()
        uncounted = self._uncounted
        uncounted.append((revision, status, seconds, bytes_in, bytes_out))
        if len(uncounted) >= BATCH:
            self._count()

    def _count(self) -> None:
        """Count the recorded requests into the running minute's figures."""
        this_minute = self._this_minute
        for revision, status, seconds, bytes_in, bytes_out in self._uncounted:
            figures = this_minute.get(revision)
            if figures is None:
                figures = this_minute[revision] = Figures()
            figures.add(status, seconds, bytes_in, bytes_out)
        self._uncounted.clear()

    def totals(self) -> dict[str, Figures]:
        """Per revision, everything since start."""
        self._turn_minute_if_due()
        revisions = self._before_this_minute.keys() | self._this_minute.keys()
        return {
            revision: merged(
                part[revision]
                for part in (self._before_this_minute, self._this_minute)
                if revision in part
            )
            for revision in sorted(revisions)
        }

    def minutes(self) -> list[Minute]:
        """The last hour (since start, if that is less), oldest first, the running minute
        last; minutes with no traffic are there too, empty, so that a time axis is even."""
        self._turn_minute_if_due()
        known = {minute.start: minute for minute in self._past}
        first = max(self._first_minute, self._minute - 60.0 * (self._minutes_kept - 1))
        count = round((self._minute - first) / 60.0)
        result = [known.get(first + 60.0 * i) or Minute(first + 60.0 * i, {}) for i in range(count)]
        result.append(Minute(self._minute, self._this_minute))
        return result

    def _turn_minute_if_due(self) -> None:
        if self._clock() >= self._minute + 60.0:
            self._turn_minute()
        else:
            self._count()

    def _turn_minute(self) -> None:
        """Close the running minute (keeping it in the hour and the totals), start a new one."""
        self._count()
        finished = Minute(self._minute, self._this_minute)
        if finished.by_revision:
            self._past.append(finished)
        for revision, figures in finished.by_revision.items():
            self._before_this_minute.setdefault(revision, Figures()).merge(figures)
        self._minute = self._minute_of(self._clock())
        self._this_minute = {}
        cutoff = self._minute - 60.0 * (self._minutes_kept - 1)
        while self._past and self._past[0].start < cutoff:
            self._past.popleft()

    @staticmethod
    def _minute_of(moment: float) -> float:
        return moment - moment % 60.0


class SummedTraffic(Traffic):
    """Figures added up elsewhere (a process tree's workers: see treefigures.py), shown
    as :class:`Traffic` shows its own; nothing is recorded into it."""

    def __init__(self, totals: dict[str, Figures], minutes: list[Minute]) -> None:
        super().__init__()
        self._totals = totals
        self._minutes = minutes

    def totals(self) -> dict[str, Figures]:
        return self._totals

    def minutes(self) -> list[Minute]:
        return self._minutes


def describe_figures(figures: Figures) -> dict[str, Any]:
    """Figures as ``/status`` shows them; response times in milliseconds."""
    return {
        "requests": figures.requests,
        "by_status": {str(code): n for code, n in sorted(figures.by_status.items())},
        "latency_ms": _percentiles_ms(figures.latency),
        "bytes_in": figures.bytes_in,
        "bytes_out": figures.bytes_out,
    }


def describe_minute(minute: Minute) -> dict[str, Any]:
    """One minute of the hour's series: all revisions together, requests per revision."""
    total = merged(minute.by_revision.values())
    by_class: dict[str, int] = {"1xx": 0, "2xx": 0, "3xx": 0, "4xx": 0, "5xx": 0}
    for code, n in total.by_status.items():
        key = f"{code // 100}xx"
        by_class[key] = by_class.get(key, 0) + n
    return {
        "start": rfc3339(datetime.fromtimestamp(minute.start, UTC)),
        "requests": total.requests,
        "by_class": by_class,
        "latency_ms": _percentiles_ms(total.latency),
        "bytes_in": total.bytes_in,
        "bytes_out": total.bytes_out,
        "by_revision": {rev: f.requests for rev, f in sorted(minute.by_revision.items())},
    }


def _percentiles_ms(histogram: Histogram) -> dict[str, float | None]:
    result: dict[str, float | None] = {}
    for name, fraction in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        value = histogram.percentile(fraction)
        result[name] = None if value is None else round(value * 1000, 3)
    mean = histogram.total_seconds / histogram.count if histogram.count else None
    result["mean"] = None if mean is None else round(mean * 1000, 3)
    return result
