"""--buffer-requests in a process of its own (benchmarks/proxy_only.py: the production
server before a fixed upstream), measured from outside: its peak memory over many
concurrent uploads to a slow app, the files it holds open, and a disk that fills up.

Figures these tests print (``-s``) are quoted in the README.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import struct
import time
from pathlib import Path

from tests.support.backend import Sink, running_sink
from tests.support.process import ProxyOnly, proxy_only
from tests.support.waiting import eventually

MiB = 1024 * 1024
MEMORY = 64 * 1024  # --buffer-memory
UPLOADS = 12  # at once, each of BODY bytes
# Twice what the kernel takes off a connection toward a slow app (its send buffer grows to
# 4 MiB, net.ipv4.tcp_wmem): the rest must wait in the file, not in the proxy's memory.
BODY = 8 * MiB
LEAVING = 3  # of them leave halfway, reset
PIECE = 64 * 1024
# What a request may add to the process's peak memory beyond --buffer-memory: the reads of
# its client in flight (asyncio reads up to 256 KiB at once), one READ_SIZE piece of its
# file and the transport's 64 KiB high-water mark toward the app, and the allocator's
# slack. Measured below: about 250 KiB per request in all. Writing on without waiting for
# the app would hold about 4 MiB per request; whole bodies in memory, 8 MiB.
PER_REQUEST = 768 * 1024


def peak_memory(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


def files_open_under(pid: int, directory: Path) -> list[str]:
    """The files ``pid`` holds open under ``directory`` (deleted, unnamed ones included)."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:  # closed meanwhile
            continue
        if target.startswith(str(directory)):
            found.append(target)
    return found


async def upload(port: int, body: bytes, leave_at: int | None = None) -> bytes:
    """PUT ``body`` in PIECE-byte writes; the answer's body (b"" for a client that leaves
    by a reset once ``leave_at`` bytes are sent)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"PUT /upload HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body))
        for at in range(0, len(body), PIECE):
            if at == leave_at:
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return b""
            writer.write(body[at : at + PIECE])
            await writer.drain()
            await asyncio.sleep(0.005)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
        assert head.startswith(b"HTTP/1.1 200 "), head
        length = int(head.lower().partition(b"content-length: ")[2].partition(b"\r")[0])
        return await asyncio.wait_for(reader.readexactly(length), 10)
    finally:
        writer.close()


async def uploads_through(running: ProxyOnly, sink: Sink, spool_dir: Path) -> tuple[int, int]:
    """UPLOADS uploads at once, LEAVING of them cut halfway; returns the growth of the
    proxy's peak memory, and the most spool files it held open at once."""
    await eventually(running.listening, 20)
    pid = running.process.pid
    bodies = [os.urandom(BODY) for _ in range(UPLOADS)]
    assert (
        await upload(running.port, b"warm-up")
        == hashlib.sha256(b"warm-up").hexdigest().encode() + b"\n"
    )
    before = peak_memory(pid)
    most_files = 0
    work = asyncio.gather(
        *(
            upload(running.port, body, BODY // 2 if i < LEAVING else None)
            for i, body in enumerate(bodies)
        )
    )
    while not work.done():
        most_files = max(most_files, len(files_open_under(pid, spool_dir)))
        await asyncio.sleep(0.05)
    answers = await work
    for body, answer in zip(bodies[LEAVING:], answers[LEAVING:], strict=True):
        assert answer == hashlib.sha256(body).hexdigest().encode() + b"\n"
    assert sink.answered == 1 + UPLOADS - LEAVING
    await eventually(lambda: files_open_under(pid, spool_dir) == [], 10)
    assert os.listdir(spool_dir) == []  # unnamed files: none ever had a name
    return peak_memory(pid) - before, most_files


async def test_memory_stays_within_buffer_memory_per_request_and_no_file_is_left(
    tmp_path: Path,
) -> None:
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    options = ("--buffer-requests", "--buffer-dir", str(spool_dir))
    # The app starts reading a second after each request reaches it: the bodies wait.
    async with running_sink(read_after=1.0, pace=256 * 1024) as sink:
        with proxy_only(tmp_path, sink.port, *options, "--buffer-memory", str(MEMORY)) as running:
            started = time.monotonic()
            grown, most_files = await uploads_through(running, sink, spool_dir)
            seconds = time.monotonic() - started
    # The same with a --buffer-memory that holds whole bodies: the measure sees them.
    async with running_sink(read_after=1.0, pace=256 * 1024) as sink:
        with proxy_only(tmp_path, sink.port, *options, "--buffer-memory", str(2 * BODY)) as running:
            grown_whole, _ = await uploads_through(running, sink, spool_dir)
    print(
        f"\n{UPLOADS} uploads of {BODY // MiB} MiB at once ({LEAVING} cut halfway) in "
        f"{seconds:.1f} s: peak memory +{grown / MiB:.1f} MiB with --buffer-memory "
        f"{MEMORY // 1024} KiB (+{grown / UPLOADS / 1024:.0f} KiB per upload), "
        f"{most_files} spool files open at most; +{grown_whole / MiB:.1f} MiB with whole "
        "bodies in memory"
    )
    assert most_files >= UPLOADS // 2, "the bodies were not held in files"
    assert grown < UPLOADS * (MEMORY + PER_REQUEST)
    assert grown_whole > (UPLOADS - LEAVING) * BODY  # the measure can tell


async def test_a_full_disk_answers_503_logs_what_to_do_and_the_proxy_goes_on(
    tmp_path: Path,
) -> None:
    """Files of at most 1 MiB (RLIMIT_FSIZE, per process): past that a write fails as on a
    full disk (EFBIG here, ENOSPC there: the same OSError on the same write)."""
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    options = ("--buffer-requests", "--buffer-dir", str(spool_dir), "--buffer-memory", str(MEMORY))
    async with running_sink() as sink:
        with proxy_only(tmp_path, sink.port, *options, max_file_size=MiB) as running:
            await eventually(running.listening, 20)
            reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
            writer.write(b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % (4 * MiB))

            async def send_until_refused() -> None:
                with contextlib.suppress(ConnectionError):
                    for _ in range(4 * MiB // PIECE):
                        writer.write(b"x" * PIECE)
                        await writer.drain()
                        await asyncio.sleep(0.01)

            sending = asyncio.create_task(send_until_refused())
            answer = await asyncio.wait_for(reader.read(), 10)
            await sending
            writer.close()
            assert answer.startswith(b"HTTP/1.1 503 "), answer
            assert b"no room to hold the request body" in answer
            log = running.log()
            assert "cannot hold a buffered body in a file under" in log
            assert "the request was answered 503" in log
            assert "File too large" in log
            # A body that fits is served, by the same process.
            body = os.urandom(MiB // 2)
            assert (
                await upload(running.port, body)
                == hashlib.sha256(body).hexdigest().encode() + b"\n"
            )
            pid = running.process.pid
            await eventually(lambda: files_open_under(pid, spool_dir) == [])
