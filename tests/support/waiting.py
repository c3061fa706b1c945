"""Polling for a condition, bounded in time: in async tests, and in plain ones."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def eventually(condition: Callable[[], bool], within: float = 5.0) -> bool:
    """Wait until ``condition()`` holds; TimeoutError after ``within`` seconds."""
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110 - the condition is a plain counter
            await asyncio.sleep(0.01)
    return True


def wait_until(condition: Callable[[], bool], what: str, within: float = 30.0) -> None:
    """Poll ``condition()`` every 0.1 s; AssertionError naming ``what`` after ``within`` s."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still not so after {within:g} s")
        time.sleep(0.1)
