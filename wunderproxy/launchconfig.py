"""Launch configs: the JSON documents in the store that say how to run one revision of the app.

A config is named by the MD5 of its exact bytes (``container.HASH.json``), so parsing always
starts by recomputing that hash: a config edited in place must be refused, not half-trusted.
Field names follow the original wunderproxy; unknown fields are kept in ``raw`` and ignored.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from wunderproxy.errors import BadRequest, InvalidConfig

HASH_RE = re.compile(r"[0-9a-f]{32}")
"""A config hash as stored: 32 lowercase hex digits."""

# Docker's own rule for a tag; the revision becomes the tag of localhost:PORT/APP:REVISION.
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")

DEFAULT_APP_PORT = "9292/tcp"
"""The app's port when ExposedPorts names none: the original wunderproxy's default."""

HOST_NETWORK = "host"
"""The NetworkMode that runs the container in the host's network namespace."""

_PORT_RE = re.compile(r"(\d{1,5})(/tcp)?")


def md5_hex(data: bytes) -> str:
    """Return the lowercase hex MD5 of ``data``: the name a config is stored under."""
    # Not a security check: MD5 names content, as in the original store layout.
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _preview(value: str, limit: int = 40) -> str:
    """A repr short enough to quote in an error message."""
    return repr(value) if len(value) <= limit else repr(value[:limit]) + "..."


def parse_hash(text: str) -> str:
    """Return ``text`` as a config hash: whitespace stripped, lowercase.

    Raises BadRequest when it is not 32 hex digits.
    """
    candidate = text.strip().lower()
    if HASH_RE.fullmatch(candidate) is None:
        raise BadRequest(
            f"{_preview(text)} is not a config hash; a hash is the 32-hex-digit MD5 of the "
            "config's bytes, as in container.HASH.json"
        )
    return candidate


@dataclass(frozen=True)
class LaunchConfig:
    """A validated launch config and the exact bytes it was read from."""

    hash: str
    """Lowercase hex MD5 of ``raw``."""
    raw: bytes
    """The stored bytes, kept so that current.json can be a byte copy."""
    revision: str
    """The app's revision; also the image tag when ``image`` is None."""
    image: str | None
    """ContainerConfig.Image; None means ``localhost:REGISTRYPORT/APP:REVISION``."""
    health_check_path: str
    """Path answered with 200 by a healthy container, starting with "/"."""
    container_config: dict[str, Any]
    """Docker Engine API container create body, as given (empty when absent)."""
    host_config: dict[str, Any]
    """Docker Engine API HostConfig, as given (empty when absent)."""
    artifacts_bucket: str | None
    """S3 bucket holding the registry's image artifacts, if named."""
    app_port: str
    """The container port the app listens on, as ``PORT/tcp`` (bridge networks only)."""
    host_network: bool = False
    """``HostConfig.NetworkMode`` is ``"host"``: the container shares the host's network, so
    wunderproxy picks the app's port and passes it as ``PORT`` (see hostports.py)."""


def parse_launch_config(
    raw: bytes, expected_hash: str, *, source: str | None = None
) -> LaunchConfig:
    """Check ``raw`` against ``expected_hash`` and parse it into a LaunchConfig.

    ``expected_hash`` is a hash as returned by parse_hash. ``source`` names the document in
    error messages (default ``container.HASH.json``).
    Raises InvalidConfig when the hash does not match, the bytes are not a JSON object, or a
    field is missing or of the wrong type; the message names the field.
    """
    name = source or f"container.{expected_hash}.json"
    actual = md5_hex(raw)
    if actual != expected_hash:
        raise InvalidConfig(
            f"{name} has MD5 {actual}, not {expected_hash}; re-upload it under its real hash "
            f"as container.{actual}.json"
        )
    try:
        document = json.loads(raw)
    except (ValueError, RecursionError) as error:
        # JSONDecodeError says "line L column C"; UnicodeDecodeError gives the byte position.
        raise InvalidConfig(
            f"{name} is not valid JSON: {error}; fix it and upload it again"
        ) from error
    try:
        return _build(actual, raw, document)
    except _FieldError as error:
        raise InvalidConfig(
            f"{name} is invalid: {error}; fix it and upload it under its new hash"
        ) from None


class _FieldError(Exception):
    """One field is missing or wrong; the message names it by its dotted path."""


