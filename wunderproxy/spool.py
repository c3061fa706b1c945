"""A body held for later (``--buffer-requests``, ``--buffer-responses``): in memory up to a
bound, the rest in a temporary file.

The file is made with ``tempfile.TemporaryFile``, which on Linux never has a name
(``O_TMPFILE``) and elsewhere is unlinked at once: whatever ends the process, a crash or
``kill -9`` included, the kernel frees its blocks, and no file is ever left to clean up.
Writes and reads are plain system calls on the event loop: they reach the page cache, not
the disk, and take microseconds for the chunk sizes a socket delivers.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO

from wunderproxy.config import ConfigError

# Bytes read back from the file at a time: a few socket buffers' worth.
READ_SIZE = 256 * 1024


class Spool:
    """Bytes written once, then read back from the start: once with :meth:`read`, which
    lets go of the memory as it goes, or as often as need be with :meth:`read_at` (a
    request sent again), which keeps all until :meth:`close`. One or the other, not both.

    At most ``memory`` bytes are held in memory; the rest goes to a file under
    ``directory``, made when the first byte does not fit.
    """

    __slots__ = ("_directory", "_file", "_limit", "_memory", "_reading", "size")

    def __init__(self, memory: int, directory: Path) -> None:
        self._limit = memory
        self._directory = directory
        self._memory = bytearray()
        self._file: BinaryIO | None = None
        self._reading = False
        self.size = 0  # bytes written

    @property
    def in_memory(self) -> int:
        """Bytes held in memory now."""
        return len(self._memory)

    @property
    def on_disk(self) -> bool:
        """True once part of the body went to a file."""
        return self._file is not None

    def write(self, data: bytes) -> None:
        """Append ``data`` (before the first read); OSError when the file cannot be made
        or grown (the disk is full, ``--buffer-dir`` is missing or not writable)."""
        assert not self._reading, "a spool is written, then read"
        self.size += len(data)
        room = self._limit - len(self._memory)
        if room > 0:
            self._memory += data[:room]
            data = data[room:]
        if data:
            if self._file is None:
                # Unbuffered: the file is written in the socket's chunks already.
                self._file = tempfile.TemporaryFile(  # noqa: SIM115 (closed by close())
                    buffering=0, dir=self._directory, prefix="wunderproxy-"
                )
            # An unbuffered write may take only part (the disk filling up): the rest is
            # written again, and then fails with the reason.
            written = self._file.write(data)
            while written < len(data):
                written += self._file.write(data[written:])

    def read(self) -> bytes:
        """The next bytes in order, b"" after the last: first all that is in memory (let
        go of as it is returned), then the file's in READ_SIZE pieces."""
        if not self._reading:
            self._reading = True
            if self._file is not None:
                self._file.seek(0)
            if self._memory:
                data, self._memory = bytes(self._memory), bytearray()
                return data
        if self._file is None:
            return b""
        return self._file.read(READ_SIZE) or b""

    def read_at(self, offset: int) -> bytes:
        """At most READ_SIZE bytes from ``offset`` on (b"" at the end), after the last write.
        Nothing is let go, and the file's position does not matter (``pread``)."""
        self._reading = True
        memory = self._memory
        if offset < len(memory):
            with memoryview(memory) as view:  # one copy, not two
                return view[offset : offset + READ_SIZE].tobytes()
        if self._file is None:
            return b""
        return os.pread(self._file.fileno(), READ_SIZE, offset - len(memory))

    def close(self) -> None:
        """Let go of the memory and the file (idempotent): the file's blocks are freed."""
        self._memory = bytearray()
        if self._file is not None:
            self._file.close()
            self._file = None


def check_directory(directory: Path, option: str) -> None:
    """Refuse to start when a spool's file cannot be made under ``directory`` (missing, not
    a directory, not writable, or a file system without unnamed files): a ConfigError
    naming ``option``, found at start-up rather than by the first large upload."""
    try:
        with tempfile.TemporaryFile(dir=directory, prefix="wunderproxy-"):
            pass
    except OSError as exc:
        raise ConfigError(
            f"{option} {directory}: cannot make a temporary file there ({exc.strerror or exc}); "
            "give an existing directory this process may write to"
        ) from exc
