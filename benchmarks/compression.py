"""What --compress costs: levels, CPU per answer, memory per answer, and the off-loop line.

    python3 benchmarks/compression.py [--rounds 15]

Three samples of 100 KiB: API-like JSON (seeded random records), source code (the standard
library's asyncio package, standing in for JavaScript) and HTML. Everything is compressed
the way the proxy does it: read 64 KiB at a time, flushed after each read, then finished.
Times are the best of ``--rounds`` (the machine is shared: the best is the one least
disturbed); memory is the growth of resident memory over 100 encoders alive at once, each
fed one read, in a fresh process per setting.

- levels: ratio and microseconds per KiB of each encoding at the levels around ours;
- answer: CPU per answer of 100 KiB JSON through wunderproxy's own encoders;
- off-loop: how long one read of each size takes to compress at our levels, against a
  round trip through the default executor (what compressing off the loop costs).
"""

from __future__ import annotations

import argparse
import asyncio
import html
import json
import random
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import brotli
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wunderproxy import encoders
from wunderproxy.encoders import AnswerEncoder
from wunderproxy.runtime import tune_malloc

SIZE = 100 * 1024
READ = 64 * 1024
WORDS = ["order", "customer", "shipped", "pending", "invoice", "total", "price", "status"]


def json_sample() -> bytes:
    rng = random.Random(1)

    def record(number: int) -> dict[str, object]:
        return {
            "id": number,
            "uuid": f"{rng.getrandbits(128):032x}",
            "name": " ".join(rng.choice(WORDS) for _ in range(3)).title(),
            "email": f"user{rng.randrange(10**6)}@example.com",
            "status": rng.choice(["active", "pending", "shipped"]),
            "total": round(rng.uniform(1, 1000), 2),
            "tags": rng.sample(WORDS, 3),
            "created_at": f"2026-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}T12:00:00Z",
            "address": {"city": rng.choice(["Berlin", "Paris", "Lyon", "Oslo"])},
        }

    return json.dumps([record(number) for number in range(500)]).encode()[:SIZE]


def code_sample() -> bytes:
    files = sorted(Path(asyncio.__file__).parent.glob("*.py"))
    return b"".join(path.read_bytes() for path in files)[:SIZE]


def html_sample() -> bytes:
    rng = random.Random(2)
    rows = "".join(
        f'<tr class="row"><td><a href="/orders/{number}">{html.escape(rng.choice(WORDS))}</a>'
        f"</td><td>{rng.uniform(1, 1000):.2f}</td><td>{rng.choice(WORDS)}</td></tr>\n"
        for number in range(2000)
    )
    return f"<html><body><table>{rows}</table></body></html>".encode()[:SIZE]


SAMPLES = {"json": json_sample, "code": code_sample, "html": html_sample}

# (encoding, label, new stream: (compress, flush, finish)).
Stream = tuple[Callable[[bytes], bytes], Callable[[], bytes], Callable[[], bytes]]


def gzip_stream(level: int) -> Callable[[], Stream]:
    def new() -> Stream:
        stream = zlib.compressobj(level, zlib.DEFLATED, 31)
        return (
            stream.compress,
            lambda: stream.flush(zlib.Z_SYNC_FLUSH),
            lambda: stream.flush(zlib.Z_FINISH),
        )

    return new


def brotli_stream(quality: int, lgwin: int) -> Callable[[], Stream]:
    def new() -> Stream:
        stream = brotli.Compressor(quality=quality, lgwin=lgwin)
        return stream.process, stream.flush, stream.finish

    return new


def zstd_stream(level: int, **parameters: int) -> Callable[[], Stream]:
    params = zstandard.ZstdCompressionParameters.from_level(level, **parameters)

    def new() -> Stream:
        stream = zstandard.ZstdCompressor(compression_params=params).compressobj()
        return (
            stream.compress,
            lambda: stream.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK),
            lambda: stream.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH),
        )

    return new


OURS = {
    "window_log": encoders.ZSTD_WINDOW_LOG,
    "hash_log": encoders.ZSTD_HASH_LOG,
    "chain_log": encoders.ZSTD_CHAIN_LOG,
}
SETTINGS: dict[str, Callable[[], Stream]] = {
    "gzip 1": gzip_stream(1),
    "gzip 4": gzip_stream(4),
    "gzip 5 *": gzip_stream(5),
    "gzip 6": gzip_stream(6),
    "br 3, lgwin 18": brotli_stream(3, 18),
    "br 4, lgwin 16": brotli_stream(4, 16),
    "br 4, lgwin 18 *": brotli_stream(4, 18),
    "br 4, lgwin 22": brotli_stream(4, 22),
    "br 5, lgwin 18": brotli_stream(5, 18),
    "br 5, lgwin 22": brotli_stream(5, 22),
    "zstd 1": zstd_stream(1),
    "zstd 3, defaults": zstd_stream(3),
    "zstd 3, ours *": zstd_stream(3, **OURS),
    "zstd 6, ours": zstd_stream(6, **OURS),
}


