"""The supervisor's handling of its workers' messages, with a stand-in at the process seam.

Each stand-in worker is the other end of a real channel (a socketpair) that the test speaks
for; its process is a stand-in that exits when the test says so. The real worker processes
are tested in test_workers_e2e.py."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import pytest

from tests.support.proxied import make_container
from tests.test_workers import config, counted
from wunderproxy.channel import AskFigures, Channel, Drained, TellFigures
from wunderproxy.config import Address
from wunderproxy.drain import drain_links
from wunderproxy.state import ProxyState
from wunderproxy.supervisor import Slot, Supervisor, WorkerProcess

# Seconds a test waits for the supervisor to act on a message (it takes microseconds).
ACTS_WITHIN = 5.0


class StandInProcess:
    """What the supervisor uses of a worker's asyncio process: its PID, wait() and kill()."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._exited = asyncio.Event()

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        self.exit(-9)

    def exit(self, code: int) -> None:
        self.returncode = code
        self._exited.set()


@dataclass
class StandIn:
    """One stand-in worker: the supervisor's record of it, its side of the channel, and
    the supervisor's task reading that channel."""

    worker: WorkerProcess
    channel: Channel
    process: StandInProcess
    listening: asyncio.Task[None]

    async def dies(self) -> None:
        self.channel.close()
        self.process.exit(-9)
        async with asyncio.timeout(ACTS_WITHIN):
            await self.listening


@dataclass
class Tree:
    """A supervisor, the state it shows, and its stand-in workers."""

    supervisor: Supervisor
    state: ProxyState
    workers: list[StandIn]


@asynccontextmanager
async def supervising(count: int) -> AsyncIterator[Tree]:
    """A supervisor of ``count`` stand-in workers, all ready; it restarts no dead one."""
    state = ProxyState("myapp", "1")
    serving = make_container(9001, "rev1")
    state.add(serving)
    state.switch_to(serving)
    supervisor = Supervisor(config(), state)
    supervisor._stopping = True
    workers = []
    for index in range(1, count + 1):
        ours, theirs = socket.socketpair()
        process = StandInProcess(40000 + index)
        worker = WorkerProcess(
            index=index,
            process=process,  # type: ignore[arg-type]
            channel=await Channel.open(ours),
            sockets={},
            started=datetime.now(UTC),
            began=time.monotonic(),
            ready=True,
        )
        slot: Slot = supervisor._slots[index - 1]
        slot.worker = worker
        listening = asyncio.create_task(supervisor._listen_to(slot, worker))
        workers.append(StandIn(worker, await Channel.open(theirs), process, listening))
    try:
        yield Tree(supervisor, state, workers)
    finally:
        for stand_in in workers:
            if not stand_in.listening.done():
                await stand_in.dies()


async def answer_asks(stand_in: StandIn, requests: int) -> None:
    """Answer every AskFigures with ``requests`` counted."""
    while True:
        message: Any = await stand_in.channel.receive()
        if isinstance(message, AskFigures):
            figures = counted(requests, "rev1", 200, make_container(9001, "rev1"))
            stand_in.channel.send(TellFigures(message.ask, figures))


