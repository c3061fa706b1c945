"""The forwarded fields, rewritten from bytes alone: what each --forwarded mode makes of a
head, forged fields included, and that every head it makes is one h11 reads as meant."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given
from hypothesis import strategies as st

from wunderproxy.config import ForwardedMode
from wunderproxy.forwarded import Forwarding, client_address
from wunderproxy.framing import ClientProtocolError, Exchange
from wunderproxy.requesthead import read_request_head

CLIENT = "192.0.2.1"


def rewritten(
    head: bytes, mode: ForwardedMode = "append", client: str | None = CLIENT, scheme: str = "http"
) -> bytes:
    return Forwarding(mode, client, scheme).rewrite(head)


def fields_of(head: bytes) -> list[tuple[bytes, bytes]]:
    """The (lower-case name, value) pairs h11 reads in ``head``, in order."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head)
    request = conn.next_event()
    assert isinstance(request, h11.Request), request
    return list(request.headers.raw_items())


def values(head: bytes, name: bytes) -> list[bytes]:
    return [value for field, value in fields_of(head) if field.lower() == name]


# -- append ------------------------------------------------------------------------------


def test_append_adds_the_client_and_the_scheme_when_the_client_sent_neither() -> None:
    head = b"GET /a HTTP/1.1\r\nHost: shop.example\r\nAccept: */*\r\n\r\n"
    assert rewritten(head) == (
        b"GET /a HTTP/1.1\r\nHost: shop.example\r\nAccept: */*\r\n"
        b"X-Forwarded-For: 192.0.2.1\r\nX-Forwarded-Proto: http\r\n\r\n"
    )


def test_append_extends_the_last_x_forwarded_for_and_keeps_every_other_byte() -> None:
    head = (
        b"POST /a HTTP/1.1\r\nhost: shop.example\r\nx-forwarded-for: 203.0.113.9\r\n"
        b"Content-Length: 0\r\nX-FORWARDED-FOR:198.51.100.2 , 10.0.0.1  \r\n"
        b"X-Forwarded-Proto: https\r\nX-Forwarded-For-Extra: kept\r\n\r\n"
    )
    # The proxy in front said https: kept on the plain listener.
    assert rewritten(head) == (
        b"POST /a HTTP/1.1\r\nhost: shop.example\r\nx-forwarded-for: 203.0.113.9\r\n"
        b"Content-Length: 0\r\nX-FORWARDED-FOR:198.51.100.2 , 10.0.0.1, 192.0.2.1  \r\n"
        b"X-Forwarded-Proto: https\r\nX-Forwarded-For-Extra: kept\r\n\r\n"
    )


def test_append_gives_an_empty_x_forwarded_for_the_client_as_its_value() -> None:
    head = b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For:\r\nX-Forwarded-Proto: http\r\n\r\n"
    assert values(rewritten(head), b"x-forwarded-for") == [b"192.0.2.1"]


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        (b"", False),
        (b"X-Forwarded-Proto: http\r\n", False),
        (b"x-forwarded-proto: https\r\nX-Forwarded-Proto: http\r\n", False),
        (b"x-forwarded-proto:  HTTPS \r\n", True),
    ],
)
def test_append_on_the_tls_listener_says_https_whatever_a_client_said(
    sent: bytes, kept: bool
) -> None:
    head = b"GET / HTTP/1.1\r\nHost: a\r\n" + sent + b"Accept: */*\r\n\r\n"
    assert rewritten(head, scheme="https") == (
        b"GET / HTTP/1.1\r\nHost: a\r\n"
        + (sent if kept else b"")
        + b"Accept: */*\r\nX-Forwarded-For: 192.0.2.1\r\n"
        + (b"" if kept else b"X-Forwarded-Proto: https\r\n")
        + b"\r\n"
    )


# -- replace -----------------------------------------------------------------------------

FORGED = (
    b"GET /cart?x=1 HTTP/1.1\r\nHost: shop.example:8443\r\n"
    b"X-Forwarded-For: 6.6.6.6\r\nx-forwarded-proto: https\r\nX-Forwarded-Host: evil.example\r\n"
    b"User-Agent: t\r\nFORWARDED: for=6.6.6.6;proto=https\r\nX-Forwarded-For: 7.7.7.7\r\n"
    b"Forwarded-Extra: kept\r\n\r\n"
)


def test_replace_drops_every_forged_field_and_sets_all_four() -> None:
    assert rewritten(FORGED, "replace") == (
        b"GET /cart?x=1 HTTP/1.1\r\nHost: shop.example:8443\r\nUser-Agent: t\r\n"
        b"Forwarded-Extra: kept\r\n"
        b"X-Forwarded-For: 192.0.2.1\r\nX-Forwarded-Proto: http\r\n"
        b"X-Forwarded-Host: shop.example:8443\r\n"
        b'Forwarded: for=192.0.2.1;proto=http;host="shop.example:8443"\r\n\r\n'
    )


def test_replace_quotes_and_brackets_an_ipv6_client_and_leaves_a_token_host_bare() -> None:
    head = b"GET / HTTP/1.1\r\nHost: shop.example\r\n\r\n"
    result = rewritten(head, "replace", client="2001:db8::7", scheme="https")
    assert values(result, b"x-forwarded-for") == [b"2001:db8::7"]
    assert values(result, b"x-forwarded-proto") == [b"https"]
    assert values(result, b"forwarded") == [b'for="[2001:db8::7]";proto=https;host=shop.example']


