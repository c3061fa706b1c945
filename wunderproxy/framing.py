"""Sans-IO observer of HTTP/1.1 framing on one proxied client connection.

The proxy forwards bytes untouched; this module only says where each message starts and
ends, so that the forwarder can route every request to the container current when it starts
and count every response status. Nothing here knows about sockets: tests drive it with
bytes alone.

Requests are read by h11 (a fresh server-role connection per request). Answers are read
by :mod:`wunderproxy.responsehead` when their head is plain (status line, Content-Length),
which is most of them and much cheaper; anything else goes to an h11 client-role
connection that was shown the request (a response to ``HEAD`` has no body; a 101 only
switches protocols if an upgrade was asked for) through a synthetic request whose bytes
are thrown away. The two paths agree: the tests check the fast one against h11.

Every piece carries ``data``: exactly the bytes consumed for it, so that concatenating the
pieces of one direction gives back the input byte for byte.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TypeAlias

import h11

from wunderproxy.requesthead import read_request_head
from wunderproxy.responsehead import MAX_HEAD, comma_tokens, read_response_head

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


@dataclass(slots=True)  # not frozen: a frozen __init__ costs twice as much
class RequestStarted:
    """A request head was read: route it now, then forward ``data`` (the head's bytes)."""

    method: bytes
    target: bytes
    data: bytes


@dataclass(slots=True)  # not frozen: a frozen __init__ costs twice as much
class ResponseStarted:
    """A final (non-1xx) response head arrived from the container."""

    status: int
    data: bytes


@dataclass(slots=True)  # not frozen: a frozen __init__ costs twice as much
class Informational:
    """A 1xx answer other than 101, such as ``100 Continue``; the final one is still due."""

    status: int
    data: bytes


@dataclass(slots=True)  # not frozen: a frozen __init__ costs twice as much
class Body:
    """Bytes of a message body (chunk framing included)."""

    data: bytes


@dataclass(slots=True)  # not frozen: a frozen __init__ costs twice as much
class MessageEnded:
    """The message is complete; ``data`` holds its last bytes (e.g. the final chunk)."""

    data: bytes


@dataclass(slots=True)  # not frozen: a frozen __init__ costs twice as much
class ProtocolSwitched:
    """The container accepted an upgrade (101, or 2xx to CONNECT).

    ``data`` is the answer's head followed by any bytes after it; from now on both
    directions are opaque and forwarded as they come.
    """

    status: int
    data: bytes


ClientPiece: TypeAlias = RequestStarted | Body | MessageEnded
UpstreamPiece: TypeAlias = Informational | ResponseStarted | Body | MessageEnded | ProtocolSwitched


def _buffered(conn: h11.Connection) -> int:
    """How many received bytes ``conn`` has not consumed yet.

    ``trailing_data`` would tell, but copies them on every call; this is the hot path of
    every request. ``tests/test_framing.py`` checks that both agree.
    """
    return len(conn._receive_buffer)


class _H11Reader:
    """An h11 connection plus the bytes it has not consumed yet.

    h11 does not hand back the raw bytes behind an event; comparing the size of its
    buffer before and after each event tells how many of ours it used.
    """

    # One per connection that needed h11: slots keep it small.
    __slots__ = (
        "_unconsumed",
        "conn",
    )

    def __init__(self, role: type[h11.CLIENT] | type[h11.SERVER]) -> None:
        self.conn = h11.Connection(role)
        self._unconsumed = bytearray()

    def receive(self, data: bytes) -> None:
        self.conn.receive_data(data)
        self._unconsumed += data

    def next_event(self) -> tuple[h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED], bytes]:
        event = self.conn.next_event()
        used = len(self._unconsumed) - _buffered(self.conn)
        raw = bytes(self._unconsumed[:used])
        del self._unconsumed[:used]
        return event, raw

    def leftover(self) -> bytes:
        return bytes(self._unconsumed)


@dataclass(frozen=True, slots=True)
class _RequestFacts:
    """What the answer's reader must know of the request it answers."""

    method: bytes
    target: bytes
    http_version: bytes
    keep_alive: bool
    shaping_headers: tuple[tuple[bytes, bytes], ...]  # Connection and Upgrade


@dataclass(slots=True)
class _PlainBody:
    """A plain request's Content-Length body, as it arrives."""

    remaining: int


