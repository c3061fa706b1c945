"""Settings of one wunderproxy process, with the defaults and why they are what they are."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class Config:
    """Everything ``wunderproxy run`` was told."""

    bucket: str
    prefix: str
    app: str
    proxy: Address
    api: Address
    registry_port: int = DEFAULT_REGISTRY_PORT
    env: tuple[str, ...] = ()
    api_token: str | None = None
    health_timeout: float = DEFAULT_HEALTH_TIMEOUT
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    stop_timeout: int = DEFAULT_STOP_TIMEOUT
    keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT

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
