"""--compress without I/O: negotiation, media types, the head rewrite, the encoders and the
de-chunking they rely on, driven by bytes alone."""

from __future__ import annotations

import importlib.util
import logging
from importlib.machinery import ModuleSpec

import h11
import pytest

from tests.support.encodings import ENCODINGS, decoded, decoder
from tests.support.scripted import chunked, json_body
from wunderproxy import compression
from wunderproxy.chunked import ChunkedData, ChunkedReader
from wunderproxy.compression import (
    accepted_weights,
    available_encodings,
    field_values,
    media_type_matches,
    negotiate,
    rewrite_head,
)
from wunderproxy.config import DEFAULT_COMPRESS_TYPES, ConfigError, Front
from wunderproxy.encoders import OFF_LOOP_BYTES, AnswerEncoder

OFFERED = ("zstd", "br", "gzip")


@pytest.mark.parametrize(
    ("accept_encoding", "chosen"),
    [
        (None, None),  # no Accept-Encoding: send as is
        (b"", None),  # empty: no encoding wanted (RFC 9110 section 12.5.3)
        (b"identity", None),
        (b"gzip", "gzip"),
        (b"GZip", "gzip"),  # codings are case-insensitive
        (b"x-gzip", "gzip"),  # RFC 9110 section 8.4.1.3
        (b"gzip, deflate, br", "br"),  # a tie: the server's order
        (b"gzip, deflate, br, zstd", "zstd"),  # what Chrome sends
        (b"br;q=0.9, gzip", "gzip"),  # the highest q wins
        (b"zstd;q=0.5, br;q=0.8, gzip;q=0.8", "br"),  # a tie of the highest: server order
        (b"gzip;q=0", None),  # q=0 refuses
        (b"zstd;q=0, br;q=0, gzip", "gzip"),
        (b"*", "zstd"),
        (b"*;q=0.5, br", "br"),  # named beats *
        (b"*, zstd;q=0", "br"),  # * except zstd
        (b"*;q=0", None),
        (b"*;q=0, gzip;q=0.1", "gzip"),
        (b"deflate, compress", None),  # nothing offered is accepted
        (b"identity;q=1, gzip;q=0.5", None),  # identity preferred
        (b"identity;q=0.5, gzip", "gzip"),
        (b"gzip;q=0.500", "gzip"),
        (b"gzip ; q=0.5 , br ; Q=0.4", "gzip"),  # whitespace, Q in upper case
        (b",, gzip ,", "gzip"),  # empty list members are allowed
        (b"gzip;q=high", None),  # a malformed q-value refuses (as nginx)
        (b"gzip;q=2", None),
        (b"gzip;q=0.1234", None),  # four decimals
        (b"gzip;q=-1, br", "br"),
        (b"g zip, br", "br"),  # not a coding: ignored
        (b"gzip;level=9", "gzip"),  # parameters other than q are ignored
        (b"gzip;q=0, gzip", None),  # named twice: the lower weight
    ],
)
def test_negotiation_follows_rfc_9110_and_the_servers_order(
    accept_encoding: bytes | None, chosen: str | None
) -> None:
    assert negotiate(accept_encoding, OFFERED) == chosen


def test_negotiation_offers_only_what_is_offered() -> None:
    assert negotiate(b"zstd, br;q=0.5", ("gzip",)) is None
    assert negotiate(b"zstd, br;q=0.5, gzip;q=0.1", ("br", "gzip")) == "br"


def test_a_long_accept_encoding_is_read_each_time_and_never_kept() -> None:
    """The negotiation cache holds short values only, whatever clients send."""
    long = b", ".join(b"x-coding-%d;q=0.1" % number for number in range(20)) + b", br"
    kept = compression._negotiated_cached.cache_info().currsize
    assert compression._negotiated(long, OFFERED) == "br"
    assert compression._negotiated(b"gzip;q=0.5, br;q=0.75", OFFERED) == "br"  # new here
    assert compression._negotiated_cached.cache_info().currsize == kept + 1


def test_weights_are_read_per_coding() -> None:
    assert accepted_weights(b"gzip;q=0.8, br, *;q=0.1, identity;q=0") == {
        b"gzip": 0.8,
        b"br": 1.0,
        b"*": 0.1,
        b"identity": 0.0,
    }


def test_a_field_sent_twice_is_read_as_one_list() -> None:
    head = (
        b"get / http/1.1\r\naccept-encoding: br;q=0.5\r\nhost: t\r\naccept-encoding:gzip \r\n\r\n"
    )
    assert field_values(head, b"\r\naccept-encoding:") == b"br;q=0.5, gzip"
    assert field_values(head, b"\r\nhost:") == b"t"
    assert field_values(head, b"\r\naccept:") is None


