"""What the proxy tells the app about its client: ``X-Forwarded-For``, ``X-Forwarded-Proto``,
``X-Forwarded-Host`` and ``Forwarded`` (RFC 7239), as ``--forwarded`` says.

Sans-IO: a request head in, the head to send up out. Heads come from
:mod:`wunderproxy.requesthead`, which accepted them as well-formed: every line ends in CRLF
(a bare LF is refused before anything here runs), so a field is found as CRLF, its name
and a colon. Only the fields named change; every other byte of the head stays as it came.

- ``off`` (an nginx or load balancer in front sets these fields): nothing here is called.
- ``append`` (a proxy in front that is trusted, and keeps what its own client sent): the
  client's address goes at the end of the last ``X-Forwarded-For`` field, or into a new
  one; ``X-Forwarded-Proto`` is kept if the proxy in front set it, else set to the
  listener's scheme, except on the TLS listener, where it is ``https`` whatever a client
  said. Nothing else changes.
- ``replace`` (facing the internet: what a client says of itself is a forgery): every
  ``X-Forwarded-For``, ``X-Forwarded-Proto``, ``X-Forwarded-Host`` and ``Forwarded`` field the
  client sent is removed, and the proxy sets all four: ``X-Forwarded-Host`` and ``host=``
  from the request's ``Host`` (left out when an HTTP/1.0 request has none).

The client's address is written as nginx's ``$remote_addr`` is: IPv4 dotted, IPv6 bare in
``X-Forwarded-For`` and quoted in brackets in ``Forwarded`` (RFC 7239 section 6). A dual-stack
listener's IPv4-mapped address (``::ffff:192.0.2.1``) is its IPv4 address. A client of a
Unix-socket listener has no address: it is ``unknown``, RFC 7239 section 6.3's word for a
client the proxy cannot name (apps that parse ``X-Forwarded-For`` as addresses skip it).
"""

from __future__ import annotations

import ipaddress
import re

from wunderproxy.config import ForwardedMode
from wunderproxy.fields import TOKEN

# The fields ``append`` reads: X-Forwarded-For (group 1 set) or X-Forwarded-Proto; group 2 is
# the value up to the line's CR.
_APPEND_FIELDS = re.compile(rb"\r\n(?:(x-forwarded-for)|x-forwarded-proto):([^\r]*)", re.IGNORECASE)
# The fields ``replace`` removes: each line without its CRLF, which stays as the end of the
# line before.
_CLIENT_FIELDS = re.compile(
    rb"\r\n(?:x-forwarded-(?:for|proto|host)|forwarded):[^\r]*", re.IGNORECASE
)
_HOST = re.compile(rb"\r\nhost:[ \t]*([^\r]*?)[ \t]*\r", re.IGNORECASE)
_TOKEN = re.compile(TOKEN)

# What a client of a Unix-socket listener is called (RFC 7239 section 6.3).
UNKNOWN = "unknown"


class Forwarding:
    """The fields of one client connection: its address and its listener's scheme.

    Made once per connection (the address is formatted then), used for each request.
    """

    __slots__ = ("_for", "_node", "_proto", "_replace", "_tls")

    def __init__(self, mode: ForwardedMode, client: str | None, scheme: str) -> None:
        assert mode != "off", "with --forwarded off nothing is rewritten"
        address = client_address(client)
        self._replace = mode == "replace"
        self._tls = scheme == "https"
        self._proto = scheme.encode()
        self._for = address.encode()  # as X-Forwarded-For has it
        # As Forwarded has it: an IPv6 address in brackets, quoted (a colon is no token).
        self._node = f'"[{address}]"'.encode() if ":" in address else self._for

    def rewrite(self, head: bytes) -> bytes:
        """``head`` (request line to blank line) with the fields this mode sets."""
        return self._replaced(head) if self._replace else self._appended(head)

    def _appended(self, head: bytes) -> bytes:
        last_for = None
        protos = []
        for field in _APPEND_FIELDS.finditer(head):
            if field.group(1) is not None:
                last_for = field
            else:
                protos.append(field)
        edits: list[tuple[int, int, bytes]] = []
        added = b""
        if last_for is None:
            added = b"X-Forwarded-For: " + self._for + b"\r\n"
        else:
            value = last_for.group(2)
            if value.strip(b" \t"):
                end = last_for.start(2) + len(value.rstrip(b" \t"))
                edits.append((end, end, b", " + self._for))
            else:  # an empty field: the address is its value
                edits.append((last_for.start(2), last_for.end(2), b" " + self._for))
        if self._tls:
            # Whatever a client claims, this connection is TLS.
            if len(protos) != 1 or protos[0].group(2).strip(b" \t").lower() != b"https":
                edits.extend((proto.start(), proto.end(), b"") for proto in protos)
                added += b"X-Forwarded-Proto: https\r\n"
        elif not protos:
            added += b"X-Forwarded-Proto: " + self._proto + b"\r\n"
        if added:
            edits.append((len(head) - 2, len(head) - 2, added))
        return _spliced(head, edits)

    def _replaced(self, head: bytes) -> bytes:
        host = _HOST.search(head)
        kept = _CLIENT_FIELDS.sub(b"", head)
        fields = b"X-Forwarded-For: " + self._for + b"\r\nX-Forwarded-Proto: " + self._proto
        forwarded = b"\r\nForwarded: for=" + self._node + b";proto=" + self._proto
        if host is not None and host.group(1):
            value = host.group(1)
            fields += b"\r\nX-Forwarded-Host: " + value
            forwarded += b";host=" + _quoted(value)
        return kept[:-2] + fields + forwarded + b"\r\n\r\n"


def client_address(host: str | None) -> str:
    """How the fields name a client at ``host`` (a peer name's first part, or None or ""
    for a Unix socket)."""
    if not host:
        return UNKNOWN
    if host.startswith("::ffff:"):
        try:
            mapped = ipaddress.IPv6Address(host).ipv4_mapped
        except ValueError:
            mapped = None
        if mapped is not None:
            return str(mapped)
    return host


def _quoted(value: bytes) -> bytes:
    """A Forwarded parameter's value: a token as it is, anything else (a host with a port
    has a colon) as a quoted string (RFC 7239 section 4, RFC 9110 section 5.6.4)."""
    if _TOKEN.fullmatch(value) is not None:
        return value
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def _spliced(head: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    """``head`` with each ``(start, end, replacement)`` applied (edits do not overlap)."""
    if not edits:
        return head
    parts = []
    at = 0
    for start, end, replacement in sorted(edits):
        parts.append(head[at:start])
        parts.append(replacement)
        at = end
    parts.append(head[at:])
    return b"".join(parts)
