"""--compress over real sockets: a client socket, the forwarder, a container that answers
byte for byte what each test wrote (tests/support/scripted.py)."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import random
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import pytest

from tests.support.backend import running_backend
from tests.support.encodings import ENCODINGS, decoded, decoder
from tests.support.proxied import Client, Proxy, make_container, running_proxy
from tests.support.scripted import (
    Script,
    ScriptedBackend,
    answer,
    chunked,
    chunks,
    json_body,
    scripted_backend,
)
from tests.support.waiting import eventually
from tests.support.wire import send_request
from wunderproxy.config import Front
from wunderproxy.encoders import OFF_LOOP_BYTES

COMPRESS = Front(compress=ENCODINGS)
JSON = "Content-Type: application/json"
ALL = "zstd, br, gzip"


@asynccontextmanager
async def compressing(
    tmp_path: Path, scripts: dict[str, Script], front: Front = COMPRESS
) -> AsyncIterator[tuple[Proxy, ScriptedBackend]]:
    """The proxy with ``front`` serving a scripted container."""
    async with (
        running_proxy(tmp_path / "access.log", front=front) as proxy,
        scripted_backend(scripts) as backend,
    ):
        proxy.serve(make_container(backend.port, "rev1"))
        yield proxy, backend


async def get(
    client: Client, path: str, accept_encoding: str | None = ALL, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    """One request on ``client``'s connection; the answer with its body as received."""
    headers = [] if accept_encoding is None else [("Accept-Encoding", accept_encoding)]
    send_request(client.conn, client.writer, method, path, headers=headers)
    return await client.response()


BODY = json_body(50_000)
LARGE = json_body(3 * 1024 * 1024)
FRAMINGS: dict[str, Callable[[bytes], Script]] = {
    "content-length": lambda body: Script([answer("200 OK", JSON, body=body)]),
    "chunked": lambda body: Script(
        [
            answer("200 OK", JSON, "Transfer-Encoding: chunked", length=False),
            chunks(body[:1000], body[1000:30_000]),
            chunks(body[30_000:]),
            b"0\r\n\r\n",  # the last chunk, in a write of its own
        ]
    ),
    "close-delimited": lambda body: Script(
        [answer("200 OK", JSON, length=False), body[:20_000], body[20_000:]], close=True
    ),
}


@pytest.mark.parametrize("framing", FRAMINGS)
@pytest.mark.parametrize("encoding", ENCODINGS)
async def test_the_client_decodes_the_containers_bytes(
    tmp_path: Path, encoding: str, framing: str
) -> None:
    async with compressing(tmp_path, {"/": FRAMINGS[framing](BODY)}) as (proxy, _):
        client = await proxy.connect()
        status, headers, body = await get(client, "/", f"{encoding}, identity;q=0.5")
        assert status == 200
        assert headers["content-encoding"] == encoding
        assert headers["transfer-encoding"] == "chunked" and "content-length" not in headers
        assert headers["vary"] == "Accept-Encoding"
        assert decoded(encoding, body) == BODY
        assert len(body) < len(BODY) / 3
        if framing == "close-delimited":
            assert headers["connection"] == "close"
            assert await client.read_all() == b""  # and it does close


@pytest.mark.parametrize("encoding", ENCODINGS)
async def test_a_large_answer_is_compressed_off_the_loop_in_order(
    tmp_path: Path, encoding: str
) -> None:
    """3 MiB of JSON whose every stretch differs, in writes of varied sizes around the
    off-loop line, so that large and small reads alternate: the client decodes it whole
    and in order, and several reads were compressed on worker threads."""
    line = OFF_LOOP_BYTES[encoding]
    sizes = [line * 2, 700, line + 1, 50, line - 1, 3 * line]
    parts, at = [], 0
    while at < len(LARGE):
        size = sizes[len(parts) % len(sizes)]
        parts.append(LARGE[at : at + size])
        at += size
    script = Script(
        [
            answer("200 OK", JSON, "Transfer-Encoding: chunked", length=False),
            *(chunks(part) for part in parts),
            b"0\r\n\r\n",
        ]
    )
    jobs = CountingExecutor()
    asyncio.get_running_loop().set_default_executor(jobs)
    async with compressing(tmp_path, {"/": script}) as (proxy, _):
        client = await proxy.connect()
        status, headers, body = await get(client, "/", encoding)
        assert (status, headers["content-encoding"]) == (200, encoding)
        assert decoded(encoding, body) == LARGE
        assert jobs.submitted >= 3, "the large reads were compressed on the loop"
        # The connection is in step after it: the next request is answered.
        assert (await get(client, "/", encoding))[0] == 200


