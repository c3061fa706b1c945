"""Request smuggling over real sockets: a client, the proxy, and a naive server behind it.

The server behind reads requests the way a lenient, careless server does: it takes
Content-Length even with Transfer-Encoding, honours a folded line as a field of its own,
ends lines at a bare LF, and reads chunk sizes into 64 bits, wrapping around. Each row
sends bytes through the proxy and asserts what the client got back and exactly what
reached the server: nothing at all for a refused request, and for the rest the very
requests whose answers the client got.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest

from tests.support.hostile import HIDDEN, REFUSED, UPGRADE_FIELDS, head, post
from tests.support.waiting import eventually
from wunderproxy.config import Edge
from wunderproxy.forwarder import ClientConnection
from wunderproxy.launchconfig import md5_hex, parse_launch_config
from wunderproxy.state import Container, ProxyState

# -- the naive server behind the proxy -------------------------------------------------


@dataclass
class NaiveBackend:
    """Records every byte it receives and answers every request it makes out."""

    answer: bytes | None = None  # a fixed answer instead of the usual one
    received: bytearray = field(default_factory=bytearray)
    requests: list[str] = field(default_factory=list)  # "METHOD target" as it read them
    connections: int = 0
    server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> NaiveBackend:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        buffer = b""
        try:
            while data := await reader.read(65536):
                self.received += data
                buffer += data
                while (parsed := naive_request(buffer)) is not None:
                    request, buffer = parsed
                    self.requests.append(request)
                    body = request.encode()
                    writer.write(
                        self.answer
                        or b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
                    )
        except ConnectionError:
            pass
        finally:
            writer.close()


def naive_request(data: bytes) -> tuple[str, bytes] | None:
    """One request read leniently from ``data``: ("METHOD target", the rest), or None."""
    end = re.search(rb"\r?\n\r?\n", data)
    if end is None:
        return None
    lines = re.split(rb"\r?\n|\r", data[: end.start()])
    method, target = [*lines[0].split(), b"?", b"?"][:2]
    fields: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        fields[name.strip().lower()] = value.strip()  # a folded line is a field too
    rest = data[end.end() :]
    if b"content-length" in fields:  # even with Transfer-Encoding
        digits = re.match(rb"[-+]?\d+", fields[b"content-length"])
        length = max(int(digits.group()), 0) if digits else 0
        if len(rest) < length:
            return None
        rest = rest[length:]
    elif b"chunked" in fields.get(b"transfer-encoding", b"").lower():
        while True:
            line_end = rest.find(b"\n")
            if line_end < 0:
                return None
            digits = re.match(rb"[0-9a-fA-F]+", rest)
            size = int(digits.group(), 16) % 2**64 if digits else 0  # wraps around
            rest = rest[line_end + 1 :]
            if size == 0:
                trailer = rest.find(b"\r\n")
                if trailer < 0:
                    return None
                rest = rest[trailer + 2 :]
                break
            if len(rest) < size + 2:
                return None
            rest = rest[size + 2 :]
    return f"{method.decode('latin-1')} {target.decode('latin-1')}", rest


# -- the proxy in front ----------------------------------------------------------------


def proxy_connection(state: ProxyState) -> ClientConnection:
    """One client connection of the proxy: the one place that builds it here."""
    return ClientConnection(state, Edge())


@dataclass
class Setup:
    backend: NaiveBackend
    port: int  # the proxy's


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    backend = await NaiveBackend().start()
    raw = json.dumps({"Revision": "rev1", "HealthCheckPath": "/"}).encode()
    container = Container(
        config=parse_launch_config(raw, md5_hex(raw)),
        image="test/rev1",
        container_id="rev1-container",
        host="127.0.0.1",
        port=backend.port,
        started_at=datetime.now(UTC),
    )
    state = ProxyState("testapp", "test")
    state.add(container)
    state.switch_to(container)
    connections: set[ClientConnection] = set()

    def new_connection() -> ClientConnection:
        connection = proxy_connection(state)
        connections.add(connection)
        return connection

    server = await asyncio.get_running_loop().create_server(new_connection, "127.0.0.1", 0)
    yield Setup(backend, server.sockets[0].getsockname()[1])
    for connection in connections:
        connection.abort()
    server.close()
    await server.wait_closed()
    await backend.stop()


async def exchange(port: int, data: bytes, expected: int) -> list[int]:
    """Send ``data`` on a new connection and read until ``expected`` answers came or the
    proxy closed; then half-close and read to the end: the status of every answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answers = b""
    try:
        writer.write(data)
        async with asyncio.timeout(10):
            while len(statuses(answers)) < expected and (more := await reader.read(65536)):
                answers += more
            writer.transport.get_extra_info("socket").shutdown(socket.SHUT_WR)
            answers += await reader.read()
    finally:
        writer.close()
    return statuses(answers)


