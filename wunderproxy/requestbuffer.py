"""``--buffer-requests``: a request's body read whole before any byte of it goes to the
container.

An app server with a process (or thread) per request, such as unicorn, puma in cluster
mode or gunicorn's sync workers, gives a worker to a connection as soon as it accepts it,
and the worker then waits on the socket for as long as the body takes to arrive: a client
uploading at 16 KiB/s holds it for the whole upload, and every request behind waits. So a
request whose body is not all there when its head arrives is held here, and routed only
once its body is whole: the proxy neither connects nor takes a kept-alive connection to
the container before then, and the container gets the whole request at the speed of the
local network. (A request that arrives whole, head and body in the first read, as most form
posts do, goes up as it is: it costs no app worker any waiting.)

The body is kept, exactly as received (chunk framing included), in a
:class:`~wunderproxy.spool.Spool`: in memory up to ``--buffer-memory``, the rest in an
unnamed temporary file under ``--buffer-dir``. It goes up a piece at a time while the
container's connection takes it (its transport's flow control), so that a large body is
never in memory whole; and it is what is sent again when a request may be (the keep-alive
race, a peer's fallback), whatever its size.

A client that sent ``Expect: 100-continue`` waits for a ``100 Continue`` before its body: the
proxy answers it itself, since it reads the body whatever the container would say, and
removes the field from the head that goes up, as nginx does: the container gets the body
with its head, so there is nothing left for it to wait on or to answer, and a second
``100 Continue`` of its own would reach a client that was told already.
"""

from __future__ import annotations

import re
from typing import Protocol

from wunderproxy.spool import Spool

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# An Expect field asking for 100-continue, and nothing else (RFC 9110 section 10.1.1).
_EXPECT_CONTINUE = re.compile(rb"\r\nexpect:[ \t]*100-continue[ \t]*(?=\r\n)", re.IGNORECASE)


class Writable(Protocol):
    """Where a buffered request goes: a connection to the container (or a peer)."""

    @property
    def writable(self) -> bool:
        """True while it takes more (open, and its transport not above its high-water mark)."""

    def write(self, data: bytes) -> None:
        """Send bytes on."""


class BufferedRequest:
    """A request body held until whole, then written on as its connection takes it."""

    __slots__ = ("_sent", "spool")

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self._sent = 0  # bytes of the body written on the connection now carrying it

    def add(self, data: bytes) -> None:
        """Keep more of the body; OSError when it cannot be stored (a full disk, a missing
        ``--buffer-dir``)."""
        self.spool.write(data)

    def rewind(self) -> None:
        """Write it from its start again, on a new connection."""
        self._sent = 0

    @property
    def sent(self) -> bool:
        """True once the whole body was written on."""
        return self._sent == self.spool.size

    def send(self, upstream: Writable) -> None:
        """Write on from where it stopped, as long as ``upstream`` takes more; called again
        when it does (its ``resume_writing``)."""
        spool = self.spool
        while self._sent < spool.size and upstream.writable:
            data = spool.read_at(self._sent)
            if not data:  # let go of meanwhile: the request is over, nothing goes on
                break
            self._sent += len(data)
            upstream.write(data)

    def close(self) -> None:
        """Let go of its memory and its file (idempotent)."""
        self.spool.close()


def without_continue(head: bytes) -> bytes | None:
    """``head`` without its ``Expect: 100-continue`` field, or None when it has none, or is
    HTTP/1.0 (whose expectation a server ignores, RFC 9110 section 10.1.1)."""
    if head[head.find(b"\r\n") - 1] != 0x31:  # the request line does not end in "1.1"
        return None
    stripped, found = _EXPECT_CONTINUE.subn(b"", head, count=1)
    return stripped if found else None
