"""DockerEngine against the real Docker engine and a real registry."""

from __future__ import annotations

import gc
import http.client
import threading
import time
from collections.abc import Callable, Iterator

import docker
import docker.errors
import pytest

from tests.support.apps import APP_PORT, HOST_NETWORK_CMD
from tests.support.docker import (
    AppImages,
    Registry,
    containers_of,
    forget_local_images,
    free_port,
    listening_addresses,
)
from wunderproxy.engine import (
    LABEL_APP,
    LABEL_HASH,
    LABEL_REVISION,
    ContainerSpec,
    DockerEngine,
    StartedContainer,
)
from wunderproxy.errors import DockerUnreachable, UpstreamFailed

pytestmark = pytest.mark.e2e


@pytest.fixture
def engine(docker_client: docker.DockerClient) -> DockerEngine:
    return DockerEngine(docker_client)


@pytest.fixture
def images(
    app_images: AppImages, docker_client: docker.DockerClient, app_name: str
) -> Iterator[AppImages]:
    """The test app, in the registry only; afterwards its containers and copies are gone."""
    forget_local_images(docker_client, app_images)  # earlier tests may have pulled it
    yield app_images
    for container in containers_of(docker_client, app_name):
        container.remove(force=True)
    forget_local_images(docker_client, app_images)


