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
from collections.abc import Callable

from wunderproxy.config import ForwardedMode

# The fields read, as they start a line of a lower-cased head (which has no other CR).
_FOR = b"\r\nx-forwarded-for:"
_PROTO = b"\r\nx-forwarded-proto:"
_HOST = b"\r\nhost:"
# The fields ``replace`` removes: each line without its CRLF, which stays as the end of the
# line before.
_CLIENT_FIELDS = re.compile(
    rb"\r\n(?:x-forwarded-(?:for|proto|host)|forwarded):[^\r]*", re.IGNORECASE
)
# The bytes a token is made of (RFC 9110 section 5.6.2).
_TCHARS = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"

# What a client of a Unix-socket listener is called (RFC 7239 section 6.3).
UNKNOWN = "unknown"


class Forwarding:
    """The fields of one client connection: its address and its listener's scheme.

    Made once per connection, when everything that does not change from one request to the
    next is written; ``rewrite(head)`` then gives a request's head with the fields this
    mode sets. Fields are found with ``bytes.find`` on the lower-cased head: regular
    expressions that ignore case cost twice as many instructions per request.
    """

    __slots__ = (
        "_after_for",
        "_as_for",
        "_for_field",
        "_forwarded",
        "_host",
        "_host_fields",
        "_own",
        "_proto_field",
        "_tls",
        "rewrite",
    )

    def __init__(self, mode: ForwardedMode, client: str | None, scheme: str) -> None:
        assert mode != "off", "with --forwarded off nothing is rewritten"
        address = client_address(client)
        self._tls = scheme == "https"
        proto = scheme.encode()
        client_for = address.encode()  # as X-Forwarded-For has it
        # As Forwarded has it: an IPv6 address in brackets, quoted (a colon is no token).
        node = f'"[{address}]"'.encode() if ":" in address else client_for
        self._after_for = b", " + client_for  # appended to a list
        self._as_for = b" " + client_for  # the value of a field that had none
        self._for_field = b"X-Forwarded-For: " + client_for + b"\r\n"
        self._proto_field = b"X-Forwarded-Proto: " + proto + b"\r\n"
        self._own = self._for_field + self._proto_field
        self._forwarded = b"Forwarded: for=" + node + b";proto=" + proto
        self._host = b""  # the last request's Host, and the fields replace set for it
        self._host_fields = self._fields_for(b"")
        # The mode's method itself: one call less per request than a method that picks it.
        self.rewrite: Callable[[bytes], bytes] = (
            self._replaced if mode == "replace" else self._appended
        )

    def _appended(self, head: bytes) -> bytes:
        lowered = head.lower()
        edits = []
        added = b""
        if lowered.find(_PROTO) < 0:
            added = self._proto_field
        elif self._tls:  # whatever a client claims, this connection is TLS
            protos = _lines(lowered, _PROTO)
            start, end = protos[0]
            if len(protos) > 1 or head[start + len(_PROTO) : end].strip(b" \t").lower() != b"https":
                edits = [(start, end, b"") for start, end in protos]
                added = self._proto_field
        last_for = lowered.rfind(_FOR)
        if last_for < 0:
            added = self._for_field + added
        else:
            start = last_for + len(_FOR)
            end = head.find(b"\r", start)
            value = head[start:end].rstrip(b" \t")
            if value.lstrip(b" \t"):
                start = end = start + len(value)
                insert = self._after_for
            else:  # an empty field: the address is its value
                insert = self._as_for
            if not edits and not added:  # behind a proxy that sets both: the common case
                return head[:start] + insert + head[end:]
            edits.append((start, end, insert))
        if not edits:  # nothing to change in place: the common case without a proxy
            return head[:-2] + added + b"\r\n"
        if added:
            edits.append((len(head) - 2, len(head) - 2, added))
        return _spliced(head, edits)

    def _replaced(self, head: bytes) -> bytes:
        lowered = head.lower()
        kept = head
        if b"\r\nx-forwarded-" in lowered or b"\r\nforwarded:" in lowered:
            kept = _CLIENT_FIELDS.sub(b"", head)
        at = lowered.find(_HOST)
        host = b""
        if at >= 0:
            start = at + len(_HOST)
            host = head[start : head.find(b"\r", start)].strip(b" \t")
        if host != self._host:  # a connection's requests mostly name one host
            self._host = host
            self._host_fields = self._fields_for(host)
        return kept[:-2] + self._host_fields

    def _fields_for(self, host: bytes) -> bytes:
        """What ``replace`` puts at the end of a head whose Host is ``host``."""
        if not host:  # HTTP/1.0 may have none
            return self._own + self._forwarded + b"\r\n\r\n"
        return b"".join(
            (
                self._own,
                b"X-Forwarded-Host: ",
                host,
                b"\r\n",
                self._forwarded,
                b";host=",
                _quoted(host),
                b"\r\n\r\n",
            )
        )


def _lines(lowered: bytes, start: bytes) -> list[tuple[int, int]]:
    """Where each field line beginning with ``start`` is: from its CRLF to its CR."""
    found = []
    at = lowered.find(start)
    while at >= 0:
        end = lowered.find(b"\r", at + 2)
        found.append((at, end))
        at = lowered.find(start, end)
    return found


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
    if value and not value.translate(None, _TCHARS):
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
