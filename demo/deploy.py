"""Deploy a sample app through wunderproxy on this machine, the way an operator would.

Run by ``demo/run.sh`` after set-up. It starts a local registry (unless one answers on the
registry port), pushes two revisions of a tiny busybox app (the one the tests deploy),
writes their launch configs into a ``file://`` store, starts ``wunderproxy run`` and deploys
revision 2 with the CLI. wunderproxy is left running so that you can look around.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import docker

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.apps import push_app_image  # the app the tests deploy
from tests.support.registry import registry_answers, start_registry
from wunderproxy.launchconfig import md5_hex

WORK = Path(os.environ.get("WUNDERPROXY_DEMO_DIR", "/tmp/wunderproxy-demo"))
REGISTRY_PORT = int(os.environ.get("WUNDERPROXY_DEMO_REGISTRY_PORT", "8080"))
PROXY = os.environ.get("WUNDERPROXY_DEMO_PROXY", "127.0.0.1:8000")
API = os.environ.get("WUNDERPROXY_DEMO_API", "127.0.0.1:8001")
APP = "sample"
PREFIX = "sample"
DEMO_LABEL = {"wunderproxy.demo": "1"}


def main() -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    stop_previous_demo()
    ensure_registry()
    hashes = [publish_revision(revision) for revision in ("rev1", "rev2")]
    store = WORK / "store" / PREFIX
    (store / "current.json").write_bytes((store / f"container.{hashes[0]}.json").read_bytes())
    step(f"starting wunderproxy: proxy on {PROXY}, API on {API}")
    log_path = WORK / "wunderproxy.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "wunderproxy", "run", f"file://{WORK / 'store'}", PREFIX, APP,
             "--proxy", PROXY, "--api", API, "--registry-port", str(REGISTRY_PORT),
             "--access-log", str(WORK / "access.log")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    (WORK / "wunderproxy.pid").write_text(f"{process.pid}\n")
    wait_for(lambda: revision_served() == "revision=rev1", "rev1 to serve (current.json)")
    step(f"current.json came up: GET http://{PROXY}/cgi-bin/revision -> {revision_served()}")
    cli("launch", hashes[1])
    cli("switch", hashes[1])
    step(f"after the switch: GET http://{PROXY}/cgi-bin/revision -> {revision_served()}")
    cli("status")
    print(
        f"""
wunderproxy runs as PID {process.pid}. Where to look:
  the app through the proxy   curl http://{PROXY}/cgi-bin/revision
  what runs                   wunderproxy status --api http://{API}
  the status page             http://{API}/ in a browser
  the status JSON             curl http://{API}/status
  Prometheus metrics          curl http://{API}/metrics
  the log                     {log_path}
  the access log              {WORK / "access.log"}
  the store (launch configs)  {store}
  roll back to rev1           wunderproxy launch {hashes[0]} && wunderproxy switch {hashes[0]}
  stop it (the app container keeps running; remove it with
  docker rm -f $(docker ps -q --filter label=wunderproxy.app={APP}))
                              kill {process.pid}
"""
    )


def step(message: str) -> None:
    print(f"== {message}", flush=True)


def stop_previous_demo() -> None:
    """Stop the wunderproxy an earlier run of this demo started (by its PID)."""
    pid_file = WORK / "wunderproxy.pid"
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text())
    pid_file.unlink()
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    step(f"stopped the wunderproxy of an earlier demo run (PID {pid})")
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), "the earlier wunderproxy to exit")


def ensure_registry() -> None:
    """Use the registry on REGISTRY_PORT, or start Debian's docker-registry there."""
    if registry_answers(REGISTRY_PORT):
        step(f"using the registry that answers on localhost:{REGISTRY_PORT}")
        return
    process = start_registry(WORK / "registry", REGISTRY_PORT)
    step(f"started a registry on localhost:{REGISTRY_PORT} (PID {process.pid})")


def publish_revision(revision: str) -> str:
    """Build and push the sample app's ``revision``; store its launch config; its hash."""
    image = f"localhost:{REGISTRY_PORT}/{APP}:{revision}"
    push_app_image(docker.from_env(), image, DEMO_LABEL, revision=revision)
    config = {
        "Revision": revision,
        "ContainerConfig": {"Env": [f"REVISION={revision}"]},
        "HostConfig": {"Init": True},
        "HealthCheckPath": "/health",
    }
    raw = json.dumps(config, indent=2).encode() + b"\n"
    config_hash = md5_hex(raw)
    store = WORK / "store" / PREFIX
    store.mkdir(parents=True, exist_ok=True)
    (store / f"container.{config_hash}.json").write_bytes(raw)
    step(f"pushed {image}; launch config container.{config_hash}.json")
    return config_hash


def cli(*args: str) -> None:
    step("wunderproxy " + " ".join(args))
    subprocess.run(
        [sys.executable, "-m", "wunderproxy", *args, "--api", f"http://{API}"], check=True
    )


def revision_served() -> str:
    try:
        with urllib.request.urlopen(f"http://{PROXY}/cgi-bin/revision", timeout=5) as answer:
            return str(answer.read().decode().strip())
    except (OSError, urllib.error.URLError):
        return ""


def wait_for(condition: object, what: str, timeout: float = 60.0) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    sys.exit(f"gave up waiting for {what} after {timeout:g} s; see the logs in {WORK}")


if __name__ == "__main__":
    main()
