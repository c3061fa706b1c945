"""A client for a running manager, used by the client commands (``status``, ``launch``,
``switch``, and the fleet's ``deploy`` and ``rollback``)."""

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


STATUS_TIMEOUT = 10.0  # seconds: /status answers at once unless the host is in trouble


class ClientError(Exception):
    """The manager could not be reached or refused the request; the message says why.

    ``status`` is the HTTP status of a refusal, None when no answer came.
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ManagerClient:
    """Talks to the manager API at ``url`` (``http://HOST:PORT`` or ``HOST:PORT``)."""

    url: str
    token: str | None = None
    timeout: float = 600.0

    def status(self) -> dict[str, Any]:
        """``GET /status`` as a dict; gives up after ``STATUS_TIMEOUT`` at most."""
        return self._json("GET", "/status", b"", min(self.timeout, STATUS_TIMEOUT))

    def launch(self, config_hash: str) -> dict[str, Any]:
        """``POST /launch``; returns the JSON answer once the container is healthy."""
        return self._post_json("/launch", config_hash)

    def switch(self, config_hash: str) -> dict[str, Any]:
        """``POST /switch``; returns the JSON answer."""
        return self._post_json("/switch", config_hash)

    def abort(self, config_hash: str) -> dict[str, Any]:
        """``POST /abort``; returns the JSON answer once nothing of the launch runs."""
        return self._post_json("/abort", config_hash)

    def _post_json(self, path: str, config_hash: str) -> dict[str, Any]:
        answer = self._json("POST", path, config_hash.encode(), self.timeout)
        if not isinstance(answer.get("message"), str):
            raise ClientError(f"{self.url}{path} answered JSON without a message: {answer}")
        return answer

    def _json(self, method: str, path: str, body: bytes, timeout: float) -> dict[str, Any]:
        """The JSON object a 200 answer carries; ClientError saying what came instead."""
        data, content_type = self._call(method, path, body, timeout)
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

    def _call(self, method: str, path: str, body: bytes, timeout: float) -> tuple[bytes, str]:
        """The body and Content-Type of a 200 answer; ClientError for anything else."""
        host, port = self._host_port()
        headers = {
            "Accept": "application/json",
            "Content-Type": "text/plain",
            "X-Deployed-By": deployer(),
        }
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        connection = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            connection.request(method, path, body=body or None, headers=headers)
            response = connection.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise ClientError(
                f"cannot reach the manager at {self.url}: {exc}; is wunderproxy running "
                "there, and is that its API address?"
            ) from exc
        finally:
            connection.close()
        if response.status != 200:
            raise ClientError(_error_message(response.status, data), response.status)
        return data, response.getheader("Content-Type", "")

    def _host_port(self) -> tuple[str, int]:
        try:
            return api_address(self.url)
        except ValueError as error:
            raise ClientError(f"--api {self.url!r}: {error}") from error


def api_address(url: str) -> tuple[str, int]:
    """The host and port of a manager's URL (``http://HOST:PORT`` or ``HOST:PORT``);
    ValueError when it is not one."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    try:
        port = parts.port or 80
    except ValueError as error:  # a port that is not a number, or out of range
        raise ValueError(f"expected http://HOST:PORT ({error})") from None
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError("expected http://HOST:PORT")
    host = "127.0.0.1" if parts.hostname in ("0.0.0.0", "::") else parts.hostname
    return host, port


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


def deployer() -> str:
    """``user@host`` of whoever runs the client, recorded in history.json."""
    try:
        return f"{getpass.getuser()}@{socket.gethostname()}"
    except (OSError, KeyError):
        return socket.gethostname()
