"""The ``wunderproxy`` command: ``run`` the proxy and manager, or talk to a running one.

Options become a :class:`~wunderproxy.config.Config`; no logic lives here.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from wunderproxy import __version__
from wunderproxy import config as defaults
from wunderproxy.accesslog import ACCESS_LOG_FORMATS, AccessLog, AccessLogFormat
from wunderproxy.client import ClientError, ManagerClient, api_address, deployer
from wunderproxy.compression import available_encodings
from wunderproxy.config import (
    Address,
    Config,
    ConfigError,
    Edge,
    Fleet,
    Front,
    Peer,
    Tls,
    check_buffer_dir,
    default_instance,
    read_env_file,
)
from wunderproxy.deploylock import DEFAULT_LOCK_TTL, DeployLock, LockError
from wunderproxy.errors import WunderproxyError
from wunderproxy.fleetdeploy import (
    DeployFailed,
    FleetDeploy,
    abort_fleet,
    locked,
    rollback_target,
)
from wunderproxy.fleetview import fleet_status, history_table
from wunderproxy.hosts import FleetError, Host, find_store
from wunderproxy.runtime import LoopChoice, run_event_loop

if TYPE_CHECKING:
    from wunderproxy.certificates import Certificates
    from wunderproxy.store import Store

# A timeout: a positive number of seconds.
_SECONDS = click.FloatRange(min=0, min_open=True)

T = TypeVar("T")


class _CommaSeparated(click.ParamType[T]):
    """A repeatable option whose env var lists its values comma-separated."""

    def split_envvar_value(self, rv: str) -> list[str]:
        return [item.strip() for item in rv.split(",") if item.strip()]


class _ApiURL(_CommaSeparated[str]):
    """A manager's ``http://HOST:PORT`` (or ``HOST:PORT``)."""

    name = "API_URL"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            api_address(str(value))
        except ValueError as exc:
            self.fail(f"{value!r}: {exc}", param, ctx)
        return str(value)


class _PeerURL(_CommaSeparated[Peer]):
    """A peer's ``http://HOST:PORT``; its env var lists them comma-separated."""

    name = "URL"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Peer:
        if isinstance(value, Peer):
            return value
        try:
            return Peer.parse(str(value))
        except ConfigError as exc:
            self.fail(str(exc), param, ctx)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="wunderproxy")
def main() -> None:
    """Zero-downtime front door for a Docker app: a proxy and a deploy manager.

    `wunderproxy run` serves; `status`, `launch` and `switch` talk to a running one;
    `upload`, `deploy`, `rollback`, `history` and `abort` work on a whole fleet.
    """


