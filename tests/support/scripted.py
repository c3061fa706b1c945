"""A container whose answers a test writes byte for byte, on a real 127.0.0.1 socket.

Each path is answered with its :class:`Script`: parts written in order, with a pause
before a part where the test says (an :class:`asyncio.Event` to wait for), then the
connection is kept for the next request or closed. Request heads are read plainly (tests
send no request bodies); ``requests`` keeps each request head received.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field


@dataclass
class Script:
    """An answer: ``parts`` written in order (an Event: wait until it is set), then the
    connection closed if ``close``."""

    parts: Sequence[bytes | asyncio.Event]
    close: bool = False


def answer(status: str, *fields: str, body: bytes = b"", length: bool = True) -> bytes:
    """An answer's bytes: status line (``"200 OK"``), fields, a Content-Length of ``body``
    unless ``length`` is False, then the body."""
    lines = [f"HTTP/1.1 {status}", *fields]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return "\r\n".join([*lines, "", ""]).encode("latin-1") + body


def chunks(*data: bytes) -> bytes:
    """``data`` framed as chunks, one each (a part of a chunked body, not its end)."""
    return b"".join(b"%x\r\n%b\r\n" % (len(one), one) for one in data)


def chunked(*data: bytes, trailer: bytes = b"") -> bytes:
    """A whole chunked body: ``data`` as chunks, then the last chunk with ``trailer``."""
    return chunks(*data) + b"0\r\n" + trailer + b"\r\n"


def json_body(size: int, start: int = 0) -> bytes:
    """About ``size`` bytes of API-like JSON (cut to exactly ``size``): records numbered
    from ``start``, so that every stretch of it is different from every other."""
    records = []
    length = 0
    number = start
    while length < size:
        record = json.dumps(
            {"id": number, "name": f"customer {number * 7919 % 10007}", "status": "active"}
        )
        records.append(record)
        length += len(record) + 1
        number += 1
    return ("[" + ",".join(records) + "]").encode()[:size]


@dataclass
class ScriptedBackend:
    """Answers each request by the script of its path (404 for any other path)."""

    scripts: dict[str, Script] = field(default_factory=dict)
    requests: list[bytes] = field(default_factory=list)
    server: asyncio.Server | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                self.requests.append(head)
                path = head.split(b" ", 2)[1].decode()
                script = self.scripts.get(path, Script([answer("404 Not Found")]))
                for part in script.parts:
                    if isinstance(part, asyncio.Event):
                        await part.wait()
                    else:
                        writer.write(part)
                        await writer.drain()
                if script.close:
                    return
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.tasks.discard(task)
            writer.close()


@contextlib.asynccontextmanager
async def scripted_backend(scripts: dict[str, Script]) -> AsyncIterator[ScriptedBackend]:
    """A started :class:`ScriptedBackend`, stopped on exit."""
    backend = ScriptedBackend(scripts)
    backend.server = await asyncio.start_server(backend._serve, "127.0.0.1", 0)
    try:
        yield backend
    finally:
        backend.server.close()
        for task in list(backend.tasks):
            task.cancel()
        await backend.server.wait_closed()
