"""Sans-IO observer of HTTP/1.1 framing on one proxied client connection.

The proxy forwards bytes untouched; this module only says where each message starts and
ends, so that the forwarder can route every request to the container current when it starts
and count every response status. Nothing here knows about sockets: tests drive it with
bytes alone.

Since the bytes pass untouched, the container reads each request and the client each
answer with its own parser; where two parsers disagree on where a message ends, one of
them can be made to see a message the other does not (request smuggling). So heads and
chunked bodies are read strictly (:mod:`wunderproxy.requesthead`,
:mod:`wunderproxy.responsehead`, :mod:`wunderproxy.chunked`): only what every HTTP/1.1
parser reads alike is accepted, the rest is refused before any byte of it is handed
back to be forwarded. The tests check every reading against h11's, and
``benchmarks/fuzz_framing.py`` against llhttp's.

Every piece carries ``data``: exactly the bytes consumed for it, so that concatenating the
pieces of one direction gives back the input byte for byte.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NoReturn, TypeAlias

from wunderproxy import cycle
from wunderproxy.chunked import BodyTooLarge, ChunkedReader
from wunderproxy.config import DEFAULT_MAX_HEADER_SIZE
from wunderproxy.fields import HeadError, head_end
from wunderproxy.requesthead import CHUNKED, RequestHead, check_request_line, read_request_head
from wunderproxy.responsehead import MAX_HEAD, UNTIL_CLOSE, read_response_head


class ProtocolError(Exception):
    """One side broke HTTP/1.1; ``status_hint`` is what to answer the client, if anything."""

    def __init__(self, message: str, status_hint: int) -> None:
        super().__init__(message)
        self.status_hint = status_hint


class ClientProtocolError(ProtocolError):
    """The client sent bytes that are not valid HTTP/1.1 (answer 400, 431, ... and close)."""


class UpstreamProtocolError(ProtocolError):
    """The container sent bytes that are not a valid answer (502 if nothing was forwarded)."""


@dataclass(slots=True, init=False)  # a written __init__: mypyc compiles it, not a generated one
class RequestStarted:
    """A request head was read: route it now, then forward ``data`` (the head's bytes)."""

    method: bytes
    target: bytes
    data: bytes
    fallback: bytes | None = None  # its X-Wunderproxy-Fallback value, if it has one
    # An HTTP/1.1 request, not an upgrade or a CONNECT, whose Connection field says
    # close: the one whose head --keep-upstream rewrites (see keepupstream.py).
    closes: bool = False

    def __init__(
        self,
        method: bytes,
        target: bytes,
        data: bytes,
        fallback: bytes | None = None,
        closes: bool = False,
    ) -> None:
        self.method = method
        self.target = target
        self.data = data
        self.fallback = fallback
        self.closes = closes


@dataclass(slots=True, init=False)  # a written __init__: mypyc compiles it, not a generated one
class ResponseStarted:
    """A final (non-1xx) response head arrived from the container."""

    status: int
    data: bytes

    def __init__(self, status: int, data: bytes) -> None:
        self.status = status
        self.data = data


@dataclass(slots=True, init=False)  # a written __init__: mypyc compiles it, not a generated one
class Informational:
    """A 1xx answer other than 101, such as ``100 Continue``; the final one is still due."""

    status: int
    data: bytes

    def __init__(self, status: int, data: bytes) -> None:
        self.status = status
        self.data = data


@dataclass(slots=True, init=False)  # a written __init__: mypyc compiles it, not a generated one
class Body:
    """Bytes of a message body (chunk framing included)."""

    data: bytes

    def __init__(self, data: bytes) -> None:
        self.data = data


@dataclass(slots=True, init=False)  # a written __init__: mypyc compiles it, not a generated one
class MessageEnded:
    """The message is complete; ``data`` holds its last bytes (e.g. the final chunk)."""

    data: bytes

    def __init__(self, data: bytes) -> None:
        self.data = data


@dataclass(slots=True, init=False)  # a written __init__: mypyc compiles it, not a generated one
class ProtocolSwitched:
    """The container accepted an upgrade (101, or 2xx to CONNECT).

    ``data`` is the answer's head followed by any bytes after it; from now on both
    directions are opaque and forwarded as they come.
    """

    status: int
    data: bytes

    def __init__(self, status: int, data: bytes) -> None:
        self.status = status
        self.data = data


ClientPiece: TypeAlias = RequestStarted | Body | MessageEnded
UpstreamPiece: TypeAlias = Informational | ResponseStarted | Body | MessageEnded | ProtocolSwitched

_READING_HEAD = -3  # _ResponseReader._left while a head is being read


class _ResponseReader:
    """Reads the answer to one request, from its head (1xx heads first) to its end."""

    # One per connection: slots keep idle connections small.
    __slots__ = (
        "_buffer",
        "_chunks",
        "_left",
        "_request",
        "done",
        "keep_alive",
        "status",
        "switched",
    )

    def __init__(self, request: RequestHead) -> None:
        self._request = request
        self._buffer = bytearray()  # a head not yet whole, or chunk framing not yet read
        self._left = _READING_HEAD  # body bytes still due, or CHUNKED, or UNTIL_CLOSE
        self._chunks: ChunkedReader | None = None
        self.status = 0
        self.done = False
        self.keep_alive = True
        self.switched = False

    def feed(self, data: bytes) -> list[UpstreamPiece]:
        try:
            if self._left == _READING_HEAD:
                return self._head(data)
            return self._body(data, [])
        except HeadError as exc:
            raise UpstreamProtocolError(f"bad answer from the container: {exc}", 502) from exc

    def _head(self, data: bytes) -> list[UpstreamPiece]:
        pieces: list[UpstreamPiece] = []
        buffer = self._buffer
        if buffer:  # the start of a head came in an earlier read
            buffer += data
            received = bytes(buffer)
            buffer.clear()
        else:  # the common case: read heads in place, no copy
            received = data
        at = 0
        while True:
            end = head_end(received, at)
            if end < 0 or end - at > MAX_HEAD:
                if len(received) - at > MAX_HEAD:
                    raise HeadError(f"the answer's head is over {MAX_HEAD} bytes")
                if not data:
                    raise HeadError("the container closed the connection before answering")
                buffer += received[at:]
                return pieces
            head = received[at:end]
            at = end
            request = self._request
            found = read_response_head(head, request.method, request.upgrade)
            if found.switched:
                # 101, or a 2xx answer to CONNECT: the rest is opaque bytes.
                self.switched = self.done = True
                pieces.append(ProtocolSwitched(found.status, received[at - len(head) :]))
                return pieces
            if found.status < 200:
                pieces.append(Informational(found.status, head))
                continue
            self.status, self.keep_alive = found.status, found.keep_alive
            pieces.append(ResponseStarted(found.status, head))
            self._left = found.body_length
            if found.body_length == CHUNKED:
                self._chunks = ChunkedReader(None, MAX_HEAD)
            rest = received[at:]
            if rest or not data or found.body_length == 0:
                return self._body(rest, pieces)
            return pieces

    def _body(self, data: bytes, pieces: list[UpstreamPiece]) -> list[UpstreamPiece]:
        left = self._left
        if left > 0:
            if not data:
                raise HeadError(
                    f"the container closed the connection {left} bytes before the end of the body"
                )
            body, data = data[:left], data[left:]
            self._left = left - len(body)
            pieces.append(Body(body))
            if self._left:
                return pieces
        elif left == UNTIL_CLOSE:
            pieces.append(Body(data) if data else MessageEnded(b""))
            self.done = not data
            return pieces
        elif self._chunks is not None:
            buffer = self._buffer
            buffer += data
            taken, ending = self._chunks.read(buffer)
            if taken:
                pieces.append(Body(taken))
            if not self._chunks.done:
                if not data:
                    raise HeadError("the container closed the connection inside a chunked body")
                return pieces
            pieces.append(MessageEnded(ending))
            data = bytes(buffer)
            buffer.clear()
            return self._end(pieces, data)
        pieces.append(MessageEnded(b""))
        return self._end(pieces, data)

    def _end(self, pieces: list[UpstreamPiece], rest: bytes) -> list[UpstreamPiece]:
        self.done = True
        if rest:
            # Bytes beyond the answer: this connection is out of step; don't reuse it.
            self.keep_alive = False
        return pieces


class Exchange:
    """Framing state of one client connection and the upstream connection serving it.

    Use: feed client bytes with :meth:`client_data`; on :class:`RequestStarted` pick the
    upstream and call :meth:`request_forwarded` (or :meth:`answered_locally` when the proxy
    answers itself); feed container bytes with :meth:`upstream_data`. After a response
    ends, ``client_data(None)`` yields a pipelined request that is already buffered.
    ``b""`` means end of stream, as in h11.

    ``max_head_size`` bounds a request head (431 past it, however it arrives);
    ``max_body_size``, if set, a request body (413 at the head when Content-Length
    passes it, or when a chunked body passes it, before those bytes are handed back).

    Each direction, and the upstream connection, has a state moved along the tables of
    :mod:`wunderproxy.cycle`. A request that ends the connection leaves the bytes after
    it unread, as RFC 9112 section 9.6 asks.
    """

    # One per client connection: slots keep idle connections small.
    __slots__ = (
        "_answer",
        "_chunks",
        "_client",
        "_client_eof",
        "_close_dropped",
        "_facts",
        "_keep_alive",
        "_left",
        "_max_body",
        "_max_head",
        "_pending",
        "_response",
        "_upstream",
    )

    def __init__(
        self, max_head_size: int = DEFAULT_MAX_HEADER_SIZE, max_body_size: int | None = None
    ) -> None:
        self._max_head = max_head_size
        self._max_body = max_body_size
        self._pending = bytearray()  # client bytes not yet parsed
        self._client_eof = False
        self._client: str = cycle.IDLE
        self._answer: str = cycle.IDLE
        self._upstream: str = cycle.UNUSED
        self._keep_alive = True  # False once the client connection must close
        # The request went up without the client's Connection: close (--keep-upstream):
        # its answer may keep the upstream connection though the client's closes.
        self._close_dropped = False
        self._facts: RequestHead | None = None  # the request in progress
        self._left = 0  # of its Content-Length body
        self._chunks: ChunkedReader | None = None  # or of its chunked body
        self._response: _ResponseReader | None = None

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
        state = self._client
        if state == cycle.BODY:
            return self._read_body()
        if state == cycle.IDLE and (self._pending or self._client_eof):
            return self._read_head()
        return []  # after the request, bytes wait for its answer (or the upgrade)

    def _read_head(self) -> list[ClientPiece]:
        pending = self._pending
        end = head_end(pending)
        if end < 0 or end > self._max_head:
            if len(pending) > self._max_head:
                self._refuse(f"the request head is over {self._max_head} bytes", 431)
            line_end = pending.find(b"\n")
            try:
                if line_end >= 0:
                    check_request_line(bytes(pending[: line_end + 1]))
            except HeadError as exc:
                self._refuse(str(exc), 400)
            if self._client_eof and pending:
                self._refuse("the client closed the connection inside a request head", 400)
            return []  # the rest of the head is still on its way
        head = bytes(pending[:end])
        try:
            found = read_request_head(head)
        except HeadError as exc:
            self._refuse(str(exc), 400)
        length = found.body_length
        if self._max_body is not None and length > self._max_body:
            self._refuse(
                f"the request body ({length} bytes) is over the {self._max_body}-byte limit",
                413,
            )
        del pending[:end]
        self._client = cycle.advance(cycle.CLIENT, self._client, "head")
        self._facts = found
        self._keep_alive = self._keep_alive and found.keep_alive
        self._close_dropped = False
        if length == CHUNKED:
            self._chunks = ChunkedReader(self._max_body, self._max_head)
        else:
            self._left = length
        # An upgrade's or a CONNECT's connection becomes the app's (a tunnel after a 2xx):
        # its Connection field goes up as it came (see keepupstream.py).
        closes = (
            not found.keep_alive
            and found.http_version == b"1.1"
            and not found.upgrade
            and found.method != b"CONNECT"
        )
        return [
            RequestStarted(found.method, found.target, head, found.fallback, closes),
            *self._read_body(),
        ]

    def _read_body(self) -> list[ClientPiece]:
        pending = self._pending
        chunks = self._chunks
        if chunks is not None:
            # One name per exception type: compiled, a name has one type per function, and
            # a HeadError would be refused where BodyTooLarge was bound (see native.py).
            try:
                taken, ending = chunks.read(pending)
            except BodyTooLarge as too_large:
                self._refuse(str(too_large), 413)
            except HeadError as broken:
                self._refuse(f"bad chunked body: {broken}", 400)
            pieces: list[ClientPiece] = [Body(taken)] if taken else []
            if not chunks.done:
                if self._client_eof:
                    self._refuse("the client closed the connection inside the body", 400)
                return pieces
            self._chunks = None
            return self._request_ended(MessageEnded(ending), pieces)
        pieces = []
        if self._left:
            if not pending:
                if self._client_eof:
                    self._refuse("the client closed the connection inside the body", 400)
                return pieces
            chunk = bytes(pending[: self._left])
            del pending[: len(chunk)]
            self._left -= len(chunk)
            pieces.append(Body(chunk))
            if self._left:
                return pieces
        return self._request_ended(MessageEnded(b""), pieces)

    def _request_ended(self, last: MessageEnded, pieces: list[ClientPiece]) -> list[ClientPiece]:
        pieces.append(last)
        self._client = cycle.advance(cycle.CLIENT, self._client, "end")
        self._end_cycle_if_done()
        if self._client == cycle.IDLE and self._pending:  # answered early: go on
            try:
                return pieces + self._read_head()
            except ClientProtocolError:
                # The end of the request that just ended is lost with this error, and
                # its upstream connection waits for it: never reuse that connection.
                self._upstream = cycle.advance(cycle.UPSTREAM, self._upstream, "spend")
                raise
        return pieces

    def _refuse(self, message: str, status: int) -> NoReturn:
        """The client broke HTTP/1.1 (or a limit): nothing more is read from it."""
        if self._client == cycle.BODY:
            # Part of a request went up: the container waits for the rest of it.
            self._upstream = cycle.advance(cycle.UPSTREAM, self._upstream, "spend")
        self._client = cycle.advance(cycle.CLIENT, self._client, "error")
        self._keep_alive = False
        raise ClientProtocolError(message, status)

    def request_forwarded(self, fresh_upstream: bool) -> None:
        """The current request goes upstream; ``fresh_upstream``: on a new connection."""
        facts = self._facts
        if facts is None:
            raise cycle.StateError("request_forwarded() before RequestStarted")
        if fresh_upstream:
            self._upstream = cycle.advance(cycle.UPSTREAM, self._upstream, "fresh")
        elif self._upstream in (cycle.UNUSED, cycle.REUSABLE):
            self._upstream = cycle.advance(cycle.UPSTREAM, self._upstream, "forward")
        else:
            raise UpstreamProtocolError("upstream connection not reusable", 502)
        resend = fresh_upstream and self._answer == cycle.WAITING
        self._answer = cycle.advance(cycle.ANSWER, self._answer, "resend" if resend else "forward")
        self._response = _ResponseReader(facts)

    def close_dropped(self) -> None:
        """The current request goes up without its client's ``Connection: close``
        (--keep-upstream): the upstream connection outlives the client's if its answer
        keeps it alive."""
        self._close_dropped = True

    def answered_locally(self, status: int, close: bool) -> None:
        """The proxy answered the current request itself (503, 502): sync the client side.

        After the request went up, that means the container failed before answering: its
        connection is spent.
        """
        if self._answer == cycle.WAITING:
            self._upstream = cycle.advance(cycle.UPSTREAM, self._upstream, "spend")
            self._response = None
        self._answer = cycle.advance(cycle.ANSWER, self._answer, "local")
        self._keep_alive = self._keep_alive and not close
        self._end_cycle_if_done()

    # -- upstream side -------------------------------------------------------------

    def upstream_data(self, data: bytes) -> list[UpstreamPiece]:
        """Feed bytes from the container (``b""``: it closed the connection)."""
        if self._answer != cycle.WAITING:
            if self._answer == cycle.SWITCHED:
                return []
            self._upstream = cycle.advance(cycle.UPSTREAM, self._upstream, "spend")
            if data:
                # An answer nobody asked for (e.g. a 408 on an idle keep-alive
                # connection): this connection must not carry another request.
                raise UpstreamProtocolError(
                    "the container sent data while no request was pending", 502
                )
            return []
        reader = self._response
        assert reader is not None
        try:
            pieces = reader.feed(data)
        except UpstreamProtocolError:
            self._upstream = cycle.advance(cycle.UPSTREAM, self._upstream, "spend")
            raise
        if reader.switched:
            self._answer = cycle.advance(cycle.ANSWER, self._answer, "switch")
            self._client = cycle.advance(cycle.CLIENT, self._client, "switch")
        elif reader.done:
            self._answer = cycle.advance(cycle.ANSWER, self._answer, "end")
            keep = reader.keep_alive and self._keep_alive
            self._keep_alive = keep
            # Once the request's body has gone up too, the connection is reusable.
            kept = reader.keep_alive and (keep or self._close_dropped)
            self._upstream = cycle.advance(
                cycle.UPSTREAM, self._upstream, "keep" if kept else "spend"
            )
            self._end_cycle_if_done()
        return pieces

    # -- state ---------------------------------------------------------------------

    @property
    def switched(self) -> bool:
        """True once the connection left HTTP (upgrade accepted): bytes flow opaque."""
        return self._client == cycle.SWITCHED

    @property
    def must_close(self) -> bool:
        """True when the client connection cannot carry another request."""
        return not self._keep_alive

    @property
    def upstream_reusable(self) -> bool:
        """True when the upstream connection may carry the next request (keep-alive)."""
        return self._upstream in (cycle.UNUSED, cycle.REUSABLE)

    @property
    def request_in_progress(self) -> bool:
        """True between a request's head and the end of its answer."""
        return self._client in (cycle.BODY, cycle.DONE, cycle.SWITCHED)

    @property
    def idle(self) -> bool:
        """True between requests with no byte of the next one received yet."""
        return self._client in (cycle.IDLE, cycle.CLOSED) and not self._pending

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

    def _end_cycle_if_done(self) -> None:
        if self._client != cycle.DONE or self._answer != cycle.ANSWERED:
            return
        if self._upstream == cycle.KEPT:
            self._upstream = cycle.advance(cycle.UPSTREAM, self._upstream, "next")
        self._answer = cycle.advance(cycle.ANSWER, self._answer, "next")
        self._client = cycle.advance(
            cycle.CLIENT, self._client, "next" if self._keep_alive else "last"
        )
        self._facts = None
        self._response = None


def with_connection_close(head: bytes) -> bytes:
    """A response head (one the reader accepted: every line ends in CRLF) that says
    ``Connection: close``, whatever it said before.

    For an answer that is its connection's last while the container did not say so
    (shutting down; --keep-upstream; a compressed answer delimited by the close): a
    keep-alive client must learn it, or it may send its next request into a connection
    that is being closed. A ``Keep-Alive`` field goes too (RFC 9112 section 9.6: it
    means nothing on a closing connection). Every other byte stays.
    """
    return _CONNECTION_LINE.sub(b"", head[:-2]) + b"Connection: close\r\n\r\n"


# A Connection or Keep-Alive field line, without its CRLF, in a well-formed head (no
# whitespace before a colon, no CR in a value): one pass over the head, no split.
_CONNECTION_LINE = re.compile(rb"\r\n(?:connection|keep-alive):[^\r]*", re.IGNORECASE)
