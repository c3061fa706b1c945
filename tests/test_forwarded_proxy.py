"""--forwarded over real sockets: what the container receives in each mode, from a client
that forges the fields, on the plain and the TLS listener, on a Unix socket, and from a
peer that already set them."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.support.backend import Backend
from tests.support.proxied import Proxy, make_container, running_proxy
from tests.support.waiting import eventually
from tests.support.wire import send_request
from tests.test_fallback import fleet_of
from wunderproxy.config import Edge, Front
from wunderproxy.forwarder import ClientConnection
from wunderproxy.state import ProxyState

FORGED = (
    b"POST /cart HTTP/1.1\r\nHost: shop.example:8080\r\nX-Forwarded-For: 6.6.6.6\r\n"
    b"X-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.example\r\n"
    b"Forwarded: for=6.6.6.6\r\nContent-Length: 5\r\n\r\nhello"
)


async def received_by(backend: Backend, proxy: Proxy, request: bytes) -> bytes:
    """Send ``request`` on a new client connection; the bytes the container read of it
    (on whichever of its connections: idle ones are shared by the proxy's clients)."""
    client = await proxy.connect()
    before = backend.requests
    read_before = [len(received) for received in backend.received]
    client.send_raw(request)
    status, _, _ = await client.response()
    assert status == 200
    assert backend.requests == before + 1
    read_before += [0] * (len(backend.received) - len(read_before))
    return b"".join(bytes(r[n:]) for r, n in zip(backend.received, read_before, strict=True))


async def test_off_passes_the_clients_fields_untouched(proxy: Proxy, blue: Backend) -> None:
    proxy.serve(make_container(blue, "rev1"))
    assert await received_by(blue, proxy, FORGED) == FORGED


async def test_append_adds_the_client_and_keeps_what_the_proxy_in_front_said(
    proxy: Proxy, blue: Backend
) -> None:
    proxy.front = Front(forwarded="append")
    proxy.serve(make_container(blue, "rev1"))
    assert await received_by(blue, proxy, FORGED) == FORGED.replace(
        b"X-Forwarded-For: 6.6.6.6\r\n", b"X-Forwarded-For: 6.6.6.6, 127.0.0.1\r\n"
    )
    plain = b"GET /a HTTP/1.1\r\nHost: shop.example\r\n\r\n"
    assert await received_by(blue, proxy, plain) == (
        b"GET /a HTTP/1.1\r\nHost: shop.example\r\n"
        b"X-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http\r\n\r\n"
    )


async def test_replace_drops_the_forged_fields_and_sets_its_own(
    proxy: Proxy, blue: Backend
) -> None:
    proxy.front = Front(forwarded="replace")
    proxy.serve(make_container(blue, "rev1"))
    assert await received_by(blue, proxy, FORGED) == (
        b"POST /cart HTTP/1.1\r\nHost: shop.example:8080\r\nContent-Length: 5\r\n"
        b"X-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http\r\n"
        b"X-Forwarded-Host: shop.example:8080\r\n"
        b'Forwarded: for=127.0.0.1;proto=http;host="shop.example:8080"\r\n\r\nhello'
    )
    # The access log keeps what the client sent: the forgery is what an operator looks for.
    (line,) = await proxy.logged_lines(1)
    assert '"6.6.6.6"' in line


async def test_every_request_of_a_kept_alive_connection_is_rewritten(
    proxy: Proxy, blue: Backend
) -> None:
    proxy.front = Front(forwarded="replace")
    proxy.serve(make_container(blue, "rev1"))
    client = await proxy.connect()
    for _ in range(2):
        send_request(client.conn, client.writer, "GET", "/", headers=[("X-Forwarded-For", "6")])
        assert (await client.response())[0] == 200
    assert blue.connections == 1
    assert [[v for k, v in head.headers if k == b"x-forwarded-for"] for head in blue.heads] == [
        [b"127.0.0.1"],
        [b"127.0.0.1"],
    ]


async def test_on_the_tls_listener_the_proto_is_https_whatever_the_client_said(
    proxy: Proxy, blue: Backend
) -> None:
    proxy.front = Front(forwarded="append")
    proxy.scheme = "https"  # as the TLS listener makes its connections
    proxy.serve(make_container(blue, "rev1"))
    request = b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-Proto: http\r\n\r\n"
    assert await received_by(blue, proxy, request) == (
        b"GET / HTTP/1.1\r\nHost: a\r\n"
        b"X-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: https\r\n\r\n"
    )


async def test_a_peers_marked_request_is_left_as_its_sender_wrote_it(
    tmp_path: Path, blue: Backend
) -> None:
    async with running_proxy(tmp_path / "there.log", fallback=fleet_of("web-2")) as there:
        there.front = Front(forwarded="append")
        there.serve(make_container(blue, "rev1"))
        # As web-1 sends a request it could not serve: its own forwarded fields, then its mark.
        sent_by_web1 = b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 198.51.100.4\r\n\r\n"
        marked = fleet_of("web-1").marked(sent_by_web1)
        assert await received_by(blue, there, marked) == marked
        # Without a mark, or with one that does not verify, the client is added.
        forged = marked.replace(b"web-1 ", b"web-1 0")
        for request in (sent_by_web1, forged):
            assert (await received_by(blue, there, request)).count(
                b"X-Forwarded-For: 198.51.100.4, 127.0.0.1\r\n"
            ) == 1


async def test_a_unix_socket_client_is_unknown(tmp_path: Path, blue: Backend) -> None:
    state = ProxyState("testapp", "test")
    front = Front(forwarded="replace")
    server = await asyncio.get_running_loop().create_unix_server(
        lambda: ClientConnection(state, Edge(), front=front), str(tmp_path / "proxy.sock")
    )
    container = make_container(blue, "rev1")
    state.add(container)
    state.switch_to(container)
    try:
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "proxy.sock"))
        writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
        await eventually(lambda: blue.requests == 1)
        assert blue.received[0].endswith(
            b"X-Forwarded-For: unknown\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: a\r\n"
            b"Forwarded: for=unknown;proto=http;host=a\r\n\r\n"
        )
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