@main.command()
@click.argument("bucket")
@click.argument("prefix")
@click.argument("app")
@click.option(
    "--proxy",
    envvar="WUNDERPROXY_PROXY",
    default=defaults.DEFAULT_PROXY,
    help="Where the proxy listens: HOST:PORT or unix:PATH; none for only --proxy-tls.",
)
@click.option(
    "--proxy-tls",
    envvar="WUNDERPROXY_PROXY_TLS",
    metavar="HOST:PORT",
    help="Also (or, with --proxy none, only) serve HTTPS here, e.g. 0.0.0.0:443; needs "
    "--tls-cert and --tls-key. Off by default.",
)
@click.option(
    "--tls-cert",
    envvar="WUNDERPROXY_TLS_CERT",
    type=click.Path(dir_okay=False, path_type=Path),
    help="PEM certificate of --proxy-tls, its chain after it; reloaded on SIGHUP and when "
    "the file changes.",
)
@click.option(
    "--tls-key",
    envvar="WUNDERPROXY_TLS_KEY",
    type=click.Path(dir_okay=False, path_type=Path),
    help="PEM private key of --tls-cert.",
)
@click.option(
    "--redirect-http",
    envvar="WUNDERPROXY_REDIRECT_HTTP",
    is_flag=True,
    help="The plain --proxy port answers every request 308 to the same URL on https://.",
)
@click.option(
    "--forwarded",
    envvar="WUNDERPROXY_FORWARDED",
    type=click.Choice(defaults.FORWARDED_MODES),
    default=defaults.DEFAULT_FORWARDED,
    help="off: pass X-Forwarded-* untouched (an nginx in front sets them); append: add the "
    "client to X-Forwarded-For; replace (facing the internet): drop what the client sent "
    "and set X-Forwarded-For, -Proto, -Host and Forwarded.",
)
@click.option(
    "--buffer-requests",
    envvar="WUNDERPROXY_BUFFER_REQUESTS",
    is_flag=True,
    help="Read each request's whole body before the container sees any of it, so that a "
    "slow upload never holds an app worker.",
)
@click.option(
    "--buffer-responses",
    envvar="WUNDERPROXY_BUFFER_RESPONSES",
    is_flag=True,
    help="Take each answer off the container as fast as it sends it, then feed the client "
    "at its pace (event streams and upgrades stay streamed).",
)
@click.option(
    "--buffer-memory",
    envvar="WUNDERPROXY_BUFFER_MEMORY",
    type=click.IntRange(4096),
    default=defaults.DEFAULT_BUFFER_MEMORY,
    help="Bytes of one buffered body held in memory; the rest goes to a temporary file.",
)
@click.option(
    "--buffer-dir",
    envvar="WUNDERPROXY_BUFFER_DIR",
    type=click.Path(file_okay=False, path_type=Path),
    default=defaults.DEFAULT_BUFFER_DIR,
    help="Directory of the temporary files of buffered bodies.",
)
@click.option(
    "--compress",
    envvar="WUNDERPROXY_COMPRESS",
    is_flag=True,
    help="Compress answers with zstd, br or gzip, as the client's Accept-Encoding prefers "
    "(zstd and br need pip install 'wunderproxy[compress]').",
)
@click.option(
    "--compress-types",
    envvar="WUNDERPROXY_COMPRESS_TYPES",
    default=",".join(defaults.DEFAULT_COMPRESS_TYPES),
    help="Comma-separated media types --compress applies to (type/* and type/*+suffix allowed).",
)
@click.option(
    "--compress-min-size",
    envvar="WUNDERPROXY_COMPRESS_MIN_SIZE",
    type=click.IntRange(0),
    default=defaults.DEFAULT_COMPRESS_MIN_SIZE,
    help="Bytes an answer with a Content-Length needs to be compressed.",
)
@click.option(
    "--keep-upstream",
    envvar="WUNDERPROXY_KEEP_UPSTREAM",
    is_flag=True,
    help="Take a client's Connection: close out of the request sent to the container, so "
    "that its connection is kept for the next client (the client's answer still closes).",
)
@click.option(
    "--workers",
    envvar="WUNDERPROXY_WORKERS",
    type=click.IntRange(1, defaults.MAX_WORKERS),
    default=defaults.default_workers,
    show_default="the number of CPUs this process may run on",
    help="Proxy worker processes sharing the proxy's ports; 1 proxies in the manager's "
    "own process.",
)
@click.option(
    "--api",
    envvar="WUNDERPROXY_API",
    default=defaults.DEFAULT_API,
    help="Where the manager API listens: HOST:PORT or unix:PATH.",
)
@click.option(
    "--registry-port",
    envvar="WUNDERPROXY_REGISTRY_PORT",
    type=click.IntRange(1, 65535),
    default=defaults.DEFAULT_REGISTRY_PORT,
    help="Port of the local Docker registry; images are localhost:PORT/APP:REVISION.",
)
@click.option(
    "--config-file",
    envvar="WUNDERPROXY_CONFIG_FILE",
    type=click.Path(dir_okay=False, path_type=Path),
    help="KEY=VALUE lines added to every container's environment.",
)
@click.option(
    "--api-token",
    envvar="WUNDERPROXY_API_TOKEN",
    help="Bearer token required by /launch, /switch and /abort (else: loopback peers only).",
)
@click.option(
    "--health-timeout",
    envvar="WUNDERPROXY_HEALTH_TIMEOUT",
    type=float,
    default=defaults.DEFAULT_HEALTH_TIMEOUT,
    help="Seconds a new container has to answer its health check.",
)
@click.option(
    "--drain-timeout",
    envvar="WUNDERPROXY_DRAIN_TIMEOUT",
    type=float,
    default=defaults.DEFAULT_DRAIN_TIMEOUT,
    help="Seconds requests on a replaced container may run before it is stopped.",
)
@click.option(
    "--stop-timeout",
    envvar="WUNDERPROXY_STOP_TIMEOUT",
    type=int,
    default=defaults.DEFAULT_STOP_TIMEOUT,
    help="Seconds Docker waits after SIGTERM before killing a drained container.",
)
@click.option(
    "--keepalive-timeout",
    envvar="WUNDERPROXY_KEEPALIVE_TIMEOUT",
    type=float,
    default=defaults.DEFAULT_KEEPALIVE_TIMEOUT,
    help="Seconds an idle client keep-alive connection stays open.",
)
@click.option(
    "--header-timeout",
    envvar="WUNDERPROXY_HEADER_TIMEOUT",
    type=_SECONDS,
    default=defaults.DEFAULT_HEADER_TIMEOUT,
    help="Seconds a request head may take from its first byte; then 408 and close.",
)
@click.option(
    "--body-timeout",
    envvar="WUNDERPROXY_BODY_TIMEOUT",
    type=_SECONDS,
    default=defaults.DEFAULT_BODY_TIMEOUT,
    help="Longest gap in seconds between two reads of a request body; then 408 and close.",
)
@click.option(
    "--connect-timeout",
    envvar="WUNDERPROXY_CONNECT_TIMEOUT",
    type=_SECONDS,
    default=defaults.DEFAULT_CONNECT_TIMEOUT,
    help="Seconds to connect to the container; then 504.",
)
@click.option(
    "--upstream-timeout",
    envvar="WUNDERPROXY_UPSTREAM_TIMEOUT",
    type=_SECONDS,
    default=defaults.DEFAULT_UPSTREAM_TIMEOUT,
    help="Longest wait in seconds for the container's next byte of an answer; then 504.",
)
@click.option(
    "--send-timeout",
    envvar="WUNDERPROXY_SEND_TIMEOUT",
    type=_SECONDS,
    default=defaults.DEFAULT_SEND_TIMEOUT,
    help="Seconds a client may read nothing of its answer before it is closed.",
)
@click.option(
    "--max-header-size",
    envvar="WUNDERPROXY_MAX_HEADER_SIZE",
    type=click.IntRange(1024),
    default=defaults.DEFAULT_MAX_HEADER_SIZE,
    help="Bytes a request head may have; a larger one is answered 431.",
)
@click.option(
    "--max-body-size",
    envvar="WUNDERPROXY_MAX_BODY_SIZE",
    type=click.IntRange(0),
    default=defaults.DEFAULT_MAX_BODY_SIZE,
    help="Bytes a request body may have; a larger one is answered 413. Default: no limit.",
)
@click.option(
    "--max-connections",
    envvar="WUNDERPROXY_MAX_CONNECTIONS",
    type=click.IntRange(1),
    default=None,
    help="Client connections served at once; more are answered 503 and closed. "
    "Default: derived from the open-file limit.",
)
@click.option(
    "--shutdown-timeout",
    envvar="WUNDERPROXY_SHUTDOWN_TIMEOUT",
    type=float,
    default=defaults.DEFAULT_SHUTDOWN_TIMEOUT,
    help="Seconds SIGTERM waits for requests in flight before exiting.",
)
@click.option(
    "--pid-file",
    envvar="WUNDERPROXY_PID_FILE",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write this process's PID here once it serves.",
)
@click.option(
    "--take-over",
    envvar="WUNDERPROXY_TAKE_OVER",
    is_flag=True,
    help="Hitless restart: once serving, take all new connections and SIGTERM the "
    "wunderproxy named in --pid-file.",
)
@click.option(
    "--loop",
    "loop_choice",
    envvar="WUNDERPROXY_LOOP",
    default="auto",
    type=click.Choice(["auto", "asyncio", "uvloop"]),
    help="Event loop: uvloop is faster; auto uses it when installed (pip install "
    "'wunderproxy[fast]').",
)
@click.option(
    "--access-log",
    envvar="WUNDERPROXY_ACCESS_LOG",
    metavar="PATH|-",
    help="Write one line per proxied request to PATH (or - for standard output). Off by default.",
)
@click.option(
    "--access-log-format",
    envvar="WUNDERPROXY_ACCESS_LOG_FORMAT",
    default="common",
    type=click.Choice(ACCESS_LOG_FORMATS),
    help="common: Common Log Format plus X-Forwarded-For, revision and seconds; "
    "json: one JSON object per line.",
)
@click.option(
    "--instance",
    envvar="WUNDERPROXY_INSTANCE",
    default=default_instance,
    show_default="the host name",
    help="This wunderproxy's name: labels its containers, so that several run side by side "
    "on one Docker engine, and signs its fallback requests.",
)
@click.option(
    "--peer",
    "peers",
    envvar="WUNDERPROXY_PEERS",
    multiple=True,
    type=_PeerURL(),
    help="Another host's proxy address (http://HOST:PORT), where a request goes when no "
    "container here can take it. Repeatable; the env var is comma-separated.",
)
@click.option(
    "--fallback-secret",
    envvar="WUNDERPROXY_FALLBACK_SECRET",
    help="Secret shared by the fleet that signs fallback requests; needed with --peer.",
)
@click.option(
    "--log-level",
    envvar="WUNDERPROXY_LOG_LEVEL",
    default="info",
    type=click.Choice(["debug", "info", "warning", "error"]),
    help="Log verbosity.",
)
def run(
    bucket: str,
    prefix: str,
    app: str,
    proxy: str,
    proxy_tls: str | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    redirect_http: bool,
    forwarded: defaults.ForwardedMode,
    buffer_requests: bool,
    buffer_responses: bool,
    buffer_memory: int,
    buffer_dir: Path,
    compress: bool,
    compress_types: str,
    compress_min_size: int,
    keep_upstream: bool,
    workers: int,
    api: str,
    registry_port: int,
    config_file: Path | None,
    api_token: str | None,
    health_timeout: float,
    drain_timeout: float,
    stop_timeout: int,
    keepalive_timeout: float,
    header_timeout: float,
    body_timeout: float,
    connect_timeout: float,
    upstream_timeout: float,
    send_timeout: float,
    max_header_size: int,
    max_body_size: int | None,
    max_connections: int | None,
    shutdown_timeout: float,
    pid_file: Path | None,
    take_over: bool,
    loop_choice: LoopChoice,
    access_log: str | None,
    access_log_format: AccessLogFormat,
    instance: str,
    peers: tuple[Peer, ...],
    fallback_secret: str | None,
    log_level: str,
) -> None:
    """Serve APP: proxy to its current container and manage deploys.

    BUCKET is an S3 bucket, or file://DIR for a local directory with the same layout;
    PREFIX is the key prefix of the app's launch configs there.

    A launch config with HostConfig NetworkMode "host" runs its container on the host's
    network, on a port wunderproxy picks and passes as PORT: the app must listen on
    127.0.0.1:$PORT, or it is open on the host's public addresses too, and set SO_REUSEADDR
    (wunderproxy holds the port until the launch ends).
    """
    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = Config(
            bucket=bucket,
            prefix=prefix.strip("/"),
            app=app,
            proxy=None if proxy == "none" else Address.parse(proxy, "--proxy"),
            api=Address.parse(api, "--api"),
            registry_port=registry_port,
            env=read_env_file(config_file) if config_file is not None else (),
            api_token=api_token or None,
            health_timeout=health_timeout,
            drain_timeout=drain_timeout,
            stop_timeout=stop_timeout,
            shutdown_timeout=shutdown_timeout,
            edge=Edge(
                keepalive_timeout=keepalive_timeout,
                header_timeout=header_timeout,
                body_timeout=body_timeout,
                connect_timeout=connect_timeout,
                upstream_timeout=upstream_timeout,
                send_timeout=send_timeout,
                max_header_size=max_header_size,
                max_body_size=max_body_size,
                max_connections=max_connections,
            ),
            fleet=Fleet(
                instance=instance,
                peers=peers,
                secret=fallback_secret.encode() if fallback_secret else None,
            ),
            tls=_tls(proxy_tls, tls_cert, tls_key, redirect_http),
            front=Front(
                forwarded=forwarded,
                buffer_requests=buffer_requests,
                buffer_responses=buffer_responses,
                buffer_memory=buffer_memory,
                buffer_dir=buffer_dir,
                compress=available_encodings() if compress else (),
                compress_types=tuple(t.strip() for t in compress_types.split(",") if t.strip()),
                compress_min_size=compress_min_size,
                keep_upstream=keep_upstream,
            ),
            workers=workers,
        )
        if buffer_requests or buffer_responses:
            check_buffer_dir(buffer_dir)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    if take_over and pid_file is None:
        raise click.UsageError("--take-over needs --pid-file: it names the process to replace")
    certificates = _certificates(config.tls)
    # Imported here so that the client commands start fast and need no Docker SDK.
    from wunderproxy.engine import DockerEngine
    from wunderproxy.server import Server, TakeOverFailed
    from wunderproxy.store import open_store
    from wunderproxy.supervisor import WorkersDidNotStart

    try:
        store = open_store(config.bucket, config.prefix)
    except ValueError as exc:
        raise click.UsageError(f"BUCKET {bucket!r}: {exc}") from exc
    try:
        requests_log = AccessLog(access_log, access_log_format) if access_log else None
    except OSError as exc:
        raise click.UsageError(
            f"--access-log {access_log}: cannot open it for appending: {exc.strerror}; "
            "give a writable file, or - for standard output"
        ) from exc
    try:
        run_event_loop(
            Server(
                config,
                store,
                DockerEngine(),
                pid_file,
                take_over,
                requests_log,
                certificates,
                loop_choice,
            ).run(),
            loop_choice,
        )
    except OSError as exc:
        raise click.ClickException(f"cannot listen: {exc}") from exc
    except (TakeOverFailed, WorkersDidNotStart) as exc:
        raise click.ClickException(str(exc)) from exc
    _exit_without_waiting_for_threads()


