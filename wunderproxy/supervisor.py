"""The supervisor of ``--workers N`` (N >= 2): N worker processes proxy, this one manages.

The process the operator started keeps the manager API, the controller, Docker, S3, the PID
file and the signals; it proxies nothing. Each worker is a fresh interpreter (never a
``fork``: this process has threads) running :mod:`wunderproxy.worker`, with a Unix socketpair
channel to this one (see channel.py) and listening sockets made here:

- TCP: one socket per worker per address, all with ``SO_REUSEPORT`` on the same port (the
  kernel spreads new connections over them). This process only binds them: the worker
  listens once it is ready to serve, so that no connection is queued for a worker that dies
  starting (a crash-looping one). Once a worker listens, this process closes its copies, so
  that a dead worker's accept queue dies with it rather than fill up unseen; its replacement
  gets fresh sockets.
- A Unix socket cannot be shared that way: one socket, kept here, serves every worker.

What routes is sent to every worker on each change (:meth:`Supervisor.publish`); a switch
answers once every live worker acknowledged it, and a drain ends once every worker that was
alive reported it done. Figures are asked of the workers when a document needs them and
summed (treefigures.py). A worker that dies is logged and started again, after a pause
that grows while it keeps dying young.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from wunderproxy.channel import (
    AskFigures,
    Channel,
    ChannelClosed,
    Drained,
    Hello,
    Ready,
    ReloadCertificates,
    Routed,
    SpreadEvenly,
    Stop,
    TellFigures,
    WorkerFigures,
)
from wunderproxy.config import Address, Config
from wunderproxy.listeners import bind, describe_socket, listening_inodes, steer_to_newest
from wunderproxy.routes import table_of
from wunderproxy.runtime import LoopChoice
from wunderproxy.state import Container, ProxyState
from wunderproxy.timestamps import rfc3339
from wunderproxy.treefigures import add_up, counters_of, show

log = logging.getLogger("wunderproxy")

# Seconds start-up waits for every worker to listen; a worker imports the whole proxy
# (about 0.3 s), loads certificates and opens the access log.
READY_TIMEOUT = 30.0
# Seconds /status waits for a worker's figures: a worker stuck that long is named, not
# waited for (a load balancer's health check must not time out behind it).
FIGURES_TIMEOUT = 1.0
# A worker that dies sooner than this after starting is dying young: the pause before the
# next start doubles, from FIRST_RESTART_PAUSE up to LONGEST_RESTART_PAUSE, so that a
# worker that cannot start does not spin the host.
STABLE_AFTER = 10.0
FIRST_RESTART_PAUSE = 0.1
LONGEST_RESTART_PAUSE = 5.0
# Seconds past --shutdown-timeout a stopping worker gets to exit before it is killed.
STOP_MARGIN = 5.0
# Seconds a worker has to acknowledge a new routing table. One that does not (stuck in a
# loop, or stopped with SIGSTOP) would go on routing by the old table after /switch said
# 200: it is killed, and started again with the new table.
ROUTED_WITHIN = 10.0
# Seconds between looks, after a take-over, at whether the predecessor still listens: the
# first soon (it closes its listeners ACCEPT_LINGER after our SIGTERM), then less often.
FIRST_LOOK_FOR_PREDECESSOR = 0.25
LONGEST_LOOK_FOR_PREDECESSOR = 10.0


class WorkersDidNotStart(Exception):
    """Not every worker listened within READY_TIMEOUT; those that did were stopped."""


@dataclass(eq=False)
class WorkerProcess:
    """One running incarnation of a worker slot, as the supervisor sees it."""

    index: int
    process: asyncio.subprocess.Process
    channel: Channel
    sockets: dict[str, socket.socket]  # this process's copies, until the worker listens
    started: datetime
    began: float  # time.monotonic() at start
    ready: bool = False
    exited: bool = False
    routed: int = -1  # the newest routing table it acknowledged
    figures: WorkerFigures | None = None  # as it last told them
    drained: set[str] = field(default_factory=set)  # container ids it is done with
    asks: dict[int, asyncio.Future[None]] = field(default_factory=dict)  # set when answered

    @property
    def pid(self) -> int:
        return self.process.pid

    def close_sockets(self) -> None:
        """Close this process's copies of the worker's own (TCP) sockets."""
        for sock in self.sockets.values():
            sock.close()
        self.sockets.clear()


@dataclass
class Slot:
    """A worker's place: its number, its current incarnation, and its history."""

    index: int
    worker: WorkerProcess | None = None
    restarts: int = 0
    pause: float = FIRST_RESTART_PAUSE
    restarting: asyncio.Task[None] | None = None


