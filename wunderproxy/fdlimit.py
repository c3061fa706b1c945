"""The open-file limit: raised at start-up, and how many client connections fit in it.

Every socket is a file descriptor. A process that runs out of them can accept no
connection, open none to its container, and reach neither Docker nor S3; so wunderproxy
takes all the descriptors it may (the soft ``RLIMIT_NOFILE`` raised to the hard one, as
nginx's ``worker_rlimit_nofile`` and Go's runtime do) and, past ``--max-connections``,
answers new clients with a 503 while it still has descriptors to spare, instead of
failing to accept at all.
"""

from __future__ import annotations

import logging
import resource

from wunderproxy.upstream import MAX_SPARE

log = logging.getLogger("wunderproxy")

# A proxied client connection holds its own socket and, while a request is forwarded
# (or kept alive to the container, or upgraded to a WebSocket), one to the container.
DESCRIPTORS_PER_CONNECTION = 2

# Descriptors the process holds besides its client connections, by what holds them.
# Counted generously: running short of these costs a failed deploy or a 502, while each
# one kept back costs only half a client connection.
OWN_DESCRIPTORS = {
    "standard streams, event loop, its wake-up pipe, /dev/urandom": 8,
    "proxy and API listeners": 2,
    "Docker SDK connection pool (requests' default pool size)": 10,
    "S3 connection pool (botocore's max_pool_connections)": 10,
    "access log and log files": 2,
    "manager API connections (monitors, deploy tools, health checks)": 32,
    # Connections to the serving container, idle ones kept for reuse included, are never
    # more than the requests in flight there at their peak (a request takes an idle one
    # before it opens one), which the two per connection already count: these are a
    # margin. A fallback peer's idle ones come on top: see reserved_descriptors().
    "idle container connections kept for reuse (beyond the two per connection)": 64,
}
RESERVED_DESCRIPTORS = sum(OWN_DESCRIPTORS.values())  # 128


def reserved_descriptors(peers: int = 0) -> int:
    """Descriptors kept back from client connections: the process's own, and for each of
    ``peers`` fallback peers the idle connections kept open to it.

    Each target keeps up to :data:`~wunderproxy.upstream.MAX_SPARE` idle connections of
    its own. The serving container's are bounded by the clients (see OWN_DESCRIPTORS), but
    a client that went to a peer while no container here could serve it leaves its
    connection there, and later holds one to the container as well: a peer's idle
    connections are not among the two per client connection.
    """
    return RESERVED_DESCRIPTORS + peers * MAX_SPARE


def raise_open_file_limit() -> int:
    """Raise the soft open-file limit to the hard one; return the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == hard:
        # Linux never allows an infinite RLIMIT_NOFILE; keep what we have.
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
        return soft
    log.info("open-file limit raised from %d to the hard limit %d", soft, hard)
    return hard


def connections_allowed(open_files: int, peers: int = 0) -> int:
    """Client connections that fit in ``open_files`` descriptors (at least one).

    Each may hold :data:`DESCRIPTORS_PER_CONNECTION`, after the process kept
    :func:`reserved_descriptors` for itself and the idle connections to ``peers``
    fallback peers.
    """
    return max(1, (open_files - reserved_descriptors(peers)) // DESCRIPTORS_PER_CONNECTION)


def max_connections(requested: int | None, peers: int = 0) -> int:
    """Raise the open-file limit, then settle ``--max-connections`` (None: derive it),
    with ``peers`` fallback peers.

    Logs the limit and the figure; a requested figure above what the limit allows is kept,
    with a warning that says what will happen and how to raise the limit.
    """
    open_files = raise_open_file_limit()
    allowed = connections_allowed(open_files, peers)
    if requested is None:
        for_peers = (
            f" - {peers * MAX_SPARE} for idle connections to {peers} fallback peer(s)"
            if peers
            else ""
        )
        log.info(
            "max connections: %d = (open-file limit %d - %d kept for the process%s) / %d "
            "descriptors per connection (client and container side)",
            allowed,
            open_files,
            RESERVED_DESCRIPTORS,
            for_peers,
            DESCRIPTORS_PER_CONNECTION,
        )
        return allowed
    if requested > allowed:
        log.warning(
            "--max-connections %d is more than the open-file limit of %d allows (%d): past "
            "about %d busy connections, accepting and connecting to the container fail for "
            "lack of file descriptors, and new clients wait in the kernel's queue instead of "
            "getting a 503; raise the limit (LimitNOFILE= in the systemd unit, ulimit -n in "
            "a shell) or lower --max-connections",
            requested,
            open_files,
            allowed,
            allowed,
        )
    else:
        log.info("max connections: %d (--max-connections)", requested)
    return requested