def _tls(
    address: str | None, cert: Path | None, key: Path | None, redirect_http: bool
) -> Tls | None:
    """The TLS listener's settings, if ``--proxy-tls`` was given (with what it needs)."""
    if address is None:
        if cert is not None or key is not None or redirect_http:
            raise ConfigError(
                "--tls-cert, --tls-key and --redirect-http need --proxy-tls HOST:PORT "
                "(for example 0.0.0.0:443)"
            )
        return None
    if cert is None or key is None:
        raise ConfigError("--proxy-tls needs --tls-cert PATH and --tls-key PATH (PEM files)")
    return Tls(Address.parse(address, "--proxy-tls"), cert, key, redirect_http)


def _certificates(tls: Tls | None) -> Certificates | None:
    """The TLS listener's certificate and key, loaded before anything listens."""
    if tls is None:
        return None
    from wunderproxy.certificates import CertificateError, Certificates

    try:
        return Certificates(tls)
    except CertificateError as exc:
        raise click.ClickException(f"cannot serve TLS: {exc}") from exc


def _exit_without_waiting_for_threads() -> NoReturn:
    """Exit now that the server has shut down, not once every worker thread is done.

    A store or Docker call can be blocked in a thread for minutes (S3 not answering, with
    its retries), and the interpreter would wait for it at exit; nothing it returns is
    needed any more. Logs and standard streams are flushed first.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# -- client commands ---------------------------------------------------------------

api_option = click.option(
    "--api",
    "api_url",
    envvar="WUNDERPROXY_API_URL",
    default=defaults.DEFAULT_API_URL,
    help="URL of the manager API.",
)
token_option = click.option(
    "--api-token",
    envvar="WUNDERPROXY_API_TOKEN",
    help="Bearer token for /launch, /switch and /abort.",
)


hosts_option = click.option(
    "--host",
    "host_urls",
    envvar="WUNDERPROXY_HOSTS",
    multiple=True,
    type=_ApiURL(),
    help="A host's manager API URL (http://HOST:PORT). Repeatable; the env var is comma-separated.",
)


def store_options(command: Callable[..., None]) -> Callable[..., None]:
    """``--store`` and ``--prefix``: where the fleet's launch configs are."""
    command = click.option(
        "--prefix",
        envvar="WUNDERPROXY_PREFIX",
        help="Key prefix of the app's launch configs in the store. Default: ask the first --host.",
    )(command)
    return click.option(
        "--store",
        envvar="WUNDERPROXY_STORE",
        metavar="BUCKET|file://DIR",
        help="The store the hosts run on (as given to `wunderproxy run`). Default: ask the "
        "first --host.",
    )(command)


