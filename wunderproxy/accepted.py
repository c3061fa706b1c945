"""A cheaper socket object for each accepted connection.

Its own module: the compiled build (mypyc) cannot compile a class derived from
socket.socket, whose ``__slots__`` it does not support, and the listener around it is
compiled.
"""

from __future__ import annotations

import socket


class AcceptedSocket(socket.socket):
    """An accepted connection whose ``family`` and ``type`` are plain attributes.

    A socket.socket reads both through enum conversions at every access, and accepting a
    connection and handing it to the event loop (``socket.accept``, then
    ``connect_accepted_socket``) asks five times: about 30,000 instructions, an eighth of
    what a short request on a new connection costs the proxy.
    """

    # A slot and a class attribute shadow socket.socket's properties (a slot, not a
    # __dict__: the event loop keeps this object as long as the connection lasts).
    __slots__ = ("family",)
    type = socket.SOCK_STREAM

    def __init__(self, family: socket.AddressFamily, fd: int) -> None:
        super().__init__(family, socket.SOCK_STREAM, 0, fd)
        self.family = family  # type: ignore[misc]  # the slot, not the property
