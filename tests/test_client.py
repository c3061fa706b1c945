"""The client commands against servers that are not a wunderproxy manager, or not only:
whatever answers, the operator reads a message, never a Python traceback."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.support.docker import free_port
from wunderproxy import client as client_module
from wunderproxy.client import ClientError, ManagerClient
from wunderproxy.config import Fleet, Peer
from wunderproxy.fallback import Fallback
from wunderproxy.state import ProxyState

HASH = "0123456789abcdef0123456789abcdef"

WELCOME_PAGE = b"""<!DOCTYPE html>
<html><head><title>Welcome to nginx!</title></head>
<body><h1>Welcome to nginx!</h1><p>If you see this page, the web server works.</p></body>
</html>
"""
BAD_GATEWAY_PAGE = b"""<html>\r
<head><title>502 Bad Gateway</title></head>\r
<body>\r
<center><h1>502 Bad Gateway</h1></center>\r
<hr><center>nginx/1.22.1</center>\r
</body>\r
</html>\r
"""


@dataclass
class Canned:
    """What the server answers to every request."""

    status: int
    content_type: str
    body: bytes


class CannedServer:
    """A real HTTP server on 127.0.0.1 that answers every request with ``canned``."""

    def __init__(self) -> None:
        self.canned = Canned(200, "text/plain", b"")
        self.requests: list[tuple[str, str, bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                outer.requests.append((self.command, self.path, self.rfile.read(length)))
                self.send_response(outer.canned.status)
                self.send_header("Content-Type", outer.canned.content_type)
                self.send_header("Content-Length", str(len(outer.canned.body)))
                self.end_headers()
                self.wfile.write(outer.canned.body)

            do_GET = do_POST = _answer

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def answer(self, status: int, content_type: str, body: bytes) -> None:
        self.canned = Canned(status, content_type, body)


@pytest.fixture
def canned() -> Iterator[CannedServer]:
    server = CannedServer()
    server.thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()


def wunderproxy_client(*args: str) -> subprocess.CompletedProcess[str]:
    """A client command run as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "wunderproxy", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_says(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


@pytest.mark.parametrize(
    "command", [("status",), ("launch", HASH), ("switch", HASH)], ids=lambda c: c[0]
)
def test_a_page_of_html_answered_200_is_named_by_its_title_not_a_traceback(
    canned: CannedServer, command: tuple[str, ...]
) -> None:
    canned.answer(200, "text/html", WELCOME_PAGE)
    result = wunderproxy_client(*command, "--api", canned.url)
    assert_says(result, "answered 200 but not with a JSON object", "text/html", "Welcome to nginx!")
    assert "<title>" not in result.stderr
    assert "--api" in result.stderr


def test_an_error_page_of_a_proxy_in_front_is_shown_by_its_status_and_title(
    canned: CannedServer,
) -> None:
    canned.answer(502, "text/html", BAD_GATEWAY_PAGE)
    result = wunderproxy_client("launch", HASH, "--api", canned.url)
    assert_says(result, "Error: 502: 502 Bad Gateway")
    assert "<" not in result.stderr


def test_a_long_plain_text_answer_is_cut_short(canned: CannedServer) -> None:
    canned.answer(200, "text/plain", b"not json " * 1000)
    result = wunderproxy_client("status", "--api", canned.url)
    assert_says(result, "not json not json")
    assert len(result.stderr) < 600


def test_json_that_is_not_a_wunderproxy_status_is_named_as_such(canned: CannedServer) -> None:
    canned.answer(200, "application/json", b'{"status": "green"}')
    result = wunderproxy_client("status", "--api", canned.url)
    assert_says(result, "not a wunderproxy status", "--json")


def test_json_without_a_message_after_a_launch_is_named_as_such(canned: CannedServer) -> None:
    canned.answer(200, "application/json", b'{"started": true}')
    result = wunderproxy_client("launch", HASH, "--api", canned.url)
    assert_says(result, "without a message")


def test_a_refusal_carries_its_status_and_an_unreachable_manager_none(
    canned: CannedServer,
) -> None:
    canned.answer(404, "application/json", b'{"error": "nothing of it is launched here"}')
    with pytest.raises(ClientError) as refused:
        ManagerClient(canned.url).abort(HASH)
    assert refused.value.status == 404
    assert str(refused.value) == "404: nothing of it is launched here"

    with pytest.raises(ClientError) as unreachable:
        ManagerClient(f"http://127.0.0.1:{free_port()}").abort(HASH)
    assert unreachable.value.status is None
    assert "cannot reach the manager" in str(unreachable.value)


def test_abort_posts_the_hash_and_returns_the_json_answer(canned: CannedServer) -> None:
    canned.answer(200, "application/json", b'{"message": "aborted", "cancelled_launch": true}')

    answer = ManagerClient(canned.url).abort(HASH)

    assert answer == {"message": "aborted", "cancelled_launch": True}
    assert canned.requests == [("POST", "/abort", HASH.encode())]


def test_status_gives_up_after_the_status_timeout_not_the_launch_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(client_module, "STATUS_TIMEOUT", 0.3)
    with socket.socket() as silent:  # accepts (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        client = ManagerClient(f"http://127.0.0.1:{port}", timeout=600)
        started = time.monotonic()
        with pytest.raises(ClientError, match="timed out"):
            client.status()
        assert time.monotonic() - started < 5


def test_status_of_a_fleet_member_says_what_peer_fallback_did(canned: CannedServer) -> None:
    state = ProxyState("shop", "test")
    fallback = Fallback(
        Fleet(
            instance="web-1",
            peers=(Peer.parse("http://10.0.0.2"), Peer.parse("http://10.0.0.3:8080")),
            secret=b"s",
        )
    )
    state.fallback = fallback
    fallback.sent.update({"http://10.0.0.2:80": 2})
    fallback.received.update({"web-3": 1})
    fallback.refused(fallback.peers[1])
    canned.answer(200, "application/json", json.dumps(state.snapshot()).encode())
    result = wunderproxy_client("status", "--api", canned.url)
    assert result.returncode == 0, result.stderr
    assert (
        "peer fallback as web-1: 2 sent, 1 received, 0 no peer took; "
        "skipping http://10.0.0.3:8080\n" in result.stdout
    )


def test_status_says_which_certificate_the_tls_listener_serves_and_why_a_reload_failed(
    canned: CannedServer,
) -> None:
    state = ProxyState("shop", "test")
    tls = {
        "address": "0.0.0.0:443",
        "subject": "CN=shop.example",
        "serial": "03A1",
        "not_after": "2027-03-01T00:00:00Z",
        "loaded_at": "2026-11-30T10:00:00Z",
        "reloads": 2,
        "last_reload_error": "--tls-key /etc/k.pem is not the key of the certificate",
    }
    state.features = lambda: {"tls": tls}
    canned.answer(200, "application/json", json.dumps(state.snapshot()).encode())
    result = wunderproxy_client("status", "--api", canned.url)
    assert result.returncode == 0, result.stderr
    assert (
        "TLS on 0.0.0.0:443: certificate serial 03A1 (CN=shop.example), valid until "
        "2027-03-01T00:00:00Z, loaded at 2026-11-30T10:00:00Z (2 reloads since start)\n"
        "  the last reload failed: --tls-key /etc/k.pem is not the key of the certificate\n"
    ) in result.stdout