@main.command()
@api_option
@hosts_option
@click.option("--json", "as_json", is_flag=True, help="Print the /status JSON as it is.")
def status(api_url: str, host_urls: tuple[str, ...], as_json: bool) -> None:
    """Show what runs and how the proxy is doing; several --host: a table.

    With several --host, one row per host; exits 1 when a host cannot be reached or the
    hosts serve different revisions.
    """
    api_given = click.get_current_context().get_parameter_source("api_url")
    if host_urls and api_given is click.core.ParameterSource.COMMANDLINE:
        raise click.UsageError("give either --api (one host) or --host (one or more), not both")
    if len(host_urls) > 1:
        _fleet_status(_hosts(host_urls, None), as_json)
        return
    api_url = host_urls[0] if host_urls else api_url
    document = _call(lambda: ManagerClient(api_url).status())
    if as_json:
        click.echo(json.dumps(document, indent=2))
        return
    try:
        summary = _summary(document)
    except (KeyError, TypeError, ValueError) as exc:
        raise click.ClickException(
            f"{api_url}/status answered JSON that is not a wunderproxy status; is --api the "
            "address of the wunderproxy manager? (--json prints the answer as it came)"
        ) from exc
    click.echo(summary)


@main.command()
@click.argument("config_hash", metavar="HASH")
@api_option
@token_option
def launch(config_hash: str, api_url: str, api_token: str | None) -> None:
    """Start a container for HASH and wait until it is healthy."""
    client = ManagerClient(api_url, api_token)
    click.echo(f"launching {config_hash.strip()}: waiting until its health check answers", err=True)
    done = threading.Event()
    ticker = threading.Thread(target=_tick, args=(done,), daemon=True)
    ticker.start()
    try:
        answer = _call(lambda: client.launch(config_hash))
    finally:
        done.set()
        ticker.join()
    click.echo(answer["message"])


