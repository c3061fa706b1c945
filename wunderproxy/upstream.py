"""One connection from the proxy to a container, and the idle ones kept for reuse.

An :class:`Upstream` carries one request at a time. A client connection takes it with
:meth:`Upstream.attach` for a request, marks it idle with :meth:`Upstream.release` when the
answer is complete, and gives it up with :meth:`Upstream.park` then: a kept-alive connection
waits in its container's ``spare`` list for the next request, whichever client sends it,
since opening one per request costs the container an accept and a close, and us a connect,
and one held by each idle client costs memory. The few a client keeps between requests
instead (after an answer that has no body by rule, or one that spent the connection) it
closes when it leaves. Nothing outside this class sets its fields.
"""

from __future__ import annotations

import asyncio
from typing import Protocol, cast

from wunderproxy.state import Link

# Idle connections kept open to a container for the next request. Each one was opened
# for a request while every other was busy, so there are never more than the peak of
# requests in flight at once; the bound only keeps a burst's worth. nginx's example
# keeps 64, and closes the rest: with a thousand busy clients (the suite's c1000) that
# opened and closed a connection for most requests, and cost 1.7 times the CPU per request.
MAX_SPARE = 1024


class Target(Protocol):
    """Where upstream connections go: a container here, or a peer's proxy."""

    host: str
    port: int
    links: set[Link]  # its open connections
    spare: list[Link]  # its idle ones kept for the next request, whichever client sends it

    @property
    def state(self) -> str:
        """ "serving" while new requests may go there."""

    @property
    def name(self) -> str:
        """How log lines name it."""

    def upgrade_started(self) -> None:
        """A connection there left HTTP."""

    def upgrade_finished(self) -> None:
        """An upgraded connection there ended."""


class UpstreamClient(Protocol):
    """The client connection an upstream connection serves, as the upstream sees it."""

    def upstream_data(self, upstream: Upstream, data: bytes) -> None:
        """Bytes from the container."""

    def upstream_ended(self, upstream: Upstream, reason: str) -> None:
        """The container's side ended (EOF or closed)."""

    def pause_reading(self, reason: str) -> None:
        """Stop reading from the client."""

    def resume_reading(self, reason: str) -> None:
        """Read from the client again."""

    def upstream_writable(self, upstream: Upstream) -> None:
        """The container takes more of the request again (writing was paused)."""

    def close(self) -> None:
        """Close the client connection."""


class Upstream(asyncio.Protocol):
    """One connection to a container (or a peer), carrying one client's request at a time.

    It is a :class:`~wunderproxy.state.Link` of its target, so that a container's drain can
    close it between requests, or cut it (with its upgraded client) at the drain deadline.
    """

    # Slots: one of these per request in flight and per spare (up to MAX_SPARE a target),
    # so its size counts in memory per connection.
    __slots__ = (
        "_busy",
        "_client",
        "_ended",
        "_upgraded",
        "_writing_paused",
        "target",
        "transport",
    )

    def __init__(self, target: Target) -> None:
        self.target = target
        self.transport: asyncio.Transport | None = None
        self._client: UpstreamClient | None = None
        # Made for a request: busy from the start, or a drain could close it while it
        # is still being connected.
        self._busy = True
        self._upgraded = False
        self._ended = False
        self._writing_paused = False  # the container takes the request slower than it comes
        target.links.add(self)

    # -- what the client connection does with it -----------------------------------

    def attach(self, client: UpstreamClient) -> None:
        """Carry a request of ``client`` (this connection's client from now on)."""
        self._client = client
        self._busy = True

    def release(self) -> None:
        """The answer is complete: idle, and its client no longer waits on it. The client
        then parks it, or keeps it for its own next request, or closes it."""
        self._busy = False

    def upgrade(self) -> None:
        """The container switched protocols: bytes flow both ways until either side closes."""
        self._upgraded = True
        self.target.upgrade_started()

    def park(self) -> None:
        """Its answer is complete: keep this idle connection among its target's spares
        for the next request, whichever client sends it; close it instead when it may not
        carry one (busy, request bytes unsent, upgraded, ended, its target no longer
        serving, or MAX_SPARE spares there already)."""
        target = self.target
        transport = self.transport
        if (
            self._busy
            or self._writing_paused  # bytes of its request still unsent: mid-request
            or self._upgraded
            or self._ended
            or transport is None
            or transport.is_closing()
            or target.state != "serving"
            or len(target.spare) >= MAX_SPARE
        ):
            self.close()
            return
        self._client = None
        transport.resume_reading()
        target.spare.append(self)

    def end(self) -> bool:
        """The container's side ended; False when that was already known."""
        if self._ended:
            return False
        self._ended = True
        return True

    def fail(self) -> None:
        """The connection broke or went out of step: never use it again."""
        self._ended = True
        self.close()

    def write(self, data: bytes) -> None:
        """Send bytes to the container (dropped if the connection is not open)."""
        transport = self.transport
        if transport is not None and data and not transport.is_closing():
            transport.write(data)

    def write_eof(self) -> None:
        """Half-close toward the container (an upgraded client half-closed)."""
        if self.transport is not None and self.transport.can_write_eof():
            self.transport.write_eof()

    def pause_reading(self) -> None:
        """Stop reading the container's answer (the client reads slower than it comes)."""
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        """Read the container's answer again."""
        if self.transport is not None:
            self.transport.resume_reading()

    @property
    def writable(self) -> bool:
        """True while writing more makes sense: open, and not paused by flow control."""
        transport = self.transport
        return not self._writing_paused and transport is not None and not transport.is_closing()

    @property
    def ended(self) -> bool:
        """True once the container closed its side, or the connection failed."""
        return self._ended

    @property
    def idle(self) -> bool:
        """True between requests: closing it now loses nothing."""
        return not self._busy and not self._upgraded

    def close(self) -> None:
        """Close it now (and the client too if upgraded: it has no other way to go on).

        What is still unsent goes out first (the transport flushes before it closes), and
        a client paused while it waited (:meth:`pause_writing`) reads again: nothing else
        would resume it once this connection is gone.
        """
        self._forget()
        if self.transport is not None:
            self.transport.close()
        client = self._client
        if client is not None:
            if self._upgraded:
                client.close()
            elif self._writing_paused:
                client.resume_reading("upstream")

    def _forget(self) -> None:
        self.target.links.discard(self)
        if self in self.target.spare:
            self.target.spare.remove(self)

    # -- asyncio.Protocol --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self._client is None:
            self.fail()  # a spare connection is talked to: out of step
            return
        self._client.upstream_data(self, data)

    def eof_received(self) -> bool:
        if self._client is None:
            self._ended = True
            self._forget()
        else:
            self._client.upstream_ended(self, "the container closed the connection")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget()
        if self._upgraded:
            self._upgraded = False
            self.target.upgrade_finished()
        if self._client is not None:
            self._client.upstream_ended(self, str(exc) if exc else "the connection was closed")

    def pause_writing(self) -> None:  # the container reads an upload slower than it comes
        self._writing_paused = True
        if self._client is not None:
            self._client.pause_reading("upstream")

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._client is not None:
            self._client.upstream_writable(self)


def take_spare(target: Target) -> Upstream | None:
    """An idle connection to ``target`` left by an earlier request, if one is open."""
    while target.spare:
        upstream = cast(Upstream, target.spare.pop())
        transport = upstream.transport
        if not upstream.ended and transport is not None and not transport.is_closing():
            return upstream
    return None
