"""Running out of connections and descriptors, end to end: ``wunderproxy run`` started
with an open-file limit of 256 (soft and hard), serving the busybox test app from the real
Docker engine, flooded from 127.0.0.1 with two to three times what it can hold.

Figures these tests print (``-s``) are quoted in the README.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.configs import PREFIX, app_config, upload_launch_config
from tests.support.docker import AppImages
from tests.support.process import WunderproxyProcess, wunderproxy
from tests.test_observability_e2e import metric_samples, wait_for
from wunderproxy.store import S3Store

pytestmark = pytest.mark.e2e

OPEN_FILES = 256
LIMIT = 64  # (256 - 128 kept for the process) / 2 descriptors per connection
SLOW_SECONDS = 8  # how long each admitted flood request is held at the container
# CPU seconds the process may use while a flood is held still. An accept loop that spins
# uses a whole core, about one CPU second per second; this process has nothing to do but
# answer a few requests and a /status, and measured well under 0.1 s per window.
CPU_BOUND = 0.5


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of ``pid`` so far (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def flood(port: int, count: int, request: bytes = b"") -> Iterator[list[socket.socket]]:
    """``count`` connections to 127.0.0.1:port, each sending ``request``; all closed at
    the end."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.settimeout(None)  # blocking: with a timeout, even MSG_DONTWAIT waits
            sockets.append(sock)
            if request:
                sock.sendall(request)
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def read_now(sock: socket.socket) -> bytes:
    """What ``sock`` has received so far, without waiting (b"" if nothing)."""
    try:
        return sock.recv(65536, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return b""
    except ConnectionResetError:
        return b"reset"


def read_to_eof(sock: socket.socket) -> bytes:
    data = bytearray()
    while chunk := sock.recv(65536):
        data += chunk
    return bytes(data)


def log_lines(running: WunderproxyProcess, pattern: str) -> list[str]:
    return [line for line in running.log().splitlines() if re.search(pattern, line)]


def seconds_spanned(lines: list[str]) -> float:
    """Seconds between the first and the last of these log lines (by their timestamps)."""
    stamps = [time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) for line in lines]
    return max(stamps) - min(stamps) if stamps else 0.0


@pytest.fixture
def serving_rev1(s3_bucket: str, app_images: AppImages) -> str:
    """rev1 uploaded as current.json; the bucket's name."""
    upload_launch_config(S3Store(s3_bucket, PREFIX), app_config(app_images, "rev1"), current=True)
    return s3_bucket


