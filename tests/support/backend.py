"""A real HTTP/1.1 app server on 127.0.0.1 for proxy tests, built on h11.

Paths: ``/`` answers its name; ``/status/N`` answers N; ``/echo`` answers the request
body; ``/chunked`` answers in chunks; ``/slow/S`` waits S seconds; ``/close`` answers
with ``Connection: close``; ``/then-drop`` answers, then closes its connection on the
next request without answering (as a server's idle timeout does); ``/ws`` accepts an
upgrade and then echoes raw bytes; ``/big/N`` answers N bytes; ``/stall`` sends a head and
half its body, then nothing; ``/events`` answers a ``text/event-stream`` without a length,
three events 0.1 s apart, and ends it by closing the connection; ``/drop`` closes its
connection without answering. With ``answering`` False, every request is met that way
(an app that crashed while its port stays open).
``/random/N`` answers N bytes of :func:`random_body` (no two stretches alike, so a byte out
of place shows) with a Content-Length, 64 KiB a write; ``?chunked`` in chunks instead,
``?until-close`` with no length, ending it by closing the connection; ``&wait=S`` waits S
seconds before its head, ``&pause=S`` after the first half of its body, and ``&cut`` closes
the connection there instead (a container that dies mid-answer); ``&type=T`` sets the
Content-Type, ``&accel=no`` sends ``X-Accel-Buffering: no``. ``body_sent`` counts such
bytes the kernel took, ``answered`` the answers written whole (not yet all read, maybe).
Every answer carries ``X-Backend: NAME`` so tests can tell which server answered;
``heads`` keeps every request head received, ``connected_at`` the time (``time.monotonic``)
each connection was accepted, and ``received`` the raw bytes read on each.

A :class:`Sink` is an app that reads uploads slowly and keeps nothing of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import re
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import h11


@dataclass
class Backend:
    """A running test backend; ``requests`` counts the requests it received."""

    name: str
    server: asyncio.Server | None = None
    requests: int = 0
    connections: int = 0
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    drop_next_on_connection: dict[int, bool] = field(default_factory=dict)
    dropped: int = 0
    heads: list[h11.Request] = field(default_factory=list)
    connected_at: list[float] = field(default_factory=list)
    received: list[bytearray] = field(default_factory=list)
    answering: bool = True
    body_sent: int = 0
    answered: int = 0

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def start(self, port: int = 0) -> Backend:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        return self

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        self.connections += 1
        self.connected_at.append(time.monotonic())
        raw = bytearray()
        self.received.append(raw)
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request, body = await _read_request(conn, reader, raw)
                if request is None:
                    return
                self.requests += 1
                self.heads.append(request)
                if not await self._answer(conn, writer, reader, request, body):
                    return
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (ConnectionError, h11.RemoteProtocolError, asyncio.CancelledError):
            pass
        finally:
            self.tasks.discard(task)
            writer.close()

    async def _answer(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        reader: asyncio.StreamReader,
        request: h11.Request,
        body: bytes,
    ) -> bool:
        path = request.target.decode()
        headers = [(b"x-backend", self.name.encode())]
        if self.drop_next_on_connection.pop(id(writer), False):
            self.dropped += 1
            return False  # closes without an answer, as after its own idle timeout
        if path == "/then-drop":
            self.drop_next_on_connection[id(writer)] = True
        if path == "/drop" or not self.answering:
            self.dropped += 1
            return False
        if path == "/ws":
            writer.write(
                conn.send(
                    h11.InformationalResponse(
                        status_code=101,
                        headers=[(b"upgrade", b"websocket"), (b"connection", b"upgrade")],
                    )
                )
            )
            writer.write(conn.trailing_data[0])  # bytes sent after the request: echo them
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            return False
        if path == "/stall":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf.")
            await asyncio.sleep(3600)
        if path.startswith("/random/"):
            return await self._random(conn, writer, path)
        if path == "/events":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
            for number in range(3):
                writer.write(b"data: %d\n\n" % number)
                await writer.drain()
                await asyncio.sleep(0.1)
            return False  # the end of the answer is the end of the connection
        status, payload = 200, self.name.encode()
        if path.startswith("/status/"):
            status = int(path.removeprefix("/status/"))
        elif path == "/echo":
            payload = body
        elif path.startswith("/slow/"):
            await asyncio.sleep(float(path.removeprefix("/slow/")))
        elif path.startswith("/big/"):
            payload = b"x" * int(path.removeprefix("/big/"))
        elif path == "/close":
            headers.append((b"connection", b"close"))
        if path == "/chunked":
            writer.write(conn.send(h11.Response(status_code=200, headers=headers)))
            for part in (b"one ", b"two ", b"three"):
                writer.write(conn.send(h11.Data(data=part)))
                await writer.drain()
        else:
            if status not in (204, 304):
                headers.append((b"content-length", str(len(payload)).encode()))
            writer.write(conn.send(h11.Response(status_code=status, headers=headers)))
            if request.method != b"HEAD" and status not in (204, 304):
                writer.write(conn.send(h11.Data(data=payload)))
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()
        return True

    async def _random(self, conn: h11.Connection, writer: asyncio.StreamWriter, path: str) -> bool:
        """``/random/N...``: see the module's docstring."""
        url = urlsplit(path)
        query = {name: values[0] for name, values in parse_qs(url.query, True).items()}
        if "wait" in query:
            await asyncio.sleep(float(query["wait"]))
        body = random_body(int(url.path.removeprefix("/random/")))
        headers = [
            ("X-Backend", self.name),
            ("Content-Type", query.get("type", "application/octet-stream")),
        ]
        if "accel" in query:
            headers.append(("X-Accel-Buffering", query["accel"]))
        until_close = "until-close" in query
        if until_close:  # h11 would frame it: written by hand
            writer.write(
                b"HTTP/1.1 200 OK\r\n%s\r\n"
                % b"".join(
                    b"%s: %s\r\n" % (name.encode(), value.encode()) for name, value in headers
                )
            )
        else:
            if "chunked" not in query:
                headers.append(("Content-Length", str(len(body))))
            writer.write(conn.send(h11.Response(status_code=200, headers=headers)))
        step = 65536
        half = len(body) // 2 // step * step
        for at in range(0, len(body), step):
            if at == half and "pause" in query:
                await asyncio.sleep(float(query["pause"]))
            if at == half and "cut" in query:
                return False
            part = body[at : at + step]
            writer.write(part if until_close else conn.send(h11.Data(data=part)))
            await writer.drain()
            self.body_sent += len(part)
        if not until_close:
            writer.write(conn.send(h11.EndOfMessage()))
            await writer.drain()
        self.answered += 1
        return not until_close


