"""--buffer-responses over real sockets: the container's answer is taken off it as fast as
it comes, held for a client that reads slowly (memory, then an unnamed file), and the
container is let go at the answer's end; streams stay streams.

A client that "reads nothing" has a small receive buffer and does not read: what does not
fit in the kernel's buffers waits in the proxy, which the test can see from the backend
(it wrote its whole answer), the proxy's open files (``/proc``) and the access log.
"""

from __future__ import annotations

import asyncio
import os
import resource
import time
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import h11
import pytest
from click.testing import CliRunner

from tests.support.backend import Backend, random_body
from tests.support.openfiles import open_files_under
from tests.support.proxied import Client, Proxy, make_container, running_proxy
from tests.support.waiting import eventually
from tests.test_timeouts import sweeping
from wunderproxy import answerbuffer
from wunderproxy.answerbuffer import buffer_for
from wunderproxy.cli import main
from wunderproxy.config import Edge, Front
from wunderproxy.state import Container

MEMORY = 256 * 1024  # --buffer-memory in these tests
# Larger than what the kernel's buffers between the proxy and a client that reads nothing
# hold (a few MiB), so that most of it waits in the proxy, and larger than MEMORY.
LARGE = 16 * 1024 * 1024
# Larger than all of the kernel's buffers between a backend and a client that reads nothing
# can hold (they grow with the traffic: 5 to 9 MiB seen here), for answers that must wait.
HUGE = 32 * 1024 * 1024
SMALL_RECEIVE_BUFFER = 16_384
FRAMINGS = {"content-length": "", "chunked": "?chunked", "until-close": "?until-close"}


@pytest.fixture
def buffers(tmp_path: Path) -> Path:
    """--buffer-dir: a directory of its own, so that its open files are the spools'."""
    directory = tmp_path / "buffers"
    directory.mkdir()
    return directory


@pytest.fixture
async def proxy(tmp_path: Path, buffers: Path) -> AsyncIterator[Proxy]:
    """The in-process proxy with --buffer-responses, --buffer-memory MEMORY."""
    async with running_proxy(tmp_path / "access.log") as started:
        started.front = Front(buffer_responses=True, buffer_memory=MEMORY, buffer_dir=buffers)
        yield started


async def slow_client(proxy: Proxy, request: bytes) -> Client:
    """A client with a small receive buffer that sent ``request`` and reads nothing yet."""
    client = await proxy.connect(receive_buffer=SMALL_RECEIVE_BUFFER)
    client.send_raw(request)
    return client


async def taken(backend: Backend, container: Container, answers: int = 1) -> None:
    """Wait until ``backend`` wrote ``answers`` answers whole and the proxy read them all
    (no request is in flight on ``container`` any more)."""
    await eventually(lambda: backend.answered == answers and container.in_flight == 0, 20)


async def held_back(backend: Backend, answered: int = 0) -> None:
    """Check that ``backend`` waits for a client that reads nothing, as without buffering:
    it has not written its answer whole, and writes nothing more (the kernel's buffers in
    between took what they hold)."""
    await asyncio.sleep(1.0)
    sent = backend.body_sent
    await asyncio.sleep(0.5)
    assert (backend.answered, backend.body_sent) == (answered, sent)


def get(target: str) -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: t\r\n\r\n".encode()


async def response_to(client: Client, target: str) -> tuple[int, dict[str, str], bytes]:
    """The answer to ``get(target)``, sent raw (pipelined, maybe): its client's h11 is told
    of the request, then reads the answer."""
    client.conn.send(h11.Request(method="GET", target=target, headers=[("Host", "t")]))
    client.conn.send(h11.EndOfMessage())
    return await client.response()


def buffered_field(line: str) -> str:
    """The access log's last field (common format): what was buffered."""
    return line.rsplit(" ", 1)[1]


