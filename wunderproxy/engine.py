"""The Docker engine as wunderproxy uses it: pull, start, watch, stop and clean up containers.

Every method is synchronous and blocks on the engine; the manager runs them in a thread
executor. Every failure of the engine or the registry comes out as
:class:`~wunderproxy.errors.UpstreamFailed` with a message that names what failed and what to
do, so the manager can answer 502 with it unchanged; an engine that does not answer at all
comes out as its subclass :class:`~wunderproxy.errors.DockerUnreachable`.

Containers are created through the low-level API (``create_container_from_config``) so that the
launch config's ``ContainerConfig`` and ``HostConfig`` reach the engine in exactly the Engine
API shapes the operator wrote, with no translation through the SDK's keyword arguments.
"""

from __future__ import annotations

import contextlib
import copy
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import docker
import docker.errors
import requests.exceptions

from wunderproxy.errors import DockerUnreachable, UpstreamFailed
from wunderproxy.launchconfig import merged_host_config

LABEL_APP = "wunderproxy.app"
LABEL_REVISION = "wunderproxy.revision"
LABEL_HASH = "wunderproxy.hash"
# The wunderproxy that started a container (``--instance``), so that several can share an
# engine; a container without it was started before the label existed.
LABEL_INSTANCE = "wunderproxy.instance"
# The app port of a container, so that a listing can find its published host port again.
LABEL_PORT = "wunderproxy.port"

# Where the docker SDK looks when DOCKER_HOST is unset; only used in messages.
DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
# Apps are reachable only from this host: the proxy is the one way in.
PUBLISH_HOST_IP = "127.0.0.1"


@dataclass(frozen=True)
class ContainerSpec:
    """What to start: an image plus the launch config's Engine API shapes.

    ``container_config`` and ``host_config`` are the container-create body and its
    ``HostConfig`` as the operator wrote them (capitalised keys). ``env`` holds extra
    ``KEY=VALUE`` entries from the operator's config file; on a name clash the entry in
    ``container_config["Env"]`` wins. ``labels`` are merged over any labels in the config.
    ``host_port`` is set for a host-network container (``NetworkMode: "host"``): the port
    on 127.0.0.1 its app must listen on, passed to it as ``PORT``; ``app_port`` is then unused.
    """

    image: str
    app_port: str
    container_config: dict[str, Any]
    host_config: dict[str, Any]
    env: list[str]
    labels: dict[str, str]
    host_port: int | None = None


@dataclass(frozen=True)
class StartedContainer:
    """A running container and the loopback address its app port is published on."""

    id: str
    host: str
    port: int
    image: str
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class ContainerRecord:
    """One container in a listing; ``port`` is the published host port of its app port."""

    id: str
    status: str
    labels: dict[str, str]
    image: str
    port: int | None


def split_image_reference(image: str) -> tuple[str, str]:
    """Split ``REPOSITORY[:TAG][@DIGEST]`` into the repository and the tag or digest to pull.

    A registry host may carry a port (``localhost:5000/app:rev``), so the tag is only what
    follows the last ``:`` after the last ``/``. A digest wins over a tag, as in ``docker pull``.
    """
    name, _, digest = image.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    repository, tag = (name[:colon], name[colon + 1 :]) if colon > slash else (name, "latest")
    return repository, digest or tag


def registry_of(image: str) -> str:
    """The registry host of an image reference, as ``docker pull`` decides it."""
    first, slash, _ = image.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        return first
    return "docker.io"


