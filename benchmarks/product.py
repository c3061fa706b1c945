"""The real product end to end: ``wunderproxy run`` in front of a real container, under wrk.

    python3 benchmarks/product.py [--seconds 8] [--json out.json] [--only SCENARIO ...]
        [--modes bridge host]

``benchmarks/suite.py`` measures the proxy alone before a native backend. This measures what
an operator runs: a local registry (docker/distribution) holding an app image, the launch
config in a ``file://`` store, and wunderproxy started by its CLI, which pulls nothing (the
image is local too), launches the container, health-checks it and proxies to it. The app is
this machine's nginx in a container (``benchmarks/nginx_image.py``), pinned to core 0 with
``HostConfig.CpusetCpus``, once per network mode:

- ``bridge``: the container's own network; Docker publishes the app port on 127.0.0.1 and its
  userland proxy (``docker-proxy``) copies every byte of every connection;
- ``host``: ``HostConfig.NetworkMode: "host"``; the app listens on 127.0.0.1:$PORT, the
  port wunderproxy picked, and is reached without that hop.

Per mode the targets, measured in turn with the suite's wrk runs and CPU accounting, are:
``direct`` (wrk to the container's port: the published one through docker-proxy, or the host
port), ``nginx`` (the suite's reverse proxy, upstream keep-alive, to the same port), and
wunderproxy with ``--workers 1`` and ``--workers 2``; for a new connection per request also
both with ``--keep-upstream``. Every wunderproxy after the first adopts the container the
first launched, so that all proxy the same one. Servers are pinned to core 0, wrk to core 1.

CPU µs/req is each target's own process tree (wunderproxy: the process and every worker it
starts; nginx: master and worker); the container's is in the JSON as the backend's. In
bridge mode docker-proxy serves every target's requests, direct ones included, and is no
target's own process: its CPU per request is a column of its own, a cost the product pays
on top. Everything started is stopped by PID at the end, and the containers and images,
labelled ``wunderproxy.bench``, are removed, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import suite
from benchmarks.nginx_image import APP_PORT, HEALTH_PATH, build_nginx_image
from benchmarks.peers import (
    HOST,
    Peer,
    free_port,
    loads_library,
    process_tree,
    raise_open_files,
    start_nginx_proxy,
    start_peer,
    wait_until_answers,
)
from benchmarks.suite import (
    OPEN_FILES,
    SERVER_CPU,
    Sides,
    Target,
    header,
    log_problems,
    logs_report,
    machine_facts,
    parsed,
    progress,
    run_options,
    run_scenario,
    scenario_table,
    stop_on_sigterm,
)
from tests.support.apps import push_image
from tests.support.configs import upload_launch_config
from tests.support.docker import remove_containers, remove_images
from tests.support.registry import start_registry, stop_process
from wunderproxy.engine import LABEL_APP
from wunderproxy.store import FileStore

MODES = ("bridge", "host")
SCENARIOS = {name: suite.SCENARIOS[name] for name in ("small-keepalive", "new-connection")}
# --keep-upstream only changes what a client's Connection: close does to the upstream side.
KEEP_UPSTREAM_SCENARIOS = ("new-connection",)
BENCH_LABEL = "wunderproxy.bench"
PREFIX = "bench"
REVISION = "v1"
DOCKER_PROXY = "docker-proxy"
SERVING_TIMEOUT = 60.0  # seconds for the first wunderproxy to launch its container


@dataclass(frozen=True)
class Variant:
    """One way to run wunderproxy: its worker processes and ``--keep-upstream``."""

    workers: int
    keep_upstream: bool = False

    @property
    def name(self) -> str:
        return f"wunderproxy-w{self.workers}" + ("+keep" if self.keep_upstream else "")

    def options(self) -> list[str]:
        keep = ["--keep-upstream"] if self.keep_upstream else []
        return ["--workers", str(self.workers), *keep]


VARIANTS = (Variant(1), Variant(2), Variant(1, keep_upstream=True), Variant(2, keep_upstream=True))


@dataclass
class ContainerTarget:
    """The app container as a wrk target: reached on ``port`` of 127.0.0.1, its processes
    found through Docker (its main process and descendants, as the host sees them)."""

    name: str
    port: int
    container_id: str
    client: docker.DockerClient

    def _state(self) -> dict[str, Any]:
        state: dict[str, Any] = self.client.api.inspect_container(self.container_id)["State"]
        return state

    def alive(self) -> bool:
        return bool(self._state().get("Running"))

    def pids(self) -> list[int]:
        pid = int(self._state().get("Pid") or 0)
        return process_tree(pid) if pid else []

    def url(self, path: str) -> str:
        return f"http://{HOST}:{self.port}{path}"


def docker_proxy_pids(port: int) -> list[int]:
    """The ``docker-proxy`` processes that publish ``port`` (read from their command lines)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        if argv[0].endswith(DOCKER_PROXY.encode()) and b"-host-port" in argv:
            at = argv.index(b"-host-port")
            if argv[at + 1 : at + 2] == [str(port).encode()]:
                found.append(int(entry.name))
    return found


