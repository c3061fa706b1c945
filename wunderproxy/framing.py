"""Sans-IO observer of HTTP/1.1 framing on one proxied client connection.

The proxy forwards bytes untouched; this module only says where each message starts and
ends, so that the forwarder can route every request to the container current when it starts
and count every response status. Nothing here knows about sockets: tests drive it with
bytes alone.

Watching both directions takes two h11 connections: a server-role one for the bytes the
client sends and a client-role one for the bytes the container answers. Each must be told
what the other saw: the container side must know the request method (a response to ``HEAD``
has no body) and whether an upgrade was asked for, and the client side must know when the
response ended, or it would never parse the next (pipelined) request. We tell each side
with small synthetic events whose serialised bytes are thrown away.

Every piece carries ``data``: exactly the bytes h11 consumed for it, so that concatenating
the pieces of one direction gives back the input byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

import h11

# Request headers the container-side parser needs to see: they decide keep-alive and
# whether a 101 / CONNECT answer switches protocols (RFC 9110 section 7.8).
_HEADERS_THAT_SHAPE_THE_RESPONSE = (b"connection", b"upgrade")

_CLOSED_STATES = (h11.MUST_CLOSE, h11.CLOSED, h11.ERROR)


class ProtocolError(Exception):
    """One side broke HTTP/1.1; ``status_hint`` is what to answer the client, if anything."""

    def __init__(self, message: str, status_hint: int) -> None:
        super().__init__(message)
        self.status_hint = status_hint


class ClientProtocolError(ProtocolError):
    """The client sent bytes that are not valid HTTP/1.1 (answer 400, 431, ... and close)."""


class UpstreamProtocolError(ProtocolError):
    """The container sent bytes that are not a valid answer (502 if nothing was forwarded)."""


@dataclass(frozen=True, slots=True)
class RequestStarted:
    """A request head was read: route it now, then forward ``data`` (the head's bytes)."""

    method: bytes
    target: bytes
    data: bytes


@dataclass(frozen=True, slots=True)
class ResponseStarted:
    """A final (non-1xx) response head arrived from the container."""

    status: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Informational:
    """A 1xx answer other than 101, such as ``100 Continue``; the final one is still due."""

    status: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Body:
    """Bytes of a message body (chunk framing included)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class MessageEnded:
    """The message is complete; ``data`` holds its last bytes (e.g. the final chunk)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class ProtocolSwitched:
    """The container accepted an upgrade (101, or 2xx to CONNECT).

    ``data`` is the answer's head followed by any bytes after it; from now on both
    directions are opaque and forwarded as they come.
    """

    status: int
    data: bytes


ClientPiece: TypeAlias = RequestStarted | Body | MessageEnded
UpstreamPiece: TypeAlias = Informational | ResponseStarted | Body | MessageEnded | ProtocolSwitched


class _Parser:
    """An h11 connection plus a copy of the bytes it has not consumed yet.

    h11 does not hand back the raw bytes behind an event; comparing the size of its
    buffer before and after each event tells how many of ours it used.
    """

    def __init__(self, role: type[h11.CLIENT] | type[h11.SERVER]) -> None:
        self.conn = h11.Connection(role)
        self._unconsumed = bytearray()

    def receive(self, data: bytes) -> None:
        self.conn.receive_data(data)
        self._unconsumed += data

    def next_event(self) -> tuple[h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED], bytes]:
        event = self.conn.next_event()
        used = len(self._unconsumed) - len(self.conn.trailing_data[0])
        raw = bytes(self._unconsumed[:used])
        del self._unconsumed[:used]
        return event, raw

    def leftover(self) -> bytes:
        return bytes(self._unconsumed)

    @property
    def has_unconsumed(self) -> bool:
        return bool(self._unconsumed)


