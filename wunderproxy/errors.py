"""Errors that reach an operator, each with the HTTP status the manager answers it with.

One mapping for the whole program: code raises the subclass that says what went wrong, and
the manager turns ``error.status`` and ``str(error)`` into its JSON answer. Every message
names what was wrong and what to do about it.
"""

from __future__ import annotations


class WunderproxyError(Exception):
    """Base of every error the manager reports; ``status`` is the HTTP answer."""

    status = 500


class InternalError(WunderproxyError):
    """A fault in wunderproxy itself (500), not in the request or the host; the log has
    its traceback."""

    status = 500


class BadRequest(WunderproxyError):
    """The request itself is malformed (400): a bad hash, an empty body."""

    status = 400


class Unauthorized(WunderproxyError):
    """A token is required and was missing or wrong (401)."""

    status = 401


class Forbidden(WunderproxyError):
    """The peer may not change things (403): no token configured and not loopback."""

    status = 403


class NotFound(WunderproxyError):
    """The named thing does not exist (404): unknown hash, not launched, unknown path."""

    status = 404


class MethodNotAllowed(WunderproxyError):
    """Wrong HTTP method for a known path (405)."""

    status = 405

    def __init__(self, message: str, allowed: tuple[str, ...]) -> None:
        super().__init__(message)
        self.allowed = allowed


class Conflict(WunderproxyError):
    """The request clashes with work in progress (409), e.g. switching to a pending launch."""

    status = 409


class InvalidConfig(WunderproxyError):
    """A launch config is invalid or its bytes do not match its hash (422)."""

    status = 422


class UpstreamFailed(WunderproxyError):
    """Docker, the registry or S3 failed, or the container died while starting (502)."""

    status = 502


class DockerUnreachable(UpstreamFailed):
    """The Docker engine did not answer at all (502): not running, its socket missing, the
    connection refused or reset, or no answer in time. ``/status`` shows it until the
    engine answers again."""


class ContainerExited(UpstreamFailed):
    """The new container stopped while starting (502); the message quotes its last log
    lines."""


class HealthTimeout(WunderproxyError):
    """The new container did not answer its health check in time (504)."""

    status = 504