class _ResponseReader:
    """Reads the answer to one request: the fast path, else h11.

    The fast path (:func:`~wunderproxy.responsehead.read_response_head`) reads plain heads
    with a Content-Length; whatever it declines is handed, with every byte not yet
    consumed, to an h11 client connection that was shown the request.
    """

    # One per connection: slots keep idle connections small.
    __slots__ = (
        "_h11",
        "_head",
        "_remaining",
        "_request",
        "done",
        "keep_alive",
        "status",
        "switched",
    )

    def __init__(self, request: _RequestFacts) -> None:
        self._request = request
        self._head = bytearray()
        self._remaining = -1  # body bytes still due; -1 while reading a head
        self._h11: _H11Reader | None = None
        self.status = 0
        self.done = False
        self.keep_alive = True
        self.switched = False

    def feed(self, data: bytes) -> list[UpstreamPiece]:
        if self._h11 is not None:
            return self._feed_h11(data)
        pieces: list[UpstreamPiece] = []
        if self._remaining > 0:
            if not data:
                raise UpstreamProtocolError(
                    f"the container closed the connection {self._remaining} bytes before "
                    "the end of the body",
                    502,
                )
            body, data = data[: self._remaining], data[self._remaining :]
            self._remaining -= len(body)
            pieces.append(Body(body))
            if self._remaining == 0:
                return self._end(pieces, data)
            return pieces
        self._head += data
        while True:
            end = _BLANK_LINE.search(self._head)
            if end is None:
                if not data or len(self._head) > MAX_HEAD:
                    return pieces + self._hand_to_h11(data)
                return pieces
            head = bytes(self._head[: end.end()])
            found = read_response_head(head, self._request.method)
            if found is None:
                return pieces + self._hand_to_h11(data)
            rest = bytes(self._head[end.end() :])
            self._head.clear()
            if found.status < 200:
                pieces.append(Informational(found.status, head))
                self._head += rest
                continue
            self.status, self.keep_alive = found.status, found.keep_alive
            pieces.append(ResponseStarted(found.status, head))
            self._remaining = found.body_length
            if self._remaining == 0:
                return self._end(pieces, rest)
            return pieces + self.feed(rest) if rest else pieces

    def _end(self, pieces: list[UpstreamPiece], rest: bytes) -> list[UpstreamPiece]:
        pieces.append(MessageEnded(b""))
        self.done = True
        self._remaining = 0
        if rest:
            # Bytes beyond the answer: this connection is out of step; don't reuse it.
            self.keep_alive = False
        return pieces

    def _hand_to_h11(self, data: bytes) -> list[UpstreamPiece]:
        reader = self._h11 = _H11Reader(h11.CLIENT)
        # Built only here: few answers need h11, and building it costs.
        reader.conn.send(_synthetic_request_for(self._request))
        reader.conn.send(h11.EndOfMessage())
        unconsumed = bytes(self._head)
        self._head.clear()
        pieces = self._feed_h11(unconsumed) if unconsumed else []
        if not data:  # the end of the stream is news to h11 as well
            pieces += self._feed_h11(b"")
        return pieces

    def _feed_h11(self, data: bytes) -> list[UpstreamPiece]:
        reader = self._h11
        assert reader is not None
        pieces: list[UpstreamPiece] = []
        reader.receive(data)
        while not self.done:
            try:
                event, raw = reader.next_event()
            except h11.RemoteProtocolError as exc:
                raise UpstreamProtocolError(str(exc), 502) from exc
            state = reader.conn.their_state
            if isinstance(event, h11.InformationalResponse | h11.Response) and (
                state is h11.SWITCHED_PROTOCOL
            ):
                # 101, or a 2xx answer to CONNECT: the rest is opaque bytes.
                self.switched = self.done = True
                pieces.append(ProtocolSwitched(event.status_code, raw + reader.leftover()))
            elif isinstance(event, h11.InformationalResponse):
                pieces.append(Informational(event.status_code, raw))
            elif isinstance(event, h11.Response):
                self.status = event.status_code
                pieces.append(ResponseStarted(event.status_code, raw))
            elif isinstance(event, h11.Data):
                pieces.append(Body(raw))
            elif isinstance(event, h11.EndOfMessage):
                pieces.append(MessageEnded(raw))
                self.done = True
                # Bytes beyond the answer put the connection out of step, as in _end. An
                # answer that the container ended by closing (no length) tells the client
                # its end only if the client's connection closes too.
                self.keep_alive = (
                    bool(data) and state not in _CLOSED_STATES and not reader.leftover()
                )
            else:  # NEED_DATA, or ConnectionClosed before any answer.
                if raw:  # chunk framing h11 consumed without an event
                    pieces.append(Body(raw))
                return pieces
        return pieces


