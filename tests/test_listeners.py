"""The accept path: the connection limit over real sockets, the open-file limit and its
derivation, and the pause when accept runs out of descriptors (through a socket seam)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import resource
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.backend import Backend
from tests.support.waiting import eventually
from tests.test_proxy import Client, make_container
from wunderproxy import fdlimit, upstream
from wunderproxy.config import Address, Edge
from wunderproxy.forwarder import ClientConnection
from wunderproxy.listeners import (
    FIRST_PAUSE,
    ConnectionLimit,
    GreedyListener,
    Listener,
    listen,
)
from wunderproxy.state import ProxyState

REQUEST = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"

# -- the derivation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("open_files", "connections"),
    [(1_048_576, 524_224), (20_000, 9_936), (1024, 448), (256, 64), (129, 1), (64, 1)],
)
def test_connections_allowed_keeps_descriptors_for_the_process_and_two_per_connection(
    open_files: int, connections: int
) -> None:
    assert fdlimit.RESERVED_DESCRIPTORS == 128
    assert fdlimit.connections_allowed(open_files) == connections


def test_each_fallback_peers_idle_connections_are_kept_back_too(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A peer keeps up to MAX_SPARE idle connections of its own, beyond the two per
    client connection: 20,000 - 128 - 2 x 1024, halved."""
    assert upstream.MAX_SPARE == 1024
    assert fdlimit.connections_allowed(20_000, peers=2) == 8_912
    assert fdlimit.connections_allowed(20_000, peers=0) == 9_936
    open_files = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    with caplog.at_level(logging.INFO, "wunderproxy"):
        allowed = fdlimit.max_connections(None, peers=1)
    assert allowed == (open_files - 128 - 1024) // 2
    assert (
        "- 128 kept for the process - 1024 for idle connections to 1 fallback peer(s))"
        in "".join(caplog.messages)
    )


def test_start_up_raises_the_soft_limit_to_the_hard_one_and_derives_from_it() -> None:
    """In a child process started with soft 256, hard 1024: it ends with 1024 and 448."""
    script = (
        "import logging, resource\n"
        "from wunderproxy import fdlimit\n"
        "logging.basicConfig(level='INFO', format='%(levelname)s %(message)s')\n"
        "print(fdlimit.max_connections(None))\n"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 1024)),
    )
    assert done.stdout.split() == ["448", "1024"]
    assert "open-file limit raised from 256 to the hard limit 1024" in done.stderr
    assert (
        "max connections: 448 = (open-file limit 1024 - 128 kept for the process) / 2 "
        "descriptors per connection (client and container side)"
    ) in done.stderr


def test_a_max_connections_above_what_the_limit_allows_is_kept_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    allowed = fdlimit.connections_allowed(resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    with caplog.at_level(logging.INFO, "wunderproxy"):
        assert fdlimit.max_connections(allowed + 1) == allowed + 1
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert f"--max-connections {allowed + 1} is more than" in warning.message
    assert "ulimit -n" in warning.message and "LimitNOFILE=" in warning.message


def test_a_max_connections_within_the_limit_is_kept_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, "wunderproxy"):
        assert fdlimit.max_connections(10) == 10
    assert "max connections: 10 (--max-connections)" in caplog.messages
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# -- refusal past the limit over real sockets ------------------------------------------------

LIMIT = 3


@dataclass
class LimitedProxy:
    """A proxy listener with a tiny connection limit, counted the way the server counts."""

    state: ProxyState
    listener: Listener
    address: Address
    open: set[ClientConnection] = field(default_factory=set)
    clients: list[Client] = field(default_factory=list)

    async def connect(self) -> Client:
        if self.address.path is not None:
            reader, writer = await asyncio.open_unix_connection(self.address.path)
        else:
            port = self.listener.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = Client(reader, writer)
        self.clients.append(client)
        return client

    async def served(self, client: Client) -> bool:
        """Whether a request on ``client`` is answered 200 by the container."""
        status, headers, _ = await client.request("GET", "/")
        return status == 200 and headers["x-backend"] == "blue"

    async def refused(self, client: Client) -> bytes:
        """What ``client`` reads up to EOF without sending anything.

        (Over a Unix socket, a write after the refusal fails with EPIPE, and asyncio's
        client then drops what it had read: the TCP-only test below sends first.)
        """
        return await client.read_all()


