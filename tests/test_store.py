from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from tests.support.configs import encode_config, example_config, upload_launch_config
from tests.support.s3 import changed_after_read
from wunderproxy.errors import BadRequest, InvalidConfig, NotFound, UpstreamFailed
from wunderproxy.launchconfig import parse_launch_config
from wunderproxy.store import (
    CURRENT_KEY,
    HISTORY_KEY,
    FileStore,
    S3Store,
    Store,
    config_key,
    load_current,
    load_launch_config,
    open_store,
    read_history,
    record_deploy,
    save_launch_config,
)

NOW = datetime(2026, 11, 24, 12, 0, 0, tzinfo=UTC)


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """The same behaviour is checked on the embedded store and on a real S3 server."""
    if request.param == "file":
        return FileStore(tmp_path, "apps/myapp")
    bucket: str = request.getfixturevalue("s3_bucket")
    return S3Store(bucket, "apps/myapp")


def deploy(store: Store, revision: str, at: datetime = NOW, by: str = "host-a") -> str:
    """Upload a config for ``revision``, record it as deployed, and return its hash."""
    hash_ = upload_launch_config(store, example_config(Revision=revision))
    record_deploy(store, load_launch_config(store, hash_), by, at)
    return hash_


def test_get_of_an_absent_key_is_none(store: Store) -> None:
    assert store.get("nothing.json") is None


def test_put_then_get_returns_the_same_bytes(store: Store) -> None:
    store.put("blob.json", b"\x00\xff{}\n")
    store.put("blob.json", b"second")

    assert store.get("blob.json") == b"second"


def test_load_launch_config_returns_the_parsed_config(store: Store) -> None:
    hash_ = upload_launch_config(store, example_config())

    config = load_launch_config(store, f" {hash_.upper()}\n")

    assert (config.hash, config.revision, config.health_check_path) == (hash_, "2f1c9a7", "/health")


def test_load_launch_config_of_an_absent_hash_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound) as caught:
        load_launch_config(store, "d41d8cd98f00b204e9800998ecf8427e")

    assert str(caught.value) == (
        f"no container.d41d8cd98f00b204e9800998ecf8427e.json under {store.description}; "
        "upload it first"
    )


def test_load_refuses_config_whose_bytes_do_not_match_hash(store: Store) -> None:
    hash_, raw = encode_config(example_config())
    store.put(config_key(hash_), raw + b" ")

    with pytest.raises(
        InvalidConfig, match=rf"container\.{hash_}\.json under .* has MD5"
    ) as caught:
        load_launch_config(store, hash_)

    assert caught.value.status == 422


def test_load_refuses_a_malformed_hash_before_reading(store: Store) -> None:
    with pytest.raises(BadRequest):
        load_launch_config(store, "../current")


def test_load_current_is_none_before_any_deploy(store: Store) -> None:
    assert load_current(store) is None


def test_load_current_returns_the_recorded_config(store: Store) -> None:
    hash_ = deploy(store, "r1")

    current = load_current(store)

    assert current is not None
    assert (current.hash, current.revision) == (hash_, "r1")


def test_load_current_refuses_an_invalid_current_json_naming_it(store: Store) -> None:
    store.put(CURRENT_KEY, b'{"Revision": "r1"}')

    with pytest.raises(InvalidConfig, match=r"^current\.json under .* HealthCheckPath is required"):
        load_current(store)


def test_record_deploy_writes_a_byte_copy_and_a_history_entry(store: Store) -> None:
    hash_, raw = encode_config(example_config())
    store.put(config_key(hash_), raw)
    config = parse_launch_config(raw, hash_)
    east = timezone(timedelta(hours=2))

    record_deploy(store, config, "alice@host-a", datetime(2026, 11, 24, 14, 0, 0, tzinfo=east))

    assert store.get(CURRENT_KEY) == raw
    history = store.get(HISTORY_KEY)
    assert history is not None
    assert history.endswith(b"]\n")
    assert history.startswith(b'[\n  {\n    "Revision": "2f1c9a7",')
    assert json.loads(history) == [
        {
            "Revision": "2f1c9a7",
            "Hash": hash_,
            "DeployedAt": "2026-11-24T12:00:00Z",
            "DeployedBy": "alice@host-a",
        }
    ]


def test_history_keeps_the_newest_ten_oldest_first(store: Store) -> None:
    hashes = [deploy(store, f"r{n}", NOW + timedelta(minutes=n)) for n in range(12)]

    history = read_history(store)

    assert [entry["Hash"] for entry in history] == hashes[2:]
    assert [entry["Revision"] for entry in history] == [f"r{n}" for n in range(2, 12)]
    assert history[-1]["DeployedAt"] == "2026-11-24T12:11:00Z"


