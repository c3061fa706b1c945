"""Plays the forwarder's part against a :class:`wunderproxy.framing.Exchange`, bytes only.

A conversation is a list of steps, each one read from the client or from the container.
The driver feeds them in order, routes every request that starts (on a fresh upstream
connection the first time or when the last one is not reusable), re-parses buffered
pipelined requests after each answer, and writes down what it saw: one label a piece, and
the bytes it would have forwarded in each direction.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from wunderproxy.framing import (
    Body,
    ClientPiece,
    Exchange,
    Informational,
    MessageEnded,
    ProtocolSwitched,
    RequestStarted,
    ResponseStarted,
    UpstreamPiece,
)

Side = Literal["client", "upstream"]


@dataclass(frozen=True, slots=True)
class Step:
    """Bytes read from one side; ``b""`` from the upstream means it closed the connection."""

    side: Side
    data: bytes


def client(data: bytes) -> Step:
    return Step("client", data)


def upstream(data: bytes) -> Step:
    return Step("upstream", data)


# -- the bytes of a conversation -------------------------------------------------------


def request(line: str, *headers: str, body: bytes = b"") -> bytes:
    """A request head (``Host`` included) followed by ``body`` as given."""
    return "\r\n".join([line, "Host: app", *headers, "", ""]).encode() + body


def response(line: str, *headers: str, body: bytes = b"") -> bytes:
    return "\r\n".join([line, *headers, "", ""]).encode() + body


def ok(body: bytes = b"") -> bytes:
    return response("HTTP/1.1 200 OK", f"Content-Length: {len(body)}", body=body)


# -- what the pieces look like ---------------------------------------------------------


def label(piece: ClientPiece | UpstreamPiece, side: Side) -> str:
    """A piece as the tables spell it: ``GET /``, ``200``, ``> body`` (``>``: from the
    client, ``<``: from the container), ``< end``, ``info 100``, ``switched 101``."""
    arrow = ">" if side == "client" else "<"
    match piece:
        case RequestStarted(method=method, target=target):
            return f"{method.decode()} {target.decode()}"
        case ResponseStarted(status=status):
            return str(status)
        case Informational(status=status):
            return f"info {status}"
        case ProtocolSwitched(status=status):
            return f"switched {status}"
        case Body():
            return f"{arrow} body"
        case MessageEnded():
            return f"{arrow} end"
    raise AssertionError(f"unknown piece {piece!r}")


def labels_of(pieces: Iterable[ClientPiece | UpstreamPiece], side: Side) -> str:
    return ", ".join(label(piece, side) for piece in pieces)


def squeezed(labels: Iterable[str]) -> list[str]:
    """Labels with runs of body pieces folded into one: how h11 cuts a body is not framing."""
    out: list[str] = []
    for item in labels:
        if not (item in ("> body", "< body") and out and out[-1] == item):
            out.append(item)
    return out


@dataclass
class Forwarder:
    """The forwarder's bookkeeping, minus the sockets."""

    exchange: Exchange = field(default_factory=Exchange)
    labels: list[str] = field(default_factory=list)
    to_upstream: bytearray = field(default_factory=bytearray)
    to_client: bytearray = field(default_factory=bytearray)
    upstream_connections: int = 0

    def play(self, steps: Iterable[Step]) -> Forwarder:
        for step in steps:
            if step.side == "client":
                self.client_sends(step.data)
            else:
                self.upstream_sends(step.data)
        return self

    def client_sends(self, data: bytes) -> None:
        if self.exchange.switched:
            self.to_upstream += data  # spliced: opaque bytes
        else:
            self._forward_client(self.exchange.client_data(data))

    def upstream_sends(self, data: bytes) -> None:
        if self.exchange.switched:
            self.to_client += data
            return
        pieces = self.exchange.upstream_data(data)
        for piece in pieces:
            self.labels.append(label(piece, "upstream"))
            self.to_client += piece.data
            if isinstance(piece, ProtocolSwitched):
                self.to_upstream += self.exchange.take_client_leftover()
        if any(isinstance(piece, MessageEnded) for piece in pieces):
            self._forward_client(self.exchange.client_data(None))

    def _forward_client(self, pieces: list[ClientPiece]) -> None:
        for piece in pieces:
            self.labels.append(label(piece, "client"))
            self.to_upstream += piece.data
            if isinstance(piece, RequestStarted):
                fresh = self.upstream_connections == 0 or not self.exchange.upstream_reusable
                self.upstream_connections += fresh
                self.exchange.request_forwarded(fresh_upstream=fresh)


def byte_by_byte(steps: Sequence[Step]) -> list[Step]:
    """Every step cut into one-byte reads (an end of stream stays as it is)."""
    return [
        Step(step.side, step.data[i : i + 1]) if step.data else step
        for step in steps
        for i in range(max(len(step.data), 1))
    ]


def every_split(steps: Sequence[Step]) -> Iterator[list[Step]]:
    """The conversation read byte by byte, then with each step cut in two at every index."""
    yield byte_by_byte(steps)
    for n, step in enumerate(steps):
        for i in range(1, len(step.data)):
            cut = [Step(step.side, step.data[:i]), Step(step.side, step.data[i:])]
            yield [*steps[:n], *cut, *steps[n + 1 :]]
