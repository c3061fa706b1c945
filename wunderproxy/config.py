"""Settings of one wunderproxy process, with the defaults and why they are what they are."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from wunderproxy.streams import is_loopback

# Where the proxy and the manager listen (SPEC "Command line").
DEFAULT_PROXY = "0.0.0.0:80"
DEFAULT_API = "0.0.0.0:8001"
DEFAULT_REGISTRY_PORT = 8080
DEFAULT_API_URL = "http://127.0.0.1:8001"

# Seconds a new container has to answer its health check; apps that load a lot at boot
# (Rails, JVMs) take tens of seconds.
DEFAULT_HEALTH_TIMEOUT = 60.0
# Seconds requests in flight on a replaced container may take before it is stopped anyway.
DEFAULT_DRAIN_TIMEOUT = 30.0
# Seconds Docker waits after SIGTERM before SIGKILL when a drained container is stopped.
DEFAULT_STOP_TIMEOUT = 10
# Seconds an idle keep-alive client connection is kept open. Longer than the 60 s that
# nginx keeps idle upstream connections, so that the peer in front closes first and never
# sends a request on a connection we are closing.
DEFAULT_KEEPALIVE_TIMEOUT = 75.0
# Seconds SIGTERM waits for requests in flight before the process exits anyway.
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
# Most proxy worker processes --workers takes: more than a host's cores only adds memory
# and context switches, and no host this runs on has more than a few dozen.
MAX_WORKERS = 64


def default_workers() -> int:
    """Proxy worker processes when --workers is not given: one per CPU this process may
    run on (its affinity mask, which a container's or systemd's CPU set narrows)."""
    return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))


# The edge: timeouts and limits that keep one client or one container from holding the
# proxy. nginx's defaults are the reference; where ours differ, the comment says why.
#
# Seconds a request head may take from its first byte to its blank line, however slowly it
# trickles (nginx client_header_timeout, 60 s). Half of nginx's: a real client sends its
# head in one packet, and every second granted is a second a slowloris holds a socket.
DEFAULT_HEADER_TIMEOUT = 30.0
# Longest gap in seconds between two reads of a request body (nginx client_body_timeout).
DEFAULT_BODY_TIMEOUT = 60.0
# Seconds to connect to the container (nginx proxy_connect_timeout, 60 s). The container
# is on this host: a connect takes milliseconds, and one that takes seconds will not come.
DEFAULT_CONNECT_TIMEOUT = 5.0
# Longest wait in seconds for the container's next byte while an answer is due (nginx
# proxy_read_timeout).
DEFAULT_UPSTREAM_TIMEOUT = 60.0
# Seconds a client may read nothing of its answer before it is closed (nginx send_timeout).
DEFAULT_SEND_TIMEOUT = 60.0
# Bytes a request head may have (nginx large_client_header_buffers 4 x 8k, so 8 KiB per
# line; h11's whole-head default is 16 KiB, which we keep: it is what the proxy held so far).
DEFAULT_MAX_HEADER_SIZE = 16 * 1024
# Bytes a request body may have: no limit (nginx client_max_body_size, 1 MiB). The app
# knows what its uploads may weigh; a proxy-wide limit that is too low breaks it silently.
DEFAULT_MAX_BODY_SIZE: int | None = None


# The front door: what the proxy does for a host with no nginx in front. All of it is off by
# default, for the host behind an nginx: the bytes then pass untouched.
#
# Seconds between two looks at --tls-cert and --tls-key for a renewed certificate (certbot
# and ACME clients renew days ahead; a few seconds' delay costs nothing).
TLS_RELOAD_INTERVAL = 5.0
ForwardedMode = Literal["off", "append", "replace"]
FORWARDED_MODES: tuple[ForwardedMode, ...] = ("off", "append", "replace")

# What the proxy says of the client in X-Forwarded-* and Forwarded: nothing (an nginx in
# front already did, and the bytes pass untouched).
DEFAULT_FORWARDED: ForwardedMode = "off"
# Bytes of one buffered request or answer held in memory before the rest goes to a
# temporary file (nginx client_body_buffer_size is 16 KiB, proxy_buffers 8 x 8 KiB; ours
# is larger since most answers of an app fit in 1 MiB and a file costs system calls).
DEFAULT_BUFFER_MEMORY = 1024 * 1024
# Where buffered bodies larger than --buffer-memory go: the system's temporary directory.
DEFAULT_BUFFER_DIR = Path(tempfile.gettempdir())
# Media types worth compressing: text, and the text formats that do not say text/.
DEFAULT_COMPRESS_TYPES = (
    "text/*",
    "application/json",
    "application/*+json",
    "application/javascript",
    "application/xml",
    "application/*+xml",
    "image/svg+xml",
    "application/wasm",
)
# Bytes below which an answer is sent as it is: compressing a few hundred bytes saves less
# than the encoding's own framing and the CPU it costs (nginx gzip_min_length is 20; 1 KiB
# is what most CDNs use).
DEFAULT_COMPRESS_MIN_SIZE = 1024
# The encodings --compress offers, best first (used when the client's q-values tie).
COMPRESS_ENCODINGS = ("zstd", "br", "gzip")


@dataclass(frozen=True)
class Tls:
    """The TLS listener of ``--proxy-tls``: where, with which certificate and key."""

    address: Address
    cert: Path
    key: Path
    redirect_http: bool = False  # the plain listener answers 308 to https://


# What --compress-types takes: type/subtype, type/*, type/*+suffix, or */* (RFC 6838 names).
_MEDIA_NAME = r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*"
_MEDIA_RANGE = re.compile(rf"\*/\*|{_MEDIA_NAME}/(?:\*|\*\+{_MEDIA_NAME}|{_MEDIA_NAME})")


@dataclass(frozen=True, slots=True)
class Front:
    """What the proxy changes in the bytes it forwards (all off: they pass untouched).

    ``forwarded``: how X-Forwarded-For and friends are set; ``buffer_requests`` and
    ``buffer_responses``: read a whole body before passing it on, in memory up to
    ``buffer_memory`` bytes, beyond that in a file under ``buffer_dir``; ``compress``: the
    encodings offered (none: off), for answers of ``compress_types`` of at least
    ``compress_min_size`` bytes; ``keep_upstream``: a client's ``Connection: close`` is
    taken out of the head sent to the container, so that its connection is kept.
    """

    forwarded: ForwardedMode = DEFAULT_FORWARDED
    buffer_requests: bool = False
    buffer_responses: bool = False
    buffer_memory: int = DEFAULT_BUFFER_MEMORY
    buffer_dir: Path = DEFAULT_BUFFER_DIR
    compress: tuple[str, ...] = ()
    compress_types: tuple[str, ...] = DEFAULT_COMPRESS_TYPES
    compress_min_size: int = DEFAULT_COMPRESS_MIN_SIZE
    keep_upstream: bool = False

    def __post_init__(self) -> None:
        if self.compress and not self.compress_types:
            raise ConfigError("--compress-types is empty: --compress would compress nothing")
        for media_range in self.compress_types:
            if _MEDIA_RANGE.fullmatch(media_range) is None:
                raise ConfigError(
                    f"--compress-types: {media_range!r} is not a media type; use type/subtype, "
                    "type/* or type/*+suffix (e.g. text/*, application/*+json)"
                )

    def describe(self) -> dict[str, Any]:
        """The ``features`` of ``/status`` that these settings decide."""
        return {
            "forwarded": self.forwarded,
            "buffer_requests": self.buffer_requests,
            "buffer_responses": self.buffer_responses,
            "buffer_memory": self.buffer_memory,
            "compress": list(self.compress),
            "keep_upstream": self.keep_upstream,
        }


def check_buffer_dir(directory: Path) -> None:
    """Check that buffered bodies can go to files under ``directory`` (``--buffer-dir``),
    by making one there (and letting go of it): ConfigError saying what to do if not.

    Called at start-up when either buffering is on, so that an operator learns of a
    missing or read-only directory then, not from the first large upload or download.
    """
    try:
        tempfile.TemporaryFile(dir=directory, prefix="wunderproxy-").close()
    except OSError as exc:
        raise ConfigError(
            f"--buffer-dir {directory} cannot hold temporary files ({exc.strerror or exc}): "
            "create it, or name a writable directory with --buffer-dir "
            "(bodies over --buffer-memory go there)"
        ) from exc


_INSTANCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

# Seconds a peer that refused a fallback request is skipped before it is tried again.
PEER_RETRY_AFTER = 5.0


def default_instance() -> str:
    """This process's instance name when none is given: the host name."""
    return socket.gethostname()


