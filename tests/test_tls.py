"""The TLS listener in process, on real sockets: the proxy's listener with the certificate of
a throwaway CA, in front of a real HTTP backend."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.backend import Backend
from tests.support.proxied import Client, make_container
from tests.support.tls import Pki, serial_served
from tests.support.waiting import eventually
from wunderproxy.certificates import Certificates
from wunderproxy.config import Address, Edge, Tls
from wunderproxy.forwarder import ClientConnection
from wunderproxy.listeners import ConnectionLimit, Listener, TlsAccept, listen
from wunderproxy.state import ProxyState

HANDSHAKE_TIMEOUT = 0.5
ROUNDS = 5
REQUEST = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"


@dataclass
class TlsProxy:
    """A TLS listener and a plain one under one connection limit, proxying to a backend."""

    pki: Pki
    certificates: Certificates
    state: ProxyState
    tls: Listener
    plain: Listener
    open: set[ClientConnection] = field(default_factory=set)
    clients: list[Client] = field(default_factory=list)

    @property
    def port(self) -> int:
        port: int = self.tls.sockets[0].getsockname()[1]
        return port

    async def connect(
        self, context: ssl.SSLContext | None = None, server_hostname: str | None = "localhost"
    ) -> Client:
        """A client that trusts the root CA only (or uses ``context``)."""
        reader, writer = await asyncio.open_connection(
            "127.0.0.1",
            self.port,
            ssl=context or self.pki.client_context(),
            server_hostname=server_hostname,
        )
        client = Client(reader, writer)
        self.clients.append(client)
        return client

    async def connect_plain(self) -> Client:
        port = self.plain.sockets[0].getsockname()[1]
        client = Client(*await asyncio.open_connection("127.0.0.1", port))
        self.clients.append(client)
        return client


@contextlib.asynccontextmanager
async def tls_proxy(tmp_path: Path, backend: Backend, limit: int = 100) -> AsyncIterator[TlsProxy]:
    pki = Pki(tmp_path)
    pki.install(pki.issue())
    certificates = Certificates(
        Tls(Address.parse("127.0.0.1:0", "--proxy-tls"), pki.cert_path, pki.key_path)
    )
    state = ProxyState("testapp", "test")
    container = make_container(backend, "rev1")
    state.add(container)
    state.switch_to(container)
    connections: set[ClientConnection] = set()

    def refused() -> None:
        state.connections_refused += 1

    def factory(scheme: str) -> ClientConnection:
        connection = ClientConnection(state, Edge(), connections.discard, scheme=scheme)
        connections.add(connection)
        return connection

    shared = ConnectionLimit(limit, lambda: len(connections), refused)
    address = Address.parse("127.0.0.1:0", "--proxy")
    accept = TlsAccept(lambda: certificates.context, HANDSHAKE_TIMEOUT)
    secure = await listen(address, lambda: factory("https"), shared, accept)
    plain = await listen(address, lambda: factory("http"), shared)
    proxy = TlsProxy(pki, certificates, state, secure, plain, connections)
    try:
        yield proxy
    finally:
        for client in proxy.clients:
            client.close()
        for connection in list(connections):
            connection.abort()
        secure.close()
        plain.close()
        await asyncio.sleep(0.05)


@pytest.fixture
async def proxy(tmp_path: Path, blue: Backend) -> AsyncIterator[TlsProxy]:
    async with tls_proxy(tmp_path, blue) as started:
        yield started


def client_context(pki: Pki, version: ssl.TLSVersion, ciphers: str | None = None) -> ssl.SSLContext:
    """A client trusting the root that speaks only TLS ``version`` (with ``ciphers``)."""
    context = pki.client_context()
    if version < ssl.TLSVersion.TLSv1_2:
        context.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 speaks TLS 1.1 only so
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0 and 1.1 are
        context.minimum_version = context.maximum_version = version
    if ciphers is not None:
        context.set_ciphers(ciphers)
    return context


def handshake(port: int, context: ssl.SSLContext) -> tuple[str | None, str, str | None]:
    """Version, cipher and ALPN protocol a handshake with 127.0.0.1:``port`` settles on."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        cipher = tls.cipher()
        assert cipher is not None
        return tls.version(), cipher[0], tls.selected_alpn_protocol()


