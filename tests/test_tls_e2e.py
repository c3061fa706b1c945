"""TLS end to end: ``python -m wunderproxy run`` with ``--proxy-tls`` and a throwaway CA's
certificate, reloaded by SIGHUP and by file change, under load and across a hitless restart.

Where a test needs a client connection kept alive across reloads, no container is deployed:
the test app (busybox httpd) closes every connection after its answer, while the proxy's own
503 keeps it open. Where a test needs the app, the app answers.
"""

from __future__ import annotations

import http.client
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.support.configs import PREFIX, app_config, upload_launch_config
from tests.support.docker import AppImages, free_port
from tests.support.load import DEFAULT_MIX, LoadGenerator, assert_no_failures
from tests.support.process import WunderproxyProcess, http_call, wunderproxy
from tests.support.tls import Pair, Pki, https_connection, peer_serial, serial_served
from tests.support.waiting import wait_until
from wunderproxy.config import TLS_RELOAD_INTERVAL
from wunderproxy.store import FileStore

pytestmark = pytest.mark.e2e

# A file change is seen within the watcher's interval; the rest is for a busy machine.
RELOAD_WITHIN = TLS_RELOAD_INTERVAL + 10
RELOADS = 10


class Served:
    """A running wunderproxy with a TLS listener, and the PKI its certificate comes from."""

    def __init__(self, running: WunderproxyProcess, tls_port: int, pki: Pki) -> None:
        self.running = running
        self.tls_port = tls_port
        self.pki = pki

    def serial_now(self) -> str:
        """The serial a new client is shown."""
        return serial_served(self.tls_port, self.pki.client_context(), "localhost")

    def tls_status(self) -> dict[str, Any]:
        tls: dict[str, Any] = self.running.status()["features"]["tls"]
        return tls

    def sighup(self) -> None:
        self.running.process.send_signal(signal.SIGHUP)

    def wait_until_served(self, pair: Pair, how: str) -> None:
        """Wait until new clients get ``pair``, and check the log says it was loaded ``how``."""
        wait_until(lambda: self.serial_now() == pair.serial, f"{pair.serial} served", RELOAD_WITHIN)
        assert f"TLS certificate reloaded ({how}): serial {pair.serial}" in self.running.log()

    def wait_for_error(self, says: str) -> str:
        """Wait until /status shows a reload error saying ``says``; return the error."""
        errors: list[str] = []

        def shown() -> bool:
            errors[:] = [self.tls_status()["last_reload_error"] or ""]
            return says in errors[0]

        wait_until(shown, f"a reload error saying {says!r}", RELOAD_WITHIN)
        return errors[0]


def tls_options(pki: Pki, tls_port: int) -> tuple[str, ...]:
    return (
        "--proxy-tls",
        f"127.0.0.1:{tls_port}",
        "--tls-cert",
        str(pki.cert_path),
        "--tls-key",
        str(pki.key_path),
    )


@contextmanager
def served_over_tls(
    tmp_path: Path,
    app_name: str,
    images: AppImages,
    *extra: str,
    app: bool = True,
    workers: int = 1,
) -> Iterator[Served]:
    """A wunderproxy with TLS serving revision rev1 of the test app (none with ``app``
    False: the proxy answers 503 itself), with ``workers`` proxy processes."""
    directory = tmp_path / "store"
    store = FileStore(str(directory), PREFIX)
    if app:
        upload_launch_config(store, app_config(images, "rev1"), current=True)
    pki = Pki(tmp_path)
    pki.install(pki.issue())
    tls_port = free_port()
    with wunderproxy(
        tmp_path,
        f"file://{directory}",
        PREFIX,
        app_name,
        images.registry_port,
        *tls_options(pki, tls_port),
        *extra,
        workers=workers,
    ) as running:
        if app:
            running.wait_until_serving("rev1")
        yield Served(running, tls_port, pki)


