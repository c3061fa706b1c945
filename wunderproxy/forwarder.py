"""One client connection of the proxy: route each request, splice its bytes, count it.

The client's bytes are fed to the framing observer; at each request head the connection
opens a :class:`RequestCycle`, asks :class:`~wunderproxy.state.ProxyState` which container
serves *now* and sends the request there, on one of that container's idle connections if
one is open: between requests a client holds no upstream connection, it goes back to its
container's spares for whichever request comes next (see :mod:`wunderproxy.upstream`).
The container's answer is copied back as it arrives (with ``--buffer-responses``, what its
client cannot take yet is held for it: see :mod:`wunderproxy.answerbuffer`); the cycle is
closed once, when the answer ends or fails.
Bytes are forwarded exactly as received but where a feature the operator turned on changes
them: the forwarded fields of a request's head (``--forwarded``,
:mod:`wunderproxy.forwarded`) and a compressed answer (``--compress``,
:mod:`wunderproxy.compression`). The proxy writes bytes of its own only when it answers by
itself (the failures of :mod:`wunderproxy.answers`, and the ``100 Continue`` of a request
it buffers), and then always before any byte of an upstream answer.

With ``--buffer-requests``, a request whose body is still arriving when its head is read is
routed only once its body is whole (:mod:`wunderproxy.requestbuffer`).

Both sides are asyncio protocols: bytes are handled in the callback that receives them.
Streams would add a task wake-up and a future to every read and every answer, which cost
more CPU per request than all the framing does.

Timeouts are not timers: one periodic sweep calls :meth:`ClientConnection.check_timeouts`
on every connection, which compares the loop's clock with the times this connection already
keeps. Arming and cancelling a timer around every read would cost more than the reads.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import cast

from wunderproxy import answers, compression, framing
from wunderproxy.accesslog import CLIENT_CLOSED_REQUEST, AccessLog
from wunderproxy.answerbuffer import STREAM_GAP, AnswerBuffer, buffer_for
from wunderproxy.config import Edge, Front
from wunderproxy.encoders import AnswerEncoder
from wunderproxy.fallback import Fallback, PeerTarget, unmarked
from wunderproxy.forwarded import Forwarding
from wunderproxy.keepupstream import without_close
from wunderproxy.redirect import Redirect
from wunderproxy.requestbuffer import CONTINUE, BufferedRequest, without_continue
from wunderproxy.spool import Spool
from wunderproxy.state import Container, ProxyState
from wunderproxy.streams import LINGER
from wunderproxy.traffic import NO_REVISION
from wunderproxy.unsent import unsent
from wunderproxy.upstream import Target, Upstream, take_spare

log = logging.getLogger("wunderproxy.proxy")

# A request sent on a kept-alive upstream connection is kept (up to this size) until its
# answer begins, so that it can be sent again if the container had just closed that
# connection: the keep-alive race every proxy meets (RFC 9112 section 9.3.1).
REPLAY_LIMIT = 64 * 1024
# Methods that may be sent twice (RFC 9110 section 9.2.2).
IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))

# The access log's "buffered" once some of an answer was held for its client.
_WITH_RESPONSE: dict[str | None, str] = {None: "response", "request": "both"}

# Why a connection's reading is paused, when it is not: one shared empty set, since an
# empty set of its own would cost each idle connection 216 bytes.
_NOT_PAUSED: frozenset[str] = frozenset()

# Answers that have no body whatever their fields say (RFC 9110 sections 15.3.5, 15.4.5;
# an answer to HEAD too): an app that sends one anyway sends it after the answer's end.
_BODILESS = (204, 304)

# What the access log shows of a request that could not be read.
_UNREADABLE_REQUEST = framing.RequestStarted(method=b"-", target=b"-", data=b"")


def sweep_interval(edge: Edge) -> float:
    """Seconds between two timeout sweeps: a timeout is enforced within this much.

    Half a second for the defaults, so that an expiry is acted on within a second of its
    deadline even while the sweep itself takes a while; finer when an operator sets a
    timeout of a few seconds. A sweep of 10,000 idle connections costs a few milliseconds.
    """
    shortest = min(
        edge.keepalive_timeout,
        edge.header_timeout,
        edge.body_timeout,
        edge.upstream_timeout,
        edge.send_timeout,
    )
    return min(0.5, max(0.05, shortest / 10))


class RequestCycle:
    """One request on a client connection, from its head to the end of its answer.

    Opened once when the head arrives. It is counted once, when its answer ends or fails
    (``answered``), and closed once both its answer ended and its request was read: a body
    the container answered early still goes to it, or the connection would be out of step.
    """

    # Slots: one is alive per busy connection, so thousands at once.
    __slots__ = (
        "answer_head",
        "answered",
        "buffer",
        "buffered",
        "bytes_in",
        "bytes_out",
        "close_dropped",
        "container",
        "encoding",
        "failure",
        "head",
        "held",
        "may_fall_back",
        "peer",
        "peers_left",
        "received",
        "replay",
        "request",
        "reused",
        "sender",
        "started_at",
        "status",
        "target",
        "upload",
    )

    def __init__(self, request: framing.RequestStarted, started_at: float) -> None:
        self.request = request
        self.head = request.data  # as it goes upstream (with a peer's mark, without a forged one)
        self.started_at = started_at
        # The head is counted as it arrives: an answer of the proxy's own is counted
        # before it is passed on (or dropped).
        self.bytes_in = len(request.data)
        self.bytes_out = 0
        self.container: Container | None = None  # where it was routed
        self.target: Upstream | None = None  # where its body goes
        self.status = 0  # of its answer once begun, or of how it failed
        self.received = False  # the whole request was read from the client
        self.answered = False  # its answer ended (or failed) and was counted
        self.held: list[framing.ClientPiece] = []  # pieces waiting for a connection
        self.replay: bytearray | None = None  # its bytes, to send it again if need be
        self.reused = False  # sent on a connection that carried requests before
        # Went up without the client's Connection: close (--keep-upstream): its answer
        # says close to the client instead.
        self.close_dropped = False
        # Peer fallback (see fallback.py).
        self.may_fall_back = False  # a peer may take it if no container here can
        self.sender: str | None = None  # the peer instance that sent it here
        self.peer: PeerTarget | None = None  # the peer it went to
        self.peers_left: list[PeerTarget] = []  # peers still to try
        self.failure: answers.Failure | None = None  # the answer if no peer takes it
        # The front door (for the access log).
        self.encoding: str | None = None  # how --compress encoded its answer
        self.buffered: str | None = None  # "request", "response" or "both"
        self.upload: BufferedRequest | None = None  # its body, held until whole
        # --buffer-responses: its answer's head, until its client falls behind (if ever),
        # which decides whether the answer is buffered; then its buffer, if it is.
        self.answer_head: bytes | None = None
        self.buffer: AnswerBuffer | None = None

    @property
    def answer_begun(self) -> bool:
        """True once any byte of an answer went to the client (held ones have not)."""
        buffer = self.buffer
        return self.status != 0 and (buffer is None or buffer.given)


class ClientConnection(asyncio.Protocol):
    """Serves one accepted client connection until either side closes it."""

    # Slots: thousands of idle connections are held, and a dict per instance is most of
    # what each one costs in Python.
    __slots__ = (
        "_access_log",
        "_client_eof",
        "_client_host",
        "_closed",
        "_closing",
        "_cycle",
        "_discarding",
        "_edge",
        "_encoder",
        "_exchange",
        "_fallback",
        "_forwarding",
        "_front",
        "_head_since",
        "_last_active",
        "_last_upstream",
        "_loop",
        "_on_close",
        "_paused_for",
        "_redirect",
        "_scheme",
        "_send_mark",
        "_state",
        "_transport",
        "_upload_unsent",
        "_upstream",
    )

    def __init__(
        self,
        state: ProxyState,
        edge: Edge,
        on_close: Callable[[ClientConnection], None] | None = None,
        access_log: AccessLog | None = None,
        front: Front | None = None,
        scheme: str = "http",
        redirect: Redirect | None = None,
    ) -> None:
        # Shared by every connection.
        self._state = state
        self._edge = edge
        self._front = front or Front()
        self._scheme = scheme  # of the listener that accepted it: http or https
        self._redirect = redirect  # --redirect-http on the plain listener: answer 308s
        self._fallback = state.fallback
        self._access_log = access_log
        self._on_close = on_close
        self._loop = asyncio.get_running_loop()
        # This connection.
        self._transport: asyncio.Transport | None = None
        # Only looked up for the access log and the forwarded fields.
        self._client_host: str | None = None
        self._forwarding: Forwarding | None = None  # None: --forwarded off
        self._exchange = framing.Exchange(edge.max_header_size, edge.max_body_size)
        self._upstream: Upstream | None = None
        self._encoder: AnswerEncoder | None = None  # compressing the answer (--compress)
        self._paused_for = _NOT_PAUSED
        self._closed = False
        self._closing = False  # shutting down: this answer is the connection's last
        self._discarding = False  # a refused request: drop what the client still sends
        self._client_eof = False
        # Clocks of the timeouts (loop time; 0.0: not running).
        self._last_active = self._loop.time()  # the client's last read
        self._head_since = 0.0  # the first byte of a head not complete yet
        self._last_upstream = 0.0  # the container's last byte (or the request going out)
        self._send_mark: tuple[float, int] | None = None  # writing paused: since, unsent
        self._upload_unsent: int | None = None  # of the request, not yet taken by the container
        # The request in progress, if any.
        self._cycle: RequestCycle | None = None

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
        if self._transport is not None:
            self._transport.abort()

    def close_when_idle(self, grace: float) -> None:
        """Shutdown: close between requests, without losing one.

        A busy connection closes after its answer, which tells the client
        ``Connection: close``. An idle one is given ``grace`` seconds in which a request
        the client may be sending right now is still served (and told the same).
        """
        self._closing = True
        if self._idle:
            self._loop.call_later(grace, self._close_if_idle)

    def _close_if_idle(self) -> None:
        if self._idle:
            self.close()

    @property
    def _idle(self) -> bool:
        """True between requests (an answer still fed from its buffer is a request)."""
        return self._cycle is None and self._exchange.idle

    def check_timeouts(self, now: float) -> None:
        """Enforce the edge's timeouts at ``now`` (loop time); called by one periodic sweep.

        Upgraded connections are exempt: their bytes are the app's business.
        """
        if self._closed or self._discarding or self._exchange.switched:
            return
        edge = self._edge
        if self._send_mark is not None and self._send_stalled(now, edge.send_timeout):
            self._time_out("send", None)
            return
        cycle = self._cycle
        if cycle is None:
            if self._head_since:
                if now - self._head_since > edge.header_timeout:
                    self._time_out("header", answers.HEADER_TIMEOUT)
            elif self._exchange.idle and now - self._last_active > edge.keepalive_timeout:
                self._shut()
            return
        if cycle.held:
            return  # connecting: --connect-timeout governs
        if not cycle.received and not self._paused_for:
            if now - self._last_active > edge.body_timeout:
                self._time_out("body", answers.BODY_TIMEOUT)
        elif (
            cycle.target is not None
            and not cycle.answered
            and (self._send_mark is None or self._reads_on(cycle))
        ):
            container = cycle.container
            if container is not None and container.died and not cycle.answer_begun:
                # Docker said it died, and its connection did not close with it: what
                # waits there goes elsewhere now, not after --upstream-timeout.
                self._upstream_failed(cycle.target, "Docker said the container died")
                return
            # Bytes of the request still going up are progress too: the container is
            # reading it, and owes its answer only after.
            self._note_upload(now, cycle.target)
            progress = self._last_upstream
            if not cycle.received:
                progress = max(progress, self._last_active)
            if now - progress > edge.upstream_timeout:
                self._time_out("upstream", answers.UPSTREAM_TIMEOUT)
            elif cycle.buffer is not None and now - self._last_upstream > STREAM_GAP:
                self._gap(cycle.buffer)

    def _send_stalled(self, now: float, timeout: float) -> bool:
        """True when the client read nothing of what waits for it for ``timeout``."""
        assert self._send_mark is not None and self._transport is not None
        since, waiting = self._send_mark
        now_waiting = unsent(self._transport)
        if now_waiting < waiting:  # it read some: the clock starts again
            self._send_mark = (now, now_waiting)
            return False
        return now - since > timeout

    def _note_upload(self, now: float, upstream: Upstream) -> None:
        """While the request still goes up (an upload the container reads slower than it
        came), the container taking any more of it since the last look is progress."""
        if upstream.transport is None:
            return
        waiting = unsent(upstream.transport)
        if waiting and (self._upload_unsent is None or waiting < self._upload_unsent):
            self._last_upstream = now
        self._upload_unsent = waiting or None

    def pause_reading(self, reason: str) -> None:
        """Stop reading from the client until every ``reason`` given is resumed."""
        if not self._paused_for and self._transport is not None and not self._closed:
            self._transport.pause_reading()
        self._paused_for |= {reason}

    def resume_reading(self, reason: str) -> None:
        """Read from the client again once no other reason to pause remains."""
        if reason in self._paused_for:
            self._paused_for = self._paused_for - {reason} or _NOT_PAUSED
        if not self._paused_for and self._transport is not None and not self._closed:
            self._transport.resume_reading()

    # -- asyncio.Protocol: the client side -------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._state.open_connections += 1
        forwarded = self._front.forwarded
        if self._access_log is not None or forwarded != "off":
            peer = transport.get_extra_info("peername")
            self._client_host = peer[0] if isinstance(peer, tuple) else None
        if forwarded != "off":
            self._forwarding = Forwarding(forwarded, self._client_host, self._scheme)

    def data_received(self, data: bytes) -> None:
        now = self._last_active = self._loop.time()
        if self._discarding:
            return
        exchange = self._exchange
        if exchange.switched:
            if self._upstream is not None:
                self._upstream.write(data)
            return
        if self._cycle is None and not self._head_since:
            self._head_since = now  # a new head begins: --header-timeout counts from here
        self._receive(data)

    def eof_received(self) -> bool:
        if self._exchange.switched:
            if self._upstream is not None:
                self._upstream.write_eof()
            return self._can_stay_half_open()
        if self._discarding:
            return False  # it read our refusal and left: close (its parser is spent)
        self._client_eof = True
        self._receive(b"")
        # A client that half-closed after a whole request still gets its answer.
        cycle = self._cycle
        return (
            cycle is not None and cycle.received and not self._closed and self._can_stay_half_open()
        )

    def _can_stay_half_open(self) -> bool:
        """Whether the connection may stay open after the client's EOF: not over TLS,
        which asyncio closes at the client's close_notify whatever eof_received says
        (and warns if told otherwise)."""
        return self._transport is not None and self._transport.can_write_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        # Also called for a TLS connection whose handshake failed, which was never made.
        self._closed = True
        cycle = self._cycle
        if cycle is not None:
            if not cycle.answered:
                cycle.status = CLIENT_CLOSED_REQUEST  # it left before the answer ended
            self._close_cycle()
        # What it still holds is no spare (see _end_cycle): mid-request, out of step, or
        # kept after an answer without a body.
        self._drop_upstream()
        if self._transport is not None:
            self._state.open_connections -= 1
        if self._on_close is not None:
            self._on_close(self)

    def pause_writing(self) -> None:  # the client reads an answer slower than it comes
        if self._transport is not None:
            self._send_mark = (self._loop.time(), unsent(self._transport))
        if self._upstream is not None and not self._reads_on(self._cycle):
            self._upstream.pause_reading()

    def upstream_writable(self, upstream: Upstream) -> None:
        """The container takes more of the request again: read the client again, and
        write on a held body."""
        self.resume_reading("upstream")
        cycle = self._cycle
        if cycle is not None and cycle.upload is not None and cycle.target is upstream:
            self._last_upstream = self._loop.time()  # it took some of the body: progress
            cycle.upload.send(upstream)

    def resume_writing(self) -> None:
        self._send_mark = None
        cycle = self._cycle
        if cycle is not None and cycle.buffer is not None:
            buffer = cycle.buffer
            self._feed(cycle, buffer)
            if buffer.reads_on or buffer.holding:
                return  # the container was not held back (or still is)
        # The container's answer was held back for the client: its clock starts again.
        self._last_upstream = self._loop.time()
        if self._upstream is not None:
            self._upstream.resume_reading()

    def _reads_on(self, cycle: RequestCycle | None) -> bool:
        """True while the container's answer is read whatever the client's pace: a
        buffered one, or (with --buffer-responses) one whose head has not come yet."""
        if cycle is None or not self._front.buffer_responses:
            return False
        buffer = cycle.buffer
        if buffer is None:
            if cycle.answer_head is None:
                return cycle.status == 0
            buffer = self._buffer_answer(cycle, given=True)  # its client just fell behind
            if buffer is None:
                return False
        return buffer.reads_on

    # -- client to container -------------------------------------------------------

    def _receive(self, data: bytes | None) -> None:
        """Parse what the client sent (None: what is buffered) and forward it."""
        if self._closed or self._discarding:
            return  # a deferred parse of a connection that has ended meanwhile
        cycle = self._cycle
        if cycle is not None and cycle.held:  # a connection to the container is being made
            if data is not None:
                self._exchange.buffer_client_data(data)
            return
        try:
            pieces = self._exchange.client_data(data)
        except framing.ClientProtocolError as exc:
            log.info("bad request from %s: %s", self._peer(), exc)
            status = exc.status_hint if 400 <= exc.status_hint < 500 else 400
            self._refuse(answers.Failure(status, f"bad HTTP/1.1 request: {exc}"))
            return
        self._forward(pieces)

    def _forward(self, pieces: list[framing.ClientPiece]) -> None:
        for index, piece in enumerate(pieces):
            if isinstance(piece, framing.RequestStarted):
                if not self._start_request(piece, pieces[index + 1 :]):
                    return  # the rest waits for the new upstream connection
            elif not self._send(piece):
                return  # refused: its body could not be held
        self._hold_pipelined_requests()

    def _hold_pipelined_requests(self) -> None:
        """Stop reading while pipelined requests wait for the answer to this one.

        Only then: pausing costs two system calls, and most clients send nothing more
        before the answer.
        """
        cycle = self._cycle
        if cycle is not None and cycle.received and self._exchange.has_buffered_bytes:
            self.pause_reading("answer")

    def _send(self, piece: framing.Body | framing.MessageEnded) -> bool:
        """Pass on a piece of the request body (or its end) to where the request went, or
        hold it until the body is whole (--buffer-requests), then route the request.

        False when the request was refused instead: its body could not be held.
        """
        cycle = self._cycle
        assert cycle is not None, "a body piece with no request in progress"
        data = piece.data
        if data:
            cycle.bytes_in += len(data)
            target = cycle.target
            if target is not None:
                replay = cycle.replay
                if replay is not None:
                    replay += data
                    if len(replay) > REPLAY_LIMIT:
                        cycle.replay = None
                target.write(data)
            elif cycle.upload is not None and not cycle.answered:
                try:
                    cycle.upload.add(data)
                except OSError as exc:
                    self._state.spool_trouble.failed(
                        exc, self._front.buffer_dir, "the request was answered 503"
                    )
                    self._refuse(answers.BUFFER_FAILED)
                    return False
        if isinstance(piece, framing.MessageEnded):
            cycle.received = True
            if cycle.answered:  # answered before its body was all read
                self._end_cycle()
            elif cycle.upload is not None:  # held until now: the body is whole
                # Connecting (False) holds nothing more: the framing hands back no piece
                # after a request's end until its answer ends.
                self._route(cycle, [])
        return True

    def _start_request(
        self, piece: framing.RequestStarted, rest: list[framing.ClientPiece]
    ) -> bool:
        """Open the request's cycle and route it to the container serving now (or to a
        peer, if that container is known to be down); with ``--redirect-http``, answer it
        with the redirect to https:// instead; with --buffer-requests, a request whose
        body is still on its way is routed once the body is whole (see :meth:`_send`).

        False when a connection must be made first: ``rest`` is then forwarded once it is.
        """
        cycle = self._open_cycle(piece)
        self._head_since = 0.0
        if self._redirect is not None:
            self._fail(self._redirect.answer(piece), close=False)
            return True
        if self._fallback is not None:
            self._read_mark(cycle, self._fallback)
        if self._forwarding is not None and cycle.sender is None:  # a peer's sender did
            cycle.head = self._forwarding.rewrite(cycle.head)
        if piece.closes and self._front.keep_upstream:
            cycle.head = without_close(cycle.head)
            cycle.close_dropped = True
            self._exchange.close_dropped()
        if self._front.buffer_requests and not (
            rest and isinstance(rest[-1], framing.MessageEnded)
        ):
            self._hold_body(cycle)
            return True
        return self._route(cycle, rest)

    def _route(self, cycle: RequestCycle, rest: list[framing.ClientPiece]) -> bool:
        """Send the request to the container serving now (or to a peer, if that container
        is known to be down), or answer it here. False when connecting, as for
        :meth:`_dispatch`."""
        container = self._state.current
        if container is None or container.down:
            if cycle.may_fall_back:
                failure = answers.NO_CONTAINER if container is None else answers.UNREACHABLE
                return self._fall_back(cycle, rest, None, failure)
            if cycle.sender is not None:  # a peer's request goes nowhere else
                self._fail(answers.FALLBACK_NO_CONTAINER, close=False)
                return True
            if container is None:
                self._fail(answers.NO_CONTAINER, close=False)
                return True
            if container.died:  # Docker's proxy may accept for it still, and never answer
                self._fail(answers.UNREACHABLE, close=False)
                return True
            # Down, but this request may not go elsewhere (the health check): try it.
        # Counted before any wait: a drain starting meanwhile must wait for this request.
        container.request_started()
        cycle.container = container
        return self._dispatch(cycle, container, rest, None)

    def _hold_body(self, cycle: RequestCycle) -> None:
        """Hold the request's body until it is whole (--buffer-requests); a client that
        waits for ``100 Continue`` is told to go on (see requestbuffer.py)."""
        front = self._front
        cycle.upload = BufferedRequest(Spool(front.buffer_memory, front.buffer_dir))
        cycle.buffered = "request"
        head = without_continue(cycle.head)
        transport = self._transport
        if head is not None and transport is not None and not transport.is_closing():
            cycle.head = head
            cycle.bytes_out += len(CONTINUE)
            transport.write(CONTINUE)

    def _read_mark(self, cycle: RequestCycle, fallback: Fallback) -> None:
        """Note which peer sent a marked request, and decide whether the request may go to a
        peer: one that came with a mark never does, valid or not.

        A mark this host cannot verify is removed before the app sees it. It is a client's
        forgery, or a peer's signed with another secret: were such requests sent on, two
        peers with different secrets would pass one back and forth for ever.
        """
        request = cycle.request
        if request.fallback is not None:
            cycle.sender = fallback.sender(request.fallback, request.data)
            if cycle.sender is None:
                fallback.unverified(self._peer())
                cycle.head = unmarked(request.data)
            return
        # The health check of a load balancer must see this host as it is.
        if fallback.peers and request.target.partition(b"?")[0] != self._state.health_check_path:
            cycle.may_fall_back = True

    def _dispatch(
        self,
        cycle: RequestCycle,
        target: Target,
        rest: list[framing.ClientPiece],
        replay: bytes | None,
    ) -> bool:
        """Send the request to ``target``: on this client's connection there if it is kept
        alive, else on an idle one, else on a new one (False: connecting; the request's
        pieces wait in ``cycle.held``). ``replay``: the whole request, to send again."""
        upstream = self._upstream
        if upstream is not None:
            if (
                upstream.target is target
                and self._exchange.upstream_reusable
                and not upstream.ended
            ):
                self._forward_to(upstream, fresh=False, reused=True)
                self._write_request(cycle, upstream, replay)
                return True
            # Held between requests, it is no spare (see _end_cycle).
            self._upstream = None
            upstream.close()
        spare = take_spare(target)
        if spare is not None:
            self._forward_to(spare, fresh=True, reused=True)
            self._write_request(cycle, spare, replay)
            return True
        if replay is None and not cycle.held:
            cycle.held = [cycle.request, *rest]
            self.pause_reading("connecting")
        self._loop.create_task(self._connect(cycle, target, replay))
        return False

    def _forward_to(self, upstream: Upstream, fresh: bool, reused: bool) -> None:
        """Send the current request on ``upstream`` (``fresh``: new to this client;
        ``reused``: it carried requests before, so the container may have closed it)."""
        cycle = self._cycle
        assert cycle is not None
        upstream.attach(self)
        self._upstream = upstream
        self._last_upstream = self._loop.time()
        cycle.target = upstream
        cycle.reused = reused
        # Kept to send again: after the keep-alive race, or to a (next) peer if the
        # container (or peer) closes the connection without an answer; and any request sent
        # to a peer, which the peer may answer it did not serve (see _unserved).
        if cycle.peer is not None or (
            (reused or cycle.may_fall_back) and cycle.request.method in IDEMPOTENT
        ):
            cycle.replay = bytearray(cycle.head)
        self._exchange.request_forwarded(fresh_upstream=fresh)

    def _write_request(self, cycle: RequestCycle, upstream: Upstream, replay: bytes | None) -> None:
        """Write the request on the connection it was just given: the whole of it again
        (``replay``), or its head and whatever of its body waited for the connection; a
        held body (``replay`` is then only its head) from its start, as the connection
        takes it."""
        if replay is not None:
            upstream.write(replay)
            if cycle.replay is not None:
                cycle.replay = bytearray(replay)
        else:
            upstream.write(cycle.head)
        upload = cycle.upload
        if upload is not None:
            upload.rewind()
            upload.send(upstream)
        held = cycle.held
        if replay is not None or not held:
            return
        cycle.held = []
        for piece in held[1:]:
            assert not isinstance(piece, framing.RequestStarted)
            self._send(piece)
        self.resume_reading("connecting")
        if cycle.received:
            self._hold_pipelined_requests()
        else:
            self._receive(None)

    async def _connect(self, cycle: RequestCycle, target: Target, replay: bytes | None) -> None:
        """Open a new connection to ``target``, then send the cycle's request on it.

        The one place that connects: for a request held while connecting, or (``replay``)
        for one sent again after the container closed a kept-alive connection under it.
        """
        try:
            async with asyncio.timeout(self._edge.connect_timeout):
                _, upstream = await self._loop.create_connection(
                    lambda: Upstream(target), target.host, target.port
                )
        except (OSError, TimeoutError) as exc:
            timed_out = isinstance(exc, TimeoutError)
            if timed_out:
                self._state.timeouts["connect"] += 1
            log.warning(
                "%s at %s:%d %s",
                target.name,
                target.host,
                target.port,
                f"did not accept a connection in {self._edge.connect_timeout:g} s"
                if timed_out
                else f"is unreachable: {exc}",
            )
            if self._cycle is cycle:
                failure = answers.CONNECT_TIMEOUT if timed_out else answers.UNREACHABLE
                self._connect_failed(cycle, replay, failure)
            return
        if self._closed or self._cycle is not cycle:
            upstream.close()
            return
        container = cycle.container
        if container is not None and (container.died or (container.down and cycle.may_fall_back)):
            # It died while we connected: Docker's proxy accepts for it all the same.
            upstream.close()
            if cycle.may_fall_back:
                self._fall_back(cycle, [], replay, answers.UNREACHABLE)
            else:
                failure = answers.FALLBACK_NO_CONTAINER if cycle.sender else answers.UNREACHABLE
                self._give_up(cycle, failure)
            return
        self._forward_to(upstream, fresh=True, reused=False)
        self._write_request(cycle, upstream, replay)

    def _connect_failed(
        self, cycle: RequestCycle, replay: bytes | None, failure: answers.Failure
    ) -> None:
        """No connection to where the request was going: the next peer, or an answer."""
        if cycle.peer is not None:
            assert self._fallback is not None
            self._fallback.refused(cycle.peer)
            self._fall_back(cycle, [], replay, failure)
            return
        container = cycle.container
        assert container is not None
        self._note_down(container)
        if cycle.may_fall_back:
            self._fall_back(cycle, [], replay, failure)
        else:
            self._give_up(cycle, answers.FALLBACK_NO_CONTAINER if cycle.sender else failure)

    def _note_down(self, container: Container) -> None:
        """The container here took no request: while peers can, they take what they may."""
        fallback = self._fallback
        if fallback is not None and fallback.peers and not container.down:
            log.warning("%s is down: requests go to peers until it answers again", container.name)
            fallback.mark_down(container, container.config.health_check_path)

    def _fall_back(
        self,
        cycle: RequestCycle,
        rest: list[framing.ClientPiece],
        replay: bytes | None,
        failure: answers.Failure,
    ) -> bool:
        """Send the request to the next peer that may take it; ``failure`` is the answer
        if none does. False when connecting, as for :meth:`_dispatch`."""
        fallback = self._fallback
        assert fallback is not None
        if cycle.peer is None:  # it leaves this host: counted at the peer, not here
            container, cycle.container = cycle.container, None
            if container is not None:
                container.request_finished()
            head = cycle.head
            cycle.head = fallback.marked(head)
            if replay is not None:
                replay = cycle.head + replay[len(head) :]
            cycle.peers_left = fallback.candidates()
            cycle.failure = failure
        if not cycle.peers_left:
            fallback.unplaced += 1
            failure = cycle.failure or failure
            cycle.peer = None
            if cycle.held or replay is not None:
                self._give_up(cycle, failure)
            else:  # at the request's start: the caller drops its body
                self._fail(failure, close=False)
            return True
        cycle.peer = cycle.peers_left.pop(0)
        return self._dispatch(cycle, cycle.peer, rest, replay)

    def _give_up(self, cycle: RequestCycle, failure: answers.Failure) -> None:
        """No connection anywhere: answer the request ourselves, drop its body."""
        held, cycle.held = cycle.held, []
        self.resume_reading("connecting")
        self._fail(failure, close=False)
        for piece in held[1:]:
            assert not isinstance(piece, framing.RequestStarted)
            self._send(piece)
        if not self._closed:
            self._receive(None)

    def _fail(self, failure: answers.Failure, close: bool) -> None:
        """Answer the current request ourselves (the rest of its body is dropped)."""
        self._exchange.answered_locally(failure.status, close)
        self._write_own_answer(failure, close)
        self._answered()

    def _write_own_answer(self, failure: answers.Failure, close: bool) -> None:
        """Count and send an answer of the proxy's own."""
        cycle = self._cycle
        fields = failure.fields
        if failure is answers.FALLBACK_NO_CONTAINER and self._fallback is not None:
            assert cycle is not None
            fields = self._fallback.unserved(cycle.request.data)
        head_only = cycle is not None and cycle.request.method == b"HEAD"
        data = answers.plain_response(failure.status, failure.message, close, fields, head_only)
        if cycle is not None:
            cycle.status = failure.status
            cycle.bytes_out += len(data)
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def _refuse(self, failure: answers.Failure) -> None:
        """Answer (unless an answer already began) and close, reading no further request.

        For bad HTTP, and for a client too slow with its head or body. The upstream
        connection, if a request was on it, is closed: it is out of step.
        """
        transport = self._transport
        cycle = self._cycle
        if cycle is not None and cycle.target is not None:
            self._drop_upstream()  # a request went out on it: it is out of step now
        if (
            transport is None
            or transport.is_closing()
            or (cycle is not None and cycle.answer_begun)
        ):
            self._close_cycle()
            self.close()
            return
        if cycle is None:  # no request was under way: count the refused one
            self._open_cycle(_UNREADABLE_REQUEST)
        self._write_own_answer(failure, close=True)
        # Half-close and drop what still comes, so that the client reads the answer
        # instead of a reset.
        self._discarding = True
        self._close_cycle()
        self._paused_for = _NOT_PAUSED
        transport.resume_reading()
        if transport.can_write_eof():
            transport.write_eof()
        self._loop.call_later(LINGER, self._shut)

    def _drop_upstream(self) -> None:
        upstream, self._upstream = self._upstream, None
        if upstream is not None:
            upstream.fail()

    def _shut(self) -> None:
        """Close now; drop what the client never read rather than wait for it forever."""
        transport = self._transport
        if transport is None:
            return
        if transport.get_write_buffer_size():
            transport.abort()
        else:
            transport.close()

    def _time_out(self, kind: str, failure: answers.Failure | None) -> None:
        """A timeout of ``kind`` expired: answer ``failure`` if nothing was sent, close."""
        self._state.timeouts[kind] += 1
        cycle = self._cycle
        container = cycle.container if cycle is not None else None
        if log.isEnabledFor(logging.INFO):  # a wave of expiries: the arguments cost too
            log.info(
                "%s timeout: client %s, revision %s, request %s: %s",
                kind,
                self._peer(),
                container.revision if container is not None else NO_REVISION,
                _request_line(cycle),
                "closing the connection" if failure is None else f"{failure.status}, then closing",
            )
        if failure is None:  # the client does not read: nothing more can reach it
            self._drop_upstream()
            self._close_cycle()  # counted with the status of the answer it stopped reading
            if self._transport is not None:
                self._transport.abort()
            return
        if cycle is not None and cycle.answer_begun:
            cycle.status = failure.status  # what the request came to, for the books
        self._refuse(failure)

    # -- container to client -------------------------------------------------------

    def upstream_data(self, upstream: Upstream, data: bytes) -> None:
        """Bytes from a container: pass them on, noting where answers start and end."""
        transport = self._transport
        if upstream is not self._upstream or transport is None:
            return
        self._last_upstream = self._loop.time()
        exchange = self._exchange
        if exchange.switched:
            transport.write(data)
            return
        if self._fallback is not None and self._unserved(upstream, data):
            return
        encoder = self._encoder
        if encoder is not None and encoder.busy:
            # An earlier read is being compressed off the loop: this one waits its turn.
            # (Reading is paused meanwhile, but the client's resume_writing resumes it.)
            encoder.waiting.append(data)
            upstream.pause_reading()
            return
        try:
            pieces = exchange.upstream_data(data)
        except framing.UpstreamProtocolError as exc:
            # Logged once, by _upstream_failed; b"": the container closed its connection.
            self._upstream_failed(upstream, f"it sent bad HTTP: {exc}" if data else str(exc))
            return
        if not pieces:
            return
        cycle = self._cycle
        assert cycle is not None, "an answer's pieces with no request in progress"
        out = []
        ended = False
        for piece in pieces:
            raw = piece.data
            if isinstance(piece, framing.ResponseStarted):
                cycle.status = piece.status
                cycle.replay = None
                if self._front.compress:
                    encoder = self._encoder = self._encoder_for(cycle, piece)
                    if encoder is not None:
                        raw = encoder.head
                if self._closing or cycle.close_dropped:
                    # Shutting down: tell the client, so that it does not send its next
                    # request on a connection we are about to close. --keep-upstream: the
                    # client asked to close, and the container was not told.
                    raw = framing.with_connection_close(raw)
                if self._front.buffer_responses and self._request_gone_up(cycle):
                    # (Else it answers early, and its request still goes up: streamed.)
                    # The container's own head: whether it sent a length decides, not
                    # the compressed answer's chunked framing.
                    self._answer_begins(cycle, piece.data)
            elif encoder is not None:
                # Transform raw bytes: the body goes through the encoder, whose output
                # goes out below, once for this read.
                encoder.take(raw)
                if isinstance(piece, framing.MessageEnded):
                    ended = True
                    encoder.end()
                continue
            elif isinstance(piece, framing.MessageEnded):
                ended = True
            elif isinstance(piece, framing.ProtocolSwitched):
                cycle.status = piece.status
                cycle.replay = None
                upstream.upgrade()
            out.append(raw)
        if encoder is not None:
            if encoder.off_loop:
                self._encode_off_loop(upstream, encoder, out, ended)
                return
            out.append(encoder.encode())
            if ended:
                self._encoder = None
        # One write per read: a head and its body go out in one segment.
        data = out[0] if len(out) == 1 else b"".join(out)
        if not exchange.switched:
            self._emit(cycle, data, ended)
            return
        cycle.bytes_out += len(data)
        transport.write(data)
        upstream.write(exchange.take_client_leftover())
        self._close_cycle()
        self.resume_reading("answer")
        if self._send_mark is not None:  # the client is behind (--buffer-responses read on)
            upstream.pause_reading()

    def _emit(self, cycle: RequestCycle, data: bytes, ended: bool) -> None:
        """Where an answer's bytes (compressed, if they are) go: to the client, or into
        the buffer that holds what it cannot take yet. ``ended``: the answer ends here."""
        if cycle.buffer is not None:
            self._pass_buffered(cycle, cycle.buffer, data, ended)
            return
        cycle.bytes_out += len(data)
        assert self._transport is not None
        self._transport.write(data)
        if ended:
            self._answered()

    # -- --buffer-responses (see answerbuffer.py) ------------------------------------

    @staticmethod
    def _request_gone_up(cycle: RequestCycle) -> bool:
        """True when the whole request went to the container: read from the client, and a
        held body (--buffer-requests) all written. Only then may its answer be buffered
        and its connection let go of at the answer's end."""
        return cycle.received and (cycle.upload is None or cycle.upload.sent)

    def _answer_begins(self, cycle: RequestCycle, head: bytes) -> None:
        """An answer begins. Most clients take it as fast as it comes, and then nothing
        is held and nothing needs deciding: its head is kept until its client falls
        behind (if it does), to decide then whether it is buffered. If the client is
        behind already, now; an answer that streams then waits for it, as unbuffered."""
        cycle.answer_head = head
        if self._send_mark is not None:
            buffer = self._buffer_answer(cycle, given=False)
            if buffer is None and self._upstream is not None:
                self._upstream.pause_reading()

    def _buffer_answer(self, cycle: RequestCycle, given: bool) -> AnswerBuffer | None:
        """Decide, from its head, whether the cycle's answer is buffered (``given``:
        some of it went to the client already); its buffer, if so."""
        head, cycle.answer_head = cycle.answer_head, None
        assert head is not None
        front = self._front
        buffer = cycle.buffer = buffer_for(
            head, cycle.request.method, cycle.status, front.buffer_memory, front.buffer_dir
        )
        if buffer is not None:
            buffer.given = given
        return buffer

    def _pass_buffered(
        self, cycle: RequestCycle, buffer: AnswerBuffer, data: bytes, ended: bool
    ) -> None:
        """Bytes of a buffered answer: on to the client if it takes them now, else held
        (and the container read on). At the answer's end the container is let go."""
        if not data:
            pass  # the end of an answer delimited by the close
        elif self._send_mark is None and not buffer.holding:
            buffer.given = True
            cycle.bytes_out += len(data)
            assert self._transport is not None
            self._transport.write(data)
        else:
            buffer.hold(data, self._state.spool_trouble)
            cycle.buffered = _WITH_RESPONSE.get(cycle.buffered, cycle.buffered)
            if buffer.streaming and self._upstream is not None:
                self._upstream.pause_reading()  # until what is held is given
        if not ended:
            return
        if buffer.holding:
            self._answer_taken(cycle, buffer)
        else:
            self._answered()

    def _answer_taken(self, cycle: RequestCycle, buffer: AnswerBuffer) -> None:
        """The container's answer ended while the client still has some of it to read:
        the request is finished on the container (a drain need not wait for the client),
        and its connection goes back to the container's spares, or is closed, as the
        answer's framing says. A pipelined request waits until the client has it all."""
        buffer.taken = True
        if cycle.container is not None:
            cycle.container.request_finished()
        upstream, self._upstream = self._upstream, None
        cycle.target = None
        if upstream is not None:
            upstream.release()
            if self._exchange.upstream_reusable:
                upstream.park()
            else:
                upstream.close()
        self.pause_reading("answer")

    def _feed(self, cycle: RequestCycle, buffer: AnswerBuffer) -> None:
        """Give the client what is held for it, while it takes it; once it has all of an
        answer the container has ended, the request is answered."""
        transport = self._transport
        assert transport is not None
        while self._send_mark is None and not transport.is_closing():
            try:
                data = buffer.read()
            except OSError as exc:  # the spool's file could not be read back
                self._state.spool_trouble.failed(
                    exc, self._front.buffer_dir, "an answer held there was cut short"
                )
                cycle.status = answers.NO_ANSWER.status
                self._drop_upstream()
                self._close_cycle()
                self.close()
                return
            if not data:
                break
            buffer.given = True
            cycle.bytes_out += len(data)
            transport.write(data)
        if buffer.taken and not buffer.holding:
            self._answered()

    def _gap(self, buffer: AnswerBuffer) -> None:
        """The container sent nothing for STREAM_GAP: an answer without a length is a
        stream it keeps open, and from now on the container waits for the client."""
        if buffer.until_close and not buffer.streaming:
            buffer.streaming = True
            if buffer.holding and self._upstream is not None:
                self._upstream.pause_reading()

    def _encoder_for(
        self, cycle: RequestCycle, answer: framing.ResponseStarted
    ) -> AnswerEncoder | None:
        """An encoder for the answer starting, if --compress applies to it."""
        request = cycle.request
        encoder = compression.start(
            self._front, request.method, request.data, answer.status, answer.data
        )
        if encoder is not None:
            cycle.encoding = encoder.encoding
        return encoder

    def _encode_off_loop(
        self, upstream: Upstream, encoder: AnswerEncoder, out: list[bytes], ended: bool
    ) -> None:
        """Compress a large read on a worker thread, so that the loop serves every other
        connection meanwhile. What came before it (the head) goes out now; the container
        is not read until it is done, and a read that comes all the same waits (see
        upstream_data), so that no later read overtakes it."""
        cycle = self._cycle
        assert cycle is not None
        if out:
            self._emit(cycle, b"".join(out), False)
        encoder.busy = True
        upstream.pause_reading()
        if ended:
            # The framing saw this answer end: a request the client sends now would be
            # read as the next one while this answer is still to go out.
            self.pause_reading("compressing")
        job = self._loop.run_in_executor(None, encoder.compress, encoder.held())
        job.add_done_callback(functools.partial(self._encoded, upstream, encoder, ended))

    def _encoded(
        self,
        upstream: Upstream,
        encoder: AnswerEncoder,
        ended: bool,
        job: asyncio.Future[bytes],
    ) -> None:
        """A read compressed off the loop: pass it on, then what waited behind it."""
        encoder.busy = False
        cycle = self._cycle
        transport = self._transport
        attached = self._upstream  # a local, as in upstream_ended
        if (
            self._encoder is not encoder
            or attached is not upstream
            or cycle is None
            or transport is None
            or self._closed
        ):
            return  # the answer failed meanwhile (and its connections are closed)
        try:
            data = job.result()
        except Exception as exc:
            self._upstream_failed(upstream, f"compressing its answer failed: {exc!r}")
            return
        if self._send_mark is None or self._reads_on(cycle):  # else resume_writing will
            upstream.resume_reading()
        if ended:
            self._encoder = None
            self.resume_reading("compressing")
        self._emit(cycle, data, ended)
        # In order: one that finds the encoder busy again waits again, behind the others.
        waiting, encoder.waiting = encoder.waiting, []
        if waiting and self._upstream is not upstream:
            # The answer ended with the read just passed on, and its connection went back
            # to the spares: these bytes came after its end, out of turn. Kept, it would
            # give them to the next request as its answer.
            upstream.fail()
            return
        for data in waiting:
            self.upstream_data(upstream, data)
        if upstream.ended and self._upstream is upstream and not encoder.busy:
            # It closed while this read was compressed: an answer cut short fails now.
            self._upstream_failed(upstream, "the container closed the connection")

    def _unserved(self, upstream: Upstream, data: bytes) -> bool:
        """A peer answered that no container took the request there either: skip that
        peer for a while, and send the request to the next one (True: the answer is
        dropped). Any method may go: no app saw it. Unless it is over REPLAY_LIMIT or its
        body is still arriving: then the peer's 502 goes to the client."""
        cycle = self._cycle
        fallback = self._fallback
        if (
            cycle is None
            or cycle.peer is None
            or cycle.answer_begun
            or fallback is None
            or not fallback.is_unserved(data, cycle.head)
        ):
            return False
        log.info("%s has no container either: skipping it for a while", cycle.peer.name)
        fallback.refused(cycle.peer)
        replay, cycle.replay = cycle.replay, None
        if replay is None or not cycle.received:
            return False
        fallback.sent[cycle.peer.url] += 1  # as the peer counts it: received
        self._upstream = None
        upstream.fail()
        self._fall_back(cycle, [], bytes(replay), answers.NO_ANSWER)
        return True

    def upstream_ended(self, upstream: Upstream, reason: str) -> None:
        """A container's side of a connection ended (EOF or closed); idempotent."""
        # Through a local: a narrowed self._upstream would stay narrowed past the calls
        # below, which may clear it (see wunderproxy/native.py).
        attached = self._upstream
        if not upstream.end() or attached is not upstream:
            return
        if self._exchange.switched:
            self.close()
            return
        self.upstream_data(upstream, b"")  # an answer delimited by the end ends here
        encoder = self._encoder
        if encoder is not None and encoder.busy:
            return  # the end waits behind a read being compressed: see _encoded
        if self._upstream is upstream:
            self._upstream_failed(upstream, reason)

    def _upstream_failed(self, upstream: Upstream, reason: str) -> None:
        """The container (or peer) side failed; fail the request in flight on it, if any."""
        if self._upstream is upstream:
            self._upstream = None
        upstream.fail()
        cycle = self._cycle
        if cycle is None or cycle.target is not upstream or cycle.answered:
            # An idle keep-alive connection closed by the container, or one it closed
            # after answering early (the rest of the body is dropped): nothing lost.
            return
        target = upstream.target
        if cycle.buffer is not None:
            cycle.buffer.close()  # what is held of it is not worth giving
        if cycle.answer_begun:
            # Part of an answer went out: the client can only learn of the failure by
            # the connection closing.
            log.warning("%s failed in the middle of an answer: %s", target.name, reason)
            cycle.status = answers.NO_ANSWER.status
            self._close_cycle()
            self.close()
            return
        replay, cycle.replay = cycle.replay, None
        if replay is not None and cycle.received and cycle.request.method in IDEMPOTENT:
            # Not again to a container known down: Docker's proxy may still accept for it.
            container_down = cycle.container is not None and cycle.container.down
            if cycle.reused and not container_down:
                log.info(
                    "%s closed a kept-alive connection as a request went out: "
                    "sending it again on a new one",
                    target.name,
                )
                self._loop.create_task(self._connect(cycle, target, bytes(replay)))
                return
            if cycle.may_fall_back:
                # A new connection closed unanswered: the container (or peer) is going or
                # gone. Another peer may take the request.
                log.warning("%s closed a connection without answering: %s", target.name, reason)
                if cycle.peer is not None:
                    assert self._fallback is not None
                    self._fallback.refused(cycle.peer)
                elif cycle.container is not None:
                    self._note_down(cycle.container)
                self._fall_back(cycle, [], bytes(replay), answers.NO_ANSWER)
                return
        log.warning("request to %s failed: %s", target.name, reason)
        self._fail(answers.NO_ANSWER, close=True)
        self.close()

    # -- bookkeeping ---------------------------------------------------------------

    def _open_cycle(self, request: framing.RequestStarted) -> RequestCycle:
        """Count a request that starts (or was refused unread) and open its cycle."""
        self._state.request_started()
        self._state.active_connections += 1
        cycle = self._cycle = RequestCycle(request, self._loop.time())
        return cycle

    def _answered(self) -> None:
        """The current request's answer ended or failed: count it (once).

        Its cycle ends here too, unless the rest of its body is still to be read.
        """
        cycle = self._cycle
        if cycle is None or cycle.answered:
            return
        cycle.answered = True
        now = self._last_active = self._loop.time()  # the keep-alive clock starts again
        self._account(cycle, now - cycle.started_at)
        if cycle.received:
            self._end_cycle()

    def _close_cycle(self) -> None:
        """End the current request now, whatever state it is in (idempotent)."""
        self._answered()
        self._end_cycle()

    def _end_cycle(self) -> None:
        """The request was read and answered: let go of it, then go on reading."""
        cycle = self._cycle
        if cycle is None:
            return
        self._cycle = None
        self._state.active_connections -= 1
        upload = cycle.upload
        if upload is not None:
            if not upload.sent and cycle.target is not None and cycle.target is self._upstream:
                # Answered before its held body all went up: that connection is out of step.
                self._drop_upstream()  # (which lets the client read again if it held it)
            upload.close()
        container = cycle.container
        buffer = cycle.buffer
        if buffer is not None:
            buffer.close()
            if buffer.taken:
                container = None  # finished there when the answer was taken
        upstream = self._upstream
        if upstream is not None:
            upstream.release()
            if self._exchange.upstream_reusable and not (
                cycle.status in _BODILESS or cycle.request.method == b"HEAD"
            ):
                # Between requests the connection is its container's, not this client's
                # (as nginx's upstream keepalive has it): an idle client holds none, and
                # its next request takes a spare of the container serving then. Parking
                # closes it if that container is being drained. Not after an answer that
                # has no body by rule: a body its app sends all the same comes after the
                # answer's end, and would be read as another client's answer. That one
                # stays with its client, and is closed when the client leaves.
                self._upstream = None
                upstream.park()
            elif container is not None and container.state == "draining" and upstream.idle:
                # The container is being drained: it gets no further request from here.
                self._upstream = None
                upstream.close()
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
            # the pieces of this one. Its head is on the clock from now.
            self._head_since = self._loop.time()
            self._loop.call_soon(self._receive, None)

    def _account(self, cycle: RequestCycle, seconds: float) -> None:
        """Count the finished request, and log it if there is an access log."""
        container = cycle.container
        revision = container.config.revision if container is not None else NO_REVISION
        status = cycle.status or CLIENT_CLOSED_REQUEST
        self._state.request_finished(revision, status, seconds, cycle.bytes_in, cycle.bytes_out)
        fallback = None
        if self._fallback is not None:
            if cycle.peer is not None:
                fallback = f"to={cycle.peer.url}"
                self._fallback.sent[cycle.peer.url] += 1
            elif cycle.sender is not None:
                fallback = f"from={cycle.sender}"
                self._fallback.received[cycle.sender] += 1
        if self._access_log is not None:
            request = cycle.request
            self._access_log.request(
                self._client_host,
                request.data,
                request.method,
                request.target,
                status,
                cycle.bytes_out,
                seconds,
                revision,
                fallback,
                cycle.encoding,
                cycle.buffered,
            )

    def _peer(self) -> str:
        """The client's address for a log line (looked up only then: it costs a call)."""
        transport = self._transport
        peer = None
        if transport is not None and not transport.is_closing():
            peer = transport.get_extra_info("peername")
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "a client that has gone"


def _request_line(cycle: RequestCycle | None) -> str:
    """The request's method and target for a log line, or '-' before a head was read."""
    if cycle is None:
        return "-"
    request = cycle.request
    return f"{request.method.decode('latin-1')} {request.target.decode('latin-1')[:200]}"
