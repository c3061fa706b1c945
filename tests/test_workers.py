"""The parts of --workers that need no worker process: the channel over a real socketpair,
how a worker's state follows the routing table, the sums of the workers' figures, the
steering program, and the access log's pieces for a shared pipe."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from dataclasses import replace

import pytest

from tests.support.proxied import make_container
from wunderproxy.accesslog import whole_lines
from wunderproxy.channel import Channel, ChannelClosed, Routed, RouteTable, WorkerFigures
from wunderproxy.config import Address, Config, Fleet, Peer
from wunderproxy.fallback import Fallback
from wunderproxy.listeners import listening_inodes, listening_sockets, steering_program
from wunderproxy.routes import follow, table_of
from wunderproxy.state import Container, ProxyState
from wunderproxy.traffic import MINUTES_KEPT, Minute, Traffic
from wunderproxy.treefigures import add_up, collect, counters_of, show


def config() -> Config:
    return Config(
        bucket="memory",
        prefix="apps",
        app="myapp",
        proxy=Address.parse("127.0.0.1:0", "--proxy"),
        api=Address.parse("127.0.0.1:0", "--api"),
        workers=2,
    )


# -- the channel --------------------------------------------------------------------


async def test_messages_cross_the_channel_whole_and_in_order_and_eof_says_closed() -> None:
    ours, theirs = socket.socketpair()
    supervisor, worker = await Channel.open(ours), await Channel.open(theirs)
    truth = ProxyState("myapp", "1")
    truth.add(make_container(9001, "rev1"))
    truth.switch_to(truth.containers[0])
    table = table_of(truth, 7)
    supervisor.send(config())
    supervisor.send(table)
    worker.send(Routed(7))
    assert await worker.receive() == config()
    received = await worker.receive()
    assert isinstance(received, RouteTable) and received == table
    assert received.containers[0].config.revision == "rev1"
    assert await supervisor.receive() == Routed(7)
    supervisor.close()
    with pytest.raises(ChannelClosed):
        await worker.receive()
    worker.close()


async def test_a_message_larger_than_a_socket_buffer_arrives_whole() -> None:
    ours, theirs = socket.socketpair()
    supervisor, worker = await Channel.open(ours), await Channel.open(theirs)
    big = "x" * (3 * 1024 * 1024)
    supervisor.send(big)
    assert await worker.receive() == big
    supervisor.close()
    worker.close()


# -- routes -------------------------------------------------------------------------


class Follower:
    """A worker's state following the supervisor's, with what it was told to do."""

    def __init__(self) -> None:
        self.state = ProxyState("myapp", "1")
        self.changed: list[tuple[str, str]] = []
        self.forgotten: list[str] = []

    def follow(self, table: RouteTable) -> None:
        follow(self.state, table, self._changed, self._forgotten)

    def _changed(self, container: Container) -> None:
        self.changed.append((container.container_id, container.state))

    def _forgotten(self, container: Container) -> None:
        self.forgotten.append(container.container_id)


def test_a_worker_follows_launch_switch_drain_and_removal_with_its_own_containers() -> None:
    truth, worker = ProxyState("myapp", "1"), Follower()
    rev1, rev2 = make_container(9001, "rev1"), make_container(9002, "rev2")
    truth.add(rev1)
    truth.switch_to(rev1)
    worker.follow(table_of(truth, 1))
    mine = worker.state.current
    assert mine is not None and mine is not rev1, "a worker has its own Container objects"
    assert (mine.container_id, mine.state, mine.port) == (rev1.container_id, "serving", 9001)
    worker.state.request_started()
    truth.add(rev2)
    worker.follow(table_of(truth, 2))
    assert worker.state.current is mine, "a launched container does not route yet"
    truth.switch_to(rev2)
    worker.follow(table_of(truth, 3))
    current = worker.state.current
    assert current is not None and current.container_id == rev2.container_id
    assert mine.state == "draining"
    assert worker.changed == [
        (rev1.container_id, "serving"),
        (rev1.container_id, "draining"),  # the worker drains its own connections to it
        (rev2.container_id, "serving"),
    ]
    assert worker.state.requests.since_switch == 0, "since_switch restarts at the switch"
    assert worker.state.health_check_path == b"/"
    truth.forget(rev1)
    worker.follow(table_of(truth, 4))
    assert worker.forgotten == [rev1.container_id]
    assert [c.container_id for c in worker.state.containers] == [rev2.container_id]


def test_a_container_docker_says_died_is_marked_down_and_its_links_closed_in_a_worker() -> None:
    truth, worker = ProxyState("myapp", "1"), Follower()
    rev1 = make_container(9001, "rev1")
    truth.add(rev1)
    truth.switch_to(rev1)
    worker.follow(table_of(truth, 1))
    mine = worker.state.current
    assert mine is not None

    class Link:
        idle = False
        closed = False

        def close(self) -> None:
            self.closed = True

    link = Link()
    mine.links.add(link)
    rev1.died = True
    worker.follow(table_of(truth, 2))
    assert (mine.died, mine.down, link.closed) == (True, True, True)


# -- figures ------------------------------------------------------------------------


def counted(requests: int, revision: str, status: int, container: Container) -> WorkerFigures:
    """The figures of a worker that answered ``requests`` requests."""
    state = ProxyState("myapp", "1")
    state.add(container)
    state.switch_to(container)
    state.traffic = Traffic(clock=lambda: 1_800_000_010.0)
    for _ in range(requests):
        state.request_started()
        state.request_finished(revision, status, 0.01, 10, 100)
    state.open_connections = requests
    state.active_connections = 1
    state.timeouts["header"] += requests
    container.in_flight = 1
    return collect(state)


def test_the_figures_of_two_workers_add_up_in_status_and_metrics() -> None:
    one = counted(3, "rev1", 200, make_container(9001, "rev1"))
    two = counted(4, "rev1", 502, make_container(9001, "rev1"))
    total = add_up([one, two])
    assert (total.requests, total.since_switch) == (7, 7)
    assert total.by_status == {200: 3, 502: 4}
    assert total.traffic_totals["rev1"].requests == 7
    assert [m.start for m in total.traffic_minutes] == [1_800_000_000.0]
    assert total.traffic_minutes[0].by_revision["rev1"].by_status == {200: 3, 502: 4}
    assert total.containers["rev1-container"].in_flight == 2
    assert total.timeouts == {"header": 7}
    supervisor = ProxyState("myapp", "1")
    served = make_container(9001, "rev1")
    supervisor.add(served)
    supervisor.switch_to(served)
    show(supervisor, total)
    document = supervisor.snapshot()
    assert document["requests"] == {
        "total": 7,
        "since_switch": 7,
        "by_status": {"200": 3, "502": 4},
    }
    assert document["Requests"] == 7
    assert document["connections"]["open"] == 7
    assert document["traffic"]["since_start"]["requests"] == 7
    assert document["containers"][0]["in_flight"] == 2
    assert document["timeouts"] == {"header": 7}


def test_no_worker_answering_adds_up_to_nothing() -> None:
    total = add_up([])
    assert (total.requests, total.by_status, total.traffic_totals) == (0, {}, {})
    assert total.fallback is None


# -- the steering program -----------------------------------------------------------


def test_the_steering_program_returns_random_modulo_count_plus_the_old_sockets() -> None:
    program = steering_program(3, 2)
    instructions = [struct.unpack("HBBI", program[i : i + 8]) for i in range(0, 32, 8)]
    assert instructions == [
        (0x20, 0, 0, (-0x1000 + 56) & 0xFFFFFFFF),  # A = random (SKF_AD_RANDOM)
        (0x94, 0, 0, 2),  # A %= 2
        (0x04, 0, 0, 3),  # A += 3
        (0x16, 0, 0, 0),  # return A
    ]


def test_listening_sockets_counts_every_socket_of_a_reuseport_group() -> None:
    sockets = []
    try:
        for _ in range(3):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(("127.0.0.1", sockets[0].getsockname()[1] if sockets else 0))
            sock.listen()
            sockets.append(sock)
        assert listening_sockets(sockets[0].getsockname()) == 3
    finally:
        for sock in sockets:
            sock.close()


# -- the access log on a shared pipe ------------------------------------------------


@pytest.mark.parametrize(
    ("chunk", "limit", "pieces"),
    [
        (b"aaa\nbb\ncccc\n", 7, [b"aaa\nbb\n", b"cccc\n"]),
        (b"aaaaaaaaaa\nb\n", 4, [b"aaaaaaaaaa\n", b"b\n"]),  # a long line alone
        (b"ab\n", 3, [b"ab\n"]),
        (b"", 4, []),
    ],
)
def test_access_log_lines_go_to_a_pipe_in_whole_lines_of_at_most_pipe_buf(
    chunk: bytes, limit: int, pieces: list[bytes]
) -> None:
    assert whole_lines(chunk, limit) == pieces
    assert b"".join(pieces) == chunk


def test_collect_counts_what_the_forwarder_counted() -> None:
    state = ProxyState("myapp", "1")
    state.connections_refused = 2
    state.spool_trouble.failures = 1
    figures = collect(state)
    assert (figures.refused, figures.buffer_failures) == (2, 1)


async def test_nothing_hangs_when_the_other_side_dies_mid_message() -> None:
    ours, theirs = socket.socketpair()
    worker = await Channel.open(theirs)
    ours.sendall(struct.pack(">I", 100) + b"partial")
    ours.close()
    async with asyncio.timeout(5):
        with pytest.raises(ChannelClosed):
            await worker.receive()
    worker.close()


def test_a_dead_workers_counters_stay_in_the_sums_and_what_was_open_goes() -> None:
    dead = counted(5, "rev1", 200, make_container(9001, "rev1"))
    alive = counted(2, "rev1", 200, make_container(9001, "rev1"))
    left = counters_of(dead)
    assert (left.requests, left.by_status, left.timeouts) == (5, {200: 5}, {"header": 5})
    assert left.traffic_totals["rev1"].requests == 5
    assert (left.open_connections, left.active_connections, left.containers) == (0, 0, {})
    assert (left.since_switch, left.time_since_switch) == (0, 0.0)
    total = add_up([alive, left])
    assert (total.requests, total.open_connections, total.since_switch) == (7, 2, 2)
    assert total.containers["rev1-container"].in_flight == 1


def test_the_sums_keep_the_last_hour_of_minutes_only() -> None:
    old = counted(1, "rev1", 200, make_container(9001, "rev1"))
    minute = old.traffic_minutes[0]
    hours = replace(
        old,
        traffic_minutes=tuple(
            Minute(minute.start + 60.0 * n, minute.by_revision) for n in range(90)
        ),
    )
    starts = [m.start for m in add_up([hours]).traffic_minutes]
    assert len(starts) == MINUTES_KEPT and starts[-1] == minute.start + 60.0 * 89


def test_fallback_figures_add_up_and_a_peer_is_skipped_while_any_worker_skips_it() -> None:
    fleet = Fleet(
        instance="web-1",
        peers=(Peer.parse("http://127.0.0.1:8081"), Peer.parse("http://127.0.0.1:8082")),
        secret=b"fleet",
    )
    parts = []
    for sent, skip_until in ((2, 0.0), (3, time.monotonic() + 5.0)):
        state = ProxyState("myapp", "1")
        state.fallback = Fallback(fleet)
        state.fallback.sent["http://127.0.0.1:8081"] += sent
        state.fallback.unplaced += 1
        state.fallback.peers[1].skip_until = skip_until
        state.fallback.peers[0].upgraded = 1
        parts.append(collect(state))
    supervisor = ProxyState("myapp", "1")
    supervisor.fallback = Fallback(fleet)
    show(supervisor, add_up(parts))
    described = supervisor.snapshot()["fallback"]
    assert (described["sent"], described["unplaced"]) == (5, 2)
    assert [p["skipped_for"] > 4 for p in described["peers"]] == [False, True]
    assert supervisor.connection_counts()["upgraded"] == 2


def test_listening_inodes_tell_which_listening_sockets_are_whose() -> None:
    sockets = [socket.socket() for _ in range(2)]
    try:
        for sock in sockets:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sockets[0].bind(("127.0.0.1", 0))
        sockets[1].bind(sockets[0].getsockname())
        sockets[0].listen()
        address = sockets[0].getsockname()
        mine = {os.fstat(s.fileno()).st_ino for s in sockets}
        assert listening_inodes(address) == {os.fstat(sockets[0].fileno()).st_ino}
        sockets[1].listen()  # only bound until now: not listed
        assert listening_inodes(address) == mine
    finally:
        for sock in sockets:
            sock.close()