def https_get(served: Served, path: str) -> tuple[int, str, str]:
    """Status, body and certificate serial of a GET on a new HTTPS connection."""
    connection = https_connection(served.tls_port, served.pki.client_context())
    try:
        connection.connect()
        serial = peer_serial(connection)  # now: an answer with Connection: close drops it
        connection.request("GET", path, headers={"Host": "localhost"})
        response = connection.getresponse()
        return response.status, response.read().decode(), serial
    finally:
        connection.close()


def kept_request(connection: http.client.HTTPSConnection) -> int:
    """A request on a kept-alive connection: its status (the connection must stay open)."""
    before = connection.sock
    connection.request("GET", "/", headers={"Host": "localhost"})
    response = connection.getresponse()
    response.read()
    assert before is None or connection.sock is before, "the connection was opened again"
    assert not response.will_close
    return response.status


@pytest.mark.parametrize("workers", [1, 2])
def test_over_tls_the_app_answers_a_client_trusting_the_root_and_the_plain_port_redirects(
    workers: int, tmp_path: Path, app_name: str, app_images: AppImages
) -> None:
    with served_over_tls(
        tmp_path, app_name, app_images, "--redirect-http", workers=workers
    ) as served:
        running = served.running
        serial = served.serial_now()
        # Plain: 308 to the same target on the TLS port, at the host the request named.
        answer = http_call(
            running.proxy_port, "GET", "/cgi-bin/revision?x=1", headers={"Host": "localhost:80"}
        )
        assert answer.status == 308
        assert answer.headers["Location"] == (
            f"https://localhost:{served.tls_port}/cgi-bin/revision?x=1"
        )
        # Followed: the app answers over TLS, with the certificate /status describes.
        assert https_get(served, "/cgi-bin/revision?x=1") == (200, "revision=rev1\n", serial)
        status = running.status()
        tls = status["features"]["tls"]
        loaded_at = tls.pop("loaded_at")
        assert tls == {
            "address": f"127.0.0.1:{served.tls_port}",
            "subject": tls["subject"],
            "serial": serial,
            "not_after": "3000-01-01T00:00:00Z",
            "reloads": 0,
            "last_reload_error": None,
        }
        assert tls["subject"].startswith("OU=Testing cert #"), tls
        assert loaded_at.endswith("Z")
        assert status["requests"]["by_status"] == {"200": 1, "308": 1}
        assert (
            f"TLS proxy on 127.0.0.1:{served.tls_port}, proxy on 127.0.0.1:"
            f"{running.proxy_port} (redirecting to https), API on" in running.log()
        )


def test_sighup_then_a_file_change_reload_for_new_clients_and_a_kept_client_keeps_its_own(
    tmp_path: Path, app_name: str, app_images: AppImages
) -> None:
    with served_over_tls(tmp_path, app_name, app_images, app=False) as served:
        pki = served.pki
        kept = https_connection(served.tls_port, pki.client_context())
        assert kept_request(kept) == 503  # no container: the proxy's own answer
        first = peer_serial(kept)
        by_signal = pki.install(pki.issue())
        served.sighup()
        served.wait_until_served(by_signal, "SIGHUP")
        assert kept_request(kept) == 503
        by_file = pki.install(pki.issue())  # and no signal: the watcher sees the files
        served.wait_until_served(by_file, "the files changed")
        # The client connected before both, idle meanwhile, is still served on its
        # connection, which keeps the certificate it began with.
        assert kept_request(kept) == 503
        assert peer_serial(kept) == first
        kept.close()
        tls = served.tls_status()
        assert (tls["serial"], tls["last_reload_error"]) == (by_file.serial, None)
        assert tls["reloads"] == served.running.log().count("TLS certificate reloaded")


