"""The TLS listener's certificate: the server's SSL context, and its reload without a restart.

A renewal (certbot, an ACME client, an operator with ``cp``) rewrites ``--tls-cert`` and
``--tls-key``; :class:`Certificates` notices it (SIGHUP, or a change of either file's
mtime, size or inode, looked at every :data:`~wunderproxy.config.TLS_RELOAD_INTERVAL`
seconds) and builds a new context. The listener asks for the current context at each accept,
so new handshakes use the new certificate while connections already open keep the one they
began with. A pair that does not load, or whose key is not the certificate's, is kept out:
the old context goes on serving, the log says what is wrong, and the pair is tried again
when either file changes again. A renewal that writes the certificate first and the key a
moment later thus passes through one refused pair (logged) and ends loaded.

The files are read with ``cryptography`` (to say precisely what is wrong with them, and to
show the certificate in ``/status``) and loaded into the context by OpenSSL, which reads
them again: should they change in between, the signature taken before the first read no
longer matches, and the next look loads them again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
)

from wunderproxy.config import TLS_RELOAD_INTERVAL, Tls
from wunderproxy.timestamps import rfc3339

log = logging.getLogger("wunderproxy.tls")

# TLS 1.2 suites: forward secrecy (ECDHE) and authenticated encryption (GCM, ChaCha20-Poly1305)
# only, as Mozilla's "intermediate" configuration without its DHE suites (slow, and no client
# that speaks TLS 1.2 lacks ECDHE). TLS 1.3 suites are all of that kind; OpenSSL's defaults.
TLS12_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)
# The one application protocol spoken: a client offering h2 and http/1.1 is told http/1.1.
ALPN = ["http/1.1"]


class CertificateError(Exception):
    """A certificate and key that cannot serve; the message says which file and what to do."""


# (device, inode, size, mtime in ns) of a file, or None when it cannot be looked at.
FileSignature = tuple[int, int, int, int] | None


def signature(path: Path) -> FileSignature:
    """What tells a file was replaced or rewritten, without reading it."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def server_context() -> ssl.SSLContext:
    """A server context with wunderproxy's TLS settings and no certificate yet."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.set_ciphers(TLS12_CIPHERS)
    context.set_alpn_protocols(ALPN)
    # Renegotiation costs the server a handshake a client can ask for at will, and nothing
    # in HTTP/1.1 needs it. Session resumption (tickets, and TLS 1.2 session ids) is on:
    # OpenSSL's default, which nothing here turns off.
    context.options |= ssl.OP_NO_RENEGOTIATION
    return context


@dataclass(frozen=True)
class Loaded:
    """A certificate and key loaded into a context, with what ``/status`` shows of it."""

    context: ssl.SSLContext
    subject: str
    serial: str  # upper-case hex, as OpenSSL and browsers show it
    not_after: datetime
    loaded_at: datetime


def load(cert: Path, key: Path) -> Loaded:
    """Load ``cert`` (PEM, the certificate first, then its chain) and ``key`` (PEM).

    Raises :class:`CertificateError` naming the file at fault and what to do.
    """
    chain = _certificates(cert)
    private_key = _private_key(key)
    leaf = chain[0]
    if _public(leaf.public_key()) != _public(private_key.public_key()):
        raise CertificateError(
            f"--tls-key {key} is not the key of the certificate in --tls-cert {cert} (the "
            "first certificate of the file); give the key issued with it (certbot: "
            "privkey.pem beside fullchain.pem), or wait until a renewal wrote both files"
        )
    context = server_context()
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise CertificateError(
            f"OpenSSL refused --tls-cert {cert} with --tls-key {key}: {exc}"
        ) from exc
    return Loaded(
        context=context,
        subject=leaf.subject.rfc4514_string(),
        serial=serial_hex(leaf.serial_number),
        not_after=leaf.not_valid_after_utc,
        loaded_at=datetime.now(UTC),
    )


def _read(path: Path, option: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CertificateError(
            f"cannot read {option} {path}: {exc.strerror or exc}; give a PEM file this "
            "process may read"
        ) from exc


def _certificates(path: Path) -> list[x509.Certificate]:
    data = _read(path, "--tls-cert")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise CertificateError(
            f"--tls-cert {path} {_unreadable(data, b'-----BEGIN CERTIFICATE-----', exc)}; "
            "give the certificate followed by its chain (certbot: fullchain.pem)"
        ) from exc


def _private_key(path: Path) -> PrivateKeyTypes:
    data = _read(path, "--tls-key")
    try:
        return load_pem_private_key(data, password=None)
    except TypeError as exc:  # encrypted
        raise CertificateError(
            f"--tls-key {path} is encrypted with a passphrase; give it unencrypted "
            "(openssl pkey -in KEY -out PLAIN_KEY), readable by this process only"
        ) from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CertificateError(
            f"--tls-key {path} {_unreadable(data, b'PRIVATE KEY-----', exc)}; give the "
            "certificate's private key (certbot: privkey.pem)"
        ) from exc


def _unreadable(data: bytes, marker: bytes, exc: Exception) -> str:
    """Why a PEM file did not load, in the words an operator looks for."""
    if not data.strip():
        return "is empty (being written?)"
    if marker not in data:
        return f"is not PEM: it has no {marker.decode().strip('-')} block"
    return f"has a PEM block that does not read (cut short, or damaged): {exc}"


def _public(key: PublicKeyTypes) -> bytes:
    """A public key's bytes, comparable whatever its algorithm."""
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def serial_hex(serial: int) -> str:
    """A serial number as OpenSSL and browsers show it: upper-case hex, whole bytes."""
    return serial.to_bytes(max(1, (serial.bit_length() + 7) // 8), "big").hex().upper()


class Certificates:
    """The certificate the TLS listener serves now, reloaded on demand or when its files change.

    Raises :class:`CertificateError` when the first pair does not load: start-up stops
    before anything listens.
    """

    def __init__(self, tls: Tls) -> None:
        self._cert = tls.cert
        self._key = tls.key
        self._tried = self._signatures()  # taken before reading: a change meanwhile shows
        self.current = load(self._cert, self._key)
        self.reloads = 0  # successful ones since start-up
        self.last_error: str | None = None  # of the last reload, None once one succeeds
        _warn_if_expired(self.current)

    @property
    def context(self) -> ssl.SSLContext:
        """The context for the next handshake."""
        return self.current.context

    def reload(self, reason: str = "SIGHUP") -> bool:
        """Load the files now, whatever their signature; True if the new pair serves."""
        self._tried = self._signatures()
        try:
            loaded = load(self._cert, self._key)
        except CertificateError as exc:
            self.last_error = str(exc)
            old = self.current
            log.error(
                "TLS certificate not reloaded (%s): %s. Still serving serial %s (%s), "
                "loaded at %s; trying again when --tls-cert or --tls-key change, or on SIGHUP",
                reason,
                exc,
                old.serial,
                old.subject,
                rfc3339(old.loaded_at),
            )
            return False
        self.current = loaded
        self.reloads += 1
        self.last_error = None
        log.info(
            "TLS certificate reloaded (%s): serial %s (%s), valid until %s; new handshakes "
            "use it, connections already open keep theirs",
            reason,
            loaded.serial,
            loaded.subject,
            rfc3339(loaded.not_after),
        )
        _warn_if_expired(loaded)
        return True

    def reload_if_changed(self) -> bool:
        """Reload if either file changed since the last try (True: a reload was tried)."""
        if self._signatures() == self._tried:
            return False
        self.reload("the files changed")
        return True

    async def watch(self, interval: float = TLS_RELOAD_INTERVAL) -> None:
        """Look at the files every ``interval`` seconds, until cancelled."""
        while True:
            await asyncio.sleep(interval)
            try:
                self.reload_if_changed()
            except Exception:  # a bug here must not end the watch, nor the process
                log.exception("looking for a renewed TLS certificate failed")

    def describe(self) -> dict[str, Any]:
        """The certificate part of ``/status`` ``features.tls``."""
        current = self.current
        return {
            "subject": current.subject,
            "serial": current.serial,
            "not_after": rfc3339(current.not_after),
            "loaded_at": rfc3339(current.loaded_at),
            "reloads": self.reloads,
            "last_reload_error": self.last_error,
        }

    def _signatures(self) -> tuple[FileSignature, FileSignature]:
        return signature(self._cert), signature(self._key)


def _warn_if_expired(loaded: Loaded) -> None:
    if loaded.not_after <= datetime.now(UTC):
        log.warning(
            "the TLS certificate serial %s (%s) expired at %s: clients refuse it; renew it "
            "(it is reloaded once renewed)",
            loaded.serial,
            loaded.subject,
            rfc3339(loaded.not_after),
        )
