"""Differential fuzz of the request framing: wunderproxy's Exchange against llhttp.

    python3 benchmarks/fuzz_framing.py --count 1000000 --seconds 900 --seed 1

Generates inputs (valid requests, Upgrade and CONNECT among them, mutated: injected
header lines, Content-Length and Transfer-Encoding variants, chunk framing edge cases,
framing fields in trailers, byte flips, random bytes, pipelined messages), feeds each to
:class:`~wunderproxy.framing.Exchange` (whole, and cut at random positions) and to
httptools' ``HttpRequestParser`` (llhttp), and compares the messages each reads: how
many, and each one's method, target and body.

The rule: wherever the two disagree, wunderproxy must have refused the input
(ClientProtocolError) before completing the first message on which they disagree.
Stopping after a request that closes the connection is not a disagreement: the proxy
forwards nothing after it. Nor is llhttp stopping after an upgrade or CONNECT request
(what follows is the new protocol's, or HTTP again, as the container's answer decides),
once both read that request alike. Nor is a method llhttp does not know: llhttp refuses
methods outside its list, where RFC 9110 section 9.1 allows any token, and a refused
method moves no message boundary.

Prints inputs/s, the total, the disagreements found and those not refused (must be 0);
exits non-zero if any was not refused, after printing up to ten of them.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httptools

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wunderproxy.framing import (
    Body,
    ClientProtocolError,
    Exchange,
    MessageEnded,
    RequestStarted,
)

Message = tuple[bytes, bytes, bytes]  # method, target, body (chunk framing removed)

# -- inputs ----------------------------------------------------------------------------

# Requests that ask to leave HTTP: llhttp stops reading HTTP at the end of their head.
SWITCHING = [
    b"GET /ws HTTP/1.1\r\nHost: app\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: app\r\nConnection: keep-alive, upgrade\r\nUpgrade: h2c\r\n"
    b"Content-Length: 0\r\n\r\n",
    b"CONNECT app:443 HTTP/1.1\r\nHost: app:443\r\n\r\n",
]
VALID = [
    b"GET / HTTP/1.1\r\nHost: app\r\n\r\n",
    b"GET /a?b=c HTTP/1.1\r\nHost: app\r\nAccept: */*\r\nX-Empty:\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /p HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"PUT /c HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3;ext=1\r\nabc\r\nA\r\n0123456789\r\n0\r\nX-Sum: 9\r\n\r\n",
    b"HEAD / HTTP/1.1\r\nHost: app\r\nConnection: keep-alive\r\n\r\n",
    b"GET / HTTP/1.0\r\nUser-Agent: x\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: app\r\n\r\n",
    b"GET http://app/x HTTP/1.1\r\nHost: app\r\n\r\n",
    b"DELETE /x HTTP/1.1\r\nHost: app\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    *SWITCHING,
]
# Heads that a chunked body is put under: plain ones, and ones that ask to switch protocols.
CHUNKED_HEADS = [*VALID[:2], *SWITCHING]
HOSTILE_LINES = [
    b"Content-Length: 5",
    b"Content-Length: 0",
    b"Content-Length: 50",
    b"Content-Length:  5",
    b"Content-Length: 5 ",
    b"Content-Length:\t5",
    b"Content-Length: +5",
    b"Content-Length: -5",
    b"Content-Length: 0x5",
    b"Content-Length: 5, 5",
    b"Content-Length: 05",
    b"Content-Length: 99999999999999999999",
    b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: Chunked",
    b"Transfer-Encoding: xchunked",
    b"Transfer-Encoding:  chunked",
    b"Transfer-Encoding:\tchunked",
    b"Transfer-Encoding:\x0bchunked",
    b"Transfer-Encoding: chunked, identity",
    b"Transfer-Encoding: identity",
    b"Transfer-Encoding: gzip, chunked",
    b"Transfer-Encoding : chunked",
    b" Transfer-Encoding: chunked",
    b"\tContent-Length: 0",
    b"Host: other",
    b"Host:",
    b"Connection: close",
    b"Connection: keep-alive",
    b"Expect: 100-continue",
    b"Connection: Upgrade",
    b"Connection: close, upgrade",
    b"Upgrade: websocket",
    b"Upgrade:",
    b"Upgrade: ",
    b"X: a\rb",
    b"X: a\x00b",
    b"X: a\x01b",
    b"X: \xe9t\xe9",
    b"X:",
    b"X",
    b": x",
    b"X Y: z",
]
CHUNK_SIZES = [
    b"5",
    b"05",
    b"0005",
    b"0x5",
    b"+5",
    b"-5",
    b" 5",
    b"5 ",
    b"5\t",
    b"5;",
    b"5;a",
    b"5;a=b",
    b'5;a="b"',
    b"5;a=b\rc",
    b"5 ;a=b",
    b"5;a = b",
    b"0000000000000005",
    b"00000000000000005",
    b"1" + b"0" * 15 + b"5",
    b"1" + b"0" * 16 + b"5",
    b"ffffffffffffffff",
    b"F",
    b"g",
    b"",
]
TRAILERS = [
    b"",
    b"",
    b"T: 1\r\n",
    b"T: 1\n",
    b" T: 1\r\n",
    b"T : 1\r\n",
    b"Content-Length: 5\r\n",
    b"content-length: 0\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: identity\r\n",
]
INTERESTING_BYTES = b'\r\n\t\x0b\x00 :;"0af-/\x7f\x80\xff'


def chunked_body(rng: random.Random) -> bytes:
    """A chunked body with edge cases in its size lines, data ends and trailers."""
    out = b""
    for _ in range(rng.randint(0, 3)):
        size = rng.choice(CHUNK_SIZES)
        try:
            length = int(size.split(b";")[0].strip() or b"0", 16)
        except ValueError:
            length = 5
        data = b"x" * min(length, 20)
        end = rng.choice([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r", b"", b"xx"])
        out += size + rng.choice([b"\r\n", b"\r\n", b"\n"]) + data + end
    out += b"0" + rng.choice([b"\r\n", b"\r\n", b";x\r\n", b"\n"])
    out += rng.choice(TRAILERS)
    return out + rng.choice([b"\r\n", b"\r\n", b"\n", b""])


def inject_line(message: bytes, rng: random.Random) -> bytes:
    lines = message.split(b"\r\n")
    end = lines.index(b"") if b"" in lines else len(lines)
    at = rng.randint(1, max(end, 1))
    lines.insert(at, rng.choice(HOSTILE_LINES))
    return b"\r\n".join(lines)


def flip_bytes(message: bytes, rng: random.Random) -> bytes:
    data = bytearray(message)
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(len(data) + 1)
        op = rng.random()
        byte = rng.choice(INTERESTING_BYTES) if rng.random() < 0.8 else rng.randrange(256)
        if op < 0.4 and at < len(data):
            data[at] = byte
        elif op < 0.7:
            data.insert(at, byte)
        elif at < len(data):
            del data[at]
    return bytes(data)


def with_chunked_body(rng: random.Random) -> bytes:
    head = rng.choice(CHUNKED_HEADS).replace(b"GET", b"POST")
    return (
        inject_line(head, rng)
        if rng.random() < 0.2
        else head[:-2] + (b"Transfer-Encoding: chunked\r\n\r\n") + chunked_body(rng)
    )


def one_message(rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.3:
        return inject_line(rng.choice(VALID), rng)
    if kind < 0.5:
        return with_chunked_body(rng)
    if kind < 0.75:
        return flip_bytes(rng.choice(VALID), rng)
    if kind < 0.8:
        return rng.randbytes(rng.randint(1, 40))
    return rng.choice(VALID)


def generate(rng: random.Random) -> bytes:
    """One input: one to three messages, pipelined."""
    data = b"".join(one_message(rng) for _ in range(rng.choice([1, 1, 2, 3])))
    if rng.random() < 0.1:
        data = flip_bytes(data, rng)
    return data


# -- the two readers -------------------------------------------------------------------


@dataclass
class Reading:
    """The whole messages a parser read, and whether it refused the input."""

    messages: list[Message] = field(default_factory=list)
    refused: bool = False
    closed: bool = False  # stopped after a request that closes the connection
    upgraded: bool = False  # llhttp stopped after an upgrade or CONNECT request
    unknown_method: bool = False


_CHUNKED = re.compile(rb"\r\ntransfer-encoding:", re.IGNORECASE)
_CHUNK_SIZE = re.compile(rb"([0-9a-fA-F]+)[^\r]*\r\n")


def dechunked(body: bytes) -> bytes:
    """The data of a chunked body that Exchange accepted (so its framing is strict)."""
    data, at = b"", 0
    while (size := _CHUNK_SIZE.match(body, at)) is not None and size.group(1).strip(b"0"):
        length = int(size.group(1), 16)
        data += body[size.end() : size.end() + length]
        at = size.end() + length + 2
    return data


def read_with_exchange(chunks: list[bytes]) -> Reading:
    """Feed ``chunks`` then the end of stream, answering each request once it ended."""
    reading = Reading()
    exchange = Exchange()
    head = b""
    raw_body = b""
    started: RequestStarted | None = None
    try:
        for chunk in [*chunks, b""]:
            pieces = exchange.client_data(chunk)
            while pieces:
                ended = False
                for piece in pieces:
                    if isinstance(piece, RequestStarted):
                        started, head, raw_body = piece, piece.data, b""
                    elif isinstance(piece, Body | MessageEnded):
                        raw_body += piece.data
                    if isinstance(piece, MessageEnded):
                        assert started is not None
                        body = dechunked(raw_body) if _CHUNKED.search(head) else raw_body
                        reading.messages.append((started.method, started.target, body))
                        ended = True
                if not ended:
                    break
                exchange.answered_locally(200, close=False)
                pieces = exchange.client_data(None)
    except ClientProtocolError:
        reading.refused = True
    reading.closed = exchange.must_close and not reading.refused
    return reading


class _Collector:
    """httptools callbacks: whole messages as llhttp reads them."""

    def __init__(self, parser_of: list[httptools.HttpRequestParser]) -> None:
        self.parser_of = parser_of
        self.messages: list[Message] = []
        self.url = b""
        self.body = b""
        self.method = b""

    def on_message_begin(self) -> None:
        self.url, self.body = b"", b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_headers_complete(self) -> None:
        self.method = self.parser_of[0].get_method()

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.messages.append((self.method, self.url, self.body))


def read_with_llhttp(data: bytes) -> Reading:
    parser_of: list[httptools.HttpRequestParser] = []
    collector = _Collector(parser_of)
    parser = httptools.HttpRequestParser(collector)
    parser_of.append(parser)
    reading = Reading(messages=collector.messages)
    try:
        parser.feed_data(data)
    except httptools.HttpParserUpgrade:
        reading.upgraded = True  # the bytes after the request are not HTTP's to read
    except httptools.HttpParserInvalidMethodError:
        reading.refused = reading.unknown_method = True
    except httptools.HttpParserError:
        reading.refused = True
    return reading


# -- the rule --------------------------------------------------------------------------


def judge(ours: Reading, theirs: Reading) -> str:
    """'agree', 'refused' (a disagreement wunderproxy refused) or 'NOT REFUSED'."""
    if ours.messages == theirs.messages:
        return "agree"
    agreed = 0
    for mine, other in zip(ours.messages, theirs.messages, strict=False):
        if mine != other:
            break
        agreed += 1
    if theirs.upgraded and agreed == len(theirs.messages):
        return "agree"  # what follows is the new protocol's or HTTP's, as the answer says
    if agreed == len(ours.messages):
        if ours.refused:
            return "refused"
        if ours.closed:
            return "agree"  # nothing after a closing request is forwarded
    if agreed == len(theirs.messages) and theirs.unknown_method:
        return "agree"
    return "NOT REFUSED"


def cuts(data: bytes, rng: random.Random) -> list[bytes]:
    points = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 4))))
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@dataclass
class Totals:
    inputs: int = 0
    disagreements: int = 0
    not_refused: int = 0
    split_differs: int = 0
    examples: list[bytes] = field(default_factory=list)


def run(count: int, seconds: float, seed: int) -> Totals:
    """Fuzz until ``count`` inputs or ``seconds`` have passed, whichever comes first."""
    rng = random.Random(seed)
    totals = Totals()
    deadline = time.monotonic() + seconds
    while totals.inputs < count and (totals.inputs % 1000 or time.monotonic() < deadline):
        data = generate(rng)
        totals.inputs += 1
        ours = read_with_exchange([data])
        if len(data) > 1:
            split = read_with_exchange(cuts(data, rng))
            if (split.messages, split.refused) != (ours.messages, ours.refused):
                totals.split_differs += 1
                totals.examples.append(data)
        verdict = judge(ours, read_with_llhttp(data))
        if verdict != "agree":
            totals.disagreements += 1
        if verdict == "NOT REFUSED":
            totals.not_refused += 1
            totals.examples.append(data)
    return totals


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1_000_000, help="inputs at most")
    parser.add_argument("--seconds", type=float, default=1800.0, help="time at most")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    started = time.monotonic()
    totals = run(args.count, args.seconds, args.seed)
    elapsed = time.monotonic() - started
    print(f"inputs: {totals.inputs} in {elapsed:.1f} s ({totals.inputs / elapsed:.0f} inputs/s)")
    print(f"disagreements with llhttp: {totals.disagreements}")
    print(f"disagreements not refused: {totals.not_refused}")
    print(f"whole and split readings differ: {totals.split_differs}")
    for example in totals.examples[:10]:
        print("  ", example)
    return 1 if totals.not_refused or totals.split_differs else 0


if __name__ == "__main__":
    sys.exit(main())