def test_history_does_not_repeat_a_hash_switched_by_several_hosts(store: Store) -> None:
    first = deploy(store, "r1", by="host-a")
    deploy(store, "r1", by="host-b")
    second = deploy(store, "r2", by="host-a")
    deploy(store, "r2", by="host-b")
    deploy(store, "r1", by="host-a")  # a rollback is a new entry

    assert [entry["Hash"] for entry in read_history(store)] == [first, second, first]


def test_read_history_is_empty_when_absent(store: Store) -> None:
    assert read_history(store) == []


@pytest.mark.parametrize("raw", [b"{not json", b'{"Hash": "x"}', b"[1]", b'[{"Hash": 1}]'])
def test_read_history_refuses_a_malformed_history(store: Store, raw: bytes) -> None:
    store.put(HISTORY_KEY, raw)

    with pytest.raises(InvalidConfig, match=r"^history\.json under .*; fix or delete it"):
        read_history(store)


def test_record_deploy_needs_an_aware_time(store: Store) -> None:
    hash_, raw = encode_config(example_config())

    with pytest.raises(ValueError, match="timezone-aware"):
        record_deploy(store, parse_launch_config(raw, hash_), "x", datetime(2026, 1, 1))


def test_create_stores_only_when_the_key_is_absent(store: Store) -> None:
    assert store.create("deploy.lock", b"first") is True
    assert store.create("deploy.lock", b"second") is False

    assert store.get("deploy.lock") == b"first"


def test_of_writers_racing_to_create_one_key_exactly_one_wins(store: Store) -> None:
    writers = 8
    barrier = threading.Barrier(writers)

    def create(n: int) -> bool:
        barrier.wait()
        return store.create("deploy.lock", f"writer {n}".encode())

    with ThreadPoolExecutor(writers) as pool:
        won = list(pool.map(create, range(writers)))

    assert won.count(True) == 1
    assert store.get("deploy.lock") == f"writer {won.index(True)}".encode()


def test_delete_removes_the_key_only_when_it_holds_the_bytes_expected(store: Store) -> None:
    store.put("deploy.lock", b"theirs")

    assert store.delete("deploy.lock", b"mine") is False
    assert store.get("deploy.lock") == b"theirs"
    assert store.delete("deploy.lock", b"theirs") is True
    assert store.get("deploy.lock") is None
    assert store.delete("deploy.lock", b"theirs") is False
    assert store.create("deploy.lock", b"next") is True


def test_replace_writes_the_key_only_when_it_holds_the_bytes_expected(store: Store) -> None:
    assert store.replace("deploy.lock", b"mine", b"mine, renewed") is False
    assert store.get("deploy.lock") is None, "replace must not create a key"
    store.put("deploy.lock", b"theirs")

    assert store.replace("deploy.lock", b"mine", b"mine, renewed") is False
    assert store.get("deploy.lock") == b"theirs"
    assert store.replace("deploy.lock", b"theirs", b"theirs, renewed") is True
    assert store.get("deploy.lock") == b"theirs, renewed"


def test_save_launch_config_stores_it_under_its_hash(store: Store) -> None:
    hash_, raw = encode_config(example_config(Revision="r9"))

    config = save_launch_config(store, raw, "app.json")
    again = save_launch_config(store, raw, "app.json")

    assert (config.hash, config.revision, again.hash) == (hash_, "r9", hash_)
    assert store.get(config_key(hash_)) == raw


def test_save_launch_config_refuses_an_invalid_one_naming_the_field_and_stores_nothing(
    store: Store,
) -> None:
    hash_, raw = encode_config(example_config(HealthCheckPath=7))

    with pytest.raises(InvalidConfig, match=r"^app\.json is invalid: HealthCheckPath "):
        save_launch_config(store, raw, "app.json")

    assert store.get(config_key(hash_)) is None


def test_file_store_keeps_keys_under_directory_and_prefix(tmp_path: Path) -> None:
    store = FileStore(tmp_path, "/apps/myapp/")
    store.put("current.json", b"{}")

    assert (tmp_path / "apps" / "myapp" / "current.json").read_bytes() == b"{}"
    assert store.description == f"file://{tmp_path}/apps/myapp"
    assert [p.name for p in (tmp_path / "apps" / "myapp").iterdir()] == ["current.json"]


def test_file_store_reports_an_unreadable_key_naming_the_path(tmp_path: Path) -> None:
    (tmp_path / "current.json").mkdir()
    store = FileStore(tmp_path, "")

    with pytest.raises(UpstreamFailed, match=re.escape(f"cannot read {tmp_path}/current.json: ")):
        store.get("current.json")


