"""A client for a running manager, used by ``wunderproxy status|launch|switch``."""

from __future__ import annotations

import getpass
import http.client
import json
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


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
        document = json.loads(self._call("GET", "/status", b""))
        if not isinstance(document, dict):
            raise ClientError(f"{self.url}/status did not answer a JSON object")
        return document

    def launch(self, config_hash: str) -> dict[str, Any]:
        """``POST /launch``; returns the JSON answer once the container is healthy."""
        return self._post_json("/launch", config_hash)

    def switch(self, config_hash: str) -> dict[str, Any]:
        """``POST /switch``; returns the JSON answer."""
        return self._post_json("/switch", config_hash)

    def _post_json(self, path: str, config_hash: str) -> dict[str, Any]:
        answer = json.loads(self._call("POST", path, config_hash.encode()))
        if not isinstance(answer, dict):
            raise ClientError(f"{self.url}{path} did not answer a JSON object")
        return answer

    def _call(self, method: str, path: str, body: bytes) -> bytes:
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
        return data

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
        message = data.decode("utf-8", "replace").strip() or "(empty answer)"
    return f"{status}: {message}"


def _deployer() -> str:
    """``user@host`` of whoever runs the client, recorded in history.json."""
    try:
        return f"{getpass.getuser()}@{socket.gethostname()}"
    except (OSError, KeyError):
        return socket.gethostname()
