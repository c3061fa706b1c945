"""Peer fallback over real sockets: in-process proxies as hosts, h11 servers as their apps.

``here`` (instance web-1) has ``there`` (web-2, serving the green app) as its peer.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tests.support.backend import Backend
from tests.support.docker import free_port
from tests.support.proxied import Proxy, make_container, running_proxy
from tests.support.waiting import eventually
from tests.support.wire import send_request
from wunderproxy.cli import _PeerURL, main
from wunderproxy.config import Fleet, Peer
from wunderproxy.fallback import Fallback, request_line, unmarked
from wunderproxy.metrics import Metrics

SECRET = b"shared by the fleet"
HEALTH = "/health"


def fleet_of(instance: str, *peers: Proxy | int) -> Fallback:
    """A fallback for ``instance`` with these peers (proxies, or ports nothing listens on)."""
    ports = [p if isinstance(p, int) else p.port for p in peers]
    return Fallback(
        Fleet(
            instance=instance,
            peers=tuple(Peer.parse(f"http://127.0.0.1:{port}") for port in ports),
            secret=SECRET,
        )
    )


def mark_of(instance: str, line: str, secret: bytes = SECRET) -> str:
    """The mark a sender puts on a request, computed here independently (with ``secret``:
    a forger's guess at the fleet's)."""
    signature = hmac.new(secret, f"{instance} {line}".encode(), hashlib.sha256).hexdigest()
    return f"{instance} {signature}"


def mark_seen(backend: Backend) -> str | None:
    """The fallback mark on the last request the app received, if any."""
    marks = [v for k, v in backend.heads[-1].headers if k == b"x-wunderproxy-fallback"]
    assert len(marks) <= 1, marks
    return marks[0].decode() if marks else None


@pytest.fixture
async def there(tmp_path: Path, green: Backend) -> AsyncIterator[Proxy]:
    async with running_proxy(tmp_path / "there.log", fallback=fleet_of("web-2")) as proxy:
        proxy.serve(make_container(green, "rev1", HEALTH))
        yield proxy


@pytest.fixture
async def here(tmp_path: Path, there: Proxy) -> AsyncIterator[Proxy]:
    async with running_proxy(tmp_path / "here.log", fallback=fleet_of("web-1", there)) as proxy:
        yield proxy


@pytest.fixture
async def silent() -> AsyncIterator[int]:
    """The port of a server that accepts and never answers, as Docker's userland proxy
    does for a container that died."""
    held: list[asyncio.StreamWriter] = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    for writer in held:
        writer.close()
    server.close()
    await server.wait_closed()


def peer_url(proxy: Proxy) -> str:
    return f"http://127.0.0.1:{proxy.port}"


# -- the mark ---------------------------------------------------------------------------


def test_a_mark_is_valid_only_for_its_instance_request_line_and_secret() -> None:
    head = b"GET /cart?id=3 HTTP/1.1\r\nHost: shop\r\n\r\n"
    marked = fleet_of("web-1").marked(head)
    mark, nonce = marked.split(b"\r\n")[-4:-2]
    assert re.fullmatch(rb"X-Wunderproxy-Nonce: [0-9a-f]{32}", nonce)
    assert fleet_of("web-1").marked(head) != marked, "a nonce of its own for each request"
    assert (
        mark == b"X-Wunderproxy-Fallback: " + mark_of("web-1", "GET /cart?id=3 HTTP/1.1").encode()
    )
    value = mark.partition(b": ")[2]
    receiver = fleet_of("web-2")
    assert receiver.sender(value, marked) == "web-1"
    assert receiver.sender(value, b"GET /cart?id=4 HTTP/1.1\r\nHost: shop\r\n\r\n") is None
    assert receiver.sender(value.replace(b"web-1", b"web-3", 1), marked) is None
    assert receiver.sender(b"web-1", marked) is None
    assert receiver.sender(b"", marked) is None
    stranger = Fallback(Fleet(instance="web-2", secret=b"another fleet"))
    assert stranger.sender(value, marked) is None


def test_unmarked_removes_every_mark_whatever_its_case() -> None:
    head = (
        b"GET / HTTP/1.1\r\nx-wunderproxy-fallback: a b\r\nHost: h\r\n"
        b"X-WUNDERPROXY-FALLBACK:c\r\n\r\n"
    )
    assert unmarked(head) == b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"
    assert request_line(head) == b"GET / HTTP/1.1"


# -- when a request falls back -------------------------------------------------------------


async def test_with_no_container_here_a_request_is_served_by_a_peer_with_the_mark(
    here: Proxy, there: Proxy, green: Backend
) -> None:
    client = await here.connect()
    status, headers, body = await client.request("GET", "/cart?id=3")
    assert (status, headers["x-backend"], body) == (200, "green", b"green")
    assert mark_seen(green) == mark_of("web-1", "GET /cart?id=3 HTTP/1.1")
    assert here.state.snapshot()["fallback"]["by_peer"]["sent"] == {peer_url(there): 1}
    assert there.state.snapshot()["fallback"]["by_peer"]["received"] == {"web-1": 1}
    (sent,) = await here.logged_lines(1)
    (received,) = await there.logged_lines(1)
    assert sent.split()[-3] == f"to={peer_url(there)}" and " 200 " in sent
    assert received.split()[-3] == "from=web-1" and " rev1 " in received


async def test_a_request_body_reaches_the_peer_whole(here: Proxy, green: Backend) -> None:
    body = bytes(range(256)) * 1024
    client = await here.connect()
    assert await client.request("POST", "/echo", body) == (
        200,
        {"x-backend": "green", "content-length": str(len(body))},
        body,
    )


async def test_a_container_refusing_connections_is_skipped_until_a_probe_finds_it_up(
    here: Proxy, green: Backend
) -> None:
    port = free_port()
    container = make_container(port, "rev7", HEALTH)
    here.serve(container)
    client = await here.connect()
    assert (await client.request("POST", "/echo", b"a body"))[1:] == (
        {"x-backend": "green", "content-length": "6"},
        b"a body",
    )
    assert container.down
    # Known down: the next requests go to the peer without trying it.
    assert (await client.request("GET", "/a"))[1]["x-backend"] == "green"
    assert container.in_flight == 0
    blue = await Backend("blue").start(port)
    try:
        await eventually(lambda: not container.down, within=5)
        assert (await client.request("GET", "/a"))[1]["x-backend"] == "blue"
    finally:
        await blue.stop()


async def test_a_container_closing_without_an_answer_sends_a_get_again_but_not_a_post(
    here: Proxy, blue: Backend, green: Backend
) -> None:
    here.serve(make_container(blue, "rev7", HEALTH))
    blue.answering = False
    client = await here.connect()
    assert (await client.request("GET", "/a"))[:2] == (
        200,
        {"x-backend": "green", "content-length": "5"},
    )
    assert blue.dropped == 1
    assert mark_seen(green) == mark_of("web-1", "GET /a HTTP/1.1")
    # A POST may have been acted on: it is not sent twice.
    here.state.current.down = False  # type: ignore[union-attr]
    poster = await here.connect()
    status, _, body = await poster.request("POST", "/a", b"x")
    assert (status, body) == (502, b"the app container failed to answer\n")
    assert green.requests == 1


async def test_the_health_check_path_is_never_sent_to_a_peer(here: Proxy, green: Backend) -> None:
    here.serve(make_container(free_port(), "rev7", HEALTH))
    for target in (HEALTH, HEALTH + "?from=lb"):
        client = await here.connect()
        assert (await client.request("GET", target))[0] == 502
    assert green.requests == 0
    client = await here.connect()
    assert (await client.request("GET", "/healthy"))[1]["x-backend"] == "green"


async def test_a_mark_that_does_not_verify_is_removed_and_keeps_the_request_here(
    here: Proxy, blue: Backend, green: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    """A client's forgery, or a peer's mark under another secret: sending such requests on
    would let two peers with different secrets pass one back and forth for ever."""
    # Signed with a wrong secret: changing a valid signature's a's to b's changes nothing
    # when it has none.
    forged = [("X-Wunderproxy-Fallback", mark_of("web-9", "GET /x HTTP/1.1", b"a guess"))]
    client = await here.connect()
    send_request(client.conn, client.writer, "GET", "/x", headers=forged)
    assert (await client.response())[0] == 503, "no container here, and not sent on"
    assert green.requests == 0
    here.serve(make_container(blue, "rev7", HEALTH))
    for _ in range(2):
        send_request(client.conn, client.writer, "GET", "/x", headers=forged)
        assert (await client.response())[1]["x-backend"] == "blue"
        assert mark_seen(blue) is None
    assert here.state.snapshot()["fallback"]["unverified"] == 3
    warnings = [r for r in caplog.records if "does not verify" in r.getMessage()]
    assert len(warnings) == 1, "once a minute, whatever a client sends"
    assert "do not share one --fallback-secret" in warnings[0].getMessage()


async def test_peers_with_different_secrets_do_not_pass_a_request_back_and_forth(
    here: Proxy, there: Proxy
) -> None:
    there.state.current = None
    there.state.fallback = Fallback(
        Fleet(instance="web-2", peers=(Peer.parse(peer_url(here)),), secret=b"another secret")
    )
    client = await here.connect()
    assert (await asyncio.wait_for(client.request("GET", "/a"), 5))[0] == 503
    assert here.state.snapshot()["fallback"]["sent"] == 1, "answered by there's own 503"
    assert there.state.snapshot()["fallback"]["sent"] == 0, "not sent back"
    assert there.state.fallback.unverified_marks == 1
    assert here.state.requests.total == there.state.requests.total == 1


async def test_a_request_from_a_peer_is_never_sent_on(
    tmp_path: Path, here: Proxy, there: Proxy, green: Backend
) -> None:
    """Every container of the fleet down: the peer answers at once, no loop; the sender
    skips it for a while and, with no other peer, gives its own answer."""
    there.state.current = None
    there.state.fallback = fleet_of("web-2", here)
    client = await here.connect()
    status, _, body = await client.request("GET", "/a")
    assert (status, body) == (503, b"no container is deployed yet\n")
    assert here.state.fallback is not None and there.state.fallback is not None
    assert here.state.fallback.sent == {peer_url(there): 1}
    assert there.state.fallback.received == {"web-1": 1}
    assert there.state.fallback.sent == {} and here.state.fallback.received == {}
    assert here.state.fallback.unplaced == 1
    assert here.state.snapshot()["fallback"]["peers"][0]["skipped_for"] > 3
    assert green.requests == 0


async def test_a_peer_without_a_container_says_so_and_the_next_peer_serves(
    tmp_path: Path, here: Proxy, there: Proxy, blue: Backend, green: Backend
) -> None:
    async with running_proxy(tmp_path / "third.log", fallback=fleet_of("web-3")) as third:
        third.serve(make_container(blue, "rev1", HEALTH))
        there.state.current = None
        here.state.fallback = fleet_of("web-1", there, third)
        client = await here.connect()
        for _ in range(4):
            assert (await client.request("GET", "/a"))[1]["x-backend"] == "blue"
        # Any method: no app saw it where no container was.
        here.state.fallback = fleet_of("web-1", there, third)  # `there` first again
        poster = await here.connect()
        assert (await poster.request("POST", "/echo", b"once"))[1:] == (
            {"x-backend": "blue", "content-length": "4"},
            b"once",
        )
        # A body still on its way when the peer answers cannot be sent again: that 502
        # goes to the client, and the peer is skipped from then on.
        here.state.fallback = fleet_of("web-1", there, third)
        late = await here.connect()
        late.send_raw(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\n")
        answer = b""
        while b"no container\n" not in answer:
            answer += await asyncio.wait_for(late.reader.read(1024), 5)
        assert answer.startswith(b"HTTP/1.1 502 ") and b"X-Wunderproxy-Unserved" in answer
        late.send_raw(b"hello")
        assert (await poster.request("POST", "/echo", b"again"))[1]["x-backend"] == "blue"
        assert green.requests == 0
        assert [h.target for h in blue.heads if h.method == b"POST"] == [b"/echo", b"/echo"]


def test_only_the_peers_own_signed_unserved_field_lets_a_request_go_again() -> None:
    """An app behind the peer does not know the secret: its 502 cannot pass for the peer's,
    and one it saw before (a client may be shown one) is worth nothing for another request."""
    peer, sender = fleet_of("web-2"), fleet_of("web-1")
    head = sender.marked(b"POST /pay HTTP/1.1\r\nHost: shop\r\n\r\n")
    answer = b"HTTP/1.1 502 Bad Gateway\r\n" + peer.unserved(head) + b"\r\n"
    assert sender.is_unserved(answer, head)
    assert not sender.is_unserved(answer.replace(b"502", b"503", 1), head)
    assert not sender.is_unserved(answer, head.replace(b"/pay", b"/pay2"))
    again = sender.marked(b"POST /pay HTTP/1.1\r\nHost: shop\r\n\r\n")
    assert not sender.is_unserved(answer, again), "the same request line, another nonce"
    forged = Fallback(Fleet(instance="app", secret=b"guessed")).unserved(head)
    assert not sender.is_unserved(b"HTTP/1.1 502 Bad Gateway\r\n" + forged + b"\r\n", head)
    in_body = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 200\r\n\r\n" + peer.unserved(head)
    assert not sender.is_unserved(in_body, head), "only the head counts"
    assert peer.unserved(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n") == b"", "no nonce, no field"
    # A client's own nonce is not the one signed: the proxy puts its own in place of it.
    chosen = b"GET / HTTP/1.1\r\nX-Wunderproxy-Nonce: " + b"0" * 32 + b"\r\n\r\n"
    assert b"0" * 32 not in sender.marked(chosen)


async def test_a_valid_mark_is_passed_on_to_the_container(there: Proxy, green: Backend) -> None:
    mark = [("X-Wunderproxy-Fallback", mark_of("web-5", "GET /x HTTP/1.1"))]
    client = await there.connect()
    send_request(client.conn, client.writer, "GET", "/x", headers=mark)
    assert (await client.response())[0] == 200
    assert mark_seen(green) == mark[0][1]
    assert there.state.fallback is not None and there.state.fallback.received == {"web-5": 1}


# -- which peer ---------------------------------------------------------------------------


async def test_peers_take_turns_and_one_that_refuses_is_skipped_for_a_while(
    tmp_path: Path, here: Proxy, there: Proxy, blue: Backend, green: Backend
) -> None:
    async with running_proxy(tmp_path / "third.log", fallback=fleet_of("web-3")) as third:
        third.serve(make_container(blue, "rev1", HEALTH))
        dead = free_port()
        here.state.fallback = fleet_of("web-1", there, dead, third)
        answered_by = []
        for _ in range(6):
            client = await here.connect()
            answered_by.append((await client.request("GET", "/a"))[1]["x-backend"])
        assert sorted(answered_by) == ["blue"] * 3 + ["green"] * 3
        peers = here.state.snapshot()["fallback"]["peers"]
        assert [p["url"] for p in peers] == [
            peer_url(there),
            f"http://127.0.0.1:{dead}",
            peer_url(third),
        ]
        assert (
            peers[1]["skipped_for"] > 3 and peers[0]["skipped_for"] == peers[2]["skipped_for"] == 0
        )


async def test_with_every_peer_down_the_local_answer_stands(tmp_path: Path) -> None:
    async with running_proxy(tmp_path / "a.log", fallback=fleet_of("web-1", free_port())) as alone:
        client = await alone.connect()
        status, _, body = await client.request("GET", "/a")
        assert (status, body) == (503, b"no container is deployed yet\n")
        assert alone.state.snapshot()["fallback"]["unplaced"] == 1


async def test_a_client_connection_keeps_its_connection_to_the_peer(
    here: Proxy, there: Proxy
) -> None:
    client = await here.connect()
    for _ in range(5):
        assert (await client.request("GET", "/a"))[0] == 200
    assert len(there.connections) == 1


async def test_metrics_count_fallback_requests_by_direction_and_peer(
    here: Proxy, there: Proxy
) -> None:
    client = await here.connect()
    assert (await client.request("GET", "/a"))[0] == 200
    assert here.state.fallback is not None and there.state.fallback is not None
    sent = Metrics(here.state).render().decode()
    received = Metrics(there.state).render().decode()
    assert (
        f'wunderproxy_fallback_requests_total{{direction="sent",peer="{peer_url(there)}"}} 1.0'
        in sent
    )
    assert 'wunderproxy_fallback_requests_total{direction="received",peer="web-1"} 1.0' in received


async def test_without_peers_nothing_falls_back_and_status_has_no_fallback(proxy: Proxy) -> None:
    client = await proxy.connect()
    assert (await client.request("GET", "/a"))[0] == 503
    assert "fallback" not in proxy.state.snapshot()


async def test_an_upgrade_goes_through_a_peer_and_is_counted_as_upgraded_here(
    here: Proxy, green: Backend
) -> None:
    client = await here.connect()
    await client.upgrade()
    assert mark_seen(green) == mark_of("web-1", "GET /ws HTTP/1.1")
    counts = here.state.connection_counts()
    assert (counts["active"], counts["idle"], counts["upgraded"]) == (1, 0, 1)
    client.close()
    await eventually(lambda: here.state.connection_counts()["upgraded"] == 0)


async def test_requests_waiting_on_a_container_that_dies_go_to_a_peer(
    here: Proxy, green: Backend, silent: int
) -> None:
    """Docker's userland proxy accepts for a dead container and never answers: when Docker
    says the container died, what waits there is sent on (see deaths.py)."""
    container = make_container(silent, "rev7", HEALTH)
    here.serve(container)
    clients = [await here.connect() for _ in range(3)]
    waiting = [asyncio.create_task(c.request("GET", f"/{n}")) for n, c in enumerate(clients)]
    await eventually(lambda: container.in_flight == 3)
    assert here.state.fallback is not None
    here.state.fallback.mark_down(container, HEALTH)
    container.close_links(idle_only=False)
    answers = await asyncio.wait_for(asyncio.gather(*waiting), 5)
    assert [a[1]["x-backend"] for a in answers] == ["green"] * 3
    assert container.in_flight == 0


async def test_a_request_connecting_to_a_container_as_it_dies_goes_to_a_peer(
    here: Proxy, green: Backend, silent: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection made just after the death is not among those closed then."""
    container = make_container(silent, "rev7", HEALTH)
    here.serve(container)
    loop = asyncio.get_running_loop()
    connect = loop.create_connection

    async def dies_meanwhile(*args: Any, **kwargs: Any) -> Any:
        connected = await connect(*args, **kwargs)
        if container.links:  # the connection to the container, not to the peer
            assert here.state.fallback is not None
            here.state.fallback.mark_down(container, HEALTH)
        return connected

    monkeypatch.setattr(loop, "create_connection", dies_meanwhile)
    client = await here.connect()
    status, headers, _ = await asyncio.wait_for(client.request("GET", "/a"), 5)
    assert (status, headers["x-backend"]) == (200, "green")
    assert not container.links, "the connection made to the dead container was closed"


