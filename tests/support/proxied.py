"""An in-process proxy for tests: the forwarder on a real 127.0.0.1 listener, real backends.

The fixtures ``proxy``, ``blue`` and ``green`` give a proxy with no container yet and two
h11 app servers to route it to; :meth:`Proxy.sweep` runs the timeout sweep on a clock the
test controls.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import h11
import pytest

from tests.support.backend import Backend
from tests.support.waiting import eventually
from tests.support.wire import read_answer, send_request
from wunderproxy.accesslog import AccessLog
from wunderproxy.config import Edge, Front
from wunderproxy.fallback import Fallback
from wunderproxy.forwarder import ClientConnection
from wunderproxy.launchconfig import md5_hex, parse_launch_config
from wunderproxy.redirect import Redirect
from wunderproxy.state import Container, ProxyState


def make_container(backend: Backend | int, revision: str, health_path: str = "/") -> Container:
    """A container of ``revision`` answering on ``backend`` (or on this port)."""
    raw = json.dumps({"Revision": revision, "HealthCheckPath": health_path}).encode()
    return Container(
        config=parse_launch_config(raw, md5_hex(raw)),
        image=f"test/{revision}",
        container_id=f"{revision}-container",
        host="127.0.0.1",
        port=backend if isinstance(backend, int) else backend.port,
        started_at=datetime.now(UTC),
    )


class Proxy:
    def __init__(self, state: ProxyState, server: asyncio.Server, access_log: AccessLog) -> None:
        self.state = state
        self.server = server
        self.access_log = access_log
        self.port: int = server.sockets[0].getsockname()[1]
        self.clients: list[Client] = []
        self.connections: set[ClientConnection] = set()
        # For the connections accepted from now on.
        self.edge = Edge()
        self.front = Front()
        self.scheme = "http"  # as the TLS listener's connections have "https"

    def sweep(self, seconds_later: float) -> None:
        """Run the timeout sweep as if ``seconds_later`` had passed (a controlled clock)."""
        now = asyncio.get_running_loop().time() + seconds_later
        for connection in list(self.connections):
            connection.check_timeouts(now)

    def serve(self, container: Container) -> None:
        self.state.add(container)
        self.state.switch_to(container)

    async def logged_lines(self, count: int) -> list[str]:
        """The access log's lines, once there are ``count``."""
        path = Path(self.access_log.destination)
        lines: list[str] = []

        def enough() -> bool:
            lines[:] = path.read_text().splitlines()
            return len(lines) >= count

        await eventually(enough)
        return lines

    async def connect(self, receive_buffer: int | None = None) -> Client:
        """A new client connection (with a receive buffer of that size, if given)."""
        sock = socket.socket()
        if receive_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.port))
        reader, writer = await asyncio.open_connection(sock=sock)
        client = Client(reader, writer)
        self.clients.append(client)
        return client


class Client:
    """A raw client socket plus an h11 parser for the answers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = h11.Connection(h11.CLIENT)

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    async def request(
        self, method: str, target: str, body: bytes = b""
    ) -> tuple[int, dict[str, str], bytes]:
        send_request(self.conn, self.writer, method, target, body)
        return await self.response()

    async def response(self) -> tuple[int, dict[str, str], bytes]:
        answer = await read_answer(self.conn, self.reader)
        return answer.status, answer.headers, answer.body

    async def read_until(self, ending: bytes) -> bytes:
        """Raw bytes received until ``ending`` is among them (5 s at most)."""
        received = b""
        while ending not in received:
            received += await asyncio.wait_for(self.reader.read(1024), 5)
        return received

    async def upgrade(self) -> None:
        """Upgrade to the test backend's echo (``/ws``) and check that bytes flow both ways,
        the bytes sent with the request included."""
        self.send_raw(
            b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nearly"
        )
        assert (await self.read_until(b"early")).startswith(b"HTTP/1.1 101 ")
        self.send_raw(b"\x81\x05hello not http")
        assert await self.read_until(b"not http") == b"\x81\x05hello not http"

    async def read_all(self) -> bytes:
        return await asyncio.wait_for(self.reader.read(), 10)

    def close(self) -> None:
        self.writer.close()


@contextlib.asynccontextmanager
async def running_proxy(
    log_path: Path,
    name: str = "testapp",
    fallback: Fallback | None = None,
    redirect: Redirect | None = None,
    front: Front | None = None,
) -> AsyncIterator[Proxy]:
    """The forwarder on a free 127.0.0.1 port, with an access log at ``log_path`` (and
    answering every request with ``redirect``, if given; with the front-door settings
    ``front``, if given)."""
    state = ProxyState(name, "test")
    state.fallback = fallback
    connections: set[ClientConnection] = set()
    access_log = AccessLog(str(log_path))
    access_log.start()

    def new_connection() -> ClientConnection:
        connection = ClientConnection(
            state,
            proxy.edge,
            connections.discard,
            access_log,
            proxy.front,
            proxy.scheme,
            redirect=redirect,
        )
        connections.add(connection)
        return connection

    server = await asyncio.get_running_loop().create_server(new_connection, "127.0.0.1", 0)
    proxy = Proxy(state, server, access_log)
    proxy.connections = connections
    if front is not None:
        proxy.front = front
    try:
        yield proxy
    finally:
        for client in proxy.clients:
            client.close()
        for connection in connections:
            connection.abort()
        if state.fallback is not None:
            state.fallback.stop()
        await asyncio.sleep(0.05)
        server.close()
        await server.wait_closed()
        await access_log.close()


@pytest.fixture
async def proxy(tmp_path: Path) -> AsyncIterator[Proxy]:
    async with running_proxy(tmp_path / "access.log") as started:
        yield started


@pytest.fixture
async def blue() -> AsyncIterator[Backend]:
    backend = await Backend("blue").start()
    yield backend
    await backend.stop()


@pytest.fixture
async def green() -> AsyncIterator[Backend]:
    backend = await Backend("green").start()
    yield backend
    await backend.stop()