def launch_config(image: str, mode: str, labels: dict[str, str]) -> dict[str, Any]:
    """The app's launch config in ``mode``, its container pinned to the servers' core."""
    host_config: dict[str, Any] = {"CpusetCpus": str(SERVER_CPU)}
    container_config: dict[str, Any] = {"Image": image, "Labels": labels}
    if mode == "host":
        host_config["NetworkMode"] = "host"
    else:
        container_config["ExposedPorts"] = {APP_PORT: {}}
    return {
        "Revision": REVISION,
        "ContainerConfig": container_config,
        "HostConfig": host_config,
        "HealthCheckPath": HEALTH_PATH,
    }


@dataclass(frozen=True)
class Bench:
    """What every mode shares: the Docker client, the image in the registry, the labels."""

    client: docker.DockerClient
    work: Path
    image: str
    registry_port: int
    labels: dict[str, str]


@contextlib.contextmanager
def bench_image(work: Path) -> Iterator[Bench]:
    """A registry on a free loopback port holding the app image; at the end, the registry
    is stopped and every container and image labelled for this run is removed."""
    labels = {BENCH_LABEL: uuid.uuid4().hex[:12]}
    label = f"{BENCH_LABEL}={labels[BENCH_LABEL]}"
    # Clean-up steps run last-in first-out, each even when one before it (or the run) failed:
    # a Docker error removing containers must not leave the registry running.
    with contextlib.ExitStack() as cleanup:
        client = docker.from_env()
        cleanup.callback(client.close)
        registry_port = free_port()
        registry = start_registry(work / "registry", registry_port)
        cleanup.callback(stop_process, registry)
        cleanup.callback(remove_images, client, label)
        cleanup.callback(remove_containers, client, label)
        image = f"localhost:{registry_port}/wp-bench-nginx:{REVISION}"
        progress(f"building and pushing {image}")
        build_nginx_image(client, image, labels)
        push_image(client, image)
        yield Bench(client, work, image, registry_port, labels)


def start_product(bench: Bench, app: str, variant: Variant, directory: Path) -> Product:
    """``python -m wunderproxy run file://STORE PREFIX APP`` on free loopback ports."""
    directory.mkdir(parents=True)
    port, api_port = free_port(), free_port()
    command = [sys.executable, "-m", "wunderproxy", "run", f"file://{bench.work / 'store'}"]
    command += [f"{PREFIX}/{app}", app, "--proxy", f"{HOST}:{port}", "--api", f"{HOST}:{api_port}"]
    command += ["--registry-port", str(bench.registry_port), "--health-timeout", "30"]
    command += ["--stop-timeout", "1", "--log-level", "warning", *variant.options()]
    # A host-network app is a loopback peer of the API: wunderproxy warns unless a token is set.
    command += ["--api-token", bench.labels[BENCH_LABEL]]
    peer = start_peer(variant.name, port, command, directory / "wunderproxy.log", SERVER_CPU)
    peer.versions = f"Python {sys.version.split()[0]}"
    return Product(peer, api_port)


@dataclass(frozen=True)
class Product:
    """A started wunderproxy: the proxy as a wrk target, and where its manager API listens."""

    peer: Peer
    api_port: int

    def serving_container(self) -> str | None:
        """The id of the container its proxy forwards to (``/status`` current), or None."""
        connection = http.client.HTTPConnection(HOST, self.api_port, timeout=5)
        try:
            connection.request("GET", "/status")
            current = json.loads(connection.getresponse().read())["current"]
        finally:
            connection.close()
        return None if current is None else str(current["container_id"])


def adoption_problem(running: Sequence[str], serving: dict[str, str | None]) -> str | None:
    """Why the wunderproxies of a mode do not all proxy to one container, or None if they do.

    ``running`` are the ids of the app's running containers; ``serving`` maps each
    wunderproxy to the container it forwards to. A second container, or one wunderproxy
    forwarding elsewhere, would make the mode's figures compare different backends.
    """
    if len(running) != 1:
        return f"{len(running)} containers of the app run, not 1: {sorted(running)}"
    [container] = running
    elsewhere = {name: found for name, found in serving.items() if found != container}
    if elsewhere:
        return f"not every wunderproxy adopted container {container[:12]}: " + ", ".join(
            f"{name} serves {found}" for name, found in sorted(elsewhere.items())
        )
    return None