def spec_for(
    image: str,
    app_name: str,
    test_labels: dict[str, str],
    revision: str = "rev1",
    container_config: dict[str, object] | None = None,
    host_config: dict[str, object] | None = None,
    env: list[str] | None = None,
    host_port: int | None = None,
) -> ContainerSpec:
    return ContainerSpec(
        image=image,
        app_port=APP_PORT,
        container_config=dict(container_config or {}),
        # docker-init stops busybox httpd at once; as PID 1 it would ignore SIGTERM.
        host_config=dict({"Init": True} if host_config is None else host_config),
        env=list(env or []),
        labels={
            **test_labels,
            LABEL_APP: app_name,
            LABEL_REVISION: revision,
            LABEL_HASH: f"hash-of-{revision}",
        },
        host_port=host_port,
    )


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
    """GET from 127.0.0.1:port, retrying until the app answers or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read().decode()
        except (ConnectionError, http.client.HTTPException):
            # docker-proxy accepts before the app listens, then drops the connection.
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
        finally:
            connection.close()


def wait_for_status(engine: DockerEngine, container_id: str, wanted: str) -> str:
    deadline = time.monotonic() + 10
    while (status := engine.status(container_id)) != wanted and time.monotonic() < deadline:
        time.sleep(0.05)
    return status


def test_ensure_image_pulls_a_missing_image_from_the_registry(
    engine: DockerEngine, images: AppImages, docker_client: docker.DockerClient
) -> None:
    image = images.ref("rev1")
    with pytest.raises(docker.errors.ImageNotFound):
        docker_client.images.get(image)

    engine.ensure_image(image)

    assert image in docker_client.images.get(image).tags
    engine.ensure_image(image)  # present now: nothing to do


def test_start_publishes_the_app_port_on_loopback_and_the_container_answers_there(
    engine: DockerEngine,
    images: AppImages,
    app_name: str,
    test_labels: dict[str, str],
    docker_client: docker.DockerClient,
) -> None:
    image = images.ref("rev1")
    engine.ensure_image(image)
    spec = spec_for(
        image,
        app_name,
        test_labels,
        container_config={"Env": ["REVISION=from-config", "SHARED=config"]},
        env=["SHARED=operator", "APP_GREETING=hello"],
    )

    started = engine.start(spec)

    assert (started.host, started.image, started.warnings) == ("127.0.0.1", image, ())
    assert started.port > 0
    assert engine.status(started.id) == "running"
    attrs = docker_client.api.inspect_container(started.id)
    assert attrs["NetworkSettings"]["Ports"][APP_PORT] == [
        {"HostIp": "127.0.0.1", "HostPort": str(started.port)}
    ]
    assert spec.labels.items() <= attrs["Config"]["Labels"].items()
    env = attrs["Config"]["Env"]
    assert "SHARED=config" in env
    assert "SHARED=operator" not in env
    assert http_get(started.port, "/health") == (200, "ok\n")
    assert http_get(started.port, "/cgi-bin/revision") == (
        200,
        "revision=from-config greeting=hello\n",
    )


def test_start_replaces_an_operators_port_binding_and_says_so(
    engine: DockerEngine, images: AppImages, app_name: str, test_labels: dict[str, str]
) -> None:
    image = images.ref("rev2")
    engine.ensure_image(image)
    taken = free_port()
    spec = spec_for(
        image,
        app_name,
        test_labels,
        revision="rev2",
        host_config={
            "Init": True,
            "Memory": 64 * 1024 * 1024,
            "PortBindings": {APP_PORT: [{"HostIp": "0.0.0.0", "HostPort": str(taken)}]},
        },
    )

    started = engine.start(spec)

    assert started.warnings == (
        "PortBindings for 9292/tcp replaced: wunderproxy publishes the app port on 127.0.0.1 "
        "with a port Docker picks",
    )
    assert started.port != taken
    assert http_get(started.port, "/cgi-bin/revision") == (200, "revision=rev2\n")


def test_on_the_hosts_network_the_app_listens_on_the_port_given_and_a_listing_finds_it(
    engine: DockerEngine,
    images: AppImages,
    app_name: str,
    test_labels: dict[str, str],
    docker_client: docker.DockerClient,
) -> None:
    image = images.ref("rev1")
    engine.ensure_image(image)
    port = free_port()
    spec = spec_for(
        image,
        app_name,
        test_labels,
        container_config={"Cmd": HOST_NETWORK_CMD, "Env": ["PORT=9292"]},
        host_config={"Init": True, "NetworkMode": "host"},
        host_port=port,
    )

    started = engine.start(spec)

    assert (started.host, started.port) == ("127.0.0.1", port)
    assert started.warnings[0].startswith("PORT=9292 in Env replaced by PORT=")
    assert http_get(port, "/cgi-bin/revision") == (200, "revision=rev1\n")
    attrs = docker_client.api.inspect_container(started.id)
    assert attrs["HostConfig"]["NetworkMode"] == "host"
    assert not attrs["NetworkSettings"]["Ports"], "nothing is published on the host's network"
    assert listening_addresses(port) == ["127.0.0.1"]
    [record] = engine.list_containers({LABEL_APP: app_name})
    assert (record.id, record.status, record.port) == (started.id, "running", port)


def test_ensure_image_names_the_registry_when_the_image_is_not_in_it(
    engine: DockerEngine, registry: Registry
) -> None:
    image = f"{registry.address}/testapp:never-pushed"

    with pytest.raises(UpstreamFailed) as failure:
        engine.ensure_image(image)

    assert not isinstance(failure.value, DockerUnreachable), "the engine answered"
    assert str(failure.value) == (
        f"image {image} is not in the registry at {registry.address}: "
        f"push it there first (docker push {image})"
    )


def test_ensure_image_names_a_registry_that_does_not_answer(engine: DockerEngine) -> None:
    address = f"localhost:{free_port()}"

    with pytest.raises(UpstreamFailed, match=f"registry at {address} is unreachable") as failure:
        engine.ensure_image(f"{address}/testapp:rev1")

    assert "is the registry running there?" in str(failure.value)
    assert not isinstance(failure.value, DockerUnreachable), "the engine answered"


# The docker SDK leaves the socket of a failed unix-socket connect unclosed
# (docker/transport/unixconn.py); it is finalised by the gc.collect() below.
@pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning")
@pytest.mark.parametrize("how", ["base_url", "DOCKER_HOST"])
def test_an_engine_that_does_not_answer_fails_fast_with_docker_unreachable(
    how: str, monkeypatch: pytest.MonkeyPatch, app_name: str
) -> None:
    if how == "base_url":
        address = "unix:///nonexistent.sock"
        engine = DockerEngine(base_url=address)
    else:
        address = f"tcp://127.0.0.1:{free_port()}"
        monkeypatch.setenv("DOCKER_HOST", address)
        engine = DockerEngine()  # constructing it must not touch the engine
    spec = spec_for("localhost:1/none:rev1", app_name, {})
    calls: list[Callable[[], object]] = [
        engine.ping,
        lambda: engine.ensure_image("localhost:1/none:rev1"),
        lambda: engine.start(spec),
        lambda: engine.status("abc"),
        lambda: engine.list_containers({LABEL_APP: app_name}),
    ]

    began = time.monotonic()
    for call in calls:
        with pytest.raises(DockerUnreachable) as failure:
            call()
        assert str(failure.value).startswith(f"Docker engine unreachable at {address}: ")
        assert str(failure.value).endswith(
            "; is dockerd running? Start it, or point DOCKER_HOST at it"
        )

    assert time.monotonic() - began < 2
    del failure
    gc.collect()


def test_status_and_logs_show_a_container_that_exited(
    engine: DockerEngine,
    images: AppImages,
    app_name: str,
    test_labels: dict[str, str],
    docker_client: docker.DockerClient,
) -> None:
    image = images.ref("rev1")
    engine.ensure_image(image)
    container = docker_client.containers.run(
        image,
        ["sh", "-c", "echo boom >&2; exit 3"],
        detach=True,
        labels={**test_labels, LABEL_APP: app_name},
    )

    container_id = str(container.id)

    assert wait_for_status(engine, container_id, "exited") == "exited"
    assert "boom" in engine.logs(container_id)


def test_status_and_logs_of_a_missing_container_say_so(engine: DockerEngine) -> None:
    assert engine.status("0123456789ab-not-there") == "missing"
    assert engine.logs("0123456789ab-not-there") == ""


def test_start_removes_a_container_that_cannot_start(
    engine: DockerEngine,
    images: AppImages,
    app_name: str,
    test_labels: dict[str, str],
    docker_client: docker.DockerClient,
) -> None:
    image = images.ref("rev1")
    engine.ensure_image(image)
    spec = spec_for(
        image, app_name, test_labels, container_config={"Entrypoint": ["/nope"]}, host_config={}
    )

    with pytest.raises(UpstreamFailed, match="Docker failed starting a container from") as failure:
        engine.start(spec)

    assert "/nope" in str(failure.value)
    assert containers_of(docker_client, app_name) == []


def test_start_removes_a_container_whose_port_is_not_published(
    engine: DockerEngine,
    images: AppImages,
    app_name: str,
    test_labels: dict[str, str],
    docker_client: docker.DockerClient,
) -> None:
    image = images.ref("rev1")
    engine.ensure_image(image)
    spec = spec_for(image, app_name, test_labels, host_config={"NetworkMode": "none"})

    with pytest.raises(UpstreamFailed, match=r"has no port published for 9292/tcp \(NetworkMode"):
        engine.start(spec)

    assert containers_of(docker_client, app_name) == []


def test_remove_stops_and_removes_a_running_container(
    engine: DockerEngine, images: AppImages, app_name: str, test_labels: dict[str, str]
) -> None:
    image = images.ref("rev1")
    engine.ensure_image(image)
    started = engine.start(spec_for(image, app_name, test_labels))

    engine.remove(started.id, stop_timeout=5)

    assert engine.status(started.id) == "missing"
    engine.remove(started.id, stop_timeout=5)  # gone already: not an error


def test_remove_kills_a_container_that_ignores_the_stop_signal_after_the_grace_period(
    engine: DockerEngine, images: AppImages, app_name: str, test_labels: dict[str, str]
) -> None:
    image = images.ref("rev1")
    engine.ensure_image(image)
    # Without an init process busybox httpd runs as PID 1 and ignores SIGTERM.
    started = engine.start(spec_for(image, app_name, test_labels, host_config={"Init": False}))

    began = time.monotonic()
    engine.remove(started.id, stop_timeout=1)

    assert 1 <= time.monotonic() - began < 5
    assert engine.status(started.id) == "missing"


def test_list_containers_filters_by_label(
    engine: DockerEngine,
    images: AppImages,
    app_name: str,
    test_labels: dict[str, str],
    docker_client: docker.DockerClient,
) -> None:
    image = images.ref("rev1")
    engine.ensure_image(image)
    first = engine.start(spec_for(image, app_name, test_labels, revision="a"))
    second = engine.start(spec_for(image, app_name, test_labels, revision="b"))
    docker_client.containers.create(image, labels=test_labels)  # another app's container

    everything = engine.list_containers({LABEL_APP: app_name})
    only_b = engine.list_containers({LABEL_APP: app_name, LABEL_REVISION: "b"})

    assert {(r.id, r.status, r.port, r.image) for r in everything} == {
        (first.id, "running", first.port, image),
        (second.id, "running", second.port, image),
    }
    assert [(r.id, r.labels[LABEL_HASH]) for r in only_b] == [(second.id, "hash-of-b")]


def test_remove_images_keeps_the_kept_references_and_removes_the_rest(
    engine: DockerEngine, images: AppImages, docker_client: docker.DockerClient
) -> None:
    for image in images.tags.values():
        engine.ensure_image(image)

    removed = engine.remove_images(images.repository, keep={images.ref("rev1")})

    assert removed == [images.ref("rev2")]
    assert images.ref("rev1") in docker_client.images.get(images.ref("rev1")).tags
    with pytest.raises(docker.errors.ImageNotFound):
        docker_client.images.get(images.ref("rev2"))


def test_remove_images_leaves_an_image_that_a_container_uses(
    engine: DockerEngine,
    images: AppImages,
    app_name: str,
    test_labels: dict[str, str],
    docker_client: docker.DockerClient,
) -> None:
    for image in images.tags.values():
        engine.ensure_image(image)
    in_use: StartedContainer = engine.start(spec_for(images.ref("rev1"), app_name, test_labels))

    removed = engine.remove_images(images.repository, keep=set())

    assert removed == [images.ref("rev2")]
    assert engine.status(in_use.id) == "running"
    docker_client.images.get(images.ref("rev1"))


def test_deaths_follows_the_containers_with_the_labels_as_docker_kills_them(
    engine: DockerEngine,
    images: AppImages,
    app_name: str,
    test_labels: dict[str, str],
    docker_client: docker.DockerClient,
) -> None:
    image = images.ref("rev1")
    engine.ensure_image(image)
    ours = engine.start(spec_for(image, app_name, test_labels, revision="a"))
    other = docker_client.containers.run(image, labels=test_labels, detach=True)
    deaths = engine.deaths({LABEL_APP: app_name})
    seen: list[tuple[str, int | None]] = []
    reader = threading.Thread(target=lambda: seen.extend(deaths), daemon=True)
    reader.start()
    other.kill()
    docker_client.api.kill(ours.id)
    deadline = time.monotonic() + 10
    while not seen and time.monotonic() < deadline:
        time.sleep(0.05)
    deaths.close()
    reader.join(5)
    assert seen == [(ours.id, 137)], "only the labelled container, with its exit code"
    assert not reader.is_alive(), "close() ends the stream"
    # Asked again from before the death, the stream has it: deaths missed while the
    # engine was away are seen on reconnecting.
    replayed = engine.deaths({LABEL_APP: app_name}, since=int(time.time()) - 30)
    first = next(iter(replayed))
    replayed.close()
    assert first == (ours.id, 137)