def resumed(port: int, context: ssl.SSLContext) -> bool:
    """Whether a second connection resumes the session of a first one (which made a
    request, so that TLS 1.3's tickets arrived)."""
    session = None
    for _ in range(2):
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="localhost", session=session) as tls,
        ):
            tls.sendall(REQUEST)
            assert tls.recv(12) == b"HTTP/1.1 200"
            reused = tls.session_reused
            session = tls.session
    return reused


async def test_a_client_trusting_only_the_root_gets_the_chain_and_its_answer_over_https(
    proxy: TlsProxy,
) -> None:
    context = proxy.pki.client_context()
    context.set_alpn_protocols(["h2", "http/1.1"])
    client = await proxy.connect(context)
    status, headers, body = await client.request("GET", "/")
    assert (status, headers["x-backend"], body) == (200, "blue", b"blue")
    # Trusting the root alone, the client verified a certificate the intermediate signed:
    # the server sent the intermediate along.
    tls = client.writer.get_extra_info("ssl_object")
    assert tls.selected_alpn_protocol() == "http/1.1"
    assert tls.getpeercert()["serialNumber"] == proxy.certificates.describe()["serial"]
    [connection] = proxy.open
    assert connection._scheme == "https"


async def test_the_plain_listener_beside_it_gives_its_connections_the_http_scheme(
    proxy: TlsProxy,
) -> None:
    client = await proxy.connect_plain()
    assert (await client.request("GET", "/"))[0] == 200
    [connection] = proxy.open
    assert connection._scheme == "http"


async def test_tls_1_2_settles_on_an_ecdhe_aead_suite_and_1_3_is_spoken(proxy: TlsProxy) -> None:
    pki = proxy.pki
    version, cipher, alpn = await asyncio.to_thread(
        handshake, proxy.port, client_context(pki, ssl.TLSVersion.TLSv1_2)
    )
    assert version == "TLSv1.2"
    assert cipher.startswith("ECDHE-") and ("-GCM-" in cipher or "CHACHA20" in cipher), cipher
    assert alpn is None  # the client offered none
    version, _, _ = await asyncio.to_thread(handshake, proxy.port, pki.client_context())
    assert version == "TLSv1.3"


@pytest.mark.parametrize(
    ("version", "ciphers", "reason"),
    [
        (ssl.TLSVersion.TLSv1_1, None, "UNSUPPORTED_PROTOCOL"),
        (ssl.TLSVersion.TLSv1, None, "UNSUPPORTED_PROTOCOL"),
        # TLS 1.2 with forward secrecy but without authenticated encryption (CBC).
        (
            ssl.TLSVersion.TLSv1_2,
            "ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA384",
            "NO_SHARED_CIPHER",
        ),
        # TLS 1.2 with authenticated encryption but without forward secrecy (RSA key
        # exchange).
        (ssl.TLSVersion.TLSv1_2, "AES128-GCM-SHA256", "NO_SHARED_CIPHER"),
    ],
    ids=["TLS 1.1", "TLS 1.0", "TLS 1.2 CBC", "TLS 1.2 RSA key exchange"],
)
async def test_old_protocols_and_weak_suites_are_refused(
    proxy: TlsProxy,
    version: ssl.TLSVersion,
    ciphers: str | None,
    reason: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, "wunderproxy")
    context = client_context(proxy.pki, version, ciphers)
    with pytest.raises(ssl.SSLError) as refused:
        await asyncio.to_thread(handshake, proxy.port, context)
    # The server hung up on the client's hello (asyncio drops the alert it would send with
    # the connection), and says why in its debug log. A client unable to offer what it
    # was told would have failed before sending anything.
    assert refused.value.reason == "UNEXPECTED_EOF_WHILE_READING"
    assert "TLS handshake with 127.0.0.1:" in caplog.text
    assert f"[SSL: {reason}]" in caplog.text
    # The refused handshake holds nothing, and the next client is served.
    await eventually(lambda: not proxy.open)
    client = await proxy.connect()
    assert (await client.request("GET", "/"))[0] == 200


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_a_second_connection_resumes_the_first_ones_session(
    proxy: TlsProxy, version: ssl.TLSVersion
) -> None:
    context = client_context(proxy.pki, version)
    assert await asyncio.to_thread(resumed, proxy.port, context)


