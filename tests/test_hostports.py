"""Picking the port of a host-network container: free on 127.0.0.1 and no other container's."""

from __future__ import annotations

import errno
import socket

import pytest

from tests.support.fakes import FakeHold, offered_ports
from wunderproxy.errors import UpstreamFailed
from wunderproxy.hostports import (
    PICK_ATTEMPTS,
    HostPorts,
    hold_free_port,
    pick_port,
    port_of,
)


def test_a_held_port_is_refused_to_a_process_that_does_not_set_so_reuseaddr() -> None:
    # Another wunderproxy picking a port binds without SO_REUSEADDR: it must not get this one.
    with (
        HostPorts().pick(in_use=[]) as port,
        socket.socket() as other,
        pytest.raises(OSError) as caught,
    ):
        other.bind(("127.0.0.1", port))
    assert caught.value.errno == errno.EADDRINUSE


def test_an_app_that_sets_so_reuseaddr_listens_on_its_held_port_and_is_reached() -> None:
    with HostPorts().pick(in_use=[]) as port, socket.socket() as app:
        app.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        app.bind(("127.0.0.1", port))
        app.listen()
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            accepted, _ = app.accept()
            accepted.close()


def test_a_held_port_is_let_go_when_its_launch_ends() -> None:
    with HostPorts().pick(in_use=[]) as port:
        pass
    with socket.socket() as other:
        other.bind(("127.0.0.1", port))  # raises if it were still held


def test_the_held_port_is_a_free_one_on_loopback() -> None:
    hold = hold_free_port()
    try:
        assert hold.getsockname()[0] == "127.0.0.1"
        assert port_of(hold) > 0
    finally:
        hold.close()


def test_a_port_another_container_uses_is_skipped_and_let_go() -> None:
    holds: list[FakeHold] = []
    picked = pick_port({40001, 40002}, offered_ports(40001, 40002, 40003, holds=holds))

    assert port_of(picked) == 40003
    assert [(h.port, h.closed) for h in holds] == [(40001, True), (40002, True), (40003, False)]


def test_when_the_kernel_offers_only_taken_ports_the_pick_fails_naming_what_to_do() -> None:
    with pytest.raises(UpstreamFailed) as caught:
        pick_port({40001}, offered_ports(40001))

    message = str(caught.value)
    assert f"in {PICK_ATTEMPTS} attempts" in message
    assert "launch again" in message


def test_a_kernel_that_gives_no_port_fails_the_pick_with_its_reason() -> None:
    def exhausted() -> FakeHold:
        raise OSError(98, "Address already in use")

    with pytest.raises(UpstreamFailed, match="Address already in use"):
        pick_port((), exhausted)


def test_a_port_held_by_a_launch_is_not_given_to_another_until_that_launch_ends() -> None:
    ports = HostPorts(offered_ports(40001, 40001, 40002, 40001))

    with ports.pick(in_use=[]) as first, ports.pick(in_use=[]) as second:
        assert (first, second) == (40001, 40002)
    with ports.pick(in_use=[]) as again:
        assert again == 40001  # released when the first launch ended


def test_a_port_in_use_by_a_container_is_not_picked() -> None:
    ports = HostPorts(offered_ports(40001, 40002))

    with ports.pick(in_use=[40001]) as port:
        assert port == 40002
