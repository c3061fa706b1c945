"""The sans-IO framing observer, driven by bytes alone.

One rule runs through every case: the observer only says where messages start and end, so
the bytes it hands back in each direction are exactly the bytes it was given, however the
reads were cut.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks import fuzz_framing
from tests.support.framing_driver import (
    Forwarder,
    Side,
    Step,
    client,
    every_split,
    labels_of,
    ok,
    request,
    response,
    squeezed,
    upstream,
)
from tests.support.hostile import HIDDEN, REFUSED
from wunderproxy.fields import head_end
from wunderproxy.framing import (
    Body,
    ClientPiece,
    ClientProtocolError,
    Exchange,
    Informational,
    MessageEnded,
    ProtocolSwitched,
    RequestStarted,
    ResponseStarted,
    UpstreamProtocolError,
    with_connection_close,
)
from wunderproxy.requesthead import RequestHead
from wunderproxy.responsehead import ResponseHead

UPGRADE = ("Connection: Upgrade", "Upgrade: websocket")
SWITCHING = response("HTTP/1.1 101 Switching Protocols", *UPGRADE)
CHUNKED = "Transfer-Encoding: chunked"
CHUNKED_BODY = b"5\r\nhello\r\n6;x=1\r\n world\r\n0\r\nX-Sum: 42\r\n\r\n"


@dataclass(frozen=True)
class Case:
    """Reads from each side in order, and the pieces they make (see ``label``)."""

    steps: tuple[Step, ...]
    pieces: str
    must_close: bool = False
    switched: bool = False
    upstream_connections: int = 1

    @property
    def expected(self) -> list[str]:
        return self.pieces.split(", ")


NEXT_REQUEST = request("GET /next HTTP/1.1")
NEXT = (client(NEXT_REQUEST), upstream(ok()))
NEXT_PIECES = "GET /next, > end, 200, < end"

CASES = {
    "get-answered-with-content-length": Case(
        (client(request("GET /hello HTTP/1.1")), upstream(ok(b"hello"))),
        "GET /hello, > end, 200, < body, < end",
    ),
    "head-answer-announces-a-length-but-has-no-body": Case(
        (
            client(request("HEAD /big HTTP/1.1")),
            upstream(response("HTTP/1.1 200 OK", "Content-Length: 1234")),
            *NEXT,
        ),
        f"HEAD /big, > end, 200, < end, {NEXT_PIECES}",
    ),
    "204-and-304-have-no-body": Case(
        (
            client(request("DELETE /item HTTP/1.1")),
            upstream(response("HTTP/1.1 204 No Content")),
            client(request("GET /item HTTP/1.1", 'If-None-Match: "v1"')),
            upstream(response("HTTP/1.1 304 Not Modified", 'ETag: "v1"', "Content-Length: 99")),
            *NEXT,
        ),
        f"DELETE /item, > end, 204, < end, GET /item, > end, 304, < end, {NEXT_PIECES}",
    ),
    "chunked-both-ways-with-trailers": Case(
        (
            client(request("POST /up HTTP/1.1", CHUNKED, body=CHUNKED_BODY)),
            upstream(response("HTTP/1.1 200 OK", CHUNKED, body=b"3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n")),
            *NEXT,
        ),
        f"POST /up, > body, > end, 200, < body, < end, {NEXT_PIECES}",
    ),
    "http-1.0-request-closes-after-its-answer": Case(
        (client(request("GET / HTTP/1.0")), upstream(ok(b"hi"))),
        "GET /, > end, 200, < body, < end",
        must_close=True,
    ),
    "connection-close-answer-closes": Case(
        (
            client(request("GET / HTTP/1.1")),
            upstream(response("HTTP/1.1 200 OK", "Connection: close", "Content-Length: 0")),
        ),
        "GET /, > end, 200, < end",
        must_close=True,
    ),
    "answer-delimited-by-end-of-stream": Case(
        (
            client(request("GET /stream HTTP/1.1")),
            upstream(response("HTTP/1.0 200 OK", body=b"until the container closes")),
            upstream(b""),
        ),
        "GET /stream, > end, 200, < body, < end",
        must_close=True,
    ),
    "pipelined-requests-answered-in-order": Case(
        (
            client(
                request("GET /a HTTP/1.1")
                + request("HEAD /b HTTP/1.1")
                + request("POST /c HTTP/1.1", "Content-Length: 5", body=b"hello")
                + request("GET /d HTTP/1.1")
            ),
            upstream(ok(b"a")),
            upstream(response("HTTP/1.1 200 OK", "Content-Length: 100")),
            upstream(response("HTTP/1.1 201 Created", "Content-Length: 0")),
            upstream(response("HTTP/1.1 200 OK", CHUNKED, body=b"1\r\nd\r\n0\r\n\r\n")),
        ),
        "GET /a, > end, 200, < body, < end, HEAD /b, > end, 200, < end, "
        "POST /c, > body, > end, 201, < end, GET /d, > end, 200, < body, < end",
    ),
    "expect-100-continue": Case(
        (
            client(request("POST /e HTTP/1.1", "Content-Length: 5", "Expect: 100-continue")),
            upstream(response("HTTP/1.1 100 Continue")),
            client(b"hello"),
            upstream(ok()),
        ),
        "POST /e, info 100, > body, > end, 200, < end",
    ),
    "websocket-upgrade-switches-protocols": Case(
        (
            client(request("GET /ws HTTP/1.1", *UPGRADE) + b"\x81\x05early"),
            upstream(SWITCHING + b"\x81\x05hello"),
            client(b"\x81\x03bye"),
            upstream(b"\x88\x00"),
        ),
        "GET /ws, > end, switched 101",
        switched=True,
    ),
    "refused-upgrade-stays-http": Case(
        (client(request("GET /ws HTTP/1.1", *UPGRADE)), upstream(ok(b"no")), *NEXT),
        f"GET /ws, > end, 200, < body, < end, {NEXT_PIECES}",
    ),
    "connect-tunnel-switches-protocols": Case(
        (
            client(request("CONNECT example.com:443 HTTP/1.1") + b"\x16\x03\x01"),
            upstream(response("HTTP/1.1 200 Connection Established")),
            client(b"\x16\x03\x01hello"),
            upstream(b"\x16\x03\x03"),
        ),
        "CONNECT example.com:443, > end, switched 200",
        switched=True,
    ),
    "early-answer-then-rest-of-body-then-next-request": Case(
        (
            client(request("POST /up HTTP/1.1", "Content-Length: 10", body=b"01234")),
            upstream(response("HTTP/1.1 413 Content Too Large", "Content-Length: 0")),
            client(b"56789" + NEXT_REQUEST),
            upstream(ok()),
        ),
        f"POST /up, > body, 413, < end, > body, > end, {NEXT_PIECES}",
    ),
    "container-closing-an-idle-connection-gets-a-fresh-one": Case(
        (client(request("GET / HTTP/1.1")), upstream(ok()), upstream(b""), *NEXT),
        f"GET /, > end, 200, < end, {NEXT_PIECES}",
        upstream_connections=2,
    ),
}
CASE_PARAMS = [pytest.param(case, id=name) for name, case in CASES.items()]


def sent(steps: Iterable[Step], side: Side) -> bytes:
    return b"".join(step.data for step in steps if step.side == side)


@functools.cache
def played_every_split(case: Case) -> list[Forwarder]:
    return [Forwarder().play(steps) for steps in every_split(case.steps)]


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_each_exchange_yields_its_pieces_and_forwards_bytes_untouched(case: Case) -> None:
    forwarder = Forwarder().play(case.steps)
    assert squeezed(forwarder.labels) == case.expected
    assert forwarder.to_upstream == sent(case.steps, "client")
    assert forwarder.to_client == sent(case.steps, "upstream")
    assert forwarder.exchange.must_close is case.must_close
    assert forwarder.exchange.switched is case.switched
    assert forwarder.upstream_connections == case.upstream_connections


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_however_reads_are_cut_the_pieces_are_the_same(case: Case) -> None:
    for forwarder in played_every_split(case):
        assert squeezed(forwarder.labels) == case.expected
        assert forwarder.exchange.must_close is case.must_close
        assert forwarder.exchange.switched is case.switched
        assert forwarder.upstream_connections == case.upstream_connections


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_however_reads_are_cut_every_byte_is_forwarded(case: Case) -> None:
    for forwarder in played_every_split(case):
        assert forwarder.to_upstream == sent(case.steps, "client")
        assert forwarder.to_client == sent(case.steps, "upstream")


# -- switching protocols ---------------------------------------------------------------


def round_trip(exchange: Exchange, head: bytes) -> None:
    """One request forwarded and answered, the way the forwarder does it."""
    assert isinstance(exchange.client_data(head)[0], RequestStarted)
    exchange.request_forwarded(fresh_upstream=not exchange.upstream_reusable)
    assert isinstance(exchange.upstream_data(ok())[-1], MessageEnded)


def test_an_accepted_upgrade_hands_over_the_bytes_on_both_sides_of_the_switch() -> None:
    exchange = Exchange()
    pieces = exchange.client_data(request("GET /ws HTTP/1.1", *UPGRADE) + b"early")
    assert labels_of(pieces, "client") == "GET /ws, > end"
    exchange.request_forwarded(fresh_upstream=True)
    assert exchange.client_data(b"-more") == []  # held until the container decides
    assert not exchange.switched

    answer = exchange.upstream_data(SWITCHING + b"\x81\x05hello")

    assert answer == [ProtocolSwitched(101, SWITCHING + b"\x81\x05hello")]
    assert exchange.switched
    assert exchange.take_client_leftover() == b"early-more"
    # From here on the forwarder splices; the observer no longer looks at either side.
    assert exchange.client_data(b"GET / HTTP/1.1\r\n\r\n") == []
    assert exchange.upstream_data(b"not http at all") == []


# -- state between the pieces ----------------------------------------------------------


def test_a_fresh_exchange_is_idle_with_a_reusable_upstream() -> None:
    exchange = Exchange()
    assert not exchange.request_in_progress
    assert exchange.upstream_reusable
    assert not exchange.must_close
    assert not exchange.switched


def test_a_request_is_in_progress_from_its_head_to_the_end_of_its_answer() -> None:
    exchange = Exchange()
    exchange.client_data(request("POST /p HTTP/1.1", "Content-Length: 5"))
    assert exchange.request_in_progress
    exchange.request_forwarded(fresh_upstream=True)
    assert not exchange.upstream_reusable
    exchange.client_data(b"hello")
    exchange.upstream_data(response("HTTP/1.1 200 OK", "Content-Length: 2"))
    assert exchange.request_in_progress
    assert not exchange.upstream_reusable

    exchange.upstream_data(b"ok")

    assert not exchange.request_in_progress
    assert exchange.upstream_reusable
    assert not exchange.must_close


def test_an_early_answer_leaves_the_request_in_progress_until_its_body_ends() -> None:
    exchange = Exchange()
    exchange.client_data(request("POST /p HTTP/1.1", "Content-Length: 4", body=b"ab"))
    exchange.request_forwarded(fresh_upstream=True)
    exchange.upstream_data(response("HTTP/1.1 413 Content Too Large", "Content-Length: 0"))
    assert exchange.request_in_progress
    assert not exchange.upstream_reusable

    assert labels_of(exchange.client_data(b"cd"), "client") == "> body, > end"

    assert not exchange.request_in_progress
    assert exchange.upstream_reusable


def test_a_container_that_closed_between_answers_cannot_take_the_next_request() -> None:
    exchange = Exchange()
    round_trip(exchange, request("GET / HTTP/1.1"))
    assert exchange.upstream_data(b"") == []
    assert not exchange.upstream_reusable
    assert not exchange.must_close  # the client's connection is not the container's
    exchange.client_data(NEXT_REQUEST)

    with pytest.raises(UpstreamProtocolError) as refused:
        exchange.request_forwarded(fresh_upstream=False)
    assert refused.value.status_hint == 502

    exchange.request_forwarded(fresh_upstream=True)
    assert labels_of(exchange.upstream_data(ok()), "upstream") == "200, < end"


# -- answers the proxy gives itself ----------------------------------------------------


def test_a_local_answer_keeps_the_connection_open_for_pipelined_requests() -> None:
    exchange = Exchange()
    pieces = exchange.client_data(request("GET /a HTTP/1.1") + request("GET /b HTTP/1.1"))
    assert pieces == [RequestStarted(b"GET", b"/a", request("GET /a HTTP/1.1")), MessageEnded(b"")]

    exchange.answered_locally(503, close=False)

    assert not exchange.request_in_progress
    assert not exchange.must_close
    assert exchange.upstream_reusable  # never used
    assert [piece.data for piece in exchange.client_data(None)] == [request("GET /b HTTP/1.1"), b""]
    exchange.request_forwarded(fresh_upstream=True)
    assert labels_of(exchange.upstream_data(ok()), "upstream") == "200, < end"
    assert not exchange.request_in_progress


def test_a_local_answer_before_the_body_ends_lets_the_body_through_to_be_dropped() -> None:
    exchange = Exchange()
    head = request("POST /p HTTP/1.1", "Content-Length: 10")
    pieces = exchange.client_data(head + b"012")
    exchange.answered_locally(503, close=False)
    assert exchange.request_in_progress

    pieces += exchange.client_data(b"3456789" + NEXT_REQUEST)

    assert labels_of(pieces, "client") == "POST /p, > body, > body, > end, GET /next, > end"
    assert b"".join(piece.data for piece in pieces) == head + b"0123456789" + NEXT_REQUEST
    assert not exchange.must_close


def test_a_local_answer_that_closes_ends_the_client_connection() -> None:
    exchange = Exchange()
    exchange.client_data(request("GET / HTTP/1.1"))
    exchange.answered_locally(502, close=True)
    assert exchange.must_close


# -- broken input ----------------------------------------------------------------------


def whole_and_byte_by_byte(data: bytes) -> list[list[bytes]]:
    return [[data], [data[i : i + 1] for i in range(len(data))]]


BROKEN_REQUESTS = {
    "garbage": (b"\x00\x01 garbage\r\n\r\n", 400),
    "tls-hello": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),
    "header-without-colon": (request("GET / HTTP/1.1", "NoColonHere"), 400),
    "http-1.1-without-host": (b"GET / HTTP/1.1\r\n\r\n", 400),
    "bad-content-length": (request("POST / HTTP/1.1", "Content-Length: x"), 400),
    "bad-chunk-size": (request("POST / HTTP/1.1", CHUNKED, body=b"zz\r\n"), 400),
    "bad-chunk-end": (request("POST / HTTP/1.1", CHUNKED, body=b"1\r\naXX"), 400),
    "body-cut-by-end-of-stream": (request("POST / HTTP/1.1", "Content-Length: 5", body=b"he"), 400),
    "head-over-16-KiB": (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 17_000, 431),
    "whole-head-over-16-KiB": (request("GET / HTTP/1.1", "X-Big: " + "a" * 17_000), 431),
}


@pytest.mark.parametrize(("data", "status_hint"), BROKEN_REQUESTS.values(), ids=BROKEN_REQUESTS)
def test_broken_client_bytes_raise_a_client_error_with_a_4xx_hint(
    data: bytes, status_hint: int
) -> None:
    for chunks in whole_and_byte_by_byte(data):
        exchange = Exchange()
        with pytest.raises(ClientProtocolError) as raised:
            for chunk in [*chunks, b""]:
                exchange.client_data(chunk)
        assert raised.value.status_hint == status_hint


BROKEN_ANSWERS = {
    "garbage": b"garbage\r\n\r\n",
    "http-2-status-line": b"HTTP/2 200\r\n\r\n",
    "101-without-an-upgrade-request": SWITCHING,
    "bad-chunk-size": response("HTTP/1.1 200 OK", CHUNKED, body=b"zz\r\n"),
    "body-cut-by-end-of-stream": response("HTTP/1.1 200 OK", "Content-Length: 5", body=b"ab"),
    "closed-without-answering": b"",
    "head-over-16-KiB": b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 17_000,
    "content-length-and-chunked": response(
        "HTTP/1.1 200 OK", "Content-Length: 5", CHUNKED, body=b"0\r\n\r\n"
    ),
    "two-content-lengths": response(
        "HTTP/1.1 200 OK", "Content-Length: 2", "Content-Length: 5", body=b"hello"
    ),
    "transfer-encoding-gzip": response("HTTP/1.1 200 OK", "Transfer-Encoding: gzip"),
    "bare-lf": b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
    "obs-fold": response("HTTP/1.1 200 OK", "X: a", " Content-Length: 2", body=b"ok"),
    "nul-in-a-value": response("HTTP/1.1 200 OK", "X: a\x00b", "Content-Length: 2", body=b"ok"),
    "chunk-size-18-hex-digits": response(
        "HTTP/1.1 200 OK", CHUNKED, body=b"1" + b"0" * 16 + b"2\r\nok\r\n0\r\n\r\n"
    ),
    "chunk-extension-quoted": response("HTTP/1.1 200 OK", CHUNKED, body=b'2;a="b"\r\nok\r\n'),
    "content-length-in-the-trailer": response(
        "HTTP/1.1 200 OK", CHUNKED, body=b"2\r\nok\r\n0\r\nContent-Length: 2\r\n\r\n"
    ),
    "transfer-encoding-in-the-trailer": response(
        "HTTP/1.1 200 OK", CHUNKED, body=b"0\r\nTransfer-Encoding: chunked\r\n\r\n"
    ),
}


@pytest.mark.parametrize("answer", BROKEN_ANSWERS.values(), ids=BROKEN_ANSWERS)
def test_broken_container_bytes_raise_an_upstream_error(answer: bytes) -> None:
    for chunks in whole_and_byte_by_byte(answer):
        exchange = Exchange()
        exchange.client_data(request("GET / HTTP/1.1"))
        exchange.request_forwarded(fresh_upstream=True)
        with pytest.raises(UpstreamProtocolError) as raised:
            for chunk in [*chunks, b""]:
                exchange.upstream_data(chunk)
        assert raised.value.status_hint == 502
        assert not exchange.upstream_reusable


# -- fuzzing ---------------------------------------------------------------------------

# Parts of valid messages, '|'-separated: start lines, header lines, body pieces. Bodies
# that do not fit their framing, and the spliced noise, make the broken cases.
REQUEST_PARTS = (
    b"GET / HTTP/1.1\r\nHost: a\r\n|POST /p HTTP/1.1\r\nHost: a\r\n|HEAD / HTTP/1.0\r\n"
    b"|CONNECT a:1 HTTP/1.1\r\nHost: a\r\n",
    b"Content-Length: 3\r\n|Transfer-Encoding: chunked\r\n|Connection: close\r\n"
    b"|Connection: upgrade\r\nUpgrade: ws\r\n|Expect: 100-continue\r\n",
    b"abc|3\r\nabc\r\n|0\r\n\r\n|ff;x=y\r\n|\r\n",
)
RESPONSE_PARTS = (
    b"HTTP/1.1 200 OK\r\n|HTTP/1.1 100 Continue\r\n|HTTP/1.1 101 Switching Protocols\r\n"
    b"|HTTP/1.0 404 Not Found\r\n|HTTP/1.1 204 No Content\r\n|HTTP/1.1 304 Not Modified\r\n",
    b"Content-Length: 3\r\n|Transfer-Encoding: chunked\r\n|Connection: close\r\n"
    b"|Connection: upgrade\r\nUpgrade: ws\r\n",
    b"abc|3\r\nabc\r\n|0\r\n\r\n|ff;x=y\r\n|\r\n",
)


def splice(data: bytes, noise: bytes, at: int) -> bytes:
    at %= len(data) + 1
    return data[:at] + noise + data[at:]


def http_like(parts: tuple[bytes, bytes, bytes]) -> st.SearchStrategy[bytes]:
    """Messages glued from plausible parts, some with random bytes spliced in, or plain
    random bytes: the fuzzer reaches bodies and pipelining, not only the first line."""
    starts, headers, bodies = (st.sampled_from(choices.split(b"|")) for choices in parts)
    message = st.builds(
        lambda start, head, body: start + b"".join(head) + b"\r\n" + b"".join(body),
        starts,
        st.lists(headers, max_size=4),
        st.lists(bodies, max_size=4),
    )
    stream = st.lists(message, min_size=1, max_size=3).map(b"".join)
    noise = st.binary(min_size=1, max_size=3)
    spliced = st.builds(splice, stream, noise, st.integers(0))
    return st.one_of(stream, stream, spliced, st.binary(max_size=64))


def feed_client_answering_locally(chunks: list[bytes]) -> None:
    """Feed the client's reads, answering every request at once, then end the stream."""
    exchange = Exchange()
    for chunk in [*chunks, b""]:
        pieces = exchange.client_data(chunk)
        while any(isinstance(piece, RequestStarted) for piece in pieces):
            exchange.answered_locally(503, close=False)
            pieces = exchange.client_data(None)


