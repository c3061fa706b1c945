"""A real S3 server for tests: moto's, in a thread, spoken to over HTTP on a free port."""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

ACCESS_KEY = "test"
SECRET_KEY = "test"
REGION = "us-east-1"
BUCKET_PREFIX = "wunderproxy-test"


def aws_environment(endpoint: str) -> dict[str, str]:
    """The AWS chain's settings that reach the S3 server at ``endpoint`` and nothing else.

    A profile or config file from the developer's machine must not leak into tests, so the
    files point nowhere; ``AWS_PROFILE`` must be unset as well (see :func:`aws_chain_at`).
    """
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_CONFIG_FILE": "/nonexistent",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
    }


@contextlib.contextmanager
def aws_chain_at(endpoint: str) -> Iterator[None]:
    """Point this process's AWS chain (and its children's) at ``endpoint``; restore at exit.

    For scripts; tests use the ``s3_bucket`` fixture, which does the same with monkeypatch.
    """
    saved = {name: os.environ.get(name) for name in [*aws_environment(endpoint), "AWS_PROFILE"]}
    os.environ.update(aws_environment(endpoint))
    os.environ.pop("AWS_PROFILE", None)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def s3_client(endpoint: str) -> S3Client:
    """A client of the S3 server at ``endpoint``, whatever the environment says."""
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name=REGION,
    )


def changed_after_read(endpoint: str, bucket: str, key: str, new: bytes) -> boto3.session.Session:
    """A session whose client, right after its first ``GetObject``, sees another writer
    replace the object ``key`` (prefix included) with ``new``: the change that a
    conditional write or delete following the read must notice."""
    session = boto3.session.Session()
    other = s3_client(endpoint)
    done = threading.Event()

    def change(**_: Any) -> None:
        if done.is_set():
            return
        done.set()
        other.put_object(Bucket=bucket, Key=key, Body=new)

    session.events.register("after-call.s3.GetObject", change)
    return session


def create_bucket(purpose: str = "") -> str:
    """Create a bucket with a unique name through the AWS chain; return its name."""
    name = "-".join(filter(None, [BUCKET_PREFIX, purpose, uuid.uuid4().hex[:12]]))
    boto3.session.Session().client("s3").create_bucket(Bucket=name)
    return name


def delete_bucket(name: str) -> None:
    """Delete a bucket and everything in it, through the AWS chain."""
    bucket = boto3.session.Session().resource("s3").Bucket(name)
    bucket.objects.all().delete()
    bucket.delete()


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """Run moto's S3 server on a free 127.0.0.1 port; yield its endpoint URL."""
    # Port 0 lets the OS pick a free port with no window for another process to take it.
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Start one moto S3 server for the session; yield its endpoint URL."""
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point the AWS chain at the test server and return a new, empty bucket's name."""
    for name, value in aws_environment(s3_server).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return create_bucket()
