"""Slow uploads end to end: ``wunderproxy run`` through its CLI, the busybox app's
``/cgi-bin/worker`` (one worker, as unicorn with one process) in a real container.

Several clients upload 256 KiB at 16 KiB/s; in the middle of them, a fast client's request
must be answered within 0.5 s. With ``--buffer-requests`` the uploads are held by the proxy
and the worker is free; without, the worker reads one of them at the client's pace and
everyone waits (the figure is printed: ``pytest -s``).
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from tests.support.configs import PREFIX, app_config, upload_launch_config
from tests.support.docker import AppImages
from tests.support.process import WunderproxyProcess, wunderproxy
from wunderproxy.store import FileStore

pytestmark = pytest.mark.e2e

UPLOADERS = 3
BODY = 256 * 1024
RATE = 16 * 1024  # bytes a second
PIECE = 4 * 1024
FAST = 0.5  # seconds the fast client's request may take
FAST_AFTER = 2.0  # seconds into the uploads it is sent
# Seconds to wait for the fast request without buffering: the uploads take 16 s each.
PATIENCE = 60.0


def slow_upload(port: int, answers: list[bytes]) -> None:
    """POST BODY bytes to the worker at RATE; its answer goes to ``answers``."""
    with socket.create_connection(("127.0.0.1", port), timeout=PATIENCE) as sock:
        sock.sendall(
            b"POST /cgi-bin/worker HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % BODY
        )
        for _ in range(BODY // PIECE):
            sock.sendall(b"x" * PIECE)
            time.sleep(PIECE / RATE)
        answers.append(read_to_eof(sock))


def read_to_eof(sock: socket.socket) -> bytes:
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def fast_request_during_uploads(running: WunderproxyProcess) -> tuple[float, list[bytes]]:
    """Seconds the fast client's request took, sent in the middle of the slow uploads,
    and the uploads' answers."""
    answers: list[bytes] = []
    uploads = [
        threading.Thread(target=slow_upload, args=(running.proxy_port, answers))
        for _ in range(UPLOADERS)
    ]
    for upload in uploads:
        upload.start()
    time.sleep(FAST_AFTER)
    with socket.create_connection(("127.0.0.1", running.proxy_port), timeout=PATIENCE) as fast:
        started = time.monotonic()
        fast.sendall(b"GET /cgi-bin/worker HTTP/1.1\r\nHost: t\r\n\r\n")
        answer = read_to_eof(fast)  # busybox ends each answer with the connection
        took = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"received=0\n"), answer
    for upload in uploads:
        upload.join(PATIENCE)
    return took, answers


def test_a_fast_request_is_not_held_up_by_slow_uploads_with_buffer_requests(
    app_name: str, app_images: AppImages, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    upload_launch_config(
        FileStore(str(store), PREFIX), app_config(app_images, "rev1"), current=True
    )
    registry_port = app_images.registry_port
    taken = {}
    for buffering in (True, False):
        options = ("--buffer-requests",) if buffering else ()
        with wunderproxy(
            tmp_path, f"file://{store}", PREFIX, app_name, registry_port, *options
        ) as running:
            running.wait_until_serving("rev1")
            assert running.status()["features"]["buffer_requests"] is buffering
            taken[buffering], answers = fast_request_during_uploads(running)
        assert len(answers) == UPLOADERS
        assert all(a.endswith(b"received=%d\n" % BODY) for a in answers), answers
    print(
        f"\na request to the one-worker app during {UPLOADERS} uploads of {BODY // 1024} KiB "
        f"at {RATE // 1024} KiB/s: answered in {taken[True]:.3f} s with --buffer-requests, "
        f"{taken[False]:.1f} s without"
    )
    assert taken[True] < FAST
    assert taken[False] > FAST
