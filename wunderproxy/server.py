"""Start-up, hitless take-over, and graceful shutdown of one wunderproxy process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wunderproxy import __version__, manager, native
from wunderproxy.accesslog import AccessLog
from wunderproxy.config import Address, Config
from wunderproxy.controller import Controller, Engine, Startup
from wunderproxy.fallback import Fallback
from wunderproxy.listeners import (
    Listener,
    PidFile,
    bind,
    listen,
    streams,
    take_new_connections,
)
from wunderproxy.proxying import Proxying
from wunderproxy.runtime import LoopChoice
from wunderproxy.state import Home, ProxyState
from wunderproxy.store import Store
from wunderproxy.supervisor import Supervisor

if TYPE_CHECKING:  # cryptography is only imported when TLS is on
    from wunderproxy.certificates import Certificates

log = logging.getLogger("wunderproxy")

# Seconds start-up may spend finding current.json's running container before it listens
# anyway: a slow S3 or Docker must not keep /status and the proxy from answering for minutes.
ADOPT_DEADLINE = 10.0


class TakeOverFailed(Exception):
    """``--take-over`` could not get ready; the predecessor keeps serving."""


class Server:
    """The proxy and the manager of one app, sharing one event loop; with
    ``config.workers`` above 1, the manager and the supervisor of that many proxy worker
    processes (see supervisor.py), which run on the event loop ``loop``.

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
        loop: LoopChoice = "auto",
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
        self.proxying = Proxying(config, self.state, access_log, certificates)
        self.state.features = self.proxying.features
        self.supervisor: Supervisor | None = None
        if config.workers > 1:
            log_to = (access_log.destination, access_log.line_format) if access_log else None
            self.supervisor = Supervisor(config, self.state, loop, log_to)
        self.controller = Controller(config, self.state, store, engine, workers=self.supervisor)
        self.manager = manager.Manager(
            self.controller,
            self.state,
            config.api_token,
            self.supervisor.gather if self.supervisor is not None else None,
        )
        self._pid_file = PidFile(pid_file) if pid_file is not None else None
        self._take_over = take_over
        self._stopping = False
        self._api_tasks: set[asyncio.Task[Any]] = set()

    async def run(self) -> None:
        """Serve until SIGTERM or SIGINT, then shut down gracefully."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        supervisor = self.supervisor
        if self.access_log is not None and supervisor is None:  # workers write their own
            self.access_log.start()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        certificates = self.certificates
        if certificates is not None:
            # With workers, each serves TLS with its own copy, and this one's is what
            # /status shows: all read the same files, on SIGHUP and when they change.
            loop.add_signal_handler(signal.SIGHUP, self._reload_certificates, certificates)
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
        if supervisor is None:
            proxy, where = self._listen_proxy()
        else:
            proxy, where = [], await supervisor.start(self._take_over)
        api = await listen(self.config.api, streams(self._serve_api))
        listeners = [*proxy, api]
        # Before the line that says it listens: a reader who sees that one sees this.
        log.info("hot path: %s", native.describe())
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
        # With workers, they sweep their own connections: this process has none.
        sweeper = (
            asyncio.create_task(self.proxying.enforce_timeouts()) if supervisor is None else None
        )
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
            if sweeper is not None:
                sweeper.cancel()
            if watcher is not None:
                watcher.cancel()
            if self.state.fallback is not None:
                self.state.fallback.stop()
            if self._pid_file is not None:
                self._pid_file.remove()
            if self.access_log is not None:
                await self.access_log.close()

    def _reload_certificates(self, certificates: Certificates) -> None:
        certificates.reload()
        if self.supervisor is not None:
            self.supervisor.reload_certificates()

    def _listen_proxy(self) -> tuple[list[Listener], list[str]]:
        """Listen where the proxy serves (one process): the plain address and the TLS one."""
        config = self.config
        plain = bind(config.proxy) if config.proxy is not None else None
        secure = bind(config.tls.address) if config.tls is not None else None
        return self.proxying.listen(plain, secure)

    async def _shutdown(self, listeners: list[Listener]) -> None:
        timeout = self.config.shutdown_timeout
        self._stopping = True
        for task in self._api_tasks:
            task.cancel()  # an API request cut short is safe: launches clean up after themselves
        if self.supervisor is not None:
            await asyncio.gather(self.supervisor.stop(), self.proxying.finish(listeners, 0))
        else:
            self.proxying.begin_shutdown()
            await self.proxying.finish(listeners, timeout)
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
