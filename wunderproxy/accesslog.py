"""The access log: one line per request, written by a thread so a slow disk never stalls us.

For each request the event loop only appends its facts to a list. Every ``FLUSH_INTERVAL``
the list is formatted into lines, in one batch (formatting each line as its request ended
cost several times more, the objects involved being out of the CPU caches by then), joined
into one chunk and handed to a writer thread, which appends it to the file (or standard
output, for ``-``). If the disk cannot keep up and ``MAX_QUEUED_CHUNKS`` chunks
wait, newer lines are dropped and counted, and a warning says how many: the proxy keeps
serving at full speed whatever the log does.

Before each write the thread checks whether the file was moved or deleted (logrotate's
default) and then opens a new one, so no signal is needed after a rotation.

With ``--workers N`` every worker process writes its own lines to the same destination, with
no writer in between: a file is opened with ``O_APPEND``, and on Linux one ``write(2)`` to a
regular file opened so is never interleaved with another process's. To a pipe (standard
output read by systemd or Docker) only a write of at most ``PIPE_BUF`` (4096) bytes is, so
lines go to standard output in pieces of whole lines of at most that size (a single longer
line alone).

Formats (the fields the issue asks for; ``-`` where a value is missing):

- ``common``: the Common Log Format, then the ``X-Forwarded-For`` header in quotes, the
  revision that answered, the response time in seconds, the peer fallback (``-``; or
  ``to=URL`` for a request sent to a peer, ``from=INSTANCE`` for one a peer sent here),
  the answer's encoding by ``--compress`` (``-``: none) and what was buffered
  (``-``, ``request``, ``response`` or ``both``)::

    127.0.0.1 - - [26/Nov/2026:10:00:00 +0000] "GET /a HTTP/1.1" 200 612 "-" rev2 0.001234 - - -

  The byte count is what was sent to the client: head and body.
- ``json``: one object per line with ``time``, ``client``, ``forwarded_for``, ``method``,
  ``target``, ``protocol``, ``status``, ``bytes``, ``duration_seconds``, ``revision``,
  ``fallback``, ``encoding`` and ``buffered`` (null, or as above).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import re
import select
import threading
import time
from typing import Literal, TypeAlias

log = logging.getLogger("wunderproxy.accesslog")

AccessLogFormat = Literal["common", "json"]
ACCESS_LOG_FORMATS: tuple[AccessLogFormat, ...] = ("common", "json")
STDOUT = "-"

FLUSH_INTERVAL = 0.05  # seconds a line may wait before it goes to the writer thread
MAX_QUEUED_CHUNKS = 600  # about 30 s of lines waiting for a stalled disk
CLOSE_TIMEOUT = 5.0  # seconds shutdown waits for the writer to finish
# A status for a request whose client left before any answer (nginx's convention).
CLIENT_CLOSED_REQUEST = 499

# Bytes one write(2) to a pipe puts in it whole, never interleaved with another writer's
# (pipe(7); 4096 on Linux).
PIPE_BUF = select.PIPE_BUF

_FORWARDED_FOR = re.compile(rb"\nx-forwarded-for:[ \t]*([^\r\n]*?)[ \t]*(?=\r?\n)", re.IGNORECASE)


def forwarded_for(head: bytes) -> str | None:
    """The ``X-Forwarded-For`` value(s) of a request head, joined as RFC 9110 allows."""
    values = _FORWARDED_FOR.findall(head)
    return b", ".join(values).decode("latin-1") if values else None


def protocol_of(head: bytes) -> str:
    """``HTTP/1.1`` or ``HTTP/1.0``: the last word of the request line."""
    end = head.find(b"\n")
    line = head[:end] if end >= 0 else head
    return line.rstrip(b"\r").rpartition(b" ")[2].decode("latin-1") or "-"


# What is logged of a request: its end (Unix time), client, head, method, target, status,
# bytes sent, seconds taken, revision, peer fallback, encoding, buffered.
_Request: TypeAlias = tuple[
    float, str | None, bytes, bytes, bytes, int, int, float, str, str | None, str | None, str | None
]


def whole_lines(chunk: bytes, limit: int) -> list[bytes]:
    """``chunk`` (lines, each ending with a newline) cut into pieces of whole lines of at
    most ``limit`` bytes; a line longer than ``limit`` is a piece of its own."""
    pieces: list[bytes] = []
    start = 0
    while len(chunk) - start > limit:
        end = chunk.rfind(b"\n", start, start + limit) + 1
        if end <= start:  # one line longer than the limit
            end = chunk.find(b"\n", start + limit) + 1 or len(chunk)
        pieces.append(chunk[start:end])
        start = end
    if start < len(chunk):
        pieces.append(chunk[start:])
    return pieces


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


class AccessLog:
    """Formats request lines on the event loop and writes them from a thread."""

    def __init__(self, destination: str, line_format: AccessLogFormat = "common") -> None:
        self.destination = destination
        self.line_format = line_format
        self._json = line_format == "json"
        self._requests: list[_Request] = []
        self._chunks: queue.Queue[bytes | None] = queue.Queue(maxsize=MAX_QUEUED_CHUNKS)
        self._dropped = 0
        self._second = -1
        self._stamp = ""
        self._fd = self._open()
        self._thread = threading.Thread(target=self._write_chunks, name="access-log", daemon=True)
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Start the writer thread and the periodic hand-over (needs a running loop)."""
        self._thread.start()
        self._timer = asyncio.get_running_loop().call_later(FLUSH_INTERVAL, self._flush)

    async def close(self) -> None:
        """Write every line still held, then stop the thread and close the file."""
        if self._timer is not None:
            self._timer.cancel()
        self._hand_over()
        if self._thread.ident is None:  # never started
            self._close_file()
            return
        # Waited for in a thread, and only so long: the disk may be the thing that stalls.
        if await asyncio.get_running_loop().run_in_executor(None, self._stop_writer):
            self._close_file()

    def _stop_writer(self) -> bool:
        """Tell the writer to finish and wait for it; False if it did not in time."""
        try:
            self._chunks.put(None, timeout=CLOSE_TIMEOUT)
        except queue.Full:
            pass
        else:
            self._thread.join(CLOSE_TIMEOUT)
        if self._thread.is_alive():
            log.error(
                "access log %s: writing is stuck; %d chunks of lines were not written",
                self.destination,
                self._chunks.qsize(),
            )
            return False
        return True

    def _close_file(self) -> None:
        if self.destination != STDOUT:
            os.close(self._fd)

    def request(
        self,
        client: str | None,
        head: bytes,
        method: bytes,
        target: bytes,
        status: int,
        bytes_out: int,
        seconds: float,
        revision: str,
        fallback: str | None = None,
        encoding: str | None = None,
        buffered: str | None = None,
    ) -> None:
        """Log one request (``head``: its head as received, for the protocol and XFF;
        ``fallback``: ``to=URL`` or ``from=INSTANCE`` if it went to or came from a peer;
        ``encoding``: how --compress encoded the answer; ``buffered``: ``request``,
        ``response`` or ``both``)."""
        self._requests.append(
            (
                time.time(),
                client,
                head,
                method,
                target,
                status,
                bytes_out,
                seconds,
                revision,
                fallback,
                encoding,
                buffered,
            )
        )

    def _line(self, request: _Request) -> str:
        (
            now,
            client,
            head,
            method,
            target,
            status,
            bytes_out,
            seconds,
            revision,
            fallback,
            encoding,
            buffered,
        ) = request
        second = int(now)
        if second != self._second:
            self._second = second
            if self._json:
                self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            else:
                self._stamp = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(second))
        if self._json:
            line = json.dumps(
                {
                    "time": f"{self._stamp}.{int((now - second) * 1000):03d}Z",
                    "client": client,
                    "forwarded_for": forwarded_for(head),
                    "method": method.decode("latin-1"),
                    "target": target.decode("latin-1"),
                    "protocol": protocol_of(head),
                    "status": status,
                    "bytes": bytes_out,
                    "duration_seconds": round(seconds, 6),
                    "revision": revision,
                    "fallback": fallback,
                    "encoding": encoding,
                    "buffered": buffered,
                },
                separators=(",", ":"),
            )
        else:
            request_line = _quoted(
                f"{method.decode('latin-1')} {target.decode('latin-1')} {protocol_of(head)}"
            )
            line = (
                f'{client or "-"} - - [{self._stamp}] "{request_line}" {status} {bytes_out} '
                f'"{_quoted(forwarded_for(head) or "-")}" {revision} {seconds:.6f} '
                f"{fallback or '-'} {encoding or '-'} {buffered or '-'}"
            )
        return line + "\n"

    # -- on the event loop -----------------------------------------------------------

    def _flush(self) -> None:
        self._hand_over()
        self._timer = asyncio.get_running_loop().call_later(FLUSH_INTERVAL, self._flush)

    def _hand_over(self) -> None:
        requests, self._requests = self._requests, []
        if requests and self._chunks.full():
            self._dropped += len(requests)
        elif requests:
            chunk = "".join([self._line(request) for request in requests])
            self._chunks.put_nowait(chunk.encode("utf-8", "replace"))
        if self._dropped and not self._chunks.full():
            log.warning(
                "access log %s: dropped %d lines because writing fell behind; check the disk",
                self.destination,
                self._dropped,
            )
            self._dropped = 0

    # -- on the writer thread --------------------------------------------------------

    def _open(self) -> int:
        if self.destination == STDOUT:
            return 1
        return os.open(self.destination, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _write_chunks(self) -> None:
        while (chunk := self._chunks.get()) is not None:
            try:
                self._reopen_if_rotated()
                pieces = whole_lines(chunk, PIPE_BUF) if self.destination == STDOUT else [chunk]
                for piece in pieces:
                    view = memoryview(piece)
                    while view:
                        view = view[os.write(self._fd, view) :]
            except OSError as exc:
                log.error("could not write the access log %s: %s", self.destination, exc)

    def _reopen_if_rotated(self) -> None:
        if self.destination == STDOUT:
            return
        try:
            moved = os.stat(self.destination).st_ino != os.fstat(self._fd).st_ino
        except FileNotFoundError:
            moved = True
        if moved:
            old, self._fd = self._fd, self._open()
            os.close(old)
