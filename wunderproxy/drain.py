"""Draining a replaced container: what one process does with its own connections to it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from wunderproxy.state import Container

log = logging.getLogger("wunderproxy.manager")


async def drain_links(
    container: Container,
    seconds: float,
    elsewhere: Callable[[Container], Awaitable[None]] | None = None,
) -> None:
    """Let ``container``'s requests finish, then cut what is left.

    It gets no new request (it is no longer current). Its keep-alive connections are closed
    now if idle, else after their answer; requests in flight finish; upgraded connections run
    on until ``seconds`` have passed, then are cut. ``elsewhere`` waits, within the same time, for
    the other processes that proxy to it (a supervisor's workers) to be done with it too.
    """
    closed = container.close_links(idle_only=True)
    if elsewhere is not None:
        # Its requests are the workers' (this process's figures of them are as old as the
        # last /status): each drains its own, and says when it is done.
        log.info("draining container %s in every worker", container.container_id[:12])
    else:
        log.info(
            "draining container %s: %d requests in flight, %d upgraded, %d idle connections closed",
            container.container_id[:12],
            container.in_flight,
            container.upgraded,
            closed,
        )
    try:
        async with asyncio.timeout(seconds):
            if elsewhere is None:
                await container.wait_idle()
            else:
                # A supervisor proxies nothing: its figures of the container are only what
                # /status last copied in, which no request's end updates.
                await elsewhere(container)
    except TimeoutError:
        if elsewhere is not None:
            log.warning(
                "container %s still had requests or upgraded connections in a worker after "
                "%g s; cutting them (each worker logs how many)",
                container.container_id[:12],
                seconds,
            )
        else:
            log.warning(
                "container %s still had %d requests and %d upgraded connections after %g s; "
                "cutting them",
                container.container_id[:12],
                container.in_flight,
                container.upgraded,
                seconds,
            )
    container.stopping = True
    container.close_links(idle_only=False)
