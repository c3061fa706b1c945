"""The strict response-head reader against h11: whatever it accepts, h11 reads the same way,
and what it refuses is refused with a message naming the fault."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wunderproxy.fields import HeadError
from wunderproxy.responsehead import CHUNKED, UNTIL_CLOSE, ResponseHead, read_response_head

# A body for each framing the reader can announce.
CHUNKED_BODY = b"3\r\nabc\r\n0\r\n\r\n"


def verdicts_agree(head: bytes, method: bytes, upgrade: bool = False) -> None:
    """Where the reader accepts a head, h11 frames the answer exactly so."""
    try:
        found = read_response_head(head, method, upgrade)
    except HeadError:
        return  # refused: whatever h11 would do, nothing is forwarded
    conn = h11.Connection(h11.CLIENT)
    asked = [("Connection", "upgrade"), ("Upgrade", "ws")] if upgrade else []
    headers = [("Host", "app"), *asked]
    conn.send(h11.Request(method=method, target="/", headers=headers))
    conn.send(h11.EndOfMessage())
    body = {CHUNKED: CHUNKED_BODY, UNTIL_CLOSE: b"abc"}.get(found.body_length)
    conn.receive_data(head + (body if body is not None else b"x" * found.body_length))
    if found.body_length == UNTIL_CLOSE:
        conn.receive_data(b"")
    event = conn.next_event()
    assert isinstance(event, h11.InformationalResponse | h11.Response), event
    assert event.status_code == found.status
    if found.switched:
        assert conn.their_state is h11.SWITCHED_PROTOCOL
        return
    if isinstance(event, h11.InformationalResponse):
        assert found.body_length == 0
        return
    received = b""
    while not isinstance(next_event := conn.next_event(), h11.EndOfMessage):
        assert isinstance(next_event, h11.Data), f"h11 wants more than {found.body_length}"
        received += next_event.data
    expected = b"abc" if body is not None else b"x" * found.body_length
    assert received == expected
    assert conn.trailing_data[0] == b""
    if found.body_length == UNTIL_CLOSE:
        assert not found.keep_alive  # the end of the body is the end of the connection
    else:
        assert (conn.their_state is h11.DONE) is found.keep_alive


TABLE = [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", b"GET", ResponseHead(200, 5, True)),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", b"HEAD", ResponseHead(200, 0, True)),
    (b"HTTP/1.1 204 No Content\r\n\r\n", b"GET", ResponseHead(204, 0, True)),
    (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n", b"GET", ResponseHead(304, 0, True)),
    (b"HTTP/1.1 100 Continue\r\n\r\n", b"POST", ResponseHead(100, 0, True)),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n", b"GET", ResponseHead(200, 2, False)),
    (
        b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive, CLOSE\r\nContent-Length: 0\r\n\r\n",
        b"GET",
        ResponseHead(200, 0, False),
    ),
    (b"HTTP/1.1 404\r\nContent-Length: 007\r\n\r\n", b"GET", ResponseHead(404, 7, True)),
    (
        b"HTTP/1.1 200 OK\r\nX-Empty:\r\nContent-Length: 1\r\n\r\n",
        b"GET",
        ResponseHead(200, 1, True),
    ),
    (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n",
        b"GET",
        ResponseHead(200, CHUNKED, True),
    ),
    (b"HTTP/1.1 200 OK\r\n\r\n", b"GET", ResponseHead(200, UNTIL_CLOSE, False)),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n", b"CONNECT", ResponseHead(200, 0, True, True)),
    (b"HTTP/1.1 200 \xe9t\xe9\r\nContent-Length: 1\r\n\r\n", b"GET", ResponseHead(200, 1, True)),
    # Refused: clients would disagree on where these end, or they are not HTTP/1.1.
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: ws\r\n\r\n", b"GET", "asked for no upgrade"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n", b"GET", "twice"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1, 1\r\n\r\n", b"GET", "not a decimal number"),
    (
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET",
        "Transfer-Encoding with Content-Length",
    ),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", b"GET", "only 'chunked'"),
    (b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"GET", "HTTP/1.0"),
    (b"HTTP/1.1 200 OK\r\nX: a\r\n folded\r\nContent-Length: 1\r\n\r\n", b"GET", "folding"),
    (b"HTTP/2.0 200 OK\r\nContent-Length: 1\r\n\r\n", b"GET", "bad response line"),
    (b"HTTP/1.1 200 OK\nContent-Length: 1\n\n", b"GET", "bare LF"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", b"GET", "not a decimal number"),
    (b"HTTP/1.1 200 OK\r\nBad Name: x\r\nContent-Length: 1\r\n\r\n", b"GET", "not a token"),
    (b"HTTP/1.1 200 OK\r\nX-Nul: a\x00b\r\nContent-Length: 1\r\n\r\n", b"GET", "control byte"),
]


@pytest.mark.parametrize(("head", "method", "expected"), TABLE)
def test_reads_well_formed_heads_and_refuses_the_rest(
    head: bytes, method: bytes, expected: ResponseHead | str
) -> None:
    if isinstance(expected, str):
        with pytest.raises(HeadError, match=expected):
            read_response_head(head, method, upgrade_asked=False)
    else:
        assert read_response_head(head, method, upgrade_asked=False) == expected
        verdicts_agree(head, method)


def test_a_101_switches_only_when_the_request_asked_for_an_upgrade() -> None:
    head = b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: ws\r\n\r\n"
    assert read_response_head(head, b"GET", upgrade_asked=True).switched
    verdicts_agree(head, b"GET", upgrade=True)


STATUS_LINES = st.sampled_from(
    [
        b"HTTP/1.1 200 OK",
        b"HTTP/1.0 200 OK",
        b"HTTP/1.1 204 No Content",
        b"HTTP/1.1 304 Not Modified",
        b"HTTP/1.1 100 Continue",
        b"HTTP/1.1 103 Early Hints",
        b"HTTP/1.1 101 Switching",
        b"HTTP/1.1 404",
        b"HTTP/1.1 500 ",
        b"HTTP/1.1 999 odd",
        b"HTTP/1.1 099 low",
        b"HTTP/1.1  200 OK",
        b"HTTP/1.1 200\tOK",
        b"HTTP/1.1 200 OK\x7f",
        b"http/1.1 200 OK",
        b"HTTP/1.2 200 OK",
        b"HTTP/1.1 20 OK",
    ]
)
HEADER_LINES = st.sampled_from(
    [
        b"Content-Length: 0",
        b"Content-Length: 5",
        b"Content-Length:5",
        b"Content-Length: 5 ",
        b"content-length: 12",
        b"Content-Length: 5,5",
        b"Content-Length: -1",
        b"Content-Length:",
        b"Transfer-Encoding: chunked",
        b"Transfer-Encoding: gzip",
        b"Connection: close",
        b"Connection: keep-alive",
        b"Connection: Upgrade, Close",
        b"connection: ,, ",
        b"Upgrade: ws",
        b"X-Foo: bar baz",
        b"X-Foo:\tbar\t",
        b"X-Empty:",
        b" folded continuation",
        b"NoColon",
        b"Bad Name: x",
        b"X-Nul: a\x00b",
        b"X-Ctl: a\x01b",
        b"X-High: \xff",
        b": no name",
    ]
)


@settings(max_examples=1500, deadline=None)
@given(
    status=STATUS_LINES,
    headers=st.lists(HEADER_LINES, max_size=5),
    method=st.sampled_from([b"GET", b"HEAD", b"POST", b"CONNECT"]),
    newline=st.sampled_from([b"\r\n", b"\r\n", b"\n"]),
    upgrade=st.booleans(),
)
def test_whatever_the_reader_accepts_h11_reads_the_same_way(
    status: bytes, headers: list[bytes], method: bytes, newline: bytes, upgrade: bool
) -> None:
    head = newline.join([status, *headers]) + newline + newline
    verdicts_agree(head, method, upgrade)