@pytest.mark.parametrize("framing", ["content-length", "close-delimited"])
@pytest.mark.parametrize("encoding", ENCODINGS)
async def test_a_read_that_comes_while_one_is_compressed_off_the_loop_waits_its_turn(
    tmp_path: Path, encoding: str, framing: str
) -> None:
    """A client that reads slowly pauses and resumes the container's connection at any
    time (its transport calls pause_writing and resume_writing), also while a read is
    compressed off the loop: the container's next reads, and its close, then come before
    that one is done, and must follow it."""
    jobs = CountingExecutor(gate=threading.Event())
    asyncio.get_running_loop().set_default_executor(jobs)
    async with compressing(tmp_path, {"/": FRAMINGS[framing](LARGE)}) as (proxy, _):
        client = await proxy.connect()
        send_request(
            client.conn, client.writer, "GET", "/", headers=[("Accept-Encoding", encoding)]
        )
        await eventually(lambda: jobs.submitted == 1)  # held at the gate
        (connection,) = proxy.connections
        connection.pause_writing()
        connection.resume_writing()  # the container's connection is read again
        await asyncio.sleep(0.2)  # its next reads come in meanwhile
        jobs.gate.set()
        status, headers, body = await client.response()
        assert (status, headers["content-encoding"]) == (200, encoding)
        assert decoded(encoding, body) == LARGE


@pytest.mark.parametrize("close", ["after a length", "as the answer's end"])
async def test_a_container_that_closes_while_its_last_read_is_compressed_off_the_loop_is_not_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, close: str
) -> None:
    """An app that closes after each answer (unicorn, gunicorn's sync workers), its whole
    answer in one read that goes off the loop: the close waits behind it."""
    monkeypatch.setitem(OFF_LOOP_BYTES, "gzip", 1024)
    if close == "after a length":
        script = Script([answer("200 OK", JSON, "Connection: close", body=BODY)], close=True)
    else:
        script = Script([answer("200 OK", JSON, length=False) + BODY], close=True)
    jobs = CountingExecutor(gate=threading.Event())
    asyncio.get_running_loop().set_default_executor(jobs)
    async with compressing(tmp_path, {"/": script}) as (proxy, _):
        client = await proxy.connect()
        send_request(client.conn, client.writer, "GET", "/", headers=[("Accept-Encoding", "gzip")])
        await eventually(lambda: jobs.submitted == 1)  # held at the gate
        (connection,) = proxy.connections
        connection.pause_writing()
        connection.resume_writing()  # the container's connection is read again: its close
        await asyncio.sleep(0.3)
        jobs.gate.set()
        status, headers, body = await client.response()
        assert (status, headers["content-encoding"]) == (200, "gzip")
        assert decoded("gzip", body) == BODY
        (line,) = await proxy.logged_lines(1)
        assert '"GET / HTTP/1.1" 200 ' in line


