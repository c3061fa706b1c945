"""The TLS options of ``wunderproxy run``: what cannot work stops start-up, saying why."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.support.docker import free_port
from tests.support.process import run_cli
from tests.support.tls import Pki
from wunderproxy.cli import main

TLS_FILES = ["--tls-cert", "cert.pem", "--tls-key", "key.pem"]


@pytest.mark.parametrize(
    ("arguments", "environment", "says"),
    [
        (
            ["--tls-cert", "cert.pem"],
            {},
            "--tls-cert, --tls-key and --redirect-http need --proxy-tls",
        ),
        (["--redirect-http"], {}, "need --proxy-tls HOST:PORT"),
        ([], {"WUNDERPROXY_TLS_KEY": "key.pem"}, "need --proxy-tls HOST:PORT"),
        (
            ["--proxy-tls", "127.0.0.1:8443"],
            {},
            "--proxy-tls needs --tls-cert PATH and --tls-key PATH",
        ),
        (["--proxy-tls", "127.0.0.1:8443", "--tls-cert", "c.pem"], {}, "--tls-key PATH"),
        (["--proxy-tls", "8443", *TLS_FILES], {}, "--proxy-tls '8443' is not HOST:PORT"),
        (
            [],
            {"WUNDERPROXY_PROXY_TLS": "x", "WUNDERPROXY_TLS_CERT": "c", "WUNDERPROXY_TLS_KEY": "k"},
            "'x' is not HOST:PORT",
        ),
        (["--proxy", "none"], {}, "--proxy none needs --proxy-tls"),
        (
            ["--proxy", "none", "--proxy-tls", "127.0.0.1:8443", *TLS_FILES, "--redirect-http"],
            {},
            "--redirect-http needs a plain --proxy address to answer on (not none)",
        ),
        (
            ["--proxy-tls", "unix:/run/tls.sock", *TLS_FILES, "--redirect-http"],
            {},
            "--redirect-http sends clients to the port of --proxy-tls: give it as HOST:PORT",
        ),
    ],
)
def test_tls_options_that_cannot_work_stop_start_up_saying_why(
    arguments: list[str], environment: dict[str, str], says: str, tmp_path: Path
) -> None:
    result = CliRunner().invoke(
        main, ["run", f"file://{tmp_path}", "p", "app", *arguments], env=environment
    )
    assert result.exit_code == 2 and says in result.output, result.output


def test_a_broken_pair_stops_start_up_before_anything_listens(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    pair = pki.install(pki.issue())
    pki.key_path.write_bytes(pki.issue().key)  # another certificate's key
    ports = [free_port() for _ in range(3)]
    result = run_cli(
        "run",
        f"file://{tmp_path / 'store'}",
        "p",
        "app",
        "--proxy",
        f"127.0.0.1:{ports[0]}",
        "--api",
        f"127.0.0.1:{ports[1]}",
        "--proxy-tls",
        f"127.0.0.1:{ports[2]}",
        "--tls-cert",
        str(pki.cert_path),
        "--tls-key",
        str(pki.key_path),
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith(
        f"Error: cannot serve TLS: --tls-key {pki.key_path} is not the key of the certificate "
        f"in --tls-cert {pki.cert_path}"
    ), result.stderr
    assert pair.serial  # the certificate itself was fine
    for port in ports:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
    assert not (tmp_path / "store").exists(), "nothing was done before the check"