async def test_a_worker_silent_past_the_timeout_is_counted_with_its_last_figures_and_forgotten(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("wunderproxy.supervisor.FIGURES_TIMEOUT", 0.2)
    async with supervising(2) as tree:
        supervisor, state, (one, two) = tree.supervisor, tree.state, tree.workers
        answering = [asyncio.create_task(answer_asks(w, n)) for w, n in ((one, 3), (two, 4))]
        await supervisor.gather()
        assert state.requests.total == 7
        answering[0].cancel()  # worker 1 stops answering (as under SIGSTOP)
        for _ in range(3):
            await supervisor.gather()
            assert state.requests.total == 7
            assert [w["answered"] for w in state.workers] == [False, True]
            assert state.workers[0]["requests"]["total"] == 3
        assert one.worker.asks == {}, "an unanswered ask is not kept"
        answering[1].cancel()


async def test_a_stale_drained_from_before_a_switch_back_does_not_end_a_later_drain_early() -> None:
    async with supervising(1) as tree:
        supervisor, state, (worker,) = tree.supervisor, tree.state, tree.workers
        [rev1] = state.containers
        rev2 = make_container(9002, "rev2")
        state.add(rev2)
        state.switch_to(rev2)  # rev1 drains: table 2
        drained_then = Drained(rev1.container_id, supervisor.sequence)
        state.switch_to(rev1)  # and is switched back to (table 3) ...
        worker.channel.send(drained_then)  # ... before that worker's Drained arrives
        state.switch_to(rev2)  # rev1 drains again (table 4): its requests are in flight
        drain = asyncio.create_task(supervisor.drained(rev1))
        await asyncio.sleep(0.2)  # the supervisor has read the stale Drained by now
        assert not drain.done(), "a Drained from an older drain ended this one"
        worker.channel.send(Drained(rev1.container_id, supervisor.sequence))
        async with asyncio.timeout(ACTS_WITHIN):
            await drain


async def answer_once_then_die(stand_in: StandIn, requests: int) -> None:
    """Answer the next AskFigures with ``requests`` counted, then die."""
    while not isinstance(message := await stand_in.channel.receive(), AskFigures):
        pass
    figures = counted(requests, "rev1", 200, make_container(9001, "rev1"))
    stand_in.channel.send(TellFigures(message.ask, figures))
    await stand_in.dies()


async def test_a_worker_that_answers_then_dies_during_a_gather_is_counted_once_with_its_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("wunderproxy.supervisor.FIGURES_TIMEOUT", 0.3)
    async with supervising(2) as tree:
        supervisor, state, (one, two) = tree.supervisor, tree.state, tree.workers
        answering = [asyncio.create_task(answer_asks(w, n)) for w, n in ((one, 3), (two, 4))]
        await supervisor.gather()
        assert state.requests.total == 7
        for task in answering:
            task.cancel()
        # Worker 2 is slow, so the gather waits; meanwhile worker 1 answers 5, then dies.
        dying = asyncio.create_task(answer_once_then_die(one, 5))
        await supervisor.gather()
        await dying
        assert state.requests.total == 5 + 4
        await supervisor.gather()
        assert state.requests.total == 5 + 4, "a dead worker's last figures stay counted"


async def test_a_worker_that_exits_0_is_logged_as_having_finished_not_lost_its_requests(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with supervising(2) as tree:
        supervisor, (one, two) = tree.supervisor, tree.workers
        slots = supervisor._slots
        supervisor._restart_later(slots[0], one.worker, 0)
        supervisor._restart_later(slots[1], two.worker, -9)
        for slot in slots:
            assert slot.restarting is not None
            slot.restarting.cancel()
    [stopped, killed] = [r.getMessage() for r in caplog.records if "Starting it" in r.getMessage()]
    assert "worker 1 (PID 40001) exited after" in stopped
    assert "it had finished its requests" in stopped
    assert "lost" not in stopped
    assert "worker 2 (PID 40002) was killed by SIGKILL after" in killed
    assert "its connections were lost" in killed


async def test_a_supervisors_drain_log_gives_no_figures_it_does_not_have(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="wunderproxy.manager")
    container = make_container(9001, "rev1")
    container.in_flight = 3  # as the last /status showed: the workers' figures of then

    async def workers_done(_: object) -> None:
        pass

    await drain_links(container, 5.0, workers_done)
    [line] = [r.getMessage() for r in caplog.records if "draining" in r.getMessage()]
    assert line == f"draining container {container.container_id[:12]} in every worker"


async def test_a_supervisors_drain_ends_when_its_workers_are_done_whatever_status_last_saw(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="wunderproxy.manager")
    container = make_container(9001, "rev1")
    container.in_flight, container.upgraded = 1, 1  # copied in by a /status mid-request
    done = []

    async def workers_done(_: object) -> None:
        done.append(True)

    started = time.monotonic()
    await drain_links(container, 5.0, workers_done)

    assert done == [True]
    assert time.monotonic() - started < 1.0, "it waited for figures nothing updates"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def answer_as_asked(stand_in: StandIn, requests: int, asked: list[bool]) -> None:
    """Answer every AskFigures with ``requests`` counted, with minutes only if asked for
    (as a worker does); ``asked`` gets what each ask asked."""
    while True:
        message: Any = await stand_in.channel.receive()
        if isinstance(message, AskFigures):
            asked.append(message.minutes)
            figures = counted(requests, "rev1", 200, make_container(9001, "rev1"))
            if not message.minutes:
                figures = replace(figures, traffic_minutes=())
            stand_in.channel.send(TellFigures(message.ask, figures, message.minutes))


async def test_metrics_gathers_no_minutes_and_status_still_shows_every_workers_last_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("wunderproxy.supervisor.FIGURES_TIMEOUT", 0.3)
    async with supervising(2) as tree:
        supervisor, state, (one, two) = tree.supervisor, tree.state, tree.workers
        asked: list[bool] = []
        answering = [
            asyncio.create_task(answer_as_asked(w, n, asked)) for w, n in ((one, 3), (two, 4))
        ]
        await supervisor.gather(minutes=True)
        [minute] = state.traffic.minutes()
        assert minute.by_revision["rev1"].requests == 7
        await supervisor.gather(minutes=False)
        assert asked == [True, True, False, False], "a /metrics gather asks for no minutes"
        answering[0].cancel()  # worker 1 is now slow: /status shows its minutes of before
        await supervisor.gather(minutes=True)
        [minute] = state.traffic.minutes()
        assert minute.by_revision["rev1"].requests == 7
        answering[1].cancel()


async def test_after_a_take_over_on_a_host_name_the_workers_are_still_spread_evenly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # /proc/net/tcp has numbers: the supervisor must look for where the kernel bound the
    # sockets, not for the name --proxy gave (which made the look raise, and the workers
    # stay on the take-over's uneven steering for good).
    named = replace(config(), proxy=Address.parse("localhost:0", "--proxy"))
    supervisor = Supervisor(named, ProxyState("myapp", "1"))
    sockets = supervisor._sockets()
    try:
        with caplog.at_level(logging.INFO, logger="wunderproxy"):
            async with asyncio.timeout(ACTS_WITHIN):
                await supervisor._spread_evenly_once_alone()
        assert "new connections are spread evenly over the workers" in caplog.text
    finally:
        for sock in sockets.values():
            sock.close()
