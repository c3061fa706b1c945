"""The answers the proxy gives on its own, and the one table of what fails with which status.

The proxy only writes bytes of its own when it cannot forward a request, and always before any
byte of an upstream answer. Every such case is a :class:`Failure` below, so that one place
says which status a client sees for what (as kamal-proxy's ``target.go`` does for its errors).
Refusals of bad HTTP carry their status from the framing observer (400, 413, 431).
"""

from __future__ import annotations

from dataclasses import dataclass

_REASONS = {
    308: "Permanent Redirect",
    400: "Bad Request",
    408: "Request Timeout",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    499: "Client Closed Request",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


@dataclass(frozen=True, slots=True)
class Failure:
    """Why the proxy could not forward a request: the status and what the client is told
    (``fields``: header lines of its own, each ending in CRLF, such as a redirect's
    Location)."""

    status: int
    message: str
    fields: bytes = b""


NO_CONTAINER = Failure(503, "no container is deployed yet")
UNREACHABLE = Failure(502, "the app container is unreachable")
CONNECT_TIMEOUT = Failure(504, "the app container did not accept a connection in time")
NO_ANSWER = Failure(502, "the app container failed to answer")
UPSTREAM_TIMEOUT = Failure(504, "the app container did not answer in time")
HEADER_TIMEOUT = Failure(408, "the request head did not arrive in time")
BODY_TIMEOUT = Failure(408, "the request body stopped arriving")
TOO_MANY_CONNECTIONS = Failure(503, "too many connections")
# --buffer-requests could not store a body (its disk is full, or --buffer-dir is gone): the
# condition is the host's and passes, and a load balancer may send the request elsewhere.
BUFFER_FAILED = Failure(503, "the proxy has no room to hold the request body; try again later")
# A peer sent this request here because its own container was down: it is never sent on.
FALLBACK_NO_CONTAINER = Failure(502, "fallback request found no container")


def plain_response(
    status: int, message: str, close: bool, fields: bytes = b"", head_only: bool = False
) -> bytes:
    """A short plain-text answer the proxy sends on its own (``fields``: more header lines,
    each ending in CRLF; ``head_only``: the answer to a HEAD request, which has no body)."""
    body = (message + "\n").encode()
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n" + ("Connection: close\r\n" if close else "")
    )
    return head.encode() + fields + b"\r\n" + (b"" if head_only else body)
