"""Ports for host-network containers: free on 127.0.0.1, and not another container's.

A container with ``HostConfig.NetworkMode: "host"`` has no port of its own to publish: its
app listens straight on the host, on the port wunderproxy picks here and passes as ``PORT``.
The kernel knows which ports are free right now (``bind`` to port 0 picks one); wunderproxy
knows which ports its own containers were given, including one still launching whose app
has not bound yet, and one draining whose app may already have closed its listener. A
port is picked only if it is both.

Between the pick and the app binding its port, another process could take it: a second
wunderproxy on the host picking the same free port, whose app would then answer this
launch's health check. So the launch holds its port until it ends: a socket bound to it with
``SO_REUSEADDR``, never listening. The kernel then picks that port for no ``bind`` to port 0
(``net.ipv4.ip_autobind_reuse`` is 0 by default) and refuses it to an explicit ``bind``
without ``SO_REUSEADDR``, while the app, which sets it (nginx, Go, Node, Ruby and Python
servers do), binds and listens on it. An app that does not set it gets EADDRINUSE, exits,
and its launch fails with its logs: loud, where the race the hold closes would be silent.
(A process that sets ``SO_REUSEADDR`` and binds this very port can still take it: hence the
health check's rule that a 200 counts only while the container runs, in health.py.)
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from wunderproxy.engine import PUBLISH_HOST_IP as HOST
from wunderproxy.errors import UpstreamFailed

PICK_ATTEMPTS = 20  # the kernel rarely repeats a port; 20 in a row means something is wrong


class HeldPort(Protocol):
    """A port kept from other processes until ``close()``: a bound socket (or a test's
    stand-in for one)."""

    def getsockname(self) -> Any:
        """The address held, ``(host, port)``."""

    def close(self) -> None:
        """Let the port go."""


def hold_free_port() -> socket.socket:
    """Bind a socket to a TCP port on 127.0.0.1 that the kernel picks free, and keep it.

    A host-network app must listen there, as a published port is: the proxy is the one way
    in. The socket is bound with ``SO_REUSEADDR`` and never listens, so that the app (which
    sets ``SO_REUSEADDR`` too) can bind the port while nothing else is given it.
    """
    hold = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        hold.bind((HOST, 0))
    except OSError:
        hold.close()
        raise
    return hold


def port_of(hold: HeldPort) -> int:
    """The port number ``hold`` keeps."""
    port: int = hold.getsockname()[1]
    return port


def pick_port(taken: Iterable[int], free_port: Callable[[], HeldPort] = hold_free_port) -> HeldPort:
    """Hold a free port on 127.0.0.1 that is not in ``taken``; raises UpstreamFailed if none.

    The caller closes what this returns once the port's launch has ended.
    """
    avoid = set(taken)
    for _ in range(PICK_ATTEMPTS):
        try:
            hold = free_port()
        except OSError as exc:
            raise UpstreamFailed(
                f"could not find a free port on {HOST} for a host-network container: {exc}"
            ) from exc
        if port_of(hold) not in avoid:
            return hold
        hold.close()
    raise UpstreamFailed(
        f"could not find a free port on {HOST} for a host-network container in "
        f"{PICK_ATTEMPTS} attempts; the ports the kernel offered are all this app's "
        f"({len(avoid)} in use); remove containers left over, then launch again"
    )


class HostPorts:
    """The ports picked for host-network launches still under way.

    A launch holds its port from the pick until its container is recorded with it (or the
    launch failed): another launch meanwhile must not get the same port, although nothing
    listens on it yet.
    """

    def __init__(self, free_port: Callable[[], HeldPort] = hold_free_port) -> None:
        self._free_port = free_port
        self._launching: set[int] = set()

    @contextlib.contextmanager
    def pick(self, in_use: Iterable[int]) -> Iterator[int]:
        """Hold a port that is free, not launching and not in ``in_use`` (the ports of the
        app's launched, serving and draining containers) while the block runs; it is
        bound meanwhile (see hold_free_port), so no other process is given it either."""
        hold = pick_port([*self._launching, *in_use], self._free_port)
        port = port_of(hold)
        self._launching.add(port)
        try:
            yield port
        finally:
            self._launching.discard(port)
            hold.close()


def host_port_hint(port: int) -> str:
    """What an operator should check when a host-network app never answered on ``port``."""
    return (
        f"On the host's network the app must listen on {HOST}:$PORT, here PORT={port}, "
        "with SO_REUSEADDR set (wunderproxy holds the port until the launch ends)"
    )
