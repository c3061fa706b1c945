"""wunderproxy's proxy, in front of a fixed upstream instead of a Docker container.

    python3 benchmarks/proxy_only.py --listen 127.0.0.1:8000 --upstream 127.0.0.1:9000 \
        [--header-timeout 5 ...]

The benchmarks compare proxies in front of the same fast backend (nginx), where a
container would add Docker's own proxy to every row. The front-door options (TLS, forwarded
headers, buffering, compression) are named as ``wunderproxy run`` names them. This runs the
production :class:`~wunderproxy.server.Server` (listeners, forwarder, framing, counters) with the
upstream installed as the serving container; the manager answers too, on ``--api``.
Every field of :class:`~wunderproxy.config.Edge` is an option named as ``wunderproxy run``
names it (``--header-timeout``, ``--max-header-size``, ...), with the same default, and so
are ``--forwarded``, the ``--buffer-*`` options, ``--keep-upstream`` and ``--compress``
(with the default types and minimum size).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wunderproxy import config as defaults
from wunderproxy.accesslog import ACCESS_LOG_FORMATS, AccessLog
from wunderproxy.compression import available_encodings
from wunderproxy.config import Address, Config, Edge, Front, Tls
from wunderproxy.engine import ContainerRecord, ContainerSpec, StartedContainer
from wunderproxy.errors import UpstreamFailed
from wunderproxy.launchconfig import md5_hex, parse_launch_config
from wunderproxy.runtime import run_event_loop
from wunderproxy.server import Server
from wunderproxy.state import Container


class NoStore:
    """An empty store: nothing to launch at start-up."""

    description = "none://"

    def get(self, key: str) -> bytes | None:
        return None

    def put(self, key: str, data: bytes) -> None:
        raise UpstreamFailed("this benchmark proxy has no store")

    def create(self, key: str, data: bytes) -> bool:
        raise UpstreamFailed("this benchmark proxy has no store")

    def delete(self, key: str, expected: bytes) -> bool:
        raise UpstreamFailed("this benchmark proxy has no store")

    def replace(self, key: str, expected: bytes, data: bytes) -> bool:
        raise UpstreamFailed("this benchmark proxy has no store")


class NoEngine:
    """No Docker: the upstream is fixed."""

    def ensure_image(self, image: str) -> None:
        raise UpstreamFailed("this benchmark proxy has no engine")

    def start(self, spec: ContainerSpec) -> StartedContainer:
        raise UpstreamFailed("this benchmark proxy has no engine")

    def ping(self) -> None:
        return None

    def status(self, container_id: str) -> str:
        return "running"

    def logs(self, container_id: str, tail: int = 20) -> str:
        return ""

    def remove(self, container_id: str, stop_timeout: int) -> None:
        return None

    def remove_images(self, repository: str, keep: set[str]) -> list[str]:
        return []

    def list_containers(self, labels: dict[str, str]) -> list[ContainerRecord]:
        return []

    def deaths(self, labels: dict[str, str], since: int | None = None) -> NoDeaths:
        return NoDeaths()


class NoDeaths:
    """No container ever dies here: a stream that yields nothing until closed."""

    def __init__(self) -> None:
        self._closed = threading.Event()

    def __iter__(self) -> Iterator[tuple[str, int | None]]:
        self._closed.wait()
        yield from ()

    def close(self) -> None:
        self._closed.set()


def add_edge_options(parser: argparse.ArgumentParser) -> None:
    """An option per :class:`Edge` field, typed as its default (a None default: bytes or
    connections, so an integer), defaulting to Edge's own."""
    for setting in dataclasses.fields(Edge):
        default = setting.default
        parser.add_argument(
            "--" + setting.name.replace("_", "-"),
            type=int if default is None else type(default),
            default=default,
            help=f"as wunderproxy run's (default {default})",
        )


def edge_from(args: argparse.Namespace) -> Edge:
    """The :class:`Edge` that the options of :func:`add_edge_options` say."""
    return Edge(
        **{setting.name: getattr(args, setting.name) for setting in dataclasses.fields(Edge)}
    )


def add_front_options(parser: argparse.ArgumentParser) -> None:
    """The TLS listener and the front-door features, as ``wunderproxy run`` has them."""
    parser.add_argument("--proxy-tls", help="also serve HTTPS here, HOST:PORT")
    parser.add_argument("--tls-cert", type=Path)
    parser.add_argument("--tls-key", type=Path)
    parser.add_argument("--forwarded", default="off", choices=defaults.FORWARDED_MODES)
    parser.add_argument("--buffer-requests", action="store_true")
    parser.add_argument("--buffer-responses", action="store_true")
    parser.add_argument("--buffer-memory", type=int, default=defaults.DEFAULT_BUFFER_MEMORY)
    parser.add_argument("--buffer-dir", type=Path, default=defaults.DEFAULT_BUFFER_DIR)
    parser.add_argument("--compress", action="store_true")
    parser.add_argument("--keep-upstream", action="store_true")


def tls_from(args: argparse.Namespace) -> Tls | None:
    """The TLS listener of :func:`add_front_options`, if one was asked for."""
    if args.proxy_tls is None:
        return None
    return Tls(Address.parse(args.proxy_tls, "--proxy-tls"), args.tls_cert, args.tls_key)


def front_from(args: argparse.Namespace) -> Front:
    """The :class:`Front` that the options of :func:`add_front_options` say."""
    return Front(
        forwarded=args.forwarded,
        buffer_requests=args.buffer_requests,
        buffer_responses=args.buffer_responses,
        buffer_memory=args.buffer_memory,
        buffer_dir=args.buffer_dir,
        compress=available_encodings() if args.compress else (),
        keep_upstream=args.keep_upstream,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="proxy address HOST:PORT")
    parser.add_argument("--api", default="127.0.0.1:0", help="manager address HOST:PORT")
    parser.add_argument("--upstream", required=True, help="backend address HOST:PORT")
    parser.add_argument("--loop", default="auto", choices=["auto", "asyncio", "uvloop"])
    parser.add_argument("--access-log", help="write one line per request here (- for stdout)")
    parser.add_argument("--access-log-format", default="common", choices=ACCESS_LOG_FORMATS)
    add_edge_options(parser)
    add_front_options(parser)
    args = parser.parse_args()
    if args.buffer_requests or args.buffer_responses:
        defaults.check_buffer_dir(args.buffer_dir)
    logging.basicConfig(level=logging.WARNING)
    host, _, port = args.upstream.rpartition(":")
    raw = json.dumps({"Revision": "bench", "HealthCheckPath": "/"}).encode()
    config = Config(
        bucket="none",
        prefix="bench",
        app="bench",
        proxy=Address.parse(args.listen, "--listen"),
        api=Address.parse(args.api, "--api"),
        edge=edge_from(args),
        tls=tls_from(args),
        front=front_from(args),
    )
    access_log = AccessLog(args.access_log, args.access_log_format) if args.access_log else None
    server = Server(config, NoStore(), NoEngine(), access_log=access_log)
    upstream = Container(
        config=parse_launch_config(raw, md5_hex(raw)),
        image="none",
        container_id="upstream",
        host=host,
        port=int(port),
        started_at=datetime.now(UTC),
    )
    server.state.add(upstream)
    server.state.switch_to(upstream)
    run_event_loop(server.run(), args.loop)


if __name__ == "__main__":
    main()
