"""Bad input and failing parts, end to end: each gets its SPEC answer while the container
serving now keeps answering 200."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import docker
import pytest

from tests.support.docker import AppImages, containers_of, remove_containers
from tests.support.process import Answer, WunderproxyProcess, http_call, wunderproxy
from tests.support.relay import Relay
from tests.test_deploy_e2e import PREFIX, app_config, revision_served, upload
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
        return upload(self.store, config)


@pytest.fixture(scope="module")
def serving(
    s3_server: str,
    app_images: AppImages,
    docker_client: docker.DockerClient,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Serving]:
    tmp_path = tmp_path_factory.mktemp("failures")
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
    upload(store, app_config(app_images, "rev1"), current=True)
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