async def test_bytes_after_an_answer_whose_end_was_compressed_off_the_loop_close_its_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The container's whole answer comes in one read that goes off the loop; bytes it
    sends after the answer's end, while that read is compressed, are out of turn: its
    connection is closed, not kept for the next request to read them as its answer."""
    monkeypatch.setitem(OFF_LOOP_BYTES, "gzip", 1024)
    more = asyncio.Event()
    script = Script([answer("200 OK", JSON, body=BODY), more, b"HTTP/1.1 200 OK\r\n"])
    jobs = CountingExecutor(gate=threading.Event())
    asyncio.get_running_loop().set_default_executor(jobs)
    async with compressing(tmp_path, {"/": script}) as (proxy, _):
        container = proxy.state.current
        assert container is not None
        client = await proxy.connect()
        send_request(client.conn, client.writer, "GET", "/", headers=[("Accept-Encoding", "gzip")])
        await eventually(lambda: jobs.submitted == 1)  # held at the gate
        (connection,) = proxy.connections
        connection.pause_writing()
        connection.resume_writing()  # the container's connection is read again
        more.set()  # the stray bytes come while the answer is compressed
        await asyncio.sleep(0.2)
        jobs.gate.set()
        status, headers, body = await client.response()
        assert (status, headers["content-encoding"]) == (200, "gzip")
        assert decoded("gzip", body) == BODY
        assert await eventually(lambda: not container.links)
        assert container.spare == []


@pytest.mark.parametrize("encoding", ENCODINGS)
async def test_a_request_sent_while_the_end_of_an_answer_is_compressed_waits_for_it(
    tmp_path: Path, encoding: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The container's whole answer comes in one read (off the loop from 1 KiB here); the
    client's next request, sent meanwhile, is read only once that answer went out."""
    monkeypatch.setitem(OFF_LOOP_BYTES, encoding, 1024)
    body = BODY[:8000]
    jobs = CountingExecutor(gate=threading.Event())
    asyncio.get_running_loop().set_default_executor(jobs)
    small = Script([answer("200 OK", body=b"small")])
    scripts = {"/large": FRAMINGS["content-length"](body), "/small": small}
    async with compressing(tmp_path, scripts) as (proxy, backend):
        client = await proxy.connect()
        send_request(
            client.conn, client.writer, "GET", "/large", headers=[("Accept-Encoding", encoding)]
        )
        await eventually(lambda: jobs.submitted == 1)  # held at the gate
        client.send_raw(b"GET /small HTTP/1.1\r\nHost: t\r\n\r\n")  # pipelined
        await asyncio.sleep(0.2)
        jobs.gate.set()
        status, _, received = await client.response()
        assert (status, decoded(encoding, received)) == (200, body)
        client.conn.send(h11.Request(method="GET", target="/small", headers=[("Host", "t")]))
        client.conn.send(h11.EndOfMessage())  # (h11 sends no pipelined requests itself)
        assert (await client.response())[::2] == (200, b"small")
        first, second = await proxy.logged_lines(2)
    assert '"GET /large HTTP/1.1" 200 ' in first and first.split()[-2] == encoding
    assert '"GET /small HTTP/1.1" 200 ' in second and second.split()[-2] == "-"
    assert [head.split(b" ")[1] for head in backend.requests] == [b"/large", b"/small"]


class CountingExecutor(concurrent.futures.ThreadPoolExecutor):
    """The default executor, counting the jobs given to it; with a ``gate``, each job
    waits until it is open."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        super().__init__(max_workers=4)
        self.submitted = 0
        self.gate = gate or threading.Event()
        if gate is None:
            self.gate.set()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        self.submitted += 1
        return super().submit(self._run, fn, *args, **kwargs)

    def _run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        assert self.gate.wait(30), "the test never opened the gate"
        return fn(*args, **kwargs)


@dataclass(frozen=True)
class Rule:
    """A request and the container's answer; ``compressed``: whether it must be."""

    answer: bytes
    compressed: bool
    accept_encoding: str | None = ALL
    method: str = "GET"


PLAIN = json_body(2000)
RULES = {
    "json, 2000 bytes": Rule(answer("200 OK", JSON, body=PLAIN), True),
    "text/html; charset": Rule(
        answer("200 OK", "Content-Type: text/html; charset=utf-8", body=PLAIN), True
    ),
    "an error page": Rule(answer("404 Not Found", "Content-Type: text/html", body=PLAIN), True),
    "a type not listed": Rule(answer("200 OK", "Content-Type: image/png", body=PLAIN), False),
    "no content type": Rule(answer("200 OK", body=PLAIN), False),
    "exactly --compress-min-size": Rule(answer("200 OK", JSON, body=PLAIN[:1024]), True),
    "below --compress-min-size": Rule(answer("200 OK", JSON, body=PLAIN[:1023]), False),
    "small, of unknown length": Rule(
        answer("200 OK", JSON, "Transfer-Encoding: chunked", length=False, body=chunked(b"[1]")),
        True,
    ),
    "an answer to HEAD": Rule(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 5000\r\n\r\n",
        False,
        method="HEAD",
    ),
    "206": Rule(
        answer("206 Partial Content", JSON, "Content-Range: bytes 0-1999/9000", body=PLAIN), False
    ),
    "304": Rule(
        b'HTTP/1.1 304 Not Modified\r\nContent-Type: text/html\r\nETag: "a"\r\n\r\n', False
    ),
    "204": Rule(b"HTTP/1.1 204 No Content\r\nContent-Type: text/html\r\n\r\n", False),
    "no-transform": Rule(
        answer("200 OK", JSON, "Cache-Control: public, No-Transform", body=PLAIN), False
    ),
    "already encoded": Rule(answer("200 OK", JSON, "Content-Encoding: gzip", body=PLAIN), False),
    "every encoding at q=0": Rule(
        answer("200 OK", JSON, body=PLAIN), False, "zstd;q=0, br;q=0, gzip;q=0"
    ),
    "identity only": Rule(answer("200 OK", JSON, body=PLAIN), False, "identity"),
    "no Accept-Encoding": Rule(answer("200 OK", JSON, body=PLAIN), False, None),
}


