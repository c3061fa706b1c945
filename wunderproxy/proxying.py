"""The proxy side of a process: its listeners, its client connections, the timeouts sweep and
the graceful close. One process runs it beside the manager (``--workers 1``); with more
workers, each worker process runs it on sockets its supervisor made (see worker.py)."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING, Any

from wunderproxy import fdlimit, native
from wunderproxy.accesslog import AccessLog
from wunderproxy.config import Config
from wunderproxy.forwarder import ClientConnection, sweep_interval
from wunderproxy.listeners import (
    ACCEPT_LINGER,
    ConnectionLimit,
    GreedyListener,
    Listener,
    TlsAccept,
    describe_socket,
)
from wunderproxy.redirect import Redirect
from wunderproxy.state import ProxyState

if TYPE_CHECKING:  # cryptography is only imported when TLS is on
    from wunderproxy.certificates import Certificates

log = logging.getLogger("wunderproxy")

# Seconds an idle keep-alive connection may still bring one request once shutdown began
# (served with "Connection: close"): closing it at once could cut a request in flight
# on the wire.
IDLE_CLOSE_GRACE = 1.0
# Connections the timeout sweep looks at before it lets the loop serve others. Fewer keep the
# p99 of requests in flight lower during a wave of expiries, more answer the wave's last
# heads sooner: 64 keeps both within their targets (benchmarks/slowloris.py; README).
SWEEP_SLICE = 64


class Proxying:
    """Client connections of one process, from accept to close."""

    def __init__(
        self,
        config: Config,
        state: ProxyState,
        access_log: AccessLog | None,
        certificates: Certificates | None,
    ) -> None:
        self._config = config
        self._state = state
        self._access_log = access_log
        self._certificates = certificates
        self._connections: set[ClientConnection] = set()
        # Made when a shutdown waits for the last connection: a connection's opening and
        # closing then touch no event.
        self._all_closed: asyncio.Event | None = None
        self._stopping = False
        self._redirect: Redirect | None = None  # for the plain listener, with --redirect-http
        self.tls_address = str(config.tls.address) if config.tls is not None else None

    @property
    def open_connections(self) -> int:
        """Client connections open now."""
        return len(self._connections)

    def listen(
        self, plain: socket.socket | None, secure: socket.socket | None
    ) -> tuple[list[Listener], list[str]]:
        """Serve clients from listening sockets (the plain one, the TLS one, as configured),
        under one connection limit. Returns the listeners, and how the log names them.

        The TLS one first: the plain one's redirects name its port.
        """
        config = self._config
        limit = self._connection_limit()
        listeners: list[Listener] = []
        where: list[str] = []
        if secure is not None:
            assert config.tls is not None
            certificates = self._certificates
            assert certificates is not None
            handshake = TlsAccept(
                # Asked at each accept: a reloaded certificate serves new handshakes only.
                context=lambda: certificates.context,
                # A handshake is what a client sends first, as a head is: nginx bounds
                # both with client_header_timeout.
                handshake_timeout=config.edge.header_timeout,
            )
            listeners.append(GreedyListener(secure, self._new_tls_client, limit, handshake))
            self.tls_address = describe_socket(secure)
            where.append(f"TLS proxy on {self.tls_address}")
            if config.tls.redirect_http:
                self._redirect = Redirect(secure.getsockname()[1])
        if plain is not None:
            listeners.append(GreedyListener(plain, self._new_client, limit))
            redirecting = " (redirecting to https)" if self._redirect is not None else ""
            where.append(f"proxy on {describe_socket(plain)}{redirecting}")
        return listeners, where

    def features(self) -> dict[str, Any]:
        """``/status`` ``features``: the TLS listener's, the front door's settings, and
        whether the hot path runs compiled (workers run the same build as this process:
        the same interpreter and paths)."""
        tls = None
        if self._certificates is not None:
            tls = {"address": self.tls_address, **self._certificates.describe()}
        return {"tls": tls, **self._config.front.describe(), "compiled": native.is_compiled()}

    def begin_shutdown(self) -> None:
        """Close every connection between requests from now on (see close_when_idle)."""
        self._stopping = True
        for connection in list(self._connections):
            connection.close_when_idle(IDLE_CLOSE_GRACE)

    async def finish(self, listeners: list[Listener], seconds: float) -> None:
        """After :meth:`begin_shutdown`: stop accepting, and wait up to ``seconds``
        for the connections to close; then cut the rest."""
        # Accept a moment longer: connections the kernel queued for this listener before a
        # successor took the port are served rather than reset.
        await asyncio.sleep(ACCEPT_LINGER)
        for listener in listeners:
            listener.close()
        if not self._connections:
            return
        all_closed = self._all_closed = asyncio.Event()
        try:
            async with asyncio.timeout(seconds):
                await all_closed.wait()
        except TimeoutError:
            log.warning(
                "%d connections still busy after %g s: closed", len(self._connections), seconds
            )
            for connection in list(self._connections):
                connection.abort()
            await asyncio.sleep(0.1)

    async def enforce_timeouts(self) -> None:
        """Sweep every client connection for expired timeouts, twice a second.

        A slice of connections a turn of the loop: 2,000 heads that expire together cost
        about 0.2 s of answers and closes, which requests in flight must not wait behind
        in one piece (measured by benchmarks/slowloris.py).
        """
        loop = asyncio.get_running_loop()
        interval = sweep_interval(self._config.edge)
        while True:
            await asyncio.sleep(interval)
            connections = list(self._connections)
            for start in range(0, len(connections), SWEEP_SLICE):
                now = loop.time()
                for connection in connections[start : start + SWEEP_SLICE]:
                    try:
                        connection.check_timeouts(now)
                    except Exception:  # one connection's bug must not end every timeout
                        log.exception("enforcing the timeouts of a connection failed")
                await asyncio.sleep(0)

    def _connection_limit(self) -> ConnectionLimit:
        """Raise the open-file limit and settle ``--max-connections`` (both logged)."""
        return ConnectionLimit(
            maximum=fdlimit.max_connections(
                self._config.edge.max_connections, len(self._config.fleet.peers)
            ),
            # The set holds a connection from its protocol's creation to its close: the
            # listener adds those it accepted whose protocol is not built yet.
            count_open=lambda: len(self._connections),
            refused=self._connection_refused,
        )

    def _connection_refused(self) -> None:
        self._state.connections_refused += 1

    def _new_tls_client(self) -> ClientConnection:
        return self._new_client("https")

    def _new_client(self, scheme: str = "http") -> ClientConnection:
        connection = ClientConnection(
            self._state,
            self._config.edge,
            self._client_closed,
            self._access_log,
            self._config.front,
            scheme,
            self._redirect if scheme == "http" else None,
        )
        if self._stopping:
            connection.close_when_idle(IDLE_CLOSE_GRACE)
        self._connections.add(connection)
        return connection

    def _client_closed(self, connection: ClientConnection) -> None:
        self._connections.discard(connection)
        if not self._connections and self._all_closed is not None:
            self._all_closed.set()
