"""--buffer-requests over real sockets: the in-process proxy, h11 app servers, uploads sent
in pieces. The container sees nothing of a request (not even a connection) before its
body is whole; the body reaches it byte for byte through memory and a file; the file is
gone when the request ends, however it ends."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import h11
import pytest

from tests.support.backend import Backend, running_sink
from tests.support.proxied import Client, Proxy, make_container, running_proxy
from tests.support.waiting import eventually
from tests.test_fallback import fleet_of
from tests.test_spool import open_files_under
from wunderproxy.config import Edge, Front

MEMORY = 64 * 1024  # --buffer-memory of these tests: larger bodies go to a file
PIECE = 64 * 1024


@pytest.fixture
def spool_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "spool"
    directory.mkdir()
    yield directory
    assert open_files_under(directory) == [], "a buffered body's file outlived its request"


def buffering(proxy: Proxy, directory: Path, memory: int = MEMORY) -> None:
    proxy.front = Front(buffer_requests=True, buffer_memory=memory, buffer_dir=directory)


def body_of(size: int) -> bytes:
    """``size`` bytes in which no 64 KiB piece repeats another (a misplaced one shows)."""
    return b"".join(hashlib.sha256(b"%d" % i).digest() for i in range(size // 32 + 1))[:size]


def send(client: Client, *events: h11.Request | h11.Data | h11.EndOfMessage) -> bytes:
    """Write these events on the client's connection; the bytes written."""
    data = b"".join(client.conn.send(event) for event in events)  # type: ignore[misc]
    client.send_raw(data)
    return data


def upload_head(target: str, length: int | None, *fields: tuple[str, str]) -> h11.Request:
    """A PUT's head: with this Content-Length, or chunked (None)."""
    framing = (
        ("Content-Length", str(length)) if length is not None else ("Transfer-Encoding", "chunked")
    )
    return h11.Request(method="PUT", target=target, headers=[("Host", "a"), framing, *fields])


async def send_in_pieces(client: Client, body: bytes, pause: float = 0.005) -> bytes:
    """The body in PIECE-byte writes ``pause`` s apart; the bytes written."""
    sent = b""
    for at in range(0, len(body), PIECE):
        sent += send(client, h11.Data(data=body[at : at + PIECE]))
        await client.writer.drain()
        await asyncio.sleep(pause)
    return sent


async def test_the_container_sees_no_connection_before_the_body_is_whole(
    proxy: Proxy, blue: Backend, spool_dir: Path
) -> None:
    buffering(proxy, spool_dir)
    proxy.serve(make_container(blue, "rev1"))
    client = await proxy.connect()
    send(client, upload_head("/echo", 10), h11.Data(data=b"hello"))
    await asyncio.sleep(0.5)
    assert blue.connections == 0
    last_byte_sent = time.monotonic()
    send(client, h11.Data(data=b"world"), h11.EndOfMessage())
    assert await client.response() == (
        200,
        {"x-backend": "blue", "content-length": "10"},
        b"helloworld",
    )
    assert blue.connected_at[0] >= last_byte_sent
    (line,) = await proxy.logged_lines(1)
    assert line.endswith(" request"), line  # the access log's "buffered" field


async def test_a_kept_alive_connection_is_not_taken_before_the_body_is_whole(
    proxy: Proxy, blue: Backend, spool_dir: Path
) -> None:
    buffering(proxy, spool_dir)
    proxy.serve(make_container(blue, "rev1"))
    client = await proxy.connect()
    assert (await client.request("GET", "/"))[0] == 200
    received_before = len(blue.received[0])
    send(client, upload_head("/echo", 10), h11.Data(data=b"hello"))
    await asyncio.sleep(0.5)
    assert len(blue.received[0]) == received_before, "a byte of the upload went up early"
    send(client, h11.Data(data=b"world"), h11.EndOfMessage())
    assert (await client.response())[2] == b"helloworld"
    assert blue.connections == 1  # and then it went on the kept-alive connection


async def test_a_request_that_arrives_whole_goes_up_as_it_is(
    proxy: Proxy, blue: Backend, spool_dir: Path
) -> None:
    buffering(proxy, spool_dir)
    proxy.serve(make_container(blue, "rev1"))
    client = await proxy.connect()
    sent = send(client, upload_head("/echo", 5), h11.Data(data=b"hello"), h11.EndOfMessage())
    assert (await client.response())[2] == b"hello"
    assert bytes(blue.received[0]) == sent
    (line,) = await proxy.logged_lines(1)
    assert line.endswith(" - - -"), line  # nothing was held


