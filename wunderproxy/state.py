"""The pure core: the containers wunderproxy runs, the one serving now, and the counters.

Nothing here does I/O. The controller changes which container serves; the forwarder asks
which one serves when a request starts and reports what happened to it; the manager reads
:meth:`ProxyState.snapshot` for ``/status``.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol

from wunderproxy.events import DeployEvents
from wunderproxy.launchconfig import LaunchConfig
from wunderproxy.spool import SpoolTrouble
from wunderproxy.timestamps import rfc3339
from wunderproxy.traffic import Traffic, describe_figures, describe_minute, merged

if TYPE_CHECKING:
    from wunderproxy.fallback import Fallback

ContainerState = Literal["launched", "serving", "draining"]

# What can time out at the edge (``--header-timeout`` and the others).
TIMEOUT_KINDS = ("header", "body", "connect", "upstream", "send")


class Link(Protocol):
    """An open proxy connection to a container, as a drain sees it."""

    @property
    def idle(self) -> bool:
        """True between requests: closing it now loses nothing."""

    def close(self) -> None:
        """Close it now (and the client connection too, if it was upgraded)."""


@dataclass(eq=False)
class Container:
    """One running container launched from a launch config."""

    config: LaunchConfig
    image: str
    container_id: str
    host: str
    port: int
    started_at: datetime
    state: ContainerState = "launched"
    in_flight: int = 0
    upgraded: int = 0
    stopping: bool = False
    down: bool = False  # refused a connection; requests that may go to a peer skip it
    died: bool = False  # Docker said so: nothing is sent to it any more
    links: set[Link] = field(default_factory=set, repr=False)
    spare: list[Link] = field(default_factory=list, repr=False)  # idle, for the next request
    # Made only when a drain waits, so that a request's start and end touch no event.
    _idle_event: asyncio.Event | None = field(default=None, repr=False)

    @property
    def hash(self) -> str:
        """The MD5 of the launch config this container was started from."""
        return self.config.hash

    @property
    def revision(self) -> str:
        """The app revision, from the launch config."""
        return self.config.revision

    @property
    def name(self) -> str:
        """How log lines name it."""
        return f"container {self.container_id[:12]}"

    def request_started(self) -> None:
        """A request was routed here."""
        self.in_flight += 1

    def request_finished(self) -> None:
        """A request routed here was answered, failed or abandoned."""
        self.in_flight -= 1
        if self._idle_event is not None:
            self._wake_idle_waiters()

    def upgrade_started(self) -> None:
        """A connection here left HTTP (WebSocket): it keeps the container busy."""
        self.upgraded += 1

    def upgrade_finished(self) -> None:
        """An upgraded connection here ended."""
        self.upgraded -= 1
        if self._idle_event is not None:
            self._wake_idle_waiters()

    async def wait_idle(self) -> None:
        """Wait until no request nor upgraded connection is in flight here."""
        if self.in_flight == 0 and self.upgraded == 0:
            return
        if self._idle_event is None:
            self._idle_event = asyncio.Event()
        await self._idle_event.wait()

    def close_links(self, *, idle_only: bool) -> int:
        """Close the proxy's connections here (only those between requests, if asked)."""
        chosen = [link for link in self.links if link.idle or not idle_only]
        for link in chosen:
            link.close()
        return len(chosen)

    def _wake_idle_waiters(self) -> None:
        if self.in_flight == 0 and self.upgraded == 0 and self._idle_event is not None:
            # Those waiting now wake; a later wait_idle() while busy makes a new event.
            self._idle_event.set()
            self._idle_event = None

    def describe(self) -> dict[str, Any]:
        """The container as ``/status`` shows it."""
        return {
            "revision": self.revision,
            "hash": self.hash,
            "image": self.image,
            "container_id": self.container_id,
            "port": self.port,
            "state": self.state,
            "started_at": rfc3339(self.started_at),
            "in_flight": self.in_flight,
            "upgraded": self.upgraded,
            "down": self.down,
        }


@dataclass(frozen=True)
class Home:
    """Where this wunderproxy's app lives: its instance name, and the store its launch
    configs are in (``bucket`` as given on the command line: a bucket name or
    ``file://DIR``). Fleet commands read it from ``/status`` to find the store."""

    instance: str
    bucket: str
    prefix: str

    def describe(self) -> dict[str, Any]:
        """The ``instance`` and ``store`` keys of ``/status``."""
        return {"instance": self.instance, "store": {"bucket": self.bucket, "prefix": self.prefix}}


@dataclass
class RequestCounters:
    """Requests and answers since start and since the last switch."""

    total: int = 0
    since_switch: int = 0
    time_since_switch: float = 0.0
    by_status: Counter[int] = field(default_factory=Counter)


def _nothing() -> None:
    pass


def health_path_of(config: LaunchConfig) -> bytes:
    """The path (without query) of a config's health check, as request targets carry it."""
    return config.health_check_path.encode("latin-1").partition(b"?")[0]


