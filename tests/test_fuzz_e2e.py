"""Random and mangled bytes on both ports of a real wunderproxy serving a real container.

A few thousand connections (tests/support/fuzz.py: seeded, so a failure replays) against
``wunderproxy run`` started through its CLI: its log must hold no traceback, a normal client
must be served throughout, and nothing may stay behind: its open file descriptors come back
to their count after the warm-up, ``/status`` counts no connection, and its memory comes
back near where it was.
"""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import fuzz
from tests.support.configs import PREFIX, app_config, upload_launch_config
from tests.support.docker import AppImages
from tests.support.load import LoadGenerator, Worker
from tests.support.process import WunderproxyProcess, revision_served, wunderproxy
from wunderproxy.store import S3Store

pytestmark = pytest.mark.e2e

SEED = 11  # the number; any seed replays the same connections
ROUNDS = 20
PROXY_CASES = 100  # per round: 2,000 connections on the proxy port
API_CASES = 50  # per round: 1,000 connections on the API port
WARM_UP_CASES = 300  # per port, before memory is first measured
WORKERS = 8  # fuzz connections at once; this machine has 2 cores for everything
# RSS may grow this much from after the warm-up to the end. CPython keeps freed memory in
# its arenas and the allocator's, so a first fuzz round grows it (warm-up); a leak of one
# object per connection (a parser, a buffer, a task) over 3,000 connections would pass it,
# which is why the descriptors and /status's connection counts are checked exactly.
RSS_MARGIN_KIB = 4096
# Open descriptors must come back exactly to their count after the warm-up, by kind, but
# for the Unix sockets to Docker: the Docker SDK keeps a pool of them (up to 10) and opens
# one more when calls overlap (the Docker watch's ping beside its event stream, a /status),
# which runs showed as one or two more at the end. Client and container connections are
# TCP and counted exactly; a leak of one descriptor per connection shows as thousands.
UNIX = "Unix socket"
UNIX_SOCKET_SLACK = 2
# One client asking again as soon as it has its answer, a new connection each time.
ONE_CLIENT = (Worker("new-connection", "GET", "/cgi-bin/revision", keep_alive=False),)


class TracebackInLog(AssertionError):
    """The log of the process under test holds a traceback."""


def rss_kib(pid: int) -> int:
    """Resident memory of ``pid`` in KiB, from /proc/PID/status (VmRSS)."""
    found = re.search(r"^VmRSS:\s+(\d+) kB$", Path(f"/proc/{pid}/status").read_text(), re.M)
    assert found is not None
    return int(found.group(1))


def tcp_sockets(pid: int) -> dict[str, tuple[int, int, bool]]:
    """TCP sockets in ``pid``'s network namespace: inode -> (local port, remote port,
    listening), from /proc/PID/net/tcp and tcp6."""
    found = {}
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            columns = line.split()
            local, remote, state, inode = columns[1], columns[2], columns[3], columns[9]
            ports = int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16)
            found[inode] = (*ports, state == "0A")
    return found


def open_fds(pid: int, ports: tuple[int, int], container_port: int) -> Counter[str]:
    """The open descriptors of ``pid`` by kind, from /proc/PID/fd. A TCP socket is a
    "listener" or a "client connection" on one of ``ports``, a "container connection", or
    "tcp to :PORT"; any other socket counts as a Unix one (Docker's). The rest are "pipe",
    "anon_inode:[eventpoll]" and such, or a file's path."""
    tcp = tcp_sockets(pid)
    kinds: Counter[str] = Counter()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(fd_dir / fd)
        except FileNotFoundError:  # closed between the listing and the look
            continue
        socket_inode = re.fullmatch(r"socket:\[(\d+)\]", target)
        if socket_inode is None:
            kinds[re.sub(r":\[\d+\]$", "", target)] += 1
        elif (found := tcp.get(socket_inode.group(1))) is None:
            kinds[UNIX] += 1
        elif found[0] in ports:
            kinds["listener" if found[2] else "client connection"] += 1
        elif found[1] == container_port:
            kinds["container connection"] += 1
        else:
            kinds[f"tcp to :{found[1]}"] += 1
    return kinds


@dataclass(frozen=True)
class Footprint:
    """What the process holds once every fuzz connection has closed."""

    rss_kib: int
    fds: Counter[str]

    @property
    def fd_count(self) -> int:
        return sum(self.fds.values())

    def apart_from_unix_sockets(self) -> Counter[str]:
        return Counter({kind: count for kind, count in self.fds.items() if kind != UNIX})

    def changes_since(self, earlier: Footprint) -> str:
        """The descriptors gained and lost since ``earlier``, by kind."""
        gained, lost = self.fds - earlier.fds, earlier.fds - self.fds
        return f"gained {dict(gained)}, lost {dict(lost)}"


