"""One client connection of the proxy: route each request, splice its bytes, count it.

The client's bytes are fed to the framing observer; at each request head the connection
asks :class:`~wunderproxy.state.ProxyState` which container serves *now* and sends the
request there, reusing the upstream connection while it is to the same container and
kept alive. A pump task copies the container's answer back. Bytes are forwarded exactly
as received; the proxy only writes bytes of its own when it answers by itself (400, 502,
503), and then always before any byte of an upstream answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from wunderproxy import framing
from wunderproxy.state import Container, ProxyState
from wunderproxy.streams import close_after_refusal

log = logging.getLogger("wunderproxy.proxy")

READ_SIZE = 64 * 1024  # larger reads cost more in malloc than they save in calls
# A request sent on a kept-alive upstream connection is kept (up to this size) until its
# answer begins, so that it can be sent again if the container had just closed that
# connection: the keep-alive race every proxy meets (RFC 9112 section 9.3.1).
REPLAY_LIMIT = 64 * 1024
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


def plain_response(status: int, message: str, close: bool) -> bytes:
    """A short plain-text answer the proxy sends on its own."""
    body = (message + "\n").encode()
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n" + ("Connection: close\r\n" if close else "") + "\r\n"
    )
    return head.encode() + body


class _Upstream:
    """An open connection to one container, and the task copying its answers back.

    It is a :class:`~wunderproxy.state.Link` of its container, so that a drain can close
    it between requests, or cut it (with its upgraded client) at the drain deadline.
    """

    def __init__(
        self,
        container: Container,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        client: asyncio.StreamWriter,
    ) -> None:
        self.container = container
        self.reader = reader
        self.writer = writer
        self.client = client
        self.pump: asyncio.Task[None] | None = None
        self.busy = False  # a request is in flight on it
        self.upgraded = False
        container.links.add(self)

    @property
    def idle(self) -> bool:
        return not self.busy and not self.upgraded

    def close(self) -> None:
        self.container.links.discard(self)
        if self.pump is not None and self.pump is not asyncio.current_task():
            self.pump.cancel()
        self.writer.close()
        if self.upgraded:
            self.client.close()  # an upgraded client has no other way to go on


class ClientConnection:
    """Serves one accepted client connection until either side closes it."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        state: ProxyState,
        keepalive_timeout: float,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._state = state
        self._keepalive_timeout = keepalive_timeout
        self._loop = asyncio.get_running_loop()
        self._last_active = self._loop.time()
        self._exchange = framing.Exchange()
        self._upstream: _Upstream | None = None
        # Per request: where it went, when it started, whether its answer has begun.
        self._routed_to: Container | None = None
        self._started_at = 0.0
        self._answer_begun = False
        self._answered = asyncio.Event()
        self._answered.set()
        self._request_received = False
        self._body_target: _Upstream | None = None
        self._replay: bytearray | None = None
        self._closing = False

    # -- lifecycle -----------------------------------------------------------------

    async def serve(self) -> None:
        """Run until the connection ends; never raises for a client's or container's fault."""
        state = self._state
        state.open_connections += 1
        try:
            await self._serve_http()
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            log.debug("client connection ended: %s", exc)
        finally:
            self._finish_request()
            if self._upstream is not None:
                self._upstream.close()
            self._writer.close()
            state.open_connections -= 1

    def abort(self) -> None:
        """Close both sides now (shutdown deadline passed)."""
        self._closing = True
        if self._upstream is not None:
            self._upstream.close()
        self._writer.close()

    def close_when_idle(self, grace: float) -> None:
        """Shutdown: close between requests, without losing one.

        A busy connection closes after its answer, which tells the client
        ``Connection: close``. An idle one is given ``grace`` seconds in which a request
        the client may be sending right now is still served (and told the same).
        """
        self._closing = True
        if self._exchange.idle:
            asyncio.get_running_loop().call_later(grace, self._close_if_idle)

    def _close_if_idle(self) -> None:
        if self._exchange.idle:
            self._writer.close()

    def expire_if_idle(self, now: float) -> bool:
        """Close the connection if it has been idle past the keep-alive timeout.

        Called for every connection by one periodic sweep: cheaper than a timer armed and
        cancelled around every read.
        """
        if self._exchange.idle and now - self._last_active > self._keepalive_timeout:
            self._writer.close()
            return True
        return False

    # -- client to container -------------------------------------------------------

    async def _serve_http(self) -> None:
        exchange = self._exchange
        while True:
            if self._request_received and not self._answered.is_set():
                # A whole request is in: read on only after its answer. Pipelined
                # requests wait in the parser's buffer meanwhile.
                await self._answered.wait()
            if exchange.switched:
                await self._splice_client_to_upstream()
                return
            if exchange.must_close:
                return
            try:
                pieces = exchange.client_data(None)
                data = b"-"
                if not pieces:
                    data = await self._reader.read(READ_SIZE)
                    self._last_active = self._loop.time()
                    pieces = exchange.client_data(data)
            except framing.ClientProtocolError as exc:
                await self._refuse(exc)
                return
            await self._forward_client_pieces(pieces)
            if not data:  # the client closed (or half-closed) its side
                if self._request_received:
                    await self._answered.wait()
                return

    async def _forward_client_pieces(self, pieces: list[framing.ClientPiece]) -> None:
        """Send what the client sent to the container its request was routed to."""
        for piece in pieces:
            if isinstance(piece, framing.RequestStarted):
                await self._start_request(piece.method)
            target = self._body_target
            if target is not None and piece.data:
                self._keep_for_replay(piece.data)
                try:
                    await _write(target.writer, piece.data)
                except ConnectionError:
                    # The pump sees the same failure and answers for it.
                    self._body_target = None
            if isinstance(piece, framing.MessageEnded):
                self._request_received = True
                self._body_target = None

    def _keep_for_replay(self, data: bytes) -> None:
        if self._replay is not None:
            self._replay += data
            if len(self._replay) > REPLAY_LIMIT:
                self._replay = None

    async def _start_request(self, method: bytes) -> None:
        """Route the request that just started to the container serving now."""
        state = self._state
        state.request_started()
        self._started_at = time.monotonic()
        self._answer_begun = False
        self._request_received = False
        self._answered.clear()
        state.active_connections += 1
        container = state.current
        if container is None:
            await self._answer_locally(503, "no container is deployed yet", close=False)
            return
        # Counted before any await: a drain starting meanwhile must wait for this request.
        container.request_started()
        self._routed_to = container
        upstream = self._upstream
        fresh = not (
            upstream is not None
            and upstream.container is container
            and self._exchange.upstream_reusable
            and not upstream.reader.at_eof()
        )
        if fresh:
            if upstream is not None:
                upstream.close()
                self._upstream = None
            try:
                reader, writer = await asyncio.open_connection(container.host, container.port)
            except OSError as exc:
                log.warning(
                    "container %s at %s:%d unreachable: %s",
                    container.container_id[:12],
                    container.host,
                    container.port,
                    exc,
                )
                await self._answer_locally(502, "the app container is unreachable", close=False)
                return
            upstream = self._upstream = _Upstream(container, reader, writer, self._writer)
            upstream.pump = asyncio.create_task(self._pump(upstream))
        assert upstream is not None
        upstream.busy = True
        self._body_target = upstream
        self._replay = bytearray() if not fresh and method in IDEMPOTENT else None
        self._exchange.request_forwarded(fresh_upstream=fresh)

    async def _answer_locally(self, status: int, message: str, close: bool) -> None:
        self._state.response_started(status)
        self._exchange.answered_locally(status, close)
        self._writer.write(plain_response(status, message, close))
        await self._writer.drain()
        self._finish_request()

    async def _refuse(self, error: framing.ClientProtocolError) -> None:
        """Bad HTTP from the client: answer (unless an answer already began) and close."""
        log.info("bad request from %s: %s", self._peer(), error)
        if self._answer_begun:
            return
        status = error.status_hint if 400 <= error.status_hint < 500 else 400
        self._state.response_started(status)
        self._writer.write(plain_response(status, f"bad HTTP/1.1 request: {error}", close=True))
        await close_after_refusal(self._reader, self._writer)

    async def _splice_client_to_upstream(self) -> None:
        upstream = self._upstream
        assert upstream is not None
        leftover = self._exchange.take_client_leftover()
        if leftover:
            upstream.writer.write(leftover)
        while data := await self._reader.read(READ_SIZE):
            upstream.writer.write(data)
            await upstream.writer.drain()
        with contextlib.suppress(OSError):
            upstream.writer.write_eof()
        if upstream.pump is not None:
            await upstream.pump

    # -- container to client -------------------------------------------------------

    async def _pump(self, upstream: _Upstream) -> None:
        """Copy one upstream connection's answers to the client until it closes."""
        try:
            await self._pump_http(upstream)
        except (ConnectionError, OSError) as exc:
            log.debug("upstream connection ended: %s", exc)
            await self._upstream_failed(upstream, str(exc))
        except framing.UpstreamProtocolError as exc:
            log.warning("container %s sent bad HTTP: %s", upstream.container.container_id, exc)
            await self._upstream_failed(upstream, str(exc))

    async def _pump_http(self, upstream: _Upstream) -> None:
        exchange, writer = self._exchange, self._writer
        while True:
            data = await upstream.reader.read(READ_SIZE)
            out = []
            ended = False
            for piece in exchange.upstream_data(data):
                raw = piece.data
                if isinstance(piece, framing.ResponseStarted | framing.ProtocolSwitched):
                    self._answer_begun = True
                    self._replay = None
                    self._state.response_started(piece.status)
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
            # One write per read: a head and its body go out in one segment.
            await _write(writer, out[0] if len(out) == 1 else b"".join(out))
            if ended:
                self._finish_request()
            if exchange.switched:
                await self._splice_upstream_to_client(upstream)
                return
            if not data:
                await self._upstream_failed(upstream, "container closed the connection")
                return

    async def _send_again(self, request: bytes) -> bool:
        """Send a request again on a new connection to its container; False if impossible."""
        container = self._routed_to
        assert container is not None
        try:
            reader, writer = await asyncio.open_connection(container.host, container.port)
        except OSError:
            return False
        log.info(
            "container %s closed a kept-alive connection as a request went out: sending it "
            "again on a new one",
            container.container_id[:12],
        )
        upstream = self._upstream = _Upstream(container, reader, writer, self._writer)
        upstream.busy = True
        self._exchange.request_forwarded(fresh_upstream=True)
        upstream.pump = asyncio.create_task(self._pump(upstream))
        writer.write(request)
        return True

    async def _splice_upstream_to_client(self, upstream: _Upstream) -> None:
        self._finish_request()
        try:
            while data := await upstream.reader.read(READ_SIZE):
                self._writer.write(data)
                await self._writer.drain()
        finally:
            upstream.container.upgrade_finished()
            self._writer.close()

    async def _upstream_failed(self, upstream: _Upstream, reason: str) -> None:
        """The container side ended; fail the request in flight on it, if any."""
        if self._upstream is upstream:
            self._upstream = None
        upstream.container.links.discard(upstream)
        upstream.writer.close()
        if self._routed_to is None or self._answered.is_set():
            return  # idle keep-alive connection closed by the container: nothing lost
        replay, self._replay = self._replay, None
        retry = replay is not None and not self._answer_begun and self._request_received
        if retry and await self._send_again(bytes(replay or b"")):
            return
        if self._answer_begun:
            # Part of an answer went out: the client can only learn of the failure by
            # the connection closing.
            self._finish_request()
            self._writer.close()
            return
        log.warning("request to container %s failed: %s", upstream.container.container_id, reason)
        self._state.response_started(502)
        self._writer.write(plain_response(502, "the app container failed to answer", close=True))
        self._finish_request()
        with contextlib.suppress(ConnectionError):
            await self._writer.drain()
        self._writer.close()

    # -- bookkeeping ---------------------------------------------------------------

    def _finish_request(self) -> None:
        """Close the books on the current request (idempotent)."""
        if self._answered.is_set():
            return
        self._answered.set()
        self._state.active_connections -= 1
        self._state.request_finished(time.monotonic() - self._started_at)
        container, self._routed_to = self._routed_to, None
        self._replay = None
        self._last_active = self._loop.time()
        upstream = self._upstream
        if upstream is not None:
            upstream.busy = False
            if container is not None and container.state == "draining" and upstream.idle:
                # The container is being drained: it gets no further request from here.
                upstream.close()
                self._upstream = None
        if container is not None:
            container.request_finished()
        if self._closing and not self._exchange.request_in_progress:
            self._writer.close()

    def _peer(self) -> str:
        peer = self._writer.get_extra_info("peername")
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)


async def _write(writer: asyncio.StreamWriter, data: bytes) -> None:
    """Write, and wait only if the kernel did not take it all (flow control)."""
    if data:
        writer.write(data)
        if writer.transport.get_write_buffer_size():
            await writer.drain()
