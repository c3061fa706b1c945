"""Fixtures for the real Docker engine and a real registry (docker/distribution).

The engine must already run (``.ci/run`` starts one); these fixtures never start or stop it,
and fail, never skip, when it does not answer. Everything they create carries the label
``wunderproxy.test=<session id>`` or a ``wunderproxy.app`` name handed out by ``app_name``,
and is removed at the end, also when a test fails.
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors
import pytest
import requests.exceptions
from docker.models.containers import Container

from tests.support.apps import push_app_image
from tests.support.registry import RegistryFailed, start_registry, stop_process
from wunderproxy.engine import LABEL_APP

TEST_LABEL = "wunderproxy.test"
APP = "testapp"
REVISIONS = ("rev1", "rev2")
LIST_ATTEMPTS = 10


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def listening_addresses(port: int) -> list[str]:
    """The addresses of this network namespace's TCP listeners on ``port`` (/proc/net/tcp*)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            next(lines)  # the header
            for line in lines:
                local, state = line.split()[1], line.split()[3]
                address, _, hex_port = local.partition(":")
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    found.append(
                        socket.inet_ntoa(bytes.fromhex(address)[::-1])
                        if len(address) == 8
                        else address  # IPv6: any listener there is wrong anyway
                    )
    return found


def containers_of(client: docker.DockerClient, app_name: str) -> list[Container]:
    """Every container, in any state, labelled ``wunderproxy.app=<app_name>``."""
    return labelled_containers(client, f"{LABEL_APP}={app_name}")


def labelled_containers(client: docker.DockerClient, *labels: str) -> list[Container]:
    """Every container, in any state, with all ``labels`` (``KEY=VALUE``)."""
    for _ in range(LIST_ATTEMPTS):
        try:
            found: list[Container] = client.containers.list(
                all=True, filters={"label": list(labels)}
            )
            return found
        except docker.errors.NotFound:
            # The SDK inspects each container it listed: one was removed in between (by the
            # code under test, draining it). Listing again no longer finds it.
            continue
    raise AssertionError(f"containers labelled {labels} kept vanishing while listed")


def remove_containers(client: docker.DockerClient, label: str) -> None:
    """Force-remove every container matching ``label`` (``KEY`` or ``KEY=VALUE``)."""
    for container in client.containers.list(all=True, filters={"label": label}):
        # NotFound: removed meanwhile, e.g. by the code under test.
        with contextlib.suppress(docker.errors.NotFound):
            container.remove(force=True)


def remove_images(client: docker.DockerClient, label: str) -> None:
    """Force-remove every image matching ``label``, with all its tags."""
    for image in client.images.list(filters={"label": label}):
        with contextlib.suppress(docker.errors.NotFound):
            client.images.remove(str(image.id), force=True)


@dataclass(frozen=True)
class Registry:
    """A docker/distribution registry started for this session."""

    port: int
    address: str  # "localhost:PORT", the form image references use
    log: Path


@dataclass(frozen=True)
class AppImages:
    """The test app pushed to the session's registry, with no local copies left."""

    repository: str  # "localhost:PORT/testapp"
    tags: dict[str, str]  # revision -> full reference, e.g. "rev1" -> "localhost:PORT/testapp:rev1"
    registry_port: int

    def ref(self, revision: str) -> str:
        """The full image reference of ``revision``."""
        return self.tags[revision]


@pytest.fixture(scope="session")
def test_session_id() -> str:
    """A unique id for this test session; the value of every ``wunderproxy.test`` label."""
    return uuid.uuid4().hex[:12]


@pytest.fixture(scope="session")
def test_labels(test_session_id: str) -> dict[str, str]:
    """Labels to put on anything a test creates, so the session can find and remove it."""
    return {TEST_LABEL: test_session_id}


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    """A docker SDK client for the engine named by DOCKER_HOST (default: the local socket)."""
    where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    try:
        client = docker.from_env()
        client.ping()
    except (docker.errors.DockerException, requests.exceptions.RequestException) as e:
        problem = f"{e}"
    else:
        problem = ""
    if problem:
        # The SDK leaves the socket of a failed unix-socket connect open; finalise it here so
        # that its ResourceWarning does not bury the message below.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
        pytest.fail(
            f"Docker engine unreachable at {where}: {problem}. These tests need a running "
            "dockerd: start one with .ci/run (it installs docker.io and starts dockerd when "
            "none answers).",
            pytrace=False,
        )
    yield client
    client.close()


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A registry on 127.0.0.1, reached as ``localhost:PORT``, storing into a temporary dir."""
    root = tmp_path_factory.mktemp("registry")
    port = free_port()
    try:
        process = start_registry(root, port)
    except RegistryFailed as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield Registry(port=port, address=f"localhost:{port}", log=root / "registry.log")
    finally:
        stop_process(process)


@pytest.fixture(scope="session")
def app_names() -> set[str]:
    """Every name ``app_name`` handed out this session."""
    return set()


@pytest.fixture
def app_name(docker_client: docker.DockerClient, app_names: set[str]) -> Iterator[str]:
    """A unique app name for one test; its containers are removed when the test ends."""
    name = f"wp-test-{uuid.uuid4().hex[:8]}"
    app_names.add(name)
    yield name
    remove_containers(docker_client, f"{LABEL_APP}={name}")


@pytest.fixture(scope="session")
def app_images(
    docker_client: docker.DockerClient,
    registry: Registry,
    test_labels: dict[str, str],
    app_names: set[str],
) -> Iterator[AppImages]:
    """``testapp`` revisions rev1 and rev2, in the registry only: launching one must pull it."""
    repository = f"{registry.address}/{APP}"
    tags = {revision: f"{repository}:{revision}" for revision in REVISIONS}
    try:
        for tag in tags.values():
            push_app_image(docker_client, tag, test_labels)
        yield AppImages(repository=repository, tags=tags, registry_port=registry.port)
    finally:
        _remove_session_leftovers(docker_client, test_labels, app_names)


def _remove_session_leftovers(
    client: docker.DockerClient, test_labels: dict[str, str], app_names: set[str]
) -> None:
    (key, value), *_ = test_labels.items()
    remove_containers(client, f"{key}={value}")
    for name in app_names:
        remove_containers(client, f"{LABEL_APP}={name}")
    remove_images(client, f"{key}={value}")


def forget_local_images(client: docker.DockerClient, images: AppImages) -> None:
    """Remove the local copies of the test app, so that the next launch must pull again."""
    for tag in images.tags.values():
        with contextlib.suppress(docker.errors.NotFound):
            client.images.remove(tag, force=True)
