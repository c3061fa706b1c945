"""Start-up, hitless take-over, and graceful shutdown of one wunderproxy process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wunderproxy import __version__, fdlimit, manager
from wunderproxy.accesslog import AccessLog
from wunderproxy.config import Address, Config
from wunderproxy.controller import Controller, Engine, Startup
from wunderproxy.fallback import Fallback
from wunderproxy.forwarder import ClientConnection, sweep_interval
from wunderproxy.listeners import (
    ACCEPT_LINGER,
    ConnectionLimit,
    Listener,
    PidFile,
    TlsAccept,
    listen,
    streams,
    take_new_connections,
)
from wunderproxy.redirect import Redirect
from wunderproxy.state import Home, ProxyState
from wunderproxy.store import Store

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
# Seconds start-up may spend finding current.json's running container before it listens
# anyway: a slow S3 or Docker must not keep /status and the proxy from answering for minutes.
ADOPT_DEADLINE = 10.0


class TakeOverFailed(Exception):
    """``--take-over`` could not get ready; the predecessor keeps serving."""


class Server:
    """The proxy and the manager of one app, sharing one event loop.

    With ``config.tls``, ``certificates`` are the ones loaded from it: the command line
    loads them first, so that a broken pair stops start-up before anything else is done;
    when not given, they are loaded here (raising
    :class:`~wunderproxy.certificates.CertificateError`).
    """

    def __init__(
        self,
        config: Config,
        store: Store,
        engine: Engine,
        pid_file: Path | None = None,
        take_over: bool = False,
        access_log: AccessLog | None = None,
        certificates: Certificates | None = None,
    ) -> None:
        if config.tls is None:
            certificates = None
        elif certificates is None:
            from wunderproxy.certificates import Certificates  # cryptography: only for TLS

            certificates = Certificates(config.tls)
        self.config = config
        self.certificates = certificates
        self.access_log = access_log
        home = Home(config.fleet.instance, config.bucket, config.prefix)
        self.state = ProxyState(config.app, __version__, home)
        if config.fleet.secret is not None:
            self.state.fallback = Fallback(config.fleet)
        self.state.features = self._features
        self.controller = Controller(config, self.state, store, engine)
        self.manager = manager.Manager(self.controller, self.state, config.api_token)
        self._pid_file = PidFile(pid_file) if pid_file is not None else None
        self._take_over = take_over
        self._stopping = False
        self._connections: set[ClientConnection] = set()
        self._all_closed = asyncio.Event()
        self._api_tasks: set[asyncio.Task[Any]] = set()
        self._redirect: Redirect | None = None  # for the plain listener, with --redirect-http
        self._tls_address = str(config.tls.address) if config.tls is not None else None

    async def run(self) -> None:
        """Serve until SIGTERM or SIGINT, then shut down gracefully."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        if self.access_log is not None:
            self.access_log.start()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        certificates = self.certificates
        if certificates is not None:
            loop.add_signal_handler(signal.SIGHUP, certificates.reload)
        launching: asyncio.Task[bool] | None = None
        self.controller.watch_docker()
        # Adopt current.json's running container before listening, in every mode: a process
        # started beside a running one (same addresses, SO_REUSEPORT) then answers like it
        # from its first connection instead of 503. Nothing running is quick to find out.
        startup = await self._adopt_current()
        # With --take-over, listen only once serving: from its first connection on, this
        # process must answer as well as the one it replaces.
        if self._take_over and not await self._start_serving(startup):
            raise TakeOverFailed(
                "not taking over: this process could not serve current.json (see the "
                "log above); the running wunderproxy was left alone"
            )
        proxy, where = await self._listen_proxy()
        api = await listen(self.config.api, streams(self._serve_api))
        listeners = [*proxy, api]
        log.info(
            "wunderproxy %s for app %s: %s, API on %s",
            __version__,
            self.config.app,
            ", ".join(where),
            _bound(api, self.config.api),
        )
        fleet = self.config.fleet
        if fleet.peers:
            log.info(
                "instance %s: requests no container here can take go to %s",
                fleet.instance,
                ", ".join(peer.url for peer in fleet.peers),
            )
        if not self.config.api.is_loopback_only and self.config.api_token is None:
            log.warning(
                "the API listens on %s without --api-token: /launch, /switch and /abort are "
                "refused to every peer but this host; set --api-token to deploy from elsewhere",
                self.config.api,
            )
        if self._take_over:
            for listener in listeners:
                take_new_connections(listener)
            if self._pid_file is not None:
                self._pid_file.stop_predecessor()
        else:
            # A launch may take minutes (pulling, a slow health check): listen meanwhile, so
            # that /status answers and the proxy says 503 rather than refusing connections.
            launching = asyncio.create_task(self._start_serving(startup))
        if self._pid_file is not None:
            self._pid_file.write()
        sweeper = asyncio.create_task(self._enforce_timeouts())
        watcher = asyncio.create_task(certificates.watch()) if certificates else None
        try:
            await stop.wait()
            log.info("shutting down: finishing requests in flight, then exiting")
            if launching is not None:
                launching.cancel()
            # Timeouts still hold while requests finish: a trickling head must not keep
            # shutdown waiting for --shutdown-timeout.
            await self._shutdown(listeners)
        finally:
            sweeper.cancel()
            if watcher is not None:
                watcher.cancel()
            if self.state.fallback is not None:
                self.state.fallback.stop()
            if self._pid_file is not None:
                self._pid_file.remove()
            if self.access_log is not None:
                await self.access_log.close()

    async def _listen_proxy(self) -> tuple[list[Listener], list[str]]:
        """Listen where the proxy serves: the TLS address and the plain one, as configured,
        under one connection limit. Returns the listeners, and how the log names them.

        The TLS one first: the plain one's redirects name its port.
        """
        config = self.config
        limit = self._connection_limit()
        listeners: list[Listener] = []
        where: list[str] = []
        if config.tls is not None:
            certificates = self.certificates
            assert certificates is not None
            handshake = TlsAccept(
                # Asked at each accept: a reloaded certificate serves new handshakes only.
                context=lambda: certificates.context,
                # A handshake is what a client sends first, as a head is: nginx bounds
                # both with client_header_timeout.
                handshake_timeout=config.edge.header_timeout,
            )
            secure = await listen(config.tls.address, self._new_tls_client, limit, handshake)
            self._tls_address = _bound(secure, config.tls.address)
            listeners.append(secure)
            where.append(f"TLS proxy on {self._tls_address}")
            if config.tls.redirect_http:
                self._redirect = Redirect(secure.sockets[0].getsockname()[1])
        if config.proxy is not None:
            plain = await listen(config.proxy, self._new_client, limit)
            listeners.append(plain)
            redirecting = " (redirecting to https)" if self._redirect is not None else ""
            where.append(f"proxy on {_bound(plain, config.proxy)}{redirecting}")
        return listeners, where

    def _features(self) -> dict[str, Any]:
        """``/status`` ``features``: the TLS listener's, then the front door's settings."""
        tls = None
        if self.certificates is not None:
            tls = {"address": self._tls_address, **self.certificates.describe()}
        return {"tls": tls, **self.config.front.describe()}

    async def _shutdown(self, listeners: list[Listener]) -> None:
        timeout = self.config.shutdown_timeout
        self._stopping = True
        for task in self._api_tasks:
            task.cancel()  # an API request cut short is safe: launches clean up after themselves
        for connection in list(self._connections):
            connection.close_when_idle(IDLE_CLOSE_GRACE)
        # Accept a moment longer: connections the kernel queued for this listener before a
        # successor took the port are served rather than reset.
        await asyncio.sleep(ACCEPT_LINGER)
        for listener in listeners:
            listener.close()
        if self._connections:
            try:
                async with asyncio.timeout(timeout):
                    await self._all_closed.wait()
            except TimeoutError:
                log.warning(
                    "%d connections still busy after %g s: closed", len(self._connections), timeout
                )
                for connection in list(self._connections):
                    connection.abort()
                await asyncio.sleep(0.1)
        await self.controller.shutdown(timeout)
        log.info("stopped; the app container keeps running")

    async def _adopt_current(self) -> Startup | None:
        """The controller's adoption step, within :data:`ADOPT_DEADLINE` unless taking over.

        None when it did not finish in time (S3 or Docker slow to answer): the process then
        listens, so that /status says what is going on, and starts up meanwhile.
        """
        if self._take_over:
            return await self.controller.adopt_current()
        try:
            async with asyncio.timeout(ADOPT_DEADLINE):
                return await self.controller.adopt_current()
        except TimeoutError:
            log.warning(
                "start-up: reading current.json and this app's containers took over %g s "
                "(S3 or Docker slow to answer); listening now, the proxy answers 503 until "
                "start-up is done",
                ADOPT_DEADLINE,
            )
            return None

    async def _start_serving(self, startup: Startup | None) -> bool:
        """Finish start-up: launch what adoption left, or (when adoption ran out of time)
        both steps again."""
        if startup is None:
            return await self.controller.start()
        return await self.controller.launch_current(startup)

    async def _enforce_timeouts(self) -> None:
        """Sweep every client connection for expired timeouts, twice a second.

        A slice of connections a turn of the loop: 2,000 heads that expire together cost
        about 0.2 s of answers and closes, which requests in flight must not wait behind
        in one piece (measured by benchmarks/slowloris.py).
        """
        loop = asyncio.get_running_loop()
        interval = sweep_interval(self.config.edge)
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
                self.config.edge.max_connections, len(self.config.fleet.peers)
            ),
            # The set holds a connection from its protocol's creation to its close: the
            # listener adds those it accepted whose protocol is not built yet.
            count_open=lambda: len(self._connections),
            refused=self._connection_refused,
        )

    def _connection_refused(self) -> None:
        self.state.connections_refused += 1

    def _new_tls_client(self) -> ClientConnection:
        return self._new_client("https")

    def _new_client(self, scheme: str = "http") -> ClientConnection:
        connection = ClientConnection(
            self.state,
            self.config.edge,
            self._client_closed,
            self.access_log,
            self.config.front,
            scheme,
            self._redirect if scheme == "http" else None,
        )
        if self._stopping:
            connection.close_when_idle(IDLE_CLOSE_GRACE)
        self._connections.add(connection)
        self._all_closed.clear()
        return connection

    def _client_closed(self, connection: ClientConnection) -> None:
        self._connections.discard(connection)
        if not self._connections:
            self._all_closed.set()

    async def _serve_api(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._stopping:
            writer.close()
            return
        _track(self._api_tasks)
        # Shutdown cancels API connections. The task ends normally then: asyncio 3.11
        # logs a cancelled connection task as an unhandled error.
        with contextlib.suppress(asyncio.CancelledError):
            await manager.serve_connection(reader, writer, self.manager.handle)


def _track(tasks: set[asyncio.Task[Any]]) -> None:
    """Remember the running connection task in ``tasks`` until it ends."""
    task = asyncio.current_task()
    if task is not None:
        tasks.add(task)
        task.add_done_callback(tasks.discard)


def _bound(server: Listener, address: Address) -> str:
    """The address actually bound (tells the port when 0 was asked for)."""
    with contextlib.suppress(IndexError, TypeError):
        name = server.sockets[0].getsockname()
        if isinstance(name, tuple):
            return f"{name[0]}:{name[1]}"
    return str(address)