def settled(running: WunderproxyProcess) -> Footprint:
    """The process's footprint once every connection the fuzz opened has closed (lingers
    included); asserts that /status then counts none, open or active."""
    deadline = time.monotonic() + 30
    while running.status()["connections"]["open"] > 0:
        assert time.monotonic() < deadline, running.status()["connections"]
        time.sleep(0.2)
    time.sleep(1.5)  # refusals linger a second before the API side closes
    connections = running.status()["connections"]
    assert (connections["open"], connections["active"]) == (0, 0), connections
    pid = running.process.pid
    current = running.status()["current"]
    ports = (running.proxy_port, running.api_port)
    fds = open_fds(pid, ports, current["port"] if current else 0)
    assert fds["client connection"] == 0, fds
    return Footprint(rss_kib(pid), fds)


def assert_no_traceback(log: str) -> None:
    tracebacks = log.count("Traceback")
    if tracebacks:
        first = log.index("Traceback")
        raise TracebackInLog(
            f"{tracebacks} tracebacks; the first:\n{log[first - 300 : first + 2500]}"
        )


def test_random_bytes_on_both_ports_leave_no_traceback_no_leak_and_normal_requests_served(
    s3_bucket: str, app_name: str, app_images: AppImages, tmp_path: Path
) -> None:
    upload_launch_config(S3Store(s3_bucket, PREFIX), app_config(app_images, "rev1"), current=True)
    proxy_cases = list(fuzz.cases(SEED, WARM_UP_CASES + ROUNDS * PROXY_CASES, fuzz.PROXY_SEEDS))
    api_cases = list(fuzz.cases(SEED, WARM_UP_CASES + ROUNDS * API_CASES, fuzz.API_SEEDS))
    with wunderproxy(tmp_path, s3_bucket, PREFIX, app_name, app_images.registry_port) as running:
        running.wait_until_serving("rev1")
        fuzz.run_cases(running.proxy_port, proxy_cases[:WARM_UP_CASES], WORKERS)
        fuzz.run_cases(running.api_port, api_cases[:WARM_UP_CASES], WORKERS)
        before = settled(running)
        began = time.monotonic()
        with LoadGenerator(running.proxy_port, ONE_CLIENT, max_seconds=600) as normal:
            for round_ in range(ROUNDS):
                start = WARM_UP_CASES + round_ * PROXY_CASES
                fuzz.run_cases(
                    running.proxy_port, proxy_cases[start : start + PROXY_CASES], WORKERS
                )
                start = WARM_UP_CASES + round_ * API_CASES
                fuzz.run_cases(running.api_port, api_cases[start : start + API_CASES], WORKERS)
                # Between rounds too, on a connection of its own: served as if nothing happened.
                assert revision_served(running) == "revision=rev1"
                assert running.status()["current"]["revision"] == "rev1"
        seconds = time.monotonic() - began
        after = settled(running)
        log = running.log()
    print(
        f"{ROUNDS * (PROXY_CASES + API_CASES)} fuzz connections in {seconds:.1f} s; "
        f"RSS {before.rss_kib} KiB after warm-up, {after.rss_kib} KiB at the end "
        f"({after.rss_kib - before.rss_kib:+d} KiB); open descriptors {before.fd_count} "
        f"after warm-up, {after.fd_count} at the end ({after.changes_since(before)}); "
        f"{len(normal.outcomes)} normal requests meanwhile"
    )
    failed = [outcome for outcome in normal.outcomes if outcome.failed]
    assert failed == [], failed[:5]
    assert len(normal.outcomes) >= ROUNDS
    changes = after.changes_since(before)
    assert after.apart_from_unix_sockets() == before.apart_from_unix_sockets(), changes
    assert abs(after.fds[UNIX] - before.fds[UNIX]) <= UNIX_SOCKET_SLACK, changes
    assert after.rss_kib - before.rss_kib <= RSS_MARGIN_KIB
    assert_no_traceback(log)


def test_random_bytes_on_the_proxy_port_with_nothing_deployed_leave_no_traceback(
    tmp_path: Path,
) -> None:
    bucket = f"file://{tmp_path / 'store'}"
    with wunderproxy(tmp_path, bucket, PREFIX, "nothing-deployed", 1) as running:
        fuzz.run_cases(running.proxy_port, list(fuzz.cases(SEED, 2000, fuzz.PROXY_SEEDS)), WORKERS)
        answer = running.get("/")
        assert answer.status == 503, answer.text
        settled(running)
        log = running.log()
    assert_no_traceback(log)
