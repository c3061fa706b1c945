"""Deploy events kept in memory: what was launched, switched, drained, aborted or failed,
and when."""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from wunderproxy.timestamps import rfc3339

EventKind = Literal["launch", "healthy", "switch", "drained", "failed", "aborted", "died"]
# Deploy results counted for /metrics (wunderproxy_deploys_total{result}).
DeployResult = Literal["switched", "failed"]

EVENTS_KEPT = 200


@dataclass(frozen=True)
class DeployEvent:
    """One step of a deploy. ``seconds`` is how long the step took, where it has a length."""

    at: datetime
    kind: EventKind
    revision: str
    config_hash: str
    container_id: str | None = None
    seconds: float | None = None
    detail: str = ""

    def describe(self) -> dict[str, Any]:
        """The event as ``/status`` shows it."""
        return {
            "at": rfc3339(self.at),
            "event": self.kind,
            "revision": self.revision,
            "hash": self.config_hash,
            "container_id": self.container_id,
            "seconds": None if self.seconds is None else round(self.seconds, 3),
            "detail": self.detail,
        }


class DeployEvents:
    """The newest ``EVENTS_KEPT`` events, and deploys counted by result since start."""

    def __init__(self) -> None:
        self._events: deque[DeployEvent] = deque(maxlen=EVENTS_KEPT)
        self.results: Counter[DeployResult] = Counter({"switched": 0, "failed": 0})

    def add(
        self,
        kind: EventKind,
        revision: str,
        config_hash: str,
        container_id: str | None = None,
        seconds: float | None = None,
        detail: str = "",
    ) -> None:
        """Record an event; a switch or a failure also counts as a deploy result."""
        self._events.append(
            DeployEvent(
                datetime.now(UTC), kind, revision, config_hash, container_id, seconds, detail
            )
        )
        if kind == "switch":
            self.results["switched"] += 1
        elif kind == "failed":
            self.results["failed"] += 1

    def newest_first(self) -> list[DeployEvent]:
        """Every event kept, newest first."""
        return list(reversed(self._events))
