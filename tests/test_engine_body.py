"""The parts of wunderproxy.engine that need no Docker engine: references and create bodies."""

from __future__ import annotations

from typing import Any

import pytest

from wunderproxy.engine import (
    LABEL_APP,
    LABEL_PORT,
    ContainerSpec,
    container_create_body,
    registry_of,
    split_image_reference,
)

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("image", "repository", "tag", "registry"),
    [
        ("localhost:8080/myapp:2f1c9a7", "localhost:8080/myapp", "2f1c9a7", "localhost:8080"),
        ("localhost:8080/myapp", "localhost:8080/myapp", "latest", "localhost:8080"),
        ("localhost/team/app:v1", "localhost/team/app", "v1", "localhost"),
        (f"localhost:5000/app@{DIGEST}", "localhost:5000/app", DIGEST, "localhost:5000"),
        (f"localhost:5000/app:v1@{DIGEST}", "localhost:5000/app", DIGEST, "localhost:5000"),
        ("registry.example.com/app:v2", "registry.example.com/app", "v2", "registry.example.com"),
        ("busybox", "busybox", "latest", "docker.io"),
        ("library/busybox:1.36", "library/busybox", "1.36", "docker.io"),
    ],
)
def test_image_references_split_into_repository_tag_and_registry(
    image: str, repository: str, tag: str, registry: str
) -> None:
    assert split_image_reference(image) == (repository, tag)
    assert registry_of(image) == registry


def make_spec(
    container_config: dict[str, Any] | None = None,
    host_config: dict[str, Any] | None = None,
    env: list[str] | None = None,
    host_port: int | None = None,
) -> ContainerSpec:
    return ContainerSpec(
        image="localhost:8080/myapp:rev",
        app_port="9292/tcp",
        container_config=container_config or {},
        host_config=host_config or {},
        env=env or [],
        labels={LABEL_APP: "myapp"},
        host_port=host_port,
    )


def test_the_create_body_keeps_the_operators_shapes_and_adds_wunderproxys() -> None:
    config = {
        "Image": "ignored:tag",
        "Cmd": ["bundle", "exec", "unicorn"],
        "Env": ["RACK_ENV=production", "SHARED=config"],
        "Labels": {"team": "web", LABEL_APP: "overridden"},
        "ExposedPorts": {"9292/tcp": {}},
        "Unknown": {"Kept": True},
    }
    spec = make_spec(config, {"Memory": 536870912}, ["SHARED=operator", "EXTRA=1"])

    body, warnings = container_create_body(spec)

    assert body == {
        "Image": "localhost:8080/myapp:rev",
        "Cmd": ["bundle", "exec", "unicorn"],
        "Env": ["EXTRA=1", "RACK_ENV=production", "SHARED=config"],
        "Labels": {"team": "web", LABEL_APP: "myapp", LABEL_PORT: "9292/tcp"},
        "ExposedPorts": {"9292/tcp": {}},
        "Unknown": {"Kept": True},
        "HostConfig": {
            "Memory": 536870912,
            "PortBindings": {"9292/tcp": [{"HostIp": "127.0.0.1", "HostPort": ""}]},
        },
    }
    assert warnings == ()
    assert config["Env"] == ["RACK_ENV=production", "SHARED=config"]  # the spec is not changed


@pytest.mark.parametrize("key", ["9292/tcp", "9292"])
def test_the_create_body_replaces_an_operators_binding_of_the_app_port_and_warns(
    key: str,
) -> None:
    other = {"5000/tcp": [{"HostIp": "0.0.0.0", "HostPort": "5000"}]}
    spec = make_spec(
        host_config={"PortBindings": {key: [{"HostPort": "80"}], **other}},
    )

    body, warnings = container_create_body(spec)

    assert body["HostConfig"]["PortBindings"] == {
        **other,
        "9292/tcp": [{"HostIp": "127.0.0.1", "HostPort": ""}],
    }
    assert warnings == (
        "PortBindings for 9292/tcp replaced: wunderproxy publishes the app port on 127.0.0.1 "
        "with a port Docker picks",
    )


HOST_NETWORK = {"NetworkMode": "host"}


def test_on_the_hosts_network_the_app_is_told_its_port_and_nothing_is_published() -> None:
    spec = make_spec({"Env": ["RACK_ENV=production"]}, HOST_NETWORK, ["EXTRA=1"], host_port=41234)

    body, warnings = container_create_body(spec)

    assert body == {
        "Image": "localhost:8080/myapp:rev",
        "Env": ["EXTRA=1", "RACK_ENV=production", "PORT=41234"],
        "Labels": {LABEL_APP: "myapp", LABEL_PORT: "41234/tcp"},
        "HostConfig": {"NetworkMode": "host"},
    }
    assert warnings == ()


@pytest.mark.parametrize(
    ("own_env", "config_file_env"),
    [(["PORT=9292"], []), ([], ["PORT=9292"]), (["PORT=8000"], ["PORT=9292"])],
)
def test_on_the_hosts_network_a_port_set_in_env_is_replaced_and_the_warning_says_so(
    own_env: list[str], config_file_env: list[str]
) -> None:
    spec = make_spec({"Env": own_env}, HOST_NETWORK, config_file_env, host_port=41234)

    body, warnings = container_create_body(spec)

    assert [e for e in body["Env"] if e.startswith("PORT=")] == ["PORT=41234"]
    given = (own_env or config_file_env)[0]
    assert warnings == (
        f"{given} in Env replaced by PORT=41234: on the host's network wunderproxy picks "
        "the app's port, and the app must listen on 127.0.0.1:$PORT",
    )


def test_on_the_hosts_network_port_bindings_go_and_exposed_ports_are_named_as_unused() -> None:
    spec = make_spec(
        {"ExposedPorts": {"9292/tcp": {}}},
        {**HOST_NETWORK, "PortBindings": {"9292/tcp": [{"HostPort": "80"}]}},
        host_port=41234,
    )

    body, warnings = container_create_body(spec)

    assert "PortBindings" not in body["HostConfig"]
    assert body["ExposedPorts"] == {"9292/tcp": {}}  # kept as written, for Docker's listing
    assert warnings == (
        "PortBindings dropped: on the host's network nothing is published; the app listens "
        "on 127.0.0.1:41234 itself (PORT)",
        "ExposedPorts ['9292/tcp'] not used: on the host's network the app must listen on "
        "127.0.0.1:$PORT (PORT=41234), where the proxy connects",
    )
