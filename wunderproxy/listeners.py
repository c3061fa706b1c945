"""Listening sockets that a new wunderproxy process can share with the old one.

A hitless restart runs two processes on the same addresses for a moment. Both listen with
``SO_REUSEPORT``; the kernel then spreads new connections over both. When the old process
closes its listener, connections still waiting in its accept queue are reset (this kernel
does not migrate them: ``net.ipv4.tcp_migrate_req`` is 0). So the new process, once it
serves, steers every *new* connection to its own socket with a one-instruction classic BPF
program on the port's reuseport group; the old one keeps accepting what is already queued
for a moment (:data:`ACCEPT_LINGER`), then closes. Nothing is reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import signal
import socket
import ssl
import stat
import struct
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from wunderproxy.accepted import AcceptedSocket
from wunderproxy.answers import TOO_MANY_CONNECTIONS, plain_response
from wunderproxy.config import Address

log = logging.getLogger("wunderproxy")

# Seconds a stopping process goes on accepting: handshakes that the kernel queued for it
# before a successor took the port over complete and are served, not reset.
ACCEPT_LINGER = 1.0

# linux/socket.h (asm-generic): attach a classic BPF program to a reuseport group.
SO_ATTACH_REUSEPORT_CBPF = 51
# linux/filter.h and linux/bpf_common.h: the instructions of the steering program.
_BPF_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS: A = the word at k (or ancillary data)
_BPF_ALU_MOD_K = 0x94  # BPF_ALU | BPF_MOD | BPF_K: A %= k
_BPF_ALU_ADD_K = 0x04  # BPF_ALU | BPF_ADD | BPF_K: A += k
_BPF_RET_A = 0x16  # BPF_RET | BPF_A: return A
_SKF_AD_OFF = -0x1000  # ancillary data starts here
_SKF_AD_RANDOM = 56  # a random 32-bit number
_TCP_LISTEN = "0A"  # the state column of /proc/net/tcp for a listening socket

ConnectionHandler = Callable[
    [asyncio.StreamReader, asyncio.StreamWriter], Coroutine[Any, Any, None]
]
ProtocolFactory = Callable[[], asyncio.Protocol]

BACKLOG = 4096  # a burst of a thousand new connections must not overflow the queue

# accept() failing for want of descriptors or kernel memory: the next call fails the same
# way until something is freed, so the listener pauses instead of trying again at once.
OUT_OF_RESOURCES = {
    errno.EMFILE: "this process has no file descriptor left",
    errno.ENFILE: "the host has no file descriptor left",
    errno.ENOBUFS: "the host is short of socket memory",
    errno.ENOMEM: "the host is short of memory",
}
# accept() failing for one queued connection only (accept(2): "Linux passes already-pending
# network errors on the new socket as an error code"): go on with the next one.
CONNECTION_ERRORS = frozenset(
    (
        errno.ECONNABORTED,
        errno.ECONNRESET,
        errno.EPROTO,
        errno.EPERM,  # a firewall rule refused it
        errno.ENETDOWN,
        errno.ENETUNREACH,
        errno.EHOSTDOWN,
        errno.EHOSTUNREACH,
        errno.ENOPROTOOPT,
        errno.EOPNOTSUPP,
        errno.ENONET,
    )
)
# Seconds between two tries to accept while out of resources: the first pause is short
# (a descriptor is often freed within milliseconds), later ones grow to the longest.
FIRST_PAUSE = 0.1
LONGEST_PAUSE = 1.0
# Seconds between two log lines about refused connections or failed accepts.
LOG_INTERVAL = 1.0
# Bytes of a refused connection's request dropped before closing it (see _refuse).
_DROP_BUFFER = 65536


class Listener(Protocol):
    """What the server needs of a listener: its sockets, and a way to stop it."""

    @property
    def sockets(self) -> Sequence[socket.socket]: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ConnectionLimit:
    """At most ``maximum`` client connections open at once; past it, new ones get a 503.

    ``count_open`` tells how many connections the factory built and are still open;
    ``refused`` is called for each connection refused.
    """

    maximum: int
    count_open: Callable[[], int]
    refused: Callable[[], None]


@dataclass(frozen=True, slots=True)
class TlsAccept:
    """How a TLS listener starts its connections.

    ``context`` is asked for each accepted connection, so that a reloaded certificate
    reaches new handshakes only; a handshake not done in ``handshake_timeout`` seconds is
    aborted, so that a client that never finishes one does not hold a socket for ever.
    """

    context: Callable[[], ssl.SSLContext]
    handshake_timeout: float


class Tally:
    """Counts one kind of event and reports it at most once per ``interval`` seconds.

    The first event is reported at once (count 1); later ones are added up and reported
    when the interval ends, until an interval passes without any.
    """

    def __init__(self, interval: float, report: Callable[[int], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._interval = interval
        self._report = report
        self._count = 0
        self._timer: asyncio.TimerHandle | None = None

    def add(self) -> None:
        self._count += 1
        if self._timer is None:
            self._flush()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _flush(self) -> None:
        if not self._count:
            self._timer = None
            return
        count, self._count = self._count, 0
        self._report(count)
        self._timer = self._loop.call_later(self._interval, self._flush)


class GreedyListener:
    """Accepts every connection waiting in the queue, each time it becomes readable.

    uvloop's own server accepts one connection per turn of the loop: a thousand clients
    connecting at once then wait behind a thousand turns, each busy with the requests of
    those already in, and their first requests time out.

    With a :class:`ConnectionLimit`, a connection past the limit is answered with a 503
    right here, without a protocol object or a read of its request (over TLS, it is closed:
    the client could not read a plain answer). With :class:`TlsAccept`, connections begin
    with a TLS handshake; one that fails or times out is closed, and the protocol that was
    built for it is told so, since asyncio never connects it. When accept fails for
    want of descriptors or memory, the listener stops watching its socket and tries again
    after a pause (:data:`FIRST_PAUSE` doubling up to :data:`LONGEST_PAUSE`): the socket
    stays readable all that time, and watching it would spin the loop.
    """

    def __init__(
        self,
        sock: socket.socket,
        factory: ProtocolFactory,
        limit: ConnectionLimit | None = None,
        tls: TlsAccept | None = None,
    ) -> None:
        self._sock = sock
        self._factory = factory
        self._limit = limit
        self._tls = tls
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[Any]] = set()
        # Accepted connections whose protocol the factory has not built yet: they count
        # toward the limit as much as open ones.
        self._starting = 0
        self._name = describe_socket(sock)
        self._family = sock.family
        self._tcp = self._family != socket.AF_UNIX
        self._pause = FIRST_PAUSE
        self._retry: asyncio.TimerHandle | None = None
        self._last_error: OSError | None = None
        self._refusal = b""
        if limit is not None and tls is None:
            self._refusal = plain_response(
                TOO_MANY_CONNECTIONS.status,
                f"{TOO_MANY_CONNECTIONS.message}: this proxy serves at most {limit.maximum} "
                "at once (--max-connections); try again shortly",
                close=True,
            )
        self._refused_log = Tally(LOG_INTERVAL, self._log_refused)
        self._failed_log = Tally(LOG_INTERVAL, self._log_failed)
        sock.setblocking(False)
        self._loop.add_reader(sock.fileno(), self._accept_all)

    @property
    def sockets(self) -> Sequence[socket.socket]:
        return [self._sock]

    def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self._refused_log.cancel()
        self._failed_log.cancel()
        if self._sock.fileno() != -1:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()

    def _accept_all(self) -> None:
        for _ in range(BACKLOG):
            try:
                # What socket.accept() does, but for the socket object it makes (see
                # accepted.py); _accept() is the C method it is built on.
                fd, peer = self._sock._accept()  # type: ignore[attr-defined]
                conn = AcceptedSocket(self._family, fd)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno in CONNECTION_ERRORS:
                    continue
                self._back_off(exc)  # out of resources, or an error we do not know: pause
                return
            if self._at_limit():
                self._refuse(conn)
            else:
                self._serve(conn, peer)
        self._pause = FIRST_PAUSE

    def _at_limit(self) -> bool:
        limit = self._limit
        return limit is not None and limit.count_open() + self._starting >= limit.maximum

    def _serve(self, conn: socket.socket, peer: Any) -> None:
        conn.setblocking(False)
        if self._tcp:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        built: asyncio.Protocol | None = None

        def factory() -> asyncio.Protocol:
            nonlocal built
            self._starting -= 1
            built = self._factory()
            return built

        def started(task: asyncio.Task[Any]) -> None:
            self._tasks.discard(task)
            failure = None if task.cancelled() else task.exception()
            if built is None:  # failed or cancelled before the factory ran
                self._starting -= 1
            elif failure is not None:
                # The TLS handshake failed (a scanner, an old client, plain HTTP on the TLS
                # port) or timed out: asyncio closed the socket, and never tells the protocol
                # it built, which would count the connection as open for ever.
                what = "TLS handshake" if self._tls is not None else "connection"
                log.debug("%s: %s with %s failed: %s", self._name, what, _peer(peer), failure)
                built.connection_lost(failure if isinstance(failure, Exception) else None)

        self._starting += 1
        tls = self._tls
        if tls is None:
            connecting = self._loop.connect_accepted_socket(factory, conn)
        else:
            connecting = self._loop.connect_accepted_socket(
                factory, conn, ssl=tls.context(), ssl_handshake_timeout=tls.handshake_timeout
            )
        task = self._loop.create_task(connecting)
        self._tasks.add(task)
        task.add_done_callback(started)

    def _refuse(self, conn: socket.socket) -> None:
        """Answer 503 and close, without reading the request.

        Closing a socket with unread bytes makes the kernel send a reset, which can make
        the client lose the answer: so the 503 goes out with a FIN first, and whatever the
        client has sent by then is dropped unread before the close. (Bytes that arrive
        later still draw a reset, but the client has the whole answer by then.)

        Over TLS the connection is only closed: a 503 would cost a handshake, the very
        work an overloaded proxy must not take on, and plain bytes mean nothing to a TLS
        client.
        """
        assert self._limit is not None
        self._limit.refused()
        self._refused_log.add()
        if self._tls is not None:
            conn.close()
            return
        with contextlib.suppress(OSError), conn:
            conn.send(self._refusal, socket.MSG_DONTWAIT)
            conn.shutdown(socket.SHUT_WR)
            conn.recv(_DROP_BUFFER, socket.MSG_DONTWAIT)

    def _back_off(self, exc: OSError) -> None:
        self._last_error = exc
        self._failed_log.add()
        self._loop.remove_reader(self._sock.fileno())
        self._retry = self._loop.call_later(self._pause, self._resume)
        self._pause = min(self._pause * 2, LONGEST_PAUSE)

    def _resume(self) -> None:
        self._retry = None
        if self._sock.fileno() == -1:
            return
        self._loop.add_reader(self._sock.fileno(), self._accept_all)
        self._accept_all()  # the socket may have been readable all along

    def _log_refused(self, count: int) -> None:
        assert self._limit is not None
        log.warning(
            "%s: refused %d new connection(s) %s: %d open, the most allowed (--max-connections %d)",
            self._name,
            count,
            "by closing them" if self._tls is not None else "with 503",
            self._limit.count_open() + self._starting,
            self._limit.maximum,
        )

    def _log_failed(self, count: int) -> None:
        exc = self._last_error
        code = exc.errno if exc is not None else None
        reason = OUT_OF_RESOURCES.get(code or 0, "unexpected error")
        advice = (
            "raise the open-file limit (LimitNOFILE= in the systemd unit, ulimit -n) or "
            "lower --max-connections"
            if code in (errno.EMFILE, errno.ENFILE)
            else "free memory on the host or lower --max-connections"
        )
        log.warning(
            "%s: cannot accept connections (%s: %s; %d failure(s) since the last report); "
            "new clients wait in the kernel's queue, retrying every %g s at most; %s",
            self._name,
            reason,
            exc,
            count,
            LONGEST_PAUSE,
            advice,
        )


async def listen(
    address: Address,
    factory: ProtocolFactory,
    limit: ConnectionLimit | None = None,
    tls: TlsAccept | None = None,
) -> Listener:
    """Listen on a TCP address (shareable with a successor) or a Unix socket path."""
    return GreedyListener(bind(address), factory, limit, tls)


def bind(address: Address, listening: bool = True) -> socket.socket:
    """A listening socket on a TCP address (``SO_REUSEPORT``: shareable with a successor
    and with sibling workers) or a Unix socket path.

    A TCP one only bound without ``listening``: it joins the port's reuseport group, and the
    kernel queues connections for it, only once :func:`start_listening` is called on it (by
    the worker it was made for, once that worker can serve them). A Unix one always listens.
    """
    if address.path is not None:
        return _unix_socket(address.path)
    family = socket.AF_INET6 if ":" in (address.host or "") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((address.host or "0.0.0.0", address.port or 0))
        if listening:
            start_listening(sock)
    except OSError:
        sock.close()
        raise
    return sock


def start_listening(sock: socket.socket) -> None:
    """Listen on a socket :func:`bind` made without ``listening`` (a listening one is left
    as it is)."""
    sock.listen(BACKLOG)


def _unix_socket(path: str) -> socket.socket:
    """A listening Unix socket at ``path``; a socket file left there before is replaced
    (as asyncio's own Unix server does), any other file is left alone and refused."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.remove(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def describe_socket(sock: socket.socket) -> str:
    """How the log names a listening socket: its address, or unix:PATH."""
    name = sock.getsockname()
    if isinstance(name, tuple):
        return f"{name[0]}:{name[1]}"
    return f"unix:{name}"


def _peer(address: Any) -> str:
    """How the log names a client: host:port (or a Unix socket's peer as it comes)."""
    if isinstance(address, tuple):
        return f"{address[0]}:{address[1]}"
    return str(address) or "a Unix socket peer"


def streams(handler: ConnectionHandler) -> ProtocolFactory:
    """A protocol factory serving each connection with ``handler`` on asyncio streams."""

    def factory() -> asyncio.Protocol:
        return asyncio.StreamReaderProtocol(asyncio.StreamReader(), handler)

    return factory


def take_new_connections(server: Listener) -> None:
    """Steer every new connection on this port to this process's listener (see
    :func:`steer_to_newest`)."""
    for sock in server.sockets:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            steer_to_newest(sock, 1)


def steer_to_newest(sock: socket.socket, count: int) -> None:
    """Steer every new connection on ``sock``'s port to the ``count`` sockets that joined
    its reuseport group last (this process tree's), spread at random over them.

    Sockets join a reuseport group in the order they start listening, and a closing one is
    replaced by the last: with ``old`` sockets of a predecessor listening, ours are indices
    ``old`` to ``old + count - 1``. Once the predecessor's sockets are gone, ours move into
    the slots below: with ``count`` 1 the index left does not exist and the kernel falls back
    to our one socket, but with more, some of the indices stay valid and take more than their
    share (1 to 2: 75/25). So once the predecessor is gone, :func:`spread_evenly`.
    """
    _steer(sock, max(0, listening_sockets(sock.getsockname()) - count), count)


def spread_evenly(sock: socket.socket, count: int) -> None:
    """Spread new connections on ``sock``'s port evenly over the ``count`` sockets of its
    reuseport group, once no predecessor's socket is left before them (the kernel refuses
    to detach the steering program here: EINVAL, so it is replaced). With fewer sockets
    for a while (a worker being restarted), an index that does not exist falls back to the
    kernel's own spreading over those that do."""
    _steer(sock, 0, count)


def _steer(sock: socket.socket, old: int, count: int) -> None:
    program = ctypes.create_string_buffer(steering_program(old, count))
    fprog = struct.pack("@HP", 4, ctypes.addressof(program))  # struct sock_fprog
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
    except OSError as exc:
        log.warning("cannot steer new connections to this process: %s", exc)


def steering_program(old: int, count: int) -> bytes:
    """The classic BPF program ``A = random; A %= count; A += old; return A``: the index in
    the reuseport group of one of the ``count`` sockets after the first ``old``."""
    instructions = (
        (_BPF_LD_W_ABS, _SKF_AD_OFF + _SKF_AD_RANDOM),
        (_BPF_ALU_MOD_K, count),
        (_BPF_ALU_ADD_K, old),
        (_BPF_RET_A, 0),
    )
    return b"".join(struct.pack("HBBI", code, 0, 0, k & 0xFFFFFFFF) for code, k in instructions)


def listening_sockets(address: Any) -> int:
    """How many TCP sockets listen on ``address`` (``(host, port, ...)``), as the kernel
    lists them in /proc/net/tcp or tcp6 (this network namespace's, every process's)."""
    return len(listening_inodes(address))


def listening_inodes(address: Any) -> set[int]:
    """The inodes (``os.fstat(sock.fileno()).st_ino``) of the TCP sockets that listen on
    ``address``: which of them are whose.

    It reads the whole table, a line per socket of the host: fine once at a take-over, but
    a caller that asks again and again does so off the event loop (see supervisor.py)."""
    host, port = address[0].partition("%")[0], address[1]  # fe80::1%eth0: the table has no zone
    if ":" in host:
        words = struct.unpack("=4I", socket.inet_pton(socket.AF_INET6, host))
        table, local = "/proc/net/tcp6", "".join(f"{w:08X}" for w in words)
    else:
        (word,) = struct.unpack("=I", socket.inet_aton(host))
        table, local = "/proc/net/tcp", f"{word:08X}"
    wanted = f"{local}:{port:04X}"
    try:
        lines = Path(table).read_text().splitlines()[1:]
    except OSError:
        return set()
    return {
        int(fields[9])
        for line in lines
        if (fields := line.split())[1] == wanted and fields[3] == _TCP_LISTEN
    }


class PidFile:
    """The PID file of ``--pid-file``; with ``--take-over``, the predecessor named in it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.predecessor = self._running_wunderproxy()

    def write(self) -> None:
        """Record this process (atomically: a reader never sees half a PID)."""
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        temporary.write_text(f"{os.getpid()}\n")
        temporary.replace(self.path)

    def remove(self) -> None:
        """Remove the file if it still names this process."""
        if self._read() == os.getpid():
            self.path.unlink(missing_ok=True)

    def stop_predecessor(self) -> None:
        """SIGTERM the wunderproxy the file named when this process started."""
        pid = self.predecessor
        if pid is None or pid == os.getpid():
            return
        log.info("taking over from wunderproxy PID %d: sending it SIGTERM", pid)
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            log.info("wunderproxy PID %d had already exited", pid)

    def _read(self) -> int | None:
        try:
            return int(self.path.read_text().strip())
        except (OSError, ValueError):
            return None

    def _running_wunderproxy(self) -> int | None:
        """The PID in the file, if that process runs and is a wunderproxy (not a reused PID)."""
        pid = self._read()
        if pid is None:
            return None
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        return pid if b"wunderproxy" in command else None
