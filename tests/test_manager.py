"""The manager API and the controller behind it, with fakes only at the seams.

The store is in memory and the engine is a fake, but every "container" it starts is a real
in-process HTTP server, so the real health check probes it over a real socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import struct
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

import h11
import pytest
import uvloop

from tests.support.backend import Backend, running_backend
from tests.support.configs import (
    encode_config,
    example_config,
    manager_config,
    upload_launch_config,
)
from tests.support.fakes import FakeEngine, MemoryStore, offered_ports
from tests.support.waiting import eventually
from tests.support.wire import Answer, read_answer, send_request
from wunderproxy import dockerwatch
from wunderproxy import manager as manager_module
from wunderproxy.config import Address, Fleet, Peer
from wunderproxy.controller import Controller, Startup
from wunderproxy.engine import (
    LABEL_APP,
    LABEL_HASH,
    LABEL_INSTANCE,
    LABEL_REVISION,
    ContainerRecord,
)
from wunderproxy.fallback import Fallback
from wunderproxy.hostports import HostPorts
from wunderproxy.manager import (
    MAX_BODY,
    ApiRequest,
    Manager,
    Reply,
    json_reply,
    serve_connection,
)
from wunderproxy.state import Container, Home, ProxyState
from wunderproxy.store import CURRENT_KEY, HISTORY_KEY, config_key, load_current
from wunderproxy.streams import close_after_refusal

APP = "myapp"
VERSION = "0.1.0"
TOKEN = "s3cret-token"
UNKNOWN_HASH = "0123456789abcdef0123456789abcdef"

LAUNCHED = re.compile(
    r"started container (?P<id8>[0-9a-f]{8}) with revision (?P<rev>\S+) "
    r"listening on port (?P<port>\d+)\n"
)
SWITCHED = re.compile(r"switched proxy to port (?P<port>\d+) of container (?P<id8>[0-9a-f]{8})")


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    async with running_backend("app") as started:
        yield started


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def engine(backend: Backend) -> Iterator[FakeEngine]:
    fake = FakeEngine("127.0.0.1", backend.port)
    yield fake
    fake.release()  # never leave a pool thread blocked in ensure_image


@pytest.fixture
def state() -> ProxyState:
    return ProxyState(APP, VERSION)


@pytest.fixture
async def controller(
    state: ProxyState, store: MemoryStore, engine: FakeEngine
) -> AsyncIterator[Controller]:
    made = Controller(manager_config(), state, store, engine)
    yield made
    engine.release()
    await made.shutdown(grace=1.0)


@pytest.fixture
def manager(controller: Controller, state: ProxyState) -> Manager:
    return Manager(controller, state, token=None)


@pytest.fixture
async def serving(manager: Manager, store: MemoryStore, state: ProxyState) -> Container:
    """A container launched and switched to before the test: it must keep serving."""
    config_hash = upload(store, "rev0")
    assert (await post(manager, "/launch", config_hash)).status == 200
    assert (await post(manager, "/switch", config_hash)).status == 200
    current = state.current
    assert current is not None
    return current


# -- helpers ----------------------------------------------------------------------------


def upload(store: MemoryStore, revision: str, **fields: Any) -> str:
    return upload_launch_config(store, example_config(Revision=revision, **fields))


def request(
    method: str,
    path: str,
    body: str | bytes = b"",
    *,
    peer: str | None = "127.0.0.1",
    headers: dict[str, str] | None = None,
) -> ApiRequest:
    """An API request as serve_connection hands it over (header names in lower case)."""
    data = body.encode() if isinstance(body, str) else body
    return ApiRequest(method, path, headers or {}, data, peer)


async def post(
    manager: Manager,
    path: str,
    body: str | bytes,
    *,
    peer: str | None = "127.0.0.1",
    headers: dict[str, str] | None = None,
) -> Reply:
    return await manager.handle(request("POST", path, body, peer=peer, headers=headers))


def error_of(reply: Reply) -> str:
    """The message of a JSON error answer; fails unless the answer is one."""
    assert reply.content_type == "application/json"
    document = json.loads(reply.body)
    assert set(document) == {"error"}
    message = document["error"]
    assert isinstance(message, str)
    assert message.strip()
    return message


def assert_still_serving(state: ProxyState, engine: FakeEngine, serving: Container) -> None:
    assert state.current is serving
    assert serving.state == "serving"
    assert serving.container_id not in engine.removed_ids


async def blocked_in_ensure_image(
    engine: FakeEngine, coroutine: Coroutine[Any, Any, Reply]
) -> asyncio.Task[Reply]:
    """Run ``coroutine`` as a task; return once it waits in the held ``ensure_image``."""
    task = asyncio.create_task(coroutine)
    await eventually(engine.image_requested.is_set)
    return task


# -- /status ----------------------------------------------------------------------------


async def test_status_answers_200_json_with_every_key_of_the_spec_example(
    manager: Manager, serving: Container
) -> None:
    reply = await manager.handle(request("GET", "/status", peer="10.1.2.3"))
    assert reply.status == 200
    assert reply.content_type == "application/json"
    status = json.loads(reply.body)
    assert {
        "app",
        "version",
        "uptime_seconds",
        "current",
        "containers",
        "requests",
        "connections",
        "docker",
        "Requests",
        "TotalTime",
        "States",
        "DockerState",
    } <= set(status)
    assert (status["app"], status["version"]) == (APP, VERSION)
    assert isinstance(status["uptime_seconds"], int | float)
    current = status["current"]
    assert {"revision", "hash", "image", "container_id", "port", "started_at"} <= set(current)
    assert current["revision"] == "rev0"
    assert current["container_id"] == serving.container_id
    assert current["port"] == serving.port
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", current["started_at"])
    [described] = status["containers"]
    assert {"revision", "hash", "state", "port"} <= set(described)
    assert described["state"] == "serving"
    assert set(status["requests"]) >= {"total", "since_switch", "by_status"}
    assert isinstance(status["requests"]["by_status"], dict)
    assert set(status["connections"]) >= {"open", "active", "idle"}
    assert status["docker"]["state"] == "ok"
    assert isinstance(status["Requests"], int)
    assert isinstance(status["TotalTime"], int | float)
    assert set(status["States"]) >= {"active", "idle"}
    assert status["DockerState"] == "Ok"
    assert {"since_start", "by_revision", "minutes"} <= set(status["traffic"])
    assert isinstance(status["events"], list) and isinstance(status["deploys"], list)


async def test_status_names_the_instance_and_the_store_as_given_on_the_command_line(
    controller: Controller,
) -> None:
    home = Home("web-2", "file:///var/lib/wunderproxy", "deploys/myapp")
    manager = Manager(controller, ProxyState(APP, VERSION, home), token=None)
    status = json.loads((await manager.handle(request("GET", "/status"))).body)
    assert status["instance"] == "web-2"
    assert status["store"] == {"bucket": "file:///var/lib/wunderproxy", "prefix": "deploys/myapp"}
    assert {"app", "current", "requests", "DockerState"} <= set(status), "the others stay"


async def test_a_browser_asking_for_status_gets_the_page_and_a_monitor_gets_json(
    manager: Manager,
) -> None:
    browser = request("GET", "/status", headers={"accept": "text/html,application/xhtml+xml"})
    page = await manager.handle(browser)
    assert (page.status, page.content_type) == (200, "text/html; charset=utf-8")
    assert page.body == (await manager.handle(request("GET", "/"))).body
    assert ("Vary", "Accept") in page.headers
    for accept in ("", "*/*", "application/json", "application/json, text/html"):
        reply = await manager.handle(request("GET", "/status", headers={"accept": accept}))
        assert reply.content_type == "application/json"
        assert ("Vary", "Accept") in reply.headers


async def test_metrics_are_prometheus_text_with_the_proxy_figures(
    manager: Manager, serving: Container, state: ProxyState
) -> None:
    state.request_finished("rev0", 200, 0.003, 100, 200)
    reply = await manager.handle(request("GET", "/metrics", peer="10.1.2.3"))
    assert reply.status == 200
    assert reply.content_type == "text/plain; version=0.0.4; charset=utf-8"
    text = reply.body.decode()
    assert 'wunderproxy_requests_total{code="200",revision="rev0"} 1.0' in text
    assert 'wunderproxy_request_duration_seconds_bucket{le="0.0025",revision="rev0"} 0.0' in text
    assert 'wunderproxy_request_duration_seconds_bucket{le="0.005",revision="rev0"} 1.0' in text
    assert "wunderproxy_current_revision_info{" in text and 'revision="rev0"' in text
    assert "process_resident_memory_bytes" in text


# -- Docker unreachable ----------------------------------------------------------------


async def docker_seen(manager: Manager) -> tuple[dict[str, str], str, str]:
    """What /status (``docker``, ``DockerState``) and /metrics say of the engine."""
    status = json.loads((await manager.handle(request("GET", "/status"))).body)
    metrics = (await manager.handle(request("GET", "/metrics"))).body.decode()
    up = re.search(r"^wunderproxy_docker_up (\S+)$", metrics, re.MULTILINE)
    assert up is not None, metrics
    return status["docker"], status["DockerState"], up.group(1)


async def test_an_engine_that_does_not_answer_shows_in_status_and_metrics_until_it_answers(
    manager: Manager,
    store: MemoryStore,
    engine: FakeEngine,
    serving: Container,
    state: ProxyState,
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert await docker_seen(manager) == ({"state": "ok"}, "Ok", "1.0")
    new_hash = upload(store, "rev1")
    engine.unreachable()
    with caplog.at_level(logging.INFO, logger="wunderproxy.manager"):
        for _ in range(2):
            reply = await post(manager, "/launch", new_hash)
            assert reply.status == 502
            assert "Docker engine unreachable" in error_of(reply)
        docker, docker_state, up = await docker_seen(manager)
        assert docker == {"state": "error", "error": error_of(reply)}
        assert (docker_state, up) == ("Error", "0.0")
        assert "is dockerd running?" in docker["error"]
        assert_still_serving(state, engine, serving)
        engine.reachable()
        assert (await post(manager, "/launch", new_hash)).status == 200
    assert await docker_seen(manager) == ({"state": "ok"}, "Ok", "1.0")
    # Logged once when it went, once when it came back; not once per failed call.
    went = [r for r in caplog.records if "Until it answers" in r.getMessage()]
    assert [r.levelname for r in went] == ["ERROR"]
    assert caplog.text.count("the Docker engine answers again") == 1


async def test_an_engine_that_answers_with_a_refusal_is_up(
    manager: Manager, store: MemoryStore, engine: FakeEngine, serving: Container
) -> None:
    engine.fail_on("ensure_image", "pull access denied")
    assert (await post(manager, "/launch", upload(store, "rev1"))).status == 502
    assert await docker_seen(manager) == ({"state": "ok"}, "Ok", "1.0")


async def test_the_probe_follows_the_engine_going_and_coming_back_with_no_request_at_all(
    manager: Manager,
    controller: Controller,
    engine: FakeEngine,
    state: ProxyState,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dockerwatch, "PROBE_INTERVAL_OK", 0.05)
    monkeypatch.setattr(dockerwatch, "PROBE_INTERVAL_ERROR", 0.05)
    controller.watch_docker()
    await eventually(lambda: len(engine.called("ping")) >= 2)
    assert state.docker_error is None
    engine.unreachable()
    await eventually(lambda: state.docker_error is not None)
    assert (await docker_seen(manager))[1:] == ("Error", "0.0")
    engine.reachable()
    await eventually(lambda: state.docker_error is None)
    assert await docker_seen(manager) == ({"state": "ok"}, "Ok", "1.0")
    assert {call.method for call in engine.calls} == {"ping", "deaths"}, "nothing but pings"


async def test_status_with_nothing_deployed_shows_no_current_container(
    manager: Manager,
) -> None:
    status = json.loads((await manager.handle(request("GET", "/status"))).body)
    assert status["current"] is None
    assert status["containers"] == []


async def test_status_answers_head_too(manager: Manager) -> None:
    reply = await manager.handle(request("HEAD", "/status"))
    assert reply.status == 200


async def test_status_shows_every_container_with_its_state_during_a_drain(
    manager: Manager, store: MemoryStore, serving: Container
) -> None:
    serving.request_started()  # keeps it draining
    new_hash = upload(store, "rev1")
    assert (await post(manager, "/launch", new_hash)).status == 200
    launched = json.loads((await manager.handle(request("GET", "/status"))).body)
    assert [(c["revision"], c["state"]) for c in launched["containers"]] == [
        ("rev0", "serving"),
        ("rev1", "launched"),
    ]
    assert (await post(manager, "/switch", new_hash)).status == 200
    switched = json.loads((await manager.handle(request("GET", "/status"))).body)
    assert switched["current"]["revision"] == "rev1"
    assert [(c["revision"], c["state"]) for c in switched["containers"]] == [
        ("rev0", "draining"),
        ("rev1", "serving"),
    ]
    serving.request_finished()


# -- /launch ----------------------------------------------------------------------------


async def test_launch_answers_the_container_revision_and_port_in_text(
    manager: Manager, store: MemoryStore, engine: FakeEngine, state: ProxyState
) -> None:
    config_hash = upload(store, "rev1")
    reply = await post(manager, "/launch", config_hash)
    assert reply.status == 200, reply.body
    assert reply.content_type.startswith("text/plain")
    match = LAUNCHED.fullmatch(reply.body.decode())
    assert match is not None, reply.body
    [container_id] = engine.started_ids
    assert match["id8"] == container_id[:8]
    assert match["rev"] == "rev1"
    assert int(match["port"]) == engine.port
    [container] = state.containers
    assert (container.hash, container.state) == (config_hash, "launched")
    assert state.current is None, "a launch alone must not switch"


async def test_launch_passes_the_config_and_labels_to_the_engine(
    manager: Manager, store: MemoryStore, engine: FakeEngine
) -> None:
    config_hash = upload(store, "rev1")
    assert (await post(manager, "/launch", config_hash)).status == 200
    assert engine.called("ensure_image") == [("localhost:8080/myapp:2f1c9a7",)]
    [spec] = engine.specs
    assert spec.app_port == "9292/tcp"
    assert spec.host_config == {"Memory": 536870912}
    assert spec.labels == {
        "wunderproxy.app": APP,
        "wunderproxy.revision": "rev1",
        "wunderproxy.hash": config_hash,
        "wunderproxy.instance": socket.gethostname(),
    }


async def test_launch_of_a_config_without_image_pulls_the_app_image_of_its_revision(
    manager: Manager, store: MemoryStore, engine: FakeEngine
) -> None:
    config_hash = upload(store, "rev1", ContainerConfig={"Env": ["A=1"]})
    assert (await post(manager, "/launch", config_hash)).status == 200
    assert engine.called("ensure_image") == [("localhost:8080/myapp:rev1",)]
    assert engine.specs[0].image == "localhost:8080/myapp:rev1"


async def test_launch_with_accept_json_answers_the_same_facts_as_json(
    manager: Manager, store: MemoryStore, engine: FakeEngine
) -> None:
    config_hash = upload(store, "rev1")
    reply = await post(manager, "/launch", config_hash, headers={"accept": "application/json"})
    assert reply.status == 200
    assert reply.content_type == "application/json"
    document = json.loads(reply.body)
    [container_id] = engine.started_ids
    assert document["container_id"] == container_id
    assert document["revision"] == "rev1"
    assert document["hash"] == config_hash
    assert document["port"] == engine.port
    assert document["started"] is True
    assert LAUNCHED.fullmatch(document["message"] + "\n")


async def test_launch_ignores_whitespace_around_the_hash(
    manager: Manager, store: MemoryStore
) -> None:
    config_hash = upload(store, "rev1")
    reply = await post(manager, "/launch", f"  \t{config_hash}\r\n\n")
    assert reply.status == 200, reply.body


async def test_launching_a_hash_already_running_is_a_no_op_answering_200(
    manager: Manager, store: MemoryStore, engine: FakeEngine
) -> None:
    config_hash = upload(store, "rev1")
    assert (await post(manager, "/launch", config_hash)).status == 200
    again = await post(manager, "/launch", config_hash, headers={"accept": "application/json"})
    assert again.status == 200
    document = json.loads(again.body)
    assert document["started"] is False
    assert document["container_id"] == engine.started_ids[0]
    assert len(engine.called("start")) == 1


async def test_launching_a_hash_whose_container_died_starts_a_new_one(
    manager: Manager, store: MemoryStore, engine: FakeEngine, state: ProxyState
) -> None:
    config_hash = upload(store, "rev1")
    assert (await post(manager, "/launch", config_hash)).status == 200
    dead = engine.started_ids[0]
    engine.exit(dead, "Killed (OOM)")
    again = await post(manager, "/launch", config_hash)
    assert again.status == 200
    assert again.body.startswith(b"started container")
    assert len(engine.called("start")) == 2
    assert [c.container_id for c in state.containers] == [engine.started_ids[1]]
    assert dead in engine.removed_ids


async def test_relaunching_the_serving_hash_after_its_container_died_switches_to_the_new_one(
    manager: Manager, store: MemoryStore, engine: FakeEngine, state: ProxyState
) -> None:
    config_hash = upload(store, "rev1")
    assert (await post(manager, "/launch", config_hash)).status == 200
    assert (await post(manager, "/switch", config_hash)).status == 200
    engine.exit(engine.started_ids[0], "Killed (OOM)")
    assert (await post(manager, "/launch", config_hash)).status == 200
    assert state.current is not None
    assert state.current.container_id == engine.started_ids[1]


async def test_launching_the_hash_serving_now_is_a_no_op_answering_200(
    manager: Manager, engine: FakeEngine, serving: Container
) -> None:
    reply = await post(manager, "/launch", serving.hash)
    assert reply.status == 200
    assert serving.container_id[:8] in reply.body.decode()
    assert len(engine.called("start")) == 1


async def test_two_concurrent_launches_of_one_hash_start_exactly_one_container(
    manager: Manager, store: MemoryStore, engine: FakeEngine, state: ProxyState
) -> None:
    config_hash = upload(store, "rev1")
    first, second = await asyncio.gather(
        post(manager, "/launch", config_hash), post(manager, "/launch", config_hash)
    )
    assert (first.status, second.status) == (200, 200)
    assert len(engine.called("start")) == 1
    [container_id] = engine.started_ids
    assert container_id[:8] in first.body.decode()
    assert container_id[:8] in second.body.decode()
    assert len(state.containers) == 1


@pytest.mark.parametrize(
    "body", ["not-a-hash", UNKNOWN_HASH[:-1], UNKNOWN_HASH + "0", "g" * 32, f"{UNKNOWN_HASH} x"]
)
async def test_launch_of_a_malformed_hash_answers_400(
    manager: Manager, engine: FakeEngine, body: str
) -> None:
    reply = await post(manager, "/launch", body)
    assert reply.status == 400
    assert "not a config hash" in error_of(reply)
    assert engine.calls == []


@pytest.mark.parametrize("body", [b"", b"   \r\n"])
async def test_launch_with_an_empty_body_answers_400(
    manager: Manager, engine: FakeEngine, body: bytes
) -> None:
    reply = await post(manager, "/launch", body)
    assert reply.status == 400
    assert "empty" in error_of(reply)
    assert engine.calls == []


async def test_launch_with_a_body_that_is_not_ascii_answers_400(manager: Manager) -> None:
    reply = await post(manager, "/launch", "é".encode() * 16)
    assert reply.status == 400
    error_of(reply)


async def test_launch_of_an_unknown_hash_answers_404_naming_the_key(
    manager: Manager, engine: FakeEngine, serving: Container, state: ProxyState
) -> None:
    reply = await post(manager, "/launch", UNKNOWN_HASH)
    assert reply.status == 404
    assert config_key(UNKNOWN_HASH) in error_of(reply)
    assert len(engine.called("start")) == 1  # only the serving one
    assert_still_serving(state, engine, serving)


async def test_launch_of_a_config_whose_bytes_do_not_match_its_hash_answers_422(
    manager: Manager, store: MemoryStore, engine: FakeEngine, serving: Container, state: ProxyState
) -> None:
    real_hash, raw = encode_config(example_config(Revision="rev1"))
    store.objects[config_key(UNKNOWN_HASH)] = raw
    reply = await post(manager, "/launch", UNKNOWN_HASH)
    assert reply.status == 422
    message = error_of(reply)
    assert real_hash in message
    assert len(engine.called("start")) == 1
    assert_still_serving(state, engine, serving)


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({k: v for k, v in example_config().items() if k != "Revision"}, "Revision"),
        (
            example_config(ContainerConfig={"Env": "RACK_ENV=production"}),
            "ContainerConfig.Env",
        ),
        (example_config(HealthCheckPath=7), "HealthCheckPath"),
    ],
    ids=["missing-Revision", "Env-a-string", "HealthCheckPath-a-number"],
)
async def test_launch_of_an_invalid_config_answers_422_naming_the_field(
    manager: Manager,
    store: MemoryStore,
    engine: FakeEngine,
    serving: Container,
    state: ProxyState,
    config: dict[str, Any],
    field: str,
) -> None:
    config_hash = upload_launch_config(store, config)
    reply = await post(manager, "/launch", config_hash)
    assert reply.status == 422
    assert field in error_of(reply)
    assert len(engine.called("start")) == 1
    assert_still_serving(state, engine, serving)


async def test_launch_answers_502_and_starts_nothing_when_the_image_cannot_be_pulled(
    manager: Manager, store: MemoryStore, engine: FakeEngine, serving: Container, state: ProxyState
) -> None:
    engine.fail_on("ensure_image", "registry unreachable")
    reply = await post(manager, "/launch", upload(store, "rev1"))
    assert reply.status == 502
    assert "registry unreachable" in error_of(reply)
    assert len(engine.called("start")) == 1  # only the serving one
    assert state.containers == [serving]
    assert_still_serving(state, engine, serving)


async def test_launch_answers_502_when_the_engine_cannot_start_the_container(
    manager: Manager, store: MemoryStore, engine: FakeEngine, serving: Container, state: ProxyState
) -> None:
    engine.fail_on("start", "port already allocated")
    reply = await post(manager, "/launch", upload(store, "rev1"))
    assert reply.status == 502
    assert "port already allocated" in error_of(reply)
    assert state.containers == [serving]
    assert_still_serving(state, engine, serving)


async def test_a_container_that_exits_while_starting_answers_502_quoting_its_logs(
    manager: Manager, store: MemoryStore, engine: FakeEngine, serving: Container, state: ProxyState
) -> None:
    engine.exit_while_starting("booting\nLoadError: cannot load such file -- pg\n")
    config_hash = upload(store, "rev1", HealthCheckPath="/status/503")
    reply = await post(manager, "/launch", config_hash)
    assert reply.status == 502
    message = error_of(reply)
    assert "LoadError: cannot load such file -- pg" in message
    assert "exited" in message
    new_id = engine.started_ids[-1]
    assert new_id[:8] in message
    assert new_id in engine.removed_ids
    assert state.containers == [serving]
    assert_still_serving(state, engine, serving)


async def test_a_container_never_healthy_answers_504_and_is_removed(
    manager: Manager, store: MemoryStore, engine: FakeEngine, serving: Container, state: ProxyState
) -> None:
    config_hash = upload(store, "rev1", HealthCheckPath="/status/404")
    reply = await post(manager, "/launch", config_hash)
    assert reply.status == 504
    message = error_of(reply)
    assert "404" in message
    new_id = engine.started_ids[-1]
    assert engine.removed_ids == [new_id]
    assert state.containers == [serving]
    assert_still_serving(state, engine, serving)
    # The failed hash can be launched again once fixed: nothing is left pending.
    assert (await post(manager, "/switch", config_hash)).status == 404
    failed = state.events.newest_first()[0]
    assert (failed.kind, failed.revision, failed.config_hash) == ("failed", "rev1", config_hash)
    assert "404" in failed.detail and failed.seconds is not None
    assert state.events.results["failed"] == 1


async def test_a_launch_of_an_unknown_hash_is_a_failed_deploy_event_naming_why(
    manager: Manager, state: ProxyState
) -> None:
    reply = await post(manager, "/launch", "0" * 32)
    assert reply.status == 404
    failed = state.events.newest_first()[0]
    assert (failed.kind, failed.revision) == ("failed", "?")
    assert failed.detail == error_of(reply)


async def test_deploy_events_are_timed_in_the_same_format_as_every_other_moment_in_status(
    manager: Manager, serving: Container
) -> None:
    status = json.loads((await manager.handle(request("GET", "/status"))).body)
    moments = [event["at"] for event in status["events"]]
    assert len(moments) == 3  # launch, healthy, switch
    rfc3339_seconds = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
    assert rfc3339_seconds.fullmatch(status["current"]["started_at"])
    for moment in moments:
        assert rfc3339_seconds.fullmatch(moment), moment


async def test_a_failure_to_remove_the_unhealthy_container_still_answers_504(
    manager: Manager, store: MemoryStore, engine: FakeEngine, serving: Container, state: ProxyState
) -> None:
    engine.fail_on("remove", "daemon not responding")
    reply = await post(manager, "/launch", upload(store, "rev1", HealthCheckPath="/status/404"))
    assert reply.status == 504
    assert engine.removed_ids == [engine.started_ids[-1]]
    assert_still_serving(state, engine, serving)


# -- /launch on the host's network -------------------------------------------------------

HOST_NETWORK = {"NetworkMode": "host"}


@contextlib.asynccontextmanager
async def host_network_manager(
    state: ProxyState, store: MemoryStore, engine: FakeEngine, *ports: int, api: str = "127.0.0.1:0"
) -> AsyncIterator[Manager]:
    """A manager whose host-network launches are offered ``ports`` as the free ones, its
    config saying that the API listens on ``api``."""
    config = manager_config(api=Address.parse(api, "--api"))
    controller = Controller(config, state, store, engine, HostPorts(offered_ports(*ports)))
    try:
        yield Manager(controller, state, token=None)
    finally:
        engine.release()
        await controller.shutdown(grace=1.0)


async def test_a_host_network_launch_skips_the_port_of_a_container_already_running(
    manager: Manager, store: MemoryStore, engine: FakeEngine, state: ProxyState, serving: Container
) -> None:
    async with host_network_manager(state, store, engine, serving.port, 40002) as host:
        config_hash = upload(store, "rev1", HostConfig=HOST_NETWORK)
        assert (await post(host, "/launch", config_hash)).status == 200
    assert [spec.host_port for spec in engine.specs] == [None, 40002]


async def test_two_host_network_launches_at_once_get_different_ports(
    store: MemoryStore, engine: FakeEngine, state: ProxyState
) -> None:
    async with host_network_manager(state, store, engine, 40001, 40001, 40002) as host:
        engine.hold("start")
        first = asyncio.create_task(
            post(host, "/launch", upload(store, "rev1", HostConfig=HOST_NETWORK))
        )
        await eventually(engine.requested["start"].is_set)
        second = asyncio.create_task(
            post(host, "/launch", upload(store, "rev2", HostConfig=HOST_NETWORK))
        )
        await eventually(lambda: len(engine.called("start")) == 2)
        engine.release()
        assert ((await first).status, (await second).status) == (200, 200)
    ports = {spec.labels[LABEL_REVISION]: spec.host_port for spec in engine.specs}
    assert ports == {"rev1": 40001, "rev2": 40002}


@pytest.mark.parametrize("api", ["127.0.0.1:8001", "0.0.0.0:8001", "[::]:8001", "[::1]:8001"])
async def test_a_host_network_launch_without_an_api_token_warns_that_the_app_could_use_the_api(
    store: MemoryStore,
    engine: FakeEngine,
    state: ProxyState,
    caplog: pytest.LogCaptureFixture,
    api: str,
) -> None:
    async with host_network_manager(state, store, engine, 40001, api=api) as host:
        with caplog.at_level(logging.WARNING, logger="wunderproxy.manager"):
            config_hash = upload(store, "rev1", HostConfig=HOST_NETWORK)
            assert (await post(host, "/launch", config_hash)).status == 200
            assert (await post(host, "/launch", upload(store, "rev2"))).status == 200
    warnings = [r.getMessage() for r in caplog.records if "--api-token" in r.getMessage()]
    assert warnings == [
        "revision rev1 runs on the host's network, where its app is a loopback peer of the "
        "manager API: without --api-token it could launch and switch; set one"
    ]


@pytest.mark.parametrize("api", ["unix:/run/wunderproxy/api.sock", "192.0.2.7:8001"])
async def test_no_api_token_warning_when_a_host_network_app_cannot_reach_the_api_from_loopback(
    store: MemoryStore,
    engine: FakeEngine,
    state: ProxyState,
    caplog: pytest.LogCaptureFixture,
    api: str,
) -> None:
    # A Unix socket is not in the app's network; on another address it connects from that
    # address, which the API refuses (403) like any remote peer.
    async with host_network_manager(state, store, engine, 40001, api=api) as host:
        with caplog.at_level(logging.WARNING, logger="wunderproxy.manager"):
            config_hash = upload(store, "rev1", HostConfig=HOST_NETWORK)
            assert (await post(host, "/launch", config_hash)).status == 200
    assert [r.getMessage() for r in caplog.records if "--api-token" in r.getMessage()] == []


async def test_a_200_from_the_port_of_a_host_network_container_that_exited_answers_502(
    store: MemoryStore, engine: FakeEngine, state: ProxyState
) -> None:
    # Another process answers 200 on the port, while the app failed to bind it and exited.
    async with host_network_manager(state, store, engine, 40001) as host:
        engine.exit_while_starting("httpd: bind: Address already in use\n")
        reply = await post(host, "/launch", upload(store, "rev1", HostConfig=HOST_NETWORK))
    assert reply.status == 502
    message = error_of(reply)
    assert "stopped while starting (status exited)" in message
    assert "bind: Address already in use" in message
    assert "here PORT=40001, with SO_REUSEADDR set" in message
    assert engine.removed_ids == engine.started_ids
    assert state.containers == []


async def test_a_host_network_app_never_healthy_answers_504_naming_its_port(
    store: MemoryStore, engine: FakeEngine, state: ProxyState
) -> None:
    async with host_network_manager(state, store, engine, 40001) as host:
        config_hash = upload(store, "rev1", HostConfig=HOST_NETWORK, HealthCheckPath="/status/404")
        reply = await post(host, "/launch", config_hash)
    assert reply.status == 504
    message = error_of(reply)
    assert "not healthy after" in message
    assert "must listen on 127.0.0.1:$PORT, here PORT=40001" in message
    assert "with SO_REUSEADDR set" in message


# -- /switch ----------------------------------------------------------------------------


async def test_switch_to_a_hash_not_launched_answers_404(
    manager: Manager, store: MemoryStore, serving: Container, engine: FakeEngine, state: ProxyState
) -> None:
    config_hash = upload(store, "rev1")
    reply = await post(manager, "/switch", config_hash)
    assert reply.status == 404
    assert "POST /launch" in error_of(reply)
    assert_still_serving(state, engine, serving)


async def test_switch_while_the_launch_of_that_hash_is_pending_answers_409(
    manager: Manager, store: MemoryStore, engine: FakeEngine, serving: Container, state: ProxyState
) -> None:
    config_hash = upload(store, "rev1")
    engine.hold_images()
    launch = await blocked_in_ensure_image(engine, post(manager, "/launch", config_hash))
    reply = await post(manager, "/switch", config_hash)
    assert reply.status == 409
    assert "has not finished" in error_of(reply)
    assert_still_serving(state, engine, serving)
    engine.release()
    assert (await launch).status == 200
    assert (await post(manager, "/switch", config_hash)).status == 200


async def test_switch_answers_the_port_and_container(
    manager: Manager, store: MemoryStore, engine: FakeEngine, state: ProxyState
) -> None:
    config_hash = upload(store, "rev1")
    assert (await post(manager, "/launch", config_hash)).status == 200
    reply = await post(manager, "/switch", config_hash)
    assert reply.status == 200, reply.body
    assert reply.content_type.startswith("text/plain")
    match = SWITCHED.fullmatch(reply.body.decode().strip())
    assert match is not None, reply.body
    [container_id] = engine.started_ids
    assert match["id8"] == container_id[:8]
    assert int(match["port"]) == engine.port
    assert state.current is not None
    assert state.current.container_id == container_id
    assert state.current.state == "serving"


async def test_switch_with_accept_json_answers_the_same_facts_as_json(
    manager: Manager, store: MemoryStore, engine: FakeEngine
) -> None:
    config_hash = upload(store, "rev1")
    assert (await post(manager, "/launch", config_hash)).status == 200
    reply = await post(
        manager, "/switch", f" {config_hash}\n", headers={"accept": "application/json"}
    )
    assert reply.status == 200
    document = json.loads(reply.body)
    assert document["container_id"] == engine.started_ids[0]
    assert document["port"] == engine.port
    assert document["hash"] == config_hash
    assert document["revision"] == "rev1"
    assert document["changed"] is True
    assert document["warning"] is None
    assert SWITCHED.fullmatch(document["message"])


async def test_switching_to_the_serving_hash_is_a_no_op_answering_200(
    manager: Manager, store: MemoryStore, engine: FakeEngine, serving: Container, state: ProxyState
) -> None:
    writes = list(store.puts)
    reply = await post(manager, "/switch", serving.hash, headers={"accept": "application/json"})
    assert reply.status == 200
    assert json.loads(reply.body)["changed"] is False
    assert store.puts == writes, "a no-op switch must not record another deploy"
    assert engine.removed_ids == []
    assert_still_serving(state, engine, serving)


async def test_after_a_switch_the_old_container_is_removed_once_its_requests_finished(
    manager: Manager, store: MemoryStore, engine: FakeEngine, serving: Container, state: ProxyState
) -> None:
    new_image = "localhost:8080/myapp:rev1"
    new_hash = upload(store, "rev1", ContainerConfig={"Image": new_image})
    assert (await post(manager, "/launch", new_hash)).status == 200
    serving.request_started()
    serving.request_started()
    assert (await post(manager, "/switch", new_hash)).status == 200
    assert serving.state == "draining"
    await asyncio.sleep(0.1)
    serving.request_finished()
    await asyncio.sleep(0.1)
    assert engine.removed_ids == [], "removed while requests were still in flight"
    assert serving in state.containers
    serving.request_finished()
    await eventually(lambda: engine.removed_ids != [])
    assert engine.called("remove") == [(serving.container_id, 3)]
    await eventually(lambda: serving not in state.containers)
    assert state.current is not None
    assert state.current.hash == new_hash
    await eventually(lambda: engine.called("remove_images") != [])
    [(repository, keep)] = engine.called("remove_images")
    assert repository == "localhost:8080/myapp"
    assert isinstance(keep, frozenset)
    assert keep == {new_image, serving.image}  # the previous image stays for a rollback


async def test_switch_writes_current_json_as_a_byte_copy_and_a_history_entry(
    manager: Manager, store: MemoryStore
) -> None:
    config_hash, raw = encode_config(example_config(Revision="rev1"))
    store.objects[config_key(config_hash)] = raw
    assert (await post(manager, "/launch", config_hash)).status == 200
    reply = await post(manager, "/switch", config_hash, headers={"x-deployed-by": "ci@build-42"})
    assert reply.status == 200
    assert store.objects[CURRENT_KEY] == raw
    [entry] = json.loads(store.objects[HISTORY_KEY])
    assert entry["Revision"] == "rev1"
    assert entry["Hash"] == config_hash
    assert entry["DeployedBy"] == "ci@build-42"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", entry["DeployedAt"])


async def test_switch_without_x_deployed_by_records_this_host_as_deployer(
    manager: Manager, store: MemoryStore
) -> None:
    config_hash = upload(store, "rev1")
    assert (await post(manager, "/launch", config_hash)).status == 200
    assert (await post(manager, "/switch", config_hash)).status == 200
    [entry] = json.loads(store.objects[HISTORY_KEY])
    assert entry["DeployedBy"] == f"wunderproxy@{socket.gethostname()}"


async def test_switch_still_answers_200_with_a_warning_when_the_store_cannot_be_written(
    manager: Manager, store: MemoryStore, state: ProxyState
) -> None:
    config_hash = upload(store, "rev1")
    assert (await post(manager, "/launch", config_hash)).status == 200
    store.fail_puts = "disk full"
    text = await post(manager, "/switch", config_hash)
    assert text.status == 200
    assert "warning" in text.body.decode()
    assert "disk full" in text.body.decode()
    assert state.current is not None
    assert state.current.hash == config_hash
    assert CURRENT_KEY not in store.objects


async def test_switch_with_accept_json_reports_a_store_failure_as_a_warning(
    manager: Manager, store: MemoryStore, state: ProxyState
) -> None:
    config_hash = upload(store, "rev1")
    assert (await post(manager, "/launch", config_hash)).status == 200
    store.fail_puts = "access denied"
    reply = await post(manager, "/switch", config_hash, headers={"accept": "application/json"})
    assert reply.status == 200
    document = json.loads(reply.body)
    assert document["changed"] is True
    assert "access denied" in document["warning"]


# -- /abort -----------------------------------------------------------------------------


def events_of(state: ProxyState, kind: str) -> list[Any]:
    return [e for e in state.events.newest_first() if e.kind == kind]


async def test_abort_stops_and_removes_a_launched_container_and_a_switch_then_finds_nothing(
    manager: Manager, store: MemoryStore, engine: FakeEngine, serving: Container, state: ProxyState
) -> None:
    config_hash = upload(store, "rev1")
    assert (await post(manager, "/launch", config_hash)).status == 200
    launched = state.find(config_hash, "launched")
    assert launched is not None
    reply = await post(manager, "/abort", f" {config_hash}\n")
    assert reply.status == 200
    assert reply.body.decode() == (
        f"aborted {config_hash}: stopped and removed container "
        f"{launched.container_id[:8]} of revision rev1\n"
    )
    assert engine.called("remove") == [(launched.container_id, 3)]
    assert launched not in state.containers
    [event] = events_of(state, "aborted")
    assert (event.revision, event.config_hash, event.container_id) == (
        "rev1",
        config_hash,
        launched.container_id,
    )
    switch = await post(manager, "/switch", config_hash)
    assert switch.status == 404, "an aborted launch must not be switched to"
    assert_still_serving(state, engine, serving)


async def test_abort_with_accept_json_answers_the_removed_container_as_json(
    manager: Manager, store: MemoryStore, engine: FakeEngine
) -> None:
    config_hash = upload(store, "rev1")
    assert (await post(manager, "/launch", config_hash)).status == 200
    reply = await post(manager, "/abort", config_hash, headers={"accept": "application/json"})
    assert reply.status == 200
    document = json.loads(reply.body)
    [container_id] = engine.started_ids
    assert document["container_id"] == container_id
    assert (document["hash"], document["revision"]) == (config_hash, "rev1")
    assert document["cancelled_launch"] is False
    assert document["message"].startswith(f"aborted {config_hash}: stopped and removed")


async def test_abort_of_the_serving_hash_answers_409_and_it_keeps_serving(
    manager: Manager, engine: FakeEngine, serving: Container, state: ProxyState
) -> None:
    reply = await post(manager, "/abort", serving.hash)
    assert reply.status == 409
    assert "serves now" in error_of(reply)
    assert "switch to another hash" in error_of(reply)
    assert_still_serving(state, engine, serving)
    assert events_of(state, "aborted") == []


async def test_abort_of_a_hash_never_launched_here_answers_404(
    manager: Manager, store: MemoryStore, engine: FakeEngine
) -> None:
    config_hash = upload(store, "rev1")
    reply = await post(manager, "/abort", config_hash)
    assert reply.status == 404
    assert error_of(reply) == f"nothing of {config_hash} is launched here"
    assert engine.removed_ids == []


async def test_abort_of_a_malformed_hash_answers_400(manager: Manager) -> None:
    reply = await post(manager, "/abort", "not-a-hash")
    assert reply.status == 400


async def test_abort_leaves_a_draining_container_to_its_drain_and_answers_404(
    manager: Manager, store: MemoryStore, engine: FakeEngine, serving: Container, state: ProxyState
) -> None:
    serving.request_started()  # keeps it draining
    new_hash = upload(store, "rev1")
    assert (await post(manager, "/launch", new_hash)).status == 200
    assert (await post(manager, "/switch", new_hash)).status == 200
    reply = await post(manager, "/abort", serving.hash)
    assert reply.status == 404
    assert "draining is left to finish its drain" in error_of(reply)
    assert serving.state == "draining"
    assert serving.container_id not in engine.removed_ids
    serving.request_finished()
    await eventually(lambda: serving.container_id in engine.removed_ids)


async def test_abort_cancels_a_launch_under_way_and_the_waiting_launch_says_it_was_aborted(
    manager: Manager, store: MemoryStore, engine: FakeEngine, serving: Container, state: ProxyState
) -> None:
    config_hash = upload(store, "rev1")
    engine.hold_images()
    launch = await blocked_in_ensure_image(engine, post(manager, "/launch", config_hash))
    abort = await post(manager, "/abort", config_hash)
    assert abort.status == 200
    assert "cancelled its launch under way" in abort.body.decode()
    launched = await launch
    assert launched.status == 409
    assert "was aborted (POST /abort)" in error_of(launched)
    [event] = events_of(state, "aborted")
    assert (event.revision, event.config_hash) == ("rev1", config_hash)
    assert events_of(state, "failed") == [], "an abort is not a failure"
    engine.release()
    assert [spec.labels[LABEL_REVISION] for spec in engine.specs] == ["rev0"], "rev1 started"
    assert_still_serving(state, engine, serving)
    # Launching it again after the abort is a new launch, not the aborted one.
    assert (await post(manager, "/launch", config_hash)).status == 200


async def test_abort_while_the_engine_starts_the_container_removes_it_once_it_exists(
    manager: Manager, store: MemoryStore, engine: FakeEngine, serving: Container, state: ProxyState
) -> None:
    config_hash = upload(store, "rev1")
    engine.hold("start")
    launch = asyncio.create_task(post(manager, "/launch", config_hash))
    await eventually(engine.requested["start"].is_set)
    abort = asyncio.create_task(post(manager, "/abort", config_hash))
    await asyncio.sleep(0.1)
    assert not abort.done(), "the abort must wait until what the launch started is gone"
    engine.release()  # the engine call finishes and the container exists
    assert (await abort).status == 200
    assert (await launch).status == 409
    [started] = [i for i in engine.started_ids if i != serving.container_id]
    assert engine.removed_ids == [started]
    assert state.find(config_hash, "launched") is None
    assert_still_serving(state, engine, serving)


async def test_abort_of_current_json_launching_at_start_up_leaves_the_proxy_not_ready(
    controller: Controller, store: MemoryStore, engine: FakeEngine, state: ProxyState
) -> None:
    config_hash, raw = encode_config(example_config(Revision="rev1"))
    store.objects[CURRENT_KEY] = raw
    engine.hold_images()
    startup = asyncio.create_task(controller.launch_current(Startup(False, load_current(store))))
    await eventually(engine.image_requested.is_set)
    result = await controller.abort(config_hash)
    assert result.cancelled_launch is True
    assert await startup is False
    assert state.current is None


# -- who may change things ---------------------------------------------------------------


@pytest.fixture
def guarded(controller: Controller, state: ProxyState) -> Manager:
    return Manager(controller, state, token=TOKEN)


@pytest.mark.parametrize(
    "authorization",
    [None, "", f"Bearer {TOKEN}x", "Bearer wrong", TOKEN, f"bearer {TOKEN}", f"Basic {TOKEN}"],
)
@pytest.mark.parametrize("path", ["/launch", "/switch", "/abort"])
async def test_with_a_token_a_missing_or_wrong_authorization_answers_401(
    guarded: Manager, engine: FakeEngine, path: str, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"authorization": authorization}
    # Refused before the body is even looked at: an empty body would be a 400.
    reply = await post(guarded, path, b"", headers=headers)
    assert reply.status == 401
    assert ("WWW-Authenticate", "Bearer") in reply.headers
    assert "Authorization: Bearer" in error_of(reply)
    assert engine.calls == []


@pytest.mark.parametrize("peer", ["127.0.0.1", "10.1.2.3", None])
async def test_with_a_token_the_right_authorization_is_accepted_from_any_peer(
    guarded: Manager, store: MemoryStore, peer: str | None
) -> None:
    config_hash = upload(store, "rev1")
    headers = {"authorization": f"Bearer {TOKEN}"}
    assert (await post(guarded, "/launch", config_hash, peer=peer, headers=headers)).status == 200
    assert (await post(guarded, "/switch", config_hash, peer=peer, headers=headers)).status == 200


async def test_with_a_token_status_needs_no_authorization(guarded: Manager) -> None:
    reply = await guarded.handle(request("GET", "/status", peer="10.1.2.3"))
    assert reply.status == 200


@pytest.mark.parametrize("peer", ["10.1.2.3", "192.168.0.1", "2001:db8::1", "not-an-ip"])
@pytest.mark.parametrize("path", ["/launch", "/switch", "/abort"])
async def test_without_a_token_a_remote_peer_may_not_launch_or_switch(
    manager: Manager, store: MemoryStore, engine: FakeEngine, path: str, peer: str
) -> None:
    reply = await post(manager, path, upload(store, "rev1"), peer=peer)
    assert reply.status == 403
    assert "--api-token" in error_of(reply)
    assert engine.calls == []


async def test_without_a_token_a_remote_peer_may_read_the_status(manager: Manager) -> None:
    reply = await manager.handle(request("GET", "/status", peer="10.1.2.3"))
    assert reply.status == 200


@pytest.mark.parametrize(
    "peer", ["127.0.0.1", "127.8.9.10", "::1", None], ids=["v4", "v4-net", "v6", "unix"]
)
async def test_without_a_token_loopback_and_unix_socket_peers_may_launch_and_switch(
    manager: Manager, store: MemoryStore, peer: str | None
) -> None:
    config_hash = upload(store, "rev1")
    assert (await post(manager, "/launch", config_hash, peer=peer)).status == 200
    assert (await post(manager, "/switch", config_hash, peer=peer)).status == 200


async def test_without_a_token_an_ipv4_mapped_loopback_peer_may_launch(
    manager: Manager, store: MemoryStore
) -> None:
    reply = await post(manager, "/launch", upload(store, "rev1"), peer="::ffff:127.0.0.1")
    assert reply.status == 200, reply.body


# -- routing ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/index.html", "/statuz", "/status/", "/launch/abc", "/Switch"])
async def test_an_unknown_path_answers_404_naming_the_endpoints(
    manager: Manager, path: str
) -> None:
    reply = await manager.handle(request("GET", path))
    assert reply.status == 404
    message = error_of(reply)
    endpoints = ("GET /status", "GET /metrics", "GET /", "POST /launch", "POST /switch")
    for endpoint in (*endpoints, "POST /abort"):
        assert endpoint in message


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("POST", "/status", "GET, HEAD"),
        ("DELETE", "/status", "GET, HEAD"),
        ("GET", "/launch", "POST"),
        ("PUT", "/launch", "POST"),
        ("GET", "/switch", "POST"),
        ("HEAD", "/switch", "POST"),
        ("GET", "/abort", "POST"),
    ],
)
async def test_a_wrong_method_answers_405_with_an_allow_header(
    manager: Manager, engine: FakeEngine, method: str, path: str, allow: str
) -> None:
    reply = await manager.handle(request(method, path, UNKNOWN_HASH, peer="10.1.2.3"))
    assert reply.status == 405
    assert ("Allow", allow) in reply.headers
    assert method in error_of(reply)
    assert engine.calls == []


async def test_a_long_unknown_path_is_cut_short_in_the_error(manager: Manager) -> None:
    reply = await manager.handle(request("GET", "/" + "x" * 5000))
    assert reply.status == 404
    assert len(error_of(reply)) < 300


# -- serve_connection over a real socket ---------------------------------------------------


class ApiServer:
    """The manager behind serve_connection on 127.0.0.1, counting the connections it got."""

    def __init__(self, manager: Manager) -> None:
        self.manager = manager
        self.connections = 0
        self.tasks: set[asyncio.Task[Any]] = set()
        self.clients: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> ApiServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        self.connections += 1
        try:
            await serve_connection(reader, writer, self.manager.handle)
        finally:
            self.tasks.discard(task)

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.clients.append(writer)
        return reader, writer

    async def stop(self) -> None:
        for writer in self.clients:
            writer.close()
        for writer in self.clients:
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=5)


@pytest.fixture
async def api(manager: Manager) -> AsyncIterator[ApiServer]:
    server = await ApiServer(manager).start()
    yield server
    await server.stop()


async def exchange(
    conn: h11.Connection,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    method: str,
    target: str,
    body: bytes = b"",
    headers: list[tuple[str, str]] | None = None,
) -> Answer:
    """Send one request on a client connection and read its answer."""
    send_request(conn, writer, method, target, body, headers)
    return await read_answer(conn, reader)


def parse_raw_answer(data: bytes) -> Answer:
    """Parse one complete answer received on a connection that was then closed."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "api")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    conn.receive_data(b"")
    status, headers, body = 0, {}, bytearray()
    while not isinstance(event := conn.next_event(), h11.EndOfMessage):
        if isinstance(event, h11.Response):
            status = event.status_code
            headers = {k.decode(): v.decode() for k, v in event.headers}
        elif isinstance(event, h11.Data):
            body += event.data
        else:
            raise AssertionError(f"unexpected {event!r}")
    return Answer(status, headers, bytes(body))


