"""The fast response-head reader against h11: whatever it accepts, h11 reads the same way."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wunderproxy.framing import _buffered
from wunderproxy.responsehead import ResponseHead, read_response_head


def verdicts_agree(head: bytes, method: bytes) -> None:
    """Where the fast reader gives a verdict, h11 frames the answer exactly so."""
    fast = read_response_head(head, method)
    if fast is None:
        return  # declined: h11 decides, whatever it decides
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("Host", "app")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(head + b"x" * fast.body_length)
    event = conn.next_event()
    assert isinstance(event, h11.InformationalResponse | h11.Response), event
    assert event.status_code == fast.status
    if isinstance(event, h11.InformationalResponse):
        assert fast.body_length == 0
        return
    received = 0
    while not isinstance(next_event := conn.next_event(), h11.EndOfMessage):
        assert isinstance(next_event, h11.Data), f"h11 wants more than {fast.body_length} bytes"
        received += len(next_event.data)
    assert received == fast.body_length
    assert conn.trailing_data[0] == b""
    assert (conn.their_state is h11.DONE) is fast.keep_alive


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
    # Declined: h11 reads these (or refuses them).
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"GET", None),
    (b"HTTP/1.1 200 OK\r\n\r\n", b"GET", None),  # until the connection closes
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: ws\r\n\r\n", b"GET", None),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n", b"CONNECT", None),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n", b"GET", None),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1, 1\r\n\r\n", b"GET", None),
    (b"HTTP/1.1 200 OK\r\nX: a\r\n folded\r\nContent-Length: 1\r\n\r\n", b"GET", None),
    (b"HTTP/1.1 200 \xe9t\xe9\r\nContent-Length: 1\r\n\r\n", b"GET", None),
    (b"HTTP/2.0 200 OK\r\nContent-Length: 1\r\n\r\n", b"GET", None),
    (b"HTTP/1.1 200 OK\nContent-Length: 1\n\n", b"GET", None),
    (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", b"GET", None),
    (b"HTTP/1.1 200 OK\r\nBad Name: x\r\nContent-Length: 1\r\n\r\n", b"GET", None),
]


@pytest.mark.parametrize(("head", "method", "expected"), TABLE)
def test_reads_plain_heads_and_declines_the_rest(
    head: bytes, method: bytes, expected: ResponseHead | None
) -> None:
    assert read_response_head(head, method) == expected
    verdicts_agree(head, method)


def test_a_head_over_h11s_limit_is_declined() -> None:
    head = b"HTTP/1.1 200 OK\r\nX: " + b"a" * 17000 + b"\r\nContent-Length: 0\r\n\r\n"
    assert read_response_head(head, b"GET") is None


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
)
def test_whatever_the_fast_reader_accepts_h11_reads_the_same_way(
    status: bytes, headers: list[bytes], method: bytes, newline: bytes
) -> None:
    head = newline.join([status, *headers]) + newline + newline
    verdicts_agree(head, method)


@given(st.binary(min_size=1, max_size=200), st.binary(min_size=1, max_size=200))
def test_buffered_agrees_with_h11s_trailing_data(first: bytes, second: bytes) -> None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(first)
    try:
        conn.next_event()
        conn.receive_data(second)
        conn.next_event()
    except h11.RemoteProtocolError:
        pass
    assert _buffered(conn) == len(conn.trailing_data[0])