@main.command()
@click.argument("config_hash", metavar="HASH")
@api_option
@token_option
def switch(config_hash: str, api_url: str, api_token: str | None) -> None:
    """Point the proxy at the container launched for HASH; drain the old one."""
    answer = _call(lambda: ManagerClient(api_url, api_token).switch(config_hash))
    click.echo(answer["message"])
    if answer.get("warning"):
        click.echo(f"warning: {answer['warning']}", err=True)


@main.command()
@click.argument("config_hash", metavar="HASH")
@hosts_option
@token_option
def abort(config_hash: str, host_urls: tuple[str, ...], api_token: str | None) -> None:
    """Remove what a launch of HASH left on every host, where it does not serve.

    Cancels a launch still under way and removes a launched container that was not
    switched to; a line per host. A host with nothing of HASH is fine. Exits 1 naming
    each host where the abort failed (where HASH serves: switch to another hash first).
    """
    hosts = _hosts_required(host_urls, api_token)
    _fleet(lambda: abort_fleet(config_hash, hosts, click.echo))


def _fleet_status(hosts: list[Host], as_json: bool) -> None:
    fleet = fleet_status(hosts)
    # With --json, standard output is JSON alone: the problems go to standard error.
    click.echo(json.dumps(fleet.documents, indent=2) if as_json else fleet.table)
    if fleet.problems:
        for problem in fleet.problems:
            click.echo(problem, err=as_json)
        sys.exit(1)


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@store_options
@hosts_option
def upload(file: Path, store: str | None, prefix: str | None, host_urls: tuple[str, ...]) -> None:
    """Store the launch config in FILE under its hash; print the hash.

    Nothing is stored when FILE is not a valid launch config. Uploading the same bytes
    again is harmless: they have the same hash.
    """
    from wunderproxy.store import config_key, save_launch_config

    target = _fleet(lambda: find_store(store, prefix, _hosts(host_urls, None)))
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise click.ClickException(f"cannot read {file}: {exc.strerror or exc}") from exc
    config = _fleet(lambda: save_launch_config(target, raw, str(file)))
    click.echo(
        f"uploaded revision {config.revision} to {target.description} as {config_key(config.hash)}",
        err=True,
    )
    click.echo(config.hash)


