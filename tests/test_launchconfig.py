from __future__ import annotations

import json
from typing import Any

import pytest

from tests.support.configs import encode_config, example_config
from wunderproxy.errors import BadRequest, InvalidConfig
from wunderproxy.launchconfig import (
    LaunchConfig,
    md5_hex,
    merged_host_config,
    parse_hash,
    parse_launch_config,
)


def parse(config: dict[str, Any]) -> LaunchConfig:
    hash_, raw = encode_config(config)
    return parse_launch_config(raw, hash_)


def test_md5_hex_is_the_lowercase_hex_digest() -> None:
    assert md5_hex(b"") == "d41d8cd98f00b204e9800998ecf8427e"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("d41d8cd98f00b204e9800998ecf8427e", "d41d8cd98f00b204e9800998ecf8427e"),
        ("  D41D8CD98F00B204E9800998ECF8427E\r\n", "d41d8cd98f00b204e9800998ecf8427e"),
        ("\td41d8cd98f00b204e9800998ecf8427e ", "d41d8cd98f00b204e9800998ecf8427e"),
    ],
)
def test_parse_hash_accepts_surrounding_whitespace_and_uppercase(text: str, expected: str) -> None:
    assert parse_hash(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "d41d8cd98f00b204e9800998ecf8427",  # 31 digits
        "d41d8cd98f00b204e9800998ecf8427e0",  # 33 digits
        "g41d8cd98f00b204e9800998ecf8427e",
        "d41d8cd98f00b204 e9800998ecf8427e",
        "container.d41d8cd98f00b204e9800998ecf8427e.json",
        "x" * 10_000,
    ],
)
def test_parse_hash_refuses_anything_but_32_hex_digits(text: str) -> None:
    with pytest.raises(BadRequest, match="32-hex-digit MD5") as caught:
        parse_hash(text)
    assert len(str(caught.value)) < 200  # a huge body is quoted truncated


def test_valid_config_parses_with_every_field() -> None:
    config = example_config(
        ContainerConfig={
            "Image": "localhost:8080/myapp:2f1c9a7",
            "Env": ["RACK_ENV=production"],
            "Cmd": ["bundle", "exec", "unicorn", "-p", "9393"],
            "Entrypoint": "/docker-entrypoint.sh",
            "ExposedPorts": {"9393/tcp": {}},
            "Labels": {"team": "web"},
        }
    )
    hash_, raw = encode_config(config)

    parsed = parse_launch_config(raw, hash_)

    assert parsed == LaunchConfig(
        hash=hash_,
        raw=raw,
        revision="2f1c9a7",
        image="localhost:8080/myapp:2f1c9a7",
        health_check_path="/health",
        container_config=config["ContainerConfig"],
        host_config={"Memory": 536870912},
        artifacts_bucket="myapp-images",
        app_port="9393/tcp",
    )


def test_optional_fields_default_when_absent() -> None:
    parsed = parse({"Revision": "r1", "HealthCheckPath": "/"})

    assert parsed.image is None
    assert parsed.container_config == {}
    assert parsed.host_config == {}
    assert parsed.artifacts_bucket is None
    assert parsed.app_port == "9292/tcp"


@pytest.mark.parametrize(
    ("host_config", "host_network"),
    [
        ({"NetworkMode": "host"}, True),
        ({"NetworkMode": "bridge"}, False),
        ({"NetworkMode": "default"}, False),
        ({"NetworkMode": "my-network"}, False),
        ({"NetworkMode": ""}, False),
        ({}, False),
    ],
)
def test_only_network_mode_host_runs_on_the_hosts_network(
    host_config: dict[str, Any], host_network: bool
) -> None:
    parsed = parse(example_config(HostConfig=host_config))

    assert parsed.host_network is host_network
    assert parsed.host_config == host_config  # passed to Docker as written


