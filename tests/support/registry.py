"""Debian's docker/distribution registry, started on a loopback port for tests, the demo
and the benchmarks."""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

START_TIMEOUT = 10.0


class RegistryFailed(RuntimeError):
    """The registry did not come up; the message quotes its log."""


def start_registry(root: Path, port: int) -> subprocess.Popen[bytes]:
    """Start ``docker-registry serve`` storing into ``root``; return once it answers."""
    root.mkdir(parents=True, exist_ok=True)
    config = root / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "storage:\n"
        f"  filesystem: {{rootdirectory: {root / 'data'}}}\n"
        "  delete: {enabled: true}\n"
        f"http: {{addr: '127.0.0.1:{port}'}}\n"
    )
    log = root / "registry.log"
    with log.open("wb") as out:
        # It panics at start-up when AWS_CA_BUNDLE is set, as it is on these machines.
        process = subprocess.Popen(
            ["env", "-u", "AWS_CA_BUNDLE", "docker-registry", "serve", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RegistryFailed(
                f"docker-registry exited with {process.returncode} at start-up; its log:\n"
                f"{log.read_text(errors='replace')}"
            )
        if registry_answers(port):
            return process
        time.sleep(0.05)
    stop_process(process)
    raise RegistryFailed(
        f"docker-registry did not answer /v2/ on 127.0.0.1:{port} within {START_TIMEOUT:g} s; "
        f"its log:\n{log.read_text(errors='replace')}"
    )


def registry_answers(port: int) -> bool:
    """True when a registry answers ``/v2/`` on 127.0.0.1:``port``."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1):
            return True
    except (urllib.error.URLError, OSError):
        return False


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """Stop a process we started, by its PID: SIGTERM, then SIGKILL after 5 s."""
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