def test_past_the_derived_limit_a_flood_gets_503s_while_the_proxy_stays_responsive(
    serving_rev1: str, app_name: str, app_images: AppImages, tmp_path: Path
) -> None:
    with wunderproxy(
        tmp_path,
        serving_rev1,
        PREFIX,
        app_name,
        app_images.registry_port,
        open_files=OPEN_FILES,
    ) as running:
        running.wait_until_serving("rev1")
        assert (
            f"max connections: {LIMIT} = (open-file limit {OPEN_FILES} - 128 kept for the "
            "process) / 2 descriptors per connection (client and container side)"
        ) in running.log()
        slow = f"GET /cgi-bin/slow?{SLOW_SECONDS} HTTP/1.1\r\nHost: t\r\n\r\n".encode()
        count = 3 * LIMIT
        started = time.monotonic()
        with flood(running.proxy_port, count, slow) as sockets:
            # Each admitted one now holds two descriptors: its own and one to the container.
            time.sleep(1.0)
            first = [read_now(sock) for sock in sockets]
            refused = [data for data in first if data.startswith(b"HTTP/1.1 503 ")]
            # busybox sends its status line before the CGI ends
            admitted = [s for s, data in zip(sockets, first, strict=True) if b" 503 " not in data]
            assert len(refused) == count - LIMIT, [d[:20] for d in first if b" 503 " not in d]
            assert len(admitted) == LIMIT
            assert all(b"Connection: close\r\n" in data for data in refused)
            assert all(b"at most 64 at once (--max-connections)" in data for data in refused)

            # Held: the API answers and the CPU stays idle.
            cpu_before, held_from = cpu_seconds(running.process.pid), time.monotonic()
            status = running.status()
            time.sleep(max(0.0, held_from + 2.0 - time.monotonic()))
            cpu_used = cpu_seconds(running.process.pid) - cpu_before
            held_for = time.monotonic() - held_from
            assert status["connections"]["refused"] == count - LIMIT
            assert status["connections"]["open"] == LIMIT
            assert cpu_used < CPU_BOUND, f"{cpu_used:.2f} CPU s in {held_for:.1f} s held"

            # A slot freed during the flood is a slot for the next client, served at once.
            # (Reset, not closed: a half-closed client would still be waiting for its answer.)
            leaving = admitted.pop()
            leaving.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            leaving.close()
            wait_for(lambda: running.status()["connections"]["open"] == LIMIT - 1, "a slot")
            assert running.get("/cgi-bin/revision").text.strip() == "revision=rev1"
            assert running.status()["connections"]["refused"] == count - LIMIT

            # The admitted requests complete.
            for sock in admitted:
                sock.settimeout(SLOW_SECONDS + 10)
                assert b"revision=rev1" in read_to_eof(sock)
        flood_seconds = time.monotonic() - started

        wait_for(lambda: running.status()["connections"]["open"] == 0, "the flood closed")
        assert running.get("/cgi-bin/revision").text.strip() == "revision=rev1"
        samples = metric_samples(running.api("GET", "/metrics").text)
        assert samples[("wunderproxy_connections_refused_total", frozenset())] == count - LIMIT
        reports = log_lines(running, r"with 503: \d+ open")
        reported = sum(int(re.findall(r"refused (\d+) new", line)[0]) for line in reports)
        assert reported == count - LIMIT
        assert len(reports) <= 2 + seconds_spanned(reports), reports
        assert not log_lines(running, "cannot accept"), "the limit kept descriptors to spare"
        print(
            f"\nflood of {count} (limit {LIMIT}, open files {OPEN_FILES}): "
            f"{len(refused)} answered 503, {LIMIT} served; "
            f"{cpu_used:.2f} CPU s while held {held_for:.1f} s; "
            f"{len(reports)} log lines over {flood_seconds:.1f} s"
        )


def test_out_of_descriptors_the_proxy_pauses_accepting_without_spinning_and_recovers(
    serving_rev1: str, app_name: str, app_images: AppImages, tmp_path: Path
) -> None:
    """A --max-connections above what 256 open files allow: accepting fails with EMFILE."""
    with wunderproxy(
        tmp_path,
        serving_rev1,
        PREFIX,
        app_name,
        app_images.registry_port,
        "--max-connections",
        "1000",
        open_files=OPEN_FILES,
    ) as running:
        running.wait_until_serving("rev1")
        assert "--max-connections 1000 is more than the open-file limit of 256 allows (64)" in (
            running.log()
        )
        count = 400  # idle connections: about 230 fit in 256 descriptors, the rest queue
        with flood(running.proxy_port, count):
            wait_for(lambda: log_lines(running, "cannot accept"), "accept to fail", 10)
            cpu_before, held_from = cpu_seconds(running.process.pid), time.monotonic()
            time.sleep(3.0)
            cpu_used = cpu_seconds(running.process.pid) - cpu_before
            held_for = time.monotonic() - held_from
            assert cpu_used < CPU_BOUND, f"{cpu_used:.2f} CPU s in {held_for:.1f} s held"
        # Closed: the queued ones are accepted (and find EOF) as descriptors free up.
        recovered_from = time.monotonic()
        wait_for(lambda: _answers_200(running), "a request to be served again", 20)
        recovered_in = time.monotonic() - recovered_from
        wait_for(lambda: running.status()["connections"]["open"] == 0, "the flood closed")
        failures = log_lines(running, "cannot accept")
        assert len(failures) <= 2 + seconds_spanned(failures), failures
        assert "this process has no file descriptor left" in failures[0]
        assert "ulimit -n" in failures[0] and "lower --max-connections" in failures[0]
        print(
            f"\nflood of {count} idle connections, open files {OPEN_FILES}, "
            f"--max-connections 1000: {cpu_used:.2f} CPU s while held {held_for:.1f} s; "
            f"{len(failures)} log lines over {seconds_spanned(failures):.0f} s; "
            f"served again {recovered_in:.1f} s after the flood closed"
        )


def _answers_200(running: WunderproxyProcess) -> bool:
    try:
        return running.get("/cgi-bin/revision", timeout=2).status == 200
    except OSError:
        return False
