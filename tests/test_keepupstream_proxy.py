"""--keep-upstream over real sockets: clients that say ``Connection: close`` share the
container's connections, each client's answer says close and its connection closes."""

from __future__ import annotations

import asyncio

import h11
import pytest

from tests.support.backend import Backend
from tests.support.proxied import Client, Proxy, make_container
from tests.support.scripted import Script, answer, scripted_backend
from tests.support.waiting import eventually
from wunderproxy.config import Front

CLOSING = b"GET / HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n"


async def closing_client(proxy: Proxy, request: bytes = CLOSING) -> tuple[bytes, bytes]:
    """Send ``request`` on a new connection and read until the proxy closes it: the
    answer's head and what followed it."""
    client = await proxy.connect()
    client.send_raw(request)
    received = await client.read_all()
    head, _, rest = received.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n", rest


def fields(head: bytes) -> list[tuple[bytes, bytes]]:
    """The fields of an answer head, names lower-cased, as h11 reads them."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "app")]))
    conn.receive_data(head)
    event = conn.next_event()
    assert isinstance(event, h11.Response)
    return list(event.headers)


async def test_clients_that_say_close_share_one_container_connection(
    proxy: Proxy, blue: Backend
) -> None:
    proxy.front = Front(keep_upstream=True)
    proxy.serve(make_container(blue, "rev1"))
    for _ in range(5):
        head, body = await closing_client(proxy)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert (b"connection", b"close") in fields(head)
        assert body == b"blue"
    assert blue.requests == 5
    assert blue.connections == 1
    # What the container read: the heads without the client's close.
    assert all(b"connection" not in dict(request.headers) for request in blue.heads)
    assert proxy.state.requests.total == 5


async def test_off_a_closing_head_passes_byte_for_byte_and_closes_the_container_connection(
    proxy: Proxy, blue: Backend
) -> None:
    proxy.serve(make_container(blue, "rev1"))
    for _ in range(3):
        _, body = await closing_client(proxy)
        assert body == b"blue"
    assert [bytes(raw) for raw in blue.received] == [CLOSING] * 3
    assert blue.connections == 3


@pytest.mark.parametrize(
    ("sent", "going_up"),
    [
        pytest.param(
            b"GET / HTTP/1.1\r\nHost: app\r\nConnection: close, X-Trace\r\nX-Trace: 7\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: app\r\nConnection: X-Trace\r\nX-Trace: 7\r\n\r\n",
            id="other tokens go up without close",
        ),
        pytest.param(
            b"GET / HTTP/1.0\r\nConnection: close\r\n\r\n",
            b"GET / HTTP/1.0\r\nConnection: close\r\n\r\n",
            id="HTTP/1.0 goes up as it came",
        ),
    ],
)
async def test_what_goes_up_of_a_closing_head(
    proxy: Proxy, blue: Backend, sent: bytes, going_up: bytes
) -> None:
    proxy.front = Front(keep_upstream=True)
    proxy.serve(make_container(blue, "rev1"))
    _, body = await closing_client(proxy, sent)
    assert body == b"blue"
    assert bytes(blue.received[0]) == going_up


async def test_an_upgrade_request_that_says_close_goes_up_as_it_came(proxy: Proxy) -> None:
    switched = Script(
        [b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: ws\r\n\r\n"]
    )
    async with scripted_backend({"/ws": switched}) as backend:
        proxy.front = Front(keep_upstream=True)
        proxy.serve(make_container(backend.port, "rev1"))
        client = await proxy.connect()
        request = (
            b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: close, Upgrade\r\nUpgrade: ws\r\n\r\n"
        )
        client.send_raw(request)
        assert (await client.read_until(b"\r\n\r\n")).startswith(b"HTTP/1.1 101 ")
        assert backend.requests == [request]


async def test_an_answer_framed_by_its_close_reaches_the_client_whole(proxy: Proxy) -> None:
    """The container says nothing of the connection but ends the answer by closing it:
    the client reads it to its end, told close, and the next client needs a new one."""
    stream = Script(
        [answer("200 OK", "Content-Type: text/plain", body=b"streamed", length=False)], close=True
    )
    async with scripted_backend({"/": stream}) as backend:
        proxy.front = Front(keep_upstream=True)
        proxy.serve(make_container(backend.port, "rev1"))
        for _ in range(2):
            head, body = await closing_client(proxy)
            assert (b"connection", b"close") in fields(head)
            assert body == b"streamed"
        assert [b"connection: close" in head.lower() for head in backend.requests] == [False] * 2


async def test_the_client_is_told_close_and_the_containers_keep_alive_field_is_dropped(
    proxy: Proxy,
) -> None:
    kept = Script([answer("200 OK", "Connection: keep-alive", "Keep-Alive: timeout=5", body=b"ok")])
    async with scripted_backend({"/": kept}) as backend:
        proxy.front = Front(keep_upstream=True)
        proxy.serve(make_container(backend.port, "rev1"))
        head, body = await closing_client(proxy)
        assert body == b"ok"
        assert head == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n"


async def test_a_request_sent_again_after_the_keep_alive_race_goes_up_rewritten(
    proxy: Proxy, blue: Backend
) -> None:
    """The container closes the parked connection as the next client's request goes out
    on it: that request is sent again on a new connection, as rewritten the first time."""
    proxy.front = Front(keep_upstream=True)
    proxy.serve(make_container(blue, "rev1"))
    request = CLOSING.replace(b"GET / ", b"GET /then-drop ")
    _, body = await closing_client(proxy, request)
    assert body == b"blue"
    container = proxy.state.current
    assert container is not None
    assert await eventually(lambda: len(container.spare) == 1)
    _, body = await closing_client(proxy)
    assert body == b"blue"
    assert blue.dropped == 1
    assert blue.connections == 2
    assert bytes(blue.received[1]) == b"GET / HTTP/1.1\r\nHost: app\r\n\r\n"


async def test_with_forwarded_fields_both_edits_go_up(proxy: Proxy, blue: Backend) -> None:
    proxy.front = Front(keep_upstream=True, forwarded="append")
    proxy.serve(make_container(blue, "rev1"))
    await closing_client(proxy)
    assert bytes(blue.received[0]) == (
        b"GET / HTTP/1.1\r\nHost: app\r\n"
        b"X-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http\r\n\r\n"
    )


async def test_the_access_log_shows_the_request_the_client_sent(
    proxy: Proxy, blue: Backend
) -> None:
    proxy.front = Front(keep_upstream=True)
    proxy.serve(make_container(blue, "rev1"))
    await closing_client(proxy)
    (line,) = await proxy.logged_lines(1)
    assert '"GET / HTTP/1.1" 200' in line


async def test_a_kept_alive_client_is_not_told_close(proxy: Proxy, blue: Backend) -> None:
    proxy.front = Front(keep_upstream=True)
    proxy.serve(make_container(blue, "rev1"))
    client: Client = await proxy.connect()
    for _ in range(2):
        status, headers, body = await client.request("GET", "/")
        assert (status, body, "connection" in headers) == (200, b"blue", False)
    await asyncio.sleep(0)
    assert blue.connections == 1
