"""--compress end to end: ``python -m wunderproxy run --compress`` in front of the busybox app
in a real container, reached over real sockets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.apps import APP_JS
from tests.support.configs import PREFIX, app_config, upload_launch_config
from tests.support.docker import AppImages
from tests.support.encodings import ENCODINGS, decoded
from tests.support.process import wunderproxy
from tests.support.waiting import wait_until
from wunderproxy.store import FileStore

pytestmark = pytest.mark.e2e


def test_the_proxy_compresses_the_containers_answers_with_each_encoding(
    app_name: str, app_images: AppImages, tmp_path: Path
) -> None:
    directory = tmp_path / "store"
    upload_launch_config(
        FileStore(str(directory), PREFIX), app_config(app_images, "rev1"), current=True
    )
    access_log = tmp_path / "access.json"
    with wunderproxy(
        tmp_path,
        f"file://{directory}",
        PREFIX,
        app_name,
        app_images.registry_port,
        "--compress",
        "--access-log",
        str(access_log),
        "--access-log-format",
        "json",
    ) as running:
        running.wait_until_serving("rev1")
        for encoding in ENCODINGS:
            answer = running.get("/app.js", headers={"Accept-Encoding": f"{encoding}, identity"})
            assert answer.status == 200
            headers = {name.lower(): value for name, value in answer.headers.items()}
            assert headers["content-encoding"] == encoding
            assert headers["transfer-encoding"] == "chunked"
            assert headers["vary"] == "Accept-Encoding"
            assert headers["etag"].startswith('W/"')
            assert "content-length" not in headers and "accept-ranges" not in headers
            assert decoded(encoding, answer.body) == APP_JS
            assert len(answer.body) < len(APP_JS) / 5

        # Without Accept-Encoding, and below --compress-min-size: the container's bytes.
        plain = running.get("/app.js")
        assert plain.body == APP_JS and plain.headers["Content-Length"] == str(len(APP_JS))
        small = running.get("/index.html", headers={"Accept-Encoding": "gzip"})
        assert small.text == "<h1>testapp rev1</h1>\n" and "Content-Encoding" not in small.headers

        assert running.status()["features"]["compress"] == list(ENCODINGS)

        def logged() -> list[dict[str, object]]:
            return [json.loads(line) for line in access_log.read_text().splitlines()]

        wait_until(lambda: len(logged()) >= 5, "five lines in the access log")
    app_js = [entry["encoding"] for entry in logged() if entry["target"] == "/app.js"]
    assert app_js == [*ENCODINGS, None]
