"""``--workers 2`` end to end: real worker processes, real sockets, a real container.

Which worker answered is read from ``/status`` ``workers`` (each worker's own counts of
connections open and requests per revision): the proxy adds nothing to the answers."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.support.configs import PREFIX, app_config, upload_launch_config
from tests.support.docker import AppImages
from tests.support.load import (
    ONE_OF_EACH_CONNECTION,
    LoadGenerator,
    assert_no_failures,
    revision_of,
)
from tests.support.process import WunderproxyProcess, http_call, wunderproxy
from tests.support.waiting import wait_until
from wunderproxy.store import S3Store
from wunderproxy.supervisor import ROUTED_WITHIN

pytestmark = pytest.mark.e2e

WORKERS = 2
# Seconds a worker may take to be serving again after it was killed (measured: about 0.5).
RESTART_WITHIN = 15.0
# Seconds workers may take to exit by themselves once their supervisor is gone.
ORPHANS_EXIT_WITHIN = 15.0
# Keep-alive clients and new-connection clients, without slow requests: after a switch,
# at most this many requests (those in flight at the 200) may still end on the old revision.
QUICK_MIX = (*ONE_OF_EACH_CONNECTION, *ONE_OF_EACH_CONNECTION)
# Connections held on the surviving worker, one request each while the other restarts.
SURVIVORS = 40


@contextmanager
def serving_rev1(
    s3_bucket: str, app_name: str, app_images: AppImages, tmp_path: Path, *extra: str
) -> Iterator[tuple[WunderproxyProcess, dict[str, str]]]:
    """wunderproxy with two workers, serving rev1 (rev2 uploaded too); and the hashes."""
    store = S3Store(s3_bucket, PREFIX)
    hashes = {
        "rev1": upload_launch_config(store, app_config(app_images, "rev1"), current=True),
        "rev2": upload_launch_config(store, app_config(app_images, "rev2")),
    }
    with wunderproxy(
        tmp_path, s3_bucket, PREFIX, app_name, app_images.registry_port, *extra, workers=WORKERS
    ) as running:
        running.wait_until_serving("rev1")
        yield running, hashes


def workers_of(running: WunderproxyProcess) -> list[dict[str, Any]]:
    workers: list[dict[str, Any]] = running.status()["workers"]
    assert len(workers) == WORKERS and all(w["answered"] for w in workers), workers
    return workers


def answered_by_revision(running: WunderproxyProcess, revision: str) -> list[int]:
    """Requests each worker answered with ``revision``'s container."""
    return [w["requests"]["by_revision"].get(revision, 0) for w in workers_of(running)]