def _build(hash_: str, raw: bytes, document: object) -> LaunchConfig:
    if not isinstance(document, dict):
        raise _FieldError(f"the document must be a JSON object, got {_json_type(document)}")

    revision = document.get("Revision")
    if revision is None:
        raise _FieldError("Revision is required")
    if not isinstance(revision, str):
        raise _FieldError(f"Revision must be a string, got {_json_type(revision)}")
    if not revision:
        raise _FieldError("Revision must not be empty")
    if TAG_RE.fullmatch(revision) is None:
        raise _FieldError(
            f"Revision {_preview(revision)} is not usable as a Docker tag: use letters, digits, "
            "'_', '.' and '-', not starting with '.' or '-', at most 128 characters"
        )

    path = document.get("HealthCheckPath")
    if path is None:
        raise _FieldError("HealthCheckPath is required")
    if not isinstance(path, str):
        raise _FieldError(f"HealthCheckPath must be a string, got {_json_type(path)}")
    # The path goes into a request line as is: whitespace or control characters would break it.
    if (
        not path.startswith("/")
        or not path.isascii()
        or any(c.isspace() or not c.isprintable() for c in path)
    ):
        raise _FieldError(
            f"HealthCheckPath {_preview(path)} must be a path starting with '/', in ASCII "
            "without spaces (percent-encode anything else)"
        )

    container = _optional_object(document, "ContainerConfig", "ContainerConfig")
    host = _optional_object(document, "HostConfig", "HostConfig")
    nested_host = _optional_object(container, "HostConfig", "ContainerConfig.HostConfig")
    host_network = _network_mode(host, nested_host) == HOST_NETWORK
    image = _optional_string(container, "Image", "ContainerConfig.Image")
    env = container.get("Env")
    if env is not None:
        _check_string_list(env, "ContainerConfig.Env")
    for key in ("Cmd", "Entrypoint"):
        value = container.get(key)
        if value is not None and not isinstance(value, str):
            _check_string_list(value, f"ContainerConfig.{key}", or_string=True)
    labels = _optional_object(container, "Labels", "ContainerConfig.Labels")
    for label, text in labels.items():
        if not isinstance(text, str):
            raise _FieldError(
                f"ContainerConfig.Labels.{label} must be a string, got {_json_type(text)}"
            )
    app_port = _app_port(
        _optional_object(container, "ExposedPorts", "ContainerConfig.ExposedPorts"),
        host_network,
    )
    # Go tools write an unset string as "", so an empty bucket means none.
    artifacts_bucket = _optional_string(document, "ArtifactsBucket", "ArtifactsBucket", empty=True)

    return LaunchConfig(
        hash=hash_,
        raw=raw,
        revision=revision,
        image=image,
        health_check_path=path,
        container_config=container,
        host_config=host,
        artifacts_bucket=artifacts_bucket or None,
        app_port=app_port,
        host_network=host_network,
    )


def merged_host_config(
    container_config: dict[str, Any], host_config: dict[str, Any]
) -> dict[str, Any]:
    """The HostConfig the engine gets: ``ContainerConfig.HostConfig`` (the create body may
    carry one, as Docker's API allows) with the launch config's ``HostConfig`` over it, key
    by key. Shared by the checks here and engine.py, so that both read the same settings."""
    nested = container_config.get("HostConfig")
    return {**(nested if isinstance(nested, dict) else {}), **host_config}


def _network_mode(host: dict[str, Any], nested_host: dict[str, Any]) -> str | None:
    """NetworkMode of the merged HostConfig, refused when the proxy could never reach the app.

    "host" is wunderproxy's host-network mode; "bridge", "default" and named networks get
    the app port published on 127.0.0.1 as without it. "none" has no network at all and
    "container:ID" shares another container's, where nothing can be published or picked.
    """
    merged = merged_host_config({"HostConfig": nested_host}, host)
    path = "HostConfig" if "NetworkMode" in host else "ContainerConfig.HostConfig"
    mode = _optional_string(merged, "NetworkMode", f"{path}.NetworkMode", empty=True)
    if mode == "none" or (mode or "").startswith("container:"):
        raise _FieldError(
            f"{path}.NetworkMode {_preview(mode or '')} leaves the proxy no way to reach "
            "the app; leave NetworkMode out (a bridge network, the app port published on "
            '127.0.0.1) or use "host" (the app listens on 127.0.0.1:$PORT)'
        )
    return mode


def _app_port(exposed: dict[str, Any], host_network: bool) -> str:
    """The one port the proxy forwards to on a bridge network. On the host's network the app
    listens on the port it is given instead: ExposedPorts are unused there, so any number of
    ports, of any protocol, may be named (Docker checks their form)."""
    if host_network or not exposed:
        return DEFAULT_APP_PORT
    if len(exposed) > 1:
        raise _FieldError(
            f"ContainerConfig.ExposedPorts must name at most one port, got {sorted(exposed)}; "
            "the proxy forwards to a single port"
        )
    (port,) = exposed
    match = _PORT_RE.fullmatch(port)
    if match is None or not 1 <= int(match[1]) <= 65535:
        raise _FieldError(
            f"ContainerConfig.ExposedPorts key {_preview(port)} must be PORT or PORT/tcp "
            "with PORT from 1 to 65535"
        )
    return f"{int(match[1])}/tcp"


def _optional_object(parent: dict[str, Any], key: str, path: str) -> dict[str, Any]:
    value = parent.get(key)
    if value is None:  # absent, or null as Go writes an unset map
        return {}
    if not isinstance(value, dict):
        raise _FieldError(f"{path} must be a JSON object, got {_json_type(value)}")
    return value


def _optional_string(
    parent: dict[str, Any], key: str, path: str, *, empty: bool = False
) -> str | None:
    value = parent.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _FieldError(f"{path} must be a string, got {_json_type(value)}")
    if not value and not empty:
        raise _FieldError(f"{path} must not be empty; leave it out instead")
    return value


def _check_string_list(value: object, path: str, *, or_string: bool = False) -> None:
    expected = "an array of strings or a string" if or_string else "an array of strings"
    if not isinstance(value, list):
        raise _FieldError(f"{path} must be {expected}, got {_json_type(value)}")
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise _FieldError(f"{path}[{index}] must be a string, got {_json_type(item)}")


def _json_type(value: object) -> str:
    """Name a parsed value's type as the person writing the JSON sees it."""
    if value is None:
        return "null"
    if isinstance(value, bool):  # before int: bool is an int in Python
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"