@pytest.mark.parametrize("framing", FRAMINGS)
async def test_an_answer_larger_than_buffer_memory_goes_through_a_file_and_arrives_byte_exact(
    proxy: Proxy, blue: Backend, buffers: Path, framing: str
) -> None:
    container = make_container(blue, "rev1")
    proxy.serve(container)
    client = await slow_client(proxy, get(f"/random/{LARGE}{FRAMINGS[framing]}"))
    # The container wrote its whole answer, while the client has read nothing of it.
    await taken(blue, container)
    (spooled,) = open_files_under(buffers)
    assert spooled.endswith("(deleted)"), "the file has no name"
    assert not any(buffers.iterdir())  # noqa: ASYNC240 (a directory of no files)
    status, headers, body = await response_to(client, f"/random/{LARGE}{FRAMINGS[framing]}")
    assert status == 200
    assert body == random_body(LARGE)
    assert ("content-length" in headers) == (framing == "content-length")
    (line,) = await proxy.logged_lines(1)
    assert f'"GET /random/{LARGE}' in line and buffered_field(line) == "response"
    assert open_files_under(buffers) == []


async def test_the_container_is_let_go_at_the_end_of_its_answer_while_the_client_reads_nothing(
    proxy: Proxy, blue: Backend
) -> None:
    container = make_container(blue, "rev1")
    proxy.serve(container)
    slow = await slow_client(proxy, get(f"/random/{LARGE}"))
    # The request is finished on the container once its answer is all read, and its
    # kept-alive connection serves the next client's request at once.
    await taken(blue, container)
    fast = await proxy.connect()
    assert (await fast.request("GET", "/"))[2] == b"blue"
    assert (blue.connections, blue.requests) == (1, 2)
    # The slow client gets all of its answer after that.
    assert (await response_to(slow, f"/random/{LARGE}"))[2] == random_body(LARGE)
    # An answer that ends with the connection (on the same one, idle again after the fast
    # client's answer): the proxy's side is closed too, while the client has read nothing.
    slow = await slow_client(proxy, get(f"/random/{LARGE}?until-close"))
    await taken(blue, container, 2)
    assert blue.connections == 1
    await eventually(lambda: not container.links)
    assert (await response_to(slow, f"/random/{LARGE}?until-close"))[2] == random_body(LARGE)


async def test_a_drain_does_not_wait_for_a_slow_client(
    proxy: Proxy, blue: Backend, green: Backend
) -> None:
    old = make_container(blue, "rev1")
    proxy.serve(old)
    slow = await slow_client(proxy, get(f"/random/{LARGE}"))
    await eventually(lambda: old.in_flight == 1)
    proxy.serve(make_container(green, "rev2"))
    assert old.state == "draining"
    # Idle once the proxy has the answer, while the slow client has read nothing yet.
    await asyncio.wait_for(old.wait_idle(), 20)
    assert blue.answered == 1
    await eventually(lambda: not old.links)  # its connection was closed, not kept
    assert (await response_to(slow, f"/random/{LARGE}"))[2] == random_body(LARGE)


async def test_memory_stays_within_buffer_memory_per_request_plus_a_constant(
    proxy: Proxy, blue: Backend
) -> None:
    container = make_container(blue, "rev1")
    proxy.serve(container)
    count = 4
    size = 8 * 1024 * 1024
    bodies = {size + n: random_body(size + n) for n in range(count)}  # made before measuring
    # What wunderproxy's code allocated (anywhere below it: the transports' buffers too),
    # not the backend's answers.
    tracemalloc.start(25)
    try:
        clients = [await slow_client(proxy, get(f"/random/{n}")) for n in bodies]
        await taken(blue, container, count)
        snapshot = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(True, "*/wunderproxy/*", all_frames=True)]
        )
    finally:
        tracemalloc.stop()
    held = sum(stat.size for stat in snapshot.statistics("filename"))
    # The constant: the client's transport holds up to its high-water mark (64 KiB) plus
    # the write that crossed it (one read of the container, 256 KiB at most), and the
    # request's objects a few KiB.
    bound = count * (MEMORY + 384 * 1024) + 256 * 1024
    print(f"\n{count} answers of {size >> 20} MiB held: {held / 1024:.0f} KiB in memory")
    assert held < bound, f"{held} bytes held for {count} requests; bound {bound}"
    for client, (size, body) in zip(clients, bodies.items(), strict=True):
        assert (await response_to(client, f"/random/{size}"))[2] == body


