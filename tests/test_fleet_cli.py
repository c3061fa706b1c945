"""The fleet's client commands as an operator types them: arguments, env vars, exit codes and
messages (click's CliRunner, the embedded store). Deploys to real hosts are in
test_fleetdeploy_e2e.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from tests.support.configs import encode_config, example_config
from tests.support.docker import free_port
from wunderproxy.cli import main
from wunderproxy.deploylock import LOCK_KEY, DeployLock
from wunderproxy.store import HISTORY_KEY, FileStore, config_key

PREFIX = "apps/myapp"


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(store_dir: Path) -> FileStore:
    return FileStore(store_dir, PREFIX)


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> Iterator[CliRunner]:
    for name in ("WUNDERPROXY_STORE", "WUNDERPROXY_PREFIX", "WUNDERPROXY_HOSTS"):
        monkeypatch.delenv(name, raising=False)
    yield CliRunner()


def run(runner: CliRunner, *args: str, env: dict[str, str] | None = None) -> Result:
    return runner.invoke(main, list(args), env=env, catch_exceptions=False)


def at(store_dir: Path) -> tuple[str, ...]:
    """The options naming the test's store."""
    return ("--store", f"file://{store_dir}", "--prefix", PREFIX)


def nowhere() -> str:
    """A manager URL on which nothing listens."""
    return f"http://127.0.0.1:{free_port()}"


# -- upload ----------------------------------------------------------------------------------


def test_upload_stores_the_config_under_its_hash_and_prints_the_hash(
    runner: CliRunner, tmp_path: Path, store_dir: Path, store: FileStore
) -> None:
    hash_, raw = encode_config(example_config(Revision="r7"))
    config = tmp_path / "app.json"
    config.write_bytes(raw)

    result = run(runner, "upload", str(config), *at(store_dir))
    again = run(runner, "upload", str(config), *at(store_dir))

    assert result.exit_code == 0, result.output
    assert result.stdout == f"{hash_}\n"
    assert f"uploaded revision r7 to {store.description} as container.{hash_}.json" in (
        result.stderr
    )
    assert store.get(config_key(hash_)) == raw
    assert (again.exit_code, again.stdout) == (0, f"{hash_}\n")


def test_upload_reads_the_store_from_the_environment(
    runner: CliRunner, tmp_path: Path, store_dir: Path, store: FileStore
) -> None:
    hash_, raw = encode_config(example_config())
    (tmp_path / "app.json").write_bytes(raw)
    env = {"WUNDERPROXY_STORE": f"file://{store_dir}", "WUNDERPROXY_PREFIX": PREFIX}

    result = run(runner, "upload", str(tmp_path / "app.json"), env=env)

    assert result.exit_code == 0, result.output
    assert store.get(config_key(hash_)) == raw


def test_an_invalid_config_exits_1_naming_the_field_and_stores_nothing(
    runner: CliRunner, tmp_path: Path, store_dir: Path
) -> None:
    config = tmp_path / "app.json"
    config.write_bytes(encode_config(example_config(ContainerConfig={"Env": "A=1"}))[1])

    result = run(runner, "upload", str(config), *at(store_dir))

    assert result.exit_code == 1
    assert f"{config} is invalid: ContainerConfig.Env must be an array of strings" in result.stderr
    assert not store_dir.exists() or list(store_dir.rglob("container.*")) == []


def test_upload_without_a_store_says_what_to_give(runner: CliRunner, tmp_path: Path) -> None:
    config = tmp_path / "app.json"
    config.write_bytes(encode_config(example_config())[1])

    result = run(runner, "upload", str(config))

    assert result.exit_code == 1
    assert "give --store BUCKET|file://DIR and --prefix PREFIX" in result.stderr


# -- deploy and rollback: what is refused before any host is asked ---------------------------


@pytest.mark.parametrize("command", ["deploy", "abort"])
def test_a_fleet_command_without_hosts_is_a_usage_error_saying_how_to_name_them(
    runner: CliRunner, command: str
) -> None:
    result = run(runner, command, "0" * 32)

    assert result.exit_code == 2
    assert "give --host API_URL for each host" in result.stderr
    assert "WUNDERPROXY_HOSTS" in result.stderr


def test_abort_on_a_host_that_does_not_answer_exits_1_naming_it(runner: CliRunner) -> None:
    url = nowhere()

    result = run(runner, "abort", "0" * 32, "--host", url)

    assert result.exit_code == 1
    assert result.stdout.startswith(f"{url}: abort failed: cannot reach the manager at {url}")
    assert f"abort of {'0' * 32} failed on 1 of 1 host:\n  {url}: cannot reach" in (result.stderr)