@pytest.mark.parametrize("length", [1024 * 1024, None], ids=["content-length", "chunked"])
async def test_a_body_past_the_memory_bound_goes_through_a_file_and_arrives_byte_exact(
    proxy: Proxy, blue: Backend, spool_dir: Path, length: int | None
) -> None:
    buffering(proxy, spool_dir)
    proxy.serve(make_container(blue, "rev1"))
    body = body_of(1024 * 1024)
    client = await proxy.connect()
    sent = send(client, upload_head("/echo", length))
    sent += await send_in_pieces(client, body[: len(body) // 2])
    await eventually(lambda: len(open_files_under(spool_dir)) == 1)  # held in a file
    sent += await send_in_pieces(client, body[len(body) // 2 :])
    sent += send(client, h11.EndOfMessage())
    status, _, echoed = await client.response()
    assert (status, echoed == body) == (200, True)
    assert bytes(blue.received[0]) == sent  # head, chunk framing and all
    await eventually(lambda: open_files_under(spool_dir) == [])


async def test_a_held_body_goes_up_only_as_fast_as_a_slow_container_takes_it(
    proxy: Proxy, spool_dir: Path
) -> None:
    """8 MiB to an app that starts reading after 0.5 s, through a 64 KiB receive buffer:
    more than the sockets between hold, so writing must wait for the app and go on when it
    reads (flow control); were it not resumed, the upload would never end."""
    buffering(proxy, spool_dir)
    body = body_of(8 * 1024 * 1024)
    async with running_sink(read_after=0.5, pace=256 * 1024) as sink:
        proxy.serve(make_container(sink.port, "rev1"))
        client = await proxy.connect()
        send(client, upload_head("/", len(body)), h11.Data(data=body), h11.EndOfMessage())
        status, _, answer = await client.response()
    assert (status, answer) == (200, hashlib.sha256(body).hexdigest().encode() + b"\n")


async def test_the_proxy_answers_100_continue_itself_and_keeps_the_expectation_from_the_app(
    proxy: Proxy, blue: Backend, spool_dir: Path
) -> None:
    buffering(proxy, spool_dir)
    proxy.serve(make_container(blue, "rev1"))
    client = await proxy.connect()
    send(client, upload_head("/echo", 5, ("Expect", "100-continue")))
    client.conn.receive_data(await asyncio.wait_for(client.reader.read(65536), 5))
    informational = client.conn.next_event()
    assert isinstance(informational, h11.InformationalResponse)
    assert informational.status_code == 100
    assert blue.connections == 0
    send(client, h11.Data(data=b"hello"), h11.EndOfMessage())
    assert (await client.response())[2] == b"hello"
    assert [name for name, _ in blue.heads[0].headers] == [b"host", b"content-length"]


async def test_a_switch_during_an_upload_sends_it_to_the_container_serving_when_it_is_whole(
    proxy: Proxy, blue: Backend, green: Backend, spool_dir: Path
) -> None:
    buffering(proxy, spool_dir)
    proxy.serve(make_container(blue, "rev1"))
    client = await proxy.connect()
    send(client, upload_head("/echo", 10), h11.Data(data=b"hello"))
    await asyncio.sleep(0.2)
    proxy.serve(make_container(green, "rev2"))
    send(client, h11.Data(data=b"world"), h11.EndOfMessage())
    _, headers, body = await client.response()
    assert (headers["x-backend"], body) == ("green", b"helloworld")
    assert blue.connections == 0


async def test_a_put_on_a_connection_the_container_drops_is_sent_again_whole_from_its_file(
    proxy: Proxy, blue: Backend, spool_dir: Path
) -> None:
    """The keep-alive race, for a held body 16 times REPLAY_LIMIT: its file is what is sent
    again, so that its size does not matter."""
    buffering(proxy, spool_dir)
    proxy.serve(make_container(blue, "rev1"))
    client = await proxy.connect()
    assert (await client.request("GET", "/then-drop"))[0] == 200
    body = body_of(1024 * 1024)
    send(client, upload_head("/echo", len(body)))
    await send_in_pieces(client, body)
    send(client, h11.EndOfMessage())
    status, _, echoed = await client.response()
    assert (status, echoed == body, blue.dropped, blue.connections) == (200, True, 1, 2)


async def test_a_held_body_goes_whole_to_a_peer_when_no_container_is_here(
    tmp_path: Path, green: Backend, spool_dir: Path
) -> None:
    async with running_proxy(tmp_path / "there.log", fallback=fleet_of("web-2")) as there:
        there.serve(make_container(green, "rev1"))
        async with running_proxy(tmp_path / "here.log", fallback=fleet_of("web-1", there)) as here:
            buffering(here, spool_dir)
            client = await here.connect()
            body = body_of(256 * 1024)
            send(client, upload_head("/echo", len(body)))
            await send_in_pieces(client, body)
            send(client, h11.EndOfMessage())
            _, headers, echoed = await client.response()
    assert (headers["x-backend"], echoed == body) == ("green", True)


@pytest.mark.parametrize("leaves", ["reset", "half-close"])
async def test_a_client_leaving_mid_upload_leaves_no_file_and_the_container_untouched(
    proxy: Proxy, blue: Backend, spool_dir: Path, leaves: str
) -> None:
    buffering(proxy, spool_dir)
    proxy.serve(make_container(blue, "rev1"))
    client = await proxy.connect()
    send(client, upload_head("/echo", 1024 * 1024))
    await send_in_pieces(client, body_of(256 * 1024))
    await eventually(lambda: len(open_files_under(spool_dir)) == 1)
    if leaves == "reset":
        sock = client.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.writer.transport.abort()
    else:
        client.writer.write_eof()
    await eventually(lambda: open_files_under(spool_dir) == [])
    (line,) = await proxy.logged_lines(1)
    assert f'" {499 if leaves == "reset" else 400} ' in line
    assert blue.connections == 0


async def test_the_body_timeout_still_applies_while_a_body_is_held(
    proxy: Proxy, blue: Backend, spool_dir: Path
) -> None:
    proxy.edge = Edge(body_timeout=10)
    buffering(proxy, spool_dir)
    proxy.serve(make_container(blue, "rev1"))
    client = await proxy.connect()
    send(client, upload_head("/echo", 1024 * 1024))
    await send_in_pieces(client, body_of(256 * 1024))
    await eventually(lambda: len(open_files_under(spool_dir)) == 1)
    proxy.sweep(5)
    assert len(open_files_under(spool_dir)) == 1, "408 before the body timeout"
    proxy.sweep(11)
    assert (await client.response())[0] == 408
    await eventually(lambda: open_files_under(spool_dir) == [])
    assert blue.connections == 0


async def test_a_body_that_cannot_be_stored_gets_503_and_everyone_else_is_served(
    proxy: Proxy,
    blue: Backend,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """--buffer-dir removed after start-up: the file of a body past --buffer-memory cannot
    be made (a full disk fails the same write: see test_request_buffering_process.py)."""
    gone = tmp_path / "gone"
    buffering(proxy, gone, memory=4096)
    proxy.serve(make_container(blue, "rev1"))
    client = await proxy.connect()
    send(client, upload_head("/echo", 100_000), h11.Data(data=b"x" * 10_000))
    status, headers, body = await client.response()
    assert (status, headers["connection"]) == (503, "close")
    assert b"no room to hold the request body" in body
    assert await client.read_all() == b""  # closed
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"under {gone} (No such file or directory; 1 so far): the request was answered 503" in (
        warning
    )
    assert "point --buffer-dir at a directory with room" in warning
    assert proxy.state.snapshot()["buffer_failures"] == 1
    # Others are served: a body that arrives whole needs no file, nor does one in memory.
    other = await proxy.connect()
    send(other, upload_head("/echo", 5), h11.Data(data=b"hello"), h11.EndOfMessage())
    assert (await other.response())[2] == b"hello"
    send(other, upload_head("/echo", 10), h11.Data(data=b"hello"))
    await asyncio.sleep(0.05)
    send(other, h11.Data(data=b"world"), h11.EndOfMessage())
    assert (await other.response())[2] == b"helloworld"
    assert blue.requests == 2


async def test_with_both_buffers_an_early_answer_to_a_held_upload_never_lets_its_connection_go_on(
    proxy: Proxy, spool_dir: Path
) -> None:
    """The app answers before it took the held body (and never reads it) while the client
    reads slowly: the answer streams, and the connection the body was cut short on is
    neither reused for another client nor left holding this client's reading."""
    heads: list[tuple[int, bytes]] = []  # (connection number, its first bytes)
    writers: list[asyncio.StreamWriter] = []

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        number = len(heads)
        head = await reader.readuntil(b"\r\n\r\n")
        heads.append((number, head))
        if head.startswith(b"PUT"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (4 * MiB))
            writer.write(b"x" * (4 * MiB))
            await writer.drain()
            await asyncio.sleep(30)  # keeps the connection, never reads the body
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(app, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        proxy.front = Front(
            buffer_requests=True, buffer_responses=True, buffer_memory=MEMORY, buffer_dir=spool_dir
        )
        proxy.serve(make_container(port, "rev1"))
        slow = await proxy.connect(receive_buffer=16_384)
        send(slow, upload_head("/up", 8 * MiB), h11.Data(data=b"u" * (8 * MiB)), h11.EndOfMessage())
        await asyncio.sleep(1.0)  # reads nothing meanwhile
        # Another client: its request goes on a connection of its own, from its start.
        other = await proxy.connect()
        assert (await other.request("GET", "/second"))[2] == b"ok"
        assert [head[:11] for _, head in heads] == [b"PUT /up HTT", b"GET /second"]
        status, _, body = await slow.response()
        assert (status, len(body)) == (200, 4 * MiB)
        # This client is read again: its next request is answered.
        assert (await asyncio.wait_for(slow.request("GET", "/third"), 10))[2] == b"ok"
    finally:
        for writer in writers:
            writer.transport.abort()
        server.close()
        await server.wait_closed()


MiB = 1024 * 1024
