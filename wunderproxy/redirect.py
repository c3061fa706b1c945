"""``--redirect-http``: the plain port sends every request to the same URL on ``https://``.

308 rather than 301: a client must repeat the request with the same method and body (RFC
9110 section 15.4.9), so a form posted to ``http://`` is posted again to ``https://``
instead of turning into a GET.
"""

from __future__ import annotations

import re

from wunderproxy.answers import Failure
from wunderproxy.fields import fields_pattern, stripped
from wunderproxy.framing import RequestStarted

_HOST_FIELD = fields_pattern("host")
# A host name or IPv4 address, or an IPv6 literal, then an optional port (RFC 9110 7.2).
# Stricter than RFC 3986's reg-name: with "/", "@", "%" or a backslash in it, a Location
# built from it could send the client to another host than the one the request named.
_HOST = re.compile(rb"([A-Za-z0-9][-A-Za-z0-9._]*|\[[0-9A-Fa-f:.]+\])(?::[0-9]*)?")
# An absolute-form target: its scheme and authority, which the Location replaces (the
# request head's reader has checked that the authority is the Host field's).
_SCHEME_AND_AUTHORITY = re.compile(rb"[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*")

# The body does not repeat the URL: it would echo the client's target into a page.
MOVED = Failure(308, "this site is served over https://; see the Location field")
NO_HOST = Failure(
    400,
    "no usable Host field: this port redirects to https:// at the host the request names, "
    "so send Host: NAME (a host name or an IP address)",
)


class Redirect:
    """The answer of the plain port to every request: 308 to ``https://HOST[:PORT]TARGET``.

    ``tls_port`` is the TLS listener's; the Location names it only when it is not 443.
    """

    def __init__(self, tls_port: int) -> None:
        self._port = b"" if tls_port == 443 else b":%d" % tls_port

    def answer(self, request: RequestStarted) -> Failure:
        """The 308 for ``request`` (its head was read and checked), or 400 without a Host."""
        field = _HOST_FIELD.search(request.data)
        host = _HOST.fullmatch(stripped(field.group(2))) if field is not None else None
        if host is None:
            return NO_HOST
        location = b"https://" + host.group(1) + self._port + _path(request.target)
        return Failure(MOVED.status, MOVED.message, b"Location: " + location + b"\r\n")


def _path(target: bytes) -> bytes:
    """The path and query of a request target: an absolute-form target without its scheme
    and authority; ``/`` for the forms that have no path (``*``, CONNECT's ``host:port``)."""
    if target.startswith(b"/"):
        return target
    authority = _SCHEME_AND_AUTHORITY.match(target)
    if authority is None:
        return b"/"
    rest = target[authority.end() :]
    return rest if rest.startswith(b"/") else b"/" + rest
