"""Finding the fleet's store, and asking every host at once."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.fleethosts import CallLog, FakeHost
from wunderproxy.client import ClientError
from wunderproxy.hosts import FanOut, FleetError, Host, find_store, read_statuses
from wunderproxy.store import FileStore, S3Store


@pytest.fixture
def host() -> Host:
    return Host(FakeHost(CallLog(), "web-1"))


def test_the_store_given_is_used_without_asking_any_host(tmp_path: Path) -> None:
    log = CallLog()
    store = find_store(f"file://{tmp_path}", "/apps/myapp/", [Host(FakeHost(log, "web-1"))])

    assert isinstance(store, FileStore)
    assert store.root == tmp_path / "apps" / "myapp"
    assert log.calls == []


def test_an_s3_bucket_given_is_an_s3_store() -> None:
    store = find_store("my-bucket", "apps/myapp", [])

    assert isinstance(store, S3Store)
    assert store.description == "s3://my-bucket/apps/myapp"


def test_without_a_store_the_first_host_names_it(host: Host) -> None:
    store = find_store(None, None, [host, Host(FakeHost(CallLog(), "web-2"))])

    assert store.description == "file:///srv/store/apps/myapp"


@pytest.mark.parametrize(
    ("store", "prefix", "says"),
    [("my-bucket", None, "needs --prefix"), (None, "apps/myapp", "needs --store")],
)
def test_a_store_or_prefix_alone_is_refused_naming_the_other(
    host: Host, store: str | None, prefix: str | None, says: str
) -> None:
    with pytest.raises(FleetError, match=says):
        find_store(store, prefix, [host])


def test_without_a_store_nor_hosts_the_error_says_what_to_give() -> None:
    with pytest.raises(FleetError, match=r"give --store BUCKET.*or --host"):
        find_store(None, None, [])


def test_a_host_that_cannot_be_reached_for_its_store_is_named(host: Host) -> None:
    assert isinstance(host.client, FakeHost)
    host.client.fail[("status", None)] = ClientError("cannot reach the manager at web-1")

    with pytest.raises(
        FleetError, match=re.escape("cannot ask http://web-1.test:8001 for its store: ")
    ):
        find_store(None, None, [host])


def test_a_host_whose_status_names_no_store_says_to_give_one() -> None:
    class Older(FakeHost):
        def status(self) -> dict[str, Any]:
            return {"app": "myapp", "current": None}

    with pytest.raises(FleetError, match=r"names no store .* give --store"):
        find_store(None, None, [Host(Older(CallLog(), "web-1"))])


def test_a_file_url_without_a_directory_is_refused() -> None:
    with pytest.raises(FleetError, match="file:// needs a directory"):
        find_store("file://", "p", [])


def test_calls_to_every_host_run_at_once() -> None:
    hosts = [Host(FakeHost(CallLog(), f"web-{n}")) for n in range(4)]
    all_in = threading.Barrier(len(hosts), timeout=5)

    def call(host: Host) -> str:
        all_in.wait()  # breaks (and fails the call) unless all four run together
        return host.client.url

    outcomes = FanOut(hosts, call).all()

    assert sorted(o.value or "" for o in outcomes) == sorted(h.client.url for h in hosts)
    assert all(o.error is None for o in outcomes)


def test_a_call_that_fails_unexpectedly_is_an_error_of_its_host_not_a_hang() -> None:
    host = Host(FakeHost(CallLog(), "web-1"))

    def broken(_: Host) -> str:
        raise KeyError("current")

    [outcome] = FanOut([host], broken).all()

    assert str(outcome.error) == "unexpected KeyError: 'current'"


def test_next_gives_up_after_its_timeout_while_a_host_is_slow() -> None:
    release = threading.Event()
    fan = FanOut([Host(FakeHost(CallLog(), "web-1"))], lambda _: release.wait(5))

    started = time.monotonic()
    assert fan.next(timeout=0.05) is None
    assert time.monotonic() - started < 2
    release.set()
    assert [o.value for o in fan.all()] == [True]


def test_statuses_come_back_in_the_order_the_hosts_were_given() -> None:
    hosts = [Host(FakeHost(CallLog(), f"web-{n}")) for n in range(5)]

    assert [o.host for o in read_statuses(hosts)] == hosts
