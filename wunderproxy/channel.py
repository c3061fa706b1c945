"""The channel between the supervisor and one proxy worker, and the messages it carries.

One Unix socketpair per worker, created by the supervisor; the worker gets its end through
``pass_fds``. A message is a 4-byte big-endian length, then the message pickled. Pickle,
because the messages carry the frozen dataclasses both processes already use (``Config``,
``LaunchConfig``, the traffic figures) and nothing but the supervisor and its own child,
started from the same interpreter and the same code, can write to a socketpair that was never
bound to any name: nobody else can put bytes on it.

The channel's EOF is the other side's death: a worker whose supervisor is gone shuts down
(finishing the requests in flight), and the supervisor restarts a worker whose end closed.
"""

from __future__ import annotations

import asyncio
import pickle
import socket
import struct
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from wunderproxy.config import Config
from wunderproxy.launchconfig import LaunchConfig
from wunderproxy.traffic import Figures, Minute

_LENGTH = struct.Struct(">I")
# A routing table of a few containers, or one worker's figures with an hour of minutes:
# tens of KiB. A length past this is a bug, not a message.
MAX_MESSAGE = 64 * 1024 * 1024


class ChannelClosed(Exception):
    """The other side closed the channel (it exited, or is being stopped)."""


# -- supervisor to worker -----------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """One container as a worker needs it to route requests and drain."""

    config: LaunchConfig
    image: str
    container_id: str
    host: str
    port: int
    started_at: datetime
    state: str  # "launched", "serving" or "draining"
    died: bool


@dataclass(frozen=True)
class RouteTable:
    """What the supervisor routes now: every container it knows of, the current one (by
    id), and the health check path (requests for it are never sent to a peer).
    ``sequence`` grows with each change; the worker acknowledges it with :class:`Routed`."""

    sequence: int
    current: str | None
    containers: tuple[Route, ...]
    health_check_path: bytes | None


@dataclass(frozen=True)
class Hello:
    """A new worker's first message: who it is, its settings, and the routes as they are.

    ``sockets`` maps ``"plain"`` and ``"tls"`` to the descriptor numbers of its listening
    sockets (passed to it with ``pass_fds``, so the numbers are the same on both sides).
    """

    index: int
    config: Config
    sockets: dict[str, int]
    routes: RouteTable
    log_level: str
    access_log: str | None
    access_log_format: str


@dataclass(frozen=True)
class AskFigures:
    """Send your figures now (answered by :class:`TellFigures` with the same ``ask``);
    the per-minute series only with ``minutes`` (``/status`` shows it, ``/metrics`` does
    not, and with an hour of traffic it is most of the answer: about 240 KB)."""

    ask: int
    minutes: bool = True


@dataclass(frozen=True)
class ReloadCertificates:
    """The supervisor got SIGHUP: read the TLS certificate and key again."""


@dataclass(frozen=True)
class SpreadEvenly:
    """The predecessor of a take-over no longer listens: steer new connections evenly over
    the ``count`` workers' TCP listeners (see listeners.spread_evenly)."""

    count: int


@dataclass(frozen=True)
class Stop:
    """Shut down gracefully: finish what is in flight, within ``--shutdown-timeout``."""


# -- worker to supervisor -----------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    """The worker listens and routes by the table of its :class:`Hello`, numbered
    ``sequence``."""

    pid: int
    sequence: int


@dataclass(frozen=True)
class Routed:
    """The worker routes by the table numbered ``sequence`` (and every older one)."""

    sequence: int


@dataclass(frozen=True)
class Drained:
    """The worker has nothing in flight to the container any more (or cut what was), since
    the container became draining in the table numbered ``sequence``: a Drained sent before
    a switch back to the container must not end a later drain of it."""

    container_id: str
    sequence: int


@dataclass(frozen=True)
class ContainerFigures:
    """A worker's figures of one container."""

    in_flight: int
    upgraded: int
    links: int
    down: bool


@dataclass(frozen=True)
class FallbackFigures:
    """A worker's peer fallback counters (see fallback.py)."""

    sent: dict[str, int]
    received: dict[str, int]
    unplaced: int
    unverified: int
    peers_upgraded: tuple[int, ...]
    # time.monotonic() until which each peer is skipped (it refused); CLOCK_MONOTONIC is
    # one clock for every process of the host.
    peers_skip_until: tuple[float, ...]


@dataclass(frozen=True)
class WorkerFigures:
    """Everything a worker counted, as ``/status`` and ``/metrics`` add them up."""

    requests: int
    since_switch: int
    time_since_switch: float
    by_status: dict[int, int]
    open_connections: int
    active_connections: int
    refused: int
    timeouts: dict[str, int]
    buffer_failures: int
    traffic_totals: dict[str, Figures]
    traffic_minutes: tuple[Minute, ...]
    containers: dict[str, ContainerFigures] = field(default_factory=dict)
    fallback: FallbackFigures | None = None


@dataclass(frozen=True)
class TellFigures:
    """The answer to :class:`AskFigures`; ``minutes`` says whether ``figures`` hold the
    per-minute series (asked for) or none."""

    ask: int
    figures: WorkerFigures
    minutes: bool = True


class Channel:
    """Messages both ways over one end of a socketpair."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, sock: socket.socket) -> Channel:
        """Wrap a connected Unix socket (needs a running loop)."""
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=MAX_MESSAGE)
        return cls(reader, writer)

    def send(self, message: Any) -> None:
        """Queue ``message`` (sent as soon as the socket takes it; never blocks)."""
        if self._writer.is_closing():
            raise ChannelClosed("the channel is closed")
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self._writer.write(_LENGTH.pack(len(data)) + data)

    async def receive(self) -> Any:
        """The next message; raises :class:`ChannelClosed` at the other side's EOF."""
        try:
            (length,) = _LENGTH.unpack(await self._reader.readexactly(_LENGTH.size))
            if length > MAX_MESSAGE:
                raise ChannelClosed(f"a message of {length} bytes: the other side is broken")
            return pickle.loads(await self._reader.readexactly(length))
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise ChannelClosed("the other side closed the channel") from exc

    def close(self) -> None:
        """Close this end: the other side sees EOF."""
        self._writer.close()
