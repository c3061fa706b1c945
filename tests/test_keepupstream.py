"""--keep-upstream's head edit, driven by bytes alone, each result read by h11 as well."""

from __future__ import annotations

import h11
import pytest

from wunderproxy.framing import Exchange, RequestStarted, with_connection_close
from wunderproxy.keepupstream import without_close

HOST = b"GET /a HTTP/1.1\r\nHost: app\r\n"


def h11_fields(head: bytes) -> list[tuple[bytes, bytes]]:
    """The fields h11 reads in a request head."""
    server = h11.Connection(h11.SERVER)
    server.receive_data(head)
    event = server.next_event()
    assert isinstance(event, h11.Request)
    return list(event.headers)


@pytest.mark.parametrize(
    ("sent", "going_up"),
    [
        (b"Connection: close\r\n", b""),
        (b"connection: CLOSE\r\n", b""),
        (b"Connection: close, X-Trace\r\nX-Trace: 1\r\n", b"Connection: X-Trace\r\nX-Trace: 1\r\n"),
        (
            b"Connection: TE,close , foo\r\nTE: trailers\r\n",
            b"Connection: TE, foo\r\nTE: trailers\r\n",
        ),
        (
            b"Connection: close\r\nAccept: */*\r\nConnection: te\r\n",
            b"Accept: */*\r\nConnection: te\r\n",
        ),
        (b"Connection: keep-alive\r\n", b"Connection: keep-alive\r\n"),
        (b"Connection: closed\r\n", b"Connection: closed\r\n"),
        (b"X-Connection: close\r\n", b"X-Connection: close\r\n"),
    ],
)
def test_only_the_close_token_leaves_the_head(sent: bytes, going_up: bytes) -> None:
    head = HOST + sent + b"\r\n"
    rewritten = without_close(head)
    assert rewritten == HOST + going_up + b"\r\n"
    # h11 reads the head going up as one that keeps its connection.
    connection = [v for n, v in h11_fields(rewritten) if n == b"connection"]
    assert all(b"close" not in value.split(b", ") for value in connection)


def test_a_head_without_close_is_the_same_bytes() -> None:
    head = HOST + b"Connection: keep-alive\r\n\r\n"
    assert without_close(head) == head


def started(data: bytes) -> RequestStarted:
    pieces = Exchange().client_data(data)
    assert isinstance(pieces[0], RequestStarted)
    return pieces[0]


def test_only_an_http_1_1_request_that_says_close_and_asks_no_upgrade_or_tunnel_closes() -> None:
    assert started(HOST + b"Connection: close\r\n\r\n").closes
    assert not started(HOST + b"\r\n").closes
    # HTTP/1.0 is left as it came (see keepupstream.py).
    assert not started(b"GET / HTTP/1.0\r\n\r\n").closes
    assert not started(b"GET / HTTP/1.0\r\nConnection: close\r\n\r\n").closes
    # The connection of an upgrade request is the app's to keep or close.
    upgrade = HOST + b"Connection: close, Upgrade\r\nUpgrade: websocket\r\n\r\n"
    assert not started(upgrade).closes
    # So is a CONNECT's: after its 2xx the connection is a tunnel, not HTTP.
    connect = b"CONNECT app:443 HTTP/1.1\r\nHost: app:443\r\nConnection: close\r\n\r\n"
    assert not started(connect).closes


ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def test_after_a_dropped_close_the_upstream_is_kept_and_the_client_closes() -> None:
    exchange = Exchange()
    exchange.client_data(HOST + b"Connection: close\r\n\r\n")
    exchange.close_dropped()
    exchange.request_forwarded(fresh_upstream=True)
    exchange.upstream_data(ANSWER)
    assert exchange.must_close
    assert exchange.upstream_reusable


def test_without_a_dropped_close_a_closing_request_spends_the_upstream() -> None:
    exchange = Exchange()
    exchange.client_data(HOST + b"Connection: close\r\n\r\n")
    exchange.request_forwarded(fresh_upstream=True)
    exchange.upstream_data(ANSWER)
    assert exchange.must_close
    assert not exchange.upstream_reusable


def test_an_answer_that_closes_spends_the_upstream_even_after_a_dropped_close() -> None:
    exchange = Exchange()
    exchange.client_data(HOST + b"Connection: close\r\n\r\n")
    exchange.close_dropped()
    exchange.request_forwarded(fresh_upstream=True)
    exchange.upstream_data(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
    assert not exchange.upstream_reusable


def test_the_closing_answer_head_loses_a_keep_alive_field() -> None:
    head = b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5, max=100\r\nConnection: keep-alive\r\n"
    rewritten = with_connection_close(head + b"Content-Length: 2\r\n\r\n")
    assert rewritten == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n"