def container_create_body(spec: ContainerSpec) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The Engine API container-create body for ``spec``, and warnings for the operator.

    The launch config's shapes are kept as written; wunderproxy adds the image, the merged
    ``Env``, its labels, and on a bridge network the app port in ``ExposedPorts`` with its
    loopback ``PortBindings``; on the host's network, ``PORT`` in ``Env`` instead.
    """
    body = copy.deepcopy(spec.container_config)
    body["Image"] = spec.image
    own_env: list[str] = list(body.get("Env") or [])
    own_keys = {entry.split("=", 1)[0] for entry in own_env}
    body["Env"] = [e for e in spec.env if e.split("=", 1)[0] not in own_keys] + own_env
    host_config = merged_host_config(body, copy.deepcopy(spec.host_config))
    if spec.host_port is None:
        warnings = _publish_app_port(body, host_config, spec.app_port)
        port_label = spec.app_port
    else:
        warnings = _listen_on_host_port(body, host_config, spec.host_port)
        port_label = f"{spec.host_port}/tcp"
    # The port a listing needs to find the container again: the app port, published by
    # Docker on a bridge network; on the host's network, the port the app listens on.
    body["Labels"] = {**(body.get("Labels") or {}), **spec.labels, LABEL_PORT: port_label}
    body["HostConfig"] = host_config
    return body, warnings


def _publish_app_port(
    body: dict[str, Any], host_config: dict[str, Any], app_port: str
) -> tuple[str, ...]:
    """Expose ``app_port`` and publish it on 127.0.0.1 with a port Docker picks."""
    body["ExposedPorts"] = {**(body.get("ExposedPorts") or {}), app_port: {}}
    bindings: dict[str, Any] = dict(host_config.get("PortBindings") or {})
    wanted = [{"HostIp": PUBLISH_HOST_IP, "HostPort": ""}]
    # Docker reads a bare "9292" as "9292/tcp", so an operator may have written either.
    aliases = {app_port, app_port.removesuffix("/tcp")} & bindings.keys()
    replaced = [bindings.pop(key) for key in sorted(aliases)]
    bindings[app_port] = wanted
    host_config["PortBindings"] = bindings
    if any(old != wanted for old in replaced):
        return (
            f"PortBindings for {app_port} replaced: wunderproxy publishes the app port "
            "on 127.0.0.1 with a port Docker picks",
        )
    return ()


def _listen_on_host_port(
    body: dict[str, Any], host_config: dict[str, Any], port: int
) -> tuple[str, ...]:
    """Tell a host-network app its port in ``PORT``, overriding any ``PORT`` already set.

    Nothing is published on the host's network, so ``PortBindings`` go (Docker would
    discard them too), and ``ExposedPorts`` say nothing about where the app listens.
    """
    warnings = []
    env: list[str] = body["Env"]
    given = [e.split("=", 1)[1] for e in env if e.split("=", 1)[0] == "PORT" and "=" in e]
    if any(value != str(port) for value in given):
        warnings.append(
            f"PORT={given[-1]} in Env replaced by PORT={port}: on the host's network "
            "wunderproxy picks the app's port, and the app must listen on 127.0.0.1:$PORT"
        )
    body["Env"] = [e for e in env if e.split("=", 1)[0] != "PORT"] + [f"PORT={port}"]
    if host_config.pop("PortBindings", None):
        warnings.append(
            "PortBindings dropped: on the host's network nothing is published; the app "
            f"listens on 127.0.0.1:{port} itself (PORT)"
        )
    if body.get("ExposedPorts"):
        warnings.append(
            f"ExposedPorts {sorted(body['ExposedPorts'])} not used: on the host's network the "
            f"app must listen on 127.0.0.1:$PORT (PORT={port}), where the proxy connects"
        )
    return tuple(warnings)


def _reason(error: BaseException) -> str:
    """The innermost OS-level reason of a connection error ("Connection refused"), else all."""
    pending: list[object] = [error]
    while pending:
        item = pending.pop()
        if isinstance(item, OSError) and item.strerror:
            return item.strerror
        if isinstance(item, BaseException):
            pending.extend(item.args)
            pending.extend(e for e in (item.__cause__, item.__context__) if e is not None)
    return str(error)


def _explanation(error: docker.errors.APIError) -> str:
    return error.explanation or str(error)


def _pull_failed(image: str, explanation: str) -> str:
    """An operator's message for a failed pull, from the engine's explanation."""
    registry = registry_of(image)
    if "not found" in explanation or "manifest unknown" in explanation:
        return (
            f"image {image} is not in the registry at {registry}: "
            f"push it there first (docker push {image})"
        )
    if "dial tcp" in explanation or "connection refused" in explanation:
        return (
            f"registry at {registry} is unreachable while pulling {image}: {explanation}; "
            "is the registry running there?"
        )
    return f"pulling {image} from the registry at {registry} failed: {explanation}"


class ContainerDeaths:
    """Docker's ``die`` events as ``(container id, exit code)``, until closed."""

    def __init__(
        self, stream: Any, errors: Callable[[str], contextlib.AbstractContextManager[None]]
    ) -> None:
        self._stream = stream
        self._errors = errors

    def __iter__(self) -> Iterator[tuple[str, int | None]]:
        with self._errors("following container events"):
            for event in self._stream:
                # Actor.ID: the top-level "id" is gone from Engine API 1.52 (Docker 29) on.
                actor = event.get("Actor") or {}
                code = str((actor.get("Attributes") or {}).get("exitCode", ""))
                yield str(actor.get("ID", "")), int(code) if code.isdigit() else None

    def close(self) -> None:
        """End the stream; may be called from another thread."""
        self._stream.close()