class ProxyState:
    """Which container serves, which others run, and what the proxy has seen."""

    def __init__(self, app: str, version: str, home: Home | None = None) -> None:
        self.app = app
        self.version = version
        self.home = home
        self.current: Container | None = None
        self.containers: list[Container] = []
        self.requests = RequestCounters()
        self.open_connections = 0
        self.active_connections = 0
        # Edge events, by kind: "header", "body", "connect", "upstream", "send".
        self.timeouts: Counter[str] = Counter()
        # Connections closed at once because --max-connections were open.
        self.connections_refused = 0
        self.docker_error: str | None = None
        self.traffic = Traffic()
        self.events = DeployEvents()
        # history.json as last read or written, oldest first.
        self.deploy_history: list[dict[str, str]] = []
        # The health check path of the config serving (or to serve, while it starts):
        # requests for it are never sent to a peer.
        self.health_check_path: bytes | None = None
        # Peers and figures of peer fallback; None without --fallback-secret.
        self.fallback: Fallback | None = None
        # Spool files of buffered bodies that could not be written (said once a minute).
        self.spool_trouble = SpoolTrouble()
        # Which front-door features are on (TLS, forwarded headers, buffering, compression):
        # called for each /status, since a certificate reload changes what TLS shows.
        self.features: Callable[[], dict[str, Any]] = dict
        # Called whenever what routes changes (a container added, switched to, forgotten or
        # dead, the health check path): the supervisor of workers sends them the table.
        self.routes_changed: Callable[[], None] = _nothing
        # With workers: their connections to draining containers (this process has none),
        # and /status's ``workers`` list; both set when the workers' figures are gathered.
        self.links_elsewhere = 0
        self.workers: list[dict[str, Any]] = []
        self._started = time.monotonic()

    # -- containers ----------------------------------------------------------------

    def find(self, config_hash: str, *states: ContainerState) -> Container | None:
        """The container launched for ``config_hash`` in one of ``states``, if any."""
        for container in self.containers:
            if container.hash == config_hash and container.state in states:
                return container
        return None

    def add(self, container: Container) -> None:
        """Record a container that was launched and answered its health check."""
        self.containers.append(container)
        self.routes_changed()

    def switch_to(self, container: Container) -> Container | None:
        """Route new requests to ``container``; return the one replaced (now draining).

        A single assignment, so every request sees either the old or the new container.
        """
        previous = self.current
        container.state = "serving"
        self.current = container
        self.health_check_path = health_path_of(container.config)
        if previous is not None and previous is not container:
            previous.state = "draining"
        self.requests.since_switch = 0
        self.requests.time_since_switch = 0.0
        self.routes_changed()
        return previous if previous is not container else None

    def forget(self, container: Container) -> None:
        """The container was stopped and removed."""
        if container in self.containers:
            self.containers.remove(container)
        if self.current is container:
            self.current = None
        self.routes_changed()

    # -- counters (called by the forwarder on every request) -------------------------

    def request_started(self) -> None:
        """A request head arrived."""
        self.requests.total += 1
        self.requests.since_switch += 1

    def request_finished(
        self, revision: str, status: int, seconds: float, bytes_in: int, bytes_out: int
    ) -> None:
        """A request to ``revision`` was answered with ``status`` in ``seconds``.

        ``status`` is what the request came to: the answer's status, or the proxy's own
        (408, 499, 502, 504) when it failed, even after part of an answer went out.
        """
        self.requests.by_status[status] += 1
        self.requests.time_since_switch += seconds
        self.traffic.record(revision, status, seconds, bytes_in, bytes_out)

    def connection_counts(self) -> dict[str, int]:
        """Client connections by state: open = active + idle; upgraded ones are active.

        ``draining`` is not one of them: it counts the proxy's connections to containers
        being drained (requests still in flight there, upgraded connections, and ones a
        client keeps between requests), which a drain waits for or closes.
        """
        upgraded = sum(c.upgraded for c in self.containers)
        if self.fallback is not None:
            upgraded += sum(peer.upgraded for peer in self.fallback.peers)
        active = self.active_connections + upgraded  # an upgraded one has no request open
        return {
            "open": self.open_connections,
            "active": active,
            "idle": self.open_connections - active,
            "upgraded": upgraded,
            "draining": self.links_elsewhere
            + sum(len(c.links) for c in self.containers if c.state == "draining"),
        }

    # -- /status ---------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The ``/status`` document of SPEC, including the original's capitalised keys."""
        current = self.current
        requests = self.requests
        connections = self.connection_counts()
        active, idle = connections["active"], connections["idle"]
        totals = self.traffic.totals()
        return {
            "app": self.app,
            "version": self.version,
            "uptime_seconds": round(time.monotonic() - self._started, 3),
            **(self.home.describe() if self.home is not None else {}),
            "current": current.describe() if current is not None else None,
            "containers": [c.describe() for c in self.containers],
            "requests": {
                "total": requests.total,
                "since_switch": requests.since_switch,
                "by_status": {str(code): n for code, n in sorted(requests.by_status.items())},
            },
            "connections": connections | {"refused": self.connections_refused},
            "features": self.features(),
            # Bodies --buffer-requests or --buffer-responses could not hold (a full disk).
            "buffer_failures": self.spool_trouble.failures,
            "timeouts": dict(sorted(self.timeouts.items())),
            "docker": {"state": "ok" if self.docker_error is None else "error"}
            | ({"error": self.docker_error} if self.docker_error else {}),
            "Requests": requests.since_switch,
            "TotalTime": round(requests.time_since_switch, 6),
            "States": {"active": active, "idle": idle},
            "DockerState": "Ok" if self.docker_error is None else "Error",
            "traffic": {
                "since_start": describe_figures(merged(totals.values())),
                "by_revision": {rev: describe_figures(f) for rev, f in totals.items()},
                "minutes": [describe_minute(minute) for minute in self.traffic.minutes()],
            },
            "events": [event.describe() for event in self.events.newest_first()],
            "deploys": list(reversed(self.deploy_history)),
            "workers": self.workers,
        } | ({"fallback": self.fallback.describe()} if self.fallback is not None else {})