@pytest.mark.parametrize(
    ("nested", "top", "host_network"),
    [
        ({"NetworkMode": "host"}, {}, True),
        ({"NetworkMode": "host"}, {"Memory": 1}, True),
        ({"NetworkMode": "host"}, {"NetworkMode": "bridge"}, False),  # the top level wins
        ({"NetworkMode": "bridge"}, {"NetworkMode": "host"}, True),
        ({"NetworkMode": "bridge"}, {}, False),
    ],
)
def test_network_mode_is_read_from_the_hostconfig_docker_gets_nested_one_included(
    nested: dict[str, Any], top: dict[str, Any], host_network: bool
) -> None:
    config = container(HostConfig=nested)
    config["HostConfig"] = top

    parsed = parse(config)

    assert parsed.host_network is host_network
    assert merged_host_config(parsed.container_config, parsed.host_config)["NetworkMode"] == (
        "host" if host_network else "bridge"
    )


def test_on_the_hosts_network_several_exposed_ports_are_accepted() -> None:
    exposed = {"80/tcp": {}, "443/tcp": {}, "53/udp": {}}

    parsed = parse(container(ExposedPorts=exposed, HostConfig={"NetworkMode": "host"}))

    assert parsed.host_network
    assert parsed.container_config["ExposedPorts"] == exposed  # passed to Docker as written


@pytest.mark.parametrize(
    ("exposed", "port"),
    [({}, "9292/tcp"), ({"3000": {}}, "3000/tcp"), ({"8080/tcp": {}}, "8080/tcp")],
)
def test_app_port_is_the_single_exposed_port_as_tcp(exposed: dict[str, Any], port: str) -> None:
    config = example_config(ContainerConfig={"ExposedPorts": exposed})
    assert parse(config).app_port == port


def test_null_optional_fields_count_as_absent() -> None:
    config = example_config(
        HostConfig=None,
        ArtifactsBucket=None,
        ContainerConfig={"Image": None, "Env": None, "Cmd": None, "ExposedPorts": None},
    )

    parsed = parse(config)

    assert (parsed.image, parsed.host_config, parsed.artifacts_bucket) == (None, {}, None)
    assert parsed.app_port == "9292/tcp"


def test_empty_artifacts_bucket_means_none() -> None:
    assert parse(example_config(ArtifactsBucket="")).artifacts_bucket is None


def test_unknown_fields_are_kept_in_raw_and_container_config() -> None:
    config = example_config(Owner="ops")
    config["ContainerConfig"]["StopSignal"] = "SIGQUIT"

    parsed = parse(config)

    assert json.loads(parsed.raw)["Owner"] == "ops"
    assert parsed.container_config["StopSignal"] == "SIGQUIT"


def without(key: str) -> dict[str, Any]:
    config = example_config()
    del config[key]
    return config