def through(new: Callable[[], Stream], data: bytes) -> bytes:
    compress, flush, finish = new()
    out = []
    for at in range(0, len(data), READ):
        out.append(compress(data[at : at + READ]))
        out.append(flush())
    out.append(finish())
    return b"".join(out)


def best_of(rounds: int, work: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - started)
    return best


def memory_per_answer(setting: str) -> float:
    """KiB of resident memory per encoder alive, each fed one 64 KiB read (this process)."""
    data = json_sample()[:READ]

    def resident() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * 4096

    before = resident()
    alive = []
    for _ in range(100):
        compress, flush, finish = SETTINGS[setting]()
        compress(data)
        flush()
        alive.append((compress, flush, finish))
    return (resident() - before) / 100 / 1024


def levels(rounds: int) -> None:
    samples = {name: make() for name, make in SAMPLES.items()}
    columns = "".join(f"  {name:>5} ratio  us/KiB" for name in samples)
    print(f"== levels: {SIZE // 1024} KiB, {READ // 1024} KiB reads, each flushed (* ours)")
    print(f"{'setting':18}{columns}  memory KiB/answer")
    for setting, new in SETTINGS.items():
        cells = []
        for data in samples.values():
            seconds = best_of(rounds, lambda new=new, data=data: through(new, data))
            ratio = len(data) / len(through(new, data))
            cells.append(f"  {ratio:11.2f}  {seconds * 1e6 / (len(data) / 1024):6.2f}")
        memory = subprocess.run(
            [sys.executable, __file__, "--memory-of", setting],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        print(f"{setting:18}{''.join(cells)}  {float(memory):17.0f}")


def answers(rounds: int) -> None:
    data = json_sample()
    print(f"\n== answer: CPU per answer of {len(data) // 1024} KiB JSON through AnswerEncoder")
    for encoding in ("zstd", "br", "gzip"):

        def one(encoding: str = encoding) -> bytes:
            encoder = AnswerEncoder(encoding, b"", chunked=False)
            out = []
            for at in range(0, len(data), READ):
                encoder.take(data[at : at + READ])
                if at + READ >= len(data):
                    encoder.end()
                out.append(encoder.encode())
            return b"".join(out)

        cpu = float("inf")
        for _ in range(rounds):
            started = time.process_time()
            for _ in range(10):
                one()
            cpu = min(cpu, (time.process_time() - started) / 10)
        print(f"{encoding:5} {cpu * 1e6:8.0f} us CPU per answer, {len(one()):6} bytes sent")


def off_loop(rounds: int) -> None:
    data = (json_sample() + code_sample() + html_sample()) * 2
    sizes = [4, 8, 16, 32, 64, 128, 256]
    print("\n== off-loop: microseconds to compress one read at our levels (json+code+html)")
    print("encoding " + "".join(f"{size:>8} KiB" for size in sizes) + "   line")
    for encoding in ("zstd", "br", "gzip"):
        cells = []
        for size in sizes:
            piece = data[: size * 1024]

            def one(piece: bytes = piece, encoding: str = encoding) -> bytes:
                encoder = AnswerEncoder(encoding, b"", chunked=False)
                encoder.take(piece)
                return encoder.encode()

            cells.append(best_of(rounds, one) * 1e6)
        line = encoders.OFF_LOOP_BYTES[encoding] // 1024
        print(f"{encoding:8} " + "".join(f"{cell:12.0f}" for cell in cells) + f"   {line} KiB")

    async def round_trips(count: int) -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, bytes, 0)  # the worker thread is started
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(count):
            await loop.run_in_executor(None, bytes, 0)
        return (
            (time.perf_counter() - wall) / count * 1e6,
            (time.process_time() - cpu) / count * 1e6,
        )

    wall, cpu = min(asyncio.run(round_trips(2000)) for _ in range(3))
    print(f"a round trip through the default executor: {wall:.0f} us, {cpu:.0f} us of CPU")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    args = parser.parse_args()
    tune_malloc()  # as the proxy runs: compressors' buffers come from the heap, not mmap
    if args.memory_of:
        print(memory_per_answer(args.memory_of))
        return
    levels(args.rounds)
    answers(args.rounds)
    off_loop(args.rounds)


if __name__ == "__main__":
    main()
