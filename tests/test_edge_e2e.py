"""The edge end to end: wunderproxy through its CLI with short timeouts, a real container.

A container that never answers gets 504, a trickling head and a stalled body get 408, and a
container killed in the middle of an answer closes its client's connection with the request
counted as 502; each is counted in ``/status`` and ``/metrics``, and normal requests are
served throughout.
"""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.configs import PREFIX, app_config, upload_launch_config
from tests.support.docker import AppImages, containers_of
from tests.support.process import WunderproxyProcess, http_call, wunderproxy
from wunderproxy.server import ADOPT_DEADLINE
from wunderproxy.store import FileStore

pytestmark = pytest.mark.e2e

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
UPSTREAM_TIMEOUT = 1.5
SWEEP = 0.1  # the sweep interval these timeouts give (a tenth of the shortest)
# What "on time" allows beyond a timeout: the sweep, and a busy shared machine.
SLACK = 1.5


@pytest.fixture
def serving(app_name: str, app_images: AppImages, tmp_path: Path) -> Iterator[WunderproxyProcess]:
    directory = tmp_path / "store"
    upload_launch_config(
        FileStore(str(directory), PREFIX), app_config(app_images, "rev1"), current=True
    )
    with wunderproxy(
        tmp_path,
        f"file://{directory}",
        PREFIX,
        app_name,
        app_images.registry_port,
        "--header-timeout",
        str(HEADER_TIMEOUT),
        "--body-timeout",
        str(BODY_TIMEOUT),
        "--upstream-timeout",
        str(UPSTREAM_TIMEOUT),
        "--access-log",
        str(tmp_path / "access.log"),
        "--access-log-format",
        "json",
    ) as running:
        running.wait_until_serving("rev1")
        yield running


def raw_exchange(port: int, data: bytes, pause: float = 0.0) -> tuple[bytes, float]:
    """Send ``data`` (a byte at a time every ``pause`` s until answered, if given), then
    read to EOF.

    Returns what came back and the seconds from the first byte sent to EOF.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        started = time.monotonic()
        if pause:
            for byte in data:
                sock.sendall(bytes([byte]))
                if select.select([sock], [], [], pause)[0]:
                    break  # answered: stop sending
        else:
            sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received, time.monotonic() - started


def timeouts_metric(running: WunderproxyProcess) -> dict[str, float]:
    text = http_call(running.api_port, "GET", "/metrics").text
    return {
        sample.labels["kind"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "wunderproxy_timeouts"
        for sample in family.samples
        if sample.name == "wunderproxy_timeouts_total"
    }


def test_the_edge_answers_each_timeout_on_time_and_counts_it(
    serving: WunderproxyProcess,
) -> None:
    port = serving.proxy_port

    # A container that accepts the request and never answers.
    answer, seconds = raw_exchange(port, b"GET /cgi-bin/slow?30 HTTP/1.1\r\nHost: t\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 504 "), answer
    assert UPSTREAM_TIMEOUT <= seconds < UPSTREAM_TIMEOUT + SLACK

    # A head trickling in, a byte every 0.1 s: never complete within the header timeout.
    answer, seconds = raw_exchange(port, b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"a" * 40, 0.1)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"head did not arrive in time" in answer

    # A body that stops after 10 of its 100 bytes.
    answer, seconds = raw_exchange(
        port, b"POST /cgi-bin/echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n0123456789"
    )
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert BODY_TIMEOUT <= seconds < BODY_TIMEOUT + SLACK

    # The app is unharmed, and every timeout was counted once, by kind.
    assert serving.get("/cgi-bin/revision").text.strip() == "revision=rev1"
    status = serving.status()
    assert status["timeouts"] == {"body": 1, "header": 1, "upstream": 1}
    assert status["requests"]["by_status"] == {"200": 1, "408": 2, "504": 1}
    assert timeouts_metric(serving) == {
        "header": 1.0,
        "body": 1.0,
        "connect": 0.0,
        "upstream": 1.0,
        "send": 0.0,
    }
    log = serving.log()
    assert "upstream timeout: client 127.0.0.1:" in log and "revision rev1" in log
    assert "header timeout: client 127.0.0.1:" in log


def test_a_container_killed_mid_answer_closes_its_client_and_counts_502(
    serving: WunderproxyProcess, app_name: str, docker_client: docker.DockerClient, tmp_path: Path
) -> None:
    with socket.create_connection(("127.0.0.1", serving.proxy_port), timeout=30) as sock:
        sock.sendall(b"GET /cgi-bin/drip HTTP/1.1\r\nHost: t\r\n\r\n")
        received = sock.recv(65536)
        while not received.endswith(b"half."):
            received += sock.recv(65536)
        [container] = containers_of(docker_client, app_name)
        container.kill()
        started = time.monotonic()
        while chunk := sock.recv(65536):
            received += chunk
        assert time.monotonic() - started < 5, "the client's connection closed, no hang"
    assert received.startswith(b"HTTP/1.1 200 OK\r\n") and received.endswith(b"half.")
    assert serving.status()["requests"]["by_status"] == {"502": 1}
    log = serving.log()
    assert "failed in the middle of an answer" in log
    [line] = (tmp_path / "access.log").read_text().splitlines()
    assert json.loads(line) | {"time": "-", "duration_seconds": 0} == {
        "time": "-",
        "client": "127.0.0.1",
        "forwarded_for": None,
        "method": "GET",
        "target": "/cgi-bin/drip",
        "protocol": "HTTP/1.1",
        "status": 502,
        "bytes": len(received),
        "duration_seconds": 0,
        "revision": "rev1",
        "fallback": None,
        "encoding": None,
        "buffered": None,
    }


def test_a_store_that_never_answers_does_not_keep_the_api_and_proxy_from_listening(
    app_name: str, tmp_path: Path
) -> None:
    black_hole = socket.socket()  # accepts connections (the kernel does) and never answers
    black_hole.bind(("127.0.0.1", 0))
    black_hole.listen(64)
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{black_hole.getsockname()[1]}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    try:
        with wunderproxy(
            tmp_path, "never-answers", PREFIX, app_name, 1, env=env, wait_for_api=False
        ) as running:
            started = time.monotonic()
            while True:
                try:
                    status = running.status()
                    break
                except OSError:
                    assert time.monotonic() - started < ADOPT_DEADLINE + 5, running.log()
                    time.sleep(0.1)
            assert ADOPT_DEADLINE - 1 < time.monotonic() - started < ADOPT_DEADLINE + 5
            assert status["current"] is None
            assert running.get("/").status == 503
            assert "took over 10 s (S3 or Docker slow to answer); listening now" in running.log()
    finally:
        black_hole.close()


def test_timeouts_hold_during_shutdown_so_a_trickling_head_does_not_delay_it(
    serving: WunderproxyProcess,
) -> None:
    with socket.create_connection(("127.0.0.1", serving.proxy_port), timeout=30) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: a")  # and never more
        time.sleep(0.2)
        started = time.monotonic()
        assert serving.stop() == 0
        # --shutdown-timeout is 30 s; the header timeout (1 s) ends the trickling head first.
        assert time.monotonic() - started < HEADER_TIMEOUT + 1 + 3
        assert sock.recv(65536).startswith(b"HTTP/1.1 408 ")
