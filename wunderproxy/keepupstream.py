"""``--keep-upstream``: a client's ``Connection: close`` need not close the container's.

A client that sends ``Connection: close`` (RFC 9112 section 9.6) ends its own connection
after the answer; passed on as it came, the token makes the container close the proxy's
connection too, and the next client costs the container an accept and a close, and the
proxy a connect. With ``--keep-upstream`` the head sent to the container loses the
``close`` token (the field goes when it was the only one; other tokens stay), the
container keeps the connection, and the proxy parks it for the next client; the client's
answer gets ``Connection: close`` (:func:`wunderproxy.framing.with_connection_close`,
which also drops a ``Keep-Alive`` field) and its connection is closed after it.

Left as they come: an upgrade request (one with an ``Upgrade`` field) and a ``CONNECT``
(its connection becomes the app's, to keep or close, or a tunnel), and HTTP/1.0
requests. An HTTP/1.0 client that did not ask for keep-alive closes after each answer;
its request could only keep the container's connection if it went up as HTTP/1.1, whose
answer may be chunked, which an HTTP/1.0 client cannot read. nginx sends every request
upstream as HTTP/1.0 unless configured for keep-alive, then as HTTP/1.1 with the
Connection field cleared; this keeps each request's own version and changes only the one
token.
"""

from __future__ import annotations

import re

# A Connection field line of a head already read as well-formed: every line ends in CRLF,
# so a field is CRLF, its name, a colon, and a value without CR.
_CONNECTION = re.compile(rb"\r\nconnection:([^\r]*)", re.IGNORECASE)


def without_close(head: bytes) -> bytes:
    """``head`` (a well-formed request head) without the ``close`` token of its
    Connection field(s); a field left with no token goes. Every other byte stays."""
    return _CONNECTION.sub(_without_close_token, head)


def _without_close_token(field: re.Match[bytes]) -> bytes:
    tokens = [token for token in field.group(1).split(b",") if token.strip()]
    kept = [token.strip() for token in tokens if token.strip().lower() != b"close"]
    if len(kept) == len(tokens):
        return field.group(0)
    if not kept:
        return b""
    return b"\r\nConnection: " + b", ".join(kept)