def lock_options(command: Callable[..., None]) -> Callable[..., None]:
    """``--force`` and ``--lock-ttl``: how a deploy treats the fleet's deploy lock."""
    command = click.option(
        "--lock-ttl",
        type=_SECONDS,
        default=DEFAULT_LOCK_TTL,
        help="Seconds the deploy lock outlives this deploy if it dies without releasing it "
        "(while it runs, it renews the lock every TTL/3).",
    )(command)
    return click.option(
        "--force",
        is_flag=True,
        help="Break the deploy lock even if it has not expired: for when the deploy holding "
        "it was killed. An expired lock is taken without it.",
    )(command)


@dataclass(frozen=True)
class _Deploy:
    """What the options of ``deploy`` and ``rollback`` say: which hosts, which store, and
    how to treat the deploy lock."""

    force: bool
    lock_ttl: float
    store: str | None
    prefix: str | None
    host_urls: tuple[str, ...]
    api_token: str | None

    def run(self, choose: Callable[[Store], str]) -> None:
        """Take the lock, deploy the hash that ``choose`` picks (under the lock) from the
        store, and print the result."""
        hosts = _hosts_required(self.host_urls, self.api_token)
        target = _fleet(lambda: find_store(self.store, self.prefix, hosts))
        lock = DeployLock(target, deployer(), self.lock_ttl)

        def work() -> str:
            return FleetDeploy(hosts, _progress, lock=lock).run(choose(target))

        click.echo(_fleet(lambda: locked(lock, self.force, _progress, work)))