def test_file_store_reports_an_unwritable_directory_naming_the_path(tmp_path: Path) -> None:
    (tmp_path / "apps").write_bytes(b"a file where the prefix should be")
    store = FileStore(tmp_path, "apps")

    with pytest.raises(
        UpstreamFailed, match=re.escape(f"cannot write {tmp_path}/apps/current.json: ")
    ):
        store.put("current.json", b"{}")


def test_file_store_refuses_keys_outside_the_store(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="inside the store"):
        FileStore(tmp_path, "p").get("../secret")


@pytest.mark.parametrize(
    ("bucket", "prefix", "description"),
    [
        ("my-bucket", "/apps/myapp/", "s3://my-bucket/apps/myapp"),
        ("my-bucket", "", "s3://my-bucket"),
        ("file:///srv/store", "myapp", "file:///srv/store/myapp"),
        ("file:///srv/store", "/", "file:///srv/store"),
    ],
)
def test_open_store_picks_the_store_from_the_bucket_argument(
    bucket: str, prefix: str, description: str
) -> None:
    assert open_store(bucket, prefix).description == description


def test_open_store_resolves_a_relative_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    store = open_store("file://data", "myapp")

    assert isinstance(store, FileStore)
    assert store.root == tmp_path / "data" / "myapp"


def test_open_store_refuses_a_file_url_without_directory() -> None:
    with pytest.raises(ValueError, match="file:// needs a directory"):
        open_store("file://", "myapp")


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_s3_store_reports_an_unreachable_endpoint_quickly(
    s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    # One attempt: the default three back off randomly, up to about six seconds in all.
    store = S3Store(s3_bucket, "myapp", max_attempts=1)

    started = time.monotonic()
    with pytest.raises(UpstreamFailed) as caught:
        store.get(CURRENT_KEY)

    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert f"S3 get s3://{s3_bucket}/myapp/current.json at {endpoint} failed: " in message
    assert "check AWS_ENDPOINT_URL" in message


def test_s3_store_reports_a_missing_bucket_naming_it(s3_bucket: str) -> None:
    store = S3Store(f"{s3_bucket}-gone", "myapp")

    with pytest.raises(UpstreamFailed, match=f"NoSuchBucket: .*create bucket {s3_bucket}-gone"):
        store.put(CURRENT_KEY, b"{}")
    with pytest.raises(UpstreamFailed, match=r"S3 get .* failed: NoSuchBucket"):
        store.get(CURRENT_KEY)


def test_s3_store_reports_missing_credentials(
    s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    # Keep botocore from asking an instance metadata service that is not there.
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")

    with pytest.raises(UpstreamFailed, match="configure AWS credentials"):
        S3Store(s3_bucket, "myapp").get(CURRENT_KEY)


def test_file_store_leaves_no_temp_or_moved_aside_file_behind(tmp_path: Path) -> None:
    store = FileStore(tmp_path, "p")
    store.create("deploy.lock", b"a")
    store.create("deploy.lock", b"b")
    store.delete("deploy.lock", b"b")
    store.replace("deploy.lock", b"b", b"c")
    store.replace("deploy.lock", b"a", b"a")

    assert [p.name for p in (tmp_path / "p").iterdir()] == ["deploy.lock"]
    store.delete("deploy.lock", b"a")
    assert list((tmp_path / "p").iterdir()) == []


@pytest.mark.parametrize(
    "change",
    [
        lambda store: store.delete("deploy.lock", b"mine"),
        lambda store: store.replace("deploy.lock", b"mine", b"mine, renewed"),
    ],
    ids=["delete", "replace"],
)
def test_s3_conditional_change_leaves_an_object_that_changed_after_it_was_read(
    s3_server: str, s3_bucket: str, change: Callable[[S3Store], bool]
) -> None:
    # The bytes compared are the old ones: only S3's If-Match can keep the new object.
    session = changed_after_read(s3_server, s3_bucket, "myapp/deploy.lock", b"theirs")
    store = S3Store(s3_bucket, "myapp", session=session)
    store.put("deploy.lock", b"mine")

    assert change(store) is False
    assert store.get("deploy.lock") == b"theirs"


def test_s3_store_create_delete_and_replace_report_a_missing_bucket(s3_bucket: str) -> None:
    store = S3Store(f"{s3_bucket}-gone", "myapp")

    with pytest.raises(UpstreamFailed, match=r"S3 conditional put .* failed: NoSuchBucket"):
        store.create("deploy.lock", b"{}")
    with pytest.raises(UpstreamFailed, match=r"S3 conditional delete .* failed: NoSuchBucket"):
        store.delete("deploy.lock", b"{}")
    with pytest.raises(UpstreamFailed, match=r"S3 conditional replace .* failed: NoSuchBucket"):
        store.replace("deploy.lock", b"{}", b"{}")