@contextlib.asynccontextmanager
async def limited_proxy(address: Address, backend: Backend) -> AsyncIterator[LimitedProxy]:
    """A listener at ``address`` with the limit, proxying to ``backend``."""
    state = ProxyState("testapp", "test")
    container = make_container(backend, "rev1")
    state.add(container)
    state.switch_to(container)
    connections: set[ClientConnection] = set()

    def refused() -> None:
        state.connections_refused += 1

    def new_client() -> ClientConnection:
        connection = ClientConnection(state, Edge(), connections.discard)
        connections.add(connection)
        return connection

    limit = ConnectionLimit(LIMIT, lambda: len(connections), refused)
    listener = await listen(address, new_client, limit)
    proxy = LimitedProxy(state, listener, address, connections)
    try:
        yield proxy
    finally:
        for client in proxy.clients:
            client.close()
        for connection in list(connections):
            connection.abort()
        listener.close()
        await asyncio.sleep(0.05)


@pytest.fixture(params=["tcp", "unix"])
async def limited(
    request: pytest.FixtureRequest, blue: Backend, tmp_path: Path
) -> AsyncIterator[LimitedProxy]:
    """The limited listener on TCP, then on a Unix socket."""
    where = f"unix:{tmp_path / 'proxy.sock'}" if request.param == "unix" else "127.0.0.1:0"
    async with limited_proxy(Address.parse(where, "--proxy"), blue) as proxy:
        yield proxy


@pytest.fixture
async def limited_tcp(blue: Backend) -> AsyncIterator[LimitedProxy]:
    async with limited_proxy(Address.parse("127.0.0.1:0", "--proxy"), blue) as proxy:
        yield proxy


@pytest.fixture
async def blue() -> AsyncIterator[Backend]:
    backend = await Backend("blue").start()
    yield backend
    await backend.stop()


async def test_past_the_limit_a_connection_reads_a_503_naming_it_then_eof(
    limited: LimitedProxy,
) -> None:
    served = [await limited.connect() for _ in range(LIMIT)]
    for client in served:
        assert await limited.served(client)
    answer = await limited.refused(await limited.connect())  # read to EOF
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"\r\nConnection: close" in head
    assert b"at most 3 at once (--max-connections)" in body
    assert limited.state.connections_refused == 1
    assert len(limited.open) == LIMIT, "no protocol was built for the refused connection"
    assert limited.state.requests.total == LIMIT, "the refused request was not read"
    # The first ones are still served, and a slot freed is a slot for the next client.
    for client in served:
        assert await limited.served(client)
    served[0].close()
    await eventually(lambda: len(limited.open) == LIMIT - 1)
    assert await limited.served(await limited.connect())


async def test_a_burst_is_held_to_the_limit_counting_connections_not_yet_started(
    limited_tcp: LimitedProxy,
) -> None:
    """Connections accepted in one batch count before their protocol exists; each sends
    its request at once, and a refused one still reads its 503 whole."""
    limited = limited_tcp
    clients = await asyncio.gather(*(limited.connect() for _ in range(10)))
    for client in clients:
        client.send_raw(REQUEST)
    answers = await asyncio.gather(
        *(asyncio.wait_for(client.reader.readexactly(12), 10) for client in clients)
    )
    assert sorted(answers) == [b"HTTP/1.1 200"] * LIMIT + [b"HTTP/1.1 503"] * (10 - LIMIT)
    assert limited.state.connections_refused == 10 - LIMIT
    refused = [c for c, answer in zip(clients, answers, strict=True) if b"503" in answer]
    for client in refused:
        rest = await client.read_all()
        assert rest.endswith(b"(--max-connections); try again shortly\n"), rest


async def test_refusals_are_logged_at_most_once_a_second_with_their_count(
    limited: LimitedProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "wunderproxy")
    for _ in range(LIMIT):
        await limited.connect()
    await eventually(lambda: len(limited.open) == LIMIT)
    loop = asyncio.get_running_loop()
    started = loop.time()
    for _ in range(20):
        client = await limited.connect()
        assert (await limited.refused(client)).startswith(b"HTTP/1.1 503 ")
    await asyncio.sleep(1.2)  # the report of those refused after the first
    elapsed = loop.time() - started
    refusals = [m for m in caplog.messages if "with 503" in m]
    assert len(refusals) <= 1 + elapsed / 1.0
    assert refusals[0].endswith(
        "refused 1 new connection(s) with 503: 3 open, the most allowed (--max-connections 3)"
    )
    counts = [int(m.split("refused ")[1].split()[0]) for m in refusals]
    assert sum(counts) == 20 == limited.state.connections_refused


# -- out of descriptors: pause, retry, never spin ---------------------------------------------