async def test_no_file_is_left_when_the_client_leaves_in_the_middle_of_its_answer(
    proxy: Proxy, blue: Backend, buffers: Path
) -> None:
    container = make_container(blue, "rev1")
    proxy.serve(container)
    client = await slow_client(proxy, get(f"/random/{LARGE}"))
    await taken(blue, container)
    await client.reader.readexactly(100_000)
    assert len(open_files_under(buffers)) == 1
    client.writer.transport.abort()
    await eventually(lambda: not proxy.connections)
    assert open_files_under(buffers) == []
    (line,) = await proxy.logged_lines(1)
    assert " 499 " in line


@pytest.mark.parametrize(
    "query",
    ["?type=text/event-stream", "?type=text/event-stream;%20charset=utf-8", "?accel=no"],
)
async def test_an_event_stream_or_an_answer_its_app_marks_unbuffered_waits_for_the_client(
    proxy: Proxy, blue: Backend, buffers: Path, query: str
) -> None:
    container = make_container(blue, "rev1")
    proxy.serve(container)
    client = await slow_client(proxy, get(f"/random/{HUGE}{query}"))
    await held_back(blue)
    assert open_files_under(buffers) == []
    assert (await response_to(client, f"/random/{HUGE}{query}"))[2] == random_body(HUGE)
    (line,) = await proxy.logged_lines(1)
    assert buffered_field(line) == "-"