@settings(max_examples=300, deadline=None)
@given(data=http_like(REQUEST_PARTS))
def test_any_client_bytes_either_parse_or_raise_a_client_error(data: bytes) -> None:
    for chunks in whole_and_byte_by_byte(data):
        with contextlib.suppress(ClientProtocolError):
            feed_client_answering_locally(chunks)


FUZZ_REQUESTS = [
    request("GET / HTTP/1.1"),
    request("HEAD / HTTP/1.1"),
    request("GET / HTTP/1.0"),
    request("GET /ws HTTP/1.1", *UPGRADE),
    request("CONNECT a:1 HTTP/1.1"),
]


@settings(max_examples=300, deadline=None)
@given(head=st.sampled_from(FUZZ_REQUESTS), answer=http_like(RESPONSE_PARTS))
def test_any_container_bytes_either_parse_or_raise_an_upstream_error(
    head: bytes, answer: bytes
) -> None:
    for chunks in whole_and_byte_by_byte(answer):
        exchange = Exchange()
        exchange.client_data(head)
        exchange.request_forwarded(fresh_upstream=True)
        with contextlib.suppress(UpstreamProtocolError):
            for chunk in [*chunks, b""]:
                if any(isinstance(piece, MessageEnded) for piece in exchange.upstream_data(chunk)):
                    exchange.client_data(None)