def test_replace_escapes_a_host_that_needs_it_in_a_quoted_string() -> None:
    head = b'GET / HTTP/1.1\r\nHost: a"b\\c\r\n\r\n'
    assert values(rewritten(head, "replace"), b"forwarded") == [
        b'for=192.0.2.1;proto=http;host="a\\"b\\\\c"'
    ]


def test_replace_leaves_the_host_out_of_an_http_1_0_request_without_one() -> None:
    head = b"GET / HTTP/1.0\r\nX-Forwarded-Host: evil.example\r\n\r\n"
    result = rewritten(head, "replace")
    assert values(result, b"x-forwarded-host") == []
    assert values(result, b"forwarded") == [b"for=192.0.2.1;proto=http"]


def test_replace_names_each_requests_own_host_on_one_connection() -> None:
    forwarding = Forwarding("replace", CLIENT, "http")
    for host in (b"a.example", b"b.example:8080", b"a.example"):
        head = forwarding.rewrite(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        assert values(head, b"x-forwarded-host") == [host]
    assert forwarding.rewrite(b"GET / HTTP/1.0\r\n\r\n").endswith(
        b"Forwarded: for=192.0.2.1;proto=http\r\n\r\n"
    )


# -- the client's address ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "written"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("2001:db8::7", "2001:db8::7"),
        ("::ffff:192.0.2.1", "192.0.2.1"),  # a dual-stack listener's IPv4 client
        ("::ffff:1:2:3", "::ffff:1:2:3"),  # not a mapped address
        (None, "unknown"),  # a Unix socket: peername is "" or None
        ("", "unknown"),
    ],
)
def test_the_client_address_is_written_as_nginx_writes_remote_addr(
    peer: str | None, written: str
) -> None:
    assert client_address(peer) == written


def test_a_unix_socket_client_is_unknown_in_every_field() -> None:
    result = rewritten(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", "replace", client=None)
    assert values(result, b"x-forwarded-for") == [b"unknown"]
    assert values(result, b"forwarded") == [b"for=unknown;proto=http;host=a"]


def test_a_head_with_bare_lfs_is_refused_before_anything_is_rewritten() -> None:
    """The rewriting finds fields by CRLF: the framing must never hand it a bare LF."""
    with pytest.raises(ClientProtocolError, match="bare LF"):
        Exchange().client_data(b"GET / HTTP/1.1\nHost: a\nX-Forwarded-For: 6.6.6.6\n\n")


# -- every head made is well-formed, and means what it should ----------------------------

_NAMES = ["X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "Forwarded", "Accept"]
_field = st.tuples(
    st.sampled_from(_NAMES).flatmap(
        lambda name: st.sampled_from([name, name.lower(), name.upper()])
    ),
    st.sampled_from(["", " "]),
    st.from_regex(r"[a-z0-9.:]{0,8}( [a-z0-9.]{1,4})?", fullmatch=True),
    st.sampled_from(["", " ", "\t"]),
)


def _head(fields: list[tuple[str, str, str, str]]) -> bytes:
    lines = "".join(f"{name}:{before}{value}{after}\r\n" for name, before, value, after in fields)
    return f"GET / HTTP/1.1\r\nHost: h.example\r\n{lines}\r\n".encode()


def _others(head: bytes, names: set[bytes]) -> list[tuple[bytes, bytes]]:
    return [(n, v) for n, v in fields_of(head) if n.lower() not in names]


@given(st.lists(_field, max_size=6), st.sampled_from(["http", "https"]))
def test_append_keeps_the_other_fields_and_adds_the_client_to_the_list(
    fields: list[tuple[str, str, str, str]], scheme: str
) -> None:
    head = _head(fields)
    result = rewritten(head, "append", scheme=scheme)
    read_request_head(result)  # well-formed, or this raises
    before = [v for v in values(head, b"x-forwarded-for") if v]
    assert b", ".join(v for v in values(result, b"x-forwarded-for") if v) == b", ".join(
        [*before, CLIENT.encode()]
    )
    protos = values(result, b"x-forwarded-proto")
    if scheme == "https":
        assert [p.lower() for p in protos] == [b"https"]
    else:
        assert protos == (values(head, b"x-forwarded-proto") or [b"http"])
    names = {b"x-forwarded-for", b"x-forwarded-proto"}
    assert _others(result, names) == _others(head, names)


@given(st.lists(_field, max_size=6), st.sampled_from(["http", "https"]))
def test_replace_keeps_the_other_fields_and_sets_exactly_its_own(
    fields: list[tuple[str, str, str, str]], scheme: str
) -> None:
    head = _head(fields)
    result = rewritten(head, "replace", scheme=scheme)
    read_request_head(result)
    set_by_proxy = [
        (b"X-Forwarded-For", CLIENT.encode()),
        (b"X-Forwarded-Proto", scheme.encode()),
        (b"X-Forwarded-Host", b"h.example"),
        (b"Forwarded", f"for={CLIENT};proto={scheme};host=h.example".encode()),
    ]
    names = {name.lower() for name, _ in set_by_proxy}
    assert [(n, v) for n, v in fields_of(result) if n.lower() in names] == set_by_proxy
    assert _others(result, names) == _others(head, names)
