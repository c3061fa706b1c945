"""A strict reader of request heads: one regular expression, then the framing fields.

It accepts only what every HTTP/1.1 parser reads the same way (see
:mod:`wunderproxy.fields` for the grammar and why), and refuses the rest with a
:class:`~wunderproxy.fields.HeadError` that names what is wrong. On top of the field
grammar, a request must have:

- a request line of exactly ``method SP target SP HTTP/1.0|1.1`` (RFC 9112 section 3):
  HTTP/0.9's bare ``GET /``, HTTP/2's preface (``PRI * HTTP/2.0``), extra spaces and tabs
  are refused;
- a target in origin-form (``/path``), ``*`` for OPTIONS, ``host:port`` for CONNECT, or
  ``http://`` absolute-form naming the same host as the Host field: RFC 9112 section
  3.2.2 has the absolute-form's host win over Host, so a container could be made to
  answer for a host other than the one the proxy (and its logs) saw;
- one Host field in HTTP/1.1 (RFC 9112 section 3.2), at most one in HTTP/1.0;
- at most one Content-Length, a plain decimal number, and never with Transfer-Encoding
  (RFC 9112 section 6.3: a proxy must not forward both as they are);
- Transfer-Encoding only as exactly ``chunked``, and not in HTTP/1.0 (RFC 9112 6.1);
- no body (no Content-Length over 0, no Transfer-Encoding) on CONNECT or on an upgrade
  request (``Connection: upgrade`` with an Upgrade field): llhttp switches protocols at
  the end of such a head, h11 after the body.

``tests/test_requesthead.py`` checks that h11 reads whatever this accepts the same way,
and ``benchmarks/fuzz_framing.py`` checks it against llhttp.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NoReturn

from wunderproxy.fields import (
    FALLBACK_FIELD,
    FIELD_LINES,
    TOKEN,
    HeadError,
    comma_tokens,
    content_length,
    explain,
    fields_pattern,
    stripped,
    transfer_encoding,
)

# The body is chunked (RequestHead.body_length); any other value is a length in bytes.
CHUNKED = -1

_REQUEST_LINE = rb"(" + TOKEN + rb") ([\x21-\x7e]+) HTTP/1\.([01])\r\n"
_REQUEST_LINE_RE = re.compile(_REQUEST_LINE)
_REQUEST_HEAD = re.compile(_REQUEST_LINE + FIELD_LINES)
# The fields read here: the framing ones, and the fallback mark of a peer's request.
_FRAMING_FIELD = fields_pattern(
    "content-length", "transfer-encoding", "connection", "host", "upgrade", FALLBACK_FIELD
)
_AUTHORITY = re.compile(rb"[-a-zA-Z0-9._~!$&'()*+,;=%]+:[0-9]+|\[[0-9a-fA-F:.]+\]:[0-9]+")
_HTTP_URL = re.compile(rb"http://([^/?#@]+)(?:[/?].*)?", re.IGNORECASE)


@dataclass(slots=True, init=False)  # a written __init__: mypyc compiles it, not a generated one
class RequestHead:
    """What a request head says about its message."""

    method: bytes
    target: bytes
    http_version: bytes
    body_length: int  # CHUNKED, or the Content-Length (0 when there is none)
    keep_alive: bool
    connection: bytes | None  # the Connection field(s), for the answer's reader
    upgrade: bool  # an Upgrade field was sent: a 101 answer may switch protocols
    fallback: bytes | None = None  # the X-Wunderproxy-Fallback value; b"" when sent twice

    def __init__(
        self,
        method: bytes,
        target: bytes,
        http_version: bytes,
        body_length: int,
        keep_alive: bool,
        connection: bytes | None,
        upgrade: bool,
        fallback: bytes | None = None,
    ) -> None:
        self.method = method
        self.target = target
        self.http_version = http_version
        self.body_length = body_length
        self.keep_alive = keep_alive
        self.connection = connection
        self.upgrade = upgrade
        self.fallback = fallback


def read_request_head(head: bytes) -> RequestHead:
    """Read ``head`` (request line to the blank line, both ends included)."""
    plain = _REQUEST_HEAD.fullmatch(head)
    if plain is None:
        raise HeadError(explain(head, _REQUEST_LINE_RE, "request"))
    method, target, minor = plain.group(1), plain.group(2), plain.group(3)
    length: bytes | None = None
    chunked: bytes | None = None
    connection: bytes | None = None
    host: bytes | None = None
    hosts = 0
    upgrade = False
    upgrade_field = False  # even empty: the rule below must not hang on how each parser reads one
    fallback: bytes | None = None
    for field in _FRAMING_FIELD.finditer(head):  # a loop, not a generator: the hot path
        name, value = field.group(1).lower(), field.group(2)
        if name == b"host":
            hosts += 1
            host = stripped(value)
        elif name == b"content-length":
            length = content_length(value, length)
        elif name == b"transfer-encoding":
            chunked = transfer_encoding(value, chunked)
        elif name == b"connection":
            # Several Connection fields are one comma-separated list (RFC 9110 5.3).
            value = stripped(value)
            connection = value if connection is None else connection + b", " + value
        elif name == b"upgrade":
            upgrade_field = True
            upgrade = upgrade or bool(stripped(value))
        else:
            # Two marks cannot both be the sender's own: neither counts.
            fallback = stripped(value) if fallback is None else b""
    if hosts > 1 or (hosts == 0 and minor == b"1"):
        raise HeadError("an HTTP/1.1 request needs exactly one Host field (RFC 9112 3.2)")
    if target[0] != 47 or method == b"CONNECT":  # not origin-form ("/..."), the common case
        _check_target(method, target, host)
    if chunked is not None:
        if length is not None:
            raise HeadError(
                "both Content-Length and Transfer-Encoding are set; send only one "
                "(RFC 9112 section 6.3)"
            )
        if minor == b"0":
            raise HeadError("Transfer-Encoding is not allowed in HTTP/1.0 (RFC 9112 6.1)")
    tokens = comma_tokens(connection) if connection is not None else []
    keep_alive = minor == b"1" and b"close" not in tokens
    body_length = CHUNKED if chunked is not None else int(length) if length is not None else 0
    if body_length and (method == b"CONNECT" or (upgrade_field and b"upgrade" in tokens)):
        _refuse_switching_body(method)
    return RequestHead(
        method, target, b"1." + minor, body_length, keep_alive, connection, upgrade, fallback
    )


def check_request_line(line: bytes) -> None:
    """Refuse a request line (CRLF included) as soon as it arrives, before its head ends:
    HTTP/0.9 and other speakers never send the blank line that would end the head."""
    if _REQUEST_LINE_RE.fullmatch(line) is None:
        raise HeadError(explain(line, _REQUEST_LINE_RE, "request"))


def _refuse_switching_body(method: bytes) -> NoReturn:
    """Refuse a body on a request that asks to leave HTTP: llhttp (Node.js and others)
    switches protocols at the end of such a request's head and reads the body as bytes of
    the new protocol, while h11 reads it as the request's body, so the two disagree on
    where the request ends."""
    if method == b"CONNECT":
        raise HeadError(
            "a CONNECT request has no body (RFC 9110 section 9.3.6); drop Content-Length "
            "and Transfer-Encoding, and send the bytes through the tunnel once it is open"
        )
    raise HeadError(
        "an upgrade request (Connection: upgrade with Upgrade) carries a body, which "
        "parsers read either as the request's or as the new protocol's; send it without "
        "a body, or without Upgrade"
    )


def _check_target(method: bytes, target: bytes, host: bytes | None) -> None:
    """Refuse a target in a form the method does not take (origin-form is checked first)."""
    if method == b"CONNECT":
        if _AUTHORITY.fullmatch(target) is None:
            raise HeadError(f"CONNECT target {target!r} is not host:port")
        return
    if target == b"*":
        if method != b"OPTIONS":
            raise HeadError("the target '*' is only for OPTIONS (RFC 9112 section 3.2.4)")
        return
    url = _HTTP_URL.fullmatch(target)
    if url is None:
        raise HeadError(
            f"target {target!r} is neither a path nor an http:// URL; send a path, such as /"
        )
    if host is None or url.group(1).lower() != host.lower():
        raise HeadError(
            f"the URL's host {url.group(1)!r} is not the Host field's {host!r}; "
            "send a path, such as /, with the Host field"
        )
