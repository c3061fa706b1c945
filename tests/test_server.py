"""The server in process with a fake store and engine: its timeout sweep, and how it
wires the TLS listener."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.support.fakes import FakeEngine, MemoryStore
from tests.support.tls import Pki
from wunderproxy.certificates import CertificateError
from wunderproxy.config import Address, Config, Edge, Tls
from wunderproxy.redirect import Redirect
from wunderproxy.server import Server


class Checked:
    """Stands in for a client connection: counts the sweep's looks, or fails them."""

    def __init__(self, fails: bool) -> None:
        self.fails = fails
        self.looks = 0

    def check_timeouts(self, now: float) -> None:
        self.looks += 1
        if self.fails:
            raise RuntimeError("a bug in one connection")


async def test_one_connections_error_neither_stops_the_sweep_nor_the_others_timeouts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = Config(
        bucket="memory",
        prefix="apps",
        app="myapp",
        proxy=Address.parse("127.0.0.1:0", "--proxy"),
        api=Address.parse("127.0.0.1:0", "--api"),
        edge=Edge(keepalive_timeout=0.5),  # a sweep every 0.05 s
    )
    server = Server(config, MemoryStore(), FakeEngine("127.0.0.1", 1))
    broken, healthy = Checked(fails=True), Checked(fails=False)
    server.proxying._connections.update([broken, healthy])  # type: ignore[list-item]
    sweeper = asyncio.create_task(server.proxying.enforce_timeouts())
    try:
        await asyncio.sleep(0.5)
    finally:
        sweeper.cancel()
    # A sweep every 0.05 s for 0.5 s: both were looked at again and again.
    assert healthy.looks >= 5 and broken.looks >= 5, (healthy.looks, broken.looks)
    assert "enforcing the timeouts of a connection failed" in caplog.text


def tls_config(pki: Pki, redirect_http: bool = False) -> Config:
    return Config(
        bucket="memory",
        prefix="apps",
        app="myapp",
        proxy=Address.parse("127.0.0.1:0", "--proxy"),
        api=Address.parse("127.0.0.1:0", "--api"),
        tls=Tls(
            Address.parse("127.0.0.1:0", "--proxy-tls"), pki.cert_path, pki.key_path, redirect_http
        ),
    )


def test_a_server_given_no_certificates_loads_those_of_its_tls_settings(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    pair = pki.install(pki.issue())
    server = Server(tls_config(pki), MemoryStore(), FakeEngine("127.0.0.1", 1))
    assert server.certificates is not None
    assert server.certificates.describe()["serial"] == pair.serial
    assert server.state.snapshot()["features"]["tls"]["serial"] == pair.serial
    pki.key_path.write_bytes(pki.issue().key)
    with pytest.raises(CertificateError, match="is not the key of the certificate"):
        Server(tls_config(pki), MemoryStore(), FakeEngine("127.0.0.1", 1))


async def test_connections_of_the_tls_listener_have_the_https_scheme_and_no_redirect(
    tmp_path: Path,
) -> None:
    pki = Pki(tmp_path)
    pki.install(pki.issue())
    server = Server(tls_config(pki, redirect_http=True), MemoryStore(), FakeEngine("127.0.0.1", 1))
    server.proxying._redirect = Redirect(8443)  # as listening on the TLS port sets it
    secure, plain = server.proxying._new_tls_client(), server.proxying._new_client()
    assert (secure._scheme, secure._redirect) == ("https", None)
    assert (plain._scheme, plain._redirect) == ("http", server.proxying._redirect)