async def test_a_request_on_a_dropped_kept_alive_connection_is_not_sent_again_to_a_dead_container(
    proxy: Proxy, blue: Backend
) -> None:
    """Without peers too: the keep-alive race's second try would wait on Docker's proxy."""
    container = make_container(blue, "rev1", HEALTH)
    proxy.serve(container)
    client = await proxy.connect()
    assert (await client.request("GET", "/a"))[0] == 200
    blue.answering = False
    container.down = True  # as when Docker said it died
    assert (await client.request("GET", "/a"))[0] == 502
    assert blue.dropped == 1, "tried once, not again"


# -- the options ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "environment", "says"),
    [
        (["--peer", "http://10.0.0.2:80"], {}, "--peer needs --fallback-secret"),
        (["--fallback-secret", "s", "--peer", "https://10.0.0.2"], {}, "give http://HOST:PORT"),
        (["--fallback-secret", "s", "--peer", "10.0.0.2:80"], {}, "give http://HOST:PORT"),
        (["--fallback-secret", "s", "--peer", "http://h/path"], {}, "give http://HOST:PORT"),
        (["--instance", "wéb-1"], {}, "ASCII letters, digits"),
        (["--instance", "web 1"], {}, "ASCII letters, digits"),
        ([], {"WUNDERPROXY_PEERS": "http://10.0.0.2, http://10.0.0.3:8080"}, "--fallback-secret"),
    ],
)
def test_fleet_options_that_cannot_work_stop_start_up_saying_why(
    arguments: list[str], environment: dict[str, str], says: str, tmp_path: Path
) -> None:
    result = CliRunner().invoke(
        main, ["run", f"file://{tmp_path}", "p", "app", *arguments], env=environment
    )
    assert result.exit_code == 2 and says in result.output, result.output


