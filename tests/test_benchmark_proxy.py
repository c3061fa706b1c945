"""benchmarks/proxy_only.py, the proxy the benchmarks measure, still starts and proxies:
its stand-in engine and store must keep up with what the server asks of them."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.support.process import http_call, proxy_only
from tests.support.waiting import wait_until


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
    with proxy_only(tmp_path, upstream) as running:
        wait_until(running.listening, "the benchmark proxy to listen", 20)
        answer = http_call(running.port, "GET", "/", timeout=5)
        assert (answer.status, answer.body) == (200, b"hello")
