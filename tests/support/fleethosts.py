"""Fake hosts for the fleet commands' unit tests: managers that keep what they run in memory,
answer as the real one does (404, 409, the JSON facts), and fail or block where told.

The fleet commands reach them through the :class:`~wunderproxy.hosts.HostClient` seam; the
same commands are run against real wunderproxy processes in ``test_fleetdeploy_e2e.py``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from wunderproxy.client import ClientError

REVISIONS = {"a" * 32: "rev-a", "b" * 32: "rev-b", "c" * 32: "rev-c"}
OLD, NEW, OLDER = "a" * 32, "b" * 32, "c" * 32


class CallLog:
    """Every call to every fake host, in the order they were made."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()

    def add(self, host: str, method: str, config_hash: str) -> None:
        with self._lock:
            self.calls.append((host, method, config_hash))

    def of(self, method: str) -> list[tuple[str, str]]:
        """``(host, hash)`` of every call of ``method``."""
        with self._lock:
            return [(host, h) for host, m, h in self.calls if m == method]


class FakeHost:
    """One host's manager. ``fail[(method, hash)]`` makes that call raise the error given
    (after switching, with ``switched_despite_error``); ``hold_launch`` makes launches wait
    until ``release`` or an abort, which cancels them as the real manager does (the launch
    answers 409); ``on_switch`` runs inside every switch (to press Ctrl-C then)."""

    def __init__(self, log: CallLog, instance: str, serving: str | None = OLD) -> None:
        self.url = f"http://{instance}.test:8001"
        self.instance = instance
        self.serving = serving
        self.launched: set[str] = set()
        self.draining: set[str] = set()  # still revivable by a switch
        # (method, hash) -> the error it raises; a hash of None: for any hash.
        self.fail: dict[tuple[str, str | None], ClientError] = {}
        self.switched_despite_error = False
        self.on_switch: Callable[[], None] | None = None
        self.launch_started = threading.Event()
        self._gate: threading.Event | None = None
        self._waiting: set[str] = set()  # launches held at the gate
        self._cancelled: set[str] = set()  # ... that an abort cancelled
        self._log = log
        self._lock = threading.Lock()

    @property
    def container_id(self) -> str:
        return f"{self.instance}-container"

    def hold_launch(self) -> None:
        self._gate = threading.Event()

    def release(self) -> None:
        if self._gate is not None:
            self._gate.set()

    # -- the HostClient protocol ------------------------------------------------------

    def status(self) -> dict[str, Any]:
        self._call("status", "")
        current = None
        if self.serving is not None:
            current = {"hash": self.serving, "revision": REVISIONS[self.serving]}
        return {
            "instance": self.instance,
            "current": current,
            "store": {"bucket": "file:///srv/store", "prefix": "apps/myapp"},
        }

    def launch(self, config_hash: str) -> dict[str, Any]:
        self._call("launch", config_hash)
        self.launch_started.set()
        if self._gate is not None:
            with self._lock:
                self._waiting.add(config_hash)
            released = self._gate.wait(10)
            with self._lock:
                self._waiting.discard(config_hash)
                if config_hash in self._cancelled:
                    self._cancelled.discard(config_hash)
                    raise ClientError(f"409: the launch of {config_hash} was aborted", 409)
            assert released, "test never released the launch"
        with self._lock:
            if config_hash != self.serving:
                self.launched.add(config_hash)
                self.draining.discard(config_hash)
        return {
            "message": f"started container {self.container_id[:8]} with revision "
            f"{REVISIONS[config_hash]} listening on port 32768",
            "container_id": self.container_id,
            "revision": REVISIONS[config_hash],
            "port": 32768,
        }

    def switch(self, config_hash: str) -> dict[str, Any]:
        self._log.add(self.instance, "switch", config_hash)
        if self.on_switch is not None:
            self.on_switch()
        error = self.failure("switch", config_hash)
        if error is not None and not self.switched_despite_error:
            raise error
        with self._lock:
            if config_hash != self.serving:
                if config_hash not in self.launched | self.draining:
                    raise ClientError(f"404: {config_hash} is not launched here", 404)
                self.launched.discard(config_hash)
                self.draining.discard(config_hash)
                if self.serving is not None:
                    self.draining.add(self.serving)
                self.serving = config_hash
        if error is not None:
            raise error  # it switched, but the answer never came back
        return {"message": f"switched proxy to port 32768 of container {self.container_id[:8]}"}

    def abort(self, config_hash: str) -> dict[str, Any]:
        self._call("abort", config_hash)
        with self._lock:
            if config_hash in self._waiting:  # a launch under way: cancel it
                self._cancelled.add(config_hash)
                assert self._gate is not None
                self._gate.set()
                return {"message": f"aborted {config_hash}: cancelled its launch under way"}
            if config_hash == self.serving:
                raise ClientError(f"409: {config_hash} serves now", 409)
            if config_hash not in self.launched:
                raise ClientError(f"404: nothing of {config_hash} is launched here", 404)
            self.launched.discard(config_hash)
        return {"message": f"aborted {config_hash}: stopped and removed container"}

    def failure(self, method: str, config_hash: str) -> ClientError | None:
        return self.fail.get((method, config_hash)) or self.fail.get((method, None))

    def _call(self, method: str, config_hash: str) -> None:
        self._log.add(self.instance, method, config_hash)
        error = self.failure(method, config_hash)
        if error is not None:
            raise error
