"""A fast reader of the plainest request heads, giving exactly h11's answer or none.

The twin of :mod:`wunderproxy.responsehead` for requests: a GET or a POST with a
Content-Length, well-formed header lines and one Host is read with two regular
expressions; anything else (chunked, an upgrade, CONNECT, odd bytes, an HTTP version
other than 1.0 and 1.1, a head over h11's size limit) is declined, and h11 reads it.
The rules accepted here are a strict subset of h11's (``h11._abnf.request_line``,
``h11._events.Request``, ``h11._connection._body_framing`` and ``_keep_alive``);
``tests/test_requesthead.py`` checks every verdict against h11.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from wunderproxy.responsehead import DIGITS, MAX_HEAD, PLAIN_HEADER_LINES, comma_tokens

_PLAIN_REQUEST = re.compile(
    rb"([-!#$%&'*+.^_`|~0-9a-zA-Z]+) ([\x21-\x7e]+) HTTP/1\.([01])\r\n" + PLAIN_HEADER_LINES
)
_FRAMING_FIELD = re.compile(
    rb"\r\n(content-length|transfer-encoding|connection|host|upgrade):[ \t]*([^\r]*?)[ \t]*"
    rb"(?=\r\n)",
    re.IGNORECASE,
)


@dataclass(frozen=True, slots=True)
class RequestHead:
    """What a request head says about its message."""

    method: bytes
    target: bytes
    http_version: bytes
    body_length: int
    keep_alive: bool
    connection: bytes | None  # the Connection header, for the answer's reader


def read_request_head(head: bytes) -> RequestHead | None:
    """Read ``head`` (request line to the blank line, CRLFs included); None when h11
    must decide (it may accept or refuse what this declines)."""
    if len(head) > MAX_HEAD:
        return None
    plain = _PLAIN_REQUEST.fullmatch(head)
    if plain is None:
        return None
    method, target, minor = plain.group(1), plain.group(2), plain.group(3)
    if method == b"CONNECT":
        return None
    content_length: bytes | None = None
    connection: bytes | None = None
    hosts = 0
    keep_alive = minor == b"1"
    for field in _FRAMING_FIELD.finditer(head):
        name, value = field.group(1).lower(), field.group(2)
        if name == b"host":
            hosts += 1
        elif name == b"content-length":
            if content_length is not None or DIGITS.fullmatch(value) is None:
                return None
            content_length = value
        elif name == b"connection":
            if connection is not None:
                return None  # several: h11 joins them; let it
            connection = value
            keep_alive = keep_alive and b"close" not in comma_tokens(value)
        else:  # transfer-encoding or upgrade
            return None
    if hosts > 1 or (hosts == 0 and minor == b"1"):
        return None  # h11 refuses both
    body_length = int(content_length) if content_length is not None else 0
    return RequestHead(method, target, b"1." + minor, body_length, keep_alive, connection)