class Supervisor:
    """Starts, feeds, watches and stops the worker processes (the controller's
    :class:`~wunderproxy.controller.Workers`)."""

    def __init__(
        self,
        config: Config,
        state: ProxyState,
        loop: LoopChoice = "auto",
        access_log: tuple[str, str] | None = None,
    ) -> None:
        self._config = config
        self._state = state
        self._loop_choice = loop
        self._access_log = access_log
        self._slots = [Slot(index) for index in range(1, config.workers + 1)]
        self._sequence = 0
        self._table = table_of(state, 0)
        # Each draining container's id, with the sequence of the table it began draining in.
        self._draining_since = {
            c.container_id: 0 for c in state.containers if c.state == "draining"
        }
        self._asks = itertools.count()
        self._changed = asyncio.Event()  # set (and replaced) whenever a worker reports
        self._stopping = False
        self._started = False
        # The TCP addresses as bound (the port a 0 resolved to), and the shared Unix sockets.
        self._addresses: dict[str, Address] = {}
        self._shared: dict[str, socket.socket] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._steering: asyncio.Task[None] | None = None
        # The inodes of every TCP socket made for a worker: which listeners are ours.
        self._ours: set[int] = set()
        # Where each kind of TCP listener is bound, as the kernel writes it (a numeric host,
        # where --proxy may name one): what /proc/net/tcp is searched for.
        self._bound_at: dict[str, tuple[str, int]] = {}
        # The counters of dead workers as they last told them, so that totals never go
        # down when a worker dies (Prometheus would take that for a restart).
        self._retired = add_up([])
        state.routes_changed = self.publish

    # -- start and stop ------------------------------------------------------------

    async def start(self, take_over: bool) -> list[str]:
        """Start every worker and wait until all listen; with ``take_over``, then steer
        new connections to them. Returns how the log names the listeners."""
        for slot in self._slots:
            await self._spawn(slot)
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                await self._wait_for(
                    lambda: all(s.worker is not None and s.worker.ready for s in self._slots)
                )
        except TimeoutError:
            await self.stop()
            raise WorkersDidNotStart(
                f"not every worker process was listening after {READY_TIMEOUT:g} s; the log "
                "above says what the workers ran into (their lines say 'worker N')"
            ) from None
        if take_over:
            first = self._slots[0].worker
            assert first is not None
            for sock in first.sockets.values():
                steer_to_newest(sock, len(self._slots))
            self._steering = asyncio.create_task(self._spread_evenly_once_alone())
        self._started = True
        for slot in self._slots:
            if slot.worker is not None:
                slot.worker.close_sockets()
        where = [f"{len(self._slots)} workers"]
        tls = self._config.tls
        for kind, name in (("tls", "TLS proxy"), ("plain", "proxy")):
            address = self._addresses.get(kind)
            shared = self._shared.get(kind)
            if address is not None:
                where.append(f"{name} on {address}")
            elif shared is not None:
                where.append(f"{name} on {describe_socket(shared)}")
        if tls is not None and tls.redirect_http:  # the plain listener, named last
            where[-1] += " (redirecting to https)"
        return where

    async def stop(self) -> None:
        """Tell every worker to shut down gracefully and wait for them (killing those
        still running ``--shutdown-timeout`` plus a margin later)."""
        self._stopping = True
        if self._steering is not None:
            self._steering.cancel()
        workers = []
        for slot in self._slots:
            if slot.restarting is not None:
                slot.restarting.cancel()
            if slot.worker is not None and not slot.worker.exited:
                workers.append(slot.worker)
                with contextlib.suppress(ChannelClosed):
                    slot.worker.channel.send(Stop())
        deadline = self._config.shutdown_timeout + STOP_MARGIN
        waits = [asyncio.ensure_future(w.process.wait()) for w in workers]
        if waits:
            _, late = await asyncio.wait(waits, timeout=deadline)
            for worker in workers:
                if worker.process.returncode is None:
                    log.error(
                        "worker %d (PID %d) did not exit %g s after being told to: killed",
                        worker.index,
                        worker.pid,
                        deadline,
                    )
                    with contextlib.suppress(ProcessLookupError):
                        worker.process.kill()
            if late:
                await asyncio.wait(late)
        for sock in self._shared.values():
            sock.close()

    def reload_certificates(self) -> None:
        """SIGHUP: every worker reads its TLS certificate and key again."""
        self._broadcast(ReloadCertificates())

    # -- routes, drains, figures ---------------------------------------------------

    @property
    def sequence(self) -> int:
        """The number of the newest routing table."""
        return self._sequence

    def publish(self) -> None:
        """Send every worker the routing table as it is now (ProxyState.routes_changed)."""
        self._sequence += 1
        self._table = table_of(self._state, self._sequence)
        draining = {c.container_id for c in self._state.containers if c.state == "draining"}
        # A container that starts draining now drains anew: what a worker said of an
        # earlier drain of it counts no more, and a Drained of that drain still on its way
        # is told apart by its older sequence (see _listen_to).
        self._draining_since = {
            id_: self._draining_since.get(id_, self._sequence) for id_ in draining
        }
        for worker in self._workers():
            worker.drained &= {
                id_ for id_ in draining if self._draining_since[id_] < self._sequence
            }
        self._broadcast(self._table)

    async def routed(self) -> None:
        """Wait until every live worker routes by the newest table; a worker that does not
        say so within ROUTED_WITHIN is killed (its replacement starts with the table)."""
        sequence = self._sequence

        def lagging() -> list[WorkerProcess]:
            return [w for w in self._workers() if not w.exited and w.routed < sequence]

        try:
            async with asyncio.timeout(ROUTED_WITHIN):
                await self._wait_for(lambda: not lagging())
        except TimeoutError:
            for worker in lagging():
                log.error(
                    "worker %d (PID %d) did not take the new routes within %g s: killing "
                    "it, so that no request goes the old way; it is started again",
                    worker.index,
                    worker.pid,
                    ROUTED_WITHIN,
                )
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()
            await self._wait_for(lambda: not lagging())

    async def drained(self, container: Container) -> None:
        """Wait until every worker alive now is done with ``container`` (or has died)."""
        workers = [w for w in self._workers() if not w.exited]
        await self._wait_for(
            lambda: all(w.exited or container.container_id in w.drained for w in workers)
        )

    async def gather(self, minutes: bool = True) -> None:
        """Ask every listening worker for its figures and show their sums in the state;
        the per-minute series only with ``minutes`` (for ``/status``: ``/metrics`` shows
        none, and they cost the most to send and add up).

        A worker that does not answer within FIGURES_TIMEOUT is named (``answered: false``),
        not waited for, and counted with the figures it last told: leaving it out would make
        the totals go down, which Prometheus takes for a restart of the counters.
        """
        asked: list[tuple[WorkerProcess, int, asyncio.Future[None]]] = []
        loop = asyncio.get_running_loop()
        for worker in self._workers():
            if worker.exited or not worker.ready:
                continue
            ask = next(self._asks)
            future: asyncio.Future[None] = loop.create_future()
            worker.asks[ask] = future
            try:
                worker.channel.send(AskFigures(ask, minutes))
            except ChannelClosed:
                worker.asks.pop(ask, None)
                continue
            asked.append((worker, ask, future))
        if asked:
            await asyncio.wait([f for _, _, f in asked], timeout=FIGURES_TIMEOUT)
        answered: set[int] = set()
        for worker, ask, future in asked:
            if future.done() and not future.cancelled() and future.exception() is None:
                answered.add(worker.index)  # its figures were kept as they came
            else:
                worker.asks.pop(ask, None)  # its late answer, if any, is dropped
                future.cancel()
        # Every live worker's figures as last told (just now, for those that answered);
        # the dead ones' counters are in _retired.
        told = [w.figures for w in self._workers() if not w.exited and w.figures is not None]
        show(self._state, add_up([*told, self._retired]))
        self._state.workers = [self._describe(slot, slot.index in answered) for slot in self._slots]

    async def _spread_evenly_once_alone(self) -> None:
        """Once no socket but the workers' listens on our TCP ports (the predecessor of a
        take-over closed its own; told by inode, not by count, which a worker being
        restarted meanwhile would make too low), have the workers steer evenly over themselves: the
        take-over's program would send more than their share to some (see steer_to_newest)."""
        loop = asyncio.get_running_loop()
        pause = FIRST_LOOK_FOR_PREDECESSOR
        addresses = list(self._bound_at.values())

        def alone() -> bool:
            # /proc/net/tcp lists every socket of the host: read off the loop.
            return all(listening_inodes(a) <= self._ours for a in addresses)

        while not await loop.run_in_executor(None, alone):
            await asyncio.sleep(pause)
            pause = min(pause * 2, LONGEST_LOOK_FOR_PREDECESSOR)
        self._broadcast(SpreadEvenly(len(self._slots)))
        log.info(
            "no predecessor listens on %s any more: new connections are spread evenly over "
            "the workers",
            ", ".join(str(a) for a in self._addresses.values()),
        )

    # -- the workers' lives --------------------------------------------------------

    async def _spawn(self, slot: Slot) -> None:
        sockets = self._sockets()
        ours, theirs = socket.socketpair()
        passed = [theirs.fileno(), *(s.fileno() for s in sockets.values())]
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "wunderproxy.worker",
                str(theirs.fileno()),
                self._loop_choice,
                pass_fds=passed,
                stdin=asyncio.subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
            for kind, sock in sockets.items():
                if kind not in self._shared:
                    sock.close()
            raise
        finally:
            theirs.close()
        channel = await Channel.open(ours)
        worker = WorkerProcess(
            index=slot.index,
            process=process,
            channel=channel,
            sockets={k: s for k, s in sockets.items() if k not in self._shared},
            started=datetime.now(UTC),
            began=time.monotonic(),
        )
        slot.worker = worker
        channel.send(
            Hello(
                index=slot.index,
                config=self._config,
                sockets={kind: sock.fileno() for kind, sock in sockets.items()},
                routes=self._table,
                log_level=logging.getLevelName(logging.getLogger().getEffectiveLevel()),
                access_log=self._access_log[0] if self._access_log else None,
                access_log_format=self._access_log[1] if self._access_log else "common",
            )
        )
        listening = asyncio.create_task(self._listen_to(slot, worker))
        self._tasks.add(listening)
        listening.add_done_callback(self._tasks.discard)

    def _sockets(self) -> dict[str, socket.socket]:
        """Listening sockets for a new worker: fresh TCP ones, the shared Unix ones."""
        sockets: dict[str, socket.socket] = {}
        wanted = {"plain": self._config.proxy}
        if self._config.tls is not None:
            wanted["tls"] = self._config.tls.address
        for kind, address in wanted.items():
            if address is None:
                continue
            if address.path is not None:
                if kind not in self._shared:
                    self._shared[kind] = bind(address)
                sockets[kind] = self._shared[kind]
                continue
            # Only bound: the worker listens once it can serve (a socket that listened
            # here would queue connections for a worker that may die starting: reset).
            sock = bind(self._addresses.get(kind, address), listening=False)
            self._ours.add(os.fstat(sock.fileno()).st_ino)
            self._bound_at.setdefault(kind, sock.getsockname()[:2])
            if kind not in self._addresses:  # the port a 0 resolved to, for the others
                port = sock.getsockname()[1]
                self._addresses[kind] = Address(host=address.host, port=port)
            sockets[kind] = sock
        return sockets

    async def _listen_to(self, slot: Slot, worker: WorkerProcess) -> None:
        """Act on one worker's messages until its channel closes; then see to its death."""
        try:
            while True:
                message = await worker.channel.receive()
                if isinstance(message, Routed):
                    worker.routed = message.sequence
                elif isinstance(message, Drained):
                    since = self._draining_since.get(message.container_id)
                    if since is not None and message.sequence >= since:
                        worker.drained.add(message.container_id)
                elif isinstance(message, TellFigures):
                    # Kept here, not where the ask is awaited: a worker that dies before
                    # that is retired with these (see below), its newest.
                    told, worker.figures = worker.figures, message.figures
                    if not message.minutes and told is not None:
                        # Not asked for: the series as it sent it last, rather than none.
                        worker.figures = replace(
                            message.figures, traffic_minutes=told.traffic_minutes
                        )
                    future = worker.asks.pop(message.ask, None)
                    if future is not None and not future.done():
                        future.set_result(None)
                elif isinstance(message, Ready):
                    worker.ready = True
                    worker.routed = message.sequence
                    if self._started:
                        worker.close_sockets()
                self._notify()
        except ChannelClosed:
            pass
        code = await worker.process.wait()
        worker.exited = True
        worker.channel.close()
        worker.close_sockets()
        if worker.figures is not None:
            self._retired = add_up([self._retired, counters_of(worker.figures)])
        for future in worker.asks.values():
            future.cancel()
        self._notify()
        if not self._stopping:
            self._restart_later(slot, worker, code)

    def _restart_later(self, slot: Slot, worker: WorkerProcess, code: int) -> None:
        lived = time.monotonic() - worker.began
        if lived >= STABLE_AFTER:
            slot.pause = FIRST_RESTART_PAUSE
        if code == 0:  # it shut down gracefully: a SIGTERM sent to it alone
            how, lost = "exited", "; it had finished its requests (a SIGTERM sent to it alone?)"
        else:
            how = f"was killed by {_signal_name(-code)}" if code < 0 else f"exited with code {code}"
            lost = "; its connections were lost"
        log.error(
            "worker %d (PID %d) %s after %.1f s%s. Starting it "
            "again in %g s%s. If this keeps happening, look above for its own lines "
            "(they say 'worker %d'), and at the host's memory (a killed worker is often "
            "the kernel's OOM killer: dmesg)",
            slot.index,
            worker.pid,
            how,
            lived,
            lost,
            slot.pause,
            f" (it keeps dying young: waiting longer each time, up to {LONGEST_RESTART_PAUSE:g} s)"
            if slot.pause > FIRST_RESTART_PAUSE
            else "",
            slot.index,
        )
        pause = slot.pause
        slot.pause = min(slot.pause * 2, LONGEST_RESTART_PAUSE)
        slot.restarting = asyncio.create_task(self._restart(slot, pause))

    async def _restart(self, slot: Slot, pause: float) -> None:
        await asyncio.sleep(pause)
        if self._stopping:
            return
        slot.restarts += 1
        try:
            await self._spawn(slot)
        except OSError as exc:
            log.error("could not start worker %d again: %s; trying again", slot.index, exc)
            slot.restarting = asyncio.create_task(self._restart(slot, LONGEST_RESTART_PAUSE))
            return
        worker = slot.worker
        assert worker is not None
        log.info("worker %d started again as PID %d", slot.index, worker.pid)

    # -- helpers -------------------------------------------------------------------

    def _workers(self) -> list[WorkerProcess]:
        return [slot.worker for slot in self._slots if slot.worker is not None]

    def _broadcast(self, message: Any) -> None:
        for worker in self._workers():
            if not worker.exited:
                with contextlib.suppress(ChannelClosed):
                    worker.channel.send(message)

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _wait_for(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self._changed.wait()

    def _describe(self, slot: Slot, answered: bool) -> dict[str, Any]:
        """One worker in /status ``workers``: its figures as it last told them (just now
        if ``answered``)."""
        worker = slot.worker
        alive = worker is not None and not worker.exited
        figures = worker.figures if worker is not None and alive else None
        described: dict[str, Any] = {
            "index": slot.index,
            "pid": worker.pid if worker is not None and alive else None,
            "started_at": rfc3339(worker.started) if worker is not None and alive else None,
            "restarts": slot.restarts,
            "state": ("serving" if worker.ready else "starting")
            if worker is not None and alive
            else "restarting",
            "answered": answered,
        }
        if figures is not None:
            described["connections"] = {
                "open": figures.open_connections,
                "active": figures.active_connections,
            }
            described["requests"] = {
                "total": figures.requests,
                "by_revision": {rev: f.requests for rev, f in figures.traffic_totals.items()},
            }
        return described


def _signal_name(number: int) -> str:
    with contextlib.suppress(ValueError):
        return signal.Signals(number).name
    return f"signal {number}"