def is_running(pid: int) -> bool:
    """True while ``pid`` runs (a zombie has exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def wait_until_reaped(running: WunderproxyProcess, pid: int) -> None:
    """Wait until the supervisor has reaped the killed worker ``pid`` (``/status`` names it
    no more): only then is its listening socket surely closed, and what the kernel queued
    for it until then reset, its own connections.

    A zombie in /proc is not enough: a worker has threads (the access log's writer), and
    when it is killed its main thread turns zombie while the others are still exiting; the
    socket closes with the last of them, and connections the kernel queues for it meanwhile
    are reset (``net.ipv4.tcp_migrate_req`` is 0 here). The supervisor's ``wait()`` returns
    only once every thread is gone."""
    deadline = time.monotonic() + RESTART_WITHIN
    while pid in [w["pid"] for w in running.status()["workers"]]:
        assert time.monotonic() < deadline, f"worker PID {pid} was not reaped"
        time.sleep(0.01)


class Held:
    """Client connections held open before their request, each with the worker that
    accepted it. The test app closes a connection after each answer (busybox httpd), so
    each carries one request (see :func:`request`)."""

    def __init__(self, running: WunderproxyProcess) -> None:
        self._running = running
        self.on: dict[int, list[socket.socket]] = {1: [], 2: []}

    def open_one(self) -> int:
        """Open a connection; the worker it landed on (the one whose count grew)."""
        before = open_per_worker(self._running)
        sock = socket.create_connection(("127.0.0.1", self._running.proxy_port), timeout=30)
        deadline = time.monotonic() + 10
        while (after := open_per_worker(self._running)) == before:
            assert time.monotonic() < deadline, "the connection was never counted"
            time.sleep(0.02)
        [index] = [i + 1 for i in range(WORKERS) if after[i] == before[i] + 1]
        self.on[index].append(sock)
        return index

    def one_on_each(self, attempts: int = 64) -> None:
        """Open connections until each worker holds one (the kernel spreads them)."""
        for _ in range(attempts):
            if all(self.on.values()):
                return
            self.open_one()
        raise AssertionError(f"{attempts} connections, all on one worker: {self.on}")

    def close(self) -> None:
        for connections in self.on.values():
            for sock in connections:
                sock.close()


@contextmanager
def held(running: WunderproxyProcess) -> Iterator[Held]:
    connections = Held(running)
    try:
        yield connections
    finally:
        connections.close()


def open_per_worker(running: WunderproxyProcess) -> list[int]:
    return [w["connections"]["open"] for w in workers_of(running)]


def request(sock: socket.socket, path: str) -> str:
    """Send GET ``path`` on a held connection; the body of its 200 (read to the close)."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), answer
    return body.decode()


def test_a_switch_under_load_fails_no_request_and_every_workers_answers_change_revision(
    s3_bucket: str, app_name: str, app_images: AppImages, tmp_path: Path
) -> None:
    with serving_rev1(s3_bucket, app_name, app_images, tmp_path) as (running, hashes):
        assert running.launch(hashes["rev2"]).status == 200
        with LoadGenerator(running.proxy_port, QUICK_MIX, max_seconds=60) as load:
            time.sleep(1.5)
            assert all(n > 0 for n in answered_by_revision(running, "rev1")), "both serve rev1"
            switched = running.switch(hashes["rev2"])
            answered = time.monotonic()
            assert switched.status == 200, switched.text
            rev1_at_switch = answered_by_revision(running, "rev1")
            time.sleep(2.0)
            outcomes = load.stop()
        assert_no_failures(outcomes)
        rev1_after, rev2_after = (answered_by_revision(running, r) for r in ("rev1", "rev2"))
        assert all(n > 0 for n in rev2_after), f"each worker answers rev2: {rev2_after}"
        late = sum(rev1_after) - sum(rev1_at_switch)
        assert late <= len(QUICK_MIX), f"{late} requests ended on rev1 after the switch's 200"
        after_switch = [o for o in outcomes if o.started > answered]
        assert len(after_switch) > 20
        assert {revision_of(o) for o in after_switch} == {"rev2"}


def test_a_killed_worker_is_restarted_logged_and_counted_and_the_other_serves_on(
    s3_bucket: str, app_name: str, app_images: AppImages, tmp_path: Path
) -> None:
    with (
        serving_rev1(s3_bucket, app_name, app_images, tmp_path) as (running, _),
        held(running) as connections,
    ):
        while len(connections.on[2]) < SURVIVORS or len(connections.on[1]) < 2:
            connections.open_one()
        for sock in connections.on[1][1:]:  # answered by the victim before it dies
            request(sock, "/cgi-bin/whoami")
        before = running.status()
        victim = before["workers"][0]
        assert victim["requests"]["total"] == len(connections.on[1]) - 1
        os.kill(victim["pid"], signal.SIGKILL)
        killed = time.monotonic()
        # Connections the kernel queued for it until it is gone die with it: its own.
        wait_until_reaped(running, victim["pid"])
        survivors = iter(connections.on[2])
        sent = 0
        while True:
            # The other worker's connections (while they last: a loaded machine may take
            # longer to start the new worker than they do), and new connections: none fails.
            survivor = next(survivors, None)
            if survivor is not None:
                assert request(survivor, "/cgi-bin/whoami").startswith("revision=rev1 ")
                sent += 1
            assert (
                http_call(running.proxy_port, "GET", "/cgi-bin/revision", timeout=5).status == 200
            )
            sent += 1
            first = running.status()["workers"][0]
            if first["state"] == "serving" and first["pid"] != victim["pid"]:
                break
            assert time.monotonic() - killed < RESTART_WITHIN, first
        after = running.status()
        assert first["restarts"] == 1 and after["workers"][1]["restarts"] == 0
        # What the dead worker counted is still counted.
        assert after["requests"]["total"] == before["requests"]["total"] + sent
        assert after["requests"]["by_status"] == {"200": after["requests"]["total"]}
        assert re.search(
            rf"worker 1 \(PID {victim['pid']}\) was killed by SIGKILL after [\d.]+ s; its "
            r"connections were lost\. Starting it again in [\d.]+ s",
            running.log(),
        ), running.log()
        assert f"worker 1 started again as PID {first['pid']}" in running.log()
        assert connections.on[1][0].recv(1) == b"", "its idle connection died with it"
        for sock in connections.on[1]:
            sock.close()
        connections.on[1].clear()
        connections.one_on_each()  # the new worker 1 takes connections again


def test_connections_spread_over_both_workers(
    s3_bucket: str, app_name: str, app_images: AppImages, tmp_path: Path
) -> None:
    with (
        serving_rev1(s3_bucket, app_name, app_images, tmp_path) as (running, _),
        held(running) as connections,
    ):
        for _ in range(16):
            connections.open_one()
        spread = [w["connections"]["open"] for w in workers_of(running)]
        assert sum(spread) == 16 == running.status()["connections"]["open"]
        assert all(n > 0 for n in spread), f"16 connections, all on one worker: {spread}"


def test_requests_over_both_workers_add_up_exactly_in_status_and_metrics(
    s3_bucket: str, app_name: str, app_images: AppImages, tmp_path: Path
) -> None:
    with (
        serving_rev1(s3_bucket, app_name, app_images, tmp_path) as (running, _),
        held(running) as connections,
    ):
        for _ in range(12):
            connections.open_one()
        connections.one_on_each()
        sent = 0
        for held_here in connections.on.values():
            for sock in held_here:
                request(sock, "/cgi-bin/whoami")
                sent += 1
        status = running.status()
        assert status["requests"] == {
            "total": sent,
            "since_switch": sent,
            "by_status": {"200": sent},
        }
        assert status["Requests"] == sent
        assert status["traffic"]["by_revision"]["rev1"]["requests"] == sent
        per_worker = [w["requests"]["total"] for w in status["workers"]]
        assert per_worker == [len(connections.on[1]), len(connections.on[2])]
        metrics = running.api("GET", "/metrics").text
        counted = re.search(
            r'^wunderproxy_requests_total\{code="200",revision="rev1"\} (\S+)$', metrics, re.M
        )
        assert counted is not None, metrics
        assert float(counted.group(1)) == sent


def test_sigterm_finishes_requests_in_flight_on_both_workers_then_exits_0_after_them(
    s3_bucket: str, app_name: str, app_images: AppImages, tmp_path: Path
) -> None:
    with (
        serving_rev1(s3_bucket, app_name, app_images, tmp_path) as (running, _),
        held(running) as connections,
        ThreadPoolExecutor(WORKERS) as pool,
    ):
        connections.one_on_each()
        pids = [w["pid"] for w in workers_of(running)]
        slow = [pool.submit(request, connections.on[i][0], "/cgi-bin/slow?2") for i in (1, 2)]
        time.sleep(0.7)
        running.process.send_signal(signal.SIGTERM)
        for answer in slow:
            assert answer.result(timeout=30).startswith("revision=rev1 ")
        assert running.process.wait(30) == 0, running.log()
        assert not any(is_running(pid) for pid in pids), "the workers exit before it"


def test_workers_of_a_killed_supervisor_exit_by_themselves(
    s3_bucket: str, app_name: str, app_images: AppImages, tmp_path: Path
) -> None:
    with ExitStack() as stack:
        running, _ = stack.enter_context(serving_rev1(s3_bucket, app_name, app_images, tmp_path))
        pids = [w["pid"] for w in workers_of(running)]
        running.process.kill()
        running.process.wait()
        deadline = time.monotonic() + ORPHANS_EXIT_WITHIN
        while any(is_running(pid) for pid in pids):
            assert time.monotonic() < deadline, f"workers {pids} outlived their supervisor"
            time.sleep(0.1)
        assert "the supervisor is gone: finishing requests in flight" in running.log()


def test_a_second_supervisor_started_beside_adopts_the_container_and_its_workers_route_to_it(
    s3_bucket: str, app_name: str, app_images: AppImages, tmp_path: Path
) -> None:
    with (
        serving_rev1(s3_bucket, app_name, app_images, tmp_path) as (first, _),
        wunderproxy(
            tmp_path, s3_bucket, PREFIX, app_name, app_images.registry_port, workers=WORKERS
        ) as second,
    ):
        assert "adopted running container" in second.log()
        status = second.status()
        assert status["current"]["container_id"] == first.status()["current"]["container_id"]
        for _ in range(8):
            assert second.get("/cgi-bin/revision").text == "revision=rev1\n"
        assert sum(w["requests"]["total"] for w in status["workers"]) == 0
        assert second.status()["requests"]["total"] == 8


def test_a_worker_that_does_not_take_a_switch_is_killed_and_the_switch_still_holds(
    s3_bucket: str, app_name: str, app_images: AppImages, tmp_path: Path
) -> None:
    with serving_rev1(s3_bucket, app_name, app_images, tmp_path) as (running, hashes):
        assert running.launch(hashes["rev2"]).status == 200
        stuck = workers_of(running)[1]
        os.kill(stuck["pid"], signal.SIGSTOP)  # alive, but reading nothing
        began = time.monotonic()
        switched = running.switch(hashes["rev2"])
        took = time.monotonic() - began
        assert switched.status == 200, switched.text
        assert ROUTED_WITHIN <= took < ROUTED_WITHIN + 10, took
        assert (
            f"worker 2 (PID {stuck['pid']}) did not take the new routes within "
            f"{ROUTED_WITHIN:g} s: killing it"
        ) in running.log()
        for _ in range(20):  # whichever worker takes them, they reach rev2
            assert http_call(running.proxy_port, "GET", "/cgi-bin/revision").text == (
                "revision=rev2\n"
            )


def test_both_workers_append_whole_lines_to_one_access_log_and_follow_its_rotation(
    s3_bucket: str, app_name: str, app_images: AppImages, tmp_path: Path
) -> None:
    access_log = tmp_path / "access.log"
    with (
        serving_rev1(
            s3_bucket, app_name, app_images, tmp_path, "--access-log", str(access_log)
        ) as (running, _),
        held(running) as connections,
    ):
        for _ in range(10):
            connections.open_one()
        connections.one_on_each()
        rotated = tmp_path / "access.log.1"
        first = [*connections.on[1], *connections.on[2]]
        for number, sock in enumerate(first):
            request(sock, f"/cgi-bin/whoami?{number}")
        wait_for_lines(access_log, len(first))
        access_log.rename(rotated)  # as logrotate does: the workers open a new file
        with held(running) as after:
            after.one_on_each()
            for number, sock in enumerate([*after.on[1], *after.on[2]]):
                request(sock, f"/cgi-bin/whoami?after{number}")
            count = len(after.on[1]) + len(after.on[2])
        before_lines = rotated.read_text().splitlines()
        after_lines = wait_for_lines(access_log, count)
        line = re.compile(r'^127\.0\.0\.1 - - \[[^]]+\] "GET /cgi-bin/whoami\?\w+ HTTP/1\.1" 200 ')
        assert all(line.match(text) for text in before_lines + after_lines)
        assert len(before_lines) == len(first)
        assert all("?after" in text for text in after_lines)


def wait_for_lines(path: Path, count: int, within: float = 10.0) -> list[str]:
    """The lines of ``path`` once it has ``count`` (the log is written every 50 ms)."""
    deadline = time.monotonic() + within
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count:
            return lines
        assert time.monotonic() < deadline, lines
        time.sleep(0.05)


def unix_get(path: Path) -> bytes:
    """GET / over the Unix socket at ``path``; the whole answer (read to the close)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


def test_a_unix_socket_listener_is_shared_by_the_workers_and_outlives_a_killed_one(
    app_name: str, app_images: AppImages, tmp_path: Path
) -> None:
    path = tmp_path / "proxy.sock"
    store = f"file://{tmp_path / 'store'}"  # nothing deployed: the proxy answers 503 itself
    with wunderproxy(
        tmp_path,
        store,
        PREFIX,
        app_name,
        app_images.registry_port,
        "--proxy",
        f"unix:{path}",
        workers=WORKERS,
    ) as running:
        for _ in range(10):
            assert unix_get(path).startswith(b"HTTP/1.1 503 ")
        victim = workers_of(running)[0]
        os.kill(victim["pid"], signal.SIGKILL)
        for _ in range(10):  # the other worker accepts from the same socket meanwhile
            assert unix_get(path).startswith(b"HTTP/1.1 503 ")
        deadline = time.monotonic() + RESTART_WITHIN
        while (first := running.status()["workers"][0])["pid"] in (victim["pid"], None):
            assert time.monotonic() < deadline, first
            time.sleep(0.05)
        status = running.status()
        assert status["requests"]["by_status"] == {"503": 20}
        assert f"proxy on unix:{path}" in running.log()


# New connections opened after a take-over, to see how they spread over the workers.
SPREAD_SAMPLE = 400
# Seconds the successor may take to notice that its predecessor's sockets are gone.
PREDECESSOR_GONE_WITHIN = 10.0


def test_after_a_take_over_from_one_process_new_connections_spread_evenly_over_two_workers(
    s3_bucket: str, app_name: str, app_images: AppImages, tmp_path: Path
) -> None:
    store = S3Store(s3_bucket, PREFIX)
    upload_launch_config(store, app_config(app_images, "rev1"), current=True)
    pid_file = tmp_path / "wunderproxy.pid"
    port = app_images.registry_port
    with wunderproxy(
        tmp_path, s3_bucket, PREFIX, app_name, port, "--pid-file", str(pid_file)
    ) as old:
        old.wait_until_serving("rev1")
        with (
            wunderproxy(
                tmp_path,
                s3_bucket,
                PREFIX,
                app_name,
                port,
                "--pid-file",
                str(pid_file),
                "--take-over",
                ports=(old.proxy_port, old.api_port),
                workers=WORKERS,
            ) as new,
            ExitStack() as connections,
        ):
            assert old.process.wait(30) == 0, old.log()
            deadline = time.monotonic() + PREDECESSOR_GONE_WITHIN
            while "no predecessor listens on" not in new.log():
                if time.monotonic() > deadline:
                    break  # the spread below says what that costs
                time.sleep(0.1)
            for _ in range(SPREAD_SAMPLE):
                connections.enter_context(
                    socket.create_connection(("127.0.0.1", new.proxy_port), timeout=30)
                )
            deadline = time.monotonic() + 30
            while (spread := open_per_worker(new)) and sum(spread) < SPREAD_SAMPLE:
                assert time.monotonic() < deadline, spread
                time.sleep(0.1)
            # A fair coin gives each worker 200 +- 10 (one standard deviation).
            assert all(n >= 0.3 * SPREAD_SAMPLE for n in spread), spread


def test_a_worker_too_slow_to_answer_is_counted_with_its_last_figures_so_no_total_goes_down(
    s3_bucket: str, app_name: str, app_images: AppImages, tmp_path: Path
) -> None:
    with (
        serving_rev1(s3_bucket, app_name, app_images, tmp_path) as (running, _),
        held(running) as connections,
    ):
        connections.one_on_each()
        for sock in (connections.on[1][0], connections.on[2][0]):
            request(sock, "/cgi-bin/whoami")
        before = running.status()
        total = before["requests"]["total"]
        assert total == 2
        metric = rf'^wunderproxy_requests_total\{{code="200",revision="rev1"\}} {total}(\.0)?$'
        assert re.search(metric, running.api("GET", "/metrics").text, re.M)
        slow = before["workers"][0]
        os.kill(slow["pid"], signal.SIGSTOP)  # alive, but answering nothing
        try:
            during = running.status()
            assert during["requests"]["total"] == total, during["requests"]
            assert during["workers"][0]["answered"] is False
            assert during["workers"][0]["requests"] == slow["requests"]
            assert during["workers"][1]["answered"] is True
            assert re.search(metric, running.api("GET", "/metrics").text, re.M)
        finally:
            os.kill(slow["pid"], signal.SIGCONT)
        assert running.status()["requests"]["total"] == total
        assert all(w["answered"] for w in running.status()["workers"])


# Seconds of requests while a worker keeps dying as it starts: its restart pauses grow
# 0.1, 0.2, 0.4, ... s, so about six starts fall within them.
CRASH_LOOP_SECONDS = 8.0


def test_connections_during_a_crash_looping_workers_restarts_are_all_served_by_the_other(
    s3_bucket: str, app_name: str, app_images: AppImages, tmp_path: Path
) -> None:
    access_log = tmp_path / "access.log"
    with serving_rev1(
        s3_bucket, app_name, app_images, tmp_path, "--access-log", str(access_log)
    ) as (running, _):
        victim = workers_of(running)[0]
        access_log.unlink()
        access_log.mkdir()  # every new worker now dies opening it
        os.kill(victim["pid"], signal.SIGKILL)
        wait_until_reaped(running, victim["pid"])  # what was queued for it goes with it
        failures: list[str] = []
        sent = 0
        deadline = time.monotonic() + CRASH_LOOP_SECONDS
        while time.monotonic() < deadline:
            sent += 1
            try:
                answer = http_call(running.proxy_port, "GET", "/cgi-bin/revision", timeout=10)
            except OSError as exc:
                failures.append(repr(exc))
            else:
                if answer.status != 200:
                    failures.append(f"{answer.status} {answer.body!r}")
        assert failures == [], f"{len(failures)} of {sent} requests failed: {failures[:5]}"
        assert sent > 50
        log = running.log()
        assert (
            f"worker 1: cannot open the access log {access_log} for appending: Is a directory; "
            "make it a writable file again"
        ) in log, log
        assert "Traceback" not in log, log


def test_a_drain_after_a_status_taken_mid_request_ends_when_the_workers_are_done(
    s3_bucket: str, app_name: str, app_images: AppImages, tmp_path: Path
) -> None:
    # /status copies the workers' requests in flight into the supervisor's figures of the
    # container; the drain must wait on the workers, not on that copy.
    with serving_rev1(s3_bucket, app_name, app_images, tmp_path) as (running, hashes):
        assert running.launch(hashes["rev2"]).status == 200
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(http_call, running.proxy_port, "GET", "/cgi-bin/slow?2", timeout=30)
            wait_until(
                lambda: any(c["in_flight"] for c in running.status()["containers"]),
                "/status showing the slow request in flight",
            )
            assert slow.result().status == 200
        began = time.monotonic()
        assert running.switch(hashes["rev2"]).status == 200
        wait_until(lambda: "drained and removed" in running.log(), "the drain's end", within=60)
        took = time.monotonic() - began
        assert took < 10, f"nothing was in flight at the switch, yet the drain took {took:.1f} s"
        assert "still had requests" not in running.log()
