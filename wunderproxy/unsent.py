"""How much of what the proxy wrote to a peer the peer has not taken yet.

A slow reader drains the kernel's send queue long before asyncio's own buffer moves: the
transport hands the kernel more only once half its send buffer is free, so the transport's
figure alone stays flat for seconds while a client reads steadily. Adding the kernel's queue
(``SIOCOUTQ``: bytes sent but not yet acknowledged, and bytes not yet sent) gives a figure
that shrinks whenever the peer reads anything.
"""

from __future__ import annotations

import asyncio
import fcntl
import struct
import termios

_INT = struct.Struct("i")


def unsent(transport: asyncio.Transport) -> int:
    """Bytes written to ``transport`` that its peer has not acknowledged yet."""
    queued = 0
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            # SIOCOUTQ is TIOCOUTQ on Linux.
            queued = _INT.unpack(fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, bytes(4)))[0]
        except (OSError, ValueError):  # closed meanwhile, or not a TCP socket
            queued = 0
    return transport.get_write_buffer_size() + queued
