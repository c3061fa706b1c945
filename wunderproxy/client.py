"""A client for a running manager, used by ``wunderproxy status|launch|switch``."""

from __future__ import annotations

import getpass
import http.client
import json
import re
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

MESSAGE_CHARS = 200  # of an answer that is not JSON: enough to tell what answered
_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)
_TAG = re.compile(r"<[^>]*>")


class ClientError(Exception):
    """The manager could not be reached or refused the request; the message says why."""


@dataclass(frozen=True)
class ManagerClient:
    """Talks to the manager API at ``url`` (``http://HOST:PORT`` or ``HOST:PORT``)."""

    url: str
    token: str | None = None
    timeout: float = 600.0

    def status(self) -> dict[str, Any]:
        """``GET /status`` as a dict."""
        return self._json("GET", "/status", b"")

    def launch(self, config_hash: str) -> dict[str, Any]:
        """``POST /launch``; returns the JSON answer once the container is healthy."""
        return self._post_json("/launch", config_hash)

    def switch(self, config_hash: str) -> dict[str, Any]:
        """``POST /switch``; returns the JSON answer."""
        return self._post_json("/switch", config_hash)

    def _post_json(self, path: str, config_hash: str) -> dict[str, Any]:
        answer = self._json("POST", path, config_hash.encode())
        if not isinstance(answer.get("message"), str):
            raise ClientError(f"{self.url}{path} answered JSON without a message: {answer}")
        return answer

    def _json(self, method: str, path: str, body: bytes) -> dict[str, Any]:
        """The JSON object a 200 answer carries; ClientError saying what came instead."""
        data, content_type = self._call(method, path, body)
        try:
            document = json.loads(data)
        except ValueError:
            document = None
        if not isinstance(document, dict):
            raise ClientError(
                f"{self.url}{path} answered 200 but not with a JSON object "
                f"({content_type or 'no Content-Type'}): {_message_of(data)}; "
                "is --api the address of the wunderproxy manager?"
            )
        return document

    def _call(self, method: str, path: str, body: bytes) -> tuple[bytes, str]:
        """The body and Content-Type of a 200 answer; ClientError for anything else."""
        host, port = self._host_port()
        headers = {
            "Accept": "application/json",
            "Content-Type": "text/plain",
            "X-Deployed-By": _deployer(),
        }
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        connection = http.client.HTTPConnection(host, port, timeout=self.timeout)
        try:
            connection.request(method, path, body=body or None, headers=headers)
            response = connection.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise ClientError(
                f"cannot reach the manager at {self.url}: {exc}; is wunderproxy running "
                "there (see --api)?"
            ) from exc
        finally:
            connection.close()
        if response.status != 200:
            raise ClientError(_error_message(response.status, data))
        return data, response.getheader("Content-Type", "")

    def _host_port(self) -> tuple[str, int]:
        url = self.url if "://" in self.url else f"http://{self.url}"
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ClientError(f"--api {self.url!r}: expected http://HOST:PORT")
        host = "127.0.0.1" if parts.hostname in ("0.0.0.0", "::") else parts.hostname
        return host, parts.port or 80


def _error_message(status: int, data: bytes) -> str:
    try:
        message = json.loads(data)["error"]
    except (ValueError, KeyError, TypeError):
        message = _message_of(data)
    return f"{status}: {message}"


def _message_of(data: bytes) -> str:
    """What a person should read of an answer that is not wunderproxy's JSON: an HTML
    page's title (a proxy's or web server's error page), else its text, cut short."""
    text = data.decode("utf-8", "replace")
    title = _TITLE.search(text)
    if title is not None:
        text = title.group(1)
    text = " ".join(_TAG.sub(" ", text).split())
    if len(text) > MESSAGE_CHARS:
        text = text[:MESSAGE_CHARS] + "..."
    return text or "(empty answer)"


def _deployer() -> str:
    """``user@host`` of whoever runs the client, recorded in history.json."""
    try:
        return f"{getpass.getuser()}@{socket.gethostname()}"
    except (OSError, KeyError):
        return socket.gethostname()
