"""Per-revision traffic figures in one-minute buckets, turned over by a controlled clock."""

from __future__ import annotations

import pytest

from wunderproxy.traffic import Traffic, describe_figures, describe_minute

START = 1_800_000_000.0  # a minute boundary (divisible by 60)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock(START + 5.0)


@pytest.fixture
def traffic(clock: Clock) -> Traffic:
    return Traffic(clock=clock)


def test_requests_of_the_running_minute_count_per_revision_and_status(
    traffic: Traffic,
) -> None:
    for _ in range(3):
        traffic.record("rev1", 200, 0.010, 100, 500)
    traffic.record("rev1", 404, 0.002, 90, 150)
    traffic.record("rev2", 200, 0.020, 100, 700)
    totals = traffic.totals()
    assert totals["rev1"].by_status == {200: 3, 404: 1}
    assert totals["rev1"].requests == 4
    assert (totals["rev1"].bytes_in, totals["rev1"].bytes_out) == (390, 1650)
    assert totals["rev2"].by_status == {200: 1}
    minutes = traffic.minutes()
    assert [m.start for m in minutes] == [START]
    assert minutes[-1].by_revision["rev1"].requests == 4


def test_a_new_minute_starts_a_new_bucket_and_the_totals_keep_both(
    traffic: Traffic, clock: Clock
) -> None:
    traffic.record("rev1", 200, 0.010, 1, 1)
    clock.now = START + 61.0
    traffic.record("rev1", 500, 0.010, 1, 1)
    traffic.record("rev1", 500, 0.010, 1, 1)
    minutes = traffic.minutes()
    assert [m.start for m in minutes] == [START, START + 60]
    assert minutes[0].by_revision["rev1"].by_status == {200: 1}
    assert minutes[1].by_revision["rev1"].by_status == {500: 2}
    assert traffic.totals()["rev1"].by_status == {200: 1, 500: 2}


def test_quiet_minutes_are_listed_empty_so_the_time_axis_is_even(
    traffic: Traffic, clock: Clock
) -> None:
    traffic.record("rev1", 200, 0.010, 1, 1)
    clock.now = START + 4 * 60 + 1
    minutes = traffic.minutes()
    assert [m.start for m in minutes] == [START + 60 * i for i in range(5)]
    assert [sum(f.requests for f in m.by_revision.values()) for m in minutes] == [1, 0, 0, 0, 0]


def test_only_the_last_hour_is_kept_but_the_totals_count_everything(
    traffic: Traffic, clock: Clock
) -> None:
    for minute in range(90):
        clock.now = START + 60 * minute + 1
        traffic.record("rev1", 200, 0.001 * (minute + 1), 1, 1)
    minutes = traffic.minutes()
    assert len(minutes) == 60
    assert minutes[0].start == START + 60 * 30
    assert minutes[-1].start == START + 60 * 89
    assert all(m.by_revision["rev1"].requests == 1 for m in minutes)
    assert traffic.totals()["rev1"].requests == 90


def test_a_minute_turns_over_when_asked_even_without_traffic(
    traffic: Traffic, clock: Clock
) -> None:
    traffic.record("rev1", 200, 0.010, 1, 1)
    clock.now = START + 125.0
    minutes = traffic.minutes()
    assert minutes[-1].start == START + 120
    assert minutes[-1].by_revision == {}
    assert traffic.totals()["rev1"].requests == 1


def test_described_figures_give_codes_percentiles_in_ms_and_bytes(traffic: Traffic) -> None:
    for _ in range(98):
        traffic.record("rev1", 200, 0.010, 10, 20)
    traffic.record("rev1", 503, 1.0, 10, 20)
    traffic.record("rev1", 503, 1.0, 10, 20)
    described = describe_figures(traffic.totals()["rev1"])
    assert described["requests"] == 100
    assert described["by_status"] == {"200": 98, "503": 2}
    assert described["latency_ms"]["p50"] == pytest.approx(10.0, rel=1 / 64)
    assert described["latency_ms"]["p99"] == pytest.approx(1000.0, rel=1 / 64)
    assert described["latency_ms"]["mean"] == pytest.approx((98 * 10 + 2000) / 100)
    assert (described["bytes_in"], described["bytes_out"]) == (1000, 2000)


def test_a_described_minute_sums_revisions_by_status_class(traffic: Traffic) -> None:
    traffic.record("rev1", 200, 0.010, 1, 1)
    traffic.record("rev1", 301, 0.010, 1, 1)
    traffic.record("rev2", 404, 0.010, 1, 1)
    traffic.record("rev2", 502, 0.010, 1, 1)
    traffic.record("rev2", 200, 0.010, 1, 1)
    described = describe_minute(traffic.minutes()[-1])
    assert described["start"] == "2027-01-15T08:00:00Z"
    assert described["requests"] == 5
    assert described["by_class"] == {"1xx": 0, "2xx": 2, "3xx": 1, "4xx": 1, "5xx": 1}
    assert described["by_revision"] == {"rev1": 2, "rev2": 3}
