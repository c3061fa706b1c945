"""The fast request-head reader against h11: whatever it accepts, h11 reads the same way."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wunderproxy.requesthead import RequestHead, read_request_head


def verdicts_agree(head: bytes) -> None:
    """Where the fast reader gives a verdict, h11 reads the request exactly so."""
    fast = read_request_head(head)
    if fast is None:
        return  # declined: h11 decides, whatever it decides
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head + b"x" * fast.body_length)
    request = conn.next_event()
    assert isinstance(request, h11.Request), request
    assert (request.method, request.target) == (fast.method, fast.target)
    assert request.http_version == fast.http_version
    received = 0
    while not isinstance(event := conn.next_event(), h11.EndOfMessage):
        assert isinstance(event, h11.Data), f"h11 wants more than {fast.body_length} bytes"
        received += len(event.data)
    assert received == fast.body_length
    assert conn.trailing_data[0] == b""
    assert conn._cstate.keep_alive is fast.keep_alive
    # Not MIGHT_SWITCH_PROTOCOL: an upgrade or CONNECT must be left to h11.
    assert conn.their_state in (h11.DONE, h11.MUST_CLOSE)


TABLE = [
    (
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        RequestHead(b"GET", b"/", b"1.1", 0, True, None),
    ),
    (
        b"POST /up?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\n",
        RequestHead(b"POST", b"/up?x=1", b"1.1", 3, True, None),
    ),
    (
        b"GET / HTTP/1.0\r\n\r\n",
        RequestHead(b"GET", b"/", b"1.0", 0, False, None),
    ),
    (
        b"HEAD / HTTP/1.1\r\nhost: a\r\nConnection: Keep-Alive, close\r\n\r\n",
        RequestHead(b"HEAD", b"/", b"1.1", 0, False, b"Keep-Alive, close"),
    ),
    # Declined: h11 reads these (or refuses them).
    (b"GET / HTTP/1.1\r\n\r\n", None),  # no Host
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", None),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", None),
    (b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", None),
    (b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", None),
    (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", None),
    (b"GET / HTTP/1.1\nHost: a\n\n", None),
    (b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", None),
    (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 1\r\n\r\n", None),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: \xff\r\n\r\n", None),
    (b"G\x01T / HTTP/1.1\r\nHost: a\r\n\r\n", None),
]


@pytest.mark.parametrize(("head", "expected"), TABLE)
def test_reads_plain_request_heads_and_declines_the_rest(
    head: bytes, expected: RequestHead | None
) -> None:
    assert read_request_head(head) == expected
    verdicts_agree(head)


REQUEST_LINES = st.sampled_from(
    [
        b"GET / HTTP/1.1",
        b"GET /a?b=c HTTP/1.1",
        b"POST /p HTTP/1.1",
        b"HEAD / HTTP/1.0",
        b"OPTIONS * HTTP/1.1",
        b"CONNECT h:1 HTTP/1.1",
        b"GET / HTTP/1.2",
        b"GET / HTTP/2.0",
        b"GET  / HTTP/1.1",
        b"GET / http/1.1",
        b"G@T / HTTP/1.1",
        b"GET /\x7f HTTP/1.1",
        b"GET",
    ]
)
HEADER_LINES = st.sampled_from(
    [
        b"Host: a",
        b"Host: a",
        b"host:b",
        b"Content-Length: 0",
        b"Content-Length: 7",
        b"content-length:7 ",
        b"Content-Length: 7,7",
        b"Content-Length: x",
        b"Transfer-Encoding: chunked",
        b"Connection: close",
        b"Connection: keep-alive",
        b"Connection: Upgrade",
        b"Upgrade: websocket",
        b"Expect: 100-continue",
        b"X-Foo: bar baz",
        b"X-Empty:",
        b" folded",
        b"NoColon",
        b"X-High: \xe9",
        b"X-Ctl: \x01",
    ]
)


@settings(max_examples=1500, deadline=None)
@given(
    line=REQUEST_LINES,
    headers=st.lists(HEADER_LINES, max_size=5),
    newline=st.sampled_from([b"\r\n", b"\r\n", b"\n"]),
)
def test_whatever_the_fast_reader_accepts_h11_reads_the_same_way(
    line: bytes, headers: list[bytes], newline: bytes
) -> None:
    verdicts_agree(newline.join([line, *headers]) + newline + newline)