def wait_until_serving(peer: Peer, timeout: float = SERVING_TIMEOUT) -> None:
    """Poll the proxy until it answers 200 (503 while its container launches)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not peer.alive():
            raise RuntimeError(f"{peer.name} exited:\n{peer.log_tail(20)}")
        connection = http.client.HTTPConnection(HOST, peer.port, timeout=2)
        try:
            connection.request("GET", HEALTH_PATH)
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass
        finally:
            connection.close()
        time.sleep(0.2)
    raise RuntimeError(f"{peer.name} not serving after {timeout:g} s:\n{peer.log_tail(20)}")


def served_container(bench: Bench, app: str, mode: str) -> ContainerTarget:
    """The one running container of ``app``, and the port the proxy reaches it on."""
    [container] = bench.client.containers.list(filters={"label": f"{LABEL_APP}={app}"})
    attrs = container.attrs
    if mode == "host":
        env = dict(entry.split("=", 1) for entry in attrs["Config"]["Env"] if "=" in entry)
        port = int(env["PORT"])
    else:
        port = int(attrs["NetworkSettings"]["Ports"][APP_PORT][0]["HostPort"])
    return ContainerTarget("direct", port, str(container.id), bench.client)


def check_adopted(bench: Bench, app: str, products: Sequence[Product]) -> None:
    """Fail the run unless every wunderproxy forwards to the one running container."""
    running = bench.client.containers.list(filters={"label": f"{LABEL_APP}={app}"})
    serving = {product.peer.name: product.serving_container() for product in products}
    problem = adoption_problem([str(c.id) for c in running], serving)
    if problem is not None:
        raise RuntimeError(f"{app}: {problem}; the figures would not compare one backend")


@contextlib.contextmanager
def running_mode(
    bench: Bench, mode: str, variants: Sequence[Variant]
) -> Iterator[tuple[dict[str, Target], Sides]]:
    """The container in ``mode`` and every target in front of it, answering; stopped by PID
    at the end (the container is left to :func:`bench_image`'s clean-up)."""
    app = f"wp-bench-{mode}-{bench.labels[BENCH_LABEL]}"
    store = FileStore(bench.work / "store", f"{PREFIX}/{app}")
    upload_launch_config(store, launch_config(bench.image, mode, bench.labels), current=True)
    directory = bench.work / mode
    # Stops run last-in first-out, each even when one before it failed; the container goes
    # last, so that the next mode runs alone.
    with contextlib.ExitStack() as stops:
        stops.callback(remove_containers, bench.client, f"{LABEL_APP}={app}")

        def started(product: Product) -> Product:
            stops.callback(product.peer.stop)
            return product

        first, *others = variants
        products = [started(start_product(bench, app, first, directory / first.name))]
        wait_until_serving(products[0].peer)
        container = served_container(bench, app, mode)
        # The others adopt the container the first launched: all proxy to the same one.
        for variant in others:
            products.append(started(start_product(bench, app, variant, directory / variant.name)))
        for product in products:
            wait_until_serving(product.peer)
        check_adopted(bench, app, products)
        nginx = start_nginx_proxy(directory, container, SERVER_CPU)
        stops.callback(nginx.stop)
        wait_until_answers(nginx)
        peers = [nginx, *(product.peer for product in products)]
        targets: dict[str, Target] = {"direct": container, **{p.name: p for p in peers}}
        sides: Sides = {}
        if mode == "bridge":
            sides = {DOCKER_PROXY: lambda: docker_proxy_pids(container.port)}
        yield targets, sides


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = run_options(__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=list(SCENARIOS), help="run only these")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    return parsed(parser, argv)


def targets_for(scenario: str, targets: dict[str, Target]) -> dict[str, Target]:
    """The targets a scenario measures: ``--keep-upstream`` ones only where it matters."""
    if scenario in KEEP_UPSTREAM_SCENARIOS:
        return targets
    return {name: target for name, target in targets.items() if not name.endswith("+keep")}


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_arguments(argv)
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    chosen = args.only or list(SCENARIOS)
    open_files = raise_open_files(OPEN_FILES)
    started = time.monotonic()
    figures: dict[str, Any] = {"modes": {}}
    with (
        tempfile.TemporaryDirectory(prefix="wunderproxy-product-") as work_dir,
        bench_image(Path(work_dir)) as bench,
    ):
        figures["labels"] = bench.labels
        for mode in args.modes:
            with running_mode(bench, mode, VARIANTS) as (targets, sides):
                peers = {name: t for name, t in targets.items() if isinstance(t, Peer)}
                facts = machine_facts() | {
                    "open_files_limit": open_files,
                    "nginx": peers["nginx"].versions,
                    "wunderproxy_uvloop": loads_library(
                        peers[VARIANTS[0].name].process.pid, "uvloop"
                    ),
                }
                figures["machine"] = facts
                print(f"\n##### {mode} network", flush=True)
                print(header(facts, args.seconds, args.warmup), flush=True)
                measured: dict[str, Any] = {}
                for name in chosen:
                    scenario = SCENARIOS[name]
                    chosen_targets = targets_for(name, targets)
                    results = run_scenario(
                        scenario, chosen_targets, bench.work, args.seconds, args.warmup, sides
                    )
                    measured[name] = {t: m.as_dict() for t, m in results.items()}
                    print(f"\n{scenario_table(scenario, results)}", flush=True)
                logs = log_problems(peers)
                print(f"\n{logs_report(logs)}", flush=True)
                figures["modes"][mode] = {"scenarios": measured, "logs": logs}
    figures["elapsed_seconds"] = time.monotonic() - started
    print(f"\ntotal {figures['elapsed_seconds']:.0f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