class Exchange:
    """Framing state of one client connection and the upstream connection serving it.

    Use: feed client bytes with :meth:`client_data`; on :class:`RequestStarted` pick the
    upstream and call :meth:`request_forwarded` (or :meth:`answered_locally` when the proxy
    answers itself); feed container bytes with :meth:`upstream_data`. After a response
    ends, ``client_data(None)`` yields a pipelined request that is already buffered.
    ``b""`` means end of stream, as in h11.

    Each request gets a fresh h11 server connection: cheaper than telling a long-lived one
    about every answer, and a request that ends the connection leaves the bytes after it
    unread, as RFC 9112 section 9.6 asks.
    """

    # One per client connection: slots keep idle connections small.
    __slots__ = (
        "_answered",
        "_client_eof",
        "_facts",
        "_keep_upstream",
        "_must_close",
        "_pending",
        "_request",
        "_request_done",
        "_response",
        "_switched",
        "_upstream_reusable",
    )

    def __init__(self) -> None:
        self._pending = bytearray()  # client bytes not yet given to a request parser
        self._client_eof = False
        self._request: _H11Reader | _PlainBody | None = None  # the request in progress
        self._facts: _RequestFacts | None = None
        self._request_done = False
        self._response: _ResponseReader | None = None
        self._answered = False
        self._must_close = False
        self._upstream_reusable = True  # no upstream connection has been used yet
        self._keep_upstream = False
        self._switched = False

    # -- client side ---------------------------------------------------------------

    def buffer_client_data(self, data: bytes) -> None:
        """Keep client bytes for later, unparsed (``b""``: the client closed)."""
        if data:
            self._pending += data
        else:
            self._client_eof = True

    def client_data(self, data: bytes | None) -> list[ClientPiece]:
        """Feed bytes from the client (``None``: only parse what is buffered)."""
        if data is not None:
            self.buffer_client_data(data)
        if self._switched or self._request_done:
            return []  # after the request, bytes wait for its answer (or the upgrade)
        reader = self._request
        if reader is None:
            if self._must_close or not (self._pending or self._client_eof):
                return []
            plain = self._read_plain_request()
            if plain is not None:
                return plain
            reader = self._request = _H11Reader(h11.SERVER)
        if isinstance(reader, _PlainBody):
            return self._read_plain_body(reader)
        if self._pending:
            reader.receive(bytes(self._pending))
            self._pending.clear()
        if self._client_eof:
            reader.receive(b"")
        pieces: list[ClientPiece] = []
        while True:
            try:
                event, raw = reader.next_event()
            except h11.RemoteProtocolError as exc:
                self._must_close = True
                raise ClientProtocolError(str(exc), exc.error_status_hint) from exc
            if isinstance(event, h11.Request):
                self._facts = _facts_of(event)
                self._answered = False
                pieces.append(RequestStarted(event.method, event.target, raw))
            elif isinstance(event, h11.Data):
                pieces.append(Body(raw))
            elif isinstance(event, h11.EndOfMessage):
                pieces.append(MessageEnded(raw))
                self._request_done = True
                self._pending[:0] = reader.leftover()  # the next request's bytes
                self._end_cycle_if_done()
                if self._facts is None and self._pending:  # answered early: go on
                    return pieces + self.client_data(None)
                return pieces
            else:  # NEED_DATA, or ConnectionClosed between requests.
                if raw:  # chunk framing h11 consumed without an event
                    pieces.append(Body(raw))
                if event is not h11.NEED_DATA:
                    self._request = None
                return pieces

    def _read_plain_request(self) -> list[ClientPiece] | None:
        """Read a plain request head without h11; None when h11 must read it."""
        pending = self._pending
        end = _BLANK_LINE.search(pending)
        if end is None:
            if self._client_eof or len(pending) > MAX_HEAD:
                return None
            return []  # the rest of the head is still on its way
        head = bytes(pending[: end.end()])
        found = read_request_head(head)
        if found is None:
            return None
        del pending[: end.end()]
        shaping = ((b"connection", found.connection),) if found.connection else ()
        self._facts = _RequestFacts(
            found.method, found.target, found.http_version, found.keep_alive, shaping
        )
        self._answered = False
        body = self._request = _PlainBody(found.body_length)
        return [RequestStarted(found.method, found.target, head), *self._read_plain_body(body)]

    def _read_plain_body(self, body: _PlainBody) -> list[ClientPiece]:
        pieces: list[ClientPiece] = []
        if body.remaining:
            if not self._pending:
                if self._client_eof:
                    self._must_close = True
                    raise ClientProtocolError(
                        "the client closed the connection before the end of the body", 400
                    )
                return pieces
            chunk = bytes(self._pending[: body.remaining])
            del self._pending[: len(chunk)]
            body.remaining -= len(chunk)
            pieces.append(Body(chunk))
            if body.remaining:
                return pieces
        pieces.append(MessageEnded(b""))
        self._request_done = True
        self._end_cycle_if_done()
        if self._facts is None and self._pending:  # answered early: go on
            return pieces + self.client_data(None)
        return pieces

    def request_forwarded(self, fresh_upstream: bool) -> None:
        """The current request goes upstream; ``fresh_upstream``: on a new connection."""
        facts = self._facts
        assert facts is not None, "request_forwarded() before RequestStarted"
        if not fresh_upstream and not self._upstream_reusable:
            raise UpstreamProtocolError("upstream connection not reusable", 502)
        self._upstream_reusable = False
        self._response = _ResponseReader(facts)

    def answered_locally(self, status: int, close: bool) -> None:
        """The proxy answered the current request itself (503, 502): sync the client side."""
        self._answered = True
        self._must_close = self._must_close or close or not self._keep_alive_requested()
        self._end_cycle_if_done()

    # -- upstream side -------------------------------------------------------------

    def upstream_data(self, data: bytes) -> list[UpstreamPiece]:
        """Feed bytes from the container (``b""``: it closed the connection)."""
        if self._switched:
            return []
        reader = self._response
        if reader is None or reader.done:
            self._upstream_reusable = False
            if data:
                # An answer nobody asked for (e.g. a 408 on an idle keep-alive
                # connection): this connection must not carry another request.
                raise UpstreamProtocolError(
                    "the container sent data while no request was pending", 502
                )
            return []
        pieces = reader.feed(data)
        if reader.switched:
            self._switched = True
        elif reader.done:
            self._answered = True
            keep_alive = reader.keep_alive and self._keep_alive_requested()
            self._must_close = self._must_close or not keep_alive
            self._keep_upstream = keep_alive  # once the request's body has gone up too
            self._end_cycle_if_done()
        return pieces

    # -- state ---------------------------------------------------------------------

    @property
    def switched(self) -> bool:
        """True once the connection left HTTP (upgrade accepted): bytes flow opaque."""
        return self._switched

    @property
    def must_close(self) -> bool:
        """True when the client connection cannot carry another request."""
        return self._must_close

    @property
    def upstream_reusable(self) -> bool:
        """True when the upstream connection may carry the next request (keep-alive)."""
        return self._upstream_reusable

    @property
    def request_in_progress(self) -> bool:
        """True between a request's head and the end of its answer."""
        return self._facts is not None and not (self._request_done and self._answered)

    @property
    def idle(self) -> bool:
        """True between requests with no byte of the next one received yet."""
        return not self.request_in_progress and not self._pending and self._request is None

    @property
    def has_buffered_bytes(self) -> bool:
        """True when client bytes wait to be parsed (a pipelined request, or its start)."""
        return bool(self._pending)

    def take_client_leftover(self) -> bytes:
        """Client bytes received after the upgrade request; forward them upstream raw."""
        leftover = bytes(self._pending)
        self._pending.clear()
        return leftover

    # -- internals -----------------------------------------------------------------

    def _keep_alive_requested(self) -> bool:
        return self._facts is not None and self._facts.keep_alive

    def _end_cycle_if_done(self) -> None:
        if self._request_done and self._answered:
            if self._response is not None:
                self._upstream_reusable = self._keep_upstream
            self._request = None
            self._facts = None
            self._response = None
            self._request_done = False