async def test_only_the_answers_the_rules_allow_are_compressed(tmp_path: Path) -> None:
    scripts = {f"/{number}": Script([rule.answer]) for number, rule in enumerate(RULES.values())}
    async with compressing(tmp_path, scripts) as (proxy, _):
        client = await proxy.connect()  # one connection: each answer leaves it in step
        compressed = {}
        for number, (name, rule) in enumerate(RULES.items()):
            status, headers, body = await get(
                client, f"/{number}", rule.accept_encoding, rule.method
            )
            sent = h11_answer(rule.answer, rule.method)
            encoding = headers.get("content-encoding")
            compressed[name] = encoding != sent.headers.get("content-encoding")
            if compressed[name]:
                assert encoding is not None
                assert (status, decoded(encoding, body)) == (sent.status, sent.body), name
            else:  # untouched: the container's fields and body, byte for byte
                assert (status, headers, body) == (sent.status, sent.headers, sent.body), name
        assert compressed == {name: rule.compressed for name, rule in RULES.items()}


async def test_an_answer_to_http_1_0_is_not_compressed(tmp_path: Path) -> None:
    sent = answer("200 OK", JSON, body=PLAIN)
    async with compressing(tmp_path, {"/": Script([sent])}) as (proxy, _):
        client = await proxy.connect()
        client.send_raw(b"GET / HTTP/1.0\r\nAccept-Encoding: gzip\r\n\r\n")
        assert await client.read_all() == sent


@pytest.mark.parametrize("framing", ["close-delimited", "chunked"])
@pytest.mark.parametrize("encoding", ENCODINGS)
async def test_a_streamed_answer_reaches_the_client_event_by_event(
    tmp_path: Path, encoding: str, framing: str
) -> None:
    """The container sends its second event only once the client decoded the first."""
    first, second = b"data: first\n\n", b"data: second\n\n"
    decoded_first = asyncio.Event()
    stream = "Content-Type: text/event-stream"
    if framing == "chunked":
        head = answer("200 OK", stream, "Transfer-Encoding: chunked", length=False)
        parts = [head, chunks(first), decoded_first, chunked(second)]
    else:
        parts = [answer("200 OK", stream, length=False), first, decoded_first, second]
    async with compressing(tmp_path, {"/events": Script(parts, close=True)}) as (proxy, _):
        client = await proxy.connect()
        send_request(
            client.conn, client.writer, "GET", "/events", headers=[("Accept-Encoding", encoding)]
        )
        decode = decoder(encoding)
        received = b""
        async with asyncio.timeout(5):
            while received != first:
                event = await next_event(client)
                if isinstance(event, h11.Response):
                    assert dict(event.headers)[b"content-encoding"] == encoding.encode()
                elif isinstance(event, h11.Data):
                    received += decode(event.data)
            decoded_first.set()
            while not isinstance(event := await next_event(client), h11.EndOfMessage):
                assert isinstance(event, h11.Data)
                received += decode(event.data)
        assert received == first + second


async def next_event(client: Client) -> h11.Event:
    """The next h11 event of an answer on ``client``, reading as needed."""
    while (event := client.conn.next_event()) is h11.NEED_DATA:
        client.conn.receive_data(await client.reader.read(65536))
    assert not isinstance(event, type(h11.PAUSED)), event
    return event


