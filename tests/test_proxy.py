"""The proxy over real sockets: a real client socket, the forwarder, a real h11 backend."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct

import h11
import pytest

from tests.support.backend import Backend
from tests.support.proxied import Client, Proxy, make_container
from tests.support.waiting import eventually
from tests.support.wire import send_request
from wunderproxy.config import Address, Edge
from wunderproxy.forwarder import ClientConnection
from wunderproxy.listeners import listen
from wunderproxy.state import ProxyState


async def test_answers_503_with_a_short_text_while_no_container_is_deployed(proxy: Proxy) -> None:
    client = await proxy.connect()
    status, headers, body = await client.request("GET", "/")
    assert status == 503
    assert headers["content-type"].startswith("text/plain")
    assert b"no container" in body
    # The connection stays usable: the next request gets an answer too.
    status, _, _ = await client.request("POST", "/", b"x" * 1000)
    assert status == 503
    assert proxy.state.requests.by_status[503] == 2


async def test_forwards_requests_and_counts_statuses(proxy: Proxy, blue: Backend) -> None:
    proxy.serve(make_container(blue, "rev1"))
    client = await proxy.connect()
    assert (await client.request("GET", "/"))[2] == b"blue"
    assert (await client.request("GET", "/status/404"))[0] == 404
    assert (await client.request("POST", "/echo", b"hello" * 1000))[2] == b"hello" * 1000
    assert proxy.state.requests.total == 3
    assert dict(proxy.state.requests.by_status) == {200: 2, 404: 1}
    assert blue.connections == 1, "keep-alive must reuse one upstream connection"


async def test_head_204_304_and_chunked_answers_keep_the_connection_in_step(
    proxy: Proxy, blue: Backend
) -> None:
    proxy.serve(make_container(blue, "rev1"))
    client = await proxy.connect()
    status, headers, body = await client.request("HEAD", "/")
    assert (status, headers["content-length"], body) == (200, "4", b"")
    assert (await client.request("GET", "/status/204"))[0] == 204
    assert (await client.request("GET", "/status/304"))[0] == 304
    assert (await client.request("GET", "/chunked"))[2] == b"one two three"
    assert (await client.request("GET", "/"))[2] == b"blue"


async def test_pipelined_requests_are_answered_in_order(proxy: Proxy, blue: Backend) -> None:
    proxy.serve(make_container(blue, "rev1"))
    client = await proxy.connect()
    client.send_raw(
        b"GET /slow/0.2 HTTP/1.1\r\nHost: t\r\n\r\n"
        b"GET /status/201 HTTP/1.1\r\nHost: t\r\n\r\n"
        b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\n"
        b"GET /status/202 HTTP/1.1\r\nHost: t\r\n\r\n"
    )
    statuses = await read_pipelined_statuses(client, [b"GET", b"GET", b"HEAD", b"GET"])
    assert statuses == [200, 201, 200, 202]


async def read_pipelined_statuses(client: Client, methods: list[bytes]) -> list[int]:
    """Parse answers to requests sent raw: one h11 client connection per answer."""
    statuses, buffered = [], b""
    for method in methods:
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method=method, target="/", headers=[("Host", "t")]))
        conn.send(h11.EndOfMessage())
        if buffered:  # b"" would mean end of stream to h11
            conn.receive_data(buffered)
        while not isinstance(event := conn.next_event(), h11.EndOfMessage):
            if event is h11.NEED_DATA:
                conn.receive_data(await asyncio.wait_for(client.reader.read(65536), 10))
            elif isinstance(event, h11.Response):
                statuses.append(event.status_code)
        buffered = conn.trailing_data[0]
    return statuses


async def test_each_request_goes_to_the_container_current_when_it_starts(
    proxy: Proxy, blue: Backend, green: Backend
) -> None:
    proxy.serve(make_container(blue, "rev1"))
    client = await proxy.connect()
    slow = await proxy.connect()
    assert (await client.request("GET", "/"))[2] == b"blue"
    in_flight = asyncio.create_task(slow.request("GET", "/slow/0.5"))
    await asyncio.sleep(0.1)
    proxy.serve(make_container(green, "rev2"))
    # The next request on the same keep-alive connection already reaches the new one...
    assert (await client.request("GET", "/"))[2] == b"green"
    # ...while the request in flight finishes on the old one.
    status, headers, _ = await in_flight
    assert (status, headers["x-backend"]) == (200, "blue")


async def test_upgrade_switches_to_opaque_bytes_both_ways(proxy: Proxy, blue: Backend) -> None:
    proxy.serve(make_container(blue, "rev1"))
    client = await proxy.connect()
    await client.upgrade()
    assert proxy.state.requests.by_status[101] == 1
    container = proxy.state.current
    assert container is not None
    assert (container.in_flight, container.upgraded) == (0, 1), "an upgrade keeps it busy"
    counts = proxy.state.connection_counts()
    assert (counts["active"], counts["idle"], counts["upgraded"]) == (1, 0, 1)
    client.close()
    assert await eventually(lambda: container.upgraded == 0)


async def test_non_http_bytes_get_400_and_close_while_others_are_served(
    proxy: Proxy, blue: Backend
) -> None:
    proxy.serve(make_container(blue, "rev1"))
    good = await proxy.connect()
    bad = await proxy.connect()
    bad.send_raw(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http at all\r\n\r\n")
    answer = await bad.read_all()
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert (await good.request("GET", "/"))[2] == b"blue"
    assert blue.requests == 1


async def test_answers_502_when_the_container_is_unreachable(proxy: Proxy, blue: Backend) -> None:
    container = make_container(blue, "rev1")
    await blue.stop()
    proxy.serve(container)
    client = await proxy.connect()
    status, _, body = await client.request("GET", "/")
    assert status == 502
    assert b"unreachable" in body
    assert container.in_flight == 0


async def test_a_container_closing_the_connection_after_its_answer_closes_the_client(
    proxy: Proxy, blue: Backend
) -> None:
    proxy.serve(make_container(blue, "rev1"))
    client = await proxy.connect()
    status, headers, _ = await client.request("GET", "/close")
    assert (status, headers["connection"]) == (200, "close")
    assert await client.read_all() == b""
    assert await eventually(lambda: proxy.state.open_connections == 0)


async def test_connection_counters_follow_requests(proxy: Proxy, blue: Backend) -> None:
    proxy.serve(make_container(blue, "rev1"))
    client = await proxy.connect()
    task = asyncio.create_task(client.request("GET", "/slow/0.3"))
    assert await eventually(lambda: proxy.state.active_connections == 1)
    assert proxy.state.open_connections == 1
    await task
    assert proxy.state.active_connections == 0
    client.close()
    assert await eventually(lambda: proxy.state.open_connections == 0)


async def test_while_shutting_down_an_answer_says_connection_close_and_ends_the_connection(
    proxy: Proxy, blue: Backend
) -> None:
    proxy.serve(make_container(blue, "rev1"))
    client = await proxy.connect()
    assert (await client.request("GET", "/"))[0] == 200
    for connection in proxy.connections:
        connection.close_when_idle(grace=5.0)
    status, headers, body = await client.request("GET", "/")
    assert (status, headers["connection"], body) == (200, "close", b"blue")
    assert await client.read_all() == b""


async def test_while_shutting_down_an_idle_connection_is_closed_after_the_grace(
    proxy: Proxy, blue: Backend
) -> None:
    proxy.serve(make_container(blue, "rev1"))
    client = await proxy.connect()
    assert (await client.request("GET", "/"))[0] == 200
    for connection in proxy.connections:
        connection.close_when_idle(grace=0.2)
    assert await client.read_all() == b""


async def test_a_switch_closes_idle_keep_alive_connections_to_the_old_container(
    proxy: Proxy, blue: Backend, green: Backend
) -> None:
    old = make_container(blue, "rev1")
    proxy.serve(old)
    client = await proxy.connect()
    assert (await client.request("GET", "/"))[2] == b"blue"
    assert len(old.links) == 1
    proxy.serve(make_container(green, "rev2"))
    assert old.close_links(idle_only=True) == 1
    assert await eventually(lambda: not old.links)
    # The client connection itself lives on and reaches the new container.
    assert (await client.request("GET", "/"))[2] == b"green"


async def test_a_get_on_a_kept_alive_connection_the_container_just_closed_is_sent_again(
    proxy: Proxy, blue: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    proxy.serve(make_container(blue, "rev1"))
    client = await proxy.connect()
    assert (await client.request("GET", "/then-drop"))[0] == 200
    status, _, body = await client.request("GET", "/")
    assert (status, body, blue.dropped) == (200, b"blue", 1)
    assert blue.connections == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [], "the keep-alive race is routine: no warning"


async def test_a_post_on_a_kept_alive_connection_the_container_just_closed_is_not_sent_again(
    proxy: Proxy, blue: Backend
) -> None:
    proxy.serve(make_container(blue, "rev1"))
    client = await proxy.connect()
    assert (await client.request("GET", "/then-drop"))[0] == 200
    status, _, _ = await client.request("POST", "/echo", b"pay once")
    assert status == 502, "a POST may have been processed: it is not sent twice"


async def test_an_idle_keep_alive_connection_expires_after_the_timeout_but_a_busy_one_does_not(
    proxy: Proxy, blue: Backend
) -> None:
    proxy.edge = Edge(keepalive_timeout=30, upstream_timeout=60)
    proxy.serve(make_container(blue, "rev1"))
    idle, busy = await proxy.connect(), await proxy.connect()
    assert (await idle.request("GET", "/"))[0] == 200
    slow = asyncio.create_task(busy.request("GET", "/slow/0.5"))
    assert await eventually(lambda: proxy.state.active_connections == 1)
    proxy.sweep(seconds_later=31)
    assert await idle.read_all() == b""
    assert (await slow)[0] == 200
    assert proxy.state.timeouts == {}, "closing an idle connection is no timeout"


async def test_a_new_client_connection_reuses_the_kept_alive_connection_of_an_earlier_one(
    proxy: Proxy, blue: Backend
) -> None:
    container = make_container(blue, "rev1")
    proxy.serve(container)
    for _ in range(3):
        client = await proxy.connect()
        assert (await client.request("GET", "/"))[2] == b"blue"
        client.close()
        assert await eventually(lambda: len(container.spare) == 1)
    assert blue.connections == 1, "one upstream connection served three clients"


async def test_a_spare_connection_the_container_closed_is_not_used_again(
    proxy: Proxy, blue: Backend
) -> None:
    container = make_container(blue, "rev1")
    proxy.serve(container)
    client = await proxy.connect()
    assert (await client.request("GET", "/then-drop"))[0] == 200
    client.close()
    assert await eventually(lambda: len(container.spare) == 1)
    again = await proxy.connect()
    # The spare was kept alive but the backend drops the next request on it: the proxy
    # sends the GET again on a new connection.
    assert (await again.request("GET", "/"))[2] == b"blue"
    assert blue.connections == 2


async def test_a_drain_closes_the_spare_connections_of_the_old_container(
    proxy: Proxy, blue: Backend, green: Backend
) -> None:
    old = make_container(blue, "rev1")
    proxy.serve(old)
    client = await proxy.connect()
    assert (await client.request("GET", "/"))[0] == 200
    client.close()
    assert await eventually(lambda: len(old.spare) == 1)
    proxy.serve(make_container(green, "rev2"))
    assert old.close_links(idle_only=True) == 1
    assert await eventually(lambda: not old.spare and not old.links)


async def test_the_listener_accepts_a_burst_of_connections_and_serves_them_all(
    blue: Backend,
) -> None:
    state = ProxyState("testapp", "test")
    container = make_container(blue, "rev1")
    state.add(container)
    state.switch_to(container)
    listener = await listen(
        Address.parse("127.0.0.1:0", "--proxy"), lambda: ClientConnection(state, Edge())
    )
    port = listener.sockets[0].getsockname()[1]
    pairs: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        pairs = await asyncio.gather(
            *(asyncio.open_connection("127.0.0.1", port) for _ in range(300))
        )
        for _, writer in pairs:
            writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        answers = await asyncio.gather(
            *(asyncio.wait_for(reader.readuntil(b"blue"), 10) for reader, _ in pairs)
        )
        assert all(answer.startswith(b"HTTP/1.1 200 ") for answer in answers)
        assert state.requests.total == 300
    finally:
        for _, writer in pairs:
            writer.close()
        listener.close()
        await asyncio.sleep(0.05)


# -- figures and the access log -------------------------------------------------------------


async def test_every_request_is_counted_with_its_revision_status_time_and_exact_bytes(
    proxy: Proxy, blue: Backend
) -> None:
    proxy.serve(make_container(blue, "rev1"))
    requests = [
        b"GET /status/404 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /slow/0.2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    ]
    answers = []
    for request in requests:
        client = await proxy.connect()
        client.send_raw(request)
        answers.append(await client.read_all())
    assert answers[2].endswith(b"\r\n\r\nhello")
    figures = proxy.state.traffic.totals()["rev1"]
    assert figures.by_status == {200: 2, 404: 1}
    assert figures.latency.count == 3
    # The slowest is the 0.2 s one (with room for a loaded machine).
    assert 0.18 <= figures.latency.percentile(1.0) < 0.6
    assert figures.bytes_in == sum(map(len, requests))
    assert figures.bytes_out == sum(map(len, answers))


async def test_the_access_log_has_one_line_per_request_with_forwarded_for_and_revision(
    proxy: Proxy, blue: Backend
) -> None:
    proxy.serve(make_container(blue, "rev1"))
    client = await proxy.connect()
    forwarded = [("X-Forwarded-For", "198.51.100.4")]
    send_request(client.conn, client.writer, "GET", "/status/201", headers=forwarded)
    assert (await client.response())[0] == 201
    assert (await client.request("GET", "/"))[0] == 200
    first, second = await proxy.logged_lines(2)
    assert first.startswith("127.0.0.1 - - [")
    assert '] "GET /status/201 HTTP/1.1" 201 ' in first
    assert first.split('"')[-2:-1] == ["198.51.100.4"]
    revision, seconds, fallback, encoding, buffered = first.split()[-5:]
    assert (revision, fallback, encoding, buffered) == ("rev1", "-", "-", "-")
    assert float(seconds) < 5
    assert '"GET / HTTP/1.1" 200 ' in second and ' "-" rev1 ' in second


async def test_a_refused_request_is_logged_with_its_400_and_no_revision(
    proxy: Proxy, blue: Backend
) -> None:
    proxy.serve(make_container(blue, "rev1"))
    bad = await proxy.connect()
    bad.send_raw(b"\x16\x03\x01 not http\r\n\r\n")
    await bad.read_all()
    (line,) = await proxy.logged_lines(1)
    assert '"- - -" 400 ' in line and line.split()[-3] == "-"
    assert proxy.state.traffic.totals()["-"].by_status == {400: 1}


async def test_a_client_leaving_before_the_answer_is_logged_as_499(
    proxy: Proxy, blue: Backend
) -> None:
    proxy.serve(make_container(blue, "rev1"))
    client = await proxy.connect()
    client.send_raw(b"GET /slow/0.5 HTTP/1.1\r\nHost: x\r\n\r\n")
    await eventually(lambda: blue.requests == 1)
    # A reset, not a FIN: a half-closed client still gets its answer.
    sock = client.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.writer.transport.abort()
    (line,) = await proxy.logged_lines(1)
    assert '"GET /slow/0.5 HTTP/1.1" 499 0 ' in line
    assert proxy.state.traffic.totals()["rev1"].by_status == {499: 1}


async def test_a_request_answered_by_the_proxy_itself_counts_its_head_in_bytes_in(
    proxy: Proxy,
) -> None:
    request = b"GET /anything HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    client = await proxy.connect()
    client.send_raw(request)
    answer = await client.read_all()
    assert answer.startswith(b"HTTP/1.1 503 ")
    figures = proxy.state.traffic.totals()["-"]
    assert (figures.bytes_in, figures.bytes_out) == (len(request), len(answer))


async def test_a_client_closing_after_its_400_is_counted_once(proxy: Proxy, blue: Backend) -> None:
    proxy.serve(make_container(blue, "rev1"))
    bad = await proxy.connect()
    bad.send_raw(b"NOT HTTP AT ALL\r\n\r\n")
    bad.writer.write_eof()
    answer = await bad.read_all()
    assert answer.startswith(b"HTTP/1.1 400 ") and answer.count(b"HTTP/1.1 4") == 1
    await proxy.logged_lines(1)
    assert proxy.state.requests.by_status[400] == 1
    assert proxy.state.traffic.totals()["-"].by_status == {400: 1}


async def test_an_answer_that_ends_when_the_container_closes_ends_the_client_connection_too(
    proxy: Proxy, blue: Backend
) -> None:
    proxy.serve(make_container(blue, "rev1"))
    client = await proxy.connect()
    client.send_raw(b"GET /events HTTP/1.1\r\nHost: t\r\n\r\n")
    received = await asyncio.wait_for(client.reader.read(-1), 3)  # EOF, or a timeout
    assert received.endswith(b"\r\n\r\ndata: 0\n\ndata: 1\n\ndata: 2\n\n")
    assert proxy.state.requests.by_status == {200: 1}


async def _early_answering_container(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Answers a POST from its head alone, then (unless it closes) reads the body it was
    sent and answers the next request: as an app that refuses an upload early does."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
    close = b"/close" in head.split(b"\r\n")[0]
    writer.write(
        b"HTTP/1.1 413 Too Large\r\nContent-Length: 4\r\n"
        + (b"Connection: close\r\n" if close else b"")
        + b"\r\nnope"
    )
    if close:
        writer.close()
        return
    body = await reader.readexactly(length)
    await reader.readuntil(b"\r\n\r\n")
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%d" % (len(str(len(body))), len(body))
    )
    await writer.drain()
    writer.close()


@pytest.mark.parametrize("closes", [False, True])
async def test_a_container_answering_before_the_whole_body_still_gets_the_rest_or_closes(
    proxy: Proxy, closes: bool, caplog: pytest.LogCaptureFixture
) -> None:
    server = await asyncio.start_server(_early_answering_container, "127.0.0.1", 0)
    backend = Backend("early")
    backend.server = server
    proxy.serve(make_container(backend, "rev1"))
    client = await proxy.connect()
    path = "/close" if closes else "/"
    client.send_raw(f"POST {path} HTTP/1.1\r\nhost: t\r\ncontent-length: 100000\r\n\r\n".encode())
    client.send_raw(b"x" * 1000)
    status, _, body = await client.response()
    assert (status, body) == (413, b"nope")
    client.send_raw(b"x" * 99_000)
    if closes:
        assert await client.read_all() == b"", "the client connection closes too"
        assert proxy.state.requests.by_status == {413: 1}
    else:
        client.conn = h11.Connection(h11.CLIENT)  # the POST went raw: a parser for the GET
        assert (await client.request("GET", "/"))[2] == b"100000", "the container got it all"
        assert proxy.state.requests.by_status == {413: 1, 200: 1}
    assert "failed" not in caplog.text, "an answer that ended is no failure"
    server.close()


async def test_the_proxys_own_answer_to_head_has_no_body_and_keeps_the_connection_in_step(
    proxy: Proxy, blue: Backend
) -> None:
    client = await proxy.connect()
    status, headers, body = await client.request("HEAD", "/")
    assert (status, headers["content-length"], body) == (503, "29", b"")
    proxy.serve(make_container(blue, "rev1"))
    assert await client.request("GET", "/") == (
        200,
        {"x-backend": "blue", "content-length": "4"},
        b"blue",
    )


async def test_an_idle_client_holds_no_container_connection(proxy: Proxy, blue: Backend) -> None:
    """Between requests a client's connection to the container goes back to the
    container's spares: clients served one after another share one connection there."""
    container = make_container(blue, "rev1")
    proxy.serve(container)
    clients = [await proxy.connect() for _ in range(3)]
    for client in clients * 2:
        assert (await client.request("GET", "/"))[2] == b"blue"
        assert (len(container.spare), len(container.links)) == (1, 1)
    assert (blue.connections, blue.requests) == (1, 6)


async def test_a_drained_containers_idle_connections_are_closed_and_not_reused(
    proxy: Proxy, blue: Backend, green: Backend
) -> None:
    old = make_container(blue, "rev1")
    proxy.serve(old)
    idle, slow = await proxy.connect(), await proxy.connect()
    in_flight = asyncio.create_task(slow.request("GET", "/slow/0.5"))
    assert await eventually(lambda: old.in_flight == 1)
    assert (await idle.request("GET", "/"))[2] == b"blue"  # on a second connection
    proxy.serve(make_container(green, "rev2"))
    assert old.state == "draining"
    # The idle client's connection waits among the spares: the drain closes it at once.
    assert old.close_links(idle_only=True) == 1
    assert (await in_flight)[2] == b"blue"
    # The request in flight finished there; its connection is closed, not kept.
    assert await eventually(lambda: not old.links and not old.spare)
    assert (await idle.request("GET", "/"))[2] == b"green"
    assert blue.connections == 2