def deploy_options(command: Callable[..., None]) -> Callable[..., None]:
    """The lock, store, host and token options of a deploy, handed to ``command`` as one
    ``fleet`` (a :class:`_Deploy`)."""

    @functools.wraps(command)
    def with_fleet(
        *,
        force: bool,
        lock_ttl: float,
        store: str | None,
        prefix: str | None,
        host_urls: tuple[str, ...],
        api_token: str | None,
        **rest: Any,
    ) -> None:
        command(fleet=_Deploy(force, lock_ttl, store, prefix, host_urls, api_token), **rest)

    return lock_options(store_options(hosts_option(token_option(with_fleet))))


@main.command()
@click.argument("config_hash", metavar="HASH")
@deploy_options
def deploy(config_hash: str, fleet: _Deploy) -> None:
    """Deploy HASH to every host: launch everywhere, then switch everywhere.

    The switches start only once every host's launch is healthy. A launch that fails
    anywhere switches nothing and removes the new containers; a switch that fails half-way
    switches the others back. One deploy at a time: the lock is deploy.lock in the store.
    """
    fleet.run(lambda _: config_hash)


@main.command()
@deploy_options
def rollback(fleet: _Deploy) -> None:
    """Deploy the previous revision of the history to every host.

    The previous entry of history.json is the newest whose hash differs from the newest
    entry's; it is deployed as `deploy` does, under the same lock.
    """
    from wunderproxy.store import read_history

    def previous(target: Store) -> str:
        # Read under the lock: a deploy finishing meanwhile changes what "previous" is.
        entry = rollback_target(read_history(target), target.description)
        _progress(
            f"rolling back to revision {entry.get('Revision')} ({entry.get('Hash')}), "
            f"deployed at {entry.get('DeployedAt')} by {entry.get('DeployedBy')}"
        )
        return entry.get("Hash", "")

    fleet.run(previous)


