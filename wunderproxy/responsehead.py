"""A strict reader of response heads: how the container's answer is framed.

The client reads the answer's bytes as the container sent them, so the proxy must find
the answer's end where the client will, or the client's connection falls out of step
(response splitting). Heads are held to the grammar of :mod:`wunderproxy.fields`, and
the framing follows RFC 9112 section 6.3:

- a 1xx answer (not 101) has no body, and the final answer follows it;
- 101 switches protocols, only if the request asked for an upgrade; a 2xx answer to
  CONNECT switches too;
- an answer to HEAD, a 204 and a 304 have no body, whatever their fields say;
- else ``Transfer-Encoding: chunked`` (exactly), or a Content-Length, or the body lasts
  until the container closes the connection (which then cannot be reused).

Refused (:class:`~wunderproxy.fields.HeadError`): both Content-Length and
Transfer-Encoding, two Content-Lengths, a Transfer-Encoding other than ``chunked``,
Transfer-Encoding in HTTP/1.0, any other HTTP version, a 101 nobody asked for.
``tests/test_responsehead.py`` checks that h11 reads whatever this accepts the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from wunderproxy.fields import (
    FIELD_LINES,
    HeadError,
    comma_tokens,
    content_length,
    explain,
    fields_pattern,
    transfer_encoding,
)

# The longest head read, as h11's limit on a head (h11.DEFAULT_MAX_INCOMPLETE_EVENT_SIZE).
MAX_HEAD = 16 * 1024
# ResponseHead.body_length for a chunked body, and for one that lasts until the close.
CHUNKED = -1
UNTIL_CLOSE = -2

_STATUS_LINE = rb"HTTP/1\.([01]) ([1-9][0-9][0-9])(?: [\t\x20-\x7e\x80-\xff]*)?\r\n"
_STATUS_LINE_RE = re.compile(_STATUS_LINE)
_RESPONSE_HEAD = re.compile(_STATUS_LINE + FIELD_LINES)
_FRAMING_FIELD = fields_pattern("content-length", "transfer-encoding", "connection")


@dataclass(slots=True, init=False)  # a written __init__: mypyc compiles it, not a generated one
class ResponseHead:
    """What a head says about its message."""

    status: int
    body_length: int  # bytes, CHUNKED or UNTIL_CLOSE; 0 for a 1xx
    keep_alive: bool
    switched: bool = False  # the connection leaves HTTP after this head

    def __init__(
        self, status: int, body_length: int, keep_alive: bool, switched: bool = False
    ) -> None:
        self.status = status
        self.body_length = body_length
        self.keep_alive = keep_alive
        self.switched = switched


def read_response_head(head: bytes, method: bytes, upgrade_asked: bool) -> ResponseHead:
    """Read ``head`` (status line to the blank line, both ends included) of an answer to
    ``method``; ``upgrade_asked``: the request had an Upgrade field."""
    plain = _RESPONSE_HEAD.fullmatch(head)
    if plain is None:
        raise HeadError(explain(head, _STATUS_LINE_RE, "response"))
    status = int(plain.group(2))
    length: bytes | None = None
    chunked: bytes | None = None
    keep_alive = plain.group(1) == b"1"
    for field in _FRAMING_FIELD.finditer(head):  # a loop, not a generator: the hot path
        name, value = field.group(1).lower(), field.group(2)
        if name == b"content-length":
            length = content_length(value, length)
        elif name == b"transfer-encoding":
            chunked = transfer_encoding(value, chunked)
        elif b"close" in comma_tokens(value):
            keep_alive = False
    if chunked is not None and (length is not None or plain.group(1) == b"0"):
        raise HeadError(
            "the answer has Transfer-Encoding with Content-Length or in HTTP/1.0; "
            "clients would disagree on where it ends (RFC 9112 section 6.3)"
        )
    if status == 101:
        if not upgrade_asked:
            raise HeadError("101 Switching Protocols, but the request asked for no upgrade")
        return ResponseHead(status, 0, keep_alive, switched=True)
    if method == b"CONNECT" and 200 <= status < 300:
        return ResponseHead(status, 0, keep_alive, switched=True)
    if status < 200 or status in (204, 304) or method == b"HEAD":
        return ResponseHead(status, 0, keep_alive)
    if chunked is not None:
        return ResponseHead(status, CHUNKED, keep_alive)
    if length is None:
        return ResponseHead(status, UNTIL_CLOSE, False)
    return ResponseHead(status, int(length), keep_alive)
