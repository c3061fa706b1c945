"""Launch configs for tests, and a way to put them into any store under their real hash."""

from __future__ import annotations

import copy
import json
from typing import TYPE_CHECKING, Any

from tests.support.apps import HOST_NETWORK_CMD
from wunderproxy.config import Address, Config
from wunderproxy.launchconfig import md5_hex
from wunderproxy.store import Store, config_key

if TYPE_CHECKING:
    from tests.support.docker import AppImages

PREFIX = "deploys/testapp"
"""The store prefix that tests of one wunderproxy deploy the test app under."""

EXAMPLE_CONFIG: dict[str, Any] = {
    "Revision": "2f1c9a7",
    "ContainerConfig": {
        "Image": "localhost:8080/myapp:2f1c9a7",
        "Env": ["RACK_ENV=production"],
        "Cmd": ["bundle", "exec", "unicorn", "-p", "9292"],
        "ExposedPorts": {"9292/tcp": {}},
    },
    "HostConfig": {"Memory": 536870912},
    "HealthCheckPath": "/health",
    "ArtifactsBucket": "myapp-images",
}
"""The launch config from SPEC.md; copy it with ``example_config`` before changing it."""


def example_config(**fields: Any) -> dict[str, Any]:
    """A fresh copy of EXAMPLE_CONFIG with top-level ``fields`` replaced."""
    config = copy.deepcopy(EXAMPLE_CONFIG)
    config.update(fields)
    return config


def encode_config(config: dict[str, Any]) -> tuple[str, bytes]:
    """Return ``(hash, raw)``: the bytes a config is stored as and the hash naming them."""
    raw = json.dumps(config).encode()
    return md5_hex(raw), raw


def upload_launch_config(store: Store, config: dict[str, Any], *, current: bool = False) -> str:
    """Store ``config`` as ``container.HASH.json`` and return its hash; with ``current``, also
    as ``current.json`` (what a wunderproxy serves from its start)."""
    hash_, raw = encode_config(config)
    store.put(config_key(hash_), raw)
    if current:
        store.put("current.json", raw)
    return hash_


def app_config(images: AppImages, revision: str, **fields: Any) -> dict[str, Any]:
    """A launch config for the busybox test app (tests/support/apps.py) pushed as ``images``;
    Init lets it stop at once on SIGTERM."""
    config: dict[str, Any] = {
        "Revision": revision,
        "ContainerConfig": {"Image": images.ref(revision), "Env": [f"REVISION={revision}"]},
        "HostConfig": {"Init": True},
        "HealthCheckPath": "/health",
    }
    config.update(fields)
    return config


def host_network_app_config(images: AppImages, revision: str) -> dict[str, Any]:
    """``app_config`` on the host's network: the app listens on 127.0.0.1:$PORT."""
    config = app_config(images, revision)
    config["ContainerConfig"]["Cmd"] = HOST_NETWORK_CMD
    config["HostConfig"]["NetworkMode"] = "host"
    return config


def manager_config(**overrides: Any) -> Config:
    """A Config for a Controller or Manager run in the test's own process: app "myapp", a
    0.5 s health timeout; ``overrides`` replace any field."""
    settings: dict[str, Any] = {
        "bucket": "memory",
        "prefix": "apps/myapp",
        "app": "myapp",
        "proxy": Address.parse("127.0.0.1:0", "--proxy"),
        "api": Address.parse("127.0.0.1:0", "--api"),
        "health_timeout": 0.5,
        "drain_timeout": 5.0,
        "stop_timeout": 3,
    }
    settings.update(overrides)
    return Config(**settings)