async def test_api_connection_keeps_alive_across_requests(
    api: ApiServer, store: MemoryStore, engine: FakeEngine
) -> None:
    config_hash = upload(store, "rev1")
    reader, writer = await api.connect()
    conn = h11.Connection(h11.CLIENT)
    status = await exchange(conn, reader, writer, "GET", "/status")
    assert status.status == 200
    assert status.headers["content-type"] == "application/json"
    assert json.loads(status.body)["app"] == APP
    launch = await exchange(conn, reader, writer, "POST", "/launch", config_hash.encode())
    assert launch.status == 200, launch.body
    assert LAUNCHED.fullmatch(launch.body.decode())
    switch = await exchange(
        conn,
        reader,
        writer,
        "POST",
        "/switch",
        config_hash.encode(),
        [("Accept", "application/json"), ("X-Deployed-By", "alice")],
    )
    assert switch.status == 200
    assert json.loads(switch.body)["container_id"] == engine.started_ids[0]
    assert json.loads(store.objects[HISTORY_KEY])[-1]["DeployedBy"] == "alice"
    assert api.connections == 1


async def test_api_answers_status_with_a_query_string_and_head(api: ApiServer) -> None:
    reader, writer = await api.connect()
    conn = h11.Connection(h11.CLIENT)
    queried = await exchange(conn, reader, writer, "GET", "/status?x=1")
    assert queried.status == 200
    assert json.loads(queried.body)["app"] == APP
    head = await exchange(conn, reader, writer, "HEAD", "/status")
    assert head.status == 200
    assert head.body == b""
    assert int(head.headers["content-length"]) > 0
    assert (await exchange(conn, reader, writer, "GET", "/status")).status == 200
    assert api.connections == 1