def container(**fields: Any) -> dict[str, Any]:
    config = example_config()
    config["ContainerConfig"].update(fields)
    return config


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (without("Revision"), "Revision is required"),
        (example_config(Revision=None), "Revision is required"),
        (example_config(Revision=7), "Revision must be a string, got number"),
        (example_config(Revision=""), "Revision must not be empty"),
        (example_config(Revision="v1:2"), "Revision 'v1:2' is not usable as a Docker tag"),
        (example_config(Revision="-v1"), "Revision '-v1' is not usable as a Docker tag"),
        (example_config(Revision="a" * 129), "is not usable as a Docker tag"),
        (without("HealthCheckPath"), "HealthCheckPath is required"),
        (example_config(HealthCheckPath=["/"]), "HealthCheckPath must be a string, got array"),
        (example_config(HealthCheckPath="health"), "HealthCheckPath 'health' must be a path"),
        (example_config(HealthCheckPath="/a b"), "HealthCheckPath '/a b' must be a path"),
        (example_config(HealthCheckPath="/\u00e9"), "HealthCheckPath '/\u00e9' must be a path"),
        (example_config(ContainerConfig=[]), "ContainerConfig must be a JSON object, got array"),
        (example_config(HostConfig="big"), "HostConfig must be a JSON object, got string"),
        (example_config(ArtifactsBucket=True), "ArtifactsBucket must be a string, got boolean"),
        (container(Image=1), "ContainerConfig.Image must be a string, got number"),
        (container(Image=""), "ContainerConfig.Image must not be empty"),
        (container(Env=1), "ContainerConfig.Env must be an array of strings, got number"),
        (container(Env="A=1"), "ContainerConfig.Env must be an array of strings, got string"),
        (container(Env=["A=1", 2]), "ContainerConfig.Env[1] must be a string, got number"),
        (container(Cmd={"a": 1}), "ContainerConfig.Cmd must be an array of strings or a string"),
        (container(Cmd=["a", None]), "ContainerConfig.Cmd[1] must be a string, got null"),
        (container(Entrypoint=5), "ContainerConfig.Entrypoint must be an array of strings or"),
        (container(ExposedPorts=["9292"]), "ContainerConfig.ExposedPorts must be a JSON object"),
        (
            container(ExposedPorts={"80/tcp": {}, "443/tcp": {}}),
            "ContainerConfig.ExposedPorts must name at most one port",
        ),
        (container(ExposedPorts={"53/udp": {}}), "ContainerConfig.ExposedPorts key '53/udp'"),
        (container(ExposedPorts={"70000": {}}), "ContainerConfig.ExposedPorts key '70000'"),
        (container(Labels=["a"]), "ContainerConfig.Labels must be a JSON object, got array"),
        (container(Labels={"a": 1}), "ContainerConfig.Labels.a must be a string, got number"),
        (
            example_config(HostConfig={"NetworkMode": 1}),
            "HostConfig.NetworkMode must be a string, got number",
        ),
        (
            example_config(HostConfig={"NetworkMode": "none"}),
            "HostConfig.NetworkMode 'none' leaves the proxy no way to reach the app",
        ),
        (
            example_config(HostConfig={"NetworkMode": "container:web"}),
            "HostConfig.NetworkMode 'container:web' leaves the proxy no way to reach the app",
        ),
        (container(HostConfig=[]), "ContainerConfig.HostConfig must be a JSON object, got array"),
        (
            container(HostConfig={"NetworkMode": 1}),
            "ContainerConfig.HostConfig.NetworkMode must be a string, got number",
        ),
        (
            container(HostConfig={"NetworkMode": "none"}),
            "ContainerConfig.HostConfig.NetworkMode 'none' leaves the proxy no way to reach",
        ),
        (
            container(HostConfig={"NetworkMode": "container:web"}),
            "ContainerConfig.HostConfig.NetworkMode 'container:web' leaves the proxy no way",
        ),
    ],
)
def test_missing_or_wrongly_typed_field_is_refused_naming_the_field(
    config: dict[str, Any], message: str
) -> None:
    hash_, raw = encode_config(config)

    with pytest.raises(InvalidConfig) as caught:
        parse_launch_config(raw, hash_)

    assert message in str(caught.value)
    assert f"container.{hash_}.json is invalid" in str(caught.value)


def test_config_whose_bytes_do_not_match_hash_is_refused_naming_both_hashes() -> None:
    hash_, raw = encode_config(example_config())
    edited = raw.replace(b"2f1c9a7", b"2f1c9a8")

    with pytest.raises(InvalidConfig) as caught:
        parse_launch_config(edited, hash_)

    assert str(caught.value) == (
        f"container.{hash_}.json has MD5 {md5_hex(edited)}, not {hash_}; re-upload it under "
        f"its real hash as container.{md5_hex(edited)}.json"
    )


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            b'{"Revision": "r1",\n "HealthCheckPath": }',
            "is not valid JSON: Expecting value: line 2",
        ),
        (b"", "is not valid JSON: Expecting value: line 1 column 1"),
        (b'{"Revision": "\xff"}', "is not valid JSON"),
        (b"[" * 100_000, "is not valid JSON"),
        (b'["Revision"]', "the document must be a JSON object, got array"),
        (b"null", "the document must be a JSON object, got null"),
    ],
)
def test_bytes_that_are_not_a_json_object_are_refused(raw: bytes, message: str) -> None:
    with pytest.raises(InvalidConfig, match=r"container\.[0-9a-f]{32}\.json") as caught:
        parse_launch_config(raw, md5_hex(raw))

    assert message in str(caught.value)


def test_errors_name_the_source_when_given() -> None:
    raw = b"{}"

    with pytest.raises(InvalidConfig, match=r"^current\.json is invalid: Revision is required"):
        parse_launch_config(raw, md5_hex(raw), source="current.json")
