"""What a deploy costs the users: wrk load with and without a switch loop, side by side.

    python3 benchmarks/switch_under_load.py [--seconds 15] [--connections 32]

Starts a registry, pushes two revisions of the busybox test app, runs wunderproxy on a
file:// store, then runs wrk twice for the same time: once while nothing changes, once
while a loop launches and switches between the two revisions. It prints requests
served, failed requests (socket errors and non-2xx/3xx answers) and latency percentiles
of both runs. Everything it starts is stopped by PID, and the containers and images it
made (labelled) are removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.wrk import WrkResult, run_wrk
from tests.support.apps import push_app_image
from tests.support.configs import encode_config
from tests.support.docker import free_port, remove_containers
from tests.support.process import WunderproxyProcess, wunderproxy
from tests.support.registry import start_registry, stop_process
from wunderproxy.engine import LABEL_APP
from wunderproxy.store import FileStore, config_key

PREFIX = "bench"
REVISIONS = ("rev1", "rev2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each wrk run")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections")
    parser.add_argument("--switch-every", type=float, default=0.5, help="pause between switches")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    with (
        tempfile.TemporaryDirectory(prefix="wunderproxy-bench-") as work_dir,
        deployment(Path(work_dir)) as (running, hashes),
    ):
        direct_port = running.status()["current"]["port"]
        direct = run_wrk(
            f"http://127.0.0.1:{direct_port}/index.html", args.seconds, args.connections
        )
        url = f"http://127.0.0.1:{running.proxy_port}/index.html"
        steady = run_wrk(url, args.seconds, args.connections)
        with switching(running, hashes, args.switch_every) as switches:
            during = run_wrk(url, args.seconds, args.connections)
        status = running.status()

    rows = {
        "direct": (direct, 0),
        "no switches": (steady, 0),
        f"{len(switches)} switches": (during, len(switches)),
    }
    print(table(rows))
    print(f"\nproxy counted by status: {status['requests']['by_status']}")
    if args.json:
        figures = {name: result.as_dict() | {"switches": n} for name, (result, n) in rows.items()}
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


@contextlib.contextmanager
def deployment(work: Path) -> Iterator[tuple[WunderproxyProcess, dict[str, str]]]:
    """A registry with both revisions, and wunderproxy serving rev1 from a file:// store."""
    run_id = uuid.uuid4().hex[:8]
    labels = {"wunderproxy.bench": run_id}
    app = f"wp-bench-{run_id}"
    client = docker.from_env()
    registry_port = free_port()
    registry = start_registry(work / "registry", registry_port)
    try:
        store = FileStore(str(work / "store"), PREFIX)
        hashes = {}
        for revision in REVISIONS:
            image = f"localhost:{registry_port}/bench:{revision}"
            push_app_image(client, image, labels, revision=revision)
            config_hash, raw = encode_config(
                {
                    "Revision": revision,
                    "ContainerConfig": {"Image": image, "Env": [f"REVISION={revision}"]},
                    "HostConfig": {"Init": True},
                    "HealthCheckPath": "/health",
                }
            )
            store.put(config_key(config_hash), raw)
            hashes[revision] = config_hash
            if revision == REVISIONS[0]:
                store.put("current.json", raw)
        with wunderproxy(
            work, f"file://{work / 'store'}", PREFIX, app, registry_port, "--drain-timeout", "10"
        ) as running:
            running.wait_until_serving(REVISIONS[0])
            yield running, hashes
    finally:
        remove_containers(client, f"{LABEL_APP}={app}")
        for image in client.images.list(filters={"label": f"wunderproxy.bench={run_id}"}):
            with contextlib.suppress(docker.errors.NotFound):
                client.images.remove(str(image.id), force=True)
        stop_process(registry)


@contextlib.contextmanager
def switching(
    running: WunderproxyProcess, hashes: dict[str, str], pause: float
) -> Iterator[list[float]]:
    """Launch and switch between the revisions until the block ends; yields switch times."""
    stop = threading.Event()
    switches: list[float] = []

    def loop() -> None:
        number = 0
        while not stop.is_set():
            target = hashes[REVISIONS[(number + 1) % 2]]
            for step in (running.launch, running.switch):
                answer = step(target)
                if answer.status != 200:
                    raise SystemExit(f"{step.__name__} failed: {answer.text}")
            switches.append(time.monotonic())
            number += 1
            stop.wait(pause)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield switches
    finally:
        stop.set()
        thread.join(timeout=60)


def table(rows: dict[str, tuple[WrkResult, int]]) -> str:
    header = f"{'run':<14}{'requests':>10}{'failed':>8}{'req/s':>9}"
    header += f"{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'max ms':>9}"
    lines = [header]
    for name, (r, _) in rows.items():
        lines.append(
            f"{name:<14}{r.requests:>10}{r.failed:>8}{r.requests_per_second:>9.0f}"
            f"{r.p50_ms:>9.2f}{r.p90_ms:>9.2f}{r.p99_ms:>9.2f}{r.max_ms:>9.1f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