async def test_a_reload_reaches_new_handshakes_only_and_open_connections_keep_serving(
    proxy: TlsProxy,
) -> None:
    pki = proxy.pki
    kept = await proxy.connect()
    assert (await kept.request("GET", "/"))[0] == 200
    old_serial = kept.writer.get_extra_info("ssl_object").getpeercert()["serialNumber"]
    new = pki.install(pki.issue())
    assert proxy.certificates.reload()
    assert new.serial != old_serial
    assert (
        await asyncio.to_thread(serial_served, proxy.port, pki.client_context(), "localhost")
        == new.serial
    )
    # A client connecting by IP address sends no SNI: it gets the new certificate too.
    by_address = pki.client_context()
    by_address.check_hostname = False
    assert await asyncio.to_thread(serial_served, proxy.port, by_address, None) == new.serial
    # The connection opened before, idle meanwhile, still answers, on its old certificate.
    assert (await kept.request("GET", "/"))[0] == 200
    assert kept.writer.get_extra_info("ssl_object").getpeercert()["serialNumber"] == old_serial


async def test_a_client_that_never_finishes_its_handshake_is_closed_after_the_timeout(
    proxy: TlsProxy,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"\x16\x03\x01")  # the first bytes of a ClientHello, then nothing
    started = time.monotonic()
    assert await asyncio.wait_for(reader.read(), 10) == b""
    assert HANDSHAKE_TIMEOUT <= time.monotonic() - started < HANDSHAKE_TIMEOUT + 3
    writer.close()
    # The connection built for it is forgotten: it no longer counts toward the limit.
    await eventually(lambda: not proxy.open)
    assert proxy.state.open_connections == 0


async def test_plain_http_sent_to_the_tls_port_is_closed_and_forgotten(proxy: TlsProxy) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(REQUEST)
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
    await eventually(lambda: not proxy.open)
    assert proxy.state.open_connections == 0


async def test_the_limit_is_shared_and_past_it_a_tls_connection_is_closed_unanswered(
    tmp_path: Path, blue: Backend
) -> None:
    async with tls_proxy(tmp_path, blue, limit=1) as proxy:
        plain = await proxy.connect_plain()
        assert (await plain.request("GET", "/"))[0] == 200
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await proxy.connect()
        assert proxy.state.connections_refused == 1
        plain.close()
        await eventually(lambda: not proxy.open)
        client = await proxy.connect()
        assert (await client.request("GET", "/"))[0] == 200


def request_then_close_notify(port: int, context: ssl.SSLContext) -> bytes:
    """Send a request, then TLS's close_notify (the client will send nothing more); return
    what comes back until the server closes."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"GET /slow/0.2 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        with contextlib.suppress(OSError):
            tls.unwrap()  # sends close_notify, reads the server's
        received = b""
        with contextlib.suppress(OSError):
            while chunk := raw.recv(65536):
                received += chunk
        return received


async def test_a_client_that_ends_its_tls_session_after_a_request_is_closed_quietly(
    proxy: TlsProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """asyncio ends a TLS connection at the client's close_notify, so the request cannot
    be answered (nginx gives up on it too): it is counted as the client's, and no
    warning about half-closing is logged."""
    caplog.set_level(logging.INFO)
    client_context = proxy.pki.client_context()
    for _ in range(ROUNDS):  # where the close_notify falls varies: several rounds
        assert await asyncio.to_thread(request_then_close_notify, proxy.port, client_context) == b""
    await eventually(lambda: not proxy.open)
    assert proxy.state.requests.by_status == {499: ROUNDS}
    assert "eof_received" not in caplog.text