_BLANK_LINE = re.compile(rb"\n\r?\n")  # where h11 ends a head (h11._receivebuffer)


def _facts_of(request: h11.Request) -> _RequestFacts:
    """Keep-alive and the method, in one pass over the headers.

    A request with both Content-Length and Transfer-Encoding is refused: RFC 9112
    section 6.3 has a proxy remove Content-Length before forwarding it, since the container
    might frame the body by it where we framed it as chunked (request smuggling); bytes
    pass through untouched here, so refusing is the only safe answer.
    """
    keep_alive = request.http_version == b"1.1"
    has_length = has_transfer_encoding = False
    shaping = []
    for name, value in request.headers:
        if name in _HEADERS_THAT_SHAPE_THE_RESPONSE:
            shaping.append((name, value))
        if name == b"connection":
            keep_alive = keep_alive and b"close" not in comma_tokens(value)
        elif name == b"content-length":
            has_length = True
        elif name == b"transfer-encoding":
            has_transfer_encoding = True
    if has_length and has_transfer_encoding:
        raise ClientProtocolError(
            "both Content-Length and Transfer-Encoding are set; send only one", 400
        )
    return _RequestFacts(
        request.method, request.target, request.http_version, keep_alive, tuple(shaping)
    )


def _synthetic_request_for(request: _RequestFacts) -> h11.Request:
    """What the container-side parser must know of a request: its method and its wishes."""
    headers = [(b"host", b"upstream"), *request.shaping_headers]
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