class DockerEngine:
    """wunderproxy's view of one Docker engine.

    ``client`` is used as given; without it a client is made from the environment
    (``DOCKER_HOST`` and friends), or from ``base_url``, on first use, so that an engine that
    does not answer surfaces as :class:`UpstreamFailed` at call time, not at construction.
    """

    def __init__(
        self, client: docker.DockerClient | None = None, *, base_url: str | None = None
    ) -> None:
        self._client = client
        self._base_url = base_url
        self._lock = threading.Lock()
        self.address = base_url or os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST

    def _api(self) -> docker.APIClient:
        with self._lock:
            if self._client is None:
                try:
                    # Making a client asks the engine for its API version: it can fail here.
                    if self._base_url is None:
                        self._client = docker.from_env()
                    else:
                        self._client = docker.DockerClient(base_url=self._base_url)
                except (docker.errors.DockerException, requests.exceptions.RequestException) as e:
                    raise self._unreachable(e) from e
            return self._client.api

    def _unreachable(self, error: BaseException) -> DockerUnreachable:
        return DockerUnreachable(
            f"Docker engine unreachable at {self.address}: {_reason(error)}; is dockerd "
            "running? Start it, or point DOCKER_HOST at it"
        )

    @contextlib.contextmanager
    def _errors(self, action: str, hint: str = "see dockerd's log") -> Iterator[None]:
        """Turn anything the SDK raises into UpstreamFailed naming ``action``."""
        try:
            yield
        except docker.errors.APIError as e:
            raise UpstreamFailed(f"Docker failed {action}: {_explanation(e)}; {hint}") from e
        except requests.exceptions.ReadTimeout as e:
            raise DockerUnreachable(
                f"Docker engine at {self.address} did not answer in time while {action}; "
                "check that dockerd is not overloaded or stuck"
            ) from e
        except requests.exceptions.ConnectionError as e:
            raise self._unreachable(e) from e
        except (docker.errors.DockerException, requests.exceptions.RequestException) as e:
            raise UpstreamFailed(f"Docker failed {action}: {e}; {hint}") from e

    def ping(self) -> None:
        """Check that the engine answers; raise UpstreamFailed if not."""
        api = self._api()
        with self._errors("answering a ping"):
            api.ping()

    def ensure_image(self, image: str) -> None:
        """Pull ``image`` from its registry unless the engine already has it."""
        api = self._api()
        with self._errors(f"looking up image {image}"):
            try:
                api.inspect_image(image)  # type: ignore[no-untyped-call]
                return
            except docker.errors.ImageNotFound:
                pass
        repository, tag = split_image_reference(image)
        with self._errors(f"pulling {image}"):
            try:
                for chunk in api.pull(repository, tag=tag, stream=True, decode=True):
                    # Errors can also arrive inside the progress stream, after a 200.
                    if isinstance(chunk, dict) and "error" in chunk:
                        raise UpstreamFailed(_pull_failed(image, str(chunk["error"])))
            except docker.errors.APIError as e:
                raise UpstreamFailed(_pull_failed(image, _explanation(e))) from e

    def start(self, spec: ContainerSpec) -> StartedContainer:
        """Create and start a container and return where its app listens.

        On a bridge network the app port is published on 127.0.0.1 with a host port Docker
        picks; an operator's ``PortBindings`` entry for it is replaced and reported in
        ``warnings``. On the host's network (``spec.host_port``) the app listens on that port.
        A container that fails to start, or dies before its port can be read, is removed
        before this raises.
        """
        body, warnings = container_create_body(spec)
        api = self._api()
        hint = "check ContainerConfig and HostConfig in the launch config"
        with self._errors(f"creating a container from {spec.image}", hint):
            created = api.create_container_from_config(body)  # type: ignore[no-untyped-call]
            container_id: str = created["Id"]
        try:
            with self._errors(f"starting a container from {spec.image}", hint):
                api.start(container_id)
                state = api.inspect_container(container_id)
            # On the host's network the app listens on the port it was given, once it is up:
            # the health check waits for that, and notices if the container exits first.
            port = spec.host_port or self._published_port(state, spec.app_port)
            if port is None:
                raise UpstreamFailed(self._no_port_message(container_id, state, spec))
        except BaseException:
            self._force_remove(container_id)
            raise
        return StartedContainer(container_id, PUBLISH_HOST_IP, port, spec.image, warnings)

    @staticmethod
    def _published_port(state: dict[str, Any], app_port: str) -> int | None:
        ports = (state.get("NetworkSettings") or {}).get("Ports") or {}
        for binding in ports.get(app_port) or []:
            if binding.get("HostIp") == PUBLISH_HOST_IP and binding.get("HostPort"):
                return int(binding["HostPort"])
        return None

    def _no_port_message(
        self, container_id: str, state: dict[str, Any], spec: ContainerSpec
    ) -> str:
        short = container_id[:8]
        status = state.get("State") or {}
        if not status.get("Running"):
            logs = self.logs(container_id, tail=10).strip() or "(no output)"
            return (
                f"container {short} from {spec.image} exited with code {status.get('ExitCode')} "
                f"right after starting; its last log lines: {logs}; fix the image's command or "
                "the launch config"
            )
        network = (state.get("HostConfig") or {}).get("NetworkMode")
        return (
            f"container {short} from {spec.image} has no port published for {spec.app_port} "
            f"(NetworkMode {network}); leave NetworkMode out of the launch config's HostConfig "
            '(a bridge network), or use "host"'
        )

    def _force_remove(self, container_id: str) -> None:
        # Best effort: the error being raised already says what went wrong.
        with contextlib.suppress(
            docker.errors.DockerException, requests.exceptions.RequestException
        ):
            self._api().remove_container(container_id, force=True)

    def status(self, container_id: str) -> str:
        """Docker's state of the container ("running", "exited", ...), or "missing"."""
        api = self._api()
        with self._errors(f"inspecting container {container_id[:8]}"):
            try:
                state: str = api.inspect_container(container_id)["State"]["Status"]
            except docker.errors.NotFound:
                return "missing"
        return state

    def logs(self, container_id: str, tail: int = 20) -> str:
        """The last ``tail`` lines of the container's stdout and stderr; "" if it is gone."""
        api = self._api()
        with self._errors(f"reading the logs of container {container_id[:8]}"):
            try:
                raw: bytes = api.logs(container_id, stdout=True, stderr=True, tail=tail)
            except docker.errors.NotFound:
                return ""
        return raw.decode("utf-8", errors="replace")

    def remove(self, container_id: str, stop_timeout: int) -> None:
        """Stop the container, giving it ``stop_timeout`` seconds, then remove it.

        A container that is already gone is not an error. If stopping fails the container is
        removed by force.
        """
        api = self._api()
        short = container_id[:8]
        with self._errors(f"stopping container {short}"):
            try:
                api.stop(container_id, timeout=stop_timeout)
            except docker.errors.NotFound:
                return
            except docker.errors.APIError:
                pass  # the forced removal below kills it
        with self._errors(f"removing container {short}"):
            try:
                api.remove_container(container_id, force=True)
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as e:
                # 409: removal already under way (e.g. HostConfig.AutoRemove); it goes anyway.
                if e.status_code != 409:
                    raise

    def list_containers(self, labels: dict[str, str]) -> list[ContainerRecord]:
        """Containers in every state that carry all of ``labels``."""
        api = self._api()
        filters = {"label": [f"{key}={value}" for key, value in labels.items()]}
        with self._errors("listing containers"):
            found: list[dict[str, Any]] = api.containers(all=True, filters=filters)
        return [self._record(item) for item in found]

    @staticmethod
    def _record(item: dict[str, Any]) -> ContainerRecord:
        """A listing's entry as a record, with the port the proxy reaches its app on."""
        labels: dict[str, str] = item.get("Labels") or {}
        number, _, proto = labels.get(LABEL_PORT, "").partition("/")
        port: int | None
        if (item.get("HostConfig") or {}).get("NetworkMode") == "host":
            port = int(number) if number.isdigit() else None  # the port it was given
        else:
            port = next(
                (
                    int(p["PublicPort"])
                    for p in item.get("Ports") or []
                    if str(p.get("PrivatePort")) == number
                    and p.get("Type", "tcp") == (proto or "tcp")
                    and p.get("PublicPort")
                ),
                None,
            )
        return ContainerRecord(item["Id"], item.get("State", ""), labels, item["Image"], port)

    def deaths(self, labels: dict[str, str], since: int | None = None) -> ContainerDeaths:
        """Follow the deaths of containers that carry all of ``labels`` (from the Unix time
        ``since``, else from now): a blocking stream, to read from a thread of its own."""
        api = self._api()
        filters = {
            "type": ["container"],
            "event": ["die"],
            "label": [f"{key}={value}" for key, value in labels.items()],
        }
        with self._errors("following container events"):
            stream = api.events(since=since, filters=filters, decode=True)
        return ContainerDeaths(stream, self._errors)

    def remove_images(self, repository: str, keep: set[str]) -> list[str]:
        """Remove the local tags of ``repository`` except those in ``keep``; return the removed.

        Images still used by a container (Docker answers 409) are left alone silently. An
        image known only by digest is removed by digest unless that reference is kept.
        """
        api = self._api()
        with self._errors(f"listing images of {repository}"):
            images: list[dict[str, Any]] = api.images(name=repository)
        removed = []
        for image in images:
            tags = [t for t in image.get("RepoTags") or [] if t.rpartition(":")[0] == repository]
            digests = [
                d for d in image.get("RepoDigests") or [] if d.partition("@")[0] == repository
            ]
            refs = tags or ([] if keep & set(digests) else digests)
            for ref in refs:
                if ref in keep:
                    continue
                with self._errors(f"removing image {ref}"):
                    try:
                        api.remove_image(ref)
                    except docker.errors.APIError as e:
                        if e.status_code in (404, 409):
                            continue  # gone already, or a container still uses it
                        raise
                removed.append(ref)
        return removed
