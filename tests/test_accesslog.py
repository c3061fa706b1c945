"""The access log's formats, its writer thread, rotation, and what happens when it lags."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from pathlib import Path

import pytest

from tests.support.waiting import eventually
from wunderproxy import accesslog
from wunderproxy.accesslog import AccessLog, forwarded_for, protocol_of

HEAD = b"GET /a?b=1 HTTP/1.0\r\nHost: x\r\nX-Forwarded-For: 203.0.113.9\r\n\r\n"
MOMENT = 1_800_000_000.25  # 2027-01-15 08:00:00.250 UTC


def log_one(log: AccessLog, head: bytes = HEAD, target: bytes = b"/a?b=1") -> None:
    log.request("192.0.2.1", head, b"GET", target, 200, 612, 0.0012345, "rev2")


@pytest.fixture
def fixed_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accesslog.time, "time", lambda: MOMENT)


async def test_common_format_is_clf_then_forwarded_for_revision_and_seconds(
    tmp_path: Path, fixed_time: None
) -> None:
    log = AccessLog(str(tmp_path / "access.log"), "common")
    log.start()
    log_one(log)
    await log.close()
    assert (tmp_path / "access.log").read_text() == (
        '192.0.2.1 - - [15/Jan/2027:08:00:00 +0000] "GET /a?b=1 HTTP/1.0" 200 612 '
        '"203.0.113.9" rev2 0.001234 - - -\n'
    )


async def test_a_request_to_or_from_a_peer_says_so_after_the_seconds(
    tmp_path: Path, fixed_time: None
) -> None:
    common = AccessLog(str(tmp_path / "access.log"), "common")
    json_log = AccessLog(str(tmp_path / "access.json"), "json")
    for log in (common, json_log):
        log.start()
        log.request("192.0.2.1", HEAD, b"GET", b"/a", 200, 6, 0.001, "-", "to=http://10.0.0.2:80")
        log.request("192.0.2.1", HEAD, b"GET", b"/a", 200, 6, 0.001, "rev2", "from=web-2")
        await log.close()
    lines = (tmp_path / "access.log").read_text().splitlines()
    assert [line.split()[-3] for line in lines] == ["to=http://10.0.0.2:80", "from=web-2"]
    objects = [json.loads(line) for line in (tmp_path / "access.json").read_text().splitlines()]
    assert [o["fallback"] for o in objects] == ["to=http://10.0.0.2:80", "from=web-2"]


async def test_json_format_has_every_field(tmp_path: Path, fixed_time: None) -> None:
    log = AccessLog(str(tmp_path / "access.log"), "json")
    log.start()
    log_one(log)
    await log.close()
    assert json.loads((tmp_path / "access.log").read_text()) == {
        "time": "2027-01-15T08:00:00.250Z",
        "client": "192.0.2.1",
        "forwarded_for": "203.0.113.9",
        "method": "GET",
        "target": "/a?b=1",
        "protocol": "HTTP/1.0",
        "status": 200,
        "bytes": 612,
        "duration_seconds": 0.001234,
        "revision": "rev2",
        "fallback": None,
        "encoding": None,
        "buffered": None,
    }


async def test_the_encoding_and_what_was_buffered_are_the_last_fields(
    tmp_path: Path, fixed_time: None
) -> None:
    common = AccessLog(str(tmp_path / "access.log"), "common")
    json_log = AccessLog(str(tmp_path / "access.json"), "json")
    for log in (common, json_log):
        log.start()
        log.request("192.0.2.1", HEAD, b"GET", b"/a", 200, 6, 0.001, "rev2", None, "br", "both")
        log.request("192.0.2.1", HEAD, b"GET", b"/a", 200, 6, 0.001, "rev2", None, None, "request")
        await log.close()
    lines = (tmp_path / "access.log").read_text().splitlines()
    assert [line.split()[-2:] for line in lines] == [["br", "both"], ["-", "request"]]
    objects = [json.loads(line) for line in (tmp_path / "access.json").read_text().splitlines()]
    assert [(o["encoding"], o["buffered"]) for o in objects] == [("br", "both"), (None, "request")]


async def test_quotes_in_a_target_are_escaped_so_the_line_stays_parseable(
    tmp_path: Path,
) -> None:
    log = AccessLog(str(tmp_path / "access.log"))
    log.start()
    log_one(log, target=b'/say"hi"\\')
    await log.close()
    assert '"GET /say\\"hi\\"\\\\ HTTP/1.0"' in (tmp_path / "access.log").read_text()


def test_forwarded_for_joins_repeated_headers_and_ignores_case() -> None:
    head = b"GET / HTTP/1.1\r\nx-forwarded-for: 1.1.1.1\r\nX-FORWARDED-FOR:  2.2.2.2 \r\n\r\n"
    assert forwarded_for(head) == "1.1.1.1, 2.2.2.2"
    assert forwarded_for(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") is None
    assert protocol_of(b"GET / HTTP/1.1\r\n\r\n") == "HTTP/1.1"
    assert protocol_of(b"") == "-"


async def test_lines_wait_at_most_a_flush_interval(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    log.start()
    log_one(log)
    await eventually(lambda: path.exists() and path.read_text().count("\n") == 1, within=2.0)
    await log.close()


async def test_a_rotated_log_is_reopened_without_a_signal(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    log.start()
    log_one(log)
    await eventually(lambda: path.exists() and path.read_text().count("\n") == 1)
    path.rename(tmp_path / "access.log.1")  # what logrotate does by default
    log_one(log)
    log_one(log)
    await log.close()
    assert (tmp_path / "access.log.1").read_text().count("\n") == 1
    assert path.read_text().count("\n") == 2


async def test_dash_writes_to_standard_output(capfd: pytest.CaptureFixture[str]) -> None:
    log = AccessLog("-", "json")
    log.start()
    log_one(log)
    await log.close()
    assert json.loads(capfd.readouterr().out)["revision"] == "rev2"


async def test_lines_are_dropped_and_counted_when_the_writer_lags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(accesslog, "MAX_QUEUED_CHUNKS", 1)
    path = tmp_path / "access.log"
    log = AccessLog(str(path))  # the writer thread is not started yet: nothing drains
    log_one(log)
    log._hand_over()
    log_one(log)
    log_one(log)
    log._hand_over()  # the queue is full: these two are dropped
    log.start()
    await eventually(lambda: path.exists() and path.read_text().count("\n") == 1)
    with caplog.at_level(logging.WARNING, "wunderproxy.accesslog"):
        log._hand_over()
    assert "dropped 2 lines because writing fell behind" in caplog.text
    await log.close()


def test_an_unwritable_path_fails_at_once_naming_it(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        AccessLog(str(tmp_path / "missing-dir" / "access.log"))


async def test_closing_a_log_that_never_started_does_not_fail(tmp_path: Path) -> None:
    log = AccessLog(str(tmp_path / "access.log"))
    await log.close()  # start-up failed before the server started it


async def test_shutdown_gives_up_on_a_stuck_writer_instead_of_hanging(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(accesslog, "CLOSE_TIMEOUT", 0.2)
    log = AccessLog(str(tmp_path / "access.log"))
    stalled = threading.Event()
    release = threading.Event()

    def stall() -> None:  # a disk that does not answer
        stalled.set()
        release.wait(10)

    monkeypatch.setattr(log, "_reopen_if_rotated", stall)
    log.start()
    log_one(log)
    log._hand_over()
    await eventually(stalled.is_set)
    try:
        async with asyncio.timeout(3):
            await log.close()
        assert "writing is stuck" in caplog.text
    finally:
        release.set()
