"""A fleet on one Docker engine: three wunderproxies (distinct ``--instance``), each with its
own registry, all registries storing in one S3 bucket on moto's server over HTTP, one store.

The image of a revision is pushed once, through web-1's registry; every host pulls it from
its own registry. Nothing here depends on peer fallback.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import docker
import docker.errors
import pytest

from tests.support.fleet import Fleet, FleetHost, running_fleet
from tests.support.process import revision_served
from tests.support.registry import registry_answers
from tests.support.s3 import s3_client
from wunderproxy.engine import LABEL_INSTANCE, LABEL_REVISION

pytestmark = pytest.mark.e2e

WRITES = {"PUT", "POST", "PATCH", "DELETE"}  # what a push sends a registry; a pull sends none


def running_ids(fleet: Fleet, host: FleetHost) -> list[str]:
    return sorted(str(c.id) for c in fleet.containers(host) if c.status == "running")


def wait_for(condition: Callable[[], bool], what: str, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {within} s"
        time.sleep(0.1)


def test_an_image_pushed_once_is_pulled_by_every_host_from_its_own_registry(
    fleet: Fleet, s3_server: str
) -> None:
    fleet.serve("rev1")

    manifest = f"/v2/{fleet.app}/manifests/rev1"
    for host in fleet.hosts:
        (container,) = fleet.containers(host)
        assert container.attrs["Config"]["Image"] == fleet.image(host, "rev1")
        assert revision_served(host.process) == "revision=rev1"
        # The engine asks for the tag's manifest (HEAD, or GET), then fetches it by digest.
        asked = [(path, status) for m, path, status in host.registry.requests() if m != "PUT"]
        assert (manifest, 200) in asked, f"{host.instance} did not pull from its registry"
    first, *others = fleet.hosts
    assert ("PUT", manifest, 201) in first.registry.requests()
    for host in others:
        writes = [r for r in host.registry.requests() if r[0] in WRITES]
        assert writes == [], f"{host.instance}'s registry was written to: {writes}"
    # The one copy: in the artifacts bucket, not in any registry's own directory.
    tag = f"docker/registry/v2/repositories/{fleet.app}/_manifests/tags/rev1/current/link"
    s3_client(s3_server).head_object(Bucket=fleet.artifacts_bucket, Key=tag)
    assert not any((host.registry.root / "data").exists() for host in fleet.hosts)


# A stale running container is removed after the drain timeout: 1 s lets the test see it go.
@pytest.mark.fleet(extra=("--drain-timeout", "1"))
def test_a_restarted_host_adopts_its_own_container_and_leaves_the_others_serving(
    fleet: Fleet,
) -> None:
    fleet.serve("rev1")
    serving = {host.instance: running_ids(fleet, host) for host in fleet.hosts}
    web2 = fleet.host("web-2")
    # A launched, never switched rev2 on web-2: stale for web-2 once it restarts.
    assert web2.process.launch(fleet.hashes["rev2"]).status == 200
    assert len(running_ids(fleet, web2)) == 2

    fleet.restart(web2)

    web2.process.wait_until_serving("rev1")
    assert [web2.process.status()["current"]["container_id"]] == serving["web-2"]
    assert "adopted running container" in web2.process.log()
    wait_for(lambda: running_ids(fleet, web2) == serving["web-2"], "web-2's stale rev2 removed")
    for host in fleet.hosts:
        assert running_ids(fleet, host) == serving[host.instance], host.instance
        assert revision_served(host.process) == "revision=rev1"


@pytest.mark.fleet(extra=("--drain-timeout", "1"))
def test_a_switch_on_one_host_drains_and_removes_only_that_hosts_old_container(
    fleet: Fleet,
) -> None:
    fleet.serve("rev1")
    serving = {host.instance: running_ids(fleet, host) for host in fleet.hosts}
    web1 = fleet.host("web-1")

    assert web1.process.launch(fleet.hashes["rev2"]).status == 200
    switched = web1.process.switch(fleet.hashes["rev2"])
    assert switched.status == 200, switched.text

    def web1_runs_only_rev2() -> bool:
        return [c.labels[LABEL_REVISION] for c in fleet.containers(web1)] == ["rev2"]

    wait_for(web1_runs_only_rev2, "web-1's rev1 container drained and removed")
    assert revision_served(web1.process) == "revision=rev2"
    for host in fleet.hosts[1:]:
        assert running_ids(fleet, host) == serving[host.instance], host.instance
        (container,) = fleet.containers(host)
        assert container.labels[LABEL_INSTANCE] == host.instance
        assert revision_served(host.process) == "revision=rev1"


def test_a_stopped_registry_fails_only_its_hosts_launch_with_a_502_naming_it(
    fleet: Fleet,
) -> None:
    web2 = fleet.host("web-2")
    web2.registry.stop()

    answers = fleet.launch_all(fleet.hashes["rev1"])

    assert answers["web-2"].status == 502, answers["web-2"].text
    error = answers["web-2"].json()["error"]
    assert f"registry at {web2.registry.address} is unreachable" in error
    assert fleet.image(web2, "rev1") in error
    assert fleet.containers(web2) == []
    for host in fleet.hosts:
        if host is not web2:
            assert answers[host.instance].status == 200, answers[host.instance].text
    # Its registry back, the same launch goes through.
    web2.registry.start()
    retried = web2.process.launch(fleet.hashes["rev1"])
    assert retried.status == 200, retried.text


def test_a_fleet_leaves_nothing_behind_when_the_code_using_it_fails(
    tmp_path: Path,
    s3_server: str,
    docker_client: docker.DockerClient,
    app_name: str,
    test_labels: dict[str, str],
) -> None:
    class Failed(Exception):
        pass

    endpoint_before = os.environ.get("AWS_ENDPOINT_URL")
    with (
        pytest.raises(Failed),
        running_fleet(
            tmp_path, s3_server, docker_client, app_name, test_labels, size=2, revisions=["rev1"]
        ) as fleet,
    ):
        fleet.serve("rev1")
        processes = [host.process.process for host in fleet.hosts]
        images = {c.attrs["Image"] for host in fleet.hosts for c in fleet.containers(host)}
        assert len(images) == 1, "both hosts run the one image pushed"
        raise Failed

    assert [process.poll() for process in processes] == [0, 0]
    assert not any(registry_answers(host.registry_port) for host in fleet.hosts)
    assert [fleet.containers(host) for host in fleet.hosts] == [[], []]
    with pytest.raises(docker.errors.ImageNotFound):
        docker_client.images.get(images.pop())
    assert docker_client.images.list(filters={"label": fleet.image_label}) == []
    assert os.environ.get("AWS_ENDPOINT_URL") == endpoint_before
    listed = {bucket["Name"] for bucket in s3_client(s3_server).list_buckets()["Buckets"]}
    assert listed.isdisjoint({fleet.store_bucket, fleet.artifacts_bucket})
