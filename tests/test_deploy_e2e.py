"""Deploys end to end: wunderproxy through its CLI, the real Docker engine and registry,
moto's S3 server over HTTP and the local-directory store."""

from __future__ import annotations

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import docker
import pytest

from tests.support.configs import PREFIX, app_config, encode_config, upload_launch_config
from tests.support.docker import AppImages, containers_of, forget_local_images
from tests.support.process import Answer, http_call, revision_served, run_cli, wunderproxy
from wunderproxy.engine import LABEL_REVISION
from wunderproxy.store import FileStore, S3Store, Store

pytestmark = pytest.mark.e2e


def wait_for_containers(
    client: docker.DockerClient, app: str, revisions: set[str], timeout: float = 20.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = {c.labels[LABEL_REVISION] for c in containers_of(client, app)}
        if found == revisions and len(containers_of(client, app)) == len(revisions):
            return
        time.sleep(0.1)
    raise AssertionError(f"containers of {app}: {found}, expected {revisions}")


def deploy_and_check(
    store: Store,
    bucket: str,
    app: str,
    images: AppImages,
    client: docker.DockerClient,
    tmp_path: Path,
) -> None:
    """current.json comes up at start; launch + switch moves traffic; the old one goes."""
    upload_launch_config(store, app_config(images, "rev1"), current=True)
    forget_local_images(client, images)  # the launch must pull from the registry
    with wunderproxy(tmp_path, bucket, PREFIX, app, images.registry_port) as running:
        running.wait_until_serving("rev1")
        assert revision_served(running) == "revision=rev1"

        rev2 = upload_launch_config(store, app_config(images, "rev2"))
        launched = running.launch(f"  {rev2}\n")
        assert launched.status == 200, launched.text
        assert launched.text.startswith("started container ")
        assert "with revision rev2 listening on port " in launched.text
        assert revision_served(running) == "revision=rev1", "launch alone must not move traffic"

        switched = running.switch(rev2)
        assert switched.status == 200, switched.text
        assert switched.text.startswith("switched proxy to port ")
        assert revision_served(running) == "revision=rev2"
        wait_for_containers(client, app, {"rev2"})

        status = running.status()
        assert status["current"]["revision"] == "rev2"
        assert status["current"]["hash"] == rev2
        assert status["requests"]["by_status"]["200"] >= 3
        assert status["DockerState"] == "Ok"
        assert store.get("current.json") == encode_config(app_config(images, "rev2"))[1]
        history = json.loads(store.get("history.json") or b"[]")
        assert history[-1]["Hash"] == rev2
        assert history[-1]["Revision"] == "rev2"


def test_s3_store_deploy_starts_current_then_launch_and_switch_move_traffic(
    s3_bucket: str,
    app_name: str,
    app_images: AppImages,
    docker_client: docker.DockerClient,
    tmp_path: Path,
) -> None:
    store = S3Store(s3_bucket, PREFIX)
    deploy_and_check(store, s3_bucket, app_name, app_images, docker_client, tmp_path)


def test_file_store_deploy_works_the_same_without_any_cloud(
    app_name: str,
    app_images: AppImages,
    docker_client: docker.DockerClient,
    tmp_path: Path,
) -> None:
    directory = tmp_path / "store"
    store = FileStore(str(directory), PREFIX)
    bucket = f"file://{directory}"
    deploy_and_check(store, bucket, app_name, app_images, docker_client, tmp_path)


def test_restarted_wunderproxy_serves_current_again_and_the_app_kept_running(
    s3_bucket: str,
    app_name: str,
    app_images: AppImages,
    docker_client: docker.DockerClient,
    tmp_path: Path,
) -> None:
    store = S3Store(s3_bucket, PREFIX)
    upload_launch_config(store, app_config(app_images, "rev1"), current=True)
    with wunderproxy(tmp_path, s3_bucket, PREFIX, app_name, app_images.registry_port) as first:
        first.wait_until_serving("rev1")
        assert first.stop() == 0
        assert "the app container keeps running" in first.log()
    running = [c for c in containers_of(docker_client, app_name) if c.status == "running"]
    assert len(running) == 1, "SIGTERM must leave the app container running"
    with wunderproxy(tmp_path, s3_bucket, PREFIX, app_name, app_images.registry_port) as second:
        second.wait_until_serving("rev1")
        assert revision_served(second) == "revision=rev1"


def first_answer(port: int, path: str, within: float = 30.0) -> Answer:
    """The answer to ``path`` on the first connection ``port`` accepts."""
    deadline = time.monotonic() + within
    while True:
        try:
            return http_call(port, "GET", path, timeout=10)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def test_a_second_wunderproxy_started_beside_a_running_one_serves_from_its_first_connection(
    s3_bucket: str,
    app_name: str,
    app_images: AppImages,
    docker_client: docker.DockerClient,
    tmp_path: Path,
) -> None:
    store = S3Store(s3_bucket, PREFIX)
    upload_launch_config(store, app_config(app_images, "rev1"), current=True)
    with wunderproxy(tmp_path, s3_bucket, PREFIX, app_name, app_images.registry_port) as first:
        first.wait_until_serving("rev1")
        # Not --take-over: a plain second process, as an operator might start by mistake
        # or a supervisor might while the first still runs.
        with wunderproxy(
            tmp_path, s3_bucket, PREFIX, app_name, app_images.registry_port, wait_for_api=False
        ) as second:
            answer = first_answer(second.proxy_port, "/cgi-bin/revision")
            assert (answer.status, answer.text) == (200, "revision=rev1\n")
            adopted = second.status()["current"]["container_id"]
            assert adopted == first.status()["current"]["container_id"]
            assert "adopted running container" in second.log()
    running = [c for c in containers_of(docker_client, app_name) if c.status == "running"]
    assert [c.id for c in running] == [adopted], "adopted, not launched again"


def test_while_current_json_launches_slowly_the_api_answers_and_the_proxy_says_503(
    s3_bucket: str,
    app_name: str,
    app_images: AppImages,
    tmp_path: Path,
) -> None:
    store = S3Store(s3_bucket, PREFIX)
    config = app_config(app_images, "rev1")
    # The app takes 4 s to listen, as a real one booting does.
    config["ContainerConfig"]["Cmd"] = [
        "sh",
        "-c",
        "sleep 4; exec busybox httpd -f -p 9292 -h /www",
    ]
    upload_launch_config(store, config, current=True)
    with wunderproxy(tmp_path, s3_bucket, PREFIX, app_name, app_images.registry_port) as running:
        assert running.status()["current"] is None, "the API answers while it launches"
        assert running.get("/cgi-bin/revision").status == 503
        running.wait_until_serving("rev1")
        assert revision_served(running) == "revision=rev1"


def test_sigterm_lets_the_request_in_flight_finish_then_exits_0(
    s3_bucket: str,
    app_name: str,
    app_images: AppImages,
    tmp_path: Path,
) -> None:
    store = S3Store(s3_bucket, PREFIX)
    upload_launch_config(store, app_config(app_images, "rev1"), current=True)
    with wunderproxy(tmp_path, s3_bucket, PREFIX, app_name, app_images.registry_port) as running:
        running.wait_until_serving("rev1")
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(running.get, "/cgi-bin/slow?1.5")
            time.sleep(0.5)
            running.process.send_signal(signal.SIGTERM)
            answer = slow.result(timeout=10)
        assert answer.status == 200
        assert answer.text.startswith("revision=rev1 ")
        assert running.process.wait(10) == 0
        with pytest.raises(OSError):
            running.get("/", timeout=2)


def test_start_without_current_json_answers_503_until_a_deploy(
    s3_bucket: str,
    app_name: str,
    app_images: AppImages,
    tmp_path: Path,
) -> None:
    store = S3Store(s3_bucket, PREFIX)
    with wunderproxy(tmp_path, s3_bucket, PREFIX, app_name, app_images.registry_port) as running:
        answer = running.get("/")
        assert answer.status == 503
        assert running.status()["current"] is None
        rev1 = upload_launch_config(store, app_config(app_images, "rev1"))
        assert running.launch(rev1).status == 200
        assert running.switch(rev1).status == 200
        assert revision_served(running) == "revision=rev1"


def test_default_image_name_is_the_local_registry_repository_of_the_app(
    s3_bucket: str,
    app_name: str,
    app_images: AppImages,
    docker_client: docker.DockerClient,
    tmp_path: Path,
    test_labels: dict[str, str],
) -> None:
    from tests.support.apps import build_app_image

    image = f"localhost:{app_images.registry_port}/{app_name}:v7"
    build_app_image(docker_client, image, test_labels, revision="v7")
    docker_client.images.push(f"localhost:{app_images.registry_port}/{app_name}", tag="v7")
    docker_client.images.remove(image)
    store = S3Store(s3_bucket, PREFIX)
    config = {"Revision": "v7", "HealthCheckPath": "/health", "HostConfig": {"Init": True}}
    upload_launch_config(store, config, current=True)
    with wunderproxy(tmp_path, s3_bucket, PREFIX, app_name, app_images.registry_port) as running:
        running.wait_until_serving("v7")
        assert revision_served(running) == "revision=v7"
        assert running.status()["current"]["image"] == image


def test_config_file_entries_reach_the_container_and_the_cli_client_deploys(
    s3_bucket: str,
    app_name: str,
    app_images: AppImages,
    tmp_path: Path,
) -> None:
    env_file = tmp_path / "app.env"
    env_file.write_text("# greeting for the app\n\nAPP_GREETING=hello-from-env-file\n")
    store = S3Store(s3_bucket, PREFIX)
    rev1 = upload_launch_config(store, app_config(app_images, "rev1"))
    with wunderproxy(
        tmp_path,
        s3_bucket,
        PREFIX,
        app_name,
        app_images.registry_port,
        "--config-file",
        str(env_file),
    ) as running:
        api = f"http://127.0.0.1:{running.api_port}"
        launch = run_cli("launch", rev1, "--api", api)
        assert launch.returncode == 0, launch.stderr
        assert "waiting" in launch.stderr
        assert "started container" in launch.stdout
        switch = run_cli("switch", rev1, "--api", api)
        assert switch.returncode == 0, switch.stderr
        assert "switched proxy to port" in switch.stdout
        assert revision_served(running) == "revision=rev1 greeting=hello-from-env-file"
        status = run_cli("status", "--api", api)
        assert "serving revision rev1" in status.stdout
        assert "response times since start: p50 " in status.stdout  # one request went through
        failed = run_cli("launch", "0" * 32, "--api", api)
        assert failed.returncode != 0
        assert "404" in failed.stderr and "upload it first" in failed.stderr


def test_config_file_with_a_malformed_line_stops_start_up_naming_file_and_line(
    tmp_path: Path,
) -> None:
    env_file = tmp_path / "bad.env"
    env_file.write_text("GOOD=1\nthis line is wrong\n")
    result = run_cli("run", "file:///nonexistent", "p", "app", "--config-file", str(env_file))
    assert result.returncode == 2
    assert f"{env_file}:2:" in result.stderr


def test_abort_removes_a_launched_container_and_cancels_a_launch_under_way(
    s3_bucket: str,
    app_name: str,
    app_images: AppImages,
    docker_client: docker.DockerClient,
    tmp_path: Path,
) -> None:
    store = S3Store(s3_bucket, PREFIX)
    upload_launch_config(store, app_config(app_images, "rev1"), current=True)
    with wunderproxy(
        tmp_path, s3_bucket, PREFIX, app_name, app_images.registry_port, "--instance", "e2e-a"
    ) as running:
        running.wait_until_serving("rev1")
        status = running.status()
        assert status["instance"] == "e2e-a"
        assert status["store"] == {"bucket": s3_bucket, "prefix": PREFIX}
        serving = status["current"]["container_id"]

        rev2 = upload_launch_config(store, app_config(app_images, "rev2"))
        assert running.launch(rev2).status == 200
        wait_for_containers(docker_client, app_name, {"rev1", "rev2"})
        aborted = running.api("POST", "/abort", rev2)
        assert aborted.status == 200, aborted.text
        assert aborted.text.startswith(f"aborted {rev2}: stopped and removed container ")
        # Gone by the time /abort answers, not some time later.
        assert [c.id for c in containers_of(docker_client, app_name)] == [serving]
        assert running.switch(rev2).status == 404
        assert running.api("POST", "/abort", rev2).status == 404
        assert running.api("POST", "/abort", status["current"]["hash"]).status == 409

        # A revision that takes 30 s to listen: its launch is still waiting when aborted.
        slow = app_config(app_images, "rev2")
        slow["ContainerConfig"]["Cmd"] = ["sh", "-c", "sleep 30; exec busybox httpd -f -p 9292"]
        slow_hash = upload_launch_config(store, slow)
        with ThreadPoolExecutor(1) as pool:
            launch = pool.submit(running.launch, slow_hash)
            wait_for_containers(docker_client, app_name, {"rev1", "rev2"})
            cancelled = running.api("POST", "/abort", slow_hash)
            answer = launch.result(timeout=30)
        assert cancelled.status == 200, cancelled.text
        assert "cancelled its launch under way" in cancelled.text
        assert answer.status == 409
        assert "was aborted (POST /abort)" in answer.json()["error"]
        assert [c.id for c in containers_of(docker_client, app_name)] == [serving]
        assert revision_served(running) == "revision=rev1"
        events = [e["event"] for e in running.status()["events"]]
        assert events[:2] == ["aborted", "launch"]
        assert events.count("aborted") == 2