TOKEN = rb"[A-Za-z0-9!#$%&'*+.^_`|~-]"
SHAPING = {b"host", b"content-length", b"transfer-encoding", b"connection", b"upgrade", b"expect"}


@st.composite
def valid_requests(draw: st.DrawFn) -> tuple[bytes, bytes, bytes, bytes]:
    """A well-formed request: (method, target, body, raw bytes), body framed either way."""
    method = draw(
        st.from_regex(TOKEN + rb"{1,10}", fullmatch=True).filter(lambda m: m != b"CONNECT")
    )
    target = draw(st.from_regex(rb"/[A-Za-z0-9._~%!$&'()*+,;=:@/?-]{0,30}", fullmatch=True))
    names = st.from_regex(TOKEN + rb"{1,16}", fullmatch=True).filter(
        lambda n: n.lower() not in SHAPING
    )
    values = st.from_regex(rb"([!-~]([ -~]{0,20}[!-~])?)?", fullmatch=True)
    headers = draw(st.lists(st.tuples(names, values), max_size=5))
    body = draw(st.binary(max_size=64))
    head = method + b" " + target + b" HTTP/1.1\r\nHost: app\r\n"
    head += b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    if draw(st.booleans()):
        return method, target, body, head + b"Content-Length: %d\r\n\r\n" % len(body) + body
    size = draw(st.integers(1, 16))
    chunks = [body[i : i + size] for i in range(0, len(body), size)]
    framed = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks)
    return method, target, body, head + CHUNKED.encode() + b"\r\n\r\n" + framed + b"0\r\n\r\n"


