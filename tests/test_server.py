"""The server's timeout sweep, in process with a fake store and engine."""

from __future__ import annotations

import asyncio

import pytest

from tests.support.fakes import FakeEngine, MemoryStore
from wunderproxy.config import Address, Config, Edge
from wunderproxy.server import Server


class Checked:
    """Stands in for a client connection: counts the sweep's looks, or fails them."""

    def __init__(self, fails: bool) -> None:
        self.fails = fails
        self.looks = 0

    def check_timeouts(self, now: float) -> None:
        self.looks += 1
        if self.fails:
            raise RuntimeError("a bug in one connection")


async def test_one_connections_error_neither_stops_the_sweep_nor_the_others_timeouts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = Config(
        bucket="memory",
        prefix="apps",
        app="myapp",
        proxy=Address.parse("127.0.0.1:0", "--proxy"),
        api=Address.parse("127.0.0.1:0", "--api"),
        edge=Edge(keepalive_timeout=0.5),  # a sweep every 0.05 s
    )
    server = Server(config, MemoryStore(), FakeEngine("127.0.0.1", 1))
    broken, healthy = Checked(fails=True), Checked(fails=False)
    server._connections.update([broken, healthy])  # type: ignore[list-item]
    sweeper = asyncio.create_task(server._enforce_timeouts())
    try:
        await asyncio.sleep(0.5)
    finally:
        sweeper.cancel()
    # A sweep every 0.05 s for 0.5 s: both were looked at again and again.
    assert healthy.looks >= 5 and broken.looks >= 5, (healthy.looks, broken.looks)
    assert "enforcing the timeouts of a connection failed" in caplog.text