def test_a_broken_pair_is_kept_out_and_logged_while_the_old_one_serves_until_a_good_pair(
    tmp_path: Path, app_name: str, app_images: AppImages
) -> None:
    with served_over_tls(tmp_path, app_name, app_images, app=False) as served:
        pki = served.pki
        old = served.serial_now()
        renewed = pki.issue()
        pki.cert_path.write_bytes(renewed.chain)  # a renewal wrote the certificate only
        error = served.wait_for_error("is not the key of the certificate")
        assert served.serial_now() == old
        assert f"TLS certificate not reloaded (the files changed): {error}" in served.running.log()
        pki.cert_path.write_bytes(b"garbage\n")
        served.sighup()
        served.wait_for_error("is not PEM: it has no BEGIN CERTIFICATE block")
        assert served.serial_now() == old
        pki.cert_path.write_bytes(renewed.chain)
        pki.key_path.unlink()
        served.sighup()
        served.wait_for_error(f"cannot read --tls-key {pki.key_path}")
        assert served.serial_now() == old
        assert served.tls_status()["reloads"] == 0
        pki.install(renewed)  # the renewal's both files, now
        served.wait_until_served(renewed, "the files changed")
        tls = served.tls_status()
        assert (tls["serial"], tls["reloads"], tls["last_reload_error"]) == (
            renewed.serial,
            1,
            None,
        )


def test_ten_reloads_under_https_load_fail_no_request(
    tmp_path: Path, app_name: str, app_images: AppImages
) -> None:
    with served_over_tls(tmp_path, app_name, app_images) as served:
        pki = served.pki
        with LoadGenerator(
            served.tls_port, DEFAULT_MIX, max_seconds=240, tls=pki.client_context()
        ) as load:
            time.sleep(1.0)
            for number in range(RELOADS):
                pair = pki.install(pki.issue())
                if number % 2 == 0:
                    served.sighup()
                    served.wait_until_served(pair, "SIGHUP")
                else:
                    served.wait_until_served(pair, "the files changed")
                time.sleep(0.3)
            time.sleep(2.5)  # the last slow requests finish
            outcomes = load.stop()
        assert_no_failures(outcomes, "during ten certificate reloads")
        for kind in ("keep-alive", "new-connection", "slow", "post"):
            assert any(o.kind == kind for o in outcomes), f"no {kind} requests were sent"
        assert len(outcomes) > 100, "too little load to prove anything"
        assert served.tls_status()["reloads"] >= RELOADS


@pytest.mark.parametrize("workers", [1, 2])
def test_a_hitless_restart_takes_the_tls_port_over_under_https_load_losing_no_request(
    workers: int, tmp_path: Path, app_name: str, app_images: AppImages
) -> None:
    pid_file = str(tmp_path / "wunderproxy.pid")
    with served_over_tls(
        tmp_path, app_name, app_images, "--pid-file", pid_file, workers=workers
    ) as served:
        old = served.running
        with LoadGenerator(
            served.tls_port, DEFAULT_MIX, max_seconds=120, tls=served.pki.client_context()
        ) as load:
            time.sleep(1.5)
            before = load.count()
            with wunderproxy(
                tmp_path,
                f"file://{tmp_path / 'store'}",
                PREFIX,
                app_name,
                app_images.registry_port,
                *tls_options(served.pki, served.tls_port),
                "--pid-file",
                pid_file,
                "--take-over",
                ports=(old.proxy_port, old.api_port),
                workers=workers,
            ) as new:
                assert old.process.wait(30) == 0, old.log()
                time.sleep(1.5)
                outcomes = load.stop()
                assert new.status()["features"]["tls"]["serial"] == served.serial_now()
        assert_no_failures(outcomes, "across the take-over")
        assert len(outcomes) > before > 0


def test_with_proxy_none_only_the_tls_port_serves(
    tmp_path: Path, app_name: str, app_images: AppImages
) -> None:
    with served_over_tls(tmp_path, app_name, app_images, "--proxy", "none", app=False) as served:
        running = served.running
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", running.proxy_port), timeout=5).close()
        status, body, _ = https_get(served, "/")
        assert (status, body) == (503, "no container is deployed yet\n")
        assert f"for app {app_name}: TLS proxy on 127.0.0.1:{served.tls_port}, API on" in (
            running.log()
        )