def statuses(data: bytes) -> list[int]:
    """The status of each whole answer in ``data`` (answers framed by Content-Length)."""
    found = []
    while b"\r\n\r\n" in data:
        status_line = re.match(rb"HTTP/1\.1 (\d{3}) [^\r]*\r\n", data)
        assert status_line is not None, data
        head_end = data.index(b"\r\n\r\n") + 4
        length = re.search(rb"\r\nContent-Length: (\d+)\r\n", data[:head_end], re.IGNORECASE)
        assert length is not None, data
        end = head_end + int(length.group(1))
        if len(data) < end:
            break
        found.append(int(status_line.group(1)))
        data = data[end:]
    return found


# -- the table -------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """Bytes a client sends, the statuses it must get, what the server must receive."""

    sent: bytes
    statuses: tuple[int, ...]
    received: bytes = b""  # exactly, in order
    answer: bytes | None = None  # the server's answer, when not the usual one


FIRST = head("GET /first HTTP/1.1", "Host: app")
VALID_CHUNKED = post("Transfer-Encoding: chunked", body=b"5;a=b\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\n")
ABSOLUTE = head("GET http://app/x HTTP/1.1", "Host: app")
UPGRADE = head("GET /ws HTTP/1.1", "Host: app", *UPGRADE_FIELDS, "Content-Length: 0")

ROWS: dict[str, Row] = {
    **{name: Row(data, (400,)) for name, data in REFUSED.items()},
    **{
        f"valid-then-{name}": Row(FIRST + REFUSED[name] + HIDDEN, (200, 400), FIRST)
        for name in (
            "obs-fold-hidden-request",
            "content-length-and-chunked",
            "bare-lf-line-ends",
            "upgrade-with-content-length",
        )
    },
    "pipelined-after-a-refused-request": Row(
        REFUSED["two-differing-content-lengths"] + FIRST + HIDDEN, (400,)
    ),
    "head-over-16-KiB": Row(head("GET / HTTP/1.1", "Host: app", "X: " + "a" * 17_000), (431,)),
    "valid-chunked-is-forwarded-as-sent": Row(VALID_CHUNKED, (200,), VALID_CHUNKED),
    "absolute-form-naming-the-host-is-forwarded-as-sent": Row(ABSOLUTE, (200,), ABSOLUTE),
    "upgrade-without-a-body-is-forwarded-as-sent": Row(UPGRADE, (200,), UPGRADE),
    "pipelined-valid-requests-are-forwarded-as-sent": Row(
        FIRST + HIDDEN, (200, 200), FIRST + HIDDEN
    ),
    "answer-with-content-length-and-chunked": Row(
        FIRST,
        (502,),
        FIRST,
        answer=b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n",
    ),
    "answer-with-an-18-digit-chunk-size": Row(
        FIRST,
        (502,),
        FIRST,
        answer=b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1"
        + b"0" * 16
        + b"2\r\nok\r\n",
    ),
    "answer-with-content-length-in-its-trailer": Row(
        FIRST,
        (502,),
        FIRST,
        answer=b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n"
        b"Content-Length: 2\r\n\r\n",
    ),
    "answer-with-a-folded-length": Row(
        FIRST,
        (502,),
        FIRST,
        answer=b"HTTP/1.1 200 OK\r\nX: a\r\n Content-Length: 0\r\nContent-Length: 2\r\n\r\nok",
    ),
}


ROW_PARAMS = [pytest.param(row, id=name) for name, row in ROWS.items()]


@pytest.mark.parametrize("row", ROW_PARAMS)
async def test_the_server_behind_sees_exactly_the_requests_the_client_gets_answers_to(
    setup: Setup, row: Row
) -> None:
    setup.backend.answer = row.answer

    got = await exchange(setup.port, row.sent, len(row.statuses))

    assert got == list(row.statuses)
    if row.received:
        await eventually(lambda: len(setup.backend.received) >= len(row.received))
    else:
        await asyncio.sleep(0.05)  # time for a stray byte to arrive, were one forwarded
        assert setup.backend.connections == 0
    assert bytes(setup.backend.received) == row.received
    answered = [status for status in got if status != 400 and status != 431]
    assert len(setup.backend.requests) == len(answered)


@pytest.mark.parametrize(
    "name", ["obs-fold-hidden-request", "chunk-size-18-hex-digits-hidden-request"]
)
async def test_the_naive_server_alone_would_answer_the_hidden_request(name: str) -> None:
    """The table's server is naive enough to be smuggled to: sent straight to it, the
    vector makes it answer a request the client never sent on its own."""
    backend = await NaiveBackend().start()
    try:
        got = await exchange(backend.port, REFUSED[name], 2)
        assert got == [200, 200]
        assert backend.requests == ["POST /", "GET /hidden"]
    finally:
        await backend.stop()
