"""Bad input and failing parts, end to end: each gets its SPEC answer while the container
serving now keeps answering 200."""

from __future__ import annotations

import re
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
import docker
import pytest

from tests.support.configs import PREFIX, app_config, upload_launch_config
from tests.support.docker import AppImages, containers_of, remove_containers
from tests.support.load import LoadGenerator, Worker
from tests.support.process import (
    Answer,
    WunderproxyProcess,
    http_call,
    revision_served,
    wunderproxy,
)
from tests.support.relay import Relay
from wunderproxy.dockerwatch import PROBE_INTERVAL_ERROR, PROBE_INTERVAL_OK
from wunderproxy.engine import LABEL_APP
from wunderproxy.store import S3Store, config_key

pytestmark = pytest.mark.e2e

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Serving:
    """A wunderproxy serving rev1, reaching Docker and S3 through relays a test can cut."""

    def __init__(
        self,
        running: WunderproxyProcess,
        store: S3Store,
        images: AppImages,
        docker_relay: Relay,
        s3_relay: Relay,
        app: str,
    ) -> None:
        self.running = running
        self.store = store
        self.images = images
        self.docker_relay = docker_relay
        self.s3_relay = s3_relay
        self.app = app

    def launch(self, body: str) -> Answer:
        return self.running.api("POST", "/launch", body, headers=AUTH)

    def upload(self, config: dict[str, Any]) -> str:
        return upload_launch_config(self.store, config)


@contextmanager
def serving_through_relays(
    s3_server: str,
    app_images: AppImages,
    docker_client: docker.DockerClient,
    tmp_path: Path,
) -> Iterator[Serving]:
    """A wunderproxy serving rev1 of a new app; its containers are removed at the end."""
    app = f"wp-test-{uuid.uuid4().hex[:8]}"
    bucket = f"failures-{uuid.uuid4().hex[:8]}"
    credentials = {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    host, port = s3_server.removeprefix("http://").split(":")
    s3_relay = Relay(("127.0.0.1", 0), (host, int(port))).start()
    docker_relay = Relay(str(tmp_path / "docker.sock"), "/var/run/docker.sock").start()
    env = {
        **credentials,
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_relay.port}",
        "DOCKER_HOST": f"unix://{tmp_path / 'docker.sock'}",
    }
    # The test itself talks to moto directly; wunderproxy goes through the relays.
    patch = pytest.MonkeyPatch()
    for name, value in {**credentials, "AWS_ENDPOINT_URL": s3_server}.items():
        patch.setenv(name, value)
    boto3.client("s3").create_bucket(Bucket=bucket)
    store = S3Store(bucket, PREFIX)
    upload_launch_config(store, app_config(app_images, "rev1"), current=True)
    try:
        with wunderproxy(
            tmp_path,
            bucket,
            PREFIX,
            app,
            app_images.registry_port,
            "--api-token",
            TOKEN,
            "--health-timeout",
            "3",
            env=env,
        ) as running:
            running.wait_until_serving("rev1")
            yield Serving(running, store, app_images, docker_relay, s3_relay, app)
    finally:
        patch.undo()
        docker_relay.cut()
        s3_relay.cut()
        remove_containers(docker_client, f"{LABEL_APP}={app}")


@pytest.fixture(scope="module")
def serving(
    s3_server: str,
    app_images: AppImages,
    docker_client: docker.DockerClient,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Serving]:
    tmp_path = tmp_path_factory.mktemp("failures")
    with serving_through_relays(s3_server, app_images, docker_client, tmp_path) as started:
        yield started


@pytest.fixture(autouse=True)
def still_serving(serving: Serving, docker_client: docker.DockerClient) -> Iterator[None]:
    """After every test: rev1 still answers, and no failed container is left behind."""
    yield
    assert revision_served(serving.running) == "revision=rev1"
    states = [c.status for c in containers_of(docker_client, serving.app)]
    assert states == ["running"], f"containers left: {states}"


def assert_error(answer: Answer, status: int, *words: str) -> None:
    assert answer.status == status, answer.text
    message = answer.json()["error"]
    for word in words:
        assert word in message, message


def test_malformed_hash_is_refused_with_400(serving: Serving) -> None:
    assert_error(serving.launch("not-a-hash"), 400, "32")


def test_unknown_hash_is_refused_with_404(serving: Serving) -> None:
    assert_error(serving.launch("0123456789abcdef0123456789abcdef"), 404, "upload it first")


def test_config_whose_bytes_do_not_match_its_hash_is_refused_with_422(serving: Serving) -> None:
    wrong_hash = "f" * 32
    serving.store.put(config_key(wrong_hash), b'{"Revision": "x", "HealthCheckPath": "/"}')
    assert_error(serving.launch(wrong_hash), 422, wrong_hash)


def test_invalid_config_is_refused_with_422_naming_the_field(serving: Serving) -> None:
    config = app_config(serving.images, "rev2")
    config["ContainerConfig"]["Env"] = "REVISION=rev2"
    assert_error(serving.launch(serving.upload(config)), 422, "ContainerConfig.Env")
    del config["Revision"]
    assert_error(serving.launch(serving.upload(config)), 422, "Revision")


def test_image_missing_from_the_registry_fails_with_502(serving: Serving) -> None:
    config = app_config(serving.images, "rev2")
    config["ContainerConfig"]["Image"] = f"{serving.images.repository}:never-pushed"
    assert_error(serving.launch(serving.upload(config)), 502, "not in the registry")


def test_app_that_never_gets_healthy_fails_with_504_and_is_removed(serving: Serving) -> None:
    config = app_config(serving.images, "rev2", HealthCheckPath="/missing-health")
    assert_error(serving.launch(serving.upload(config)), 504, "not healthy after 3 s", "404")


