"""Random and mangled bytes on both ports of a real wunderproxy serving a real container.

A few thousand connections (tests/support/fuzz.py: seeded, so a failure replays) against
``wunderproxy run`` started through its CLI: its log must hold no traceback, its memory must
come back near where it was, and a normal client must be served throughout.
"""

from __future__ import annotations

import re
import time
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
# object per connection (a parser, a buffer, a task) over 3,000 connections would pass it.
RSS_MARGIN_KIB = 4096
# One client asking again as soon as it has its answer, a new connection each time.
ONE_CLIENT = (Worker("new-connection", "GET", "/cgi-bin/revision", keep_alive=False),)


class TracebackInLog(AssertionError):
    """The log of the process under test holds a traceback."""


def rss_kib(pid: int) -> int:
    """Resident memory of ``pid`` in KiB, from /proc/PID/status (VmRSS)."""
    found = re.search(r"^VmRSS:\s+(\d+) kB$", Path(f"/proc/{pid}/status").read_text(), re.M)
    assert found is not None
    return int(found.group(1))


def settled_rss_kib(running: WunderproxyProcess) -> int:
    """RSS once every connection the fuzz opened has closed (lingers included)."""
    deadline = time.monotonic() + 30
    while running.status()["connections"]["open"] > 0:
        assert time.monotonic() < deadline, running.status()["connections"]
        time.sleep(0.2)
    time.sleep(1.5)  # refusals linger a second before the API side closes
    return rss_kib(running.process.pid)


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
        before = settled_rss_kib(running)
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
        after = settled_rss_kib(running)
        log = running.log()
    print(
        f"{ROUNDS * (PROXY_CASES + API_CASES)} fuzz connections in {seconds:.1f} s; "
        f"RSS {before} KiB after warm-up, {after} KiB at the end ({after - before:+d} KiB); "
        f"{len(normal.outcomes)} normal requests meanwhile"
    )
    failed = [outcome for outcome in normal.outcomes if outcome.failed]
    assert failed == [], failed[:5]
    assert len(normal.outcomes) >= ROUNDS
    assert after - before <= RSS_MARGIN_KIB
    assert_no_traceback(log)


def test_random_bytes_on_the_proxy_port_with_nothing_deployed_leave_no_traceback(
    tmp_path: Path,
) -> None:
    bucket = f"file://{tmp_path / 'store'}"
    with wunderproxy(tmp_path, bucket, PREFIX, "nothing-deployed", 1) as running:
        fuzz.run_cases(running.proxy_port, list(fuzz.cases(SEED, 2000, fuzz.PROXY_SEEDS)), WORKERS)
        answer = running.get("/")
        assert answer.status == 503, answer.text
        settled_rss_kib(running)
        log = running.log()
    assert_no_traceback(log)