def random_body(size: int) -> bytes:
    """``size`` pseudo-random bytes, the same each time for the same size."""
    return random.Random(size).randbytes(size)


async def _read_request(
    conn: h11.Connection, reader: asyncio.StreamReader, raw: bytearray
) -> tuple[h11.Request | None, bytes]:
    request = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await reader.read(65536)
            raw += data
            conn.receive_data(data)
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return request, bytes(body)
        else:
            return None, b""


@contextlib.asynccontextmanager
async def running_backend(name: str):  # type: ignore[no-untyped-def]
    """A started :class:`Backend`, stopped on exit."""
    backend = await Backend(name).start()
    try:
        yield backend
    finally:
        await backend.stop()


@dataclass
class Sink:
    """A server that takes each request's body slowly and answers its length and SHA-256.

    It keeps nothing of a body (so that its own memory does not count where the proxy's
    is measured) and reads with a small receive buffer, after ``read_after`` seconds and
    ``pace`` bytes at a time every 10 ms: the slow app a buffered body must wait for.
    Content-Length bodies only; one request per connection.
    """

    read_after: float = 0.0
    pace: int = 64 * 1024
    server: asyncio.Server | None = None
    answered: int = 0

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> Sink:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # accepted ones inherit it
        sock.bind(("127.0.0.1", 0))
        self.server = await asyncio.start_server(self._serve, sock=sock)
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            found = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            assert found is not None, f"the sink takes Content-Length bodies: {head!r}"
            length = int(found.group(1))
            await asyncio.sleep(self.read_after)
            digest = hashlib.sha256()
            while length:
                data = await reader.read(min(self.pace, length))
                if not data:
                    return
                digest.update(data)
                length -= len(data)
                await asyncio.sleep(0.01)
            body = f"{digest.hexdigest()}\n".encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
            self.answered += 1
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def running_sink(read_after: float = 0.0, pace: int = 64 * 1024) -> AsyncIterator[Sink]:
    """A started :class:`Sink`, stopped on exit."""
    sink = await Sink(read_after, pace).start()
    try:
        yield sink
    finally:
        assert sink.server is not None
        sink.server.close()
        await sink.server.wait_closed()
