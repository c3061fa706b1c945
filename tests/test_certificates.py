"""The TLS certificate and its reload, on real PEM files (a throwaway CA)."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.support.tls import Pair, Pki
from wunderproxy.certificates import CertificateError, Certificates
from wunderproxy.config import Address, Tls


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


def settings(pki: Pki) -> Tls:
    return Tls(Address.parse("127.0.0.1:0", "--proxy-tls"), pki.cert_path, pki.key_path)


def encrypted(pki: Pki, pair: Pair) -> bytes:
    pki.key_path.write_bytes(pair.key)
    return subprocess.run(
        ["openssl", "pkey", "-in", str(pki.key_path), "-aes256", "-passout", "pass:secret"],
        capture_output=True,
        check=True,
    ).stdout


# How a pair can be broken: what to write, and what the error must say.
BROKEN: dict[str, tuple[Callable[[Pki, Pair, Pair], None], str]] = {
    "key of another certificate": (
        lambda pki, pair, other: pki.key_path.write_bytes(other.key),
        "is not the key of the certificate in --tls-cert",
    ),
    "no key file": (
        lambda pki, pair, other: pki.key_path.unlink(),
        f"cannot read --tls-key {{key}}: {os.strerror(2)}",
    ),
    "garbage certificate": (
        lambda pki, pair, other: pki.cert_path.write_bytes(b"not a certificate\n"),
        "--tls-cert {cert} is not PEM: it has no BEGIN CERTIFICATE block",
    ),
    "empty certificate": (
        lambda pki, pair, other: pki.cert_path.write_bytes(b""),
        "--tls-cert {cert} is empty (being written?)",
    ),
    "certificate cut short": (
        lambda pki, pair, other: pki.cert_path.write_bytes(pair.chain[:300]),
        "--tls-cert {cert} has a PEM block that does not read",
    ),
    "garbage key": (
        lambda pki, pair, other: pki.key_path.write_bytes(b"-----BEGIN NOTHING-----\n"),
        "--tls-key {key} is not PEM: it has no PRIVATE KEY block",
    ),
    "encrypted key": (
        lambda pki, pair, other: pki.key_path.write_bytes(encrypted(pki, pair)),
        "--tls-key {key} is encrypted with a passphrase",
    ),
    "chain before the certificate": (
        lambda pki, pair, other: pki.cert_path.write_bytes(
            pair.chain[pair.chain.index(b"-----END CERTIFICATE-----") + 26 :]
            + pair.chain[: pair.chain.index(b"-----END CERTIFICATE-----") + 26]
        ),
        "is not the key of the certificate in --tls-cert {cert} (the first certificate",
    ),
}


def test_a_pair_loads_and_is_described_as_clients_see_it(pki: Pki) -> None:
    pair = pki.install(pki.issue())
    before = datetime.now(UTC).replace(microsecond=0)
    certificates = Certificates(settings(pki))
    shown = certificates.describe()
    assert shown["serial"] == pair.serial
    assert shown["subject"].startswith("OU=Testing cert"), shown["subject"]
    assert shown["not_after"] == "3000-01-01T00:00:00Z"  # trustme's default
    loaded_at = datetime.strptime(shown["loaded_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert before <= loaded_at <= datetime.now(UTC)
    assert shown["reloads"] == 0
    assert shown["last_reload_error"] is None


@pytest.mark.parametrize("broken", list(BROKEN))
def test_start_up_with_a_broken_pair_fails_naming_the_file_and_what_is_wrong(
    pki: Pki, broken: str
) -> None:
    pair = pki.install(pki.issue())
    breaks, says = BROKEN[broken]
    breaks(pki, pair, pki.issue())
    with pytest.raises(CertificateError) as raised:
        Certificates(settings(pki))
    assert says.format(cert=pki.cert_path, key=pki.key_path) in str(raised.value)


@pytest.mark.parametrize("broken", list(BROKEN))
def test_a_broken_pair_is_kept_out_and_the_old_one_keeps_serving(
    pki: Pki, broken: str, caplog: pytest.LogCaptureFixture
) -> None:
    pair = pki.install(pki.issue())
    certificates = Certificates(settings(pki))
    context = certificates.context
    breaks, says = BROKEN[broken]
    breaks(pki, pair, pki.issue())
    assert not certificates.reload()
    assert certificates.context is context
    assert certificates.describe()["serial"] == pair.serial
    error = certificates.describe()["last_reload_error"]
    assert says.format(cert=pki.cert_path, key=pki.key_path) in error
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.getMessage().startswith(f"TLS certificate not reloaded (SIGHUP): {error}")
    assert f"Still serving serial {pair.serial}" in record.getMessage()
    assert certificates.describe()["reloads"] == 0


def test_a_certificate_renewed_before_its_key_is_refused_once_then_loaded_with_the_key(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "wunderproxy.tls")
    old = pki.install(pki.issue())
    certificates = Certificates(settings(pki))
    assert not certificates.reload_if_changed(), "nothing changed yet"
    new = pki.issue()
    pki.cert_path.write_bytes(new.chain)  # the renewal wrote the certificate only
    assert certificates.reload_if_changed()
    assert certificates.describe()["serial"] == old.serial
    assert "is not the key" in certificates.describe()["last_reload_error"]
    # Not tried again (nor logged again) until a file changes again.
    assert not certificates.reload_if_changed()
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1
    pki.key_path.write_bytes(new.key)  # ... and now its key
    assert certificates.reload_if_changed()
    shown = certificates.describe()
    assert (shown["serial"], shown["reloads"], shown["last_reload_error"]) == (new.serial, 1, None)
    assert f"TLS certificate reloaded (the files changed): serial {new.serial}" in caplog.text


@pytest.mark.parametrize("change", ["rewritten", "replaced", "symlink moved"])
def test_a_change_of_either_file_is_seen(pki: Pki, tmp_path: Path, change: str) -> None:
    """In place (mtime), by rename (inode), or as certbot does: a symlink to a new file."""
    first = pki.issue()
    live = tmp_path / "live"
    live.mkdir()
    (live / "cert1.pem").write_bytes(first.chain)
    pki.cert_path.symlink_to(live / "cert1.pem")
    pki.key_path.write_bytes(first.key)
    certificates = Certificates(settings(pki))
    # The same certificate and key written again: only the files' signature changes.
    if change == "rewritten":
        stat = pki.cert_path.stat()
        (live / "cert1.pem").write_bytes(first.chain)
        os.utime(pki.cert_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    elif change == "replaced":
        (live / "new.pem").write_bytes(first.chain)
        (live / "new.pem").replace(live / "cert1.pem")
    else:
        (live / "cert2.pem").write_bytes(first.chain)
        pki.cert_path.unlink()
        pki.cert_path.symlink_to(live / "cert2.pem")
    assert certificates.reload_if_changed()
    assert certificates.reloads == 1


def test_sighup_reloads_unchanged_files_too(pki: Pki) -> None:
    pki.install(pki.issue())
    certificates = Certificates(settings(pki))
    context = certificates.context
    assert certificates.reload()
    assert certificates.context is not context
    assert certificates.reloads == 1


def test_an_expired_certificate_loads_with_a_warning(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    leaf = pki.intermediate.issue_cert(
        "localhost",
        not_before=datetime.now(UTC) - timedelta(days=90),
        not_after=datetime.now(UTC) - timedelta(days=1),
    )
    pki.cert_path.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    pki.key_path.write_bytes(leaf.private_key_pem.bytes())
    Certificates(settings(pki))
    assert "expired at" in caplog.text and "clients refuse it" in caplog.text
