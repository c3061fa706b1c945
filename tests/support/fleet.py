"""A fleet on this machine: several wunderproxies on one Docker engine, as issue 12 runs them.

Each host is a ``wunderproxy run`` with its own ``--instance web-N``, proxy and API ports
and its own docker/distribution registry; all of them share one store (a bucket on moto's S3
server, over HTTP) and one artifacts bucket that every registry stores images in. The test
app is built once per revision and pushed through the first host's registry only; the
launch configs name no image, so each host pulls ``localhost:ITS_REGISTRY_PORT/APP:REV``
from its own registry, as a host of a real fleet would.

Every host lists all the others as ``--peer`` and shares one ``--fallback-secret``.

``running_fleet`` is the plain context manager (for benchmark scripts); the ``fleet``
fixture wraps it for tests, with options from ``@pytest.mark.fleet(size=..., revisions=...,
extra=...)``. Everything started is stopped by PID and everything created is removed
(containers by app label, images by fleet label, buckets), also when a test fails.
"""

from __future__ import annotations

import contextlib
import secrets
import signal
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import docker
import pytest
from docker.models.containers import Container

from tests.support.apps import push_app_image
from tests.support.configs import upload_launch_config
from tests.support.docker import (
    free_port,
    labelled_containers,
    remove_containers,
    remove_images,
)
from tests.support.process import Answer, WunderproxyProcess, wunderproxy
from tests.support.registry import RegistryFailed, RegistryServer, S3Storage
from tests.support.s3 import ACCESS_KEY, SECRET_KEY, aws_chain_at, create_bucket, delete_bucket
from wunderproxy.engine import LABEL_APP, LABEL_INSTANCE
from wunderproxy.store import S3Store

DEFAULT_SIZE = 3
DEFAULT_REVISIONS = ("rev1", "rev2")
STORE_PREFIX = "fleet"
FLEET_LABEL = "wunderproxy.fleet"
"""Labels the fleet's images (beside ``wunderproxy.test``), so that its clean-up removes its
own and no other test's."""

_T = TypeVar("_T")


@dataclass
class FleetHost:
    """One host of the fleet: its wunderproxy and its registry."""

    instance: str  # web-1, web-2, ...
    registry: RegistryServer
    process: WunderproxyProcess  # replaced by Fleet.restart

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.process.api_port}"

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.process.proxy_port}"

    @property
    def registry_port(self) -> int:
        return self.registry.port


