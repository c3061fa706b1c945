"""Fakes for the controller's seams: an in-memory store and a container engine.

The engine starts no containers: every "container" it starts is the address of a real
in-process :class:`~tests.support.backend.Backend`, so the real health check runs over a
real socket against it. Both fakes record what was asked of them, and both can be told to
fail the way the real ones do (raising :class:`~wunderproxy.errors.UpstreamFailed`).
Their methods are called from the controller's thread pool, so they lock what they share.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from wunderproxy.engine import ContainerRecord, ContainerSpec, StartedContainer
from wunderproxy.errors import DockerUnreachable, UpstreamFailed

# Engine methods a test can make block (see FakeEngine.hold).
_HOLDABLE = ("ensure_image", "start")


class MemoryStore:
    """A :class:`~wunderproxy.store.Store` in a dict; ``fail_puts`` makes every write fail."""

    description = "memory://test/apps/myapp"

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.puts: list[str] = []
        self.fail_puts: str | None = None
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            return self.objects.get(key)

    def put(self, key: str, data: bytes) -> None:
        with self._lock:
            self._check_put(key)
            self.puts.append(key)
            self.objects[key] = bytes(data)

    def create(self, key: str, data: bytes) -> bool:
        with self._lock:
            self._check_put(key)
            if key in self.objects:
                return False
            self.puts.append(key)
            self.objects[key] = bytes(data)
            return True

    def delete(self, key: str, expected: bytes) -> bool:
        with self._lock:
            if self.objects.get(key) != expected:
                return False
            del self.objects[key]
            return True

    def replace(self, key: str, expected: bytes, data: bytes) -> bool:
        with self._lock:
            self._check_put(key)
            if self.objects.get(key) != expected:
                return False
            self.puts.append(key)
            self.objects[key] = bytes(data)
            return True

    def _check_put(self, key: str) -> None:
        if self.fail_puts is not None:
            raise UpstreamFailed(f"put {key} in {self.description} failed: {self.fail_puts}")


@dataclass
class FakeHold:
    """A stand-in for a held port (``hostports.HeldPort``) that records whether it was let go."""

    port: int
    closed: bool = False

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def close(self) -> None:
        self.closed = True


def offered_ports(*ports: int, holds: list[FakeHold] | None = None) -> Callable[[], FakeHold]:
    """A stand-in for the kernel's choice of a free port (``hostports.hold_free_port``)
    that offers ``ports`` in turn, then the last one for ever; each hold it makes is
    appended to ``holds`` when given."""
    offered = iter(ports)

    def next_port() -> FakeHold:
        hold = FakeHold(next(offered, ports[-1]))
        if holds is not None:
            holds.append(hold)
        return hold

    return next_port


@dataclass(frozen=True)
class Call:
    """One call made to the fake engine."""

    method: str
    args: tuple[object, ...]


class FakeDeaths:
    """The deaths ``FakeEngine.die`` reports, until closed."""

    def __init__(self, deaths: queue.Queue[tuple[str, int | None] | None]) -> None:
        self._deaths = deaths

    def __iter__(self) -> Iterator[tuple[str, int | None]]:
        while (death := self._deaths.get()) is not None:
            yield death

    def close(self) -> None:
        self._deaths.put(None)


class FakeEngine:
    """The controller's ``Engine``: records calls and points every container at one address.

    - ``fail_on(method, message)`` makes that method raise UpstreamFailed;
    - ``exit_while_starting(logs)`` makes containers started from then on report
      ``exited`` with ``logs`` (their health check must fail for this to be noticed);
    - ``exit(container_id, logs)`` makes one container report ``exited`` from now on;
    - ``hold("ensure_image")`` or ``hold("start")`` makes that method block until
      ``release()``, so that a launch stays pending there; ``requested[method]`` is set once
      a launch is blocked in it (``hold_images()`` and ``image_requested`` are the
      ``ensure_image`` ones);
    - ``unreachable()`` makes every call fail as when the engine does not answer
      (DockerUnreachable), until ``reachable()``;
    - ``die(container_id, exit_code)`` reports a container's death to whoever follows
      ``deaths()``.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.calls: list[Call] = []
        self.specs: list[ContainerSpec] = []
        self.failures: dict[str, str] = {}
        self.exit_logs: str | None = None
        self.requested = {method: threading.Event() for method in _HOLDABLE}
        self.image_requested = self.requested["ensure_image"]
        self._gates: dict[str, threading.Event] = {}
        self._exited: dict[str, str] = {}
        self.left_running: list[ContainerRecord] = []  # found at start-up, as after a restart
        self.down = False
        self._lock = threading.Lock()
        self._deaths: queue.Queue[tuple[str, int | None] | None] = queue.Queue()

    # -- steering ------------------------------------------------------------------

    def fail_on(self, method: str, message: str = "the engine is down") -> None:
        self.failures[method] = message

    def exit_while_starting(self, logs: str) -> None:
        self.exit_logs = logs

    def exit(self, container_id: str, logs: str) -> None:
        """The container stopped on its own (crashed, OOM-killed) after it started."""
        with self._lock:
            self._exited[container_id] = logs

    def unreachable(self) -> None:
        self.down = True

    def reachable(self) -> None:
        self.down = False

    def hold(self, method: str) -> None:
        assert method in _HOLDABLE, method
        self._gates[method] = threading.Event()

    def hold_images(self) -> None:
        self.hold("ensure_image")

    def release(self) -> None:
        for gate in self._gates.values():
            gate.set()

    # -- what was asked ------------------------------------------------------------

    def called(self, method: str) -> list[tuple[object, ...]]:
        """The arguments of every call of ``method``, in order."""
        with self._lock:
            return [call.args for call in self.calls if call.method == method]

    @property
    def started_ids(self) -> list[str]:
        with self._lock:
            return [self._id(n) for n in range(len(self.specs))]

    @property
    def removed_ids(self) -> list[str]:
        return [str(args[0]) for args in self.called("remove")]

    # -- the Engine protocol -------------------------------------------------------

    def ping(self) -> None:
        self._record("ping")
        self._maybe_fail("ping")

    def ensure_image(self, image: str) -> None:
        self._record("ensure_image", image)
        self._wait_at_gate("ensure_image")
        self._maybe_fail("ensure_image")

    def start(self, spec: ContainerSpec) -> StartedContainer:
        self._record("start", spec)
        self._wait_at_gate("start")
        self._maybe_fail("start")
        with self._lock:
            container_id = self._id(len(self.specs))
            self.specs.append(spec)
            if self.exit_logs is not None:
                self._exited[container_id] = self.exit_logs
        return StartedContainer(id=container_id, host=self.host, port=self.port, image=spec.image)

    def status(self, container_id: str) -> str:
        self._record("status", container_id)
        self._maybe_fail("status")
        with self._lock:
            return "exited" if container_id in self._exited else "running"

    def logs(self, container_id: str, tail: int = 20) -> str:
        self._record("logs", container_id, tail)
        self._maybe_fail("logs")
        with self._lock:
            return self._exited.get(container_id, "")

    def remove(self, container_id: str, stop_timeout: int) -> None:
        self._record("remove", container_id, stop_timeout)
        self._maybe_fail("remove")

    def list_containers(self, labels: dict[str, str]) -> list[ContainerRecord]:
        """Started containers not removed since, plus any ``left_running`` before."""
        self._record("list_containers", dict(labels))
        self._maybe_fail("list_containers")
        removed = set(self.removed_ids)
        with self._lock:
            started = [
                ContainerRecord(
                    id=self._id(n),
                    status="exited" if self._id(n) in self._exited else "running",
                    labels=spec.labels,
                    image=spec.image,
                    port=self.port,
                )
                for n, spec in enumerate(self.specs)
            ]
            records = [*self.left_running, *started]
        return [
            r
            for r in records
            if r.id not in removed and all(r.labels.get(k) == v for k, v in labels.items())
        ]

    def remove_images(self, repository: str, keep: set[str]) -> list[str]:
        self._record("remove_images", repository, frozenset(keep))
        self._maybe_fail("remove_images")
        return []

    def deaths(self, labels: dict[str, str], since: int | None = None) -> FakeDeaths:
        self._record("deaths", dict(labels), since)
        self._maybe_fail("deaths")
        return FakeDeaths(self._deaths)

    def die(self, container_id: str, exit_code: int | None = 137) -> None:
        """Report ``container_id``'s death, as Docker's event stream does."""
        self._deaths.put((container_id, exit_code))

    # -- helpers -------------------------------------------------------------------

    def _record(self, method: str, *args: object) -> None:
        with self._lock:
            self.calls.append(Call(method, args))

    def _wait_at_gate(self, method: str) -> None:
        gate = self._gates.get(method)
        if gate is not None:
            self.requested[method].set()
            if not gate.wait(timeout=10):
                raise UpstreamFailed("test gate was never released")

    def _maybe_fail(self, method: str) -> None:
        if self.down:
            raise DockerUnreachable(
                "Docker engine unreachable at unix:///fake.sock: Connection refused; "
                "is dockerd running? Start it, or point DOCKER_HOST at it"
            )
        message = self.failures.get(method)
        if message is not None:
            raise UpstreamFailed(f"Docker {method} failed: {message}")

    @staticmethod
    def _id(number: int) -> str:
        """A Docker-like 64-hex-digit id whose first 8 digits differ between containers."""
        return hashlib.sha256(f"container-{number}".encode()).hexdigest()
