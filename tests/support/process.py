"""wunderproxy itself as a subprocess, started through its CLI like an operator would."""

from __future__ import annotations

import http.client
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.build import assert_process_build
from tests.support.docker import free_port
from wunderproxy.supervisor import READY_TIMEOUT

# Starting three hosts of two workers each takes 5-10 s on two busy shared cores. Past the
# supervisor's own wait for its workers: a worker that never starts is then told by
# wunderproxy's own error in its log (it exits), not by this wait running out.
START_TIMEOUT = 2 * READY_TIMEOUT


@dataclass
class Answer:
    """A whole HTTP answer."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.body)


def http_call(
    port: int,
    method: str,
    path: str,
    body: bytes = b"",
    headers: Mapping[str, str] | None = None,
    timeout: float = 120.0,
) -> Answer:
    """One request to 127.0.0.1:port on a new connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body or None, headers=dict(headers or {}))
        response = connection.getresponse()
        return Answer(response.status, response.read(), dict(response.getheaders()))
    finally:
        connection.close()


def run_cli(*args: str, timeout: float = 180.0) -> subprocess.CompletedProcess[str]:
    """``python -m wunderproxy ARGS`` run to its end, as an operator runs a client command;
    it inherits this process's environment (the AWS_* the S3 fixture sets)."""
    return subprocess.run(
        [sys.executable, "-m", "wunderproxy", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@dataclass
class WunderproxyProcess:
    """A running ``wunderproxy run``; its log is in ``log_path``."""

    process: subprocess.Popen[bytes]
    proxy_port: int
    api_port: int
    log_path: Path

    @property
    def api_url(self) -> str:
        """The manager's URL, as ``--host`` takes it."""
        return f"http://127.0.0.1:{self.api_port}"

    def get(self, path: str, **kwargs: Any) -> Answer:
        """A request through the proxy."""
        return http_call(self.proxy_port, "GET", path, **kwargs)

    def api(self, method: str, path: str, body: str = "", **kwargs: Any) -> Answer:
        """A request to the manager API."""
        return http_call(self.api_port, method, path, body.encode(), **kwargs)

    def status(self) -> dict[str, Any]:
        answer = self.api("GET", "/status")
        assert answer.status == 200, answer.text
        document: dict[str, Any] = answer.json()
        return document

    def launch(self, config_hash: str) -> Answer:
        return self.api("POST", "/launch", config_hash)

    def switch(self, config_hash: str) -> Answer:
        return self.api("POST", "/switch", config_hash)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_api(self) -> None:
        """Wait until the manager API answers; fail if the process exits first, or runs
        another build than the tests (see tests/support/build.py)."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"wunderproxy exited at start:\n{self.log()}")
            try:
                status = http_call(self.api_port, "GET", "/status", timeout=1)
            except OSError:
                time.sleep(0.05)
                continue
            assert_process_build(status.json(), self.log())
            return
        raise AssertionError(f"wunderproxy API not up after {START_TIMEOUT} s:\n{self.log()}")

    def wait_until_serving(self, revision: str, timeout: float = 60.0) -> None:
        """Wait until /status says ``revision`` serves."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            current = self.status()["current"]
            if current is not None and current["revision"] == revision:
                return
            assert self.process.poll() is None, f"wunderproxy exited:\n{self.log()}"
            time.sleep(0.1)
        raise AssertionError(f"revision {revision} not serving after {timeout} s:\n{self.log()}")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM by PID, wait, return the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


def end_by_sigterm(process: subprocess.Popen[str], grace: float) -> str:
    """SIGTERM ``process`` (by PID) so that it cleans up, and return its remaining output;
    SIGKILL it as a last resort if it has not exited after ``grace`` seconds."""
    process.terminate()
    try:
        output, _ = process.communicate(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    return output


def revision_served(running: WunderproxyProcess) -> str:
    """What the test app's ``/cgi-bin/revision`` answers through the proxy
    (``revision=REV``); fails on any status but 200."""
    answer = running.get("/cgi-bin/revision")
    assert answer.status == 200, f"proxy port {running.proxy_port}: {answer.status} {answer.text}"
    return answer.text.strip()


@contextmanager
def wunderproxy(
    tmp_path: Path,
    bucket: str,
    prefix: str,
    app: str,
    registry_port: int,
    *extra: str,
    env: Mapping[str, str] | None = None,
    ports: tuple[int, int] | None = None,
    open_files: int | None = None,
    wait_for_api: bool = True,
    workers: int = 1,
) -> Iterator[WunderproxyProcess]:
    """Start ``python -m wunderproxy run``; stop it at the end.

    It runs ``--workers 1`` (one process, whatever the CPU count of the machine, so that a
    test means the same everywhere) unless ``workers`` asks for more.

    It listens on ``ports`` (proxy, API) if given, e.g. to take over from another
    process, else on free loopback ports. ``open_files`` sets its open-file limit (soft
    and hard) before it starts. It is handed over once its API answers, or at once without
    ``wait_for_api`` (to watch what its first connections get).
    """
    proxy_port, api_port = ports or (free_port(), free_port())
    log_path = tmp_path / f"wunderproxy-{api_port}-{time.monotonic_ns()}.log"
    command = [
        sys.executable,
        "-m",
        "wunderproxy",
        "run",
        bucket,
        prefix,
        app,
        "--proxy",
        f"127.0.0.1:{proxy_port}",
        "--api",
        f"127.0.0.1:{api_port}",
        "--registry-port",
        str(registry_port),
        "--health-timeout",
        "20",
        "--stop-timeout",
        "1",
        "--workers",
        str(workers),
        *extra,
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            preexec_fn=None if open_files is None else lambda: _limit_open_files(open_files),
        )
    running = WunderproxyProcess(process, proxy_port, api_port, log_path)
    try:
        if wait_for_api:
            running.wait_for_api()
        yield running
    finally:
        if process.poll() is None:
            running.stop()


def _limit_open_files(count: int) -> None:
    """In the child, before exec: at most ``count`` open files, with no way to raise it."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (count, count))


PROXY_ONLY = Path(__file__).resolve().parents[2] / "benchmarks" / "proxy_only.py"


@dataclass
class ProxyOnly:
    """A running ``benchmarks/proxy_only.py``: the production server before a fixed upstream."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def listening(self) -> bool:
        """True once the proxy accepts connections; fails if the process exited."""
        assert self.process.poll() is None, f"proxy_only.py exited:\n{self.log()}"
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def proxy_only(
    tmp_path: Path, upstream_port: int, *options: str, max_file_size: int | None = None
) -> Iterator[ProxyOnly]:
    """Start ``benchmarks/proxy_only.py`` on a free port before 127.0.0.1:upstream_port with
    these options (its own or ``wunderproxy run``'s); stopped by its PID at the end.

    ``max_file_size`` limits the size of any file it writes (RLIMIT_FSIZE: past it, a
    write fails with EFBIG, as on a full disk). Use :meth:`ProxyOnly.listening` to wait.
    """
    port = free_port()
    log_path = tmp_path / f"proxy_only-{port}.log"
    command = [
        sys.executable,
        str(PROXY_ONLY),
        *("--listen", f"127.0.0.1:{port}"),
        *("--upstream", f"127.0.0.1:{upstream_port}"),
        *("--api", f"127.0.0.1:{free_port()}"),
        *options,
    ]
    limit = max_file_size
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=None
            if limit is None
            else lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
        )
    try:
        yield ProxyOnly(process, port, log_path)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