async def test_api_error_answers_carry_their_headers_on_the_wire(api: ApiServer) -> None:
    reader, writer = await api.connect()
    conn = h11.Connection(h11.CLIENT)
    answer = await exchange(conn, reader, writer, "GET", "/launch")
    assert answer.status == 405
    assert answer.headers["allow"] == "POST"
    assert json.loads(answer.body)["error"]
    # An error answer does not end the connection.
    assert (await exchange(conn, reader, writer, "GET", "/status")).status == 200


@pytest.mark.parametrize(
    "garbage",
    [b"NOT HTTP AT ALL\r\n\r\n", b"GET /status HTTP/1.1\r\nno colon here\r\n\r\n"],
    ids=["request-line", "header"],
)
async def test_api_answers_malformed_http_with_400_and_closes_the_connection(
    api: ApiServer, garbage: bytes
) -> None:
    reader, writer = await api.connect()
    writer.write(garbage)
    data = await asyncio.wait_for(reader.read(), 10)  # read() returns at end of stream
    answer = parse_raw_answer(data)
    assert answer.status == 400
    assert "bad HTTP request" in json.loads(answer.body)["error"]
    assert answer.headers["connection"] == "close"


async def test_api_refuses_a_body_larger_than_the_limit_and_closes_the_connection(
    api: ApiServer, engine: FakeEngine
) -> None:
    reader, writer = await api.connect()
    body = b"0" * (MAX_BODY + 1)
    writer.write(
        b"POST /launch HTTP/1.1\r\nHost: api\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    data = await asyncio.wait_for(reader.read(), 10)
    answer = parse_raw_answer(data)
    assert answer.status == 400
    assert str(MAX_BODY) in json.loads(answer.body)["error"]
    assert answer.headers["connection"] == "close"
    assert engine.calls == []


async def test_api_answers_pipelined_requests_in_order(api: ApiServer) -> None:
    reader, writer = await api.connect()
    writer.write(
        b"GET /status HTTP/1.1\r\nHost: api\r\n\r\n"
        b"GET /nowhere HTTP/1.1\r\nHost: api\r\n\r\n"
        b"HEAD /status HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n"
    )
    data = await asyncio.wait_for(reader.read(), 10)
    statuses = [int(s) for s in re.findall(rb"^HTTP/1\.1 (\d{3}) ", data, re.MULTILINE)]
    assert statuses == [200, 404, 200]
    assert api.connections == 1


async def test_api_answers_431_to_a_request_head_growing_past_the_limit(
    api: ApiServer,
) -> None:
    reader, writer = await api.connect()
    # No blank line yet: the head is incomplete and larger than the server buffers.
    writer.write(b"GET /status HTTP/1.1\r\nHost: api\r\nX-Big: " + b"a" * 20_000 + b"\r\n")
    answer = parse_raw_answer(await asyncio.wait_for(reader.read(), 10))
    assert answer.status == 431
    assert json.loads(answer.body)["error"]


async def test_api_closes_an_idle_connection_after_the_idle_timeout(
    api: ApiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(manager_module, "IDLE_TIMEOUT", 0.2)
    reader, writer = await api.connect()
    conn = h11.Connection(h11.CLIENT)
    assert (await exchange(conn, reader, writer, "GET", "/status")).status == 200
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server


async def test_api_refuses_a_megabyte_body_with_a_400_the_client_can_read(
    api: ApiServer,
) -> None:
    reader, writer = await api.connect()
    body = b"0" * 1_000_000
    writer.write(
        b"POST /launch HTTP/1.1\r\nHost: api\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    data = await asyncio.wait_for(reader.read(), 10)
    assert parse_raw_answer(data).status == 400


async def test_api_closes_when_the_client_hangs_up_between_requests(api: ApiServer) -> None:
    reader, writer = await api.connect()
    conn = h11.Connection(h11.CLIENT)
    assert (await exchange(conn, reader, writer, "GET", "/status")).status == 200
    writer.close()
    await writer.wait_closed()
    await eventually(lambda: not api.tasks)


def _raise_bug(*args: object) -> Any:
    raise KeyError("NetworkSettings")


async def test_a_bug_in_a_handler_answers_500_json_is_logged_once_and_the_api_goes_on(
    api: ApiServer,
    store: MemoryStore,
    engine: FakeEngine,
    serving: Container,
    state: ProxyState,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(engine, "start", _raise_bug)  # a seam: the engine hits a bug
    config_hash = upload(store, "rev1")
    reader, writer = await api.connect()
    conn = h11.Connection(h11.CLIENT)
    with caplog.at_level(logging.INFO):
        answer = await exchange(conn, reader, writer, "POST", "/launch", config_hash.encode())
        assert answer.status == 500
        assert answer.headers["content-type"] == "application/json"
        message = json.loads(answer.body)["error"]
        assert "POST /launch" in message and "KeyError" in message and "log" in message
        # The same connection and the API go on.
        assert (await exchange(conn, reader, writer, "GET", "/status")).status == 200
    with_traceback = [r for r in caplog.records if r.exc_info is not None]
    assert len(with_traceback) == 1, caplog.text
    assert with_traceback[0].name == "wunderproxy.manager"
    assert "KeyError: 'NetworkSettings'" in caplog.text
    assert caplog.text.count("Traceback") == 1
    assert_still_serving(state, engine, serving)


async def test_a_bug_while_reading_the_state_answers_500_json_and_the_next_request_works(
    api: ApiServer, state: ProxyState, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(state, "snapshot", _raise_bug)
    reader, writer = await api.connect()
    conn = h11.Connection(h11.CLIENT)
    answer = await exchange(conn, reader, writer, "GET", "/status")
    assert answer.status == 500
    assert "GET /status" in json.loads(answer.body)["error"]
    monkeypatch.undo()
    assert (await exchange(conn, reader, writer, "GET", "/status")).status == 200


# -- clients that leave before their answer ---------------------------------------------
# wunderproxy runs on uvloop when installed, else on asyncio's own loop; they report a peer
# that has gone in different ways, so these tests run on both.

BOTH_LOOPS = pytest.mark.parametrize(
    "loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"]
)


@contextlib.asynccontextmanager
async def accepted_connection() -> AsyncIterator[
    tuple[socket.socket, asyncio.StreamReader, asyncio.StreamWriter]
]:
    """A client socket on 127.0.0.1 and the server's streams of its connection."""
    accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accepted.put((reader, writer))

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    client = socket.create_connection(server.sockets[0].getsockname())
    try:
        reader, writer = await asyncio.wait_for(accepted.get(), 5)
        yield client, reader, writer
        writer.close()
    finally:
        client.close()
        server.close()
        await server.wait_closed()


def reset(client: socket.socket) -> None:
    """Close with RST, as a client that gives up does (SO_LINGER on, for zero seconds)."""
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()


def run_on(loop_factory: Callable[[], asyncio.AbstractEventLoop], scenario: Any) -> None:
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(scenario())


@BOTH_LOOPS
def test_a_refusal_to_a_client_that_has_already_reset_ends_without_an_error(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with accepted_connection() as (client, reader, writer):
            # Reading is paused (as when a client sent more than the buffer holds), so the
            # loop has not noticed the reset when the refusal half-closes the connection.
            writer.transport.pause_reading()
            reset(client)
            await asyncio.sleep(0.1)
            await asyncio.wait_for(close_after_refusal(reader, writer), 5)

    with caplog.at_level(logging.WARNING):
        run_on(loop_factory, scenario)
    assert caplog.records == []


@BOTH_LOOPS
def test_a_client_that_resets_while_its_request_is_handled_ends_the_connection_quietly(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with accepted_connection() as (client, reader, writer):

            async def handler(request: ApiRequest) -> Reply:
                reset(client)
                await asyncio.sleep(0.1)  # the reset arrives while the answer is prepared
                return json_reply(200, {"path": request.path})

            client.sendall(b"GET /status HTTP/1.1\r\nHost: api\r\n\r\n")
            await asyncio.wait_for(serve_connection(reader, writer, handler), 5)

    with caplog.at_level(logging.WARNING):
        run_on(loop_factory, scenario)
    assert caplog.records == []


# -- Controller.start ---------------------------------------------------------------------


async def test_start_launches_and_switches_to_current_json_without_writing_history(
    controller: Controller, store: MemoryStore, engine: FakeEngine, state: ProxyState
) -> None:
    config_hash, raw = encode_config(example_config(Revision="rev7"))
    store.objects[CURRENT_KEY] = raw
    await controller.start()
    assert state.current is not None
    assert state.current.hash == config_hash
    assert state.current.revision == "rev7"
    assert state.current.state == "serving"
    assert state.current.container_id == engine.started_ids[0]
    assert store.puts == [], "start-up must not rewrite current.json or history.json"


async def test_start_with_no_current_json_deploys_nothing(
    controller: Controller, engine: FakeEngine, state: ProxyState
) -> None:
    assert await controller.start() is True
    assert state.current is None
    assert engine.called("start") == []


async def test_start_logs_and_deploys_nothing_when_the_engine_fails(
    controller: Controller,
    store: MemoryStore,
    engine: FakeEngine,
    state: ProxyState,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store.objects[CURRENT_KEY] = encode_config(example_config(Revision="rev7"))[1]
    engine.fail_on("ensure_image", "registry unreachable")
    with caplog.at_level(logging.ERROR, logger="wunderproxy.manager"):
        await controller.start()
    assert state.current is None
    assert state.containers == []
    assert "registry unreachable" in caplog.text


async def test_start_logs_and_deploys_nothing_when_current_json_is_invalid(
    controller: Controller,
    store: MemoryStore,
    engine: FakeEngine,
    state: ProxyState,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store.objects[CURRENT_KEY] = b'{"Revision": 42}'
    with caplog.at_level(logging.ERROR, logger="wunderproxy.manager"):
        assert await controller.start() is False, "not ready: no take-over from here"
    assert state.current is None
    assert engine.called("start") == []
    assert "Revision" in caplog.text


async def test_start_removes_the_container_when_current_json_never_gets_healthy(
    controller: Controller, store: MemoryStore, engine: FakeEngine, state: ProxyState
) -> None:
    store.objects[CURRENT_KEY] = encode_config(
        example_config(Revision="rev7", HealthCheckPath="/status/404")
    )[1]
    await controller.start()
    assert state.current is None
    assert engine.removed_ids == engine.started_ids != []


async def test_after_start_the_api_can_launch_and_switch_to_a_new_hash(
    manager: Manager,
    controller: Controller,
    store: MemoryStore,
    engine: FakeEngine,
    state: ProxyState,
) -> None:
    store.objects[CURRENT_KEY] = encode_config(example_config(Revision="rev7"))[1]
    await controller.start()
    old = state.current
    assert old is not None
    new_hash = upload(store, "rev8")
    assert (await post(manager, "/launch", new_hash)).status == 200
    assert (await post(manager, "/switch", new_hash)).status == 200
    await eventually(lambda: old.container_id in engine.removed_ids)


# -- restart: adoption and stale containers ------------------------------------------------


def left_running(
    engine: FakeEngine, config_hash: str, status: str = "running", instance: str | None = None
) -> str:
    """A container a previous wunderproxy left behind; returns its id.

    ``instance`` None: one started before the instance label existed.
    """
    container_id = f"{len(engine.left_running):x}" * 64
    labels = {LABEL_APP: APP, LABEL_HASH: config_hash}
    if instance is not None:
        labels[LABEL_INSTANCE] = instance
    engine.left_running.append(
        ContainerRecord(
            id=container_id[:64],
            status=status,
            labels=labels,
            image="localhost:8080/myapp:old",
            port=engine.port,
        )
    )
    return container_id[:64]


async def test_start_adopts_the_healthy_running_container_of_current_json(
    controller: Controller, store: MemoryStore, engine: FakeEngine, state: ProxyState
) -> None:
    config_hash, raw = encode_config(example_config(Revision="rev7"))
    store.objects[CURRENT_KEY] = raw
    adopted = left_running(engine, config_hash)
    assert await controller.start() is True
    assert engine.called("start") == [], "no second container for the same hash"
    assert state.current is not None
    assert (state.current.container_id, state.current.state) == (adopted, "serving")
    assert adopted not in engine.removed_ids


async def test_start_launches_anew_when_the_container_left_running_is_unhealthy(
    controller: Controller, store: MemoryStore, engine: FakeEngine, state: ProxyState
) -> None:
    config_hash, raw = encode_config(example_config(Revision="rev7", HealthCheckPath="/status/500"))
    store.objects[CURRENT_KEY] = raw
    sick = left_running(engine, config_hash)
    await controller.start()
    assert len(engine.called("start")) == 1
    assert sick not in [c.container_id for c in state.containers]


async def test_start_removes_stale_containers_stopped_ones_at_once_running_ones_later(
    state: ProxyState, store: MemoryStore, engine: FakeEngine
) -> None:
    controller = Controller(manager_config(drain_timeout=0.3), state, store, engine)
    config_hash, raw = encode_config(example_config(Revision="rev7"))
    store.objects[CURRENT_KEY] = raw
    current = left_running(engine, config_hash)
    exited = left_running(engine, "e" * 32, status="exited")
    other = left_running(engine, "f" * 32)
    await controller.start()
    await eventually(lambda: exited in engine.removed_ids)
    assert other not in engine.removed_ids, "a predecessor may still be draining it"
    await eventually(lambda: other in engine.removed_ids, within=3)
    assert current not in engine.removed_ids
    await controller.shutdown(grace=1.0)


async def test_start_adopts_and_removes_only_containers_of_its_own_instance(
    state: ProxyState, store: MemoryStore, engine: FakeEngine
) -> None:
    fleet = Fleet(instance="web-1")
    controller = Controller(manager_config(drain_timeout=0.0, fleet=fleet), state, store, engine)
    config_hash, raw = encode_config(example_config(Revision="rev7"))
    store.objects[CURRENT_KEY] = raw
    neighbours = left_running(engine, config_hash, instance="web-2")
    neighbours_stale = left_running(engine, "e" * 32, status="exited", instance="web-2")
    own_stale = left_running(engine, "f" * 32, status="exited", instance="web-1")
    own = left_running(engine, config_hash, instance="web-1")
    await controller.start()
    assert state.current is not None and state.current.container_id == own
    await eventually(lambda: own_stale in engine.removed_ids)
    await asyncio.sleep(0.1)
    assert neighbours not in engine.removed_ids and neighbours_stale not in engine.removed_ids
    await controller.shutdown(grace=1.0)


async def test_a_container_without_the_instance_label_is_the_default_instances(
    state: ProxyState, store: MemoryStore, engine: FakeEngine
) -> None:
    """A host upgraded from before the label adopts the container its predecessor left."""
    config_hash, raw = encode_config(example_config(Revision="rev7"))
    store.objects[CURRENT_KEY] = raw
    unlabelled = left_running(engine, config_hash)
    named = Controller(manager_config(fleet=Fleet(instance="web-1")), state, store, engine)
    assert await named.adopt_current() == Startup(ready=False, to_launch=load_current(store))
    await named.shutdown(grace=1.0)
    default = Controller(manager_config(), ProxyState(APP, "test"), store, engine)
    assert (await default.adopt_current()).ready is True
    assert unlabelled not in engine.removed_ids
    await default.shutdown(grace=1.0)


async def test_containers_started_carry_the_instance_label(
    state: ProxyState, store: MemoryStore, engine: FakeEngine
) -> None:
    controller = Controller(manager_config(fleet=Fleet(instance="blue")), state, store, engine)
    await controller.launch(upload(store, "rev1"))
    await controller.shutdown(grace=1.0)
    assert [spec.labels[LABEL_INSTANCE] for spec in engine.specs] == ["blue"]


# -- a serving container that dies --------------------------------------------------------


def with_a_peer(state: ProxyState) -> Fallback:
    fallback = Fallback(
        Fleet(instance="web-1", peers=(Peer.parse("http://127.0.0.1:9"),), secret=b"s")
    )
    state.fallback = fallback
    return fallback


async def test_a_serving_container_that_dies_sends_requests_to_peers_at_once(
    controller: Controller, engine: FakeEngine, serving: Container, state: ProxyState
) -> None:
    fallback = with_a_peer(state)
    busy, idle = FakeLink(idle=False), FakeLink(idle=True)
    serving.links.update((busy, idle))
    controller.watch_docker()
    engine.die(serving.container_id, 137)
    await eventually(lambda: serving.down)
    assert state.snapshot()["current"]["down"] is True
    assert busy.closed and idle.closed, "nothing in flight waits on a dead container"
    assert state.current is serving, "it stays current: a deploy replaces it"
    (died,) = [e for e in state.events.newest_first() if e.kind == "died"]
    assert (died.container_id, died.detail) == (serving.container_id, "exit code 137")
    fallback.stop()


async def test_without_peers_a_dead_container_is_marked_down_and_its_connections_close(
    controller: Controller, engine: FakeEngine, serving: Container, state: ProxyState
) -> None:
    busy = FakeLink(idle=False)
    serving.links.add(busy)
    controller.watch_docker()
    engine.die(serving.container_id)
    await eventually(lambda: busy.closed)
    assert serving.down, "a request on a dropped kept-alive connection is not sent there again"


async def test_the_death_of_a_container_not_serving_changes_nothing(
    manager: Manager,
    controller: Controller,
    engine: FakeEngine,
    serving: Container,
    state: ProxyState,
    store: MemoryStore,
) -> None:
    with_a_peer(state)
    assert (await post(manager, "/launch", upload(store, "rev1"))).status == 200
    (launched,) = [c for c in state.containers if c.state == "launched"]
    link = FakeLink(idle=False)
    launched.links.add(link)
    controller.watch_docker()
    engine.die(launched.container_id)
    engine.die("0" * 64)  # not one of ours
    engine.die(serving.container_id)  # after the others: once it is seen, they were too
    await eventually(lambda: serving.down)
    assert not launched.down and not link.closed
    assert [e.container_id for e in state.events.newest_first() if e.kind == "died"] == [
        serving.container_id
    ]
    assert state.fallback is not None
    state.fallback.stop()


# -- drains -----------------------------------------------------------------------------


@dataclass(eq=False)
class FakeLink:
    idle: bool
    closed: bool = False

    def close(self) -> None:
        self.closed = True


async def test_switching_back_to_a_draining_container_revives_it(
    manager: Manager, store: MemoryStore, engine: FakeEngine, serving: Container, state: ProxyState
) -> None:
    new_hash = upload(store, "rev1")
    assert (await post(manager, "/launch", new_hash)).status == 200
    serving.request_started()  # a long request keeps it draining
    assert (await post(manager, "/switch", new_hash)).status == 200
    assert serving.state == "draining"
    replaced = state.current
    assert replaced is not None
    assert (await post(manager, "/switch", serving.hash)).status == 200
    assert state.current is serving
    assert serving.state == "serving"
    serving.request_finished()
    await asyncio.sleep(0.1)
    assert serving.container_id not in engine.removed_ids
    await eventually(lambda: replaced.container_id in engine.removed_ids)


async def test_shutdown_waits_for_a_drain_that_replaced_a_cancelled_drain_of_the_same_container(
    manager: Manager,
    controller: Controller,
    store: MemoryStore,
    engine: FakeEngine,
    serving: Container,
) -> None:
    other = upload(store, "rev1")
    assert (await post(manager, "/launch", other)).status == 200
    serving.request_started()  # a long request keeps rev0 draining
    assert (await post(manager, "/switch", other)).status == 200
    # Back to rev0 (its drain is cancelled) and at once to rev1 again (rev0 drains anew),
    # before the cancelled drain has even finished.
    replies = await asyncio.gather(
        post(manager, "/switch", serving.hash), post(manager, "/switch", other)
    )
    assert [reply.status for reply in replies] == [200, 200]
    assert serving.state == "draining"
    shutdown = asyncio.create_task(controller.shutdown(grace=5.0))
    await asyncio.sleep(0.2)
    assert not shutdown.done(), "shutdown must wait for rev0's drain"
    serving.request_finished()
    await asyncio.wait_for(shutdown, 5)
    assert serving.container_id in engine.removed_ids


async def test_drain_closes_idle_connections_at_once_and_cuts_upgraded_ones_at_the_deadline(
    state: ProxyState, store: MemoryStore, engine: FakeEngine
) -> None:
    controller = Controller(manager_config(drain_timeout=0.3), state, store, engine)
    manager = Manager(controller, state, token=None)
    first, second = upload(store, "rev0"), upload(store, "rev1")
    for config_hash in (first, second):
        assert (await post(manager, "/launch", config_hash)).status == 200
    assert (await post(manager, "/switch", first)).status == 200
    old = state.current
    assert old is not None
    idle, websocket = FakeLink(idle=True), FakeLink(idle=False)
    old.links.update({idle, websocket})  # type: ignore[arg-type]
    old.upgrade_started()
    assert (await post(manager, "/switch", second)).status == 200
    await asyncio.sleep(0.05)
    assert idle.closed
    assert not websocket.closed, "upgraded connections run on until the deadline"
    await eventually(lambda: websocket.closed, within=2)
    await eventually(lambda: old.container_id in engine.removed_ids)
    await controller.shutdown(grace=1.0)


# -- contention -------------------------------------------------------------------------


async def test_two_racing_switches_both_answer_and_the_last_one_wins(
    manager: Manager, store: MemoryStore, serving: Container, state: ProxyState
) -> None:
    one, two = upload(store, "rev1"), upload(store, "rev2")
    for config_hash in (one, two):
        assert (await post(manager, "/launch", config_hash)).status == 200
    first, second = await asyncio.gather(
        post(manager, "/switch", one), post(manager, "/switch", two)
    )
    assert (first.status, second.status) == (200, 200)
    assert state.current is not None
    assert state.current.hash == two
    states = {c.hash: c.state for c in state.containers}
    assert states[two] == "serving"
    assert [c.state for c in state.containers].count("serving") == 1
    assert json.loads(store.objects[HISTORY_KEY])[-1]["Hash"] == two, "records in order"


async def test_a_launch_during_a_drain_starts_its_container_and_the_drain_goes_on(
    manager: Manager, store: MemoryStore, engine: FakeEngine, serving: Container, state: ProxyState
) -> None:
    new_hash = upload(store, "rev1")
    assert (await post(manager, "/launch", new_hash)).status == 200
    serving.request_started()  # keeps the old one draining
    assert (await post(manager, "/switch", new_hash)).status == 200
    third = upload(store, "rev2")
    assert (await post(manager, "/launch", third)).status == 200
    assert {c.hash: c.state for c in state.containers} == {
        serving.hash: "draining",
        new_hash: "serving",
        third: "launched",
    }
    serving.request_finished()
    await eventually(lambda: serving.container_id in engine.removed_ids)