async def test_past_max_held_the_container_waits_for_the_client_again(
    proxy: Proxy, blue: Backend, buffers: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One client reading a trickle of a huge answer cannot fill the disk."""
    monkeypatch.setattr(answerbuffer, "MAX_HELD", 2 * MEMORY)
    container = make_container(blue, "rev1")
    proxy.serve(container)
    client = await slow_client(proxy, get(f"/random/{HUGE}"))
    await held_back(blue)
    assert blue.body_sent < HUGE // 2, "the container was not read to its answer's end"
    assert (await response_to(client, f"/random/{HUGE}"))[2] == random_body(HUGE)
    (line,) = await proxy.logged_lines(1)
    assert buffered_field(line) == "response"


async def test_answers_without_a_body_are_passed_on_as_they_are(
    proxy: Proxy, blue: Backend
) -> None:
    container = make_container(blue, "rev1")
    proxy.serve(container)
    client = await proxy.connect()
    for method, target in (("HEAD", "/"), ("GET", "/status/204"), ("GET", "/status/304")):
        status, _, body = await client.request(method, target)
        assert body == b"" and status in (200, 204, 304)
    assert [buffered_field(line) for line in await proxy.logged_lines(3)] == ["-"] * 3


async def test_an_event_stream_and_a_slow_chunked_stream_reach_the_client_as_they_come(
    proxy: Proxy, blue: Backend
) -> None:
    container = make_container(blue, "rev1")
    proxy.serve(container)
    client = await proxy.connect()
    client.send_raw(get("/events"))  # three events 0.1 s apart
    started = time.monotonic()
    await client.read_until(b"data: 0\n\n")
    assert time.monotonic() - started < 0.1 + 0.15, "the first event came before the others"
    await client.read_until(b"data: 2\n\n")
    # Half a chunked answer, then a pause of 2 s: the first half is there before it ends.
    client = await proxy.connect()
    client.send_raw(get("/random/1000000?chunked&pause=2"))
    started = time.monotonic()
    received = 0
    while received < 400_000:  # of 458,752 before the pause
        received += len(await asyncio.wait_for(client.reader.read(65536), 2))
    assert time.monotonic() - started < 1.5


@pytest.mark.parametrize("framing", ["chunked", "length"])
async def test_an_answer_without_a_length_streams_once_its_container_pauses(
    proxy: Proxy, blue: Backend, framing: str
) -> None:
    # 32 MiB, a pause of 1.5 s (over the gap of 1 s), 32 MiB more, to a client that reads
    # nothing meanwhile. A chunked answer the container keeps open is a stream: after the
    # pause the container waits for the client. One with a length is taken whole.
    proxy.edge = Edge(upstream_timeout=5)
    container = make_container(blue, "rev1")
    proxy.serve(container)
    sweeper = asyncio.create_task(sweeping(proxy))
    try:
        target = f"/random/{2 * HUGE}" + (
            "?chunked&pause=1.5" if framing == "chunked" else "?pause=1.5"
        )
        client = await slow_client(proxy, get(target))
        await eventually(lambda: blue.body_sent >= HUGE, 10)  # all of the first half was taken
        await asyncio.sleep(1.5)
        if framing == "chunked":
            await held_back(blue)
        else:
            await taken(blue, container)
        assert (await response_to(client, target))[2] == random_body(2 * HUGE)
    finally:
        sweeper.cancel()


async def test_keep_alive_and_pipelining_go_on_after_a_buffered_answer(
    proxy: Proxy, blue: Backend
) -> None:
    container = make_container(blue, "rev1")
    proxy.serve(container)
    client = await slow_client(proxy, get(f"/random/{LARGE}") + get("/"))
    await taken(blue, container)
    await asyncio.sleep(0.2)
    # The pipelined request waits until the client has the first answer.
    assert blue.requests == 1
    assert (await response_to(client, f"/random/{LARGE}"))[2] == random_body(LARGE)
    assert (await response_to(client, "/"))[2] == b"blue"
    assert (await client.request("GET", "/random/300000"))[2] == random_body(300_000)
    lines = await proxy.logged_lines(3)
    assert [line.split('"')[1] for line in lines] == [
        f"GET /random/{LARGE} HTTP/1.1",
        "GET / HTTP/1.1",
        "GET /random/300000 HTTP/1.1",
    ]
    assert blue.connections == 1


async def test_a_container_dying_in_the_middle_of_an_answer_closes_the_client_connection(
    proxy: Proxy, blue: Backend, buffers: Path
) -> None:
    container = make_container(blue, "rev1")
    proxy.serve(container)
    client = await slow_client(proxy, get(f"/random/{LARGE}?cut"))
    await eventually(lambda: not blue.tasks and blue.requests == 1)
    received = await client.read_all()  # what reached it, then the close
    assert received.startswith(b"HTTP/1.1 200 \r\n")
    assert len(received) < LARGE // 2 + 1000
    (line,) = await proxy.logged_lines(1)
    assert " 502 " in line
    assert open_files_under(buffers) == []


async def test_a_container_dying_before_any_of_its_answer_went_out_gets_the_client_a_502(
    proxy: Proxy, blue: Backend, buffers: Path
) -> None:
    container = make_container(blue, "rev1")
    proxy.serve(container)
    client = await proxy.connect()
    client.send_raw(get(f"/random/{LARGE}?cut&wait=0.3"))
    await eventually(lambda: bool(proxy.connections))
    (connection,) = proxy.connections
    # The client's transport is full when the answer begins (a pipelined answer before it
    # still waits there): its transport says so to the connection, as here.
    connection.pause_writing()
    await eventually(lambda: not blue.tasks and blue.requests == 1)
    status, _, body = await response_to(client, f"/random/{LARGE}?cut&wait=0.3")
    assert status == 502 and b"container" in body
    assert open_files_under(buffers) == []


async def test_a_shutdown_waits_for_an_answer_still_fed_from_its_buffer(
    proxy: Proxy, blue: Backend
) -> None:
    container = make_container(blue, "rev1")
    proxy.serve(container)
    client = await slow_client(proxy, get(f"/random/{LARGE}"))
    await taken(blue, container)
    (connection,) = proxy.connections
    connection.close_when_idle(0.1)  # as the server does to each at SIGTERM
    await asyncio.sleep(0.5)
    assert (await response_to(client, f"/random/{LARGE}"))[2] == random_body(LARGE)
    assert await client.read_all() == b"", "closed after its answer"


@pytest.mark.parametrize("kind", ["upstream", "send"])
async def test_the_upstream_timeout_bounds_the_container_and_the_send_timeout_the_client(
    proxy: Proxy, blue: Backend, buffers: Path, kind: str
) -> None:
    # A container that stalls halfway while its slow client is fed (the client's pace
    # does not hide it), or a client that stops reading an answer the container ended.
    proxy.edge = (
        Edge(upstream_timeout=1.0, send_timeout=30)
        if kind == "upstream"
        else Edge(upstream_timeout=30, send_timeout=1.0)
    )
    container = make_container(blue, "rev1")
    proxy.serve(container)
    sweeper = asyncio.create_task(sweeping(proxy))
    try:
        target = f"/random/{LARGE}" + ("?pause=30" if kind == "upstream" else "")
        client = await slow_client(proxy, get(target))
        await eventually(lambda: proxy.state.timeouts[kind] == 1, within=10)
        assert len(await client.read_all()) < LARGE
        await eventually(lambda: not proxy.connections)
        assert open_files_under(buffers) == []
        assert proxy.state.timeouts == {kind: 1}
        (line,) = await proxy.logged_lines(1)
        assert (" 504 " if kind == "upstream" else " 200 ") in line
    finally:
        sweeper.cancel()


async def test_without_its_buffer_directory_an_answer_streams_and_the_log_says_what_to_do(
    proxy: Proxy, blue: Backend, buffers: Path, caplog: pytest.LogCaptureFixture
) -> None:
    container = make_container(blue, "rev1")
    proxy.serve(container)
    os.rmdir(buffers)  # there at start-up, gone since
    for answered in (0, 1):
        # Held back by the client, as without buffering, once memory took its part.
        client = await slow_client(proxy, get(f"/random/{HUGE}"))
        await held_back(blue, answered)
        assert (await response_to(client, f"/random/{HUGE}"))[2] == random_body(HUGE)
    warnings = [r.getMessage() for r in caplog.records if "cannot hold" in r.getMessage()]
    assert len(warnings) == 1, "said once"
    assert f"under {buffers} (No such file or directory; 1 so far)" in warnings[0]
    assert "point --buffer-dir at a directory with room" in warnings[0]
    assert proxy.state.spool_trouble.failures == 2


async def test_a_full_disk_streams_the_rest_of_an_answer_after_what_is_held(
    proxy: Proxy, blue: Backend, buffers: Path
) -> None:
    container = make_container(blue, "rev1")
    proxy.serve(container)
    # Files may grow to 4 MiB (in this process, for this test): past that, as on a full
    # disk, a write fails.
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4 * 1024 * 1024, hard))
    try:
        client = await slow_client(proxy, get(f"/random/{HUGE}"))
        await eventually(lambda: proxy.state.spool_trouble.failures == 1, within=10)
        await held_back(blue)  # the rest waits for the client
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert (await response_to(client, f"/random/{HUGE}"))[2] == random_body(HUGE)
    assert open_files_under(buffers) == []


def test_start_up_refuses_a_buffer_directory_it_cannot_write_to(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    result = CliRunner().invoke(
        main,
        [
            "run",
            f"file://{tmp_path}",
            "p",
            "app",
            "--buffer-responses",
            "--buffer-dir",
            str(missing),
        ],
    )
    assert result.exit_code == 2, result.output
    assert f"--buffer-dir {missing} cannot hold temporary files (No such file or directory)" in (
        " ".join(result.output.split())
    )


@pytest.mark.parametrize(
    ("fields", "method", "status", "buffered"),
    [
        (b"Content-Length: 10\r\n", b"GET", 200, "to its end"),
        (b"Transfer-Encoding: chunked\r\n", b"GET", 200, "until a gap"),
        (b"", b"GET", 200, "until a gap"),  # until the close
        (b"Content-Type: text/html\r\nContent-Length: 10\r\n", b"POST", 404, "to its end"),
        (b"Content-Type: text/event-stream\r\n", b"GET", 200, None),
        (b"content-type: Text/Event-Stream ; charset=utf-8\r\n", b"GET", 200, None),
        (b"Content-Type: text/event-streams\r\n", b"GET", 200, "until a gap"),
        (b"X-Accel-Buffering: no\r\nContent-Length: 10\r\n", b"GET", 200, None),
        (b"x-accel-buffering:  No \r\nContent-Length: 10\r\n", b"GET", 200, None),
        (b"X-Accel-Buffering: yes\r\nContent-Length: 10\r\n", b"GET", 200, "to its end"),
        (b"Content-Length: 0\r\n", b"GET", 200, None),
        (b"Content-Length: 10\r\n", b"HEAD", 200, None),
        (b"", b"GET", 204, None),
        (b"Content-Length: 10\r\n", b"GET", 304, None),
    ],
)
def test_which_answers_are_buffered_is_read_from_their_head(
    fields: bytes, method: bytes, status: int, buffered: str | None, tmp_path: Path
) -> None:
    head = b"HTTP/1.1 %d X\r\n%s\r\n" % (status, fields)
    buffer = buffer_for(head, method, status, MEMORY, tmp_path)
    if buffered is None:
        assert buffer is None
    else:
        assert buffer is not None and buffer.until_close == (buffered == "until a gap")
