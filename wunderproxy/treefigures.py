"""The figures of a process tree: each worker's counted, summed in the supervisor.

A worker counts what it proxies in its own :class:`ProxyState`, as a single process does.
When ``/status``, ``/metrics`` or the status page is asked for, the supervisor asks every
worker for :func:`collect`'s figures, adds them up (:func:`add_up`) and writes the sums into
its own state (:func:`show`), which proxies nothing itself: its counters are otherwise
unused, so the documents are built from the sums by the code that builds them in one process.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import replace

from wunderproxy.channel import ContainerFigures, FallbackFigures, WorkerFigures
from wunderproxy.state import ProxyState, RequestCounters
from wunderproxy.traffic import MINUTES_KEPT, Figures, Minute, SummedTraffic


def collect(state: ProxyState, minutes: bool = True) -> WorkerFigures:
    """A worker's figures, from its own state; the per-minute series only with
    ``minutes``."""
    requests = state.requests
    fallback = state.fallback
    return WorkerFigures(
        requests=requests.total,
        since_switch=requests.since_switch,
        time_since_switch=requests.time_since_switch,
        by_status=dict(requests.by_status),
        open_connections=state.open_connections,
        active_connections=state.active_connections,
        refused=state.connections_refused,
        timeouts=dict(state.timeouts),
        buffer_failures=state.spool_trouble.failures,
        traffic_totals=state.traffic.totals(),
        traffic_minutes=tuple(state.traffic.minutes()) if minutes else (),
        containers={
            c.container_id: ContainerFigures(c.in_flight, c.upgraded, len(c.links), c.down)
            for c in state.containers
        },
        fallback=None
        if fallback is None
        else FallbackFigures(
            sent=dict(fallback.sent),
            received=dict(fallback.received),
            unplaced=fallback.unplaced,
            unverified=fallback.unverified_marks,
            peers_upgraded=tuple(peer.upgraded for peer in fallback.peers),
            peers_skip_until=tuple(peer.skip_until for peer in fallback.peers),
        ),
    )


def add_up(parts: Iterable[WorkerFigures]) -> WorkerFigures:
    """The sum of several workers' figures (minutes matched by their start)."""
    parts = list(parts)
    by_status: Counter[int] = Counter()
    timeouts: Counter[str] = Counter()
    totals: dict[str, Figures] = {}
    minutes: dict[float, dict[str, Figures]] = {}
    containers: dict[str, ContainerFigures] = {}
    for part in parts:
        by_status.update(part.by_status)
        timeouts.update(part.timeouts)
        _add_figures(totals, part.traffic_totals)
        for minute in part.traffic_minutes:
            _add_figures(minutes.setdefault(minute.start, {}), minute.by_revision)
        for container_id, figures in part.containers.items():
            seen = containers.get(container_id)
            containers[container_id] = figures if seen is None else _add_container(seen, figures)
    return WorkerFigures(
        requests=sum(p.requests for p in parts),
        since_switch=sum(p.since_switch for p in parts),
        time_since_switch=sum(p.time_since_switch for p in parts),
        by_status=dict(by_status),
        open_connections=sum(p.open_connections for p in parts),
        active_connections=sum(p.active_connections for p in parts),
        refused=sum(p.refused for p in parts),
        timeouts=dict(timeouts),
        buffer_failures=sum(p.buffer_failures for p in parts),
        traffic_totals=dict(sorted(totals.items())),
        # The last hour's: a dead worker's figures (see counters_of) may hold older minutes.
        traffic_minutes=tuple(
            Minute(start, minutes[start]) for start in sorted(minutes)[-MINUTES_KEPT:]
        ),
        containers=containers,
        fallback=_add_fallback([p.fallback for p in parts if p.fallback is not None]),
    )


def counters_of(figures: WorkerFigures) -> WorkerFigures:
    """Only what keeps counting up of ``figures`` (requests, statuses, traffic, timeouts,
    refusals): what a dead worker leaves behind. What is open now (connections, requests in
    flight) went with it, and so did its count since the last switch."""
    return replace(
        figures,
        since_switch=0,
        time_since_switch=0.0,
        open_connections=0,
        active_connections=0,
        containers={},
        fallback=None
        if figures.fallback is None
        else replace(
            figures.fallback,
            peers_upgraded=tuple(0 for _ in figures.fallback.peers_upgraded),
            peers_skip_until=tuple(0.0 for _ in figures.fallback.peers_skip_until),
        ),
    )


def show(state: ProxyState, total: WorkerFigures) -> None:
    """Write the workers' sums into the supervisor's ``state`` (which proxies nothing)."""
    counters = RequestCounters(
        total.requests, total.since_switch, total.time_since_switch, Counter(total.by_status)
    )
    state.requests = counters
    state.open_connections = total.open_connections
    state.active_connections = total.active_connections
    state.connections_refused = total.refused
    state.timeouts = Counter(total.timeouts)
    state.spool_trouble.failures = total.buffer_failures
    state.traffic = SummedTraffic(total.traffic_totals, list(total.traffic_minutes))
    state.links_elsewhere = 0
    for container in state.containers:
        figures = total.containers.get(container.container_id)
        if figures is None:
            continue
        # The supervisor's own Container objects carry no request: these fields are read
        # only by /status and /metrics there (a drain waits on the workers, not on them).
        container.in_flight = figures.in_flight
        container.upgraded = figures.upgraded
        container.down = figures.down or container.died
        if container.state == "draining":
            state.links_elsewhere += figures.links
    fallback, figures_of_peers = state.fallback, total.fallback
    if fallback is not None and figures_of_peers is not None:
        fallback.sent = Counter(figures_of_peers.sent)
        fallback.received = Counter(figures_of_peers.received)
        fallback.unplaced = figures_of_peers.unplaced
        fallback.unverified_marks = figures_of_peers.unverified
        for peer, upgraded, skip_until in zip(
            fallback.peers,
            figures_of_peers.peers_upgraded,
            figures_of_peers.peers_skip_until,
            strict=False,
        ):
            peer.upgraded = upgraded
            peer.skip_until = skip_until


def _add_figures(into: dict[str, Figures], more: dict[str, Figures]) -> None:
    for revision, figures in more.items():
        into.setdefault(revision, Figures()).merge(figures)


def _add_container(a: ContainerFigures, b: ContainerFigures) -> ContainerFigures:
    return ContainerFigures(
        a.in_flight + b.in_flight, a.upgraded + b.upgraded, a.links + b.links, a.down or b.down
    )


def _add_fallback(parts: list[FallbackFigures]) -> FallbackFigures | None:
    if not parts:
        return None
    sent: Counter[str] = Counter()
    received: Counter[str] = Counter()
    for part in parts:
        sent.update(part.sent)
        received.update(part.received)
    width = max(len(p.peers_upgraded) for p in parts)
    return FallbackFigures(
        sent=dict(sent),
        received=dict(received),
        unplaced=sum(p.unplaced for p in parts),
        unverified=sum(p.unverified for p in parts),
        peers_upgraded=tuple(
            sum(p.peers_upgraded[i] for p in parts if i < len(p.peers_upgraded))
            for i in range(width)
        ),
        # Skipped as long as the worker that skips it longest: a peer refused there.
        peers_skip_until=tuple(
            max(p.peers_skip_until[i] for p in parts if i < len(p.peers_skip_until))
            for i in range(width)
        ),
    )
