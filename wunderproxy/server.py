"""Start-up and graceful shutdown of one wunderproxy process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from wunderproxy import __version__, manager
from wunderproxy.config import Address, Config
from wunderproxy.controller import Controller, Engine
from wunderproxy.forwarder import ClientConnection
from wunderproxy.state import ProxyState
from wunderproxy.store import Store

log = logging.getLogger("wunderproxy")

ConnectionHandler = Callable[
    [asyncio.StreamReader, asyncio.StreamWriter], Coroutine[Any, Any, None]
]


async def listen(address: Address, handler: ConnectionHandler) -> asyncio.Server:
    """Listen on a TCP address or a Unix socket path."""
    if address.path is not None:
        return await asyncio.start_unix_server(handler, path=address.path)
    # Bind the socket ourselves: SO_REUSEADDR lets a restart bind while old connections
    # linger in TIME_WAIT.
    sock = socket.socket(socket.AF_INET6 if ":" in (address.host or "") else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address.host or "0.0.0.0", address.port or 0))
    return await asyncio.start_server(handler, sock=sock, backlog=1024)


class Server:
    """The proxy and the manager of one app, sharing one event loop."""

    def __init__(self, config: Config, store: Store, engine: Engine) -> None:
        self.config = config
        self.state = ProxyState(config.app, __version__)
        self.controller = Controller(config, self.state, store, engine)
        self.manager = manager.Manager(self.controller, self.state, config.api_token)
        self._connections: set[ClientConnection] = set()
        self._proxy_tasks: set[asyncio.Task[Any]] = set()
        self._api_tasks: set[asyncio.Task[Any]] = set()

    async def run(self) -> None:
        """Serve until SIGTERM or SIGINT, then shut down gracefully."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        proxy = await listen(self.config.proxy, self._serve_client)
        api = await listen(self.config.api, self._serve_api)
        log.info(
            "wunderproxy %s for app %s: proxy on %s, API on %s",
            __version__,
            self.config.app,
            _bound(proxy, self.config.proxy),
            _bound(api, self.config.api),
        )
        if not self.config.api.is_loopback_only and self.config.api_token is None:
            log.warning(
                "the API listens on %s without --api-token: /launch and /switch are refused "
                "to every peer but this host; set --api-token to deploy from elsewhere",
                self.config.api,
            )
        startup = asyncio.create_task(self.controller.start())
        await stop.wait()
        log.info("shutting down: no new connections, finishing requests in flight")
        startup.cancel()
        await self._shutdown(proxy, api)

    async def _shutdown(self, proxy: asyncio.Server, api: asyncio.Server) -> None:
        timeout = self.config.shutdown_timeout
        proxy.close()
        api.close()
        for task in self._api_tasks:
            task.cancel()  # an API request cut short is safe: launches clean up after themselves
        for connection in list(self._connections):
            connection.close_when_idle()
        if self._proxy_tasks:
            _, pending = await asyncio.wait(list(self._proxy_tasks), timeout=timeout)
            if pending:
                log.warning("%d connections still busy after %g s: closed", len(pending), timeout)
                for connection in list(self._connections):
                    connection.abort()
                await asyncio.wait(pending, timeout=1.0)
        await self.controller.shutdown(timeout)
        log.info("stopped; the app container keeps running")

    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        connection = ClientConnection(reader, writer, self.state, self.config.keepalive_timeout)
        self._connections.add(connection)
        _track(self._proxy_tasks)
        try:
            await connection.serve()
        finally:
            self._connections.discard(connection)

    async def _serve_api(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _track(self._api_tasks)
        await manager.serve_connection(reader, writer, self.manager.handle)


def _track(tasks: set[asyncio.Task[Any]]) -> None:
    """Remember the running connection task in ``tasks`` until it ends."""
    task = asyncio.current_task()
    if task is not None:
        tasks.add(task)
        task.add_done_callback(tasks.discard)


def _bound(server: asyncio.Server, address: Address) -> str:
    """The address actually bound (tells the port when 0 was asked for)."""
    with contextlib.suppress(IndexError, TypeError):
        name = server.sockets[0].getsockname()
        if isinstance(name, tuple):
            return f"{name[0]}:{name[1]}"
    return str(address)
