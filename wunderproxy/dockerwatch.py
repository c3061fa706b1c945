"""Whether the Docker engine answers, as ``/status`` and ``/metrics`` tell it.

Every engine call of the controller reports here: one that fails because the engine cannot
be reached (:class:`~wunderproxy.errors.DockerUnreachable`) sets ``ProxyState.docker_error``,
any call the engine answers clears it. Between calls a probe pings the engine, every few
seconds while it is in error and rarely otherwise, so that ``/status`` and ``/metrics``
follow the engine by themselves: an operator who restarts dockerd sees ``ok`` again without
deploying anything, and a monitor learns that the engine went away even when nobody deploys.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from wunderproxy.errors import DockerUnreachable, WunderproxyError
from wunderproxy.state import ProxyState

log = logging.getLogger("wunderproxy.manager")

T = TypeVar("T")

# Seconds between pings while the engine does not answer: /status shows its return within
# this. A ping is one small request on the engine's socket, run in the thread pool.
PROBE_INTERVAL_ERROR = 2.0
# Seconds between pings while the engine answers: /status shows an engine that went away
# within this even when no deploy asks anything of it.
PROBE_INTERVAL_OK = 10.0


class Blocking(Protocol):
    """Runs a blocking call off the event loop (the controller's thread pool)."""

    def __call__(self, function: Callable[..., T], /, *args: object) -> Awaitable[T]: ...


class DockerWatch:
    """Makes every engine call, and keeps ``state.docker_error`` in step with them.

    ``ping`` is the engine's cheapest call; ``blocking`` runs a call in the thread pool.
    """

    def __init__(self, state: ProxyState, ping: Callable[[], None], blocking: Blocking) -> None:
        self._state = state
        self._ping = ping
        self._blocking = blocking

    async def call(self, function: Callable[..., T], *args: object) -> T:
        """``function(*args)`` in the thread pool; what it says of the engine is kept."""
        try:
            result = await self._blocking(function, *args)
        except DockerUnreachable as exc:
            self._unreachable(exc)
            raise
        except WunderproxyError:
            self._answered()  # a refusal is an answer: the engine is there
            raise
        self._answered()
        return result

    async def run(self) -> None:
        """Ping the engine until cancelled."""
        while True:
            error = self._state.docker_error is not None
            await asyncio.sleep(PROBE_INTERVAL_ERROR if error else PROBE_INTERVAL_OK)
            with contextlib.suppress(WunderproxyError):  # call() keeps it in the state
                await self.call(self._ping)

    def _answered(self) -> None:
        if self._state.docker_error is not None:
            log.info("the Docker engine answers again")
            self._state.docker_error = None

    def _unreachable(self, error: DockerUnreachable) -> None:
        if self._state.docker_error is None:
            log.error(
                "%s. Until it answers, /launch answers 502 and /status says docker error; "
                "the proxy keeps serving the running container",
                error,
            )
        self._state.docker_error = str(error)
