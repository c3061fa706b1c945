"""Hostile bytes for a server's ports: seeded, bounded, and only ever sent to 127.0.0.1.

A *case* is what one client connection does: send a few byte strings (random bytes, or a
well-formed request mutated), then end in one of four ways (close at once, reset with RST,
half-close and read the answer, or read the answer while still sending). The same seed
always gives the same cases, so a failure can be replayed. Tests run a few thousand cases;
a benchmark-style script can run many more with :func:`run_cases`.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

Ending = Literal["close", "reset", "half-close", "read"]
ENDINGS: tuple[Ending, ...] = ("close", "reset", "half-close", "read")

# Requests of the kinds the proxy port sees; mutated, they reach every branch of a parser.
PROXY_SEEDS: tuple[bytes, ...] = (
    b"GET / HTTP/1.1\r\nHost: fuzz\r\n\r\n",
    b"GET /cgi-bin/revision?x=1 HTTP/1.1\r\nHost: fuzz\r\nConnection: close\r\n\r\n",
    b"POST /cgi-bin/echo HTTP/1.1\r\nHost: fuzz\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /cgi-bin/echo HTTP/1.1\r\nHost: fuzz\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n0\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: fuzz\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"HEAD / HTTP/1.0\r\n\r\n",
)
# Requests of the kinds the manager API sees.
API_SEEDS: tuple[bytes, ...] = (
    b"GET /status HTTP/1.1\r\nHost: fuzz\r\nAccept: application/json\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nHost: fuzz\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: fuzz\r\nAccept: text/html\r\n\r\n",
    b"POST /launch HTTP/1.1\r\nHost: fuzz\r\nContent-Length: 32\r\n\r\n" + b"0" * 32,
    b"POST /switch HTTP/1.1\r\nHost: fuzz\r\nContent-Length: 9\r\n\r\nnot-a-has",
)
# Bytes that parsers treat specially, spliced in by mutations.
_SPECIAL = (b"\r", b"\n", b"\r\n", b"\x00", b" ", b"\t", b":", b"\r\n\r\n", b"\xff", b"0x")
# Prefixes of other protocols that reach HTTP ports by mistake.
_FOREIGN = (
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",  # HTTP/2's preface
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",  # a TLS ClientHello
    b"GET /\r\n",  # HTTP/0.9
    b"SSH-2.0-OpenSSH_9.2\r\n",
)
MAX_CHUNK = 4096  # bytes one send of a case may have; heads past every limit come in pieces


@dataclass(frozen=True)
class Case:
    """What one connection sends and how it ends."""

    chunks: tuple[bytes, ...]
    ending: Ending


def mutate(rng: random.Random, data: bytes) -> bytes:
    """``data`` with one to four edits: flipped bytes, special bytes spliced in, a piece
    cut, repeated or made huge, or the whole cut short."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(out) + 1)
        edit = rng.randrange(6)
        if edit == 0 and out:
            out[min(at, len(out) - 1)] ^= 1 << rng.randrange(8)
        elif edit == 1:
            out[at:at] = rng.choice(_SPECIAL)
        elif edit == 2:
            del out[at : at + rng.randint(1, 8)]
        elif edit == 3:
            piece = bytes(out[at : at + rng.randint(1, 40)])
            out[at:at] = piece * rng.randint(2, 50)
        elif edit == 4:
            out[at:at] = b"X-Pad: " + b"a" * rng.randint(100, 20_000) + b"\r\n"
        else:
            del out[at:]
    return bytes(out)


def random_payload(rng: random.Random, seeds: Sequence[bytes]) -> bytes:
    """One byte string: random, foreign, a mutated seed, or mutated seeds pipelined."""
    kind = rng.randrange(10)
    if kind < 2:
        return rng.randbytes(rng.randint(1, 2048))
    if kind == 2:
        return rng.choice(_FOREIGN) + rng.randbytes(rng.randint(0, 64))
    if kind == 3:
        return b"".join(mutate(rng, rng.choice(seeds)) for _ in range(rng.randint(2, 4)))
    if kind == 4:  # a valid request, then garbage on the same connection
        return rng.choice(seeds) + mutate(rng, rng.choice(seeds))
    return mutate(rng, rng.choice(seeds))


def cases(seed: int, count: int, seeds: Sequence[bytes]) -> Iterator[Case]:
    """``count`` cases from ``seed``, each one to three sends and a random ending."""
    rng = random.Random(seed)
    for _ in range(count):
        payload = b"".join(random_payload(rng, seeds) for _ in range(rng.randint(1, 3)))
        chunks = tuple(_split(rng, payload))
        yield Case(chunks, rng.choice(ENDINGS))


def _split(rng: random.Random, payload: bytes) -> Iterator[bytes]:
    while payload:
        size = rng.randint(1, MAX_CHUNK)
        yield payload[:size]
        payload = payload[size:]


def play(port: int, case: Case, timeout: float = 1.0) -> bytes:
    """Run ``case`` against 127.0.0.1:``port``; return what the server answered, if read.

    Every socket error is the server's right (it may close on the first bad byte); the
    test judges the server by its log and its other clients, not by this answer.
    """
    answer = bytearray()
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        with contextlib.suppress(OSError):
            for chunk in case.chunks:
                sock.sendall(chunk)
            if case.ending == "half-close":
                sock.shutdown(socket.SHUT_WR)
            if case.ending in ("half-close", "read"):
                while data := sock.recv(65536):
                    answer += data
                    if len(answer) > 1_000_000:
                        break
        if case.ending == "reset":
            # Linger on, for zero seconds: close() sends RST instead of FIN.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()
    return bytes(answer)


def run_cases(port: int, some: Sequence[Case], workers: int = 16, timeout: float = 1.0) -> int:
    """Play every case against ``port``, ``workers`` at a time; return how many ran."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fuzz") as pool:
        return sum(1 for _ in pool.map(lambda case: play(port, case, timeout), some))
