"""An HTTP/1.1 client for tests on a raw asyncio connection, with h11 checking every byte."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import h11


@dataclass(frozen=True)
class Answer:
    """One HTTP answer as a client read it (header names in lower case)."""

    status: int
    headers: dict[str, str]
    body: bytes


def send_request(
    conn: h11.Connection,
    writer: asyncio.StreamWriter,
    method: str,
    target: str,
    body: bytes = b"",
    headers: list[tuple[str, str]] | None = None,
) -> None:
    """Write one request on a client connection."""
    sent = [("Host", "test"), *(headers or [])]
    if body or method == "POST":
        sent.append(("Content-Length", str(len(body))))
    data = conn.send(h11.Request(method=method, target=target, headers=sent))
    if body:
        data += conn.send(h11.Data(data=body))
    data += conn.send(h11.EndOfMessage())
    writer.write(data)


async def read_answer(conn: h11.Connection, reader: asyncio.StreamReader) -> Answer:
    """Read one whole answer; ready for the next request afterwards."""
    status, headers, body = 0, {}, bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await asyncio.wait_for(reader.read(65536), 10))
        elif isinstance(event, h11.Response):
            status = event.status_code
            headers = {k.decode(): v.decode() for k, v in event.headers}
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                conn.start_next_cycle()
            return Answer(status, headers, bytes(body))
        else:
            raise AssertionError(f"unexpected {event!r}")
