"""Memory per idle keep-alive connection: what a server's resident set grows by while it
holds many client connections that each brought one complete request and then went quiet.

    python3 benchmarks/idle_connections.py --port 8000 --pid 1234 [--count 10000]

Each connection sends ``GET /small.txt``, reads the whole answer and stays open, so a proxy
also holds whatever upstream connection it keeps for it. The process's VmRSS (summed over
its descendants too) is read before the connections open and again once they are all open
and idle; the difference divided by the connections still open is the cost of one.
Opening is bounded in time; every connection is closed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.peers import HOST, process_tree, raise_open_files, rss_kib, socket_count

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]
# What the server holds: resident memory in KiB, and open sockets.
Reading = tuple[int, int]


@dataclass(frozen=True)
class IdleResult:
    """Connections asked for, opened and still open at the second reading; the server's
    RSS and open sockets (client and upstream connections, listeners) at both readings."""

    wanted: int
    opened: int
    held: int
    failed: int
    rss_before_kib: int
    rss_after_kib: int
    sockets_before: int
    sockets_after: int
    seconds: float
    first_error: str

    @property
    def kib_per_connection(self) -> float:
        """RSS growth per connection still open when it was read."""
        if self.held == 0:
            return float("nan")
        return (self.rss_after_kib - self.rss_before_kib) / self.held

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"kib_per_connection": self.kib_per_connection}


async def _read_answer(reader: asyncio.StreamReader) -> None:
    """Read one whole HTTP/1.1 answer; raise unless it is a 200."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = lines[0].split(" ", 2)
    if len(status) < 2 or status[1] != "200":
        raise ConnectionError(f"answer {lines[0]!r}")
    headers = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(":") for line in lines[1:] if line)
    }
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        await reader.readuntil(b"0\r\n\r\n")
    else:
        raise ConnectionError("answer without a length on a kept-alive connection")


async def _open_one(port: int, path: str, gate: asyncio.Semaphore) -> Stream:
    """Connect, send one GET, read its answer; the connection stays open."""
    async with gate:
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode())
            await _read_answer(reader)
        except BaseException:
            writer.close()
            raise
        return reader, writer


async def _close_all(streams: list[Stream]) -> None:
    """Close every connection and wait (briefly) until they are closed."""
    for _, writer in streams:
        writer.close()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(10):
            await asyncio.gather(
                *(writer.wait_closed() for _, writer in streams), return_exceptions=True
            )


async def hold_idle(
    port: int,
    read: Callable[[], Reading],
    count: int = 10_000,
    path: str = "/small.txt",
    concurrency: int = 200,
    time_limit: float = 60.0,
    settle: float = 1.0,
) -> IdleResult:
    """Open ``count`` connections (at most ``concurrency`` handshakes at once), each after
    one request; read the server before, and ``settle`` seconds after the last opened."""
    started = time.monotonic()
    rss_before, sockets_before = read()
    gate = asyncio.Semaphore(concurrency)
    tasks = [asyncio.ensure_future(_open_one(port, path, gate)) for _ in range(count)]
    done, pending = await asyncio.wait(tasks, timeout=time_limit)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    streams: list[Stream] = []
    errors: list[BaseException] = []
    for task in done:
        error = task.exception()
        if error is None:
            streams.append(task.result())
        else:
            errors.append(error)
    try:
        await asyncio.sleep(settle)
        held = sum(
            1 for reader, writer in streams if not reader.at_eof() and not writer.is_closing()
        )
        rss_after, sockets_after = read()
    finally:
        await _close_all(streams)
    first_error = repr(errors[0]) if errors else ("timed out" if pending else "")
    return IdleResult(
        wanted=count,
        opened=len(streams),
        held=held,
        failed=len(errors) + len(pending),
        rss_before_kib=rss_before,
        rss_after_kib=rss_after,
        sockets_before=sockets_before,
        sockets_after=sockets_after,
        seconds=time.monotonic() - started,
        first_error=first_error,
    )


def measure_idle(port: int, pid: int, count: int = 10_000, timeout: float = 60.0) -> IdleResult:
    """:func:`hold_idle` on a fresh event loop, reading ``pid`` and its descendants."""

    def read() -> Reading:
        pids = process_tree(pid)
        return rss_kib(pids), socket_count(pids)

    return asyncio.run(hold_idle(port, read, count, time_limit=timeout))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True, help="server port on 127.0.0.1")
    parser.add_argument("--pid", type=int, required=True, help="server process to read RSS of")
    parser.add_argument("--count", type=int, default=10_000, help="idle connections to hold")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to open them")
    args = parser.parse_args()
    raise_open_files(args.count + 4096)
    result = measure_idle(args.port, args.pid, args.count, args.timeout)
    print(
        f"held {result.held} of {result.wanted} (failed {result.failed}): RSS "
        f"{result.rss_before_kib} -> {result.rss_after_kib} KiB, "
        f"{result.kib_per_connection:.2f} KiB per connection; sockets "
        f"{result.sockets_before} -> {result.sockets_after}"
    )


if __name__ == "__main__":
    main()
