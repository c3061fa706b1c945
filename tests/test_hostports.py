"""Picking the port of a host-network container: free on 127.0.0.1 and no other container's."""

from __future__ import annotations

import socket

import pytest

from tests.support.fakes import offered_ports
from wunderproxy.errors import UpstreamFailed
from wunderproxy.hostports import PICK_ATTEMPTS, HostPorts, kernel_free_port, pick_port


def test_the_kernels_free_port_can_be_bound_on_loopback() -> None:
    port = kernel_free_port()

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))  # raises if it was not free
        listener.listen()


def test_a_port_another_container_uses_is_skipped() -> None:
    assert pick_port({40001, 40002}, offered_ports(40001, 40002, 40003)) == 40003


def test_when_the_kernel_offers_only_taken_ports_the_pick_fails_naming_what_to_do() -> None:
    with pytest.raises(UpstreamFailed) as caught:
        pick_port({40001}, offered_ports(40001))

    message = str(caught.value)
    assert f"in {PICK_ATTEMPTS} attempts" in message
    assert "launch again" in message


def test_a_kernel_that_gives_no_port_fails_the_pick_with_its_reason() -> None:
    def exhausted() -> int:
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