@settings(max_examples=300, deadline=None)
@given(valid_requests())
def test_valid_requests_are_seen_as_h11_sees_them_and_passed_on_byte_for_byte(
    generated: tuple[bytes, bytes, bytes, bytes],
) -> None:
    method, target, body, raw = generated
    reference = h11.Connection(h11.SERVER)
    reference.receive_data(raw)
    events: list[h11.Event] = []
    while not events or not isinstance(events[-1], h11.EndOfMessage):
        event = reference.next_event()
        assert isinstance(event, h11.Event)
        events.append(event)
    seen = events[0]
    assert isinstance(seen, h11.Request)
    assert (seen.method, seen.target) == (method, target)
    assert b"".join(event.data for event in events if isinstance(event, h11.Data)) == body

    pieces = Exchange().client_data(raw)

    started = pieces[0]
    assert isinstance(started, RequestStarted)
    assert (started.method, started.target) == (seen.method, seen.target)
    assert isinstance(pieces[-1], MessageEnded)
    assert all(isinstance(piece, Body) for piece in pieces[1:-1])
    assert b"".join(piece.data for piece in pieces) == raw


# -- edges: chunk boundaries, closing requests, unasked answers, smuggling ------------


@pytest.mark.parametrize(
    ("head", "side"),
    [
        pytest.param(request("POST /p HTTP/1.1", CHUNKED), "client", id="request-body"),
        pytest.param(response("HTTP/1.1 200 OK", CHUNKED), "upstream", id="response-body"),
    ],
)
def test_a_chunked_body_read_one_chunk_at_a_time_is_forwarded_whole(head: bytes, side: str) -> None:
    steps = [head + b"5\r\nhello\r\n", b"0\r\n\r\n"]
    if side == "client":
        played = Forwarder().play(client(step) for step in steps)
        assert played.to_upstream == b"".join(steps)
    else:
        played = Forwarder().play([client(request("GET / HTTP/1.1"))])
        played.play(upstream(step) for step in steps)
        assert played.to_client == b"".join(steps)


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(request("GET / HTTP/1.0"), id="http-1.0"),
        pytest.param(request("GET / HTTP/1.1", "Connection: close"), id="connection-close"),
    ],
)
def test_a_closing_request_followed_by_pipelined_bytes_is_still_reported(head: bytes) -> None:
    pieces = Exchange().client_data(head + request("GET /ignored HTTP/1.1"))
    assert labels_of(pieces, "client") == "GET /, > end"


