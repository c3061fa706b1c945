"""Listening sockets that a new wunderproxy process can share with the old one.

A hitless restart runs two processes on the same addresses for a moment. Both listen with
``SO_REUSEPORT``; the kernel then spreads new connections over both. When the old process
closes its listener, connections still waiting in its accept queue are reset (this kernel
does not migrate them: ``net.ipv4.tcp_migrate_req`` is 0). So the new process, once it
serves, steers every *new* connection to its own socket with a one-instruction classic BPF
program on the port's reuseport group; the old one keeps accepting what is already queued
for a moment (:data:`ACCEPT_LINGER`), then closes. Nothing is reset.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import socket
import struct
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, Protocol

from wunderproxy.config import Address

log = logging.getLogger("wunderproxy")

# Seconds a stopping process goes on accepting: handshakes that the kernel queued for it
# before a successor took the port over complete and are served, not reset.
ACCEPT_LINGER = 1.0

# linux/socket.h (asm-generic): attach a classic BPF program to a reuseport group.
SO_ATTACH_REUSEPORT_CBPF = 51
_BPF_RET_K = 0x06  # BPF_RET | BPF_K: return the constant k

ConnectionHandler = Callable[
    [asyncio.StreamReader, asyncio.StreamWriter], Coroutine[Any, Any, None]
]
ProtocolFactory = Callable[[], asyncio.Protocol]

BACKLOG = 4096  # a burst of a thousand new connections must not overflow the queue


class Listener(Protocol):
    """What the server needs of a listener: its sockets, and a way to stop it."""

    @property
    def sockets(self) -> Sequence[socket.socket]: ...

    def close(self) -> None: ...


class GreedyListener:
    """Accepts every connection waiting in the queue, each time it becomes readable.

    uvloop's own server accepts one connection per turn of the loop: a thousand clients
    connecting at once then wait behind a thousand turns, each busy with the requests of
    those already in, and their first requests time out.
    """

    def __init__(self, sock: socket.socket, factory: ProtocolFactory) -> None:
        self._sock = sock
        self._factory = factory
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[Any]] = set()
        sock.setblocking(False)
        self._loop.add_reader(sock.fileno(), self._accept_all)

    @property
    def sockets(self) -> Sequence[socket.socket]:
        return [self._sock]

    def close(self) -> None:
        if self._sock.fileno() != -1:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()

    def _accept_all(self) -> None:
        for _ in range(BACKLOG):
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors, a connection reset while queued
                log.warning("accepting a connection failed: %s", exc)
                return
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = self._loop.create_task(self._loop.connect_accepted_socket(self._factory, conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


async def listen(address: Address, factory: ProtocolFactory) -> Listener:
    """Listen on a TCP address (shareable with a successor) or a Unix socket path."""
    loop = asyncio.get_running_loop()
    if address.path is not None:
        return await loop.create_unix_server(factory, path=address.path, backlog=BACKLOG)
    family = socket.AF_INET6 if ":" in (address.host or "") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((address.host or "0.0.0.0", address.port or 0))
    sock.listen(BACKLOG)
    return GreedyListener(sock, factory)


def streams(handler: ConnectionHandler) -> ProtocolFactory:
    """A protocol factory serving each connection with ``handler`` on asyncio streams."""

    def factory() -> asyncio.Protocol:
        return asyncio.StreamReaderProtocol(asyncio.StreamReader(), handler)

    return factory


def take_new_connections(server: Listener) -> None:
    """Steer every new connection on this port to this process's listener.

    Sockets join a reuseport group in the order they start listening, and a closing one
    is replaced by the last: the newest of two overlapping processes is index 1. With a
    single listener left, index 1 does not exist and the kernel falls back to it anyway.
    """
    program = ctypes.create_string_buffer(struct.pack("HBBI", _BPF_RET_K, 0, 0, 1))
    fprog = struct.pack("@HP", 1, ctypes.addressof(program))  # struct sock_fprog
    for sock in server.sockets:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
            except OSError as exc:
                log.warning("cannot steer new connections to this process: %s", exc)


class PidFile:
    """The PID file of ``--pid-file``; with ``--take-over``, the predecessor named in it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.predecessor = self._running_wunderproxy()

    def write(self) -> None:
        """Record this process (atomically: a reader never sees half a PID)."""
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        temporary.write_text(f"{os.getpid()}\n")
        temporary.replace(self.path)

    def remove(self) -> None:
        """Remove the file if it still names this process."""
        if self._read() == os.getpid():
            self.path.unlink(missing_ok=True)

    def stop_predecessor(self) -> None:
        """SIGTERM the wunderproxy the file named when this process started."""
        pid = self.predecessor
        if pid is None or pid == os.getpid():
            return
        log.info("taking over from wunderproxy PID %d: sending it SIGTERM", pid)
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            log.info("wunderproxy PID %d had already exited", pid)

    def _read(self) -> int | None:
        try:
            return int(self.path.read_text().strip())
        except (OSError, ValueError):
            return None

    def _running_wunderproxy(self) -> int | None:
        """The PID in the file, if that process runs and is a wunderproxy (not a reused PID)."""
        pid = self._read()
        if pid is None:
            return None
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        return pid if b"wunderproxy" in command else None
