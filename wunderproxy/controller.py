"""Launch (load, pull, start, wait healthy) and switch (swap, drain, stop, tidy up).

Docker and S3 calls block, so each runs in a small thread pool through
:meth:`Controller._blocking`; the event loop keeps proxying meanwhile. Docker calls go
through a :class:`~wunderproxy.dockerwatch.DockerWatch`, which keeps ``/status`` told whether
the engine answers. Whatever fails, the container serving now is left alone: a failed
launch only removes what it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol, TypeVar

from wunderproxy import store as stores
from wunderproxy.config import Config, default_instance
from wunderproxy.deaths import Deaths, DeathWatch
from wunderproxy.dockerwatch import DockerWatch
from wunderproxy.drain import drain_links
from wunderproxy.engine import (
    LABEL_APP,
    LABEL_HASH,
    LABEL_INSTANCE,
    LABEL_REVISION,
    PUBLISH_HOST_IP,
    ContainerRecord,
    ContainerSpec,
    StartedContainer,
)
from wunderproxy.errors import (
    Conflict,
    ContainerExited,
    HealthTimeout,
    NotFound,
    WunderproxyError,
)
from wunderproxy.health import probe, wait_healthy
from wunderproxy.hostports import HostPorts, host_port_hint
from wunderproxy.launchconfig import LaunchConfig, parse_hash
from wunderproxy.routes import died
from wunderproxy.state import Container, ProxyState, health_path_of

log = logging.getLogger("wunderproxy.manager")

T = TypeVar("T")

LOG_LINES_ON_FAILURE = 20
ADOPT_PROBE_TIMEOUT = 5.0  # seconds one health request of a container to adopt may take


class Engine(Protocol):
    """What the controller needs of a container engine (see :mod:`wunderproxy.engine`)."""

    def ping(self) -> None: ...
    def ensure_image(self, image: str) -> None: ...
    def start(self, spec: ContainerSpec) -> StartedContainer: ...
    def status(self, container_id: str) -> str: ...
    def logs(self, container_id: str, tail: int = 20) -> str: ...
    def remove(self, container_id: str, stop_timeout: int) -> None: ...
    def remove_images(self, repository: str, keep: set[str]) -> list[str]: ...
    def list_containers(self, labels: dict[str, str]) -> list[ContainerRecord]: ...
    def deaths(self, labels: dict[str, str], since: int | None = None) -> Deaths: ...


@dataclass(frozen=True)
class LaunchResult:
    """A healthy container for a hash; ``started`` is False when it already ran."""

    container: Container
    started: bool


@dataclass(frozen=True)
class Startup:
    """What start-up's first step found: whether the proxy is ready (serving current.json,
    or nothing deployed), and the config still to launch, if any."""

    ready: bool
    to_launch: LaunchConfig | None = None


@dataclass(frozen=True)
class AbortResult:
    """What an abort undid: a launch still under way (``cancelled_launch``), and the
    launched container it stopped and removed, if there was one."""

    config_hash: str
    cancelled_launch: bool
    removed: Container | None


@dataclass(frozen=True)
class SwitchResult:
    """The container serving now; ``changed`` is False when it already served."""

    container: Container
    changed: bool
    warning: str | None = None


class Workers(Protocol):
    """The other processes that proxy (see supervisor.py), as a switch and a drain wait on
    them; None when this one process proxies."""

    async def routed(self) -> None:
        """Wait until every worker routes by the state as it is now."""

    async def drained(self, container: Container) -> None:
        """Wait until every worker is done with ``container``."""


class Controller:
    """Changes what runs: the only writer of :attr:`ProxyState.current`."""

    def __init__(
        self,
        config: Config,
        state: ProxyState,
        store: stores.Store,
        engine: Engine,
        host_ports: HostPorts | None = None,
        workers: Workers | None = None,
    ):
        self._config = config
        self._workers = workers
        self._state = state
        self._store = store
        self._engine = engine
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="wunderproxy-io")
        # Every engine call goes through it, so that /status knows whether Docker answers.
        self._docker = DockerWatch(state, engine.ping, self._blocking)
        self._docker_probe: asyncio.Task[None] | None = None
        self._deaths = DeathWatch(engine.deaths, {LABEL_APP: config.app}, self._container_died)
        self._launches: dict[str, asyncio.Task[LaunchResult]] = {}
        # Launches cancelled by POST /abort, so that whoever waits on one says so.
        self._aborts: weakref.WeakSet[asyncio.Task[LaunchResult]] = weakref.WeakSet()
        self._drains: dict[Container, asyncio.Task[None]] = {}
        self._stale_removals: set[asyncio.Task[None]] = set()
        self._record_lock = asyncio.Lock()
        self._previous_image: str | None = None
        self._host_ports = host_ports or HostPorts()  # ports of host-network containers

    # -- launch --------------------------------------------------------------------

    async def launch(self, raw_hash: str) -> LaunchResult:
        """Start a container for the launch config named by ``raw_hash`` and wait until healthy.

        A launch of the same hash already under way is joined, not repeated.
        """
        config_hash = parse_hash(raw_hash)
        known = self._state.find(config_hash, "launched", "serving")
        if known is not None:
            if await self._docker.call(self._engine.status, known.container_id) == "running":
                return LaunchResult(known, started=False)
            log.warning(
                "container %s of revision %s is no longer running; launching it again",
                known.container_id[:12],
                known.revision,
            )
        task = self._launches.get(config_hash)
        if task is None:
            task = asyncio.create_task(self._launch(config_hash, None))
            self._launches[config_hash] = task
            task.add_done_callback(lambda _: self._launches.pop(config_hash, None))
        # A client that hangs up does not cancel the launch: others may be waiting on it.
        try:
            result = await asyncio.shield(task)
        except asyncio.CancelledError:
            if self._was_aborted(task):
                raise _aborted(config_hash) from None
            raise
        if known is not None and known.state == "serving":
            self._switch_to(result.container)  # the serving one died: replace it at once
        elif known is not None:
            self._state.forget(known)
            await self._remove_quietly(known.container_id)
        return result

    async def _launch(self, config_hash: str, config: LaunchConfig | None) -> LaunchResult:
        """Launch, with the deploy events it makes: launch, then healthy or failed."""
        began = time.monotonic()
        revision = config.revision if config is not None else "?"
        events = self._state.events
        try:
            if config is None:
                config = await self._blocking(stores.load_launch_config, self._store, config_hash)
                revision = config.revision
            events.add("launch", revision, config_hash)
            result = await self._start_healthy(config)
        except asyncio.CancelledError:
            if asyncio.current_task() in self._aborts:
                events.add(
                    "aborted",
                    revision,
                    config_hash,
                    seconds=time.monotonic() - began,
                    detail="launch cancelled by POST /abort",
                )
            raise
        except Exception as exc:
            events.add(
                "failed", revision, config_hash, seconds=time.monotonic() - began, detail=str(exc)
            )
            raise
        events.add(
            "healthy",
            revision,
            config_hash,
            result.container.container_id,
            seconds=time.monotonic() - began,
        )
        return result

    async def _start_healthy(self, config: LaunchConfig) -> LaunchResult:
        if not config.host_network:
            return await self._start_healthy_on(config, None)
        if self._config.api_token is None and self._config.api.takes_loopback_tcp:
            # A bridge container reaches the API from its own address (403 without a token);
            # on the host's network it connects from 127.0.0.1, which the API trusts, if the
            # API listens there (a Unix socket or another address it cannot use so).
            log.warning(
                "revision %s runs on the host's network, where its app is a loopback peer of "
                "the manager API: without --api-token it could launch and switch; set one",
                config.revision,
            )
        # On the host's network the app gets a port no container of this app has.
        with self._host_ports.pick(c.port for c in self._state.containers) as port:
            try:
                return await self._start_healthy_on(config, port)
            except (HealthTimeout, ContainerExited) as exc:
                # An app that never bound its port (or lacks SO_REUSEADDR) ends up here.
                raise type(exc)(f"{exc}. {host_port_hint(port)}") from None

    async def _start_healthy_on(self, config: LaunchConfig, host_port: int | None) -> LaunchResult:
        image = config.image or f"{self._config.repository}:{config.revision}"
        log.info("launching revision %s (%s) from %s", config.revision, config.hash, image)
        await self._docker.call(self._engine.ensure_image, image)
        spec = ContainerSpec(
            image=image,
            app_port=config.app_port,
            container_config=config.container_config,
            host_config=config.host_config,
            env=list(self._config.env),
            labels={
                LABEL_APP: self._config.app,
                LABEL_REVISION: config.revision,
                LABEL_HASH: config.hash,
                LABEL_INSTANCE: self._config.fleet.instance,
            },
            host_port=host_port,
        )
        started = await self._start(spec)
        for warning in started.warnings:
            log.warning("%s", warning)
        try:
            await wait_healthy(
                started.host,
                started.port,
                config.health_check_path,
                self._config.health_timeout,
                functools.partial(self._exit_report, started.id, config.revision),
            )
        except BaseException:
            log.warning(
                "revision %s failed to start; removing container %s",
                config.revision,
                started.id[:12],
            )
            await asyncio.shield(self._remove_quietly(started.id))
            raise
        container = Container(
            config=config,
            image=image,
            container_id=started.id,
            host=started.host,
            port=started.port,
            started_at=datetime.now(UTC),
        )
        self._state.add(container)
        log.info(
            "revision %s healthy in container %s on port %d",
            config.revision,
            started.id[:12],
            started.port,
        )
        return LaunchResult(container, started=True)

    async def _start(self, spec: ContainerSpec) -> StartedContainer:
        """Create and start the container.

        The engine call runs on in its thread when the launch is cancelled (an abort,
        shutdown), and may still start the container: then it is removed once it exists.
        """
        call = asyncio.ensure_future(self._docker.call(self._engine.start, spec))
        try:
            return await asyncio.shield(call)
        except asyncio.CancelledError:
            with contextlib.suppress(WunderproxyError):  # the start failed: nothing to remove
                started = await call
                log.info("launch cancelled: removing container %s", started.id[:12])
                await self._remove_quietly(started.id)
            raise

    async def _exit_report(self, container_id: str, revision: str) -> str | None:
        """Why the container stopped while starting, with its last log lines; None if up."""
        status = await self._docker.call(self._engine.status, container_id)
        if status in ("running", "created", "restarting"):
            return None
        logs = await self._docker.call(self._engine.logs, container_id, LOG_LINES_ON_FAILURE)
        tail = "\n".join(logs.strip().splitlines()[-LOG_LINES_ON_FAILURE:]) or "(no output)"
        return (
            f"container {container_id[:8]} of revision {revision} stopped while starting "
            f"(status {status}); the container was removed. Its last log lines:\n{tail}"
        )

    # -- abort ---------------------------------------------------------------------

    async def abort(self, raw_hash: str) -> AbortResult:
        """Undo a launch of ``raw_hash`` that was not switched to.

        A launch still under way is cancelled (whoever waits on it gets Conflict) and what
        it started is removed; a launched container is stopped and removed. The container
        serving is refused (Conflict), one draining is left to its drain, and NotFound says
        that nothing of the hash was launched here.
        """
        config_hash = parse_hash(raw_hash)
        serving = self._state.find(config_hash, "serving")
        if serving is not None:
            raise Conflict(
                f"{config_hash} (revision {serving.revision}) serves now, in container "
                f"{serving.container_id[:8]}; to take it out, switch to another hash: its "
                "container is then drained and removed"
            )
        task = self._launches.get(config_hash)
        cancelled = task is not None and not task.done()
        if task is not None and cancelled:
            self._aborts.add(task)
            task.cancel()
            # Once it has ended, what it started is gone: the answer can say so.
            await asyncio.wait([task])
        # A launch that finished meanwhile left a launched container: it goes too.
        launched = self._state.find(config_hash, "launched")
        if launched is not None:
            self._state.forget(launched)  # no switch can pick it from here on
            try:
                await self._docker.call(
                    self._engine.remove, launched.container_id, self._config.stop_timeout
                )
            except WunderproxyError:
                self._state.add(launched)  # still there: a later abort can try again
                raise
            self._state.events.add(
                "aborted",
                launched.revision,
                config_hash,
                launched.container_id,
                detail="launched container stopped and removed by POST /abort",
            )
            log.info(
                "aborted revision %s: removed its launched container %s",
                launched.revision,
                launched.container_id[:12],
            )
        elif not cancelled:
            draining = self._state.find(config_hash, "draining")
            left = (
                f"; its container {draining.container_id[:8]} that is draining is left to "
                "finish its drain"
                if draining is not None
                else ""
            )
            raise NotFound(f"nothing of {config_hash} is launched here{left}")
        return AbortResult(config_hash, cancelled_launch=cancelled, removed=launched)

    def _was_aborted(self, task: asyncio.Task[LaunchResult]) -> bool:
        """True when ``task`` ended because POST /abort cancelled it, and the caller
        waiting on it is not itself being cancelled."""
        waiter = asyncio.current_task()
        waiter_cancelled = waiter is not None and waiter.cancelling() > 0
        return task.cancelled() and task in self._aborts and not waiter_cancelled

    # -- switch --------------------------------------------------------------------

    async def switch(self, raw_hash: str, deployed_by: str) -> SwitchResult:
        """Route new requests to the container launched for ``raw_hash``; drain the old one."""
        config_hash = parse_hash(raw_hash)
        current = self._state.current
        if current is not None and current.hash == config_hash:
            return SwitchResult(current, changed=False)
        if config_hash in self._launches:
            raise Conflict(
                f"the launch of {config_hash} has not finished; switch once POST /launch "
                "has answered 200"
            )
        container = self._state.find(config_hash, "launched") or self._revivable(config_hash)
        if container is None:
            raise NotFound(f"{config_hash} is not launched here; POST /launch it first")
        self._switch_to(container)
        if self._workers is not None:
            # Atomic from outside: the answer waits until every worker routes to it.
            await self._workers.routed()
        warning = await self._record(container, deployed_by)
        return SwitchResult(container, changed=True, warning=warning)

    def _revivable(self, config_hash: str) -> Container | None:
        """A container of ``config_hash`` still draining and not yet being stopped.

        Switching back to it (a quick rollback) cancels its drain: it never stopped
        answering, so it serves again at once.
        """
        container = self._state.find(config_hash, "draining")
        if container is None:
            return None
        drain = self._drains.get(container)
        if drain is None or container.stopping:
            return None
        drain.cancel()
        log.info("switching back to container %s, which was draining", container.container_id[:12])
        return container

    def _switch_to(self, container: Container) -> Container | None:
        previous = self._state.switch_to(container)
        self._state.events.add(
            "switch",
            container.revision,
            container.hash,
            container.container_id,
            detail=f"from {previous.revision}" if previous is not None else "",
        )
        log.info(
            "switched proxy to revision %s: container %s port %d",
            container.revision,
            container.container_id[:12],
            container.port,
        )
        if previous is not None:
            self._previous_image = previous.image
            task = asyncio.create_task(self._drain(previous))
            self._drains[previous] = task
            task.add_done_callback(functools.partial(self._drain_done, previous))
        return previous

    def _drain_done(self, container: Container, task: asyncio.Task[None]) -> None:
        # A drain cancelled by a switch back may end after a newer drain of the same
        # container was registered: only the drain that ended leaves the registry.
        if self._drains.get(container) is task:
            del self._drains[container]

    async def _record(self, container: Container, deployed_by: str) -> str | None:
        """Write current.json and history.json; a failure is reported, not fatal."""
        async with self._record_lock:
            try:
                self._state.deploy_history = await self._blocking(
                    stores.record_deploy,
                    self._store,
                    container.config,
                    deployed_by,
                    datetime.now(UTC),
                )
            except WunderproxyError as exc:
                log.error("switched, but could not record the deploy: %s", exc)
                return f"could not record the deploy in the store: {exc}"
        return None

    async def _drain(self, container: Container) -> None:
        """Stop a replaced container once nothing needs it any more (see drain.py), in
        this process and in every worker; only then is it stopped (with Docker's grace
        period) and removed."""
        began = time.monotonic()
        # With workers, they hold the requests: this process waits on them, not on its own
        # figures of the container (only what /status last copied in).
        elsewhere = self._workers.drained if self._workers is not None else None
        await drain_links(container, self._config.drain_timeout, elsewhere)
        await self._remove_quietly(container.container_id)
        self._state.forget(container)
        self._state.events.add(
            "drained",
            container.revision,
            container.hash,
            container.container_id,
            seconds=time.monotonic() - began,
        )
        log.info("drained and removed container %s", container.container_id[:12])
        await self._remove_unused_images()

    async def _remove_unused_images(self) -> None:
        """Remove this app's images no container uses, but keep the previous for rollback.

        Docker refuses to remove an image a container uses, so the images of other
        instances' containers on this engine stay; an instance's previous image may go,
        and is pulled again from the registry if that instance rolls back to it.
        """
        keep = {c.image for c in self._state.containers}
        if self._previous_image is not None:
            keep.add(self._previous_image)
        try:
            removed = await self._docker.call(
                self._engine.remove_images, self._config.repository, keep
            )
        except WunderproxyError as exc:
            log.warning("could not remove unused images: %s", exc)
            return
        for image in removed:
            log.info("removed unused image %s", image)

    async def _remove_quietly(self, container_id: str) -> None:
        try:
            await self._docker.call(self._engine.remove, container_id, self._config.stop_timeout)
        except WunderproxyError as exc:
            log.error("could not remove container %s: %s", container_id[:12], exc)

    # -- start-up and shutdown -----------------------------------------------------

    async def start(self) -> bool:
        """Serve ``current.json``: adopt its running container, or launch it.

        Both steps of start-up at once (see :meth:`adopt_current` and
        :meth:`launch_current`); True when the proxy is ready to take all traffic.
        """
        return await self.launch_current(await self.adopt_current())

    async def adopt_current(self) -> Startup:
        """Start-up's first step, quick enough to finish before listening: read
        ``current.json`` and adopt its container if one runs healthy (left by a predecessor,
        or by a process running beside this one); remove this app's other containers.

        A failure is logged and reported in the result: the proxy then answers 503.
        """
        try:
            config = await self._blocking(stores.load_current, self._store)
            if config is not None:  # kept from peers while it starts (see fallback.py)
                self._state.health_check_path = health_path_of(config)
                self._state.routes_changed()
            records = await self._own_containers()
            adopted = None
            if config is not None:
                adopted = await self._adopt(config, records)
            self._remove_stale(
                [r for r in records if adopted is None or r.id != adopted.container_id]
            )
        except WunderproxyError as exc:
            log.error("could not start current.json: %s", exc)
            return Startup(ready=False)
        if config is None:
            log.warning(
                "no %s in %s: nothing deployed yet, the proxy answers 503 until a switch",
                stores.CURRENT_KEY,
                self._store.description,
            )
        elif adopted is not None:
            self._switch_to(adopted)
            return Startup(ready=True)
        return Startup(ready=config is None, to_launch=config)

    async def launch_current(self, startup: Startup) -> bool:
        """Start-up's second step, which may take as long as a deploy: launch what
        :meth:`adopt_current` left to launch, and switch to it. True when ready."""
        await self._read_history()
        config = startup.to_launch
        if config is None:
            return startup.ready
        task = asyncio.create_task(self._launch(config.hash, config))
        self._launches[config.hash] = task
        try:
            try:
                result = await task
            except asyncio.CancelledError:
                if self._was_aborted(task):
                    raise _aborted(config.hash) from None
                raise
        except WunderproxyError as exc:
            log.error("could not start current.json: %s", exc)
            return False
        finally:
            self._launches.pop(config.hash, None)
        if self._state.current is None:  # no switch came through the API meanwhile
            self._switch_to(result.container)
        return True

    def watch_docker(self) -> None:
        """Probe the Docker engine in the background until shutdown (see DockerWatch), and
        follow the deaths of this app's containers (see deaths.py)."""
        self._docker_probe = asyncio.create_task(self._docker.run())
        self._deaths.start()

    def _container_died(self, container_id: str, exit_code: int | None) -> None:
        """Docker says a container died. If it was serving: fail what is in flight there
        now (requests that may go twice go to a peer) and send new requests to peers,
        rather than let them wait on a port nothing answers behind."""
        container = next(
            (c for c in self._state.containers if c.container_id == container_id), None
        )
        if container is None or container.stopping or container.state != "serving":
            return  # stopped by us, or not serving: its launch or drain deals with it
        fallback = self._state.fallback
        log.error(
            "the serving container %s of revision %s died (exit code %s): %s; deploy again, "
            "or launch its hash again to restart it",
            container_id[:12],
            container.revision,
            "unknown" if exit_code is None else exit_code,
            "requests go to peers meanwhile"
            if fallback is not None and fallback.peers
            else "requests get 502 meanwhile",
        )
        self._state.events.add(
            "died",
            container.revision,
            container.hash,
            container_id,
            detail=f"exit code {exit_code}" if exit_code is not None else "",
        )
        died(container, fallback)
        self._state.routes_changed()

    async def _read_history(self) -> None:
        """Load history.json for the status page; without it the page shows no deploys."""
        try:
            self._state.deploy_history = await self._blocking(stores.read_history, self._store)
        except WunderproxyError as exc:
            log.warning("could not read the deploy history: %s", exc)

    async def _own_containers(self) -> list[ContainerRecord]:
        """This app's containers started by this instance.

        Other instances on the engine (``--instance``) are left alone. A container without
        the instance label was started before it existed, so it counts as the default
        instance's: a host upgraded in place adopts its container as before.
        """
        records = await self._docker.call(
            self._engine.list_containers, {LABEL_APP: self._config.app}
        )
        instance = self._config.fleet.instance
        unlabelled = default_instance()
        return [r for r in records if r.labels.get(LABEL_INSTANCE, unlabelled) == instance]

    async def _adopt(
        self, config: LaunchConfig, records: list[ContainerRecord]
    ) -> Container | None:
        """Take over a healthy running container of ``config`` (left by a predecessor)."""
        for record in records:
            if record.labels.get(LABEL_HASH) != config.hash or record.status != "running":
                continue
            if record.port is None:
                continue
            try:
                async with asyncio.timeout(ADOPT_PROBE_TIMEOUT):
                    healthy = await probe(PUBLISH_HOST_IP, record.port, config.health_check_path)
            except (OSError, TimeoutError):
                healthy = 0
            if healthy != 200:
                log.warning("not adopting container %s: its health check failed", record.id[:12])
                continue
            container = Container(
                config=config,
                image=record.image,
                container_id=record.id,
                host=PUBLISH_HOST_IP,
                port=record.port,
                started_at=datetime.now(UTC),
            )
            self._state.add(container)
            log.info(
                "adopted running container %s of revision %s on port %d",
                record.id[:12],
                config.revision,
                record.port,
            )
            return container
        return None

    def _remove_stale(self, records: list[ContainerRecord]) -> None:
        """Remove this app's containers that are neither current nor launched here.

        Stopped ones go at once. Running ones go after the drain timeout: a predecessor
        being upgraded away may still be draining one of them.
        """
        for record in records:
            delay = self._config.drain_timeout if record.status == "running" else 0.0
            log.info(
                "stale container %s (revision %s, %s): removing it in %g s",
                record.id[:12],
                record.labels.get(LABEL_REVISION, "?"),
                record.status,
                delay,
            )
            task = asyncio.create_task(self._remove_later(record.id, delay))
            self._stale_removals.add(task)
            task.add_done_callback(self._stale_removals.discard)

    async def _remove_later(self, container_id: str, delay: float) -> None:
        await asyncio.sleep(delay)
        await self._remove_quietly(container_id)

    async def shutdown(self, grace: float) -> None:
        """Finish drains under way (within ``grace`` seconds) and stop the thread pool."""
        if self._docker_probe is not None:
            self._docker_probe.cancel()
        self._deaths.stop()
        for task in [*self._launches.values(), *self._stale_removals]:
            task.cancel()
        pending = list(self._launches.values()) + list(self._drains.values())
        if pending:
            await asyncio.wait(pending, timeout=grace)
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _blocking(self, function: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(function, *args))


def _aborted(config_hash: str) -> Conflict:
    return Conflict(
        f"the launch of {config_hash} was aborted (POST /abort) before it became healthy; "
        "nothing of it runs here"
    )


def default_deployer() -> str:
    """Who deployed, when the client does not say: this host."""
    with contextlib.suppress(OSError):
        return f"wunderproxy@{socket.gethostname()}"
    return "wunderproxy"
