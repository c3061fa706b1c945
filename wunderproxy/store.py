"""Where launch configs live: an S3 bucket, or a local directory with the same key layout.

Keys under PREFIX (see SPEC "Store layout"): ``container.HASH.json`` for each config,
``current.json`` (a byte copy of the config deployed now), ``history.json`` (the last
deploys, oldest first) and, while a fleet deploy runs, ``deploy.lock`` (see
:mod:`wunderproxy.deploylock`). Store methods block; async callers run them in a thread
executor.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import boto3
import botocore.config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from wunderproxy.errors import InvalidConfig, NotFound, UpstreamFailed
from wunderproxy.launchconfig import LaunchConfig, md5_hex, parse_hash, parse_launch_config
from wunderproxy.timestamps import rfc3339

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

CURRENT_KEY = "current.json"
HISTORY_KEY = "history.json"
HISTORY_LIMIT = 10
"""Entries kept in history.json, as the original wunderproxy kept."""

DEFAULT_S3_MAX_ATTEMPTS = 3
DEFAULT_S3_CONNECT_TIMEOUT = 5.0  # seconds; an endpoint that does not answer by then is down
DEFAULT_S3_READ_TIMEOUT = 30.0  # seconds; configs are small, so this only catches a hung server


def config_key(hash_: str) -> str:
    """Key of the launch config with this hash."""
    return f"container.{hash_}.json"


class Store(Protocol):
    """A flat key-value store under one prefix. Methods block: run them in an executor."""

    @property
    def description(self) -> str:
        """Where the keys live, for messages: ``s3://bucket/prefix`` or ``file:///dir/prefix``."""
        ...

    def get(self, key: str) -> bytes | None:
        """Return the bytes under ``key`` (relative to the prefix), None when absent."""
        ...

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``, replacing what was there."""
        ...

    def create(self, key: str, data: bytes) -> bool:
        """Store ``data`` under ``key`` only if nothing is there; False if something was.

        Of two callers racing for an absent key, at most one gets True: this is what a
        lock is taken with.
        """
        ...

    def delete(self, key: str, expected: bytes) -> bool:
        """Remove ``key`` only if it holds exactly ``expected``; False if it held anything
        else or nothing. A lock is released and broken with it, never removing one that
        someone else took meanwhile."""
        ...

    def replace(self, key: str, expected: bytes, data: bytes) -> bool:
        """Store ``data`` under ``key`` only if it holds exactly ``expected``; False if it
        held anything else or nothing. A lock is renewed with it, never overwriting one
        that someone else took meanwhile."""
        ...


class S3Store:
    """Keys in an S3 bucket (or any S3-compatible server named by AWS_ENDPOINT_URL)."""

    def __init__(
        self,
        bucket: str,
        prefix: str,
        *,
        max_attempts: int = DEFAULT_S3_MAX_ATTEMPTS,
        connect_timeout: float = DEFAULT_S3_CONNECT_TIMEOUT,
        read_timeout: float = DEFAULT_S3_READ_TIMEOUT,
        session: boto3.session.Session | None = None,
    ) -> None:
        """``session`` is the boto3 session the client is made from (default: a new one);
        botocore event handlers registered on it apply to every call of the store."""
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.description = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._config = botocore.config.Config(
            retries={"max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
        )
        self._client: S3Client | None = None
        self._session = session
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        """Return the object under ``key``, None when S3 says it does not exist."""
        try:
            client = self._connect()
            response = client.get_object(Bucket=self.bucket, Key=self._key(key))
            return response["Body"].read()
        except ClientError as error:
            if _error_code(error) in {"NoSuchKey", "404"}:
                return None
            raise self._failed("get", key, error) from error
        except BotoCoreError as error:
            raise self._failed("get", key, error) from error

    def put(self, key: str, data: bytes) -> None:
        """Write ``data`` as the object under ``key``."""
        try:
            self._connect().put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except (ClientError, BotoCoreError) as error:
            raise self._failed("put", key, error) from error

    def create(self, key: str, data: bytes) -> bool:
        """A conditional write (``If-None-Match: *``): S3 itself refuses it when the key
        exists, so two writers can never both succeed."""
        try:
            self._connect().put_object(
                Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*"
            )
        except ClientError as error:
            # 412: the key exists. 409: another conditional write to it is under way.
            if _error_code(error) in {"PreconditionFailed", "ConditionalRequestConflict"}:
                return False
            raise self._failed("conditional put", key, error) from error
        except BotoCoreError as error:
            raise self._failed("conditional put", key, error) from error
        return True

    def delete(self, key: str, expected: bytes) -> bool:
        """Read the object and its ETag, then delete it only if the ETag still matches
        (``If-Match``): what was compared is what is deleted."""
        return self._if_unchanged(
            "conditional delete",
            key,
            expected,
            lambda client, etag: client.delete_object(
                Bucket=self.bucket, Key=self._key(key), IfMatch=etag
            ),
        )

    def replace(self, key: str, expected: bytes, data: bytes) -> bool:
        """Read the object and its ETag, then write ``data`` only if the ETag still
        matches (``PutObject`` with ``If-Match``): what was compared is what is replaced."""
        return self._if_unchanged(
            "conditional replace",
            key,
            expected,
            lambda client, etag: client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=data, IfMatch=etag
            ),
        )

    def _if_unchanged(
        self, action: str, key: str, expected: bytes, change: Callable[[S3Client, str], object]
    ) -> bool:
        """``change(client, etag)`` if ``key`` holds ``expected``: True once done, False
        when it held anything else or nothing, or changed after it was read. ``change``
        must have S3 check that the object still has the ETag read with it."""
        try:
            client = self._connect()
            response = client.get_object(Bucket=self.bucket, Key=self._key(key))
            if response["Body"].read() != expected:
                return False
            change(client, response["ETag"])
        except ClientError as error:
            # Gone (404, also a conditional put's), changed since it was read (412), or
            # another conditional write to it under way (409): not what was compared.
            if _error_code(error) in {
                "NoSuchKey",
                "404",
                "PreconditionFailed",
                "ConditionalRequestConflict",
            }:
                return False
            raise self._failed(action, key, error) from error
        except BotoCoreError as error:
            raise self._failed(action, key, error) from error
        return True

    def _connect(self) -> S3Client:
        # One client for the store's life: clients are thread-safe, sessions are not, so the
        # client is made once under a lock (from a new session unless one was given).
        with self._lock:
            if self._client is None:
                session = self._session or boto3.session.Session()
                self._client = session.client("s3", config=self._config)
            return self._client

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _failed(self, action: str, key: str, error: Exception) -> UpstreamFailed:
        endpoint = self._client.meta.endpoint_url if self._client is not None else "unknown"
        return UpstreamFailed(
            f"S3 {action} s3://{self.bucket}/{self._key(key)} at {endpoint} failed: "
            f"{_reason(error)}; {_hint(error, self.bucket)}"
        )


def _error_code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _reason(error: Exception) -> str:
    if isinstance(error, ClientError):
        details = error.response.get("Error", {})
        return f"{details.get('Code', '?')}: {details.get('Message', str(error))}"
    return str(error)


def _hint(error: Exception, bucket: str) -> str:
    """What the operator should check, given what went wrong."""
    if isinstance(error, NoCredentialsError):
        return (
            "configure AWS credentials (AWS_PROFILE, AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or an instance profile)"
        )
    if isinstance(error, ClientError):
        code = _error_code(error)
        if code == "NoSuchBucket":
            return f"create bucket {bucket} or fix the BUCKET argument"
        if code in {"AccessDenied", "403"}:
            # Without s3:ListBucket, S3 answers a missing key with AccessDenied, not 404.
            return (
                "grant the credentials s3:GetObject, s3:PutObject and s3:ListBucket "
                f"on bucket {bucket}"
            )
    return f"check AWS_ENDPOINT_URL, the credentials and that bucket {bucket} exists"


class FileStore:
    """Keys as files in ``directory/prefix/``: the embedded store, no cloud account needed."""

    def __init__(self, directory: str | os.PathLike[str], prefix: str) -> None:
        self.prefix = prefix.strip("/")
        self.root = Path(directory).absolute() / self.prefix
        self.description = self.root.as_uri()

    def get(self, key: str) -> bytes | None:
        """Return the file's bytes, None when there is no such file."""
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as error:
            raise UpstreamFailed(
                f"cannot read {path}: {error.strerror or error}; check that wunderproxy may read it"
            ) from error

    def put(self, key: str, data: bytes) -> None:
        """Write the file atomically: readers see the old bytes or the new, never a mix."""
        path = self._path(key)
        try:
            with self._written(path, data) as temp:
                os.replace(temp, path)
        except OSError as error:
            raise _write_failed(path, error) from error

    def create(self, key: str, data: bytes) -> bool:
        """Link a complete temp file to the name: ``link`` fails if the name exists, so of
        two writers one wins, and no reader ever sees a half-written file (as it could
        between ``open(O_CREAT|O_EXCL)`` and the write)."""
        path = self._path(key)
        try:
            with self._written(path, data) as temp, self._exclusive(path.parent):
                os.link(temp, path)
        except FileExistsError:
            return False
        except OSError as error:
            raise _write_failed(path, error) from error
        return True

    def delete(self, key: str, expected: bytes) -> bool:
        """Compare and remove while holding the directory's lock, which :meth:`create`
        and :meth:`replace` take too: no other writer can slip in between."""
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with self._exclusive(path.parent):
                if not _holds(path, expected):
                    return False
                path.unlink()
        except OSError as error:
            raise _write_failed(path, error) from error
        return True

    def replace(self, key: str, expected: bytes, data: bytes) -> bool:
        """Compare, then rename a complete temp file over the name, while holding the
        directory's lock as :meth:`delete` does."""
        path = self._path(key)
        try:
            with self._written(path, data) as temp, self._exclusive(path.parent):
                if not _holds(path, expected):
                    return False
                os.replace(temp, path)
        except OSError as error:
            raise _write_failed(path, error) from error
        return True

    @staticmethod
    @contextlib.contextmanager
    def _exclusive(directory: Path) -> Iterator[None]:
        """An exclusive ``flock`` on ``directory`` for the block: it serialises
        :meth:`create` and :meth:`delete` of every process on this machine."""
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the last descriptor releases the lock

    @contextlib.contextmanager
    def _written(self, path: Path, data: bytes) -> Iterator[str]:
        """A temp file beside ``path`` holding ``data``, synced; removed afterwards.

        In the same directory, so that renaming or linking it is one file system's
        operation. mkstemp makes it private (0600): configs may carry secrets in Env.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            yield temp
        finally:
            Path(temp).unlink(missing_ok=True)

    def _path(self, key: str) -> Path:
        # Keys come from this module, but a stray "../" must never leave the store.
        if not key or key.startswith("/") or ".." in Path(key).parts:
            raise ValueError(f"store key {key!r} must be a relative path inside the store")
        return self.root / key


def _holds(path: Path, expected: bytes) -> bool:
    """Whether the file at ``path`` holds exactly ``expected`` (False when absent)."""
    try:
        return path.read_bytes() == expected
    except FileNotFoundError:
        return False


def _write_failed(path: Path, error: OSError) -> UpstreamFailed:
    return UpstreamFailed(
        f"cannot write {path}: {error.strerror or error}; check that the directory "
        "exists and wunderproxy may write to it"
    )


def open_store(bucket: str, prefix: str) -> Store:
    """The store named on the command line: ``file://DIR`` is a directory, else an S3 bucket."""
    if bucket.startswith("file://"):
        directory = bucket.removeprefix("file://")
        if not directory:
            raise ValueError("file:// needs a directory, e.g. file:///var/lib/wunderproxy")
        return FileStore(directory, prefix)
    return S3Store(bucket, prefix)


