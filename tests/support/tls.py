"""A throwaway PKI for the TLS tests (trustme): a root CA, an intermediate CA under it, and
server certificates issued by the intermediate, written where ``--tls-cert`` and
``--tls-key`` point. Clients trust the root only, so a handshake succeeds only when the
server sends the intermediate along.
"""

from __future__ import annotations

import http.client
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme
from cryptography import x509

from wunderproxy.certificates import serial_hex


@dataclass(frozen=True)
class Pair:
    """A certificate (with its chain) and its key, as PEM bytes."""

    chain: bytes
    key: bytes

    @property
    def serial(self) -> str:
        """The leaf's serial as clients see it (``getpeercert()["serialNumber"]``)."""
        return serial_hex(x509.load_pem_x509_certificate(self.chain).serial_number)


class Pki:
    """The CAs, and the two files a wunderproxy serves from (under ``directory``)."""

    def __init__(self, directory: Path) -> None:
        self.root = trustme.CA()
        self.intermediate = self.root.create_child_ca()
        self.cert_path = directory / "fullchain.pem"
        self.key_path = directory / "privkey.pem"

    def issue(self) -> Pair:
        """A new certificate for localhost and 127.0.0.1 (a new serial each time)."""
        leaf = self.intermediate.issue_cert("localhost", "127.0.0.1")
        chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)  # leaf, intermediate
        return Pair(chain, leaf.private_key_pem.bytes())

    def install(self, pair: Pair) -> Pair:
        """Write ``pair`` to the served files: the certificate first, then the key."""
        self.cert_path.write_bytes(pair.chain)
        self.key_path.write_bytes(pair.key)
        return pair

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts the root CA alone (and checks host names)."""
        context = ssl.create_default_context()
        self.root.configure_trust(context)
        return context


def serial_served(port: int, context: ssl.SSLContext, server_hostname: str | None) -> str:
    """The serial of the certificate a new connection to 127.0.0.1:``port`` is shown.

    ``server_hostname`` None sends no SNI, as a client connecting by IP address does (the
    context must then not check host names).
    """
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=server_hostname) as tls,
    ):
        return str(tls.getpeercert()["serialNumber"])


def https_connection(port: int, context: ssl.SSLContext) -> http.client.HTTPSConnection:
    """A keep-alive HTTPS client for 127.0.0.1:``port`` (connected at its first request)."""
    return http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)


def peer_serial(connection: http.client.HTTPSConnection) -> str:
    """The serial of the certificate ``connection`` was shown when it connected."""
    sock = connection.sock
    assert isinstance(sock, ssl.SSLSocket), "not connected"
    return str(sock.getpeercert()["serialNumber"])
