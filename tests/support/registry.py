"""Debian's docker/distribution registry, started on a loopback port for tests, the demo
and the benchmarks: storing in a directory, or in an S3 bucket that several share."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT = 10.0

# An access-log line of the registry: 127.0.0.1 - - [date] "PUT /v2/app/manifests/rev1 HTTP/1.1" 201
_ACCESS_LINE = re.compile(r'^\S+ \S+ \S+ \[[^]]*\] "([A-Z]+) (\S+) HTTP/[0-9.]+" (\d{3}) ')


class RegistryFailed(RuntimeError):
    """The registry did not come up; the message quotes its log."""


@dataclass(frozen=True)
class S3Storage:
    """docker/distribution's ``s3`` storage driver on a bucket of a plain-HTTP S3 server.

    Registries that share the bucket (and ``http_secret``, which signs the state of an upload
    in progress) serve the same images: what is pushed through one is pulled through any.
    """

    endpoint: str  # http://127.0.0.1:PORT
    bucket: str
    access_key: str
    secret_key: str
    http_secret: str
    region: str = "us-east-1"

    def yaml(self) -> str:
        """The ``storage.s3`` mapping of the registry's config, indented for ``storage:``."""
        # regionendpoint implies path-style addressing (distribution 2.8); secure: false for
        # plain HTTP; v4auth: SigV4, which S3 servers require.
        return (
            "  s3:\n"
            f"    regionendpoint: '{self.endpoint}'\n"
            f"    region: {self.region}\n"
            f"    bucket: {self.bucket}\n"
            f"    accesskey: {self.access_key}\n"
            f"    secretkey: {self.secret_key}\n"
            "    secure: false\n"
            "    v4auth: true\n"
            # Blobs come through the registry, not as presigned S3 redirects the engine
            # would have to follow to the S3 server itself.
            "  redirect: {disable: true}\n"
        )


def registry_config(root: Path, port: int, storage: S3Storage | None = None) -> str:
    """The registry's YAML config: listen on 127.0.0.1:``port``, store in ``storage`` or
    under ``root/data``."""
    if storage is None:
        stored = f"  filesystem: {{rootdirectory: {root / 'data'}}}\n"
        secret = ""
    else:
        stored = storage.yaml()
        secret = f", secret: {storage.http_secret}"
    return (
        "version: 0.1\n"
        "storage:\n"
        f"{stored}"
        "  delete: {enabled: true}\n"
        f"http: {{addr: '127.0.0.1:{port}'{secret}}}\n"
    )


def start_registry(
    root: Path, port: int, storage: S3Storage | None = None
) -> subprocess.Popen[bytes]:
    """Start ``docker-registry serve`` with its config and log in ``root``, storing into
    ``storage`` or else ``root/data``; return once it answers."""
    if shutil.which("docker-registry") is None:
        raise RegistryFailed(
            "docker-registry is not installed: apt-get install -y docker-registry (.ci/setup does)"
        )
    root.mkdir(parents=True, exist_ok=True)
    config = root / "config.yml"
    config.write_text(registry_config(root, port, storage))
    log = root / "registry.log"
    # Appended to, so that a registry started again keeps the story of its first run.
    with log.open("ab") as out:
        # Its s3 driver panics at start-up when AWS_CA_BUNDLE is set, as it is on these
        # machines (LoadCustomCABundleError); the filesystem driver does not mind.
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


class RegistryServer:
    """One registry on a fixed port that a test can stop and start again, and whose access
    log says which requests it served."""

    def __init__(self, root: Path, port: int, storage: S3Storage | None = None) -> None:
        self.root = root
        self.port = port
        self.storage = storage
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """``localhost:PORT``, the form image references use."""
        return f"localhost:{self.port}"

    @property
    def log(self) -> Path:
        return self.root / "registry.log"

    def start(self) -> None:
        """Start it (again) on its port; return once it answers."""
        assert self._process is None, f"registry on port {self.port} runs already"
        self._process = start_registry(self.root, self.port, self.storage)

    def stop(self) -> None:
        """Stop it by its PID; a stopped registry is left as it is."""
        if self._process is not None:
            stop_process(self._process)
            self._process = None

    def requests(self) -> list[tuple[str, str, int]]:
        """``(method, path, status)`` of every request in its access log, oldest first."""
        lines = self.log.read_text(errors="replace").splitlines()
        found = (_ACCESS_LINE.match(line) for line in lines)
        return [(m[1], m[2], int(m[3])) for m in found if m is not None]


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
