"""A bounded load generator that records every request: when it started and ended, and
what came back (or how it failed).

Workers run in threads with the standard library's HTTP client, each a kind of traffic a
busy site sends: keep-alive GETs, a new connection per GET, two-second requests, and POSTs
with a body. The run stops when asked, after ``max_seconds``, or after ``max_requests``,
whichever comes first.
"""

from __future__ import annotations

import http.client
import re
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

POST_BODY = b"x" * 16 * 1024
REVISION = re.compile(r"revision=(\S+)")  # in every answer of the test app's CGI scripts


@dataclass(frozen=True)
class Outcome:
    """One request: its kind, when it started and ended, and its answer or error."""

    kind: str
    started: float
    finished: float
    status: int | None
    body: str
    error: str | None

    @property
    def failed(self) -> bool:
        return self.error is not None or self.status != 200


@dataclass(frozen=True)
class Worker:
    """One kind of traffic: the path, the method, and whether it keeps its connection."""

    kind: str
    method: str
    path: str
    keep_alive: bool
    body: bytes = b""


DEFAULT_MIX = (
    Worker("keep-alive", "GET", "/cgi-bin/whoami", keep_alive=True),
    Worker("keep-alive", "GET", "/cgi-bin/whoami", keep_alive=True),
    Worker("new-connection", "GET", "/cgi-bin/whoami", keep_alive=False),
    Worker("new-connection", "GET", "/cgi-bin/whoami", keep_alive=False),
    Worker("slow", "GET", "/cgi-bin/slow?2", keep_alive=True),
    Worker("slow", "GET", "/cgi-bin/slow?2", keep_alive=False),
    Worker("post", "POST", "/cgi-bin/echo", keep_alive=True, body=POST_BODY),
)

ONE_OF_EACH_CONNECTION = (
    Worker("keep-alive", "GET", "/cgi-bin/whoami", keep_alive=True),
    Worker("new-connection", "GET", "/cgi-bin/whoami", keep_alive=False),
)
"""Light load: one client keeping its connection, one opening a new one per request."""


def revision_of(outcome: Outcome) -> str:
    """The revision that answered ``outcome`` (the test app names it in every answer)."""
    match = REVISION.search(outcome.body)
    assert match, f"no revision in {outcome}"
    return match.group(1)


def assert_no_failures(outcomes: list[Outcome], where: str = "") -> None:
    """Fail naming the first few failed requests, if any failed."""
    failed = [o for o in outcomes if o.failed]
    assert not failed, (
        f"{where}{': ' if where else ''}{len(failed)} of {len(outcomes)} requests failed, "
        f"e.g. {failed[:5]}"
    )


class LoadGenerator:
    """Sends ``mix`` to 127.0.0.1:``port`` until stopped; thread-safe results.

    With ``tls``, over HTTPS with that client context (a new connection is a new handshake).
    """

    def __init__(
        self,
        port: int,
        mix: tuple[Worker, ...] = DEFAULT_MIX,
        max_seconds: float = 120.0,
        max_requests: int = 100_000,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._port = port
        self._tls = tls
        self._mix = mix
        self._deadline = time.monotonic() + max_seconds
        self._max_requests = max_requests
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.outcomes: list[Outcome] = []

    def __enter__(self) -> LoadGenerator:
        for worker in self._mix:
            thread = threading.Thread(target=self._run, args=(worker,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> list[Outcome]:
        """Stop the workers (their requests in flight finish) and return every outcome."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        return self.outcomes

    def count(self, predicate: Callable[[Outcome], bool] = lambda _: True) -> int:
        with self._lock:
            return sum(1 for outcome in self.outcomes if predicate(outcome))

    def _running(self) -> bool:
        with self._lock:
            done = len(self.outcomes)
        return (
            not self._stop.is_set()
            and time.monotonic() < self._deadline
            and done < self._max_requests
        )

    def _run(self, worker: Worker) -> None:
        connection: http.client.HTTPConnection | None = None
        while self._running():
            if connection is None or not worker.keep_alive:
                connection = self._connection()
            started = time.monotonic()
            status, body, error = None, "", None
            try:
                connection.request(worker.method, worker.path, body=worker.body or None)
                response = connection.getresponse()
                status, body = response.status, response.read().decode(errors="replace")
            except (OSError, http.client.HTTPException) as exc:
                error = f"{type(exc).__name__}: {exc}"
                connection.close()
                connection = None
            else:
                if not worker.keep_alive:
                    connection.close()
            outcome = Outcome(worker.kind, started, time.monotonic(), status, body.strip(), error)
            with self._lock:
                self.outcomes.append(outcome)
        if connection is not None:
            connection.close()

    def _connection(self) -> http.client.HTTPConnection:
        if self._tls is not None:
            return http.client.HTTPSConnection(
                "127.0.0.1", self._port, timeout=30, context=self._tls
            )
        return http.client.HTTPConnection("127.0.0.1", self._port, timeout=30)
