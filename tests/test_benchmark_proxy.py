"""benchmarks/proxy_only.py, the proxy the benchmarks measure, still starts and proxies:
its stand-in engine and store must keep up with what the server asks of them."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.support.docker import free_port
from tests.support.process import http_call

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "proxy_only.py"


class Hello(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "5")
        self.end_headers()
        self.wfile.write(b"hello")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def upstream() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_the_benchmark_proxy_starts_and_forwards_to_its_upstream(
    upstream: int, tmp_path: Path
) -> None:
    proxy_port, api_port = free_port(), free_port()
    log_path = tmp_path / "proxy_only.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                str(SCRIPT),
                *("--listen", f"127.0.0.1:{proxy_port}"),
                *("--upstream", f"127.0.0.1:{upstream}"),
                *("--api", f"127.0.0.1:{api_port}"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, log_path.read_text()
            try:
                answer = http_call(proxy_port, "GET", "/", timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline, "the benchmark proxy did not listen"
                time.sleep(0.1)
        assert (answer.status, answer.body) == (200, b"hello")
    finally:
        process.terminate()
        process.wait(10)