def test_peers_from_the_environment_are_comma_separated_urls() -> None:
    peers = [Peer.parse(p) for p in _PeerURL().split_envvar_value(" http://a:1,, http://b ")]
    assert [(p.url, p.host, p.port) for p in peers] == [
        ("http://a:1", "a", 1),
        ("http://b:80", "b", 80),
    ]
    assert Peer.parse("http://[::1]:81").url == "http://[::1]:81"


async def test_a_container_docker_said_died_gets_no_new_request_even_without_peers(
    proxy: Proxy, silent: int
) -> None:
    container = make_container(silent, "rev7", HEALTH)
    container.died = container.down = True  # as Controller._container_died leaves it
    proxy.serve(container)
    client = await proxy.connect()
    status, _, body = await asyncio.wait_for(client.request("GET", "/a"), 5)
    assert (status, body) == (502, b"the app container is unreachable\n")
    assert not container.links, "not even tried"


async def test_a_peers_request_to_a_container_dying_as_it_connects_gets_the_unserved_answer(
    there: Proxy, silent: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    container = make_container(silent, "rev7", HEALTH)
    there.serve(container)
    loop = asyncio.get_running_loop()
    connect = loop.create_connection

    async def dies_meanwhile(*args: Any, **kwargs: Any) -> Any:
        connected = await connect(*args, **kwargs)
        container.died = True
        return connected

    monkeypatch.setattr(loop, "create_connection", dies_meanwhile)
    sender = fleet_of("web-1")
    head = sender.marked(b"POST /pay HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n")
    client = await there.connect()
    client.send_raw(head + b"hi")
    answer = await client.read_until(b"no container\n")
    assert sender.is_unserved(answer, head), "no app saw it: the sender may try another peer"


async def test_the_sweep_sends_on_what_still_waits_on_a_container_docker_said_died(
    here: Proxy, green: Backend, silent: int
) -> None:
    """Should a connection to it outlive the death (not among those closed then), the
    timeout sweep moves its request on within a sweep, not after --upstream-timeout."""
    container = make_container(silent, "rev7", HEALTH)
    here.serve(container)
    client = await here.connect()
    waiting = asyncio.create_task(client.request("GET", "/a"))
    await eventually(lambda: bool(container.links))
    await asyncio.sleep(0.05)  # the request went out on it
    container.died = container.down = True  # and its connection was not closed
    here.sweep(0.0)
    status, headers, _ = await asyncio.wait_for(waiting, 5)
    assert (status, headers["x-backend"]) == (200, "green")
