"""Containers on the host's network (``HostConfig.NetworkMode: "host"``), end to end: the
real Docker engine, registry and S3 server, and wunderproxy started by its CLI."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from tests.support.configs import (
    PREFIX,
    host_network_app_config,
    manager_config,
    upload_launch_config,
)
from tests.support.docker import AppImages, containers_of, listening_addresses
from tests.support.fakes import MemoryStore
from tests.support.load import DEFAULT_MIX, LoadGenerator, assert_no_failures, revision_of
from tests.support.process import WunderproxyProcess, revision_served, wunderproxy
from wunderproxy.controller import Controller
from wunderproxy.engine import DockerEngine
from wunderproxy.errors import UpstreamFailed
from wunderproxy.hostports import HostPorts, hold_free_port
from wunderproxy.state import ProxyState
from wunderproxy.store import S3Store

pytestmark = pytest.mark.e2e


def ports_by_revision(running: WunderproxyProcess) -> dict[str, int]:
    """The port of each of the app's containers, as /status shows them."""
    return {c["revision"]: c["port"] for c in running.status()["containers"]}


def test_host_network_revisions_get_their_own_ports_switch_without_a_failure_and_are_adopted(
    s3_bucket: str,
    app_name: str,
    app_images: AppImages,
    docker_client: docker.DockerClient,
    tmp_path: Path,
) -> None:
    store = S3Store(s3_bucket, PREFIX)
    upload_launch_config(store, host_network_app_config(app_images, "rev1"), current=True)
    rev2 = upload_launch_config(store, host_network_app_config(app_images, "rev2"))
    pid_file = tmp_path / "wunderproxy.pid"
    options = ("--drain-timeout", "10", "--pid-file", str(pid_file))
    registry_port = app_images.registry_port
    with wunderproxy(tmp_path, s3_bucket, PREFIX, app_name, registry_port, *options) as old:
        old.wait_until_serving("rev1")
        [first] = containers_of(docker_client, app_name)
        assert first.attrs["HostConfig"]["NetworkMode"] == "host"
        rev1_port = ports_by_revision(old)["rev1"]
        # The health check and the proxy reach the app on the port it was given, on loopback.
        assert f"PORT={rev1_port}" in first.attrs["Config"]["Env"]
        assert listening_addresses(rev1_port) == ["127.0.0.1"]
        assert revision_served(old) == "revision=rev1"

        launched = old.launch(rev2)
        assert launched.status == 200, launched.text
        ports = ports_by_revision(old)
        assert ports.keys() == {"rev1", "rev2"}
        assert ports["rev2"] != rev1_port
        assert f"listening on port {ports['rev2']}" in launched.text

        with LoadGenerator(old.proxy_port, DEFAULT_MIX, max_seconds=120) as load:
            time.sleep(1.0)
            switched = old.switch(rev2)
            assert switched.status == 200, switched.text
            after_switch = time.monotonic()
            time.sleep(2.5)  # the slow requests that began on rev1 finish there
            # wunderproxy restarts (a hitless take-over): the new one adopts rev2's container.
            with wunderproxy(
                tmp_path,
                s3_bucket,
                PREFIX,
                app_name,
                registry_port,
                *options,
                "--take-over",
                ports=(old.proxy_port, old.api_port),
            ) as new:
                assert old.process.wait(30) == 0, old.log()
                time.sleep(1.0)
                outcomes = load.stop()
                current = new.status()["current"]
                assert (current["revision"], current["port"]) == ("rev2", ports["rev2"])
                assert f"on port {ports['rev2']}" in new.log()
                assert "adopted running container" in new.log()
                assert revision_served(new) == "revision=rev2"
    assert_no_failures(outcomes)
    assert len(outcomes) > 100, "too little load to prove anything"
    late = [o for o in outcomes if o.started > after_switch + 0.5]
    assert late, "no request was sent after the switch"
    assert {revision_of(o) for o in late} == {"rev2"}