class Fleet:
    """The hosts, the store they share, and helpers to deploy to all of them through the API."""

    def __init__(
        self,
        *,
        app: str,
        store_bucket: str,
        artifacts_bucket: str,
        secret: str,
        docker_client: docker.DockerClient,
        start_host: Callable[[str, int], WunderproxyProcess],
    ) -> None:
        self.app = app
        self.store_bucket = store_bucket
        self.prefix = STORE_PREFIX
        self.artifacts_bucket = artifacts_bucket
        self.secret = secret  # the --fallback-secret every host shares
        self.store = S3Store(store_bucket, STORE_PREFIX)
        self.hosts: list[FleetHost] = []
        self.hashes: dict[str, str] = {}  # revision -> hash of config(revision) in the store
        # Seconds each step of bringing the fleet up took: "registries" (all started and
        # answering), "images" (built and pushed), "wunderproxies" (all APIs answering).
        self.timings: dict[str, float] = {}
        self.image_label = ""  # FLEET_LABEL=ID: the label of this fleet's images
        self._docker = docker_client
        self._start_host = start_host

    def host(self, instance: str) -> FleetHost:
        """The host named ``instance``."""
        (found,) = (h for h in self.hosts if h.instance == instance)
        return found

    def image(self, host: FleetHost, revision: str) -> str:
        """The image ``host`` runs for ``revision``: from its own registry."""
        return f"{host.registry.address}/{self.app}:{revision}"

    def config(self, revision: str, **fields: Any) -> dict[str, Any]:
        """A launch config of the test app with no ``Image``: each host pulls
        ``localhost:ITS_REGISTRY_PORT/APP:REVISION``. Init makes it stop at once on SIGTERM."""
        config: dict[str, Any] = {
            "Revision": revision,
            "HostConfig": {"Init": True},
            "HealthCheckPath": "/health",
            "ArtifactsBucket": self.artifacts_bucket,
        }
        config.update(fields)
        return config

    def upload(self, config: dict[str, Any]) -> str:
        """Store ``config`` as ``container.HASH.json`` under the fleet's prefix; return HASH."""
        return upload_launch_config(self.store, config)

    def launch_all(self, config_hash: str) -> dict[str, Answer]:
        """``POST /launch`` on every host at once; the answers by instance."""
        return self._on_all(lambda host: host.process.launch(config_hash))

    def switch_all(self, config_hash: str) -> dict[str, Answer]:
        """``POST /switch`` on every host at once; the answers by instance."""
        return self._on_all(lambda host: host.process.switch(config_hash))

    def serve(self, revision: str) -> None:
        """Launch, then switch, ``revision`` on every host; fail naming any host that refused."""
        for step in (self.launch_all, self.switch_all):
            answers = step(self.hashes[revision])
            failed = {name: a.text for name, a in answers.items() if a.status != 200}
            assert not failed, f"{step.__name__} {revision} failed on {failed}"

    def containers(self, host: FleetHost) -> list[Container]:
        """Every container, in any state, that ``host``'s wunderproxy started."""
        return labelled_containers(
            self._docker, f"{LABEL_APP}={self.app}", f"{LABEL_INSTANCE}={host.instance}"
        )

    def restart(self, host: FleetHost) -> None:
        """Stop ``host``'s wunderproxy (SIGTERM: its container keeps running) and start it
        again with the same options and ports; return once its API answers."""
        code = host.process.stop()
        assert code == 0, f"{host.instance} exited with {code}:\n{host.process.log()}"
        host.process = self._start_host(host.instance, host.registry_port)
        host.process.wait_for_api()

    def stop_all(self) -> None:
        """SIGTERM every host's wunderproxy at once, then wait for each to exit (their
        containers keep running). Each takes about a second to stop; together, one."""
        for host in self.hosts:
            if host.process.process.poll() is None:
                host.process.process.send_signal(signal.SIGTERM)
        for host in self.hosts:
            host.process.stop()

    def _on_all(self, call: Callable[[FleetHost], _T]) -> dict[str, _T]:
        with ThreadPoolExecutor(max_workers=len(self.hosts)) as pool:
            results = list(pool.map(call, self.hosts))
        return {host.instance: result for host, result in zip(self.hosts, results, strict=True)}


@contextlib.contextmanager
def running_fleet(
    workdir: Path,
    s3_endpoint: str,
    docker_client: docker.DockerClient,
    app: str,
    labels: Mapping[str, str],
    *,
    size: int = DEFAULT_SIZE,
    revisions: Sequence[str] = DEFAULT_REVISIONS,
    extra: Sequence[str] = (),
) -> Iterator[Fleet]:
    """Bring up a fleet of ``size`` hosts serving nothing yet, with ``revisions`` of the test
    app pushed and their launch configs uploaded (``Fleet.hashes``); tear it all down at exit.

    ``app`` names the app (its containers are removed at exit, so make it unique); ``labels``
    go on the images built (include ``wunderproxy.test``); ``extra`` options go to every
    ``wunderproxy run``. The AWS chain of this process and its children points at
    ``s3_endpoint`` meanwhile.
    """
    timings: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        stack.enter_context(aws_chain_at(s3_endpoint))
        store_bucket = create_bucket("store")
        stack.callback(delete_bucket, store_bucket)
        artifacts_bucket = create_bucket("artifacts")
        stack.callback(delete_bucket, artifacts_bucket)
        # The registries sign the state of an upload in progress with this secret; one that
        # was begun through one registry can then go on through another.
        storage = S3Storage(
            s3_endpoint, artifacts_bucket, ACCESS_KEY, SECRET_KEY, secrets.token_hex(16)
        )
        with _timed(timings, "registries"):
            registries = _start_registries(stack, workdir, size, storage)

        fleet_id = uuid.uuid4().hex[:12]
        # Containers go before the images they run, and both after the processes stop.
        stack.callback(remove_images, docker_client, f"{FLEET_LABEL}={fleet_id}")
        stack.callback(remove_containers, docker_client, f"{LABEL_APP}={app}")
        starter = _Starter(
            stack,
            workdir,
            store_bucket,
            app,
            secrets.token_hex(16),
            tuple(extra),
            {instance: (free_port(), free_port()) for instance in registries},
        )
        fleet = Fleet(
            app=app,
            store_bucket=store_bucket,
            artifacts_bucket=artifacts_bucket,
            secret=starter.secret,
            docker_client=docker_client,
            start_host=starter,
        )
        fleet.timings = timings
        fleet.image_label = f"{FLEET_LABEL}={fleet_id}"
        with _timed(timings, "images"):
            first = next(iter(registries.values()))
            images = [f"{first.address}/{app}:{revision}" for revision in revisions]
            _push_all(docker_client, images, {**labels, FLEET_LABEL: fleet_id})
            fleet.hashes = {r: fleet.upload(fleet.config(r)) for r in revisions}

        with _timed(timings, "wunderproxies"):
            # All start at once and are waited for together: start-up costs about one, not N.
            fleet.hosts = [
                FleetHost(instance, registry, starter(instance, registry.port))
                for instance, registry in registries.items()
            ]
            stack.callback(fleet.stop_all)
            for host in fleet.hosts:
                host.process.wait_for_api()
        yield fleet