def test_an_answer_nobody_asked_for_does_not_break_the_next_request() -> None:
    exchange = Exchange()
    round_trip(exchange, request("GET / HTTP/1.1"))
    with pytest.raises(UpstreamProtocolError, match="no request was pending"):
        exchange.upstream_data(response("HTTP/1.1 408 Request Timeout", "Content-Length: 0"))
    # The forwarder drops that upstream connection; the client side is still in step.
    pieces = exchange.client_data(NEXT_REQUEST)
    assert isinstance(pieces[0], RequestStarted)
    exchange.request_forwarded(fresh_upstream=True)


def test_a_request_with_both_content_length_and_chunked_is_refused() -> None:
    smuggling = request("POST / HTTP/1.1", "Content-Length: 3", CHUNKED, body=b"0\r\n\r\n")
    with pytest.raises(ClientProtocolError):
        Exchange().client_data(smuggling)


def test_no_request_is_in_progress_once_a_closing_answer_ended() -> None:
    exchange = Exchange()
    round_trip(exchange, request("GET / HTTP/1.0"))
    assert exchange.must_close
    assert not exchange.request_in_progress


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nconnection: Keep-Alive, foo\r\nContent-Length: 2\r\n\r\n",
    ],
)
def test_with_connection_close_makes_any_answer_head_the_connections_last(head: bytes) -> None:
    rewritten = with_connection_close(head)
    assert rewritten.startswith(b"HTTP/1.1 200 OK\r\n")
    assert rewritten.endswith(b"\r\n\r\n")
    exchange = Exchange()
    exchange.client_data(request("GET / HTTP/1.1"))
    exchange.request_forwarded(fresh_upstream=True)
    pieces = exchange.upstream_data(rewritten + b"ok")
    assert [type(p).__name__ for p in pieces] == ["ResponseStarted", "Body", "MessageEnded"]
    assert exchange.must_close
    assert rewritten.lower().count(b"connection:") == 1
    assert b"Content-Length: 2" in rewritten