async def test_the_connection_is_kept_alive_after_compressed_answers(tmp_path: Path) -> None:
    scripts = {"/length": FRAMINGS["content-length"](BODY), "/chunked": FRAMINGS["chunked"](BODY)}
    async with compressing(tmp_path, scripts) as (proxy, backend):
        client = await proxy.connect()
        for path, encoding in [("/length", "zstd"), ("/chunked", "br"), ("/length", "gzip")]:
            status, headers, body = await get(client, path, encoding)
            assert (status, headers["content-encoding"]) == (200, encoding)
            assert decoded(encoding, body) == BODY
        assert (await get(client, "/length", None))[2] == BODY  # and then one as it is
        assert len(backend.requests) == 4
        assert len(proxy.clients) == 1 and not client.reader.at_eof()


async def test_the_access_log_shows_the_encoding(tmp_path: Path) -> None:
    async with compressing(tmp_path, {"/": FRAMINGS["content-length"](BODY)}) as (proxy, _):
        client = await proxy.connect()
        await get(client, "/", "br")
        await get(client, "/", None)
        lines = await proxy.logged_lines(2)
    assert [line.split()[-2] for line in lines] == ["br", "-"]


async def test_without_compress_an_answer_passes_untouched(tmp_path: Path) -> None:
    sent = answer("200 OK", JSON, body=PLAIN)
    async with compressing(tmp_path, {"/": Script([sent], close=True)}, Front()) as (proxy, _):
        client = await proxy.connect()
        client.send_raw(
            b"GET / HTTP/1.1\r\nHost: t\r\nAccept-Encoding: gzip\r\nConnection: close\r\n\r\n"
        )
        assert await client.read_all() == sent


async def test_an_upgrade_stays_bytes_with_compress_on(tmp_path: Path) -> None:
    async with (
        running_proxy(tmp_path / "access.log", front=COMPRESS) as proxy,
        running_backend("blue") as blue,
    ):
        proxy.serve(make_container(blue, "rev1"))
        client = await proxy.connect()
        await client.upgrade()


@dataclass(frozen=True)
class Sent:
    status: int
    headers: dict[str, str]
    body: bytes


def h11_answer(data: bytes, method: str) -> Sent:
    """What a client reads of the container's answer ``data`` to ``method``."""
    connection = h11.Connection(h11.CLIENT)
    connection.send(h11.Request(method=method, target="/", headers=[("Host", "t")]))
    connection.send(h11.EndOfMessage())
    connection.receive_data(data)
    status, headers, body = 0, {}, b""
    while not isinstance(event := connection.next_event(), h11.EndOfMessage):
        if isinstance(event, h11.Response):
            status = event.status_code
            headers = {name.decode(): value.decode() for name, value in event.headers}
        elif isinstance(event, h11.Data):
            body += event.data
    return Sent(status, headers, body)


async def test_a_compressed_answer_with_a_length_stays_buffered_when_its_app_pauses(
    tmp_path: Path,
) -> None:
    """With --buffer-responses, compression's chunked framing does not make an answer the
    container sent with a length look like an open stream: a pause longer than the stream
    gap mid-body still lets the container go at the answer's end, not the slow client."""
    body = base64.b64encode(random.Random(7).randbytes(18 * 1024 * 1024))
    first_half = asyncio.Event()
    head = answer("200 OK", JSON, body=body)
    split = len(head) - len(body) + 12_000_000
    script = Script([head[:split], first_half, head[split:]])
    front = Front(compress=("gzip",), buffer_responses=True, buffer_dir=tmp_path)
    async with compressing(tmp_path, {"/": script}, front) as (proxy, _):
        client = await proxy.connect(receive_buffer=4096)
        client.send_raw(b"GET / HTTP/1.1\r\nHost: t\r\nAccept-Encoding: gzip\r\n\r\n")
        await asyncio.sleep(1.0)  # the client reads nothing: it fell behind
        container = proxy.state.current
        assert container is not None and container.in_flight == 1
        proxy.sweep(1.5)  # the app computes for longer than the stream gap
        first_half.set()
        # The whole answer was taken off the container while its client still reads.
        await eventually(lambda: container.in_flight == 0, within=20)
        client.writer.close()