def test_a_requests_accept_encoding_fields_are_read_together() -> None:
    request = (
        b"GET / HTTP/1.1\r\nAccept-Encoding: zstd;q=0\r\nHost: t\r\nACCEPT-ENCODING: br\r\n\r\n"
    )
    answer_head = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 5000\r\n\r\n"
    encoder = compression.start(Front(compress=OFFERED), b"GET", request, 200, answer_head)
    assert encoder is not None and encoder.encoding == "br"


@pytest.mark.parametrize(
    ("content_type", "matches"),
    [
        (b"text/html", True),
        (b"text/html; charset=utf-8", True),
        (b"TEXT/CSS", True),
        (b"text/event-stream", True),
        (b"application/json", True),
        (b"application/json;charset=UTF-8", True),
        (b"application/problem+json", True),  # application/*+json
        (b"application/atom+xml", True),  # application/*+xml
        (b"application/javascript", True),
        (b"image/svg+xml", True),
        (b"application/wasm", True),
        (b"application/jsonp", False),
        (b"image/png", False),
        (b"application/octet-stream", False),
        (b"application/xml-dtd", False),
        (b"text", False),
        (b"", False),
    ],
)
def test_the_default_types_are_text_and_text_formats(content_type: bytes, matches: bool) -> None:
    assert media_type_matches(content_type, DEFAULT_COMPRESS_TYPES) is matches


def test_any_type_matches_only_when_asked() -> None:
    assert media_type_matches(b"image/png", ("*/*",))
    assert not media_type_matches(b"image/png", ("image/svg+xml",))


@pytest.mark.parametrize("bad", ["text", "text/", "*/html", "text/*+", "a b/c", "/json"])
def test_a_compress_type_that_is_not_a_media_range_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"--compress-types: .* is not a media type"):
        Front(compress=("gzip",), compress_types=(bad,))


def test_compressing_with_no_types_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="--compress-types is empty"):
        Front(compress=("gzip",), compress_types=())


def _fields(head: bytes) -> list[tuple[bytes, bytes]]:
    """The fields of an answer's head as h11 reads them (which also checks the head)."""
    connection = h11.Connection(h11.CLIENT)
    connection.send(h11.Request(method="GET", target="/", headers=[("Host", "t")]))
    connection.send(h11.EndOfMessage())
    connection.receive_data(head)
    event = connection.next_event()
    assert isinstance(event, h11.Response), event
    return list(event.headers)


def test_the_head_says_the_encoding_and_chunked_instead_of_a_length() -> None:
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 5000\r\n"
        b'ETag: "v1"\r\nAccept-Ranges: bytes\r\nX-App: kept\r\n\r\n'
    )
    assert _fields(rewrite_head(head, "br")) == [
        (b"content-type", b"text/html"),
        (b"etag", b'W/"v1"'),
        (b"x-app", b"kept"),
        (b"vary", b"Accept-Encoding"),
        (b"content-encoding", b"br"),
        (b"transfer-encoding", b"chunked"),
    ]


@pytest.mark.parametrize(
    ("vary", "becomes"),
    [
        (b"Origin", b"Origin, Accept-Encoding"),
        (b"accept-encoding", b"accept-encoding"),
        (b"Origin, Accept-Encoding", b"Origin, Accept-Encoding"),
        (b"*", b"*"),
        (b"", b"Accept-Encoding"),
    ],
)
def test_an_answers_vary_is_extended_once(vary: bytes, becomes: bytes) -> None:
    head = b"HTTP/1.1 200 OK\r\nVary: " + vary + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert [value for name, value in _fields(rewrite_head(head, "gzip")) if name == b"vary"] == [
        becomes
    ]


def test_a_weak_etag_stays_as_it_was() -> None:
    head = b'HTTP/1.1 200 OK\r\nEtag: W/"v1"\r\nContent-Length: 9\r\n\r\n'
    assert (b"etag", b'W/"v1"') in _fields(rewrite_head(head, "zstd"))


def test_a_close_delimited_answer_says_it_closes() -> None:
    request = b"GET / HTTP/1.1\r\nHost: t\r\nAccept-Encoding: gzip\r\n\r\n"
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: keep-alive\r\n\r\n"
    encoder = compression.start(Front(compress=OFFERED), b"GET", request, 200, head)
    assert encoder is not None
    fields = _fields(encoder.head)
    assert (b"connection", b"close") in fields and (b"connection", b"keep-alive") not in fields


