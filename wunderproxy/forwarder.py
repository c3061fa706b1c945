"""One client connection of the proxy: route each request, splice its bytes, count it.

The client's bytes are fed to the framing observer; at each request head the connection
asks :class:`~wunderproxy.state.ProxyState` which container serves *now* and sends the
request there, reusing the upstream connection while it is to the same container and
kept alive. The container's answer is copied back as it arrives. Bytes are forwarded
exactly as received; the proxy only writes bytes of its own when it answers by itself
(400, 502, 503), and then always before any byte of an upstream answer.

Both sides are asyncio protocols: bytes are handled in the callback that receives them.
Streams would add a task wake-up and a future to every read and every answer, which cost
more CPU per request than all the framing does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import cast

from wunderproxy import framing
from wunderproxy.accesslog import CLIENT_CLOSED_REQUEST, AccessLog
from wunderproxy.state import Container, ProxyState
from wunderproxy.streams import LINGER
from wunderproxy.traffic import NO_REVISION

log = logging.getLogger("wunderproxy.proxy")

# A request sent on a kept-alive upstream connection is kept (up to this size) until its
# answer begins, so that it can be sent again if the container had just closed that
# connection: the keep-alive race every proxy meets (RFC 9112 section 9.3.1).
REPLAY_LIMIT = 64 * 1024
# Idle connections kept open to a container for the next client connection (nginx's
# upstream keepalive default in its documentation's example).
MAX_SPARE = 64
# Methods that may be sent twice (RFC 9110 section 9.2.2).
IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))

_REASONS = {
    400: "Bad Request",
    408: "Request Timeout",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


# What the access log shows of a request that could not be read.
_UNREADABLE_REQUEST = framing.RequestStarted(method=b"-", target=b"-", data=b"")


def plain_response(status: int, message: str, close: bool) -> bytes:
    """A short plain-text answer the proxy sends on its own."""
    body = (message + "\n").encode()
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n" + ("Connection: close\r\n" if close else "") + "\r\n"
    )
    return head.encode() + body


class _Upstream(asyncio.Protocol):
    """One connection to a container, serving one client connection at a time.

    It is a :class:`~wunderproxy.state.Link` of its container, so that a drain can close
    it between requests, or cut it (with its upgraded client) at the drain deadline.
    When its client leaves, a kept-alive connection waits in the container's ``spare``
    list for the next client connection: opening one per client costs the container an
    accept and a close, and us a connect.
    """

    # Slots: one of these per client connection, so its size counts in memory per connection.
    __slots__ = ("busy", "client", "container", "ended", "transport", "upgraded")

    def __init__(self, client: ClientConnection, container: Container) -> None:
        self.client: ClientConnection | None = client
        self.container = container
        self.transport: asyncio.Transport | None = None
        # Made for a request: busy from the start, or a drain could close it while it
        # is still being connected.
        self.busy = True
        self.upgraded = False
        self.ended = False
        container.links.add(self)

    @property
    def idle(self) -> bool:
        return not self.busy and not self.upgraded

    def close(self) -> None:
        self._forget()
        if self.transport is not None:
            self.transport.close()
        if self.upgraded and self.client is not None:
            self.client.close()  # an upgraded client has no other way to go on

    def park(self) -> None:
        """Keep this idle connection for another client, or close it if not wanted."""
        container = self.container
        transport = self.transport
        if (
            self.ended
            or transport is None
            or transport.is_closing()
            or container.state != "serving"
            or len(container.spare) >= MAX_SPARE
        ):
            self.close()
            return
        self.client = None
        self.busy = False
        transport.resume_reading()
        container.spare.append(self)

    def _forget(self) -> None:
        self.container.links.discard(self)
        if self in self.container.spare:
            self.container.spare.remove(self)

    def write(self, data: bytes) -> None:
        if self.transport is not None and data:
            self.transport.write(data)

    # -- asyncio.Protocol --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self.client is None:
            self.ended = True  # a spare connection is talked to: out of step
            self.close()
            return
        self.client.upstream_data(self, data)

    def eof_received(self) -> bool:
        if self.client is None:
            self.ended = True
            self._forget()
        else:
            self.client.upstream_ended(self, "the container closed the connection")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget()
        if self.upgraded:
            self.upgraded = False
            self.container.upgrade_finished()
        if self.client is not None:
            self.client.upstream_ended(self, str(exc) if exc else "the connection was closed")

    def pause_writing(self) -> None:  # the container reads an upload slower than it comes
        if self.client is not None:
            self.client.pause_reading("upstream")

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.resume_reading("upstream")


class ClientConnection(asyncio.Protocol):
    """Serves one accepted client connection until either side closes it."""

    # Slots: thousands of idle connections are held, and a dict per instance is most of
    # what each one costs in Python.
    __slots__ = (
        "_access_log",
        "_answer_begun",
        "_answering",
        "_body_target",
        "_bytes_in",
        "_bytes_out",
        "_client_eof",
        "_client_host",
        "_closed",
        "_closing",
        "_discarding",
        "_exchange",
        "_held",
        "_keepalive_timeout",
        "_last_active",
        "_loop",
        "_on_close",
        "_paused_for",
        "_replay",
        "_request",
        "_request_received",
        "_routed_to",
        "_started_at",
        "_state",
        "_status",
        "_transport",
        "_upstream",
    )

    def __init__(
        self,
        state: ProxyState,
        keepalive_timeout: float,
        on_close: Callable[[ClientConnection], None] | None = None,
        access_log: AccessLog | None = None,
    ) -> None:
        self._state = state
        self._access_log = access_log
        self._client_host: str | None = None  # only looked up for the access log
        self._keepalive_timeout = keepalive_timeout
        self._on_close = on_close
        self._loop = asyncio.get_running_loop()
        self._last_active = self._loop.time()
        self._transport: asyncio.Transport | None = None
        self._exchange = framing.Exchange()
        self._upstream: _Upstream | None = None
        self._paused_for: set[str] = set()
        self._closed = False
        self._closing = False  # shutting down: this answer is the connection's last
        self._discarding = False  # a refused request: drop what the client still sends
        self._client_eof = False
        # Per request: where it went, when it started, whether its answer has begun.
        self._routed_to: Container | None = None
        self._request: framing.RequestStarted | None = None
        self._status = 0  # of the answer, once it begins
        self._bytes_in = 0
        self._bytes_out = 0
        self._started_at = 0.0
        self._answer_begun = False
        self._answering = False  # a request is counted as active
        self._request_received = False
        self._body_target: _Upstream | None = None
        self._held: list[framing.ClientPiece] = []  # pieces waiting for a connection
        self._replay: bytearray | None = None

    # -- lifecycle -----------------------------------------------------------------

    def close(self) -> None:
        """Close the client connection (after what was written is sent)."""
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        """Close both sides now (shutdown deadline passed)."""
        self._closing = True
        if self._upstream is not None:
            self._upstream.close()
        self.close()

    def close_when_idle(self, grace: float) -> None:
        """Shutdown: close between requests, without losing one.

        A busy connection closes after its answer, which tells the client
        ``Connection: close``. An idle one is given ``grace`` seconds in which a request
        the client may be sending right now is still served (and told the same).
        """
        self._closing = True
        if self._exchange.idle:
            self._loop.call_later(grace, self._close_if_idle)

    def _close_if_idle(self) -> None:
        if self._exchange.idle:
            self.close()

    def expire_if_idle(self, now: float) -> bool:
        """Close the connection if it has been idle past the keep-alive timeout.

        Called for every connection by one periodic sweep: cheaper than a timer armed and
        cancelled around every read.
        """
        if self._exchange.idle and now - self._last_active > self._keepalive_timeout:
            self.close()
            return True
        return False

    def pause_reading(self, reason: str) -> None:
        """Stop reading from the client until every ``reason`` given is resumed."""
        if not self._paused_for and self._transport is not None and not self._closed:
            self._transport.pause_reading()
        self._paused_for.add(reason)

    def resume_reading(self, reason: str) -> None:
        self._paused_for.discard(reason)
        if not self._paused_for and self._transport is not None and not self._closed:
            self._transport.resume_reading()

    # -- asyncio.Protocol: the client side -------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._state.open_connections += 1
        if self._access_log is not None:
            peer = transport.get_extra_info("peername")
            self._client_host = peer[0] if isinstance(peer, tuple) else None

    def data_received(self, data: bytes) -> None:
        self._last_active = self._loop.time()
        if self._discarding:
            return
        if self._exchange.switched:
            if self._upstream is not None:
                self._upstream.write(data)
            return
        self._receive(data)

    def eof_received(self) -> bool:
        if self._exchange.switched:
            if self._upstream is not None and self._upstream.transport is not None:
                self._upstream.transport.write_eof()
            return True
        if self._discarding:
            return False  # it read our 400 and left: close (its parser is spent)
        self._client_eof = True
        self._receive(b"")
        # A client that half-closed after a whole request still gets its answer.
        return self._answering and self._request_received and not self._closed

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._finish_request()
        upstream, self._upstream = self._upstream, None
        if upstream is not None:
            if self._exchange.upstream_reusable and upstream.idle:
                upstream.park()
            else:
                upstream.close()
        self._state.open_connections -= 1
        if self._on_close is not None:
            self._on_close(self)

    def pause_writing(self) -> None:  # the client reads an answer slower than it comes
        if self._upstream is not None and self._upstream.transport is not None:
            self._upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self._upstream is not None and self._upstream.transport is not None:
            self._upstream.transport.resume_reading()

    # -- client to container -------------------------------------------------------

    def _receive(self, data: bytes | None) -> None:
        """Parse what the client sent (None: what is buffered) and forward it."""
        if self._held:  # a connection to the container is being made: wait for it
            if data is not None:
                self._exchange.buffer_client_data(data)
            return
        try:
            pieces = self._exchange.client_data(data)
        except framing.ClientProtocolError as exc:
            self._refuse(exc)
            return
        self._forward(pieces)

    def _forward(self, pieces: list[framing.ClientPiece]) -> None:
        for index, piece in enumerate(pieces):
            if isinstance(piece, framing.RequestStarted) and not self._start_request(
                piece, pieces[index + 1 :]
            ):
                return  # the rest waits for the new upstream connection
            self._send(piece)
        self._hold_pipelined_requests()

    def _hold_pipelined_requests(self) -> None:
        """Stop reading while pipelined requests wait for the answer to this one.

        Only then: pausing costs two system calls, and most clients send nothing more
        before the answer.
        """
        if self._answering and self._request_received and self._exchange.has_buffered_bytes:
            self.pause_reading("answer")

    def _send(self, piece: framing.ClientPiece) -> None:
        if piece is not self._request:  # a request head is counted as it starts
            self._bytes_in += len(piece.data)
        target = self._body_target
        if target is not None and piece.data:
            if self._replay is not None:
                self._replay += piece.data
                if len(self._replay) > REPLAY_LIMIT:
                    self._replay = None
            target.write(piece.data)
        if isinstance(piece, framing.MessageEnded):
            self._request_received = True
            self._body_target = None
            if not self._answering and self._exchange.must_close:
                self.close()  # a request we answered ourselves, on a closing connection

    def _start_request(
        self, piece: framing.RequestStarted, rest: list[framing.ClientPiece]
    ) -> bool:
        """Route the request that just started to the container serving now.

        False when a connection to the container must be made first: ``piece`` and
        ``rest`` are then forwarded once it is.
        """
        state = self._state
        state.request_started()
        self._request = piece
        self._status = 0
        # The head is counted here: an answer of the proxy's own is counted before it
        # is passed on (or dropped).
        self._bytes_in, self._bytes_out = len(piece.data), 0
        self._started_at = self._loop.time()
        self._answer_begun = False
        self._request_received = False
        self._answering = True
        state.active_connections += 1
        container = state.current
        if container is None:
            self._answer_locally(503, "no container is deployed yet", close=False)
            return True
        # Counted before any wait: a drain starting meanwhile must wait for this request.
        container.request_started()
        self._routed_to = container
        upstream = self._upstream
        if (
            upstream is not None
            and upstream.container is container
            and self._exchange.upstream_reusable
            and not upstream.ended
        ):
            self._forward_to(upstream, fresh=False, method=piece.method, reused=True)
            return True
        if upstream is not None:
            upstream.close()
            self._upstream = None
        spare = _take_spare(container)
        if spare is not None:
            spare.client = self
            spare.busy = True
            self._upstream = spare
            self._forward_to(spare, fresh=True, method=piece.method, reused=True)
            return True
        self._held = [piece, *rest]
        self.pause_reading("connecting")
        self._loop.create_task(self._connect(container, piece.method))
        return False

    def _forward_to(self, upstream: _Upstream, fresh: bool, method: bytes, reused: bool) -> None:
        """Send the current request on ``upstream`` (``fresh``: new to this client;
        ``reused``: it carried requests before, so the container may have closed it)."""
        upstream.busy = True
        self._body_target = upstream
        self._replay = bytearray() if reused and method in IDEMPOTENT else None
        self._exchange.request_forwarded(fresh_upstream=fresh)

    async def _connect(self, container: Container, method: bytes) -> None:
        """Open a connection to ``container`` for the held request, then send it."""
        try:
            _, upstream = await self._loop.create_connection(
                lambda: _Upstream(self, container), container.host, container.port
            )
        except OSError as exc:
            log.warning(
                "container %s at %s:%d unreachable: %s",
                container.container_id[:12],
                container.host,
                container.port,
                exc,
            )
            held, self._held = self._held, []
            self.resume_reading("connecting")
            self._answer_locally(502, "the app container is unreachable", close=False)
            for piece in held[1:]:
                self._send(piece)  # a body of the refused request is dropped
            self._receive(None)
            return
        if self._closed:
            upstream.close()
            return
        self._upstream = upstream
        held, self._held = self._held, []
        self._forward_to(upstream, fresh=True, method=method, reused=False)
        for piece in held:
            self._send(piece)
        self.resume_reading("connecting")
        if self._request_received and self._answering:
            self._hold_pipelined_requests()
        else:
            self._receive(None)

    def _answer_locally(self, status: int, message: str, close: bool) -> None:
        self._exchange.answered_locally(status, close)
        self._write_own_answer(status, message, close)
        self._finish_request()

    def _write_own_answer(self, status: int, message: str, close: bool) -> None:
        """Count and send an answer of the proxy's own."""
        self._answer_started(status)
        data = plain_response(status, message, close)
        self._bytes_out += len(data)
        if self._transport is not None:
            self._transport.write(data)

    def _answer_started(self, status: int) -> None:
        self._status = status
        self._state.response_started(status)

    def _refuse(self, error: framing.ClientProtocolError) -> None:
        """Bad HTTP from the client: answer (unless an answer already began) and close."""
        log.info("bad request from %s: %s", self._peer(), error)
        transport = self._transport
        if transport is None or self._answer_begun:
            self.close()
            return
        status = error.status_hint if 400 <= error.status_hint < 500 else 400
        if not self._answering:  # no request was under way: count the refused one
            self._request = None
            self._bytes_in = self._bytes_out = 0
        self._write_own_answer(status, f"bad HTTP/1.1 request: {error}", close=True)
        # Half-close and drop what still comes, so that the client reads the answer
        # instead of a reset.
        self._discarding = True
        if self._answering:
            self._finish_request()
        else:
            self._account(None, 0.0)
        self._paused_for.clear()
        transport.resume_reading()
        if transport.can_write_eof():
            transport.write_eof()
        self._loop.call_later(LINGER, self.close)

    # -- container to client -------------------------------------------------------

    def upstream_data(self, upstream: _Upstream, data: bytes) -> None:
        """Bytes from a container: pass them on, noting where answers start and end."""
        transport = self._transport
        if upstream is not self._upstream or transport is None:
            return
        exchange = self._exchange
        if exchange.switched:
            transport.write(data)
            return
        try:
            pieces = exchange.upstream_data(data)
        except framing.UpstreamProtocolError as exc:
            log.warning("container %s sent bad HTTP: %s", upstream.container.container_id, exc)
            self._upstream_failed(upstream, str(exc))
            return
        out = []
        ended = False
        for piece in pieces:
            raw = piece.data
            if isinstance(piece, framing.ResponseStarted | framing.ProtocolSwitched):
                self._answer_begun = True
                self._replay = None
                self._answer_started(piece.status)
            if isinstance(piece, framing.ResponseStarted) and self._closing:
                # Shutting down: tell the client, so that it does not send its next
                # request on a connection we are about to close.
                raw = framing.with_connection_close(raw)
            elif isinstance(piece, framing.ProtocolSwitched):
                upstream.upgraded = True
                upstream.container.upgrade_started()
            elif isinstance(piece, framing.MessageEnded):
                ended = True
            out.append(raw)
        if not out:
            return
        # One write per read: a head and its body go out in one segment.
        data = out[0] if len(out) == 1 else b"".join(out)
        self._bytes_out += len(data)
        transport.write(data)
        if exchange.switched:
            upstream.write(exchange.take_client_leftover())
            self._finish_request()
            self.resume_reading("answer")
        elif ended:
            self._finish_request()

    def upstream_ended(self, upstream: _Upstream, reason: str) -> None:
        """A container's side of a connection ended (EOF or closed); idempotent."""
        if upstream.ended:
            return
        upstream.ended = True
        if self._upstream is not upstream:
            return
        if self._exchange.switched:
            self.close()
            return
        self.upstream_data(upstream, b"")  # an answer delimited by the end ends here
        if self._upstream is upstream:
            self._upstream_failed(upstream, reason)

    def _upstream_failed(self, upstream: _Upstream, reason: str) -> None:
        """The container side failed; fail the request in flight on it, if any."""
        if self._upstream is upstream:
            self._upstream = None
        upstream.ended = True
        upstream.close()
        if self._routed_to is None or not self._answering:
            return  # idle keep-alive connection closed by the container: nothing lost
        replay, self._replay = self._replay, None
        if replay is not None and not self._answer_begun and self._request_received:
            log.info(
                "container %s closed a kept-alive connection as a request went out: "
                "sending it again on a new one",
                upstream.container.container_id[:12],
            )
            self._loop.create_task(self._send_again(upstream.container, bytes(replay)))
            return
        if self._answer_begun:
            # Part of an answer went out: the client can only learn of the failure by
            # the connection closing.
            self._finish_request()
            self.close()
            return
        log.warning("request to container %s failed: %s", upstream.container.container_id, reason)
        self._fail_with_502()

    def _fail_with_502(self) -> None:
        self._write_own_answer(502, "the app container failed to answer", close=True)
        self._finish_request()
        self.close()

    async def _send_again(self, container: Container, request: bytes) -> None:
        """Send a request again on a new connection to its container."""
        try:
            _, upstream = await self._loop.create_connection(
                lambda: _Upstream(self, container), container.host, container.port
            )
        except OSError:
            self._fail_with_502()
            return
        if self._closed:
            upstream.close()
            return
        self._upstream = upstream
        upstream.busy = True
        self._exchange.request_forwarded(fresh_upstream=True)
        upstream.write(request)

    # -- bookkeeping ---------------------------------------------------------------

    def _finish_request(self) -> None:
        """Close the books on the current request (idempotent), then go on reading."""
        if not self._answering:
            return
        self._answering = False
        self._state.active_connections -= 1
        now = self._loop.time()
        container, self._routed_to = self._routed_to, None
        self._account(container, now - self._started_at)
        self._request = None  # an idle connection keeps nothing of its last request
        self._replay = None
        self._last_active = now
        upstream = self._upstream
        if upstream is not None:
            upstream.busy = False
            if container is not None and container.state == "draining" and upstream.idle:
                # The container is being drained: it gets no further request from here.
                upstream.close()
                self._upstream = None
        if container is not None:
            container.request_finished()
        if self._closed or self._discarding:
            return
        exchange = self._exchange
        if (
            exchange.must_close
            or self._client_eof
            or (self._closing and not exchange.request_in_progress)
        ):
            self.close()
            return
        if self._paused_for:
            self.resume_reading("answer")
        if exchange.has_buffered_bytes and not exchange.request_in_progress:
            # A pipelined request is waiting; parse it once the caller is done with
            # the pieces of this one.
            self._loop.call_soon(self._receive, None)

    def _account(self, container: Container | None, seconds: float) -> None:
        """Count the finished request, and log it if there is an access log."""
        revision = container.config.revision if container is not None else NO_REVISION
        status = self._status or CLIENT_CLOSED_REQUEST
        self._state.request_finished(revision, status, seconds, self._bytes_in, self._bytes_out)
        if self._access_log is not None:
            request = self._request or _UNREADABLE_REQUEST
            self._access_log.request(
                self._client_host,
                request.data,
                request.method,
                request.target,
                status,
                self._bytes_out,
                seconds,
                revision,
            )

    def _peer(self) -> str:
        peer = self._transport.get_extra_info("peername") if self._transport else None
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)


def _take_spare(container: Container) -> _Upstream | None:
    """An idle connection to ``container`` left by an earlier client, if one is open."""
    while container.spare:
        upstream = cast(_Upstream, container.spare.pop())
        transport = upstream.transport
        if not upstream.ended and transport is not None and not transport.is_closing():
            return upstream
    return None