def test_a_host_given_twice_is_refused(runner: CliRunner) -> None:
    url = nowhere()
    result = run(runner, "deploy", "0" * 32, "--host", url, "--host", url)

    assert result.exit_code == 2
    assert f"--host {url} is given twice" in result.stderr


def test_a_host_that_is_not_an_http_url_is_refused(runner: CliRunner) -> None:
    result = run(runner, "deploy", "0" * 32, "--host", "https://web-1:8001")

    assert result.exit_code == 2
    assert "expected http://HOST:PORT" in result.stderr


def test_hosts_come_comma_separated_from_the_environment(
    runner: CliRunner, store_dir: Path
) -> None:
    first, second = nowhere(), nowhere()
    env = {
        "WUNDERPROXY_HOSTS": f"{first}, {second}",
        "WUNDERPROXY_STORE": f"file://{store_dir}",
        "WUNDERPROXY_PREFIX": PREFIX,
    }

    result = run(runner, "deploy", "0" * 32, env=env)

    assert result.exit_code == 1
    assert f"cannot read /status of {first}: cannot reach" in result.stderr
    assert f"; {second}: cannot reach" in result.stderr
    assert FileStore(store_dir, PREFIX).get(LOCK_KEY) is None, "the lock must be released"


def test_a_deploy_while_another_holds_the_lock_exits_1_naming_the_holder(
    runner: CliRunner, store_dir: Path, store: FileStore
) -> None:
    DeployLock(store, "alice@deploy-1").acquire()

    result = run(runner, "deploy", "0" * 32, "--host", nowhere(), *at(store_dir))

    assert result.exit_code == 1
    assert "is held by alice@deploy-1 (pid " in result.stderr
    assert "--force" in result.stderr
    assert json.loads(store.get(LOCK_KEY) or b"")["owner"] == "alice@deploy-1"


def test_rollback_with_no_history_exits_1_saying_so(
    runner: CliRunner, store_dir: Path, store: FileStore
) -> None:
    result = run(runner, "rollback", "--host", nowhere(), *at(store_dir))

    assert result.exit_code == 1
    assert "records no deploy: nothing to roll back to" in result.stderr
    assert store.get(LOCK_KEY) is None


# -- history ---------------------------------------------------------------------------------


def test_history_prints_the_deploys_newest_first(
    runner: CliRunner, store_dir: Path, store: FileStore
) -> None:
    entries = [
        {
            "Revision": "r1",
            "Hash": "1" * 32,
            "DeployedAt": "2026-11-24T12:00:00Z",
            "DeployedBy": "alice@deploy-1",
        },
        {
            "Revision": "r2",
            "Hash": "2" * 32,
            "DeployedAt": "2026-11-24T13:00:00Z",
            "DeployedBy": "bob@laptop",
        },
    ]
    store.put(HISTORY_KEY, json.dumps(entries).encode())

    result = run(runner, "history", *at(store_dir))

    assert result.exit_code == 0, result.output
    header, newest, oldest = result.stdout.splitlines()
    assert header.split() == ["DEPLOYED", "AT", "REVISION", "HASH", "DEPLOYED", "BY"]
    assert newest.split() == ["2026-11-24T13:00:00Z", "r2", "2" * 32, "bob@laptop"]
    assert oldest.split() == ["2026-11-24T12:00:00Z", "r1", "1" * 32, "alice@deploy-1"]


def test_history_of_a_store_without_deploys_says_so(runner: CliRunner, store_dir: Path) -> None:
    result = run(runner, "history", *at(store_dir))

    assert result.exit_code == 0
    assert result.stdout == ""
    assert "no deploys recorded in history.json under file://" in result.stderr


# -- status ----------------------------------------------------------------------------------


def test_status_with_both_api_and_host_is_a_usage_error(runner: CliRunner) -> None:
    result = run(runner, "status", "--api", nowhere(), "--host", nowhere())

    assert result.exit_code == 2
    assert "either --api (one host) or --host" in result.stderr


def test_status_of_several_hosts_none_reachable_is_a_table_of_them_and_exit_1(
    runner: CliRunner,
) -> None:
    first, second = nowhere(), nowhere()

    result = run(runner, "status", "--host", first, "--host", second)

    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["HOST", "INSTANCE", "REVISION"]
    assert lines[1].startswith(f"{first}  unreachable: cannot reach the manager at {first}")
    assert lines[2].startswith(f"{second}  unreachable: ")
    assert lines[3] == f"not reached: {first}, {second}"
