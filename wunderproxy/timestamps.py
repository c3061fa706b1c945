"""The one way wunderproxy writes a moment: RFC 3339 in UTC, to the second.

``/status`` (containers, minutes, deploy events) and ``history.json`` use it, so that a
deploy recorded in the store and the container it started read the same.
"""

from __future__ import annotations

from datetime import UTC, datetime


def rfc3339(moment: datetime) -> str:
    """``2026-11-24T12:00:00Z`` for a timezone-aware ``moment``."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
