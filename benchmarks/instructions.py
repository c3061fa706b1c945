"""Instructions the proxy spends per request, counted by valgrind's callgrind.

    python3 benchmarks/instructions.py [--scenario keepalive|new-connection] \
        [--requests 20000] [--warmup 2000] [--connections 50] [--annotate N] \
        [-- PROXY_ONLY_OPTIONS ...]

Wall-clock time and requests per second move by 10 % and more on a shared machine; the
instructions a process executes for the same work do not (within 2-5 %: how many requests
one pass of the event loop serves depends on timing). This starts the suite's nginx
backend and ``benchmarks/proxy_only.py`` in front of it under callgrind with counting off,
sends ``--warmup`` requests (caches filled, code paths taken once), turns counting on for
``--requests`` requests, off again, stops the proxy and prints the instructions counted
per request. ``--annotate N`` also prints the N functions with the most instructions of
their own (callgrind_annotate), which is where the table of "where each microsecond
goes" comes from.

Scenarios: ``keepalive`` sends each connection's requests one after another on it;
``new-connection`` opens a connection per request and asks ``Connection: close``. The load
comes from this process (asyncio, raw sockets), to 127.0.0.1 only, bounded by count.
Options after ``--`` go to ``proxy_only.py`` (``--keep-upstream``, ``--forwarded append``...).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.peers import (
    HOST,
    ROOT,
    free_port,
    start_backend,
    start_peer,
    wait_until_answers,
)

PATH = "/small.txt"
SERVER_CPU = 0
_LENGTH = re.compile(rb"\r\ncontent-length: *([0-9]+)", re.IGNORECASE)
_TOTALS = re.compile(r"^totals: *([0-9]+)", re.MULTILINE)


def _request(close: bool) -> bytes:
    extra = b"Connection: close\r\n" if close else b""
    return (
        b"GET " + PATH.encode() + b" HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\n" + extra + b"\r\n"
    )


async def _answer(reader: asyncio.StreamReader) -> None:
    """Read one answer framed by Content-Length (the backend's static file has one)."""
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200 "):
        raise RuntimeError(f"unexpected answer: {head[:80]!r}")
    length = _LENGTH.search(head)
    if length is None:
        raise RuntimeError(f"an answer without Content-Length: {head!r}")
    await reader.readexactly(int(length.group(1)))


async def _keepalive(port: int, count: int) -> None:
    reader, writer = await asyncio.open_connection(HOST, port)
    request = _request(close=False)
    for _ in range(count):
        writer.write(request)
        await _answer(reader)
    writer.close()
    await writer.wait_closed()


async def _new_connections(port: int, count: int) -> None:
    request = _request(close=True)
    for _ in range(count):
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(request)
        await _answer(reader)
        if await reader.read(1):
            raise RuntimeError("the proxy kept a Connection: close client's connection open")
        writer.close()
        await writer.wait_closed()


async def load(port: int, scenario: str, requests: int, connections: int) -> None:
    """``requests`` requests over ``connections`` concurrent clients."""
    each, extra = divmod(requests, connections)
    client = _keepalive if scenario == "keepalive" else _new_connections
    await asyncio.gather(*(client(port, each + (i < extra)) for i in range(connections)))


def callgrind_control(pid: int, *arguments: str) -> None:
    subprocess.run(["callgrind_control", *arguments, str(pid)], check=True, capture_output=True)


def counted_instructions(out_files: Sequence[Path]) -> int:
    """The instructions a callgrind run counted, over every file it wrote."""
    total = 0
    for path in out_files:
        found = _TOTALS.search(path.read_text(errors="replace"))
        if found is not None:
            total += int(found.group(1))
    return total


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=["keepalive", "new-connection"], default="keepalive")
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--warmup", type=int, default=2_000)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--annotate", type=int, default=0, help="print the top N functions")
    parser.add_argument("--keep", type=Path, help="copy callgrind's output file here")
    parser.add_argument("proxy_options", nargs="*", help="options for proxy_only.py (after --)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="wunderproxy-instructions-") as work_dir:
        work = Path(work_dir)
        backend = start_backend(work, SERVER_CPU)
        proxy = None
        try:
            wait_until_answers(backend)
            port = free_port()
            out = work / "callgrind.out"
            command = [
                "valgrind",
                "--tool=callgrind",
                "--instr-atstart=no",
                f"--callgrind-out-file={out}",
                sys.executable,
                str(ROOT / "benchmarks" / "proxy_only.py"),
                "--listen",
                f"{HOST}:{port}",
                "--upstream",
                f"{HOST}:{backend.port}",
                *args.proxy_options,
            ]
            proxy = start_peer("wunderproxy", port, command, work / "proxy.log", SERVER_CPU)
            wait_until_answers(proxy, timeout=120)
            asyncio.run(load(port, args.scenario, args.warmup, args.connections))
            callgrind_control(proxy.process.pid, "-i", "on")
            started = time.monotonic()
            asyncio.run(load(port, args.scenario, args.requests, args.connections))
            seconds = time.monotonic() - started
            callgrind_control(proxy.process.pid, "-i", "off")
            proxy.stop(timeout=60)
            files = sorted(work.glob("callgrind.out*"))
            total = counted_instructions(files)
            if args.keep is not None:
                args.keep.write_bytes(b"".join(path.read_bytes() for path in files[:1]))
            print(
                f"{args.scenario} {' '.join(args.proxy_options)}: "
                f"{total / args.requests / 1000:.1f} thousand instructions per request "
                f"({args.requests} requests, {args.connections} connections, {seconds:.1f} s)",
                flush=True,
            )
            if args.annotate:
                annotated = subprocess.run(
                    ["callgrind_annotate", "--threshold=99", *map(str, files)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                lines = annotated.stdout.splitlines()
                start = next(i for i, line in enumerate(lines) if "file:function" in line)
                print("\n".join(lines[start : start + 2 + args.annotate]))
        finally:
            if proxy is not None:
                proxy.stop()
            backend.stop()


if __name__ == "__main__":
    main()
