"""The fleet's client commands end to end: ``python -m wunderproxy upload|deploy|rollback|
history|status`` as subprocesses, against two real wunderproxy processes (distinct
``--instance``, one app, one store on moto's S3 server over HTTP) on the real Docker engine,
pulling from real registries."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import docker
import pytest

from tests.support.apps import push_app_image
from tests.support.configs import app_config
from tests.support.docker import AppImages, containers_of, free_port
from tests.support.process import WunderproxyProcess, revision_served, run_cli, wunderproxy
from tests.support.registry import start_registry, stop_process
from tests.support.waiting import wait_until
from wunderproxy.client import deployer
from wunderproxy.deploylock import DeployLock
from wunderproxy.engine import LABEL_INSTANCE, LABEL_REVISION
from wunderproxy.store import S3Store

pytestmark = pytest.mark.e2e

PREFIX = "fleet/testapp"
INSTANCES = ("e2e-web-1", "e2e-web-2")


@contextmanager
def two_hosts(
    tmp_path: Path, bucket: str, app: str, registry_ports: tuple[int, int]
) -> Iterator[list[WunderproxyProcess]]:
    """Two wunderproxies of ``app`` on this engine, one store, each with its registry."""
    with ExitStack() as stack:
        yield [
            stack.enter_context(
                wunderproxy(tmp_path, bucket, PREFIX, app, port, "--instance", instance)
            )
            for instance, port in zip(INSTANCES, registry_ports, strict=True)
        ]


def upload_file(tmp_path: Path, bucket: str, config: dict[str, Any]) -> str:
    """``wunderproxy upload`` of ``config``; the hash it prints."""
    path = tmp_path / f"{config['Revision']}.json"
    path.write_text(json.dumps(config))
    uploaded = run_cli("upload", str(path), "--store", bucket, "--prefix", PREFIX)
    assert uploaded.returncode == 0, uploaded.stderr
    return uploaded.stdout.strip()


def hosts(running: list[WunderproxyProcess]) -> list[str]:
    return [arg for host in running for arg in ("--host", host.api_url)]


def running_revisions(client: docker.DockerClient, app: str) -> dict[str, set[str]]:
    """Instance -> the revisions of its running containers."""
    found: dict[str, set[str]] = {}
    for container in containers_of(client, app):
        if container.status == "running":
            instance = container.labels[LABEL_INSTANCE]
            found.setdefault(instance, set()).add(container.labels[LABEL_REVISION])
    return found


def test_deploy_rollback_history_and_status_across_two_hosts(
    s3_bucket: str,
    app_name: str,
    app_images: AppImages,
    docker_client: docker.DockerClient,
    tmp_path: Path,
) -> None:
    rev1 = upload_file(tmp_path, s3_bucket, app_config(app_images, "rev1"))
    rev2 = upload_file(tmp_path, s3_bucket, app_config(app_images, "rev2"))
    ports = (app_images.registry_port, app_images.registry_port)
    with two_hosts(tmp_path, s3_bucket, app_name, ports) as running:
        # Neither --store nor --prefix: the first host names its store in /status.
        first = run_cli("deploy", rev1, *hosts(running))
        assert first.returncode == 0, first.stderr
        second = run_cli("deploy", rev2, *hosts(running))
        assert second.returncode == 0, second.stderr

        assert second.stdout.startswith(f"deployed revision rev2 ({rev2}) to 2 hosts: ")
        for host, instance in zip(running, INSTANCES, strict=True):
            assert revision_served(host) == "revision=rev2"
            name = f"{instance} ({host.api_url})"
            assert f"{name}: launching {rev2}, waiting until it is healthy" in second.stderr
            assert f"{name}: healthy: container " in second.stderr
            assert f"{name}: switched proxy to port " in second.stderr
        assert "took deploy.lock in s3://" in second.stderr

        history = run_cli("history", *hosts(running))
        assert history.returncode == 0, history.stderr
        _, newest, oldest = history.stdout.splitlines()
        assert newest.split()[1:] == ["rev2", rev2, deployer()]
        assert oldest.split()[1:] == ["rev1", rev1, deployer()]

        status = run_cli("status", *hosts(running))
        assert status.returncode == 0, status.stdout + status.stderr
        rows = status.stdout.splitlines()
        assert len(rows) == 3, status.stdout
        for row, instance in zip(rows[1:], INSTANCES, strict=True):
            assert row.split()[1:3] == [instance, "rev2"]

        rollback = run_cli("rollback", *hosts(running))
        assert rollback.returncode == 0, rollback.stderr
        assert f"rolling back to revision rev1 ({rev1})" in rollback.stderr
        assert [revision_served(host) for host in running] == ["revision=rev1"] * 2
        after = run_cli("history", "--store", s3_bucket, "--prefix", PREFIX)
        assert after.stdout.splitlines()[1].split()[1:3] == ["rev1", rev1]

        # Each host drains and removes only its own old container.
        wait_until(
            lambda: (
                running_revisions(docker_client, app_name)
                == {instance: {"rev1"} for instance in INSTANCES}
            ),
            "each host runs rev1 alone",
        )

        mixed = running[1].api("POST", "/launch", rev2)
        assert mixed.status == 200
        assert running[1].switch(rev2).status == 200
        table = run_cli("status", *hosts(running))
        assert table.returncode == 1
        mixed_revisions = (
            f"hosts serve different revisions: rev1 on {INSTANCES[0]}; rev2 on {INSTANCES[1]}"
        )
        assert mixed_revisions in table.stdout
        as_json = run_cli("status", "--json", *hosts(running))
        assert as_json.returncode == 1
        documents = json.loads(as_json.stdout)
        assert [documents[host.api_url]["current"]["revision"] for host in running] == [
            "rev1",
            "rev2",
        ]
        assert mixed_revisions in as_json.stderr


def test_a_deploy_while_another_holds_the_lock_is_refused_naming_the_holder(
    s3_bucket: str, app_name: str, app_images: AppImages, tmp_path: Path
) -> None:
    rev1 = upload_file(tmp_path, s3_bucket, app_config(app_images, "rev1"))
    store = S3Store(s3_bucket, PREFIX)
    DeployLock(store, "alice@deploy-1").acquire()
    ports = (app_images.registry_port, app_images.registry_port)
    with two_hosts(tmp_path, s3_bucket, app_name, ports) as running:
        refused = run_cli("deploy", rev1, *hosts(running))

        assert refused.returncode == 1
        assert f"deploy.lock in s3://{s3_bucket}/{PREFIX} is held by alice@deploy-1" in (
            refused.stderr
        )
        assert [host.status()["current"] for host in running] == [None, None]

        forced = run_cli("deploy", rev1, "--force", *hosts(running))
        assert forced.returncode == 0, forced.stderr
        assert "broke deploy.lock" in forced.stderr
        assert store.get("deploy.lock") is None


@pytest.fixture
def second_registry(tmp_path: Path) -> Iterator[int]:
    """A registry of its own for the second host, which holds none of the app's images."""
    port = free_port()
    process = start_registry(tmp_path / "registry-2", port)
    try:
        yield port
    finally:
        stop_process(process)


