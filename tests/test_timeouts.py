"""The edge's timeouts over real sockets, on a clock the test moves (``Proxy.sweep``).

Each timeout is shown to hold off before its time and to act after it: the status the client
reads, what happens to the container's connection, and the figures (``/status`` timeouts,
the access log).
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time
from collections.abc import Iterator

import pytest

from tests.support.backend import Backend
from tests.support.proxied import Proxy, make_container
from tests.support.waiting import eventually
from wunderproxy.config import Edge

EDGE = Edge(
    keepalive_timeout=75,
    header_timeout=30,
    body_timeout=60,
    connect_timeout=0.5,
    upstream_timeout=60,
    send_timeout=60,
)


@pytest.fixture
def timed_proxy(proxy: Proxy) -> Proxy:
    proxy.edge = EDGE
    return proxy


async def test_a_trickling_head_gets_408_after_the_header_timeout_from_its_first_byte(
    timed_proxy: Proxy, blue: Backend
) -> None:
    proxy = timed_proxy
    proxy.serve(make_container(blue, "rev1"))
    client = await proxy.connect()
    for byte in b"GET / HTTP/1.1\r\nHo":  # each byte resets no clock
        client.send_raw(bytes([byte]))
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.05)
    proxy.sweep(seconds_later=29)
    assert proxy.state.timeouts["header"] == 0
    proxy.sweep(seconds_later=31)
    answer = await client.read_all()
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b"Connection: close" in answer
    assert proxy.state.timeouts == {"header": 1}
    assert blue.requests == 0
    assert proxy.state.requests.by_status == {408: 1}
    assert proxy.state.requests.total == 1, "a request that could not be read counts too"
    [line] = await proxy.logged_lines(1)
    assert '"- - -" 408' in line


async def test_the_keepalive_timeout_not_the_header_timeout_governs_the_wait_for_a_first_byte(
    timed_proxy: Proxy, blue: Backend
) -> None:
    proxy = timed_proxy
    proxy.serve(make_container(blue, "rev1"))
    client = await proxy.connect()
    assert (await client.request("GET", "/"))[0] == 200
    proxy.sweep(seconds_later=40)  # past the header timeout, before the keep-alive one
    assert (await client.request("GET", "/"))[0] == 200
    proxy.sweep(seconds_later=76)
    assert await client.read_all() == b""
    assert proxy.state.timeouts == {}


async def test_a_stalled_body_gets_408_and_the_container_connection_is_closed(
    timed_proxy: Proxy, blue: Backend
) -> None:
    proxy = timed_proxy
    proxy.serve(make_container(blue, "rev1"))
    client = await proxy.connect()
    client.send_raw(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n0123456789")
    assert await eventually(lambda: blue.connections == 1)
    proxy.sweep(seconds_later=59)
    assert proxy.state.timeouts["body"] == 0
    proxy.sweep(seconds_later=61)
    answer = await client.read_all()
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert proxy.state.timeouts == {"body": 1}
    assert proxy.state.requests.by_status == {408: 1}
    assert blue.requests == 0, "the container never saw a whole request"
    assert await eventually(lambda: not blue.tasks), "its connection to the container is closed"


async def test_once_the_body_is_complete_the_upstream_timeout_not_the_body_timeout_applies(
    timed_proxy: Proxy, blue: Backend
) -> None:
    proxy = timed_proxy
    proxy.serve(make_container(blue, "rev1"))
    client = await proxy.connect()
    client.send_raw(b"POST /slow/0.3 HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc")
    await asyncio.sleep(0.05)
    proxy.sweep(seconds_later=61)  # the body is complete: no body timeout can apply
    status, _, _ = await client.response()
    assert status == 504, "the answer was overdue by the upstream timeout instead"
    assert proxy.state.timeouts == {"upstream": 1}


async def test_a_container_that_never_answers_gets_504_after_the_upstream_timeout(
    timed_proxy: Proxy, blue: Backend
) -> None:
    proxy = timed_proxy
    container = make_container(blue, "rev1")
    proxy.serve(container)
    client = await proxy.connect()
    pending = asyncio.create_task(client.request("GET", "/slow/30"))
    assert await eventually(lambda: blue.requests == 1)
    proxy.sweep(seconds_later=59)
    assert not pending.done()
    proxy.sweep(seconds_later=61)
    status, _, body = await pending
    assert status == 504
    assert b"did not answer in time" in body
    assert proxy.state.timeouts == {"upstream": 1}
    [line] = await proxy.logged_lines(1)
    assert '"GET /slow/30 HTTP/1.1" 504' in line and " rev1" in line
    assert not container.links, "its connection to the container is closed, not kept"


async def test_a_container_that_stalls_mid_answer_has_its_client_closed_not_answered_504(
    timed_proxy: Proxy, blue: Backend
) -> None:
    proxy = timed_proxy
    proxy.serve(make_container(blue, "rev1"))
    client = await proxy.connect()
    client.send_raw(b"GET /stall HTTP/1.1\r\nHost: t\r\n\r\n")
    assert await eventually(lambda: blue.requests == 1)
    await asyncio.sleep(0.05)
    proxy.sweep(seconds_later=61)
    received = await client.read_all()
    assert received == b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf."
    assert proxy.state.timeouts == {"upstream": 1}
    assert proxy.state.requests.by_status == {504: 1}, "counted as what it came to"


async def test_an_upgraded_connection_is_exempt_from_every_timeout(
    timed_proxy: Proxy, blue: Backend
) -> None:
    proxy = timed_proxy
    proxy.serve(make_container(blue, "rev1"))
    client = await proxy.connect()
    client.send_raw(
        b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
    head = await client.reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ")
    client.send_raw(b"ping")
    assert await client.reader.readexactly(4) == b"ping"
    proxy.sweep(seconds_later=10_000)
    client.send_raw(b"pong")
    assert await client.reader.readexactly(4) == b"pong"
    assert proxy.state.timeouts == {}


async def sweeping(proxy: Proxy, every: float = 0.1) -> None:
    """Run the timeout sweep on the real clock, as the server does, until cancelled."""
    while True:
        await asyncio.sleep(every)
        proxy.sweep(seconds_later=0)


async def test_a_client_reading_slowly_but_steadily_is_served_and_one_that_stops_is_cut(
    proxy: Proxy, blue: Backend
) -> None:
    # Real time here: the clock restarts from what the client takes, as it takes it.
    proxy.edge = Edge(send_timeout=1.5)
    proxy.serve(make_container(blue, "rev1"))
    sweeper = asyncio.create_task(sweeping(proxy))
    try:
        # A small receive buffer, as a slow client's is: what it reads, it acknowledges.
        client = await proxy.connect(receive_buffer=16_384)
        client.send_raw(b"GET /big/33554432 HTTP/1.1\r\nHost: t\r\n\r\n")  # beyond buffers
        connection = next(iter(proxy.connections))
        await client.reader.readexactly(1000)
        assert await eventually(lambda: connection._send_mark is not None)
        for _ in range(40):  # 4 s at 160 KB/s: far below what the buffers take at once
            await client.reader.readexactly(16_000)
            await asyncio.sleep(0.1)
        assert proxy.state.timeouts == {}, "a steady reader is never cut"
        await asyncio.sleep(2.5)  # now it reads nothing
        assert proxy.state.timeouts == {"send": 1}
        assert await eventually(lambda: not proxy.connections)
        assert await eventually(lambda: not blue.tasks), "its container connection is closed"
        assert proxy.state.requests.by_status == {200: 1}
    finally:
        sweeper.cancel()


async def _slowly_reading_container(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Reads an upload at about 1 MB/s, then answers how much it read."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
    received = 0
    while received < length:
        received += len(await reader.read(min(16_384, length - received)))
        await asyncio.sleep(0.015)
    answer = str(received).encode()
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer))
    await writer.drain()
    writer.close()


async def test_an_upload_the_container_reads_slowly_is_not_timed_out_while_it_reads(
    proxy: Proxy,
) -> None:
    # A small receive buffer, so that the upload waits on the container, not in the kernel.
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16_384)
    listener.bind(("127.0.0.1", 0))
    server = await asyncio.start_server(_slowly_reading_container, sock=listener)
    backend = Backend("slow-reader")
    backend.server = server
    proxy.edge = Edge(upstream_timeout=1.0, body_timeout=1.0)
    proxy.serve(make_container(backend, "rev1"))
    sweeper = asyncio.create_task(sweeping(proxy))
    try:
        client = await proxy.connect()
        size = 6 * 1024 * 1024  # takes the container about 6 s: longer than both timeouts
        client.send_raw(f"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: {size}\r\n\r\n".encode())
        client.send_raw(b"x" * size)
        status, _, body = await asyncio.wait_for(client.response(), 30)
        assert (status, body) == (200, str(size).encode())
        assert proxy.state.timeouts == {}
    finally:
        sweeper.cancel()
        server.close()


@pytest.fixture
def unaccepting_port() -> Iterator[int]:
    """A 127.0.0.1 port whose accept queue is full: a new connect to it never completes."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(8):  # fill the queue; connects beyond it hang in SYN_SENT
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    time.sleep(0.1)
    yield port
    for filler in fillers:
        filler.close()
    listener.close()


