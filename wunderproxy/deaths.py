"""Containers that die under the proxy, as Docker says it: its ``die`` events.

A container that is killed, or whose app crashes, may go on accepting connections for a
while: Docker's userland proxy holds its published port until the engine has cleaned up,
and a request sent there waits for an answer that never comes. Docker's event stream says
at once that the container died, so the proxy need not wait: the requests in flight there
are failed at once (those that may be sent twice go to a peer) and new ones go to peers.

The stream blocks, so it is read by a thread of its own (not the controller's small pool,
which it would hold for good) that hands each death to the event loop. If the engine goes
away the thread reconnects every few seconds, asking for the events it missed meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Protocol

log = logging.getLogger("wunderproxy.manager")

# Seconds between two attempts to follow the engine's events while it does not answer.
RECONNECT_INTERVAL = 2.0
# Seconds before a lost stream's end from which events are asked again: an event in flight
# as the stream broke is not missed (one seen twice changes nothing).
LOST_EVENTS_MARGIN = 2


class Deaths(Protocol):
    """A stream of ``(container id, exit code)`` for each container that dies."""

    def __iter__(self) -> Iterator[tuple[str, int | None]]: ...

    def close(self) -> None:
        """End the stream (from another thread): the iteration stops."""


class DeathWatch:
    """Follows the deaths of containers labelled ``labels`` and reports each, on the event
    loop, to ``on_death(container_id, exit_code)``."""

    def __init__(
        self,
        follow: Callable[[dict[str, str], int | None], Deaths],
        labels: dict[str, str],
        on_death: Callable[[str, int | None], None],
    ) -> None:
        self._follow = follow
        self._labels = labels
        self._on_death = on_death
        self._stopping = threading.Event()
        self._stream: Deaths | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="docker-events", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Start following (call on the event loop that is to hear of deaths)."""
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    def stop(self) -> None:
        """Stop following; returns at once."""
        self._stopping.set()
        with self._lock:
            stream = self._stream
        if stream is not None:
            with contextlib.suppress(Exception):  # closing a broken stream may raise anything
                stream.close()

    def _run(self) -> None:
        since: int | None = None  # after a lost stream: the events from then on
        lost = False  # the stream was lost and not yet followed again
        while not self._stopping.is_set():
            try:
                stream = self._follow(self._labels, since)
                with self._lock:
                    self._stream = stream
                if self._stopping.is_set():  # stop() came before the stream was kept
                    stream.close()
                    return
                if lost:
                    log.info("following the Docker engine's container events again")
                    lost = False
                for container_id, exit_code in stream:
                    assert self._loop is not None
                    if self._loop.is_closed():  # the process is exiting
                        return
                    self._loop.call_soon_threadsafe(self._on_death, container_id, exit_code)
            except Exception as exc:  # a stream cut off may raise anything
                if self._stopping.is_set():
                    return
                if not lost:
                    # Asked again, once followed again, from a little before it was lost.
                    since = int(time.time()) - LOST_EVENTS_MARGIN
                    log.warning(
                        "cannot follow the Docker engine's container events (%s): a container "
                        "that dies is noticed only when a request finds it gone; retrying "
                        "every %g s",
                        exc,
                        RECONNECT_INTERVAL,
                    )
                    lost = True
            else:  # the engine ended the stream: ask again from a little before
                since = int(time.time()) - LOST_EVENTS_MARGIN
            self._stopping.wait(RECONNECT_INTERVAL)