def test_a_launch_failing_on_one_host_switches_no_host_and_removes_the_new_container(
    s3_bucket: str,
    app_name: str,
    app_images: AppImages,
    docker_client: docker.DockerClient,
    test_labels: dict[str, str],
    second_registry: int,
    tmp_path: Path,
) -> None:
    # rev1 names its image, in the session's registry: both hosts pull it. "v2" names none,
    # so each host pulls localhost:ITS_REGISTRY/APP:v2, pushed to the first host's only.
    rev1 = upload_file(tmp_path, s3_bucket, app_config(app_images, "rev1"))
    v2_image = f"localhost:{app_images.registry_port}/{app_name}:v2"
    push_app_image(docker_client, v2_image, test_labels, revision="v2")
    v2 = upload_file(
        tmp_path,
        s3_bucket,
        {"Revision": "v2", "HealthCheckPath": "/health", "HostConfig": {"Init": True}},
    )
    ports = (app_images.registry_port, second_registry)
    with two_hosts(tmp_path, s3_bucket, app_name, ports) as running:
        assert run_cli("deploy", rev1, *hosts(running)).returncode == 0

        failed = run_cli("deploy", v2, *hosts(running))

        assert failed.returncode == 1
        second = f"{INSTANCES[1]} ({running[1].api_url})"
        assert f"launch of {v2} failed on 1 of 2 hosts; nothing was switched anywhere" in (
            failed.stderr
        )
        assert f"  {second}: 502: " in failed.stderr
        assert f"localhost:{second_registry}/{app_name}:v2" in failed.stderr
        # The first host's launch was cancelled while it waited, or its container removed
        # if it was healthy by then: either way nothing of v2 is left there.
        first = f"{INSTANCES[0]} ({running[0].api_url})"
        assert f"{first}: aborted {v2}: " in failed.stderr
        assert [revision_served(host) for host in running] == ["revision=rev1"] * 2
        assert running_revisions(docker_client, app_name) == {
            instance: {"rev1"} for instance in INSTANCES
        }, "the container launched on the first host must be gone"
        assert S3Store(s3_bucket, PREFIX).get("deploy.lock") is None


