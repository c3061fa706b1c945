"""A fast reader of the plainest response heads, giving exactly h11's answer or none.

Running h11 over every response costs more CPU than everything else the proxy does for a
small request. Most answers are plain: a status line, well-formed header lines, a
``Content-Length`` and no ``Transfer-Encoding``. For those, reading the status, the body
length and the keep-alive decision takes one regular expression per line. Anything else
(chunked, read-until-close, 101, obsolete line folding, odd bytes, a head over h11's size
limit) is declined, and h11 reads it.

The rules accepted here are a strict subset of h11's (``h11._abnf``, ``h11._readers``,
``h11._connection._body_framing`` and ``_keep_alive``); ``tests/test_responsehead.py``
checks the same verdicts against h11 on the framing test vectors and on generated heads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# h11's limit on a head that has not arrived whole (h11.DEFAULT_MAX_INCOMPLETE_EVENT_SIZE).
MAX_HEAD = 16 * 1024

# A whole head in the subset of h11's grammar read here (one C-level match instead of one
# per line): HTTP/1.0 or 1.1, visible ASCII, CRLF line ends, no obsolete line folding.
PLAIN_HEADER_LINES = (
    rb"(?:[-!#$%&'*+.^_`|~0-9a-zA-Z]+:[ \t]*(?:[\x21-\x7e]+(?:[ \t]+[\x21-\x7e]+)*)?[ \t]*\r\n)*"
    rb"\r\n"
)
_PLAIN_HEAD = re.compile(
    rb"HTTP/1\.([01]) ([1-9][0-9][0-9])(?: [\t\x20-\x7e]*)?\r\n" + PLAIN_HEADER_LINES
)
# The fields that frame the message, in a head already matched by _PLAIN_HEAD.
_FRAMING_FIELD = re.compile(
    rb"\r\n(content-length|transfer-encoding|connection):[ \t]*([^\r]*?)[ \t]*(?=\r\n)",
    re.IGNORECASE,
)
DIGITS = re.compile(rb"[0-9]+")


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """What a head says about its message: status, body length, keep-alive."""

    status: int
    body_length: int
    keep_alive: bool


def read_response_head(head: bytes, method: bytes) -> ResponseHead | None:
    """Read ``head`` (status line to the blank line, CRLFs included) of an answer to
    ``method``; None when h11 must decide (it may accept or refuse what this declines).

    A 1xx head (not 101) comes back with ``body_length`` 0: the final answer follows.
    """
    if len(head) > MAX_HEAD or method == b"CONNECT":
        return None
    plain = _PLAIN_HEAD.fullmatch(head)
    if plain is None:
        return None
    status = int(plain.group(2))
    if status == 101:
        return None
    content_length: bytes | None = None
    keep_alive = plain.group(1) == b"1"
    for field in _FRAMING_FIELD.finditer(head):
        name, value = field.group(1).lower(), field.group(2)
        if name == b"content-length":
            if content_length is not None or DIGITS.fullmatch(value) is None:
                return None
            content_length = value
        elif name == b"transfer-encoding":
            return None
        elif b"close" in comma_tokens(value):
            keep_alive = False
    if status < 200 or status in (204, 304) or method == b"HEAD":
        return ResponseHead(status, 0, keep_alive)
    if content_length is None:
        return None  # delimited by the end of the connection
    return ResponseHead(status, int(content_length), keep_alive)


def comma_tokens(value: bytes) -> list[bytes]:
    """A comma-separated header value as h11 reads it: lower-cased, stripped, non-empty."""
    return [token.strip().lower() for token in value.split(b",") if token.strip()]