# -- hostile bytes: smuggling and desync vectors (tests/support/hostile.py) ----------------


@pytest.mark.parametrize("data", REFUSED.values(), ids=REFUSED)
def test_a_smuggling_vector_is_refused_before_any_of_it_is_handed_back(data: bytes) -> None:
    exchange = Exchange()
    with pytest.raises(ClientProtocolError) as raised:
        exchange.client_data(data)
    assert raised.value.status_hint == 400
    assert exchange.must_close
    assert exchange.client_data(request("GET /after HTTP/1.1")) == []


@pytest.mark.parametrize("data", REFUSED.values(), ids=REFUSED)
def test_a_smuggling_vector_read_byte_by_byte_never_completes_a_request(data: bytes) -> None:
    """Read by bytes, a head may go up before its body turns out broken: no request
    ends, and the upstream connection (which holds part of a request) is spent."""
    exchange = Exchange()
    emitted: list[ClientPiece] = []
    with pytest.raises(ClientProtocolError) as raised:
        for i in range(len(data) + 1):
            emitted += exchange.client_data(data[i : i + 1])
            if emitted and isinstance(emitted[0], RequestStarted) and len(emitted) == 1:
                exchange.request_forwarded(fresh_upstream=True)
    assert raised.value.status_hint == 400
    assert not any(isinstance(piece, MessageEnded) for piece in emitted)
    assert not any(isinstance(piece, RequestStarted) for piece in emitted[1:])
    assert data.startswith(b"".join(piece.data for piece in emitted))
    assert exchange.must_close
    if emitted:
        assert not exchange.upstream_reusable


