"""A held request body from bytes alone: written on only while its connection takes more,
from its start again when sent again; the Expect field the proxy answers; the warning of
bodies that could not be stored. (Over real sockets: test_request_buffering.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from wunderproxy.requestbuffer import BufferedRequest, without_continue
from wunderproxy.spool import READ_SIZE, Spool


class Connection:
    """A connection that takes ``room`` more writes before its flow control says stop."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.written = bytearray()

    @property
    def writable(self) -> bool:
        return self.room > 0

    def write(self, data: bytes) -> None:
        self.written += data
        self.room -= 1


def test_a_held_body_is_written_only_while_its_connection_takes_more(tmp_path: Path) -> None:
    body = bytes(range(256)) * 4096  # 1 MiB: 64 KiB in memory, the rest in READ_SIZE reads
    upload = BufferedRequest(Spool(64 * 1024, tmp_path))
    upload.add(body)
    connection = Connection(room=2)
    upload.send(connection)
    assert len(connection.written) == 64 * 1024 + READ_SIZE and not upload.sent
    upload.send(connection)  # nothing until the connection takes more
    assert len(connection.written) == 64 * 1024 + READ_SIZE
    connection.room = 100  # resume_writing
    upload.send(connection)
    assert connection.written == body and upload.sent
    upload.close()


def test_a_held_body_sent_again_goes_from_its_start(tmp_path: Path) -> None:
    upload = BufferedRequest(Spool(10, tmp_path))
    upload.add(b"0123456789abcdef")
    first = Connection(room=100)
    upload.send(first)
    upload.rewind()
    again = Connection(room=100)
    upload.send(again)
    assert first.written == again.written == b"0123456789abcdef"
    upload.close()


@pytest.mark.parametrize(
    ("head", "kept"),
    [
        (b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n", None),
        (b"PUT / HTTP/1.1\r\nHost: a\r\nexpect:100-Continue \r\nContent-Length: 5\r\n\r\n", None),
        # Nothing to answer: no expectation, HTTP/1.0 (ignored there), or another one.
        (b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n", "kept"),
        (b"PUT / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n", "kept"),
        (b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue-ish\r\n\r\n", "kept"),
    ],
)
def test_only_a_100_continue_expectation_of_http_1_1_is_answered_and_removed(
    head: bytes, kept: str | None
) -> None:
    if kept:
        assert without_continue(head) is None
    else:
        assert without_continue(head) == b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n"
