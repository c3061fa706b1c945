"""Peer fallback: where a request goes when no container here can take it.

A host whose container is down (none deployed, not accepting connections, or closing them
before any answer) sends the request on to a peer wunderproxy instead of answering 503 or
502. The request carries ``X-Wunderproxy-Fallback: INSTANCE SIGNATURE``: the sender's
instance name and the hex HMAC-SHA256, keyed with the fleet's secret, of ``INSTANCE``, one
space and the request line. A peer serves a request with a valid mark itself or answers 502,
and never sends it on: a request makes at most one hop, so a fleet whose containers are all
down cannot bounce it around. A mark with a wrong signature (a client's forgery, or a peer
with another secret) is removed before the app sees it, and that request is not sent on
either.

The signature covers the request line, not the body or the time: a captured mark can only
be replayed with the same request line, and all it buys is that the request is not sent on
again.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections import Counter
from typing import Any

from wunderproxy.config import PEER_RETRY_AFTER, Fleet, Peer
from wunderproxy.fields import FALLBACK_FIELD
from wunderproxy.health import probe
from wunderproxy.state import Container, Link

log = logging.getLogger("wunderproxy.fallback")

HEADER = b"X-Wunderproxy-Fallback"
UNSERVED = b"X-Wunderproxy-Unserved"
NONCE = b"X-Wunderproxy-Nonce"
NONCE_BYTES = 16
# Seconds between two health probes of a container that refused a connection; requests
# that may fall back skip it meanwhile.
PROBE_INTERVAL = 1.0
PROBE_TIMEOUT = 2.0
# Seconds between two warnings of requests whose mark does not verify.
UNVERIFIED_WARNING_INTERVAL = 60.0

_ANY_NONCE_LINE = re.compile(rb"\r\n" + NONCE + rb":[^\r]*", re.IGNORECASE)
_NONCE_LINE = re.compile(rb"\r\n" + NONCE + rb": ([0-9a-f]{32})\r\n", re.IGNORECASE)
_MARK_LINE = re.compile(rb"\r\n" + FALLBACK_FIELD.encode() + rb":[^\r]*", re.IGNORECASE)


class PeerTarget:
    """A peer's proxy as a place requests are sent to (see upstream.Target)."""

    __slots__ = ("host", "links", "port", "skip_until", "spare", "upgraded", "url")

    # A peer takes requests whenever it accepts a connection; it is never drained.
    state = "serving"

    def __init__(self, peer: Peer) -> None:
        self.url = peer.url
        self.host = peer.host
        self.port = peer.port
        self.links: set[Link] = set()
        self.spare: list[Link] = []  # idle kept-alive connections, for the next request
        self.skip_until = 0.0  # time.monotonic() until which it is not tried (it refused)
        self.upgraded = 0  # client connections upgraded (WebSocket) through it

    @property
    def name(self) -> str:
        """How log lines name it."""
        return f"peer {self.url}"

    def upgrade_started(self) -> None:
        """A client connection through it left HTTP."""
        self.upgraded += 1

    def upgrade_finished(self) -> None:
        """An upgraded connection through it ended."""
        self.upgraded -= 1


