"""Ports for host-network containers: free on 127.0.0.1, and not another container's.

A container with ``HostConfig.NetworkMode: "host"`` has no port of its own to publish: its
app listens straight on the host, on the port wunderproxy picks here and passes as ``PORT``.
The kernel knows which ports are free right now (``bind`` to port 0 picks one); wunderproxy
knows which ports its own containers were given, including one still launching whose app
has not bound yet, and one draining whose app may already have closed its listener. A
port is picked only if it is both.

Between the pick and the app binding its port, another process may take it: that launch's
health check then fails, as any failed launch does, and launching again picks another port.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterable, Iterator

from wunderproxy.engine import PUBLISH_HOST_IP as HOST
from wunderproxy.errors import UpstreamFailed

PICK_ATTEMPTS = 20  # the kernel rarely repeats a port; 20 in a row means something is wrong


def kernel_free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing is bound to right now, as the kernel picks one.

    A host-network app must listen there, as a published port is: the proxy is the one way
    in.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def pick_port(taken: Iterable[int], free_port: Callable[[], int] = kernel_free_port) -> int:
    """A free port on 127.0.0.1 that is not in ``taken``; raises UpstreamFailed if none."""
    avoid = set(taken)
    for _ in range(PICK_ATTEMPTS):
        try:
            port = free_port()
        except OSError as exc:
            raise UpstreamFailed(
                f"could not find a free port on {HOST} for a host-network container: {exc}"
            ) from exc
        if port not in avoid:
            return port
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

    def __init__(self, free_port: Callable[[], int] = kernel_free_port) -> None:
        self._free_port = free_port
        self._launching: set[int] = set()

    @contextlib.contextmanager
    def pick(self, in_use: Iterable[int]) -> Iterator[int]:
        """Hold a port that is free, not launching and not in ``in_use`` (the ports of the
        app's launched, serving and draining containers) while the block runs."""
        port = pick_port([*self._launching, *in_use], self._free_port)
        self._launching.add(port)
        try:
            yield port
        finally:
            self._launching.discard(port)


def host_port_hint(port: int) -> str:
    """What an operator should check when a host-network app never answered on ``port``."""
    return (
        f"On the host's network the app must listen on {HOST}:$PORT, here PORT={port}; if "
        "it does and another process took that port first, launch again for another port"
    )
