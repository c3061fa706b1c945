"""Peer fallback across a real fleet: three wunderproxies on one Docker engine, each with its
own container and registry (tests/support/fleet.py), every host a peer of the others.
"""

from __future__ import annotations

import hashlib
import hmac
import time

import pytest

from tests.support.fleet import Fleet, FleetHost
from tests.support.load import LoadGenerator, Worker
from tests.support.waiting import wait_until

pytestmark = pytest.mark.e2e

FALLBACK_PATH = "/cgi-bin/fallback"  # answers container=ID fallback=MARK (as the app saw it)
GETS = (
    Worker("keep-alive", "GET", "/cgi-bin/whoami", keep_alive=True),
    Worker("keep-alive", "GET", "/cgi-bin/whoami", keep_alive=True),
    Worker("new-connection", "GET", "/cgi-bin/whoami", keep_alive=False),
    Worker("new-connection", "GET", "/cgi-bin/whoami", keep_alive=False),
)


# Every host with one process, then with two proxy workers each (peers are per worker then,
# their figures summed by each host's supervisor).
WORKERS = pytest.mark.parametrize(
    "workers",
    [1, pytest.param(2, marks=pytest.mark.fleet(extra=("--workers", "2")))],
)


def mark(secret: str, instance: str, request_line: str) -> str:
    """The mark ``instance`` puts on a request, signed here with ``secret`` (the fleet's, or
    a forger's guess)."""
    signature = hmac.new(secret.encode(), f"{instance} {request_line}".encode(), hashlib.sha256)
    return f"{instance} {signature.hexdigest()}"


def seen_by_app(host: FleetHost, **headers: str) -> tuple[str, str]:
    """The container that answered ``FALLBACK_PATH`` through ``host``, and the mark it saw."""
    answer = host.process.get(FALLBACK_PATH, headers=headers)
    assert answer.status == 200, f"{host.instance}: {answer.status} {answer.text}"
    container, _, fallback = answer.text.strip().partition(" ")
    return container.removeprefix("container="), fallback.removeprefix("fallback=")


def fallback_figures(host: FleetHost) -> dict[str, int]:
    """Requests ``host`` sent to each peer and received from each instance."""
    figures = host.process.status()["fallback"]["by_peer"]
    return {**{f"to {k}": v for k, v in figures["sent"].items()}} | {
        f"from {k}": v for k, v in figures["received"].items()
    }


@WORKERS
def test_a_killed_container_costs_no_request_while_its_peers_serve(
    workers: int, fleet: Fleet
) -> None:
    fleet.serve("rev1")
    web1, *peers = fleet.hosts
    assert len(web1.process.status()["workers"]) == (0 if workers == 1 else workers)
    (doomed,) = fleet.containers(web1)
    peer_containers = {str(c.id)[:12] for peer in peers for c in fleet.containers(peer)}

    with LoadGenerator(web1.process.proxy_port, GETS, max_seconds=60) as load:
        wait_until(lambda: load.count() >= 100, "100 requests before the kill")
        doomed.kill()
        killed_at = time.monotonic()
        wait_until(
            lambda: load.count(lambda o: o.started > killed_at + 1) >= 200,
            "200 requests from a second after the kill",
        )
        outcomes = load.stop()

    failed = [o for o in outcomes if o.failed]
    assert failed == [], f"{len(failed)} of {len(outcomes)} failed, e.g. {failed[:3]}"
    after = [o for o in outcomes if o.started > killed_at + 1]
    answered_by = {o.body.partition("container=")[2] for o in after}
    assert answered_by == peer_containers, "the peers took turns"
    # The app saw where the request came from.
    container, seen = seen_by_app(web1)
    assert container in peer_containers
    assert seen == mark(fleet.secret, "web-1", f"GET {FALLBACK_PATH} HTTP/1.1")
    # A load balancer's health check sees this host as it is.
    health = web1.process.get("/health")
    assert health.status == 502, health.text
    # Counted on both sides, the same.
    sent = web1.process.status()["fallback"]
    received = sum(fallback_figures(peer).get("from web-1", 0) for peer in peers)
    assert sent["sent"] == received >= len(after) + 1
    assert sent["unplaced"] == 0
    metrics = web1.process.api("GET", "/metrics").text
    for peer in peers:
        sent_there = fallback_figures(web1)[f"to {peer.proxy_url}"]
        line = f'wunderproxy_fallback_requests_total{{direction="sent",peer="{peer.proxy_url}"}}'
        assert f"{line} {float(sent_there)}" in metrics


@WORKERS
def test_with_every_container_down_a_request_makes_one_hop_and_forged_marks_stay_out(
    workers: int, fleet: Fleet
) -> None:
    fleet.serve("rev1")
    web1, web2, web3 = fleet.hosts
    assert len(web1.process.status()["workers"]) == (0 if workers == 1 else workers)
    # A client's forged mark is removed before the app sees it. Signed with a guess at the
    # secret: a valid signature with its a's made b's is no forgery when it has no a (one
    # fleet secret in 60), and the proxy rightly keeps such a mark.
    forged = mark("a guess", "web-9", f"GET {FALLBACK_PATH} HTTP/1.1")
    (serving,) = fleet.containers(web2)
    assert seen_by_app(web2, **{"X-Wunderproxy-Fallback": forged}) == (str(serving.id)[:12], "")

    # Every container killed: web-1 asks each peer once; each answers at once that it has no
    # container, sending nothing on; web-1 gives its own 502.
    for host in fleet.hosts:
        for container in fleet.containers(host):
            container.kill()
    for host in fleet.hosts:
        wait_until(
            lambda host=host: any(e["event"] == "died" for e in host.process.status()["events"]),
            f"{host.instance} hearing that its container died",
        )
    answer = web1.process.get("/cgi-bin/whoami")
    assert (answer.status, answer.text) == (502, "the app container is unreachable\n")
    assert fallback_figures(web1) == {f"to {web2.proxy_url}": 1, f"to {web3.proxy_url}": 1}
    for peer in (web2, web3):
        assert fallback_figures(peer) == {"from web-1": 1}, "received once, sent on never"
    assert web1.process.status()["fallback"]["unplaced"] == 1
