"""The fleet's status table and history table."""

from __future__ import annotations

from typing import Any

from tests.support.fleethosts import NEW, OLD, CallLog, FakeHost
from wunderproxy.client import ClientError
from wunderproxy.fleetview import fleet_status, format_table, history_table
from wunderproxy.hosts import Host

HEADER = "HOST                    INSTANCE  REVISION  CONTAINER  REQUESTS  FALLBACK S/R  DOCKER"


class Reporting(FakeHost):
    """A host whose /status carries figures, and the fallback counters when given."""

    def __init__(self, instance: str, serving: str, fallback: dict[str, Any] | None) -> None:
        super().__init__(CallLog(), instance, serving)
        self.fallback = fallback

    def status(self) -> dict[str, Any]:
        status = super().status()
        status["current"]["container_id"] = f"{self.instance}0123456789abcdef"
        status["requests"] = {"total": 1042}
        status["docker"] = {"state": "ok"}
        if self.fallback is not None:
            status["fallback"] = self.fallback
        return status


def test_one_row_per_host_in_the_order_given_with_fallback_figures_when_present() -> None:
    fallback = {"sent": 3, "received": 7, "by_peer": {"sent": {}, "received": {}}}
    hosts = [Host(Reporting("web-1", OLD, fallback)), Host(Reporting("web-2", OLD, None))]

    fleet = fleet_status(hosts)

    assert fleet.table.splitlines() == [
        HEADER,
        "http://web-1.test:8001  web-1     rev-a     web-1012   1042      3/7           ok",
        "http://web-2.test:8001  web-2     rev-a     web-2012   1042      -             ok",
    ]
    assert fleet.problems == []


def test_hosts_serving_different_revisions_are_a_problem_naming_them() -> None:
    hosts = [
        Host(Reporting("web-1", OLD, None)),
        Host(Reporting("web-2", NEW, None)),
        Host(Reporting("web-3", OLD, None)),
    ]

    fleet = fleet_status(hosts)

    assert fleet.problems == [
        "hosts serve different revisions: rev-a on web-1, web-3; rev-b on web-2"
    ]


def test_a_host_that_cannot_be_reached_is_a_row_saying_so_and_a_problem() -> None:
    down = FakeHost(CallLog(), "web-2")
    down.fail[("status", None)] = ClientError("cannot reach the manager at web-2: refused")
    hosts = [Host(Reporting("web-1", OLD, None)), Host(down)]

    fleet = fleet_status(hosts)

    header, _, unreachable = fleet.table.splitlines()
    assert unreachable == (
        "http://web-2.test:8001  unreachable: cannot reach the manager at web-2: refused"
    )
    assert header == HEADER, "the message must not widen the columns"
    assert fleet.problems == ["not reached: http://web-2.test:8001"]
    assert fleet.documents["http://web-2.test:8001"] == {
        "error": "cannot reach the manager at web-2: refused"
    }
    assert fleet.documents["http://web-1.test:8001"]["current"]["revision"] == "rev-a"


def test_a_host_serving_nothing_shows_none_and_differs_from_one_serving() -> None:
    class Bare(FakeHost):
        def status(self) -> dict[str, Any]:
            return super().status() | {"requests": {"total": 0}, "docker": {"state": "ok"}}

    nothing = Bare(CallLog(), "web-2", serving=None)
    fleet = fleet_status([Host(Reporting("web-1", OLD, None)), Host(nothing)])

    assert "web-2     none      -          0" in fleet.table
    assert fleet.problems == ["hosts serve different revisions: rev-a on web-1; none on web-2"]


def test_json_that_is_not_a_status_is_a_row_saying_so() -> None:
    class Other(FakeHost):
        def status(self) -> dict[str, Any]:
            return {"status": "green"}

    fleet = fleet_status([Host(Other(CallLog(), "web-1"))])

    assert "not a wunderproxy status" in fleet.table
    assert fleet.problems == ["not reached: http://web-1.test:8001"]


def test_history_is_shown_newest_first() -> None:
    entries = [
        {"Revision": "r1", "Hash": OLD, "DeployedAt": "2026-11-24T12:00:00Z", "DeployedBy": "a@x"},
        {"Revision": "r2", "Hash": NEW, "DeployedAt": "2026-11-24T13:00:00Z", "DeployedBy": "b@y"},
    ]

    assert history_table(entries).splitlines() == [
        "DEPLOYED AT           REVISION  HASH                              DEPLOYED BY",
        f"2026-11-24T13:00:00Z  r2        {NEW}  b@y",
        f"2026-11-24T12:00:00Z  r1        {OLD}  a@x",
    ]


def test_a_table_pads_every_column_but_the_last() -> None:
    assert format_table(["A", "BB"], [["xxx", "y"], ["z", "w"]]) == "A    BB\nxxx  y\nz    w"
