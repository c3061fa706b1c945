"""Zero failed requests: under steady load through deploys and a hitless restart of
wunderproxy itself, with the real Docker engine, registry and S3 server."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest

from tests.support.configs import PREFIX, app_config, upload_launch_config
from tests.support.docker import AppImages, containers_of
from tests.support.load import LoadGenerator, Outcome, assert_no_failures, revision_of
from tests.support.process import wunderproxy
from wunderproxy.store import S3Store

pytestmark = pytest.mark.e2e

SWITCHES = 20
ROUTE_SLACK = 0.25  # seconds from a client starting a request to the proxy routing it


@dataclass(frozen=True)
class Switch:
    """One switch: when it was asked for, when it was answered, and to what."""

    sent: float
    answered: float
    revision: str


def serving_when(outcome: Outcome, switches: list[Switch], first: str) -> str | None:
    """The revision that must have answered ``outcome``; None when either may have.

    The proxy routes a request when its head arrives: after the client started it, and
    (on loopback) well within ROUTE_SLACK. If a switch may have happened in that window,
    either revision is right; otherwise only the one serving then.
    """
    routed_by = min(outcome.finished, outcome.started + ROUTE_SLACK)
    serving = first
    for switch in switches:
        if routed_by < switch.sent:
            return serving
        if outcome.started < switch.answered:
            return None
        serving = switch.revision
    return serving


def wait_until_only(
    client: docker.DockerClient, app: str, count: int, timeout: float = 30.0
) -> None:
    deadline = time.monotonic() + timeout
    while len(containers_of(client, app)) != count:
        assert time.monotonic() < deadline, f"containers left: {containers_of(client, app)}"
        time.sleep(0.2)


@pytest.mark.parametrize("workers", [1, 2])
def test_twenty_switches_under_load_fail_no_request_and_route_each_to_the_right_revision(
    workers: int,
    s3_bucket: str,
    app_name: str,
    app_images: AppImages,
    docker_client: docker.DockerClient,
    tmp_path: Path,
) -> None:
    store = S3Store(s3_bucket, PREFIX)
    hashes = {
        "rev1": upload_launch_config(store, app_config(app_images, "rev1"), current=True),
        "rev2": upload_launch_config(store, app_config(app_images, "rev2")),
    }
    with wunderproxy(
        tmp_path,
        s3_bucket,
        PREFIX,
        app_name,
        app_images.registry_port,
        "--drain-timeout",
        "10",
        workers=workers,
    ) as running:
        running.wait_until_serving("rev1")
        switches: list[Switch] = []
        with LoadGenerator(running.proxy_port, max_seconds=180) as load:
            time.sleep(1.0)
            for number in range(SWITCHES):
                target = "rev2" if number % 2 == 0 else "rev1"
                launched = running.launch(hashes[target])
                assert launched.status == 200, launched.text
                sent = time.monotonic()
                switched = running.switch(hashes[target])
                switches.append(Switch(sent, time.monotonic(), target))
                assert switched.status == 200, switched.text
                time.sleep(0.4)
            time.sleep(2.5)  # let the last long requests finish
            outcomes = load.stop()
        assert_no_failures(outcomes)
        assert len(outcomes) > 200, "too little load to prove anything"
        for kind in ("keep-alive", "new-connection", "slow", "post"):
            assert any(o.kind == kind for o in outcomes), f"no {kind} requests were sent"
        spanning = 0
        for outcome in outcomes:
            revision = revision_of(outcome)
            assert revision in ("rev1", "rev2")
            expected = serving_when(outcome, switches, "rev1")
            if expected is not None:
                near = [s for s in switches if abs(s.sent - outcome.started) < 2]
                assert revision == expected, (outcome, expected, near)
            if expected is not None and any(
                outcome.started < s.sent and outcome.finished > s.answered for s in switches
            ):
                spanning += 1  # a long request that began before a switch and ended after
        assert spanning >= SWITCHES // 2, "long requests must have run across switches"
        status = running.status()
        assert status["current"]["revision"] == "rev1"
        assert status["requests"]["by_status"].keys() == {"200"}
        wait_until_only(docker_client, app_name, 1)


# Worker processes of the running tree, then of its successor: the same, more, and fewer.
@pytest.mark.parametrize(("old_workers", "new_workers"), [(1, 1), (2, 2), (1, 2), (2, 1)])
def test_hitless_restart_of_wunderproxy_under_load_fails_no_request(
    old_workers: int,
    new_workers: int,
    s3_bucket: str,
    app_name: str,
    app_images: AppImages,
    docker_client: docker.DockerClient,
    tmp_path: Path,
) -> None:
    store = S3Store(s3_bucket, PREFIX)
    upload_launch_config(store, app_config(app_images, "rev1"), current=True)
    pid_file = tmp_path / "wunderproxy.pid"
    port = app_images.registry_port
    with wunderproxy(
        tmp_path,
        s3_bucket,
        PREFIX,
        app_name,
        port,
        "--pid-file",
        str(pid_file),
        workers=old_workers,
    ) as old:
        old.wait_until_serving("rev1")
        [container] = containers_of(docker_client, app_name)
        with LoadGenerator(old.proxy_port, max_seconds=120) as load:
            time.sleep(1.5)
            before = load.count()
            with wunderproxy(
                tmp_path,
                s3_bucket,
                PREFIX,
                app_name,
                port,
                "--pid-file",
                str(pid_file),
                "--take-over",
                ports=(old.proxy_port, old.api_port),
                workers=new_workers,
            ) as new:
                assert old.process.wait(30) == 0, old.log()
                time.sleep(1.5)
                outcomes = load.stop()
                assert new.status()["current"]["container_id"] == container.id
                assert pid_file.read_text().strip() == str(new.process.pid)
        assert_no_failures(outcomes)
        assert len(outcomes) > before > 0
        assert "adopted running container" in new.log()
    assert [c.id for c in containers_of(docker_client, app_name)] == [container.id]
