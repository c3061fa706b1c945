"""Wait until a new container answers its health check, or say why it never will."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from wunderproxy.errors import ContainerExited, HealthTimeout

FIRST_POLL_INTERVAL = 0.1  # most apps are up within a second: find out quickly
MAX_POLL_INTERVAL = 1.0  # slow starters are not hammered
PROBE_TIMEOUT = 5.0  # one health request may take this long


async def probe(host: str, port: int, path: str) -> int:
    """``GET path`` once; return the status code. Raises OSError when nothing answers."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        # X-Forwarded-Proto: https, as the original did, so apps that force TLS answer 200.
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: wunderproxy-health\r\n"
            "X-Forwarded-Proto: https\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        status_line = await reader.readline()
    finally:
        writer.close()
    parts = status_line.split()
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise OSError(f"no HTTP answer (got {status_line[:40]!r})")
    return int(parts[1])


async def wait_healthy(
    host: str,
    port: int,
    path: str,
    within: float,
    container_exited: Callable[[], Awaitable[str | None]],
) -> None:
    """Poll ``GET path`` until it answers 200 while the container runs, fast at first,
    backing off to 1 s.

    ``container_exited`` is asked after every probe and returns a description of why the
    container stopped (or None while it runs): a container that dies while starting fails
    the wait at once instead of at the deadline, and one that stopped is never healthy,
    whatever answered its port.
    """
    deadline = time.monotonic() + within
    interval = FIRST_POLL_INTERVAL
    last = "no answer yet"
    while True:
        healthy = False
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                status = await probe(host, port, path)
            healthy = status == 200
            last = f"GET {path} answered {status}"
        except (OSError, TimeoutError) as exc:
            last = f"GET {path} failed: {exc or type(exc).__name__}"
        # Asked after a 200 too: a 200 proves only that something answers on the port. On the
        # host's network that may be another process, while this container's app never bound.
        exited = await container_exited()
        if exited is not None:
            raise ContainerExited(exited)
        if healthy:
            return
        if time.monotonic() + interval > deadline:
            raise HealthTimeout(
                f"not healthy after {within:g} s ({last}); the container was removed. "
                "Check the app's logs and HealthCheckPath, or raise --health-timeout"
            )
        await asyncio.sleep(interval)
        interval = min(interval * 2, MAX_POLL_INTERVAL)
