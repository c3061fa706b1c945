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
from tests.support.docker import AppImages
from tests.support.load import LoadGenerator, Worker
from tests.support.process import WunderproxyProcess, wunderproxy
from tests.test_deploy_e2e import PREFIX, app_config, revision_served, upload
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
# Open descriptors may differ this much from after the warm-up to the end: the Docker SDK's
# connection pool (the Docker watch pings and reads events on connections of its own) may
# hold one connection more or less at the moment of counting. Every descriptor a client
# connection takes (its socket, and its connection to the container) is gone once
# /status counts no connection, so a leak of one per connection shows as thousands.
FD_SLACK = 1
# One client asking again as soon as it has its answer, a new connection each time.
ONE_CLIENT = (Worker("new-connection", "GET", "/cgi-bin/revision", keep_alive=False),)


class TracebackInLog(AssertionError):
    """The log of the process under test holds a traceback."""


def rss_kib(pid: int) -> int:
    """Resident memory of ``pid`` in KiB, from /proc/PID/status (VmRSS)."""
    found = re.search(r"^VmRSS:\s+(\d+) kB$", Path(f"/proc/{pid}/status").read_text(), re.M)
    assert found is not None
    return int(found.group(1))


def open_fds(pid: int) -> Counter[str]:
    """The open descriptors of ``pid`` by kind (socket, pipe, anon_inode:[eventpoll], or
    the file's path), from /proc/PID/fd."""
    kinds: Counter[str] = Counter()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(fd_dir / fd)
        except FileNotFoundError:  # closed between the listing and the look
            continue
        kinds[re.sub(r":\[\d+\]$", "", target)] += 1
    return kinds


@dataclass(frozen=True)
class Footprint:
    """What the process holds once every fuzz connection has closed."""

    rss_kib: int
    fds: Counter[str]

    @property
    def fd_count(self) -> int:
        return sum(self.fds.values())

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
    return Footprint(rss_kib(pid), open_fds(pid))


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
    upload(S3Store(s3_bucket, PREFIX), app_config(app_images, "rev1"), current=True)
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
    assert abs(after.fd_count - before.fd_count) <= FD_SLACK, after.changes_since(before)
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