class ConfigError(Exception):
    """A setting is unusable; the message names it and says how to fix it."""


@dataclass(frozen=True)
class Address:
    """A listening address: TCP ``host:port`` or a Unix socket path."""

    host: str | None = None
    port: int | None = None
    path: str | None = None

    @classmethod
    def parse(cls, text: str, option: str) -> Address:
        """Parse ``HOST:PORT``, ``:PORT``, ``[V6]:PORT`` or ``unix:PATH``."""
        if text.startswith("unix:"):
            path = text.removeprefix("unix:")
            if not path:
                raise ConfigError(f"{option} {text!r}: give a socket path after 'unix:'")
            return cls(path=path)
        host, sep, port_text = text.rpartition(":")
        if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
            raise ConfigError(
                f"{option} {text!r} is not HOST:PORT or unix:PATH (for example 0.0.0.0:80)"
            )
        host = host.removeprefix("[").removesuffix("]") or "0.0.0.0"
        return cls(host=host, port=int(port_text))

    @property
    def is_loopback_only(self) -> bool:
        """True when only this host can connect (loopback address or Unix socket)."""
        return is_loopback(None if self.path is not None else self.host)

    @property
    def takes_loopback_tcp(self) -> bool:
        """True when a process on this host can connect over TCP from 127.0.0.1 or ::1: a
        loopback address, or every address (0.0.0.0, ::). A Unix socket is not reached so."""
        if self.path is not None or self.host is None:
            return False
        with contextlib.suppress(ValueError):
            if ipaddress.ip_address(self.host.partition("%")[0]).is_unspecified:
                return True
        return is_loopback(self.host)

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class Peer:
    """Another wunderproxy's proxy address, where requests fall back (``--peer``)."""

    url: str  # as shown in /status and /metrics: http://HOST:PORT
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Peer:
        """Parse ``http://HOST:PORT`` (port 80 when left out)."""
        parts = urlsplit(text.strip())
        try:
            port = parts.port or 80
        except ValueError:
            port = 0
        if (
            parts.scheme != "http"
            or not parts.hostname
            or not port
            or parts.path not in ("", "/")
            or parts.query
            or parts.username
        ):
            raise ConfigError(
                f"--peer {text!r} is not a peer's proxy address; give http://HOST:PORT "
                "(for example http://10.0.0.2:80)"
            )
        host = parts.hostname
        shown = f"[{host}]" if ":" in host else host
        return cls(url=f"http://{shown}:{port}", host=host, port=port)


