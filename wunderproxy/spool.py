"""A body held for later (``--buffer-requests``, ``--buffer-responses``): in memory up to a
bound, the rest in a temporary file.

The file is made with ``tempfile.TemporaryFile``, which on Linux never has a name
(``O_TMPFILE``) and elsewhere is unlinked at once: whatever ends the process, a crash or
``kill -9`` included, the kernel frees its blocks, and no file is ever left to clean up.
Writes and reads are plain system calls on the event loop: they reach the page cache, not
the disk, and take microseconds for the chunk sizes a socket delivers.

A spool is a queue: bytes come out in the order they went in, and may go in while earlier
ones come out (an answer read off the container while its client takes what came before).
A request's body, written whole first, is instead read with :meth:`Spool.read_at`, as often
as it is sent.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger("wunderproxy.proxy")

# Bytes read back at a time: a few socket buffers' worth.
READ_SIZE = 256 * 1024
# Seconds between two warnings that spool files fail (each says how many failed so far).
TROUBLE_WARNING_INTERVAL = 60.0


class Spool:
    """Bytes written, then read back in order; writing may go on while reading.

    At most ``memory`` bytes are held in memory; the rest goes to a file under
    ``directory``, made when the first byte does not fit. Once the file holds bytes not
    yet read, every later byte goes after them, to the file; once it has been read to its
    end, memory is used again and the file is written over from its start: a long stream
    held a little at a time never grows the file beyond the most that waited at once.
    """

    __slots__ = ("_directory", "_file", "_file_read", "_file_written", "_limit", "_memory", "size")

    def __init__(self, memory: int, directory: Path) -> None:
        self._limit = memory
        self._directory = directory
        self._memory = bytearray()  # the oldest bytes not read yet
        self._file: BinaryIO | None = None
        self._file_written = 0  # offsets in the file: the bytes after the memory's
        self._file_read = 0
        self.size = 0  # bytes written

    @property
    def in_memory(self) -> int:
        """Bytes held in memory now."""
        return len(self._memory)

    @property
    def on_disk(self) -> bool:
        """True once part of the body went to a file."""
        return self._file is not None

    @property
    def unread(self) -> int:
        """Bytes written and not read yet."""
        return len(self._memory) + self._file_written - self._file_read

    def write(self, data: bytes) -> None:
        """Append ``data``; OSError when the file cannot be made or grown (the disk is
        full, ``--buffer-dir`` is missing or not writable), and then none of ``data`` is
        kept: the caller still has all of it."""
        if self._file_written == self._file_read:  # nothing waits in the file: memory first
            room = self._limit - len(self._memory)
            if room >= len(data):
                self._memory += data
                self.size += len(data)
                return
            if room > 0:
                # The file's part first: if it fails, memory is as it was.
                self._append_to_file(data[room:])
                self._memory += data[:room]
                self.size += len(data)
                return
        self._append_to_file(data)
        self.size += len(data)

    def _append_to_file(self, data: bytes) -> None:
        if self._file is None:
            # Unbuffered: the file is written in the socket's chunks already.
            self._file = tempfile.TemporaryFile(  # noqa: SIM115 (closed by close())
                buffering=0, dir=self._directory, prefix="wunderproxy-"
            )
        descriptor = self._file.fileno()
        at = self._file_written
        view = memoryview(data)
        while view:  # a write to a filling disk may take part of it, then fail
            written = os.pwrite(descriptor, view, at)
            at += written
            view = view[written:]
        self._file_written = at  # only now: bytes of a failed write are never read back

    def read(self) -> bytes:
        """The next bytes in order, at most READ_SIZE of them; b"" when none wait."""
        memory = self._memory
        if memory:
            if len(memory) <= READ_SIZE:
                data = bytes(memory)
                memory.clear()
            else:
                data = bytes(memory[:READ_SIZE])
                del memory[:READ_SIZE]  # cheap: a bytearray drops its head in place
            return data
        left = self._file_written - self._file_read
        if not left:
            return b""
        assert self._file is not None
        data = os.pread(self._file.fileno(), min(READ_SIZE, left), self._file_read)
        if not data:
            raise OSError(f"the spool file ended {left} bytes early")
        self._file_read += len(data)
        if self._file_read == self._file_written:  # read to its end: start it over
            self._file_read = self._file_written = 0
        return data

    def read_at(self, offset: int) -> bytes:
        """At most READ_SIZE bytes from ``offset`` of all written (b"" at the end), as often
        as asked: for a body written whole and sent again from its start. Only for a
        spool never :meth:`read`, which lets go of what it returns."""
        memory = self._memory
        if offset < len(memory):
            with memoryview(memory) as view:  # one copy, not two
                return view[offset : offset + READ_SIZE].tobytes()
        at = offset - len(memory)
        if self._file is None or at >= self._file_written:
            return b""
        return os.pread(self._file.fileno(), min(READ_SIZE, self._file_written - at), at)

    def close(self) -> None:
        """Let go of the memory and the file (idempotent): the file's blocks are freed."""
        self._memory = bytearray()
        self._file_read = self._file_written = 0
        if self._file is not None:
            self._file.close()
            self._file = None


class SpoolTrouble:
    """Spool files that could not be made or grown, for one proxy: counted, and said with
    what to do at most once a minute (a full disk fails every large body alike)."""

    __slots__ = ("_quiet_until", "failures")

    def __init__(self) -> None:
        self.failures = 0
        self._quiet_until = 0.0

    def failed(self, exc: OSError, directory: Path, meanwhile: str) -> None:
        """A spool's file under ``directory`` failed with ``exc``; ``meanwhile``: what the
        proxy does instead."""
        self.failures += 1
        now = time.monotonic()
        if now < self._quiet_until:
            return
        self._quiet_until = now + TROUBLE_WARNING_INTERVAL
        log.warning(
            "cannot hold a buffered body in a file under %s (%s; %d so far): %s. Free disk "
            "space there, or point --buffer-dir at a directory with room",
            directory,
            exc.strerror or exc,
            self.failures,
            meanwhile,
        )
