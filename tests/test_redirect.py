"""``--redirect-http``: the plain port answers every request 308 to the same URL on https://."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import h11
import pytest

from tests.support.backend import Backend
from tests.support.proxied import Client, Proxy, make_container, running_proxy
from tests.support.wire import read_answer
from wunderproxy import framing
from wunderproxy.redirect import MOVED, NO_HOST, Redirect

TLS_PORT = 8443


def started(head: bytes) -> framing.RequestStarted:
    """The request the framing reads from ``head``, as the forwarder is given it."""
    [piece, _] = framing.Exchange(16384, None).client_data(head)
    assert isinstance(piece, framing.RequestStarted)
    return piece


@pytest.mark.parametrize(
    ("tls_port", "head", "location"),
    [
        (
            8443,
            b"GET /a/b?c=1 HTTP/1.1\r\nHost: example.com\r\n\r\n",
            b"https://example.com:8443/a/b?c=1",
        ),
        (
            443,
            b"GET /a/b?c=1 HTTP/1.1\r\nHost: example.com\r\n\r\n",
            b"https://example.com/a/b?c=1",
        ),
        # The Host field's port is the plain port's: it goes.
        (443, b"GET / HTTP/1.1\r\nHost: example.com:8080\r\n\r\n", b"https://example.com/"),
        (8443, b"GET / HTTP/1.1\r\nHost:  Example.COM:80 \r\n\r\n", b"https://Example.COM:8443/"),
        (443, b"GET /x HTTP/1.1\r\nHost: 192.0.2.7:80\r\n\r\n", b"https://192.0.2.7/x"),
        (
            8443,
            b"GET /x HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n\r\n",
            b"https://[2001:db8::1]:8443/x",
        ),
        # Absolute-form: its path and query only.
        (
            443,
            b"POST http://example.com:80/form?x=1 HTTP/1.1\r\nHost: example.com:80\r\n"
            b"Content-Length: 0\r\n\r\n",
            b"https://example.com/form?x=1",
        ),
        (
            443,
            b"GET http://example.com HTTP/1.1\r\nHost: example.com\r\n\r\n",
            b"https://example.com/",
        ),
        (
            443,
            b"GET http://example.com?q HTTP/1.1\r\nHost: example.com\r\n\r\n",
            b"https://example.com/?q",
        ),
        # The forms without a path.
        (443, b"OPTIONS * HTTP/1.1\r\nHost: example.com\r\n\r\n", b"https://example.com/"),
        (
            443,
            b"CONNECT example.com:80 HTTP/1.1\r\nHost: example.com\r\n\r\n",
            b"https://example.com/",
        ),
    ],
)
def test_the_location_is_https_the_host_without_its_port_the_tls_port_unless_443_and_the_target(
    tls_port: int, head: bytes, location: bytes
) -> None:
    answer = Redirect(tls_port).answer(started(head))
    assert (answer.status, answer.message) == (308, MOVED.message)
    assert answer.fields == b"Location: " + location + b"\r\n"


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost:\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: evil.example/path\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: user@evil.example\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: evil.example\\@good.example\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: two words\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: %65vil.example\r\n\r\n",
    ],
    ids=["none", "empty", "path", "userinfo", "backslash", "space", "percent"],
)
def test_a_request_without_a_usable_host_gets_400_naming_the_host_field(head: bytes) -> None:
    assert Redirect(443).answer(started(head)) is NO_HOST


@pytest.fixture
async def redirecting(tmp_path: Path, blue: Backend) -> AsyncIterator[Proxy]:
    """The plain proxy with --redirect-http, a container serving behind it."""
    async with running_proxy(tmp_path / "access.log", redirect=Redirect(TLS_PORT)) as proxy:
        proxy.serve(make_container(blue, "rev1"))
        yield proxy


async def ask(
    client: Client, method: str, target: str, host: str, body: bytes = b""
) -> tuple[int, dict[str, str], bytes]:
    """One request with this Host field on ``client``'s connection, and its answer."""
    headers = [("Host", host)]
    if body:
        headers.append(("Content-Length", str(len(body))))
    data = client.conn.send(h11.Request(method=method, target=target, headers=headers))
    data += client.conn.send(h11.Data(data=body)) if body else b""
    client.send_raw(data + client.conn.send(h11.EndOfMessage()))
    answer = await read_answer(client.conn, client.reader)
    return answer.status, answer.headers, answer.body


async def test_every_request_on_a_kept_alive_connection_is_redirected_and_no_app_sees_one(
    redirecting: Proxy, blue: Backend
) -> None:
    client = await redirecting.connect()
    status, headers, body = await ask(client, "GET", "/a?b=1", "example.com")
    assert (status, headers["location"]) == (308, f"https://example.com:{TLS_PORT}/a?b=1")
    assert body == (MOVED.message + "\n").encode()
    assert headers["content-type"] == "text/plain; charset=utf-8"
    # A body is dropped unread by the app; the connection goes on with the next request.
    status, headers, _ = await ask(client, "POST", "/form", "example.com", b"x" * 100_000)
    assert (status, headers["location"]) == (308, f"https://example.com:{TLS_PORT}/form")
    status, headers, body = await ask(client, "HEAD", "/h", "example.com")
    assert (status, headers["location"], body) == (308, f"https://example.com:{TLS_PORT}/h", b"")
    assert blue.requests == 0
    assert redirecting.state.requests.by_status == {308: 3}
    lines = await redirecting.logged_lines(3)
    assert [line.split('"')[1] for line in lines] == [
        "GET /a?b=1 HTTP/1.1",
        "POST /form HTTP/1.1",
        "HEAD /h HTTP/1.1",
    ]
    assert all(line.split('"')[2].split()[0] == "308" for line in lines)


async def test_a_request_without_a_usable_host_is_answered_400_saying_so(
    redirecting: Proxy,
) -> None:
    client = await redirecting.connect()
    status, headers, body = await ask(client, "GET", "/", "")
    assert status == 400 and "location" not in headers
    assert body == (NO_HOST.message + "\n").encode()
    # The connection is kept: the request was valid HTTP, only not one to redirect.
    assert (await ask(client, "GET", "/", "example.com"))[0] == 308
    # HTTP/1.0 needs no Host field at all; its connection ends with the answer.
    bare = await redirecting.connect()
    bare.send_raw(b"GET / HTTP/1.0\r\n\r\n")
    answer = await bare.read_all()
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert answer.endswith(b"\r\n\r\n" + (NO_HOST.message + "\n").encode())
    assert redirecting.state.requests.by_status == {400: 2, 308: 1}