@dataclass(frozen=True)
class Fleet:
    """This process among its peers: its name, and where requests fall back.

    ``secret`` keys the HMAC of the ``X-Wunderproxy-Fallback`` header; with it set, a
    request carrying a valid header is served here and never sent on, and a header with a
    wrong signature is removed. Peers need it.
    """

    instance: str = field(default_factory=default_instance)
    peers: tuple[Peer, ...] = ()
    secret: bytes | None = None

    def __post_init__(self) -> None:
        if _INSTANCE_NAME.fullmatch(self.instance) is None:
            raise ConfigError(
                f"--instance {self.instance!r}: give a name of ASCII letters, digits, '.', "
                "'_' and '-', such as web-1 (it goes into a header and a Docker label)"
            )
        if self.peers and not self.secret:
            raise ConfigError(
                "--peer needs --fallback-secret (or WUNDERPROXY_FALLBACK_SECRET): peers "
                "only accept fallback requests signed with the secret they share"
            )


@dataclass(frozen=True, slots=True)
class Edge:
    """Timeouts (seconds) and limits (bytes, connections) at the proxy's edge.

    ``max_connections`` None means: derived from the open-file limit at start-up.
    """

    keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    upstream_timeout: float = DEFAULT_UPSTREAM_TIMEOUT
    send_timeout: float = DEFAULT_SEND_TIMEOUT
    max_header_size: int = DEFAULT_MAX_HEADER_SIZE
    max_body_size: int | None = DEFAULT_MAX_BODY_SIZE
    max_connections: int | None = None


@dataclass(frozen=True)
class Config:
    """Everything ``wunderproxy run`` was told."""

    bucket: str
    prefix: str
    app: str
    proxy: Address | None  # None: only --proxy-tls
    api: Address
    registry_port: int = DEFAULT_REGISTRY_PORT
    env: tuple[str, ...] = ()
    api_token: str | None = None
    health_timeout: float = DEFAULT_HEALTH_TIMEOUT
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    stop_timeout: int = DEFAULT_STOP_TIMEOUT
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    edge: Edge = field(default_factory=Edge)
    fleet: Fleet = field(default_factory=Fleet)
    tls: Tls | None = None
    front: Front = field(default_factory=Front)
    # Proxy worker processes; 1: the manager's own process proxies too, as one process.
    workers: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ConfigError(f"--workers {self.workers}: give 1 to {MAX_WORKERS}")
        if self.proxy is None and self.tls is None:
            raise ConfigError("--proxy none needs --proxy-tls: the proxy must listen somewhere")
        if self.tls is not None and self.tls.redirect_http and self.proxy is None:
            raise ConfigError(
                "--redirect-http needs a plain --proxy address to answer on (not none)"
            )
        if self.tls is not None and self.tls.redirect_http and self.tls.address.path is not None:
            raise ConfigError(
                "--redirect-http sends clients to the port of --proxy-tls: give it as "
                "HOST:PORT, not unix:PATH"
            )

    @property
    def repository(self) -> str:
        """The local registry repository of this app's images."""
        return f"localhost:{self.registry_port}/{self.app}"


def read_env_file(path: Path) -> tuple[str, ...]:
    """Read ``KEY=VALUE`` lines; blank lines and ``#`` comments are skipped.

    Any other line is refused with the file and line number, so a typo stops start-up
    instead of silently reaching the app.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config-file {path}: cannot read it: {exc}") from exc
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        key, sep, _ = stripped.partition("=")
        if not sep or not key or not key.replace("_", "a").isalnum() or key[0].isdigit():
            raise ConfigError(
                f"{path}:{number}: expected KEY=VALUE (KEY of letters, digits and _), "
                f"got {line.strip()[:60]!r}"
            )
        entries.append(stripped)
    return tuple(entries)
