"""--buffer-responses end to end: ``wunderproxy run`` in front of a real container whose app
has one worker (``/cgi-bin/worker``, as unicorn with one process), and clients that
download at 32 KiB/s answers larger than the buffers between the app and them.

Without buffering, the app's worker writes into Docker's userland proxy and the kernel's
buffers (about 10 MiB here) and then waits for the slow client: every other request waits
behind it. With buffering, the proxy takes each answer as fast as the app writes it, and
the worker is free at once. The figures are printed (``-s``) and quoted in the README.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.configs import PREFIX, app_config, upload_launch_config
from tests.support.docker import AppImages
from tests.support.openfiles import open_files_under
from tests.support.process import WunderproxyProcess, http_call, wunderproxy
from tests.support.waiting import wait_until
from wunderproxy.store import FileStore

pytestmark = pytest.mark.e2e

DOWNLOAD = 32 * 1024 * 1024  # each slow client's answer: three times what the buffers hold
SLOW_CLIENTS = 3
RATE = 32 * 1024  # bytes a second each slow client reads
FAST_WITHIN = 0.5  # seconds the fast request may take with buffering
HELD = 3.0  # seconds the slow clients hold the worker (without buffering) after the fast one


class SlowDownload:
    """A client that asks for DOWNLOAD bytes and reads them at RATE, in a thread, until
    stopped (it need not read them all: it holds the app only while it reads)."""

    def __init__(self, port: int) -> None:
        self.received = 0
        self._stop = threading.Event()
        self._sock = socket.socket()
        # A small receive buffer, as a slow client across the internet has.
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16_384)
        self._sock.connect(("127.0.0.1", port))
        self._sock.sendall(
            f"GET /cgi-bin/worker?download={DOWNLOAD} HTTP/1.1\r\nHost: t\r\n\r\n".encode()
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        started = time.monotonic()
        self._sock.settimeout(0.1)
        while not self._stop.is_set():
            ahead = self.received / RATE - (time.monotonic() - started)
            if ahead > 0:
                self._stop.wait(ahead)
                continue
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            if not data:
                return
            self.received += len(data)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close()


@contextmanager
def slow_downloads(port: int) -> Iterator[list[SlowDownload]]:
    """SLOW_CLIENTS slow downloads, one after another in the worker's queue; stopped at
    the end."""
    clients: list[SlowDownload] = []
    try:
        for _ in range(SLOW_CLIENTS):
            clients.append(SlowDownload(port))
            time.sleep(0.05)  # in this order at the worker
        yield clients
    finally:
        for client in clients:
            client.stop()


def in_flight(running: WunderproxyProcess) -> int:
    """Requests the serving container has not finished answering (``/status``)."""
    current = running.status()["current"]
    assert current is not None
    count: int = current["in_flight"]
    return count


def resident_kib(pid: int) -> int:
    """The process's resident memory (VmRSS), KiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]


def timed_fast_request(running: WunderproxyProcess) -> float:
    """Seconds a request to the one-worker app takes; it must succeed."""
    started = time.monotonic()
    answer = http_call(running.proxy_port, "GET", "/cgi-bin/worker", timeout=60)
    seconds = time.monotonic() - started
    assert answer.status == 200 and answer.text.strip() == "received=0", answer.text
    return seconds


@pytest.fixture
def store(app_images: AppImages, tmp_path: Path) -> str:
    """The test app's rev1 as current.json in an embedded store; its URL."""
    directory = tmp_path / "store"
    upload_launch_config(
        FileStore(str(directory), PREFIX), app_config(app_images, "rev1"), current=True
    )
    return f"file://{directory}"


def test_a_fast_request_among_slow_downloads_is_answered_at_once_only_with_buffering(
    store: str, app_name: str, app_images: AppImages, tmp_path: Path
) -> None:
    buffers = tmp_path / "buffers"
    buffers.mkdir()
    with wunderproxy(
        tmp_path,
        store,
        PREFIX,
        app_name,
        app_images.registry_port,
        "--buffer-responses",
        "--buffer-dir",
        str(buffers),
    ) as running:
        running.wait_until_serving("rev1")
        pid = running.process.pid
        memory_before = resident_kib(pid)
        with slow_downloads(running.proxy_port) as clients:
            # The app wrote every answer whole, and is free: each waits in the proxy, most
            # of it in an unnamed file, while its client has read a few KiB.
            wait_until(lambda: in_flight(running) == 0, "the answers taken", 60)
            wait_until(
                lambda: len(open_files_under(buffers, pid)) == SLOW_CLIENTS, "one file each", 10
            )
            memory_held = resident_kib(pid) - memory_before
            assert all(0 < client.received < 1024 * 1024 for client in clients)
            with_buffering = timed_fast_request(running)
        wait_until(lambda: not open_files_under(buffers, pid), "the files let go", 10)
        assert "cannot hold" not in running.log()

    with wunderproxy(tmp_path, store, PREFIX, app_name, app_images.registry_port) as running:
        running.wait_until_serving("rev1")
        with slow_downloads(running.proxy_port) as clients:
            time.sleep(2.0)
            assert in_flight(running) == SLOW_CLIENTS, "the worker is held by a slow client"
            fast: list[float] = []
            asking = threading.Thread(target=lambda: fast.append(timed_fast_request(running)))
            asking.start()
            time.sleep(HELD)  # then the slow clients leave, and the worker is free
        asking.join(60)
        without_buffering = fast[0]

    print(
        f"\n{SLOW_CLIENTS} clients downloading {DOWNLOAD >> 20} MiB at {RATE >> 10} KiB/s: "
        f"a request to the one-worker app took {with_buffering:.3f} s with "
        f"--buffer-responses (the proxy's memory grew {memory_held / 1024:.1f} MiB), "
        f"{without_buffering:.1f} s without (until the slow clients left, {HELD:g} s later)"
    )
    assert with_buffering < FAST_WITHIN
    assert without_buffering > HELD - 0.5
    # Memory: --buffer-memory (1 MiB) for each answer, the rest on disk; a copy of each
    # answer in memory would be 96 MiB.
    assert memory_held < SLOW_CLIENTS * 2 * 1024 + 8 * 1024