def _body_through(encoder: AnswerEncoder, reads: list[bytes]) -> tuple[bytes, list[bytes]]:
    """Feed ``reads`` (the last one ends the body), encode after each; return the chunked
    body the client gets and the data it decodes after each read."""
    received = b""
    decode = decoder(encoder.encoding)
    reader = ChunkedReader(None, 4096)
    decoded_per_read = []
    for number, read in enumerate(reads, 1):
        encoder.take(read)
        if number == len(reads):
            encoder.end()
        output = encoder.encode()
        received += output
        taken, _ = reader.read(bytearray(output))
        decoded_per_read.append(decode(ChunkedData().feed(taken) if taken else b""))
    return received, decoded_per_read


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_each_read_is_flushed_so_the_client_decodes_it_at_once(encoding: str) -> None:
    reads = [b"data: %d\n\n" % number for number in range(3)] + [b""]
    encoder = AnswerEncoder(encoding, b"", chunked=False)
    received, decoded_per_read = _body_through(encoder, reads)
    assert decoded_per_read[:3] == reads[:3]
    assert received.endswith(b"\r\n0\r\n\r\n")


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_a_chunked_body_is_decoded_before_it_is_compressed(encoding: str) -> None:
    body = json_body(20_000)
    framed = chunked(body[:7000], body[7000:7001], body[7001:])
    encoder = AnswerEncoder(encoding, b"", chunked=True)
    reads = [framed[at : at + 999] for at in range(0, len(framed), 999)]
    received, _ = _body_through(encoder, reads)
    reader = ChunkedReader(None, 4096)
    chunks, ending = reader.read(bytearray(received))
    assert reader.done and ending == b"0\r\n\r\n"
    assert decoded(encoding, ChunkedData().feed(chunks)) == body


def test_the_containers_trailer_fields_follow_the_last_chunk() -> None:
    framed = chunked(b"hello " * 100, trailer=b"X-Sum: 42\r\n")
    encoder = AnswerEncoder("gzip", b"", chunked=True)
    received, _ = _body_through(encoder, [framed[:20], framed[20:-9], framed[-9:]])
    assert received.endswith(b"\r\n0\r\nX-Sum: 42\r\n\r\n")


def test_a_read_without_data_sends_nothing() -> None:
    encoder = AnswerEncoder("gzip", b"", chunked=True)
    encoder.take(b"5\r\n")
    assert encoder.encode() == b""  # a chunk of no data would end the body


def test_a_read_is_compressed_off_the_loop_from_its_encodings_line() -> None:
    for encoding, line in OFF_LOOP_BYTES.items():
        encoder = AnswerEncoder(encoding, b"", chunked=False)
        encoder.take(b"x" * (line - 1))
        assert not encoder.off_loop
        encoder.take(b"x")
        assert encoder.off_loop
        encoder.encode()
        assert not encoder.off_loop  # counted again from the next read


CHUNKED_BODY = b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Sum: 42\r\nX-B: c\r\n\r\n"


@pytest.mark.parametrize("cut", range(1, len(CHUNKED_BODY)))
def test_chunked_data_is_read_whatever_the_cut(cut: int) -> None:
    unchunk = ChunkedData()
    data = unchunk.feed(CHUNKED_BODY[:cut]) + unchunk.feed(CHUNKED_BODY[cut:])
    assert data == b"hello world"
    assert unchunk.trailer == b"X-Sum: 42\r\nX-B: c\r\n\r\n"


def test_chunked_data_one_byte_at_a_time() -> None:
    unchunk = ChunkedData()
    data = b"".join(unchunk.feed(CHUNKED_BODY[at : at + 1]) for at in range(len(CHUNKED_BODY)))
    assert data == b"hello world" and unchunk.trailer == b"X-Sum: 42\r\nX-B: c\r\n\r\n"


def test_without_brotli_and_zstandard_only_gzip_is_offered_and_a_warning_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    find_spec = importlib.util.find_spec

    def without_optional(name: str, package: str | None = None) -> ModuleSpec | None:
        return None if name in ("brotli", "zstandard") else find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", without_optional)
    with caplog.at_level(logging.WARNING, "wunderproxy.compression"):
        assert available_encodings() == ("gzip",)
    assert "zstd and br not offered" in caplog.text
    assert "pip install 'wunderproxy[compress]'" in caplog.text


def test_with_every_module_all_three_are_offered_best_first(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, "wunderproxy.compression"):
        assert available_encodings() == ("zstd", "br", "gzip")
    assert not caplog.records