def test_app_that_exits_at_once_fails_with_502_quoting_its_logs(serving: Serving) -> None:
    config = app_config(serving.images, "rev2")
    config["ContainerConfig"]["Cmd"] = ["sh", "-c", "echo boom-at-start >&2; exit 3"]
    assert_error(serving.launch(serving.upload(config)), 502, "boom-at-start")


def test_docker_engine_unreachable_fails_with_502(serving: Serving) -> None:
    rev2 = serving.upload(app_config(serving.images, "rev2"))
    serving.docker_relay.cut()
    try:
        assert_error(serving.launch(rev2), 502, "Docker")
    finally:
        serving.docker_relay.restore()


def test_s3_unreachable_fails_with_502(serving: Serving) -> None:
    rev2 = serving.upload(app_config(serving.images, "rev2"))
    serving.s3_relay.cut()
    try:
        assert_error(serving.launch(rev2), 502, "S3")
    finally:
        serving.s3_relay.restore()


def test_wrong_method_is_refused_with_405(serving: Serving) -> None:
    answer = serving.running.api("GET", "/launch", headers=AUTH)
    assert_error(answer, 405, "POST")
    assert answer.headers["Allow"] == "POST"


def test_missing_token_is_refused_with_401(serving: Serving) -> None:
    rev1 = serving.running.status()["current"]["hash"]
    assert_error(serving.running.api("POST", "/switch", rev1), 401, "Bearer")
    wrong = {"Authorization": "Bearer nope"}
    assert_error(serving.running.api("POST", "/launch", rev1, headers=wrong), 401, "token")


def test_switch_to_a_hash_not_launched_is_refused_with_404(serving: Serving) -> None:
    rev2 = serving.upload(app_config(serving.images, "rev2"))
    answer = serving.running.api("POST", "/switch", rev2, headers=AUTH)
    assert_error(answer, 404, "POST /launch it first")


def test_non_http_bytes_on_the_proxy_port_get_400_and_others_are_served(
    serving: Serving,
) -> None:
    with socket.create_connection(("127.0.0.1", serving.running.proxy_port), timeout=5) as sock:
        sock.sendall(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03 garbage\r\n\r\n")
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert http_call(serving.running.proxy_port, "GET", "/cgi-bin/revision").status == 200


def test_status_answers_without_the_token(serving: Serving) -> None:
    answer = serving.running.api("GET", "/status")
    assert answer.status == 200
    assert answer.json()["current"]["revision"] == "rev1"


# -- Docker unreachable, and back --------------------------------------------------------


# One client asking again as soon as it has its answer, a new connection each time.
ONE_CLIENT = (Worker("new-connection", "GET", "/cgi-bin/revision", keep_alive=False),)


def docker_seen(running: WunderproxyProcess) -> tuple[dict[str, str], str, str]:
    """What /status (``docker``, ``DockerState``) and /metrics say of the engine."""
    status = running.status()
    metrics = running.api("GET", "/metrics").text
    up = re.search(r"^wunderproxy_docker_up (\S+)$", metrics, re.MULTILINE)
    assert up is not None, metrics
    return status["docker"], status["DockerState"], up.group(1)


def wait_for(condition: Callable[[], bool], within: float, what: str) -> float:
    """Poll ``condition`` every 0.1 s; return the seconds it took to hold."""
    began = time.monotonic()
    while not condition():
        assert time.monotonic() - began < within, f"not {what} after {within} s"
        time.sleep(0.1)
    return time.monotonic() - began


def test_docker_going_away_shows_in_status_and_metrics_and_all_recovers_by_itself(
    s3_server: str,
    app_images: AppImages,
    docker_client: docker.DockerClient,
    tmp_path: Path,
) -> None:
    with serving_through_relays(s3_server, app_images, docker_client, tmp_path) as serving:
        running = serving.running
        rev2 = serving.upload(app_config(app_images, "rev2"))
        assert docker_seen(running) == ({"state": "ok"}, "Ok", "1.0")
        with LoadGenerator(running.proxy_port, ONE_CLIENT, max_seconds=120) as traffic:
            serving.docker_relay.cut()
            # Nothing asks Docker anything: the probe notices by itself.
            noticed = wait_for(
                lambda: docker_seen(running)[0]["state"] == "error",
                PROBE_INTERVAL_OK + 10,
                "seen as down",
            )
            docker, docker_state, up = docker_seen(running)
            assert (docker_state, up) == ("Error", "0.0")
            assert docker["error"].startswith(f"Docker engine unreachable at unix://{tmp_path}")
            assert "is dockerd running?" in docker["error"]
            assert_error(serving.launch(rev2), 502, "Docker engine unreachable")
            serving.docker_relay.restore()
            recovered = wait_for(
                lambda: docker_seen(running) == ({"state": "ok"}, "Ok", "1.0"),
                PROBE_INTERVAL_ERROR + 10,
                "seen as back",
            )
            launched = serving.launch(rev2)
            assert launched.status == 200, launched.text
            assert serving.running.api("POST", "/switch", rev2, headers=AUTH).status == 200
            time.sleep(0.3)  # a few requests reach rev2
        log = running.log()
    print(f"noticed after {noticed:.1f} s, recovered after {recovered:.1f} s")
    failed = [outcome for outcome in traffic.outcomes if outcome.failed]
    assert failed == []
    assert len(traffic.outcomes) > 20
    assert traffic.outcomes[-1].body == "revision=rev2"
    assert log.count("Until it answers, /launch answers 502") == 1
    assert log.count("the Docker engine answers again") == 1
    assert "Traceback" not in log
