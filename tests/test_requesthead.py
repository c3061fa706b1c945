"""The strict request-head reader against h11: whatever it accepts, h11 reads the same way,
and what it refuses is refused with a message naming the fault."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wunderproxy.fields import HeadError
from wunderproxy.requesthead import CHUNKED, RequestHead, check_request_line, read_request_head

CHUNKED_BODY = b"3\r\nabc\r\n0\r\n\r\n"
UPGRADE = ("Connection: Upgrade", "Upgrade: websocket")


def verdicts_agree(head: bytes) -> None:
    """Where the reader accepts a head, h11 reads the request exactly so."""
    try:
        found = read_request_head(head)
    except HeadError:
        return  # refused: whatever h11 would do, nothing is forwarded
    chunked = found.body_length == CHUNKED
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head + (CHUNKED_BODY if chunked else b"x" * found.body_length))
    request = conn.next_event()
    assert isinstance(request, h11.Request), request
    assert (request.method, request.target) == (found.method, found.target)
    assert request.http_version == found.http_version
    received = b""
    while not isinstance(event := conn.next_event(), h11.EndOfMessage):
        assert isinstance(event, h11.Data), f"h11 wants more than {found.body_length} bytes"
        received += event.data
    assert received == (b"abc" if chunked else b"x" * found.body_length)
    assert conn.trailing_data[0] == b""
    assert conn._cstate.keep_alive is found.keep_alive
    switching = conn.their_state is h11.MIGHT_SWITCH_PROTOCOL
    assert switching is (found.upgrade or found.method == b"CONNECT")


def head(line: str, *fields: str) -> bytes:
    return "\r\n".join([line, *fields, "", ""]).encode("latin-1")


TABLE = [
    (head("GET / HTTP/1.1", "Host: a"), RequestHead(b"GET", b"/", b"1.1", 0, True, None, False)),
    (
        head("POST /up?x=1 HTTP/1.1", "Host: a", "Content-Length: 3"),
        RequestHead(b"POST", b"/up?x=1", b"1.1", 3, True, None, False),
    ),
    (head("GET / HTTP/1.0"), RequestHead(b"GET", b"/", b"1.0", 0, False, None, False)),
    (
        head("HEAD / HTTP/1.1", "host: a", "Connection: Keep-Alive, close"),
        RequestHead(b"HEAD", b"/", b"1.1", 0, False, b"Keep-Alive, close", False),
    ),
    (
        head("POST / HTTP/1.1", "Host: a", "Transfer-Encoding: Chunked"),
        RequestHead(b"POST", b"/", b"1.1", CHUNKED, True, None, False),
    ),
    (
        head("GET /ws HTTP/1.1", "Host: a", "Connection: Upgrade", "Upgrade: websocket"),
        RequestHead(b"GET", b"/ws", b"1.1", 0, True, b"Upgrade", True),
    ),
    (
        head("CONNECT a:443 HTTP/1.1", "Host: a:443"),
        RequestHead(b"CONNECT", b"a:443", b"1.1", 0, True, None, False),
    ),
    # Only a body of some length is ambiguous on a request that asks to switch; an Upgrade
    # field without Connection: upgrade is no upgrade to llhttp, which reads the body too.
    (
        head("GET /ws HTTP/1.1", "Host: a", *UPGRADE, "Content-Length: 0"),
        RequestHead(b"GET", b"/ws", b"1.1", 0, True, b"Upgrade", True),
    ),
    (
        head("CONNECT a:443 HTTP/1.1", "Host: a:443", "Content-Length: 0"),
        RequestHead(b"CONNECT", b"a:443", b"1.1", 0, True, None, False),
    ),
    (
        head("POST / HTTP/1.1", "Host: a", "Upgrade: websocket", "Content-Length: 3"),
        RequestHead(b"POST", b"/", b"1.1", 3, True, None, True),
    ),
    (
        head("OPTIONS * HTTP/1.1", "Host: a"),
        RequestHead(b"OPTIONS", b"*", b"1.1", 0, True, None, False),
    ),
    (
        head("GET http://a/x HTTP/1.1", "Host: a"),
        RequestHead(b"GET", b"http://a/x", b"1.1", 0, True, None, False),
    ),
    (
        head("GET / HTTP/1.1", "Host: a", "X: caf\xe9"),
        RequestHead(b"GET", b"/", b"1.1", 0, True, None, False),
    ),
    # A peer's fallback mark is read (its value, trimmed); two marks are no valid mark.
    (
        head("GET / HTTP/1.1", "Host: a", "x-wunderproxy-fallback:  web-2 ab12 "),
        RequestHead(b"GET", b"/", b"1.1", 0, True, None, False, b"web-2 ab12"),
    ),
    (
        head(
            "GET / HTTP/1.1",
            "X-Wunderproxy-Fallback: a 1",
            "Host: a",
            "X-Wunderproxy-Fallback: a 1",
        ),
        RequestHead(b"GET", b"/", b"1.1", 0, True, None, False, b""),
    ),
    (
        head("GET / HTTP/1.1", "Host: a", "X-Wunderproxy-Fallbacks: web-2 ab12"),
        RequestHead(b"GET", b"/", b"1.1", 0, True, None, False),
    ),
    # Refused, each with the fault named.
    (head("GET / HTTP/1.1"), "exactly one Host"),
    (head("GET / HTTP/1.1", "Host: a", "Host: b"), "exactly one Host"),
    (head("GET / HTTP/2.0", "Host: a"), "bad request line"),
    (b"GET / HTTP/1.1\nHost: a\n\n", "bare LF"),
    (head("GET  / HTTP/1.1", "Host: a"), "bad request line"),
    (head("GET / HTTP/1.1", "Host: a", "Content-Length: 1, 1"), "not a decimal number"),
    (head("G\x01T / HTTP/1.1", "Host: a"), "bad request line"),
    (head("GET https://a/ HTTP/1.1", "Host: a"), "neither a path nor an http:// URL"),
    (head("GET http://b/ HTTP/1.1", "Host: a"), "is not the Host field's"),
    (head("GET a HTTP/1.1", "Host: a"), "neither a path"),
    (head("GET * HTTP/1.1", "Host: a"), "only for OPTIONS"),
    (head("CONNECT / HTTP/1.1", "Host: a"), "host:port"),
    (head("POST / HTTP/1.0", "Transfer-Encoding: chunked"), "HTTP/1.0"),
    (head("GET / HTTP/1.1", "Host: a", *UPGRADE, "Content-Length: 3"), "upgrade request"),
    (head("GET / HTTP/1.1", "Host: a", *UPGRADE, "Transfer-Encoding: chunked"), "upgrade req"),
    (
        head(
            "GET / HTTP/1.1",
            "Host: a",
            "Connection: close, UPGRADE",
            "Upgrade:",
            "Content-Length: 1",
        ),
        "without Upgrade",
    ),
    (head("CONNECT a:1 HTTP/1.1", "Host: a:1", "Content-Length: 3"), "CONNECT request has no body"),
    (head("CONNECT a:1 HTTP/1.1", "Host: a:1", "Transfer-Encoding: chunked"), "through the tunnel"),
]


@pytest.mark.parametrize(("data", "expected"), TABLE)
def test_reads_well_formed_request_heads_and_refuses_the_rest(
    data: bytes, expected: RequestHead | str
) -> None:
    if isinstance(expected, str):
        with pytest.raises(HeadError, match=expected):
            read_request_head(data)
    else:
        assert read_request_head(data) == expected
        verdicts_agree(data)


@pytest.mark.parametrize(
    "line", [b"GET /\r\n", b"PRI * HTTP/2.0\r\n", b"GET / HTTP/1.1\n", b"\x16\x03\x01\n"]
)
def test_a_request_line_of_another_protocol_is_refused_before_its_head_ends(line: bytes) -> None:
    with pytest.raises(HeadError):
        check_request_line(line)


REQUEST_LINES = st.sampled_from(
    [
        b"GET / HTTP/1.1",
        b"GET /a?b=c HTTP/1.1",
        b"POST /p HTTP/1.1",
        b"HEAD / HTTP/1.0",
        b"OPTIONS * HTTP/1.1",
        b"CONNECT h:1 HTTP/1.1",
        b"GET http://a/ HTTP/1.1",
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
        b"Content-Length: +7",
        b"Transfer-Encoding: chunked",
        b"Transfer-Encoding: xchunked",
        b"Transfer-Encoding: chunked, identity",
        b"Connection: close",
        b"Connection: keep-alive",
        b"Connection: Upgrade",
        b"Upgrade: websocket",
        b"Expect: 100-continue",
        b"X-Foo: bar baz",
        b"X-Empty:",
        b" folded",
        b"NoColon",
        b"Host : a",
        b"X-High: \xe9",
        b"X-Ctl: \x01",
        b"X-Vt: \x0bchunked",
    ]
)


@settings(max_examples=1500, deadline=None)
@given(
    line=REQUEST_LINES,
    headers=st.lists(HEADER_LINES, max_size=5),
    newline=st.sampled_from([b"\r\n", b"\r\n", b"\n"]),
)
def test_whatever_the_reader_accepts_h11_reads_the_same_way(
    line: bytes, headers: list[bytes], newline: bytes
) -> None:
    verdicts_agree(newline.join([line, *headers]) + newline + newline)