@contextlib.contextmanager
def _timed(timings: dict[str, float], step: str) -> Iterator[None]:
    began = time.monotonic()
    yield
    timings[step] = time.monotonic() - began


def _start_registries(
    stack: contextlib.ExitStack, workdir: Path, size: int, storage: S3Storage
) -> dict[str, RegistryServer]:
    """One registry per host, by instance name, all on ``storage``; stopped at exit."""
    registries = {}
    for number in range(1, size + 1):
        registry = RegistryServer(workdir / f"registry-{number}", free_port(), storage)
        stack.callback(registry.stop)
        registry.start()
        registries[f"web-{number}"] = registry
    return registries


def _push_all(client: docker.DockerClient, images: list[str], labels: Mapping[str, str]) -> None:
    """Build and push ``images`` at once: each waits mostly on the registry and S3."""
    with ThreadPoolExecutor(max_workers=len(images)) as pool:
        for pushed in [pool.submit(push_app_image, client, i, labels) for i in images]:
            pushed.result()


@dataclass(frozen=True)
class _Starter:
    """Starts a host's ``wunderproxy run`` with the fleet's options: every other host as a
    peer, one fallback secret, its own ports (the same again after a restart). The stack
    stops it at exit."""

    stack: contextlib.ExitStack
    workdir: Path
    store_bucket: str
    app: str
    secret: str
    extra: tuple[str, ...]
    ports: dict[str, tuple[int, int]]  # instance -> (proxy, API)

    def __call__(self, instance: str, registry_port: int) -> WunderproxyProcess:
        peers = [
            f"--peer=http://127.0.0.1:{proxy}"
            for other, (proxy, _) in self.ports.items()
            if other != instance
        ]
        return self.stack.enter_context(
            wunderproxy(
                self.workdir,
                self.store_bucket,
                STORE_PREFIX,
                self.app,
                registry_port,
                f"--instance={instance}",
                *peers,
                f"--fallback-secret={self.secret}",
                *self.extra,
                ports=self.ports[instance],
                wait_for_api=False,
            )
        )


@pytest.fixture
def fleet(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    s3_server: str,
    docker_client: docker.DockerClient,
    app_name: str,
    test_labels: dict[str, str],
) -> Iterator[Fleet]:
    """A fleet of three hosts (``@pytest.mark.fleet(size=..., revisions=..., extra=...)``
    changes that), nothing deployed yet, rev1 and rev2 pushed and uploaded."""
    marker = request.node.get_closest_marker("fleet")
    options = marker.kwargs if marker is not None else {}
    try:
        with running_fleet(
            tmp_path, s3_server, docker_client, app_name, test_labels, **options
        ) as started:
            yield started
    except RegistryFailed as exc:
        pytest.fail(str(exc), pytrace=False)
