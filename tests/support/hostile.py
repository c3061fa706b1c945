"""Request-smuggling and desync vectors: bytes a client may send to make the proxy and the
server behind it disagree on where requests start and end.

Every one must be refused with 400 before any byte of it is forwarded. Shared by the
framing unit tests (bytes alone) and the smuggling table (real sockets, a naive backend).
"""

from __future__ import annotations


def head(line: str, *fields: str, body: bytes = b"") -> bytes:
    """A request head, CRLF line ends, fields as given (no Host added), then ``body``."""
    return "\r\n".join([line, *fields, "", ""]).encode("latin-1") + body


HIDDEN = head("GET /hidden HTTP/1.1", "Host: app")
CHUNKED = "Transfer-Encoding: chunked"
UPGRADE_FIELDS = ("Connection: Upgrade", "Upgrade: websocket")


def post(*fields: str, body: bytes = b"") -> bytes:
    return head("POST / HTTP/1.1", "Host: app", *fields, body=body)


# A chunk whose size, read into 64 bits, wraps around to 0xa: a server that does so reads
# ten bytes of data, the final chunk, then the hidden request as the next one.
OVERFLOWING_CHUNK = b"1" + b"0" * 16 + b"a\r\n0123456789\r\n0\r\n\r\n" + HIDDEN

REFUSED: dict[str, bytes] = {
    "content-length-and-chunked": post("Content-Length: 6", CHUNKED, body=b"0\r\n\r\nX"),
    "chunked-and-content-length": post(CHUNKED, "Content-Length: 6", body=b"0\r\n\r\nX"),
    "te-xchunked": post("Transfer-Encoding: xchunked", body=b"0\r\n\r\n"),
    "te-chunked-identity": post("Transfer-Encoding: chunked, identity", body=b"0\r\n\r\n"),
    "te-gzip-chunked": post("Transfer-Encoding: gzip, chunked", body=b"0\r\n\r\n"),
    "te-two-spaces": post("Transfer-Encoding:  chunked", body=b"0\r\n\r\n"),
    "te-tab": post("Transfer-Encoding:\tchunked", body=b"0\r\n\r\n"),
    "te-vertical-tab": post("Transfer-Encoding:\x0bchunked", body=b"0\r\n\r\n"),
    "te-trailing-space": post("Transfer-Encoding: chunked ", body=b"0\r\n\r\n"),
    "te-twice": post(CHUNKED, "Transfer-Encoding: identity", body=b"0\r\n\r\n"),
    "te-in-http-1.0": head("POST / HTTP/1.0", CHUNKED, body=b"0\r\n\r\n"),
    "te-space-before-colon": post("Transfer-Encoding : chunked", body=b"0\r\n\r\n"),
    "te-folded": post("X: y", " Transfer-Encoding: chunked", body=b"0\r\n\r\n"),
    "two-differing-content-lengths": post("Content-Length: 3", "Content-Length: 5", body=b"abc"),
    "two-equal-content-lengths": post("Content-Length: 3", "Content-Length: 3", body=b"abc"),
    "content-length-list": post("Content-Length: 3, 3", body=b"abc"),
    "content-length-plus": post("Content-Length: +3", body=b"abc"),
    "content-length-minus": post("Content-Length: -1", body=b"abc"),
    "content-length-spaces-inside": post("Content-Length: 1 0", body=b"abc"),
    "content-length-hex": post("Content-Length: 0x3", body=b"abc"),
    "content-length-19-digits": post("Content-Length: 1" + "0" * 18),
    "content-length-tab": post("Content-Length:\t3", body=b"abc"),
    # A naive server reads the folded line as a field of its own: Content-Length 0, then
    # the first request's body as a second request.
    "obs-fold-hidden-request": post(
        f"Content-Length: {len(HIDDEN)}", "X: y", " Content-Length: 0", body=HIDDEN
    ),
    "bare-cr-in-head": b"GET / HTTP/1.1\r\nHost: app\rX: y\r\n\r\n",
    "bare-lf-line-ends": b"GET / HTTP/1.1\nHost: app\n\n",
    "bare-lf-on-one-line": b"GET / HTTP/1.1\r\nHost: app\nX: y\r\n\r\n",
    "nul-in-value": head("GET / HTTP/1.1", "Host: app", "X: a\x00b"),
    "nul-in-name": head("GET / HTTP/1.1", "Host: app", "X\x00Y: a"),
    "control-byte-in-value": head("GET / HTTP/1.1", "Host: app", "X: a\x01b"),
    "del-in-value": head("GET / HTTP/1.1", "Host: app", "X: a\x7fb"),
    "space-before-colon": head("GET / HTTP/1.1", "Host : app"),
    "request-line-two-spaces": head("GET  / HTTP/1.1", "Host: app"),
    "request-line-tab": head("GET\t/ HTTP/1.1", "Host: app"),
    "request-line-trailing-space": head("GET / HTTP/1.1 ", "Host: app"),
    "http-0.9": b"GET /\r\n",
    "http-2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "absolute-form-other-host": head("GET http://other/ HTTP/1.1", "Host: app"),
    "absolute-form-https": head("GET https://app/ HTTP/1.1", "Host: app"),
    "chunk-size-18-hex-digits-hidden-request": post(CHUNKED, body=OVERFLOWING_CHUNK),
    "chunk-size-with-sign": post(CHUNKED, body=b"+5\r\nhello\r\n0\r\n\r\n"),
    "chunk-extension-bare-cr": post(CHUNKED, body=b"5;a=b\rX\r\nhello\r\n0\r\n\r\n"),
    "chunk-extension-quoted": post(CHUNKED, body=b'5;a="b"\r\nhello\r\n0\r\n\r\n'),
    "chunk-size-bare-lf": post(CHUNKED, body=b"5\nhello\r\n0\r\n\r\n"),
    "chunk-data-longer-than-its-size": post(CHUNKED, body=b"3\r\nhello\r\n0\r\n\r\n"),
    "trailer-folded": post(CHUNKED, body=b"0\r\nX: a\r\n b\r\n\r\n"),
    # RFC 9110 section 6.5.1: framing fields in a trailer are not framing; llhttp refuses
    # them, a server that merges trailers into the head may frame by them.
    "trailer-content-length": post(CHUNKED, body=b"0\r\nContent-Length: 5\r\n\r\nhello"),
    "trailer-transfer-encoding": post(CHUNKED, body=b"0\r\ntransfer-encoding: chunked\r\n\r\n"),
    # llhttp switches protocols at the end of an upgrade request's head, or a CONNECT's,
    # and reads the body as the new protocol's bytes; h11 reads it as the request's body:
    # the two disagree on where the request ends.
    "upgrade-with-content-length": head(
        "GET /ws HTTP/1.1",
        "Host: app",
        *UPGRADE_FIELDS,
        f"Content-Length: {len(HIDDEN)}",
        body=HIDDEN,
    ),
    "upgrade-with-chunked-body": head(
        "GET /ws HTTP/1.1",
        "Host: app",
        "Connection: keep-alive, upgrade",
        "Upgrade: h2c",
        CHUNKED,
        body=b"5\r\nhello\r\n0\r\n\r\n",
    ),
    "connect-with-content-length": head(
        "CONNECT app:443 HTTP/1.1", "Host: app:443", f"Content-Length: {len(HIDDEN)}", body=HIDDEN
    ),
    "connect-with-chunked-body": head(
        "CONNECT app:443 HTTP/1.1", "Host: app:443", CHUNKED, body=b"5\r\nhello\r\n0\r\n\r\n"
    ),
}