class Fallback:
    """The fleet as this proxy sees it: its peers, the secret, and the fallback figures."""

    def __init__(self, fleet: Fleet) -> None:
        assert fleet.secret is not None, "fallback needs the fleet's secret"
        self.instance = fleet.instance
        self._secret = fleet.secret
        self._name = fleet.instance.encode()
        self.peers = [PeerTarget(peer) for peer in fleet.peers]
        self._turn = 0  # rotates the peer tried first
        self.sent: Counter[str] = Counter()  # by peer URL
        self.received: Counter[str] = Counter()  # by sending instance
        self.unplaced = 0  # requests no peer accepted
        self.unverified_marks = 0  # requests with a mark that did not verify
        self._quiet_until = 0.0  # no warning of unverified marks before then
        self._probes: dict[Container, asyncio.Task[None]] = {}

    # -- the mark ------------------------------------------------------------------

    def signature(self, instance: bytes, request_line: bytes) -> str:
        """The hex HMAC-SHA256 of ``instance``, one space and ``request_line``."""
        return hmac.new(self._secret, instance + b" " + request_line, hashlib.sha256).hexdigest()

    def sender(self, mark: bytes, head: bytes) -> str | None:
        """The instance that sent a request marked ``mark``, if its signature is valid."""
        instance, _, signature = mark.partition(b" ")
        if not instance or not signature:
            return None
        expected = self.signature(instance, request_line(head))
        if not hmac.compare_digest(expected.encode(), signature):
            return None
        return instance.decode("latin-1")

    def unserved(self, head: bytes) -> bytes:
        """The field that tells the sender of a marked request that no container took it
        here: its 502 is this proxy's own, so the request may go to another peer.

        Signed over the nonce the sender put on this one request: an app behind the peer
        cannot make one up, and one seen before (a client may be shown it) is worth nothing
        for another request. Empty for a request without a nonce.
        """
        nonce = _NONCE_LINE.search(head)
        if nonce is None:
            return b""
        signed = b"unserved\0" + nonce.group(1) + b"\0" + request_line(head)
        signature = hmac.new(self._secret, signed, hashlib.sha256).hexdigest()
        return UNSERVED + b": " + signature.encode() + b"\r\n"

    def is_unserved(self, answer: bytes, head: bytes) -> bool:
        """True when ``answer`` (its first bytes) is a peer's 502 for ``head`` (as sent,
        nonce included) that says no container took the request there."""
        if not answer.startswith(b"HTTP/1.1 502 "):
            return False
        field = self.unserved(head)
        return bool(field) and field in answer[: answer.find(b"\r\n\r\n") + 2]

    def unverified(self, client: str) -> None:
        """A request came with a mark this host cannot verify: count it, and say so (at most
        once a minute: a client can send any number)."""
        self.unverified_marks += 1
        now = time.monotonic()
        if now < self._quiet_until:
            return
        self._quiet_until = now + UNVERIFIED_WARNING_INTERVAL
        log.warning(
            "a request from %s carried an X-Wunderproxy-Fallback field that does not verify "
            "(%d so far): removed, and the request is served here only. If it came from a "
            "peer, the peers do not share one --fallback-secret",
            client,
            self.unverified_marks,
        )

    def marked(self, head: bytes) -> bytes:
        """``head`` with this instance's mark added, to send to a peer, and a nonce of its
        own for the peer's answer that it did not serve it (see :meth:`unserved`)."""
        value = self._name + b" " + self.signature(self._name, request_line(head)).encode()
        nonce = secrets.token_hex(NONCE_BYTES).encode()
        head = _ANY_NONCE_LINE.sub(b"", head)  # a client's own would be the one signed
        return head[:-2] + HEADER + b": " + value + b"\r\n" + NONCE + b": " + nonce + b"\r\n\r\n"

    # -- peers ---------------------------------------------------------------------

    def candidates(self) -> list[PeerTarget]:
        """The peers to try for the next request, in order: those that did not refuse
        lately, in the given order rotated by one for each request, so that load spreads
        evenly over the peers that are up."""
        now = time.monotonic()
        peers = [p for p in self.peers if p.skip_until <= now]
        if not peers:
            return []
        start = self._turn % len(peers)
        self._turn += 1
        return peers[start:] + peers[:start]

    def refused(self, peer: PeerTarget) -> None:
        """``peer`` did not accept a connection: leave it out for a few seconds."""
        peer.skip_until = time.monotonic() + PEER_RETRY_AFTER

    # -- the local container --------------------------------------------------------

    def mark_down(self, container: Container, health_check_path: str) -> None:
        """``container`` refused a connection: requests that may fall back skip it until a
        health probe (one a second) answers 200 again."""
        container.down = True
        if container not in self._probes:
            task = asyncio.get_running_loop().create_task(
                self._probe_until_up(container, health_check_path)
            )
            self._probes[container] = task
            task.add_done_callback(lambda _: self._probes.pop(container, None))

    async def _probe_until_up(self, container: Container, path: str) -> None:
        while container.state == "serving":
            await asyncio.sleep(PROBE_INTERVAL)
            try:
                async with asyncio.timeout(PROBE_TIMEOUT):
                    status = await probe(container.host, container.port, path)
            except (OSError, TimeoutError):
                continue
            if status == 200:
                log.info(
                    "container %s answers its health check again: requests go to it",
                    container.container_id[:12],
                )
                break
        container.down = False

    def stop(self) -> None:
        """Stop the health probes (shutdown)."""
        for task in self._probes.values():
            task.cancel()

    # -- figures -------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """The ``fallback`` object of ``/status``."""
        now = time.monotonic()
        return {
            "instance": self.instance,
            "sent": sum(self.sent.values()),
            "received": sum(self.received.values()),
            "unplaced": self.unplaced,
            "unverified": self.unverified_marks,
            "by_peer": {"sent": dict(self.sent), "received": dict(self.received)},
            "peers": [
                {"url": p.url, "skipped_for": round(max(0.0, p.skip_until - now), 1)}
                for p in self.peers
            ],
        }


def request_line(head: bytes) -> bytes:
    """The request line of a head, without its CRLF."""
    return head[: head.find(b"\r\n")]


def unmarked(head: bytes) -> bytes:
    """``head`` without any ``X-Wunderproxy-Fallback`` field (a client's forgery)."""
    return _MARK_LINE.sub(b"", head)