def load_launch_config(store: Store, hash_: str) -> LaunchConfig:
    """Load and check ``container.HASH.json``; NotFound when absent, InvalidConfig when bad."""
    hash_ = parse_hash(hash_)
    key = config_key(hash_)
    raw = store.get(key)
    if raw is None:
        raise NotFound(f"no {key} under {store.description}; upload it first")
    return parse_launch_config(raw, hash_, source=f"{key} under {store.description}")


def save_launch_config(store: Store, raw: bytes, source: str) -> LaunchConfig:
    """Check ``raw`` as a launch config, then store it as ``container.MD5.json``.

    InvalidConfig naming the field (``source`` names the document), and nothing stored,
    when it is not a valid one. Saving the same bytes again rewrites the same key.
    """
    config = parse_launch_config(raw, md5_hex(raw), source=source)
    store.put(config_key(config.hash), raw)
    return config


def load_current(store: Store) -> LaunchConfig | None:
    """The config deployed now (current.json), or None when nothing was deployed yet."""
    raw = store.get(CURRENT_KEY)
    if raw is None:
        return None
    # current.json is a copy, so its hash is that of its own bytes, not of its name.
    return parse_launch_config(raw, md5_hex(raw), source=f"{CURRENT_KEY} under {store.description}")


def read_history(store: Store) -> list[dict[str, str]]:
    """The recorded deploys, oldest first; empty when history.json is absent."""
    raw = store.get(HISTORY_KEY)
    if raw is None:
        return []
    where = f"{HISTORY_KEY} under {store.description}"
    try:
        entries = json.loads(raw)
    except (ValueError, RecursionError) as error:
        raise InvalidConfig(
            f"{where} is not valid JSON: {error}; fix or delete it (it only records deploys)"
        ) from error
    if not isinstance(entries, list) or not all(
        isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())
        for entry in entries
    ):
        raise InvalidConfig(
            f"{where} must be a JSON array of objects with string values; fix or delete it "
            "(it only records deploys)"
        )
    return entries


def record_deploy(
    store: Store, config: LaunchConfig, deployed_by: str, now: datetime
) -> list[dict[str, str]]:
    """Make ``config`` the current one and add it to the history; return the history.

    current.json is written first: it is what a restarted host launches, while history.json
    only informs. Several hosts switch the same hash, so a hash already last in the history is
    not added again. ``now`` must be timezone-aware.
    """
    if now.tzinfo is None:
        raise ValueError("record_deploy needs a timezone-aware time, e.g. datetime.now(UTC)")
    store.put(CURRENT_KEY, config.raw)
    history = read_history(store)
    if history and history[-1].get("Hash") == config.hash:
        return history
    history.append(
        {
            "Revision": config.revision,
            "Hash": config.hash,
            "DeployedAt": rfc3339(now),
            "DeployedBy": deployed_by,
        }
    )
    history = history[-HISTORY_LIMIT:]
    store.put(HISTORY_KEY, (json.dumps(history, indent=2) + "\n").encode())
    return history