def test_a_request_after_a_refused_one_on_the_same_connection_is_never_read() -> None:
    exchange = Exchange()
    first = request("GET /first HTTP/1.1")
    pieces = exchange.client_data(first + REFUSED["obs-fold-hidden-request"] + NEXT_REQUEST)
    assert labels_of(pieces, "client") == "GET /first, > end"
    exchange.request_forwarded(fresh_upstream=True)
    assert labels_of(exchange.upstream_data(ok()), "upstream") == "200, < end"
    with pytest.raises(ClientProtocolError):
        exchange.client_data(None)
    assert exchange.must_close
    assert exchange.client_data(None) == []
    assert exchange.client_data(HIDDEN) == []


def test_a_bad_request_after_an_early_answered_body_spends_the_upstream() -> None:
    """The body's end and the bad request arrive in one read: the error loses the body's
    last piece, so the container's connection, which waits for it, is not reused."""
    exchange = Exchange()
    exchange.client_data(request("POST /p HTTP/1.1", "Content-Length: 4", body=b"ab"))
    exchange.request_forwarded(fresh_upstream=True)
    exchange.upstream_data(response("HTTP/1.1 413 Content Too Large", "Content-Length: 0"))
    with pytest.raises(ClientProtocolError):
        exchange.client_data(b"cd" + REFUSED["te-xchunked"])
    assert not exchange.upstream_reusable
    assert exchange.must_close


def test_a_refused_request_makes_the_connection_close() -> None:
    exchange = Exchange()
    with pytest.raises(ClientProtocolError):
        exchange.client_data(REFUSED["content-length-and-chunked"])
    assert exchange.must_close
    assert not exchange.request_in_progress


def test_an_absolute_form_target_naming_the_host_is_forwarded_as_sent() -> None:
    data = request("GET http://app/x?y=1 HTTP/1.1")
    pieces = Exchange().client_data(data)
    assert pieces == [RequestStarted(b"GET", b"http://app/x?y=1", data), MessageEnded(b"")]


def test_a_refusal_names_what_was_wrong() -> None:
    with pytest.raises(ClientProtocolError, match="obsolete line folding"):
        Exchange().client_data(REFUSED["obs-fold-hidden-request"])
    with pytest.raises(ClientProtocolError, match="1 to 16 hex digits"):
        Exchange().client_data(REFUSED["chunk-size-18-hex-digits-hidden-request"])
    with pytest.raises(ClientProtocolError, match="bare LF"):
        Exchange().client_data(REFUSED["bare-lf-line-ends"])
    with pytest.raises(ClientProtocolError, match="not allowed in a trailer"):
        Exchange().client_data(REFUSED["trailer-content-length"])
    with pytest.raises(ClientProtocolError, match="upgrade request"):
        Exchange().client_data(REFUSED["upgrade-with-content-length"])


# -- limits ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1024, 16 * 1024])
def test_a_request_head_over_the_limit_is_refused_with_431_however_it_arrives(size: int) -> None:
    head = request("GET / HTTP/1.1", "X-Big: " + "a" * size)
    for chunks in whole_and_byte_by_byte(head):
        exchange = Exchange(max_head_size=size)
        with pytest.raises(ClientProtocolError) as raised:
            for chunk in chunks:
                assert exchange.client_data(chunk) == []
        assert raised.value.status_hint == 431
        assert exchange.must_close


def test_a_request_head_at_the_limit_is_read() -> None:
    head = request("GET / HTTP/1.1", "X-Big: " + "a" * 1000)
    pieces = Exchange(max_head_size=len(head)).client_data(head)
    assert labels_of(pieces, "client") == "GET /, > end"


def test_a_content_length_over_the_body_limit_is_refused_with_413_at_the_head() -> None:
    exchange = Exchange(max_body_size=10)
    head = request("POST /up HTTP/1.1", "Content-Length: 11")
    for i in range(len(head) - 1):
        assert exchange.client_data(head[i : i + 1]) == []
    with pytest.raises(ClientProtocolError) as raised:
        exchange.client_data(head[-1:])
    assert raised.value.status_hint == 413
    assert exchange.must_close


def test_a_body_at_the_limit_is_forwarded() -> None:
    for framing in ("Content-Length: 10", CHUNKED):
        body = b"0123456789" if framing != CHUNKED else b"a\r\n0123456789\r\n0\r\n\r\n"
        pieces = Exchange(max_body_size=10).client_data(request("POST / HTTP/1.1", framing) + body)
        assert isinstance(pieces[-1], MessageEnded)


