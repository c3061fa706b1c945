"""The routing table: what the supervisor's :class:`ProxyState` routes, and how a worker's
own :class:`ProxyState` follows it.

The supervisor's state is the truth; each worker keeps its own ``Container`` objects (with
their own connections, spare pool and requests in flight), matched by container id, and
changes ``current`` in one assignment, as a switch in one process does.
"""

from __future__ import annotations

from collections.abc import Callable

from wunderproxy.channel import Route, RouteTable
from wunderproxy.fallback import Fallback
from wunderproxy.state import Container, ProxyState


def table_of(state: ProxyState, sequence: int) -> RouteTable:
    """The routing table of the supervisor's ``state``, numbered ``sequence``."""
    return RouteTable(
        sequence=sequence,
        current=state.current.container_id if state.current is not None else None,
        containers=tuple(
            Route(
                config=c.config,
                image=c.image,
                container_id=c.container_id,
                host=c.host,
                port=c.port,
                started_at=c.started_at,
                state=c.state,
                died=c.died,
            )
            for c in state.containers
        ),
        health_check_path=state.health_check_path,
    )


def follow(
    state: ProxyState,
    table: RouteTable,
    state_changed: Callable[[Container], None],
    forgotten: Callable[[Container], None],
) -> None:
    """Make a worker's ``state`` route by ``table``.

    ``state_changed`` is called for each container that starts draining, or serves again
    after a switch back (its ``state`` says which); ``forgotten`` for each container the
    supervisor stopped and removed.
    """
    mine = {c.container_id: c for c in state.containers}
    for route in table.containers:
        container = mine.pop(route.container_id, None)
        if container is None:
            container = Container(
                config=route.config,
                image=route.image,
                container_id=route.container_id,
                host=route.host,
                port=route.port,
                started_at=route.started_at,
            )
            state.add(container)
        if route.died and not container.died:
            died(container, state.fallback)
        if route.state != container.state:
            container.state = route.state  # type: ignore[assignment]  # a ContainerState
            if route.state in ("draining", "serving"):
                state_changed(container)
    for container in mine.values():
        state.forget(container)
        forgotten(container)
    current = next((c for c in state.containers if c.container_id == table.current), None)
    if current is None:
        state.current = None
    elif current is not state.current:
        state.switch_to(current)
    state.health_check_path = table.health_check_path


def died(container: Container, fallback: Fallback | None) -> None:
    """Docker says ``container`` died: nothing is sent to it any more, requests that may
    go to a peer go there, and its connections are closed."""
    container.died = True
    if fallback is not None and fallback.peers:
        fallback.mark_down(container, container.config.health_check_path)
    else:
        container.down = True
    container.close_links(idle_only=False)