@main.command()
@store_options
@hosts_option
def history(store: str | None, prefix: str | None, host_urls: tuple[str, ...]) -> None:
    """Show the fleet's deploys, newest first (history.json in the store)."""
    from wunderproxy.store import read_history

    target = _fleet(lambda: find_store(store, prefix, _hosts(host_urls, None)))
    entries = _fleet(lambda: read_history(target))
    if not entries:
        click.echo(f"no deploys recorded in history.json under {target.description}", err=True)
        return
    click.echo(history_table(entries))


def _hosts(urls: tuple[str, ...], token: str | None) -> list[Host]:
    seen = set()
    for url in urls:
        if url in seen:
            raise click.UsageError(f"--host {url} is given twice")
        seen.add(url)
    return [Host(ManagerClient(url, token)) for url in urls]


def _hosts_required(urls: tuple[str, ...], token: str | None) -> list[Host]:
    if not urls:
        raise click.UsageError(
            "no hosts given: give --host API_URL for each host (repeatable), or "
            "WUNDERPROXY_HOSTS=URL,URL; for this host alone: --host http://127.0.0.1:8001"
        )
    return _hosts(urls, token)


def _progress(line: str) -> None:
    click.echo(line, err=True)


def _fleet(work: Callable[[], T]) -> T:
    """Run ``work``; what it cannot do becomes the command's error (exit 1, or 130 after
    Ctrl-C)."""
    try:
        return work()
    except DeployFailed as exc:
        failed = click.ClickException(str(exc))
        failed.exit_code = exc.exit_code
        raise failed from exc
    except (FleetError, LockError, WunderproxyError, ClientError) as exc:
        raise click.ClickException(str(exc)) from exc


def _call(request: Any) -> dict[str, Any]:
    try:
        result: dict[str, Any] = request()
    except ClientError as exc:
        raise click.ClickException(str(exc)) from exc
    return result


def _tick(done: threading.Event) -> None:
    """Show that a long launch is still waiting: a dot every two seconds."""
    dots = 0
    while not done.wait(2.0):
        click.echo(".", nl=False, err=True)
        dots += 1
    if dots:
        click.echo("", err=True)


def _summary(status: dict[str, Any]) -> str:
    lines = [
        f"app {status['app']}, wunderproxy {status['version']}, "
        f"up {status['uptime_seconds']:.0f} s, docker {status['docker']['state']}"
    ]
    current = status.get("current")
    if current:
        lines.append(
            f"serving revision {current['revision']} ({current['hash']}) from container "
            f"{current['container_id'][:12]} on port {current['port']} since "
            f"{current['started_at']}"
        )
    else:
        lines.append("serving nothing: the proxy answers 503")
    for c in status.get("containers", []):
        lines.append(f"  {c['state']:<9} {c['revision']} {c['hash']} port {c['port']}")
    requests = status["requests"]
    codes = ", ".join(f"{code}: {n}" for code, n in requests["by_status"].items()) or "none"
    lines.append(
        f"requests: {requests['total']} total, {requests['since_switch']} since switch ({codes})"
    )
    latency = status.get("traffic", {}).get("since_start", {}).get("latency_ms", {})
    if latency.get("p50") is not None:
        lines.append(
            f"response times since start: p50 {latency['p50']} ms, p90 {latency['p90']} ms, "
            f"p99 {latency['p99']} ms"
        )
    conns = status["connections"]
    lines.append(
        f"connections: {conns['open']} open, {conns['active']} active, {conns['idle']} idle"
    )
    tls = (status.get("features") or {}).get("tls")
    if tls:
        lines.append(
            f"TLS on {tls['address']}: certificate serial {tls['serial']} ({tls['subject']}), "
            f"valid until {tls['not_after']}, loaded at {tls['loaded_at']} "
            f"({tls['reloads']} reloads since start)"
        )
        if tls["last_reload_error"]:
            lines.append(f"  the last reload failed: {tls['last_reload_error']}")
    fallback = status.get("fallback")
    if fallback:
        skipped = [p["url"] for p in fallback["peers"] if p["skipped_for"] > 0]
        lines.append(
            f"peer fallback as {fallback['instance']}: {fallback['sent']} sent, "
            f"{fallback['received']} received, {fallback['unplaced']} no peer took"
            + (f"; skipping {', '.join(skipped)}" if skipped else "")
        )
    return "\n".join(lines)