class FailingSocket(socket.socket):
    """A real listening socket whose accept() first fails with ``code``: ``failures``
    times, or for ``seconds`` after its first call."""

    def __init__(self, code: int, failures: int = 0, seconds: float = 0.0) -> None:
        super().__init__(socket.AF_INET, socket.SOCK_STREAM)
        self.code = code
        self.failures = failures
        self.seconds = seconds
        self.accepts: list[float] = []  # loop time of every accept() call
        self.bind(("127.0.0.1", 0))
        self.listen(16)

    def _accept(self) -> tuple[int, object]:  # what GreedyListener calls
        now = asyncio.get_running_loop().time()
        self.accepts.append(now)
        if self.failures > 0 or now - self.accepts[0] < self.seconds:
            self.failures -= 1
            raise OSError(self.code, "seam")
        return super()._accept()  # type: ignore[misc,no-any-return]


class Greeter(asyncio.Protocol):
    """Writes a word and closes: enough to tell a connection was served."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(b"hello")
        transport.close()


async def serve_one(sock: FailingSocket) -> tuple[GreedyListener, float, bytes]:
    """Listen on ``sock``, connect once; the listener, when it connected, what was read."""
    listener = GreedyListener(sock, Greeter)
    connected = asyncio.get_running_loop().time()
    reader, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
    try:
        return listener, connected, await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


async def test_out_of_descriptors_the_listener_pauses_then_retries_without_spinning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "wunderproxy")
    sock = FailingSocket(errno.EMFILE, failures=3)
    listener, connected, greeting = await serve_one(sock)
    listener.close()
    assert greeting == b"hello", "the connection waited in the queue and was served"
    # Three failures, the accept that worked, and the one that found the queue empty:
    # a loop that kept watching the (readable) socket would have called accept thousands
    # of times in the pauses.
    assert len(sock.accepts) == 5
    gaps = [later - earlier for earlier, later in zip(sock.accepts, sock.accepts[1:], strict=False)]
    pauses = [FIRST_PAUSE, FIRST_PAUSE * 2, FIRST_PAUSE * 4]
    for gap, pause in zip(gaps, pauses, strict=False):
        assert gap >= pause * 0.9, f"retried after {gap:.3f} s, before the {pause} s pause"
    assert sock.accepts[0] >= connected
    [warning] = [m for m in caplog.messages if "cannot accept" in m]
    assert "this process has no file descriptor left" in warning
    assert "ulimit -n" in warning and "--max-connections" in warning


async def test_while_accept_keeps_failing_it_is_called_once_per_pause_not_in_a_spin() -> None:
    """EMFILE for 1.2 s: tries at 0, 0.1, 0.3, 0.7 and 1.5 s, then the queue is empty."""
    sock = FailingSocket(errno.EMFILE, seconds=1.2)
    listener, _, greeting = await serve_one(sock)
    listener.close()
    assert greeting == b"hello"
    assert len(sock.accepts) == 6, f"{len(sock.accepts)} accept calls in 1.2 s"


async def test_pauses_grow_to_at_most_a_second_and_reports_come_once_a_second(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "wunderproxy")
    sock = FailingSocket(errno.ENFILE, failures=7)  # 0.1 + 0.2 + 0.4 + 0.8 + 1 + 1 + 1 s
    listener, _, greeting = await serve_one(sock)
    listener.close()
    assert greeting == b"hello"
    gaps = [later - earlier for earlier, later in zip(sock.accepts, sock.accepts[1:], strict=False)]
    assert len(sock.accepts) == 9
    assert max(gaps) < 1.0 + 0.5, "pauses stop growing at a second"
    assert min(gaps[4:7]) >= 0.9, "the later pauses are a second long"
    elapsed = sock.accepts[-1] - sock.accepts[0]
    reports = [m for m in caplog.messages if "cannot accept" in m]
    assert 2 <= len(reports) <= 1 + elapsed / 1.0
    assert "the host has no file descriptor left" in reports[0]


@pytest.mark.parametrize("code", [errno.ECONNABORTED, errno.EPROTO])
async def test_an_accept_error_of_one_connection_goes_on_to_the_next_at_once(
    code: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "wunderproxy")
    sock = FailingSocket(code, failures=1)
    listener, _, greeting = await serve_one(sock)
    listener.close()
    assert greeting == b"hello"
    assert len(sock.accepts) == 3  # the failure, the connection, the empty queue
    assert sock.accepts[1] - sock.accepts[0] < FIRST_PAUSE, "no pause"
    assert not [m for m in caplog.messages if "cannot accept" in m]
