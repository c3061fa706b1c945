"""What an operator sees, end to end: known traffic through a real wunderproxy (CLI, real
Docker engine and registry, moto over HTTP) to real containers, then ``/status``,
``/metrics`` (read with prometheus-client's own parser) and the access log must count
exactly that traffic; and the status page, rendered by a real browser (headless chromium),
must show it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.configs import PREFIX, app_config, upload_launch_config
from tests.support.docker import AppImages
from tests.support.process import WunderproxyProcess, wunderproxy
from wunderproxy.store import S3Store

pytestmark = pytest.mark.e2e

BEFORE_SWITCH = 4  # 200s to rev1
OK = 12  # 200s to rev2, with an X-Forwarded-For header
NOT_FOUND = 5  # 404s to rev2
SLOW = 3  # 200s to rev2 that take SLOW_SECONDS each
SLOW_SECONDS = 1.0
CLIENT = "203.0.113.7"


def wait_for(condition: Any, what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"not after {timeout} s: {what}")


def send_known_traffic(running: WunderproxyProcess, rev2_hash: str) -> None:
    for _ in range(BEFORE_SWITCH):
        assert running.get("/cgi-bin/revision").text.strip() == "revision=rev1"
    assert running.launch(rev2_hash).status == 200
    assert running.switch(rev2_hash).status == 200
    for _ in range(OK):
        answer = running.get("/cgi-bin/revision", headers={"X-Forwarded-For": CLIENT})
        assert answer.text.strip() == "revision=rev2"
    for _ in range(NOT_FOUND):
        assert running.get("/missing").status == 404
    with ThreadPoolExecutor(SLOW) as pool:
        slow = list(pool.map(lambda _: running.get(f"/cgi-bin/slow?{SLOW_SECONDS}"), range(SLOW)))
    assert [answer.status for answer in slow] == [200] * SLOW


def metric_samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.mark.parametrize("workers", [1, 2])
def test_status_metrics_and_access_log_count_exactly_the_traffic_sent(
    workers: int, s3_bucket: str, app_name: str, app_images: AppImages, tmp_path: Path
) -> None:
    store = S3Store(s3_bucket, PREFIX)
    upload_launch_config(store, app_config(app_images, "rev1"), current=True)
    rev2_hash = upload_launch_config(store, app_config(app_images, "rev2"))
    access_log = tmp_path / "access.log"
    with wunderproxy(
        tmp_path,
        s3_bucket,
        PREFIX,
        app_name,
        app_images.registry_port,
        "--access-log",
        str(access_log),
        "--access-log-format",
        "json",
        workers=workers,
    ) as running:
        running.wait_until_serving("rev1")
        send_known_traffic(running, rev2_hash)
        status = wait_for(
            lambda: (s := running.status())["events"][0]["event"] == "drained" and s,
            "rev1 drained",
        )
        metrics = running.api("GET", "/metrics")
        total = BEFORE_SWITCH + OK + NOT_FOUND + SLOW
        lines = wait_for(
            lambda: len(found := access_log.read_text().splitlines()) >= total and found,
            f"{total} access log lines",
        )

    # /status
    traffic = status["traffic"]
    assert traffic["since_start"]["requests"] == total
    assert traffic["by_revision"]["rev1"]["by_status"] == {"200": BEFORE_SWITCH}
    rev2 = traffic["by_revision"]["rev2"]
    assert rev2["by_status"] == {"200": OK + SLOW, "404": NOT_FOUND}
    assert rev2["latency_ms"]["p50"] < SLOW_SECONDS * 1000
    assert rev2["latency_ms"]["p90"] == pytest.approx(SLOW_SECONDS * 1000, rel=0.2)
    assert rev2["bytes_out"] > 0 and rev2["bytes_in"] > 0
    assert sum(minute["requests"] for minute in traffic["minutes"]) == total
    assert status["requests"]["by_status"] == {"200": BEFORE_SWITCH + OK + SLOW, "404": NOT_FOUND}
    kinds = [(event["event"], event["revision"]) for event in reversed(status["events"])]
    assert kinds == [
        ("launch", "rev1"),
        ("healthy", "rev1"),
        ("switch", "rev1"),
        ("launch", "rev2"),
        ("healthy", "rev2"),
        ("switch", "rev2"),
        ("drained", "rev1"),
    ]
    assert all(e["seconds"] > 0 for e in status["events"] if e["event"] in ("healthy", "drained"))
    assert status["deploys"][0]["Revision"] == "rev2"
    assert set(status["connections"]) == {
        "open",
        "active",
        "idle",
        "upgraded",
        "draining",
        "refused",
    }

    # /metrics
    assert metrics.status == 200
    assert metrics.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = metric_samples(metrics.text)

    def value(name: str, **labels: str) -> float:
        return samples[(name, frozenset(labels.items()))]

    assert value("wunderproxy_requests_total", revision="rev1", code="200") == BEFORE_SWITCH
    assert value("wunderproxy_requests_total", revision="rev2", code="200") == OK + SLOW
    assert value("wunderproxy_requests_total", revision="rev2", code="404") == NOT_FOUND
    rev2_count = OK + SLOW + NOT_FOUND
    assert value("wunderproxy_request_duration_seconds_count", revision="rev2") == rev2_count
    assert value("wunderproxy_request_duration_seconds_bucket", revision="rev2", le="0.75") == (
        OK + NOT_FOUND
    )
    assert value("wunderproxy_request_duration_seconds_bucket", revision="rev2", le="+Inf") == (
        rev2_count
    )
    assert value("wunderproxy_request_duration_seconds_sum", revision="rev2") >= SLOW * SLOW_SECONDS
    assert value("wunderproxy_deploys_total", result="switched") == 2
    assert value("wunderproxy_deploys_total", result="failed") == 0
    current = {labels for (name, labels) in samples if name == "wunderproxy_current_revision_info"}
    assert len(current) == 1 and ("revision", "rev2") in next(iter(current))
    assert value("wunderproxy_containers", state="serving") == 1
    assert value("wunderproxy_connections", state="open") >= 0
    assert value("wunderproxy_docker_up") == 1

    # the access log
    entries = [json.loads(line) for line in lines]
    assert len(entries) == total
    assert [e["revision"] for e in entries] == ["rev1"] * BEFORE_SWITCH + ["rev2"] * rev2_count
    assert [e["status"] for e in entries].count(404) == NOT_FOUND
    assert [e["forwarded_for"] for e in entries].count(CLIENT) == OK
    slow = [e for e in entries if e["target"].startswith("/cgi-bin/slow")]
    assert len(slow) == SLOW
    assert all(e["duration_seconds"] >= SLOW_SECONDS for e in slow)
    assert all(e["client"] == "127.0.0.1" and e["method"] == "GET" for e in entries)
    assert all(e["protocol"] == "HTTP/1.1" and e["bytes"] > 0 for e in entries)


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    raise AssertionError("chromium is not installed: bash .ci/setup installs it (apt chromium)")


# Bytes a blank screenshot stays under: a white page compresses to a few KiB.
BLANK_PNG_MAX = 20_000


def browse(url: str, *flags: str) -> subprocess.CompletedProcess[str]:
    """Headless chromium on ``url``; the page's scripts run for up to 5 s of virtual time."""
    return subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",  # tests run as root in CI
            "--disable-gpu",
            "--hide-scrollbars",
            "--virtual-time-budget=5000",
            *flags,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_the_status_page_shows_the_revision_and_counts_in_a_real_browser(
    workers: int, s3_bucket: str, app_name: str, app_images: AppImages, tmp_path: Path
) -> None:
    store = S3Store(s3_bucket, PREFIX)
    upload_launch_config(store, app_config(app_images, "rev1"), current=True)
    with wunderproxy(
        tmp_path, s3_bucket, PREFIX, app_name, app_images.registry_port, workers=workers
    ) as running:
        running.wait_until_serving("rev1")
        for _ in range(7):
            assert running.get("/cgi-bin/revision").status == 200
        for _ in range(2):
            assert running.get("/missing").status == 404
        page = f"http://127.0.0.1:{running.api_port}/"
        dom = browse(page, "--dump-dom").stdout
        # Chromium's window is at least 500 px wide: a phone's 390 px is a frame in a page.
        phone = tmp_path / "phone.html"
        phone.write_text(f'<body style="margin:0"><iframe src="{page}" width="390" height="2400">')
        screenshots = {
            page: (tmp_path / "laptop.png", "1280,1500"),
            phone.as_uri(): (tmp_path / "phone.png", "500,2400"),
        }
        for url, (path, size) in screenshots.items():
            for _ in range(3):  # on a busy machine the frame may not have loaded in time
                browse(url, f"--screenshot={path}", f"--window-size={size}")
                if len(path.read_bytes()) > BLANK_PNG_MAX:
                    break

    assert '<div class="big" id="current-revision">rev1</div>' in dom
    assert '<b id="total-requests">9</b>' in dom
    assert '<span data-revision="rev1" class="requests">9</span>' in dom
    assert '<span data-code="200">200: 7</span>' in dom
    assert '<span data-code="404">404: 2</span>' in dom
    assert '<span id="updated" class="muted">updated ' in dom  # no refresh error
    assert '<rect x="' in dom  # the requests chart has bars
    assert '<section id="fallback-section" hidden="">' in dom  # no peers, no fallback figures
    if workers == 1:
        assert '<section class="wide" id="workers-section" hidden="">' in dom
    else:
        assert '<section class="wide" id="workers-section">' in dom
        rows = re.findall(r'<tr><td class="num">(\d+)</td><td class="num">\d+</td>', dom)
        assert rows == ["1", "2"], "one row per worker, with its PID"
    for path, size in screenshots.values():
        png = path.read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        width = int.from_bytes(png[16:20], "big")
        assert width == int(size.split(",")[0])
        assert len(png) > BLANK_PNG_MAX, "a blank page compresses to a few KiB"


def test_the_status_page_and_metrics_need_no_token_while_deploying_does(
    s3_bucket: str, app_name: str, app_images: AppImages, tmp_path: Path
) -> None:
    with wunderproxy(
        tmp_path,
        s3_bucket,
        PREFIX,
        app_name,
        app_images.registry_port,
        "--api-token",
        "s3cret",
    ) as running:
        page = running.api("GET", "/")
        assert page.status == 200
        assert page.headers["Content-Type"] == "text/html; charset=utf-8"
        assert b"<script" in page.body and b"src=" not in page.body  # self-contained
        browser = running.api("GET", "/status", headers={"Accept": "text/html"})
        assert browser.body == page.body
        assert running.api("GET", "/status").json()["current"] is None
        assert running.api("GET", "/metrics").status == 200
        assert running.api("POST", "/launch", "0" * 32).status == 401