class Exchange:
    """Framing state of one client connection and the upstream connection serving it.

    Use: feed client bytes with :meth:`client_data`; on :class:`RequestStarted` pick the
    upstream and call :meth:`request_forwarded` (or :meth:`answered_locally` when the proxy
    answers itself); feed container bytes with :meth:`upstream_data`. After a response
    ends, ``client_data(None)`` yields a pipelined request that is already buffered.
    ``b""`` means end of stream, as in h11.
    """

    def __init__(self) -> None:
        self._client = _Parser(h11.SERVER)
        self._upstream = _Parser(h11.CLIENT)
        self._synthetic_request: h11.Request | None = None
        self._status = 0
        self._switched = False

    # -- client side ---------------------------------------------------------------

    def client_data(self, data: bytes | None) -> list[ClientPiece]:
        """Feed bytes from the client (``None``: only parse what is buffered)."""
        pieces: list[ClientPiece] = []
        conn = self._client.conn
        if self._switched or conn.their_state in _CLOSED_STATES:
            # After a request that closes the connection, anything more is ignored
            # (RFC 9112 section 9.6): the connection ends after this answer.
            return pieces
        if data is not None:
            self._client.receive(data)
        while True:
            try:
                event, raw = self._client.next_event()
            except h11.RemoteProtocolError as exc:
                raise ClientProtocolError(str(exc), exc.error_status_hint) from exc
            if isinstance(event, h11.Request):
                _refuse_ambiguous_framing(event)
                self._synthetic_request = _synthetic_request_for(event)
                pieces.append(RequestStarted(event.method, event.target, raw))
            elif isinstance(event, h11.Data):
                pieces.append(Body(raw))
            elif isinstance(event, h11.EndOfMessage):
                pieces.append(MessageEnded(raw))
                self._next_cycle_if_done()
                if conn.their_state in _CLOSED_STATES:
                    return pieces
            else:  # NEED_DATA, PAUSED (waiting for the answer), or ConnectionClosed.
                if raw:  # chunk framing h11 consumed without an event
                    pieces.append(Body(raw))
                return pieces

    def request_forwarded(self, fresh_upstream: bool) -> None:
        """The current request goes upstream; ``fresh_upstream``: on a new connection."""
        if fresh_upstream:
            self._upstream = _Parser(h11.CLIENT)
        request = self._synthetic_request
        assert request is not None, "request_forwarded() before RequestStarted"
        try:
            self._upstream.conn.send(request)
            self._upstream.conn.send(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:
            raise UpstreamProtocolError(f"upstream connection not reusable: {exc}", 502) from exc

    def answered_locally(self, status: int, close: bool) -> None:
        """The proxy answered the current request itself (503, 502): sync the client side."""
        self._tell_client_response_ended(status, close)
        self._next_cycle_if_done()

    # -- upstream side -------------------------------------------------------------

    def upstream_data(self, data: bytes) -> list[UpstreamPiece]:
        """Feed bytes from the container (``b""``: it closed the connection)."""
        pieces: list[UpstreamPiece] = []
        if self._switched:
            return pieces
        upstream = self._upstream
        if data and upstream.conn.our_state is h11.IDLE:
            # An answer nobody asked for (e.g. a 408 on an idle keep-alive connection):
            # this connection is out of step and must not carry another request.
            raise UpstreamProtocolError("the container sent data while no request was pending", 502)
        upstream.receive(data)
        while True:
            try:
                event, raw = upstream.next_event()
            except h11.RemoteProtocolError as exc:
                raise UpstreamProtocolError(str(exc), 502) from exc
            switching = upstream.conn.their_state is h11.SWITCHED_PROTOCOL
            if isinstance(event, h11.InformationalResponse | h11.Response) and switching:
                # 101, or a 2xx answer to CONNECT: the rest is opaque bytes.
                self._switched = True
                pieces.append(ProtocolSwitched(event.status_code, raw + upstream.leftover()))
                return pieces
            if isinstance(event, h11.InformationalResponse):
                pieces.append(Informational(event.status_code, raw))
            elif isinstance(event, h11.Response):
                self._status = event.status_code
                pieces.append(ResponseStarted(event.status_code, raw))
            elif isinstance(event, h11.Data):
                pieces.append(Body(raw))
            elif isinstance(event, h11.EndOfMessage):
                pieces.append(MessageEnded(raw))
                close = upstream.conn.their_state in _CLOSED_STATES
                self._tell_client_response_ended(self._status, close)
                self._next_cycle_if_done()
            else:  # NEED_DATA, PAUSED, or ConnectionClosed between responses.
                if raw:  # chunk framing h11 consumed without an event
                    pieces.append(Body(raw))
                return pieces

    # -- state ---------------------------------------------------------------------

    @property
    def switched(self) -> bool:
        """True once the connection left HTTP (upgrade accepted): bytes flow opaque."""
        return self._switched

    @property
    def must_close(self) -> bool:
        """True when the client connection cannot carry another request."""
        conn = self._client.conn
        return conn.our_state in _CLOSED_STATES or conn.their_state in _CLOSED_STATES

    @property
    def upstream_reusable(self) -> bool:
        """True when the upstream connection may carry the next request (keep-alive)."""
        conn = self._upstream.conn
        return conn.our_state is h11.IDLE and conn.their_state is h11.IDLE

    @property
    def request_in_progress(self) -> bool:
        """True between a request's head and the end of its answer."""
        conn = self._client.conn
        return conn.our_state in (h11.SEND_RESPONSE, h11.SEND_BODY) or (
            conn.their_state is h11.SEND_BODY
        )

    @property
    def idle(self) -> bool:
        """True between requests with no byte of the next one received yet."""
        return not self.request_in_progress and not self._client.has_unconsumed

    def take_client_leftover(self) -> bytes:
        """Client bytes received after the upgrade request; forward them upstream raw."""
        return self._client.leftover()

    # -- internals -----------------------------------------------------------------

    def _tell_client_response_ended(self, status: int, close: bool) -> None:
        headers = [(b"connection", b"close")] if close else []
        self._client.conn.send(h11.Response(status_code=status, headers=headers))
        self._client.conn.send(h11.EndOfMessage())

    def _next_cycle_if_done(self) -> None:
        client, upstream = self._client.conn, self._upstream.conn
        if client.our_state is h11.DONE and client.their_state is h11.DONE:
            client.start_next_cycle()
            if upstream.our_state is h11.DONE and upstream.their_state is h11.DONE:
                upstream.start_next_cycle()


def _refuse_ambiguous_framing(request: h11.Request) -> None:
    """Refuse a request with both Content-Length and Transfer-Encoding.

    RFC 9112 section 6.3: a proxy must not forward such a message as it is, since the
    container might frame it by Content-Length where we framed it as chunked (request
    smuggling). Bytes pass through untouched here, so the request is refused.
    """
    names = {name for name, _ in request.headers}
    if b"content-length" in names and b"transfer-encoding" in names:
        raise ClientProtocolError(
            "both Content-Length and Transfer-Encoding are set; send only one", 400
        )


def _synthetic_request_for(request: h11.Request) -> h11.Request:
    """What the container-side parser must know of a request: its method and its wishes."""
    headers = [(b"host", b"upstream")]
    headers += [(n, v) for n, v in request.headers if n in _HEADERS_THAT_SHAPE_THE_RESPONSE]
    if request.http_version == b"1.0":
        # h11 never keeps an HTTP/1.0 connection alive; the container side must agree.
        headers.append((b"connection", b"close"))
    return h11.Request(method=request.method, target=request.target, headers=headers)


def with_connection_close(head: bytes) -> bytes:
    """A response head that says ``Connection: close``, whatever it said before.

    The one change the proxy makes to bytes it forwards, and only while shutting down:
    a keep-alive client must learn that this answer is the connection's last, or it may
    send its next request into a connection that is being closed.
    """
    lines = head.split(b"\r\n")
    kept = [line for line in lines[1:-2] if line.split(b":", 1)[0].strip().lower() != b"connection"]
    return b"\r\n".join([lines[0], *kept, b"Connection: close", b"", b""])
