"""A proxy worker process: ``python -m wunderproxy.worker FD LOOP``, started by its supervisor
(see supervisor.py), never by hand.

It proxies on the listening sockets the supervisor passed to it, routes by the table the
supervisor sends (its own :class:`ProxyState`, with its own containers, connections and
counters), drains a replaced container on its own connections, and answers the supervisor's
asks for its figures. It ignores SIGINT (a terminal's Ctrl-C reaches the whole process group:
the supervisor decides), and shuts down gracefully when told to, on SIGTERM, or when its
channel to the supervisor closes: it never outlives its supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from typing import TYPE_CHECKING, Any

from wunderproxy import __version__
from wunderproxy.accesslog import AccessLog, AccessLogFormat
from wunderproxy.channel import (
    AskFigures,
    Channel,
    ChannelClosed,
    Drained,
    Hello,
    Ready,
    ReloadCertificates,
    Routed,
    RouteTable,
    SpreadEvenly,
    Stop,
    TellFigures,
)
from wunderproxy.drain import drain_links
from wunderproxy.fallback import Fallback
from wunderproxy.listeners import Listener, spread_evenly, start_listening
from wunderproxy.proxying import Proxying
from wunderproxy.routes import follow
from wunderproxy.runtime import LoopChoice, run_event_loop
from wunderproxy.state import Container, Home, ProxyState
from wunderproxy.treefigures import collect

if TYPE_CHECKING:
    from wunderproxy.certificates import Certificates

log = logging.getLogger("wunderproxy")


class Worker:
    """One worker's proxy, steered by its supervisor over ``channel``."""

    def __init__(self, hello: Hello, channel: Channel) -> None:
        config = hello.config
        self._hello = hello
        self._channel = channel
        self._stop = asyncio.Event()
        self.state = ProxyState(
            config.app, __version__, Home(config.fleet.instance, config.bucket, config.prefix)
        )
        if config.fleet.secret is not None:
            self.state.fallback = Fallback(config.fleet)
        self._certificates: Certificates | None = None
        if config.tls is not None:
            from wunderproxy.certificates import Certificates  # cryptography: only for TLS

            self._certificates = Certificates(config.tls)
        self._access_log = _open_access_log(hello)
        self.proxying = Proxying(config, self.state, self._access_log, self._certificates)
        self._drains: dict[Container, asyncio.Task[None]] = {}
        self._listeners: list[Listener] = []
        self._sequence = hello.routes.sequence  # the routing table followed now

    async def run(self) -> None:
        """Serve until told to stop (or the supervisor is gone), then shut down gracefully."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        if self._access_log is not None:
            self._access_log.start()
        self._follow(self._hello.routes)
        sockets = {kind: socket.socket(fileno=fd) for kind, fd in self._hello.sockets.items()}
        for sock in sockets.values():
            # The supervisor only bound them: from now on the kernel hands us connections.
            start_listening(sock)
        listeners, _ = self.proxying.listen(sockets.get("plain"), sockets.get("tls"))
        self._listeners = listeners
        self._channel.send(Ready(os.getpid(), self._hello.routes.sequence))
        sweeper = asyncio.create_task(self.proxying.enforce_timeouts())
        watcher = asyncio.create_task(self._certificates.watch()) if self._certificates else None
        reader = asyncio.create_task(self._read())
        try:
            await self._stop.wait()
            self.proxying.begin_shutdown()
            await self.proxying.finish(listeners, self._hello.config.shutdown_timeout)
        finally:
            reader.cancel()
            sweeper.cancel()
            if watcher is not None:
                watcher.cancel()
            if self.state.fallback is not None:
                self.state.fallback.stop()
            if self._access_log is not None:
                await self._access_log.close()
            self._channel.close()

    async def _read(self) -> None:
        """Act on the supervisor's messages until told to stop or the channel closes."""
        try:
            while True:
                message = await self._channel.receive()
                if isinstance(message, RouteTable):
                    self._follow(message)
                    self._channel.send(Routed(message.sequence))
                elif isinstance(message, AskFigures):
                    figures = collect(self.state, message.minutes)
                    self._channel.send(TellFigures(message.ask, figures, message.minutes))
                elif isinstance(message, ReloadCertificates):
                    if self._certificates is not None:
                        self._certificates.reload()
                elif isinstance(message, SpreadEvenly):
                    # One program serves a whole reuseport group: one socket of each will do.
                    for listener in self._listeners:
                        for sock in listener.sockets:
                            if sock.family in (socket.AF_INET, socket.AF_INET6):
                                spread_evenly(sock, message.count)
                elif isinstance(message, Stop):
                    break
        except ChannelClosed:
            log.warning("the supervisor is gone: finishing requests in flight, then exiting")
        self._stop.set()

    def _follow(self, table: RouteTable) -> None:
        self._sequence = table.sequence  # for the drains it starts
        follow(self.state, table, self._state_changed, self._forgotten)

    def _state_changed(self, container: Container) -> None:
        drain = self._drains.pop(container, None)
        if drain is not None:
            drain.cancel()  # switched back to it
        if container.state == "draining":
            task = asyncio.create_task(self._drain(container, self._sequence))
            self._drains[container] = task

    def _forgotten(self, container: Container) -> None:
        drain = self._drains.pop(container, None)
        if drain is not None:
            drain.cancel()
        container.stopping = True
        container.close_links(idle_only=False)

    async def _drain(self, container: Container, sequence: int) -> None:
        await drain_links(container, self._hello.config.drain_timeout)
        self._drains.pop(container, None)
        with contextlib.suppress(ChannelClosed):
            self._channel.send(Drained(container.container_id, sequence))


class CannotStart(Exception):
    """The worker cannot serve as configured; the message says what to fix."""


def _open_access_log(hello: Hello) -> AccessLog | None:
    if not hello.access_log:
        return None
    try:
        return AccessLog(hello.access_log, _log_format(hello.access_log_format))
    except OSError as exc:
        raise CannotStart(
            f"cannot open the access log {hello.access_log} for appending: {exc.strerror}; "
            "make it a writable file again (the worker is started again until it can)"
        ) from exc


def _log_format(name: str) -> AccessLogFormat:
    return "json" if name == "json" else "common"


async def _serve(sock: socket.socket) -> None:
    channel = await Channel.open(sock)
    hello = await channel.receive()
    assert isinstance(hello, Hello), f"a worker's first message is its Hello, not {hello!r}"
    logging.getLogger().setLevel(hello.log_level)
    _name_in_log(hello.index)
    await Worker(hello, channel).run()


def _name_in_log(index: int) -> None:
    """Log lines of this process say which worker wrote them."""
    for handler in logging.getLogger().handlers:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s %(name)s worker {index}: %(message)s")
        )


def main(argv: list[str]) -> None:
    """Run a worker on the channel whose descriptor is ``argv[0]``, on the event loop
    ``argv[1]`` (``auto``, ``asyncio`` or ``uvloop``, as ``--loop``)."""
    # A terminal's Ctrl-C reaches the whole process group: the supervisor decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level="INFO", stream=sys.stderr)
    sock = socket.socket(fileno=int(argv[0]))
    loop: Any = argv[1]
    choice: LoopChoice = loop if loop in ("asyncio", "uvloop") else "auto"
    code = 0
    try:
        run_event_loop(_serve(sock), choice)
    except CannotStart as exc:
        log.error("%s", exc)
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # Like the supervisor: do not wait for threads (the access log writer was closed).
    os._exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