def test_a_chunked_body_passing_the_limit_is_refused_with_413_and_spends_the_upstream() -> None:
    exchange = Exchange(max_body_size=10)
    pieces = exchange.client_data(request("POST /up HTTP/1.1", CHUNKED) + b"6\r\nabcdef\r\n")
    assert labels_of(pieces, "client") == "POST /up, > body"
    exchange.request_forwarded(fresh_upstream=True)
    with pytest.raises(ClientProtocolError) as raised:
        exchange.client_data(b"5\r\nghijk\r\n")
    assert raised.value.status_hint == 413
    assert exchange.must_close
    assert not exchange.upstream_reusable  # the container holds half a request
    assert exchange.client_data(b"0\r\n\r\n") == []


def test_a_413_answered_before_the_upstream_was_used_keeps_the_client_side_closed() -> None:
    exchange = Exchange(max_body_size=4)
    with pytest.raises(ClientProtocolError):
        exchange.client_data(request("POST / HTTP/1.1", CHUNKED) + b"5\r\nhello\r\n0\r\n\r\n")
    assert exchange.must_close


# -- the answer's side ---------------------------------------------------------------------


def test_with_connection_close_drops_keep_alive_and_keeps_every_other_byte() -> None:
    head = (
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n"
        b"X-Connection: stays\r\nContent-Length: 2\r\nconnection:foo\r\n\r\n"
    )
    assert with_connection_close(head) == (
        b"HTTP/1.1 200 OK\r\nX-Connection: stays\r\nContent-Length: 2\r\nConnection: close\r\n\r\n"
    )
    assert with_connection_close(b"HTTP/1.1 204 No Content\r\n\r\n") == (
        b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n"
    )


def test_an_answer_with_ambiguous_framing_spends_the_upstream_and_goes_no_further() -> None:
    exchange = Exchange()
    exchange.client_data(request("GET / HTTP/1.1"))
    exchange.request_forwarded(fresh_upstream=True)
    with pytest.raises(UpstreamProtocolError, match="Content-Length"):
        exchange.upstream_data(BROKEN_ANSWERS["content-length-and-chunked"])
    assert not exchange.upstream_reusable


# -- differential fuzz against llhttp (benchmarks/fuzz_framing.py runs a million) -----------


def test_a_seeded_sample_of_the_differential_fuzz_leaves_no_disagreement_unrefused() -> None:
    totals = fuzz_framing.run(count=3000, seconds=300, seed=11)
    assert totals.inputs == 3000
    assert totals.disagreements > 0  # the inputs do reach where parsers differ
    assert totals.not_refused == 0, totals.examples[:3]
    assert totals.split_differs == 0, totals.examples[:3]


def test_an_answer_of_the_proxys_own_after_the_request_went_up_spends_the_upstream() -> None:
    exchange = Exchange()
    exchange.client_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    exchange.request_forwarded(fresh_upstream=True)
    exchange.answered_locally(502, close=True)  # the container failed before answering
    assert exchange.must_close
    assert not exchange.upstream_reusable
    assert not exchange.request_in_progress


# -- where a head ends ---------------------------------------------------------------------

_FIRST_EMPTY_LINE = re.compile(rb"\n\r?\n")  # the rule: the first empty line, CRLF or bare LF


@settings(max_examples=2000)
@given(st.binary(max_size=24).map(lambda b: bytes(b"\r\n:a "[x % 5] for x in b)), st.data())
def test_a_head_ends_after_the_first_empty_line_crlf_or_bare_lf(
    data: bytes, draw: st.DataObject
) -> None:
    start = draw.draw(st.integers(0, len(data)))
    found = _FIRST_EMPTY_LINE.search(data, start)
    assert head_end(data, start) == (found.end() if found is not None else -1)


def a_value_for(field: dataclasses.Field[object], number: int) -> object:
    """A value of the field's type, other than its default (compiled code checks types)."""
    if field.type in ("bool", bool):  # an annotation's text, or (compiled) its type
        return not field.default
    if field.type in ("int", int):
        return 1000 + number
    return f"{field.name}-{number}".encode()  # bytes, or bytes | None


@pytest.mark.parametrize(
    "record",
    [
        RequestStarted,
        ResponseStarted,
        Informational,
        Body,
        MessageEnded,
        ProtocolSwitched,
        RequestHead,
        ResponseHead,
    ],
)
def test_a_records_written_init_takes_its_fields_with_their_defaults(record: type) -> None:
    # Written by hand so that the compiled build compiles it: it must not drift from the
    # fields. Checked by calling it (a compiled __init__ has no signature to inspect).
    fields = dataclasses.fields(record)
    required = [f for f in fields if f.default is dataclasses.MISSING]
    values = [a_value_for(field, number) for number, field in enumerate(required)]
    made = record(*values)
    for field in fields:
        expected = values[required.index(field)] if field in required else field.default
        assert getattr(made, field.name) == expected, field.name
    by_name = {field.name: a_value_for(field, number) for number, field in enumerate(fields)}
    made = record(**by_name)
    assert {name: getattr(made, name) for name in by_name} == by_name