def test_ctrl_c_during_the_launches_aborts_them_releases_the_lock_and_exits_130(
    s3_bucket: str,
    app_name: str,
    app_images: AppImages,
    docker_client: docker.DockerClient,
    tmp_path: Path,
) -> None:
    slow = app_config(app_images, "rev2")
    # Listens only after 60 s: the launches are still waiting when Ctrl-C comes.
    slow["ContainerConfig"]["Cmd"] = ["sh", "-c", "sleep 60; exec busybox httpd -f -p 9292"]
    slow_hash = upload_file(tmp_path, s3_bucket, slow)
    ports = (app_images.registry_port, app_images.registry_port)
    with two_hosts(tmp_path, s3_bucket, app_name, ports) as running:
        deploy = subprocess.Popen(
            [sys.executable, "-m", "wunderproxy", "deploy", slow_hash, *hosts(running)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_until(
                lambda: (
                    all(
                        "rev2" in revisions
                        for revisions in running_revisions(docker_client, app_name).values()
                    )
                    and len(running_revisions(docker_client, app_name)) == 2
                ),
                "both hosts start a rev2 container",
            )
            deploy.send_signal(signal.SIGINT)
            _, stderr = deploy.communicate(timeout=60)
        finally:
            if deploy.poll() is None:
                deploy.kill()
                deploy.wait()

        assert deploy.returncode == 130, stderr
        assert "interrupted: aborting the launches; nothing was switched" in stderr
        assert "Traceback" not in stderr
        assert running_revisions(docker_client, app_name) == {}
        assert [host.status()["current"] for host in running] == [None, None]
        assert S3Store(s3_bucket, PREFIX).get("deploy.lock") is None


def test_abort_removes_what_a_launch_left_on_each_host_and_names_those_it_cannot_abort(
    s3_bucket: str,
    app_name: str,
    app_images: AppImages,
    docker_client: docker.DockerClient,
    tmp_path: Path,
) -> None:
    rev1 = upload_file(tmp_path, s3_bucket, app_config(app_images, "rev1"))
    ports = (app_images.registry_port, app_images.registry_port)
    gone = f"http://127.0.0.1:{free_port()}"
    with two_hosts(tmp_path, s3_bucket, app_name, ports) as running:
        assert running[0].launch(rev1).status == 200

        aborted = run_cli("abort", rev1, *hosts(running), "--host", gone)

        assert aborted.returncode == 1
        assert f"{running[0].api_url}: aborted {rev1}: stopped and removed container " in (
            aborted.stdout
        )
        assert f"{running[1].api_url}: nothing of {rev1} to remove" in aborted.stdout
        assert f"abort of {rev1} failed on 1 of 3 hosts:\n  {gone}: cannot reach the manager" in (
            aborted.stderr
        )
        assert "run the abort again once the hosts that did not answer do" in aborted.stderr
        assert running_revisions(docker_client, app_name) == {}

        assert run_cli("deploy", rev1, *hosts(running)).returncode == 0
        serving = run_cli("abort", rev1, *hosts(running))

        assert serving.returncode == 1
        assert f"  {running[0].api_url}: 409: {rev1} (revision rev1) serves now" in serving.stderr
        assert f"switch {running[1].api_url} to another hash first" in serving.stderr
        assert [revision_served(host) for host in running] == ["revision=rev1"] * 2
