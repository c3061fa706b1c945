"""What the fleet looks like, as tables: every host's ``/status`` side by side, and the
deploy history the hosts share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from wunderproxy.hosts import Host, Outcome, read_statuses

NONE = "-"  # a cell with nothing to show


@dataclass(frozen=True)
class FleetStatus:
    """The status table, every host's ``/status`` document by URL (``{"error": ...}`` for
    a host that could not be read), and what is wrong with the fleet (empty when nothing
    is)."""

    table: str
    documents: dict[str, Any]
    problems: list[str]


def fleet_status(hosts: Sequence[Host]) -> FleetStatus:
    """Ask every host at once; a row per host, in the order given."""
    rows: list[list[str]] = []
    documents: dict[str, Any] = {}
    unreachable: list[str] = []
    serving: dict[str, list[str]] = {}
    for outcome in read_statuses(hosts):
        documents[outcome.host.client.url] = (
            outcome.value if outcome.error is None else {"error": str(outcome.error)}
        )
        row = _row(outcome)
        rows.append(row)
        if len(row) == 2:
            unreachable.append(outcome.host.name)
        else:
            serving.setdefault(row[2], []).append(row[1] if row[1] != NONE else row[0])
    problems = []
    if len(serving) > 1:
        problems.append(
            "hosts serve different revisions: "
            + "; ".join(f"{revision} on {', '.join(names)}" for revision, names in serving.items())
        )
    if unreachable:
        problems.append(f"not reached: {', '.join(unreachable)}")
    headers = ["HOST", "INSTANCE", "REVISION", "CONTAINER", "REQUESTS", "FALLBACK S/R", "DOCKER"]
    return FleetStatus(format_table(headers, rows), documents, problems)


def _row(outcome: Outcome[dict[str, Any]]) -> list[str]:
    """A host's cells; two cells (URL, why) for a host that could not be read."""
    url = outcome.host.client.url
    if outcome.error is not None:
        return [url, f"unreachable: {outcome.error}"]
    status = outcome.value or {}
    try:
        current = status.get("current") or {}
        return [
            url,
            str(status.get("instance") or NONE),
            str(current.get("revision") or "none"),
            str(current.get("container_id") or NONE)[:8],
            str(status["requests"]["total"]),
            _fallback(status.get("fallback")),
            str(status["docker"]["state"]),
        ]
    except (KeyError, TypeError, AttributeError):
        return [url, "answered JSON that is not a wunderproxy status: is it a manager's URL?"]


def _fallback(figures: Any) -> str:
    """``sent/received`` of the fallback counters; ``-`` from a wunderproxy without them."""
    if not isinstance(figures, dict) or "sent" not in figures or "received" not in figures:
        return NONE
    return f"{figures['sent']}/{figures['received']}"


def history_table(entries: list[dict[str, str]]) -> str:
    """history.json's entries (oldest first, as stored) as a table, newest first."""
    rows = [
        [
            entry.get("DeployedAt", NONE),
            entry.get("Revision", NONE),
            entry.get("Hash", NONE),
            entry.get("DeployedBy", NONE),
        ]
        for entry in reversed(entries)
    ]
    return format_table(["DEPLOYED AT", "REVISION", "HASH", "DEPLOYED BY"], rows)


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns two spaces apart. A row with fewer cells than headers ends in
    one cell that spans the rest (a message), and does not widen the columns."""
    full = [headers, *(row for row in rows if len(row) == len(headers))]
    widths = [max(len(row[i]) for row in full) for i in range(len(headers))]
    lines = []
    for row in [headers, *rows]:
        last = len(row) - 1
        cells = [cell if i == last else cell.ljust(widths[i]) for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
