"""``--buffer-responses``: an answer read off the container as fast as it comes, and held
for a client that reads slower.

An app server with a process per request (unicorn, gunicorn's sync workers) is held by a
slow client for as long as its answer takes to reach it, unless something in front takes
the answer at once. The proxy does, as nginx's ``proxy_buffering`` does:

- While the client takes what it is sent, the answer goes on to it as it comes: nothing is
  held or even decided, and a fast client costs nothing more than without buffering.
- When the client falls behind (its transport paused writing), the answer's head decides
  whether it is buffered (:func:`buffer_for`). If it is, the container is read on, and what
  the client has not taken yet is held in a :class:`~wunderproxy.spool.Spool`:
  ``--buffer-memory`` bytes in memory, the rest in a file under ``--buffer-dir``. The
  client is fed from it whenever it drains.
- Once the container's answer has ended, the container is let go: the request is finished
  there (a drain does not wait for the client) and its connection is kept for another
  request or closed, as the answer's framing says. The request itself ends when the client
  has been given the last byte.

Streamed as before (the container waits for the client): event streams
(``text/event-stream``), answers whose app says ``X-Accel-Buffering: no`` (nginx's
convention), answers without a body, upgrades, and answers that started before the request
was whole. An answer without a length (chunked, or until the close) is buffered while it
comes, but once the container has sent nothing for :data:`STREAM_GAP` it is a stream it
keeps open: what is held goes to the client, and from then on the container waits for the
client again. If the spool's file cannot be made or grown (disk full, ``--buffer-dir``
gone), the answer streams the same way (after what is held), and the log says so.
"""

from __future__ import annotations

from pathlib import Path

from wunderproxy.fields import fields_pattern, stripped
from wunderproxy.spool import Spool, SpoolTrouble

# Seconds without a byte from the container after which an answer without a length counts
# as a stream it keeps open (a long poll, a log tail): long enough for an app that pauses
# to compute between parts of a large page, short enough that a person watching a stream
# sees it move again at once.
STREAM_GAP = 1.0

# Bytes of one answer held for its client at most (nginx proxy_max_temp_file_size, 1 GiB):
# past it the container waits for the client again, so that one client reading a trickle
# of a huge answer cannot fill the disk.
MAX_HELD = 1024 * 1024 * 1024

_FIELDS = fields_pattern("content-type", "content-length", "x-accel-buffering")


class AnswerBuffer:
    """What is held of one answer, and how far it has come."""

    __slots__ = (
        "_directory",
        "_memory",
        "_spool",
        "_tail",
        "given",
        "streaming",
        "taken",
        "until_close",
    )

    def __init__(self, memory: int, directory: Path, until_close: bool) -> None:
        self._memory = memory
        self._directory = directory
        self._spool: Spool | None = None  # made when the first byte must wait
        self._tail: list[bytes] = []  # held after the spool's bytes, once streaming
        self.until_close = until_close  # no length: the gap rule applies
        self.streaming = False  # the container waits for the client again
        self.taken = False  # the container's answer ended; the client still has some to read
        self.given = False  # some of it went to the client

    @property
    def reads_on(self) -> bool:
        """True while the container is read whatever the client's pace."""
        return not self.streaming

    @property
    def holding(self) -> bool:
        """True while bytes wait for the client."""
        return bool(self._tail) or (self._spool is not None and self._spool.unread > 0)

    def hold(self, data: bytes, trouble: SpoolTrouble) -> None:
        """Keep ``data`` until the client can take it. If the spool's file cannot take it,
        the answer streams from now on (``streaming``), ``data`` waiting in memory."""
        if self.streaming:
            # The container is paused after each read while anything waits for the
            # client, so the tail is one read at most.
            self._tail.append(data)
            return
        spool = self._spool
        if spool is None:
            spool = self._spool = Spool(self._memory, self._directory)
        try:
            spool.write(data)
        except OSError as exc:
            trouble.failed(exc, self._directory, "answers stream to slow clients, holding the app")
            self.streaming = True
            self._tail.append(data)
            return
        if spool.unread > MAX_HELD:
            self.streaming = True

    def read(self) -> bytes:
        """The next bytes for the client, in order (b"": none wait); OSError if the
        spool's file cannot be read back."""
        if self._spool is not None:
            data = self._spool.read()
            if data:
                return data
        if self._tail:
            return self._tail.pop(0)
        return b""

    def close(self) -> None:
        """Let go of what is held, memory and file (idempotent)."""
        self._tail = []
        if self._spool is not None:
            self._spool.close()


def buffer_for(
    head: bytes, method: bytes, status: int, memory: int, directory: Path
) -> AnswerBuffer | None:
    """The buffer of an answer to ``method`` with this ``head`` and ``status``, or None if
    it streams: it has no body, is an event stream, or its app asked for no buffering."""
    if method == b"HEAD" or status in (204, 304):
        return None
    length: bytes | None = None
    for field in _FIELDS.finditer(head):
        name, value = field.group(1).lower(), stripped(field.group(2)).lower()
        if name == b"content-length":
            length = value
        elif name == b"content-type":
            if value.partition(b";")[0].rstrip(b" \t") == b"text/event-stream":
                return None
        elif value == b"no":  # X-Accel-Buffering
            return None
    if length == b"0":
        return None
    return AnswerBuffer(memory, directory, until_close=length is None)