async def test_a_container_that_does_not_accept_a_connection_gets_504_after_the_connect_timeout(
    timed_proxy: Proxy, blue: Backend, unaccepting_port: int
) -> None:
    proxy = timed_proxy
    proxy.serve(dataclasses.replace(make_container(blue, "rev1"), port=unaccepting_port))
    client = await proxy.connect()
    started = time.monotonic()
    status, _, body = await client.request("GET", "/")
    assert status == 504
    assert b"did not accept a connection" in body
    assert 0.4 < time.monotonic() - started < 5
    assert proxy.state.timeouts == {"connect": 1}
    # The connection goes on: the next request is tried (and times out) again.
    assert (await client.request("GET", "/"))[0] == 504


async def test_a_body_over_the_limit_by_its_length_gets_413_before_reaching_the_container(
    proxy: Proxy, blue: Backend
) -> None:
    proxy.edge = Edge(max_body_size=1000)
    proxy.serve(make_container(blue, "rev1"))
    client = await proxy.connect()
    assert (await client.request("POST", "/echo", b"x" * 1000))[0] == 200, "at the limit"
    client.send_raw(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 1001\r\n\r\n")
    answer = await client.read_all()
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert blue.requests == 1, "only the request within the limit reached the container"
    assert proxy.state.requests.by_status == {200: 1, 413: 1}


async def test_a_chunked_body_passing_the_limit_gets_413_and_its_container_connection_closed(
    proxy: Proxy, blue: Backend
) -> None:
    proxy.edge = Edge(max_body_size=1000)
    container = make_container(blue, "rev1")
    proxy.serve(container)
    client = await proxy.connect()
    client.send_raw(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
    client.send_raw(b"200\r\n" + b"x" * 512 + b"\r\n")
    assert await eventually(lambda: blue.connections == 1)
    client.send_raw(b"200\r\n" + b"x" * 512 + b"\r\n")  # 1,024 bytes: past the limit
    answer = await client.read_all()
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert blue.requests == 0, "the container never got a whole request"
    assert await eventually(lambda: not container.links and not container.spare)
    assert proxy.state.requests.by_status == {413: 1}