def docker_controller(
    app_name: str,
    docker_client: docker.DockerClient,
    store: MemoryStore,
    host_ports: HostPorts | None = None,
) -> Controller:
    """A Controller on the real Docker engine, run in the test's process."""
    return Controller(
        manager_config(app=app_name, health_timeout=30.0),
        ProxyState(app_name, "0"),
        store,
        DockerEngine(docker_client),
        host_ports,
    )


async def test_network_mode_host_in_container_config_host_config_runs_on_the_hosts_network(
    app_name: str,
    app_images: AppImages,
    docker_client: docker.DockerClient,
    test_labels: dict[str, str],
) -> None:
    store = MemoryStore()
    config = host_network_app_config(app_images, "rev1")
    # Where Docker's create body carries it; the engine merges it with the top-level one.
    config["ContainerConfig"]["HostConfig"] = {
        "NetworkMode": config["HostConfig"].pop("NetworkMode")
    }
    config["ContainerConfig"]["Labels"] = test_labels
    controller = docker_controller(app_name, docker_client, store)
    try:
        launched = await controller.launch(upload_launch_config(store, config))
        [started] = containers_of(docker_client, app_name)
        assert started.attrs["HostConfig"]["NetworkMode"] == "host"
        assert f"PORT={launched.container.port}" in started.attrs["Config"]["Env"]
        assert listening_addresses(launched.container.port) == ["127.0.0.1"]
    finally:
        await controller.shutdown(1.0)


class Intruder(http.server.ThreadingHTTPServer):
    """Another process's server on a held port (it sets SO_REUSEADDR, as http.server does):
    it answers 200 to anything, but only once ``ready()`` is true, so that its first answer
    comes after the container it stands in for has exited."""

    daemon_threads = True

    def __init__(self, port: int, ready: threading.Event) -> None:
        self.ready = ready
        super().__init__(("127.0.0.1", port), IntruderHandler)


class IntruderHandler(http.server.BaseHTTPRequestHandler):
    server: Intruder

    def do_GET(self) -> None:
        self.server.ready.wait(30)
        body = b"not the app\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def intruder() -> Iterator[tuple[HostPorts, threading.Event]]:
    """Host ports whose pick is raced: right after wunderproxy holds a port, an intruder
    binds and listens on it. Set the event to let it answer."""
    ready = threading.Event()
    servers: list[Intruder] = []

    def raced_pick() -> socket.socket:
        hold = hold_free_port()
        server = Intruder(hold.getsockname()[1], ready)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return hold

    try:
        yield HostPorts(raced_pick), ready
    finally:
        ready.set()
        for server in servers:
            server.shutdown()
            server.server_close()


async def test_a_host_network_app_that_never_bound_its_port_fails_although_another_answers_200(
    app_name: str,
    app_images: AppImages,
    docker_client: docker.DockerClient,
    test_labels: dict[str, str],
    intruder: tuple[HostPorts, threading.Event],
) -> None:
    host_ports, ready = intruder
    store = MemoryStore()
    config = host_network_app_config(app_images, "rev1")
    config["ContainerConfig"]["Labels"] = test_labels
    config_hash = upload_launch_config(store, config)
    controller = docker_controller(app_name, docker_client, store, host_ports)

    def answer_once_the_app_exited() -> None:
        # busybox httpd sets SO_REUSEADDR, but the port has a listener: EADDRINUSE, exit.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not ready.is_set():
            if [c for c in containers_of(docker_client, app_name) if c.status == "exited"]:
                ready.set()
            time.sleep(0.05)

    watcher = threading.Thread(target=answer_once_the_app_exited, daemon=True)
    watcher.start()
    try:
        with pytest.raises(UpstreamFailed) as caught:
            await controller.launch(config_hash)
    finally:
        ready.set()
        watcher.join(35)
        await controller.shutdown(1.0)
    message = str(caught.value)
    assert "stopped while starting (status exited)" in message
    assert "Address already in use" in message
    assert "with SO_REUSEADDR set" in message
    assert containers_of(docker_client, app_name) == []
