"""Launch configs for tests, and a way to put them into any store under their real hash."""

from __future__ import annotations

import copy
import json
from typing import Any

from wunderproxy.launchconfig import md5_hex
from wunderproxy.store import Store, config_key

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


def upload_launch_config(store: Store, config: dict[str, Any]) -> str:
    """Store ``config`` as ``container.HASH.json`` and return its hash."""
    hash_, raw = encode_config(config)
    store.put(config_key(hash_), raw)
    return hash_
