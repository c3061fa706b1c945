"""The manager API over h11: ``POST /launch``, ``POST /switch`` and ``POST /abort`` change
what runs;
``GET /status`` (JSON), ``GET /`` (the status page) and ``GET /metrics`` (Prometheus) tell.

Every failure is a :class:`~wunderproxy.errors.WunderproxyError`; :func:`error_response`
is the one place that turns it into a status code and a JSON body.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import h11

from wunderproxy.controller import (
    AbortResult,
    Controller,
    LaunchResult,
    SwitchResult,
    default_deployer,
)
from wunderproxy.errors import (
    BadRequest,
    Forbidden,
    InternalError,
    MethodNotAllowed,
    NotFound,
    Unauthorized,
    WunderproxyError,
)
from wunderproxy.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from wunderproxy.metrics import Metrics
from wunderproxy.state import Container, ProxyState
from wunderproxy.streams import close_after_refusal, is_loopback

log = logging.getLogger("wunderproxy.manager")

MAX_BODY = 4096  # a hash and some whitespace; anything larger is a mistake
IDLE_TIMEOUT = 60.0  # seconds an idle API connection is kept open

_ROUTES: dict[str, tuple[str, ...]] = {
    "/": ("GET", "HEAD"),
    "/status": ("GET", "HEAD"),
    "/metrics": ("GET", "HEAD"),
    "/launch": ("POST",),
    "/switch": ("POST",),
    "/abort": ("POST",),
}


_VARY_ACCEPT = (("Vary", "Accept"),)
# One self-contained file: these hosts are often offline, so nothing is fetched from a CDN.
STATUS_PAGE = resources.files("wunderproxy").joinpath("status.html").read_bytes()


@dataclass(frozen=True)
class Reply:
    """An answer: status, content type, body, extra headers."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


def json_reply(status: int, document: Any, headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    """A JSON answer, indented so that a person reading it with curl can."""
    return Reply(status, (json.dumps(document, indent=2) + "\n").encode(), headers=headers)


def error_response(error: WunderproxyError) -> Reply:
    """The one mapping from an error to what the API answers."""
    headers: tuple[tuple[str, str], ...] = ()
    if isinstance(error, MethodNotAllowed):
        headers = (("Allow", ", ".join(error.allowed)),)
    elif isinstance(error, Unauthorized):
        headers = (("WWW-Authenticate", "Bearer"),)
    return json_reply(error.status, {"error": str(error)}, headers)


@dataclass(frozen=True)
class ApiRequest:
    """One request to the API, body included."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    peer: str | None

    @property
    def wants_json(self) -> bool:
        return "application/json" in self.headers.get("accept", "")

    @property
    def wants_html(self) -> bool:
        """A browser asking: it names text/html (curl and load balancers do not), and
        not JSON."""
        accept = self.headers.get("accept", "")
        return "text/html" in accept and "application/json" not in accept


class Manager:
    """Answers API requests; one instance serves every API connection."""

    def __init__(
        self,
        controller: Controller,
        state: ProxyState,
        token: str | None,
        gather: Callable[[bool], Awaitable[None]] | None = None,
    ) -> None:
        """``gather`` brings the figures into ``state`` before a document shows them
        (a supervisor asks its workers for theirs), with the per-minute series if its
        argument is true; without it, they are there already."""
        self._controller = controller
        self._state = state
        self._gather = gather
        self._token = token
        self._metrics = Metrics(state)

    async def handle(self, request: ApiRequest) -> Reply:
        """Route one request; never raises, not even for a bug of wunderproxy's own."""
        try:
            return await self._route(request)
        except WunderproxyError as exc:
            if exc.status >= 500:
                log.error("%s %s failed: %s", request.method, request.path, exc)
            else:
                log.info("%s %s refused (%d): %s", request.method, request.path, exc.status, exc)
            return error_response(exc)
        except Exception as exc:
            # A bug: answer it like any other error, log its traceback this once, and go on
            # serving. A failed launch has removed what it started; what serves is untouched.
            log.exception("%s %s failed unexpectedly", request.method, request.path)
            return error_response(
                InternalError(
                    f"{request.method} {request.path} failed unexpectedly inside wunderproxy "
                    f"({type(exc).__name__}: {exc}); the container serving now is unaffected; "
                    "the manager's log has the traceback: please report it"
                )
            )

    async def _route(self, request: ApiRequest) -> Reply:
        allowed = _ROUTES.get(request.path)
        if allowed is None:
            raise NotFound(
                f"no endpoint {request.path[:100]}; the API has GET / (status page), "
                "GET /status, GET /metrics, POST /launch, POST /switch and POST /abort"
            )
        if request.method not in allowed:
            raise MethodNotAllowed(
                f"{request.path} takes {' or '.join(allowed)}, not {request.method}", allowed
            )
        if request.path in ("/", "/status"):
            # /status has two forms, chosen by Accept: caches must keep them apart.
            vary = _VARY_ACCEPT if request.path == "/status" else ()
            if request.path == "/" or request.wants_html:
                return Reply(200, STATUS_PAGE, "text/html; charset=utf-8", vary)
            if self._gather is not None:
                await self._gather(True)  # with the per-minute series
            return json_reply(200, self._state.snapshot(), vary)
        if request.path == "/metrics":
            if self._gather is not None:
                await self._gather(False)  # no series: Prometheus keeps its own
            return Reply(200, self._metrics.render(), METRICS_CONTENT_TYPE)
        self._authorize(request)
        config_hash = _body_text(request.body)
        if request.path == "/launch":
            return _launch_reply(await self._controller.launch(config_hash), request.wants_json)
        if request.path == "/abort":
            return _abort_reply(await self._controller.abort(config_hash), request.wants_json)
        deployed_by = request.headers.get("x-deployed-by") or default_deployer()
        result = await self._controller.switch(config_hash, deployed_by)
        return _switch_reply(result, request.wants_json)

    def _authorize(self, request: ApiRequest) -> None:
        """SPEC "Who may change things": a bearer token, else loopback peers only."""
        if self._token is not None:
            offered = request.headers.get("authorization", "")
            expected = f"Bearer {self._token}"
            if not hmac.compare_digest(offered.encode(), expected.encode()):
                raise Unauthorized(
                    "missing or wrong API token: send 'Authorization: Bearer TOKEN' "
                    "(the wunderproxy client reads WUNDERPROXY_API_TOKEN)"
                )
            return
        if not is_loopback(request.peer):
            raise Forbidden(
                f"{request.path} changes what runs and is only accepted from this host "
                "when no --api-token is set; call it from the host or set --api-token"
            )


def _body_text(body: bytes) -> str:
    try:
        text = body.decode("ascii").strip()
    except UnicodeDecodeError as exc:
        raise BadRequest("the body must be a config hash (32 hex digits) in ASCII") from exc
    if not text:
        raise BadRequest("the body is empty; send the config hash (32 hex digits)")
    return text


def _facts(container: Container) -> dict[str, Any]:
    return {
        "container_id": container.container_id,
        "revision": container.revision,
        "hash": container.hash,
        "port": container.port,
        "image": container.image,
    }


def _launch_reply(result: LaunchResult, wants_json: bool) -> Reply:
    c = result.container
    message = (
        f"started container {c.container_id[:8]} with revision {c.revision} "
        f"listening on port {c.port}"
    )
    if not result.started:
        message = (
            f"container {c.container_id[:8]} with revision {c.revision} already runs "
            f"healthy on port {c.port}"
        )
    if wants_json:
        return json_reply(200, {"message": message, "started": result.started} | _facts(c))
    return Reply(200, (message + "\n").encode(), "text/plain; charset=utf-8")


def _abort_reply(result: AbortResult, wants_json: bool) -> Reply:
    removed = result.removed
    if removed is not None:
        message = (
            f"aborted {result.config_hash}: stopped and removed container "
            f"{removed.container_id[:8]} of revision {removed.revision}"
        )
    else:
        message = (
            f"aborted {result.config_hash}: cancelled its launch under way; nothing of it runs here"
        )
    if wants_json:
        facts = _facts(removed) if removed is not None else {"hash": result.config_hash}
        return json_reply(
            200, {"message": message, "cancelled_launch": result.cancelled_launch} | facts
        )
    return Reply(200, (message + "\n").encode(), "text/plain; charset=utf-8")


def _switch_reply(result: SwitchResult, wants_json: bool) -> Reply:
    c = result.container
    message = f"switched proxy to port {c.port} of container {c.container_id[:8]}"
    if not result.changed:
        message = f"proxy already on port {c.port} of container {c.container_id[:8]}"
    if wants_json:
        extra = {"message": message, "changed": result.changed, "warning": result.warning}
        return json_reply(200, extra | _facts(c))
    if result.warning:
        message += f" (warning: {result.warning})"
    return Reply(200, (message + "\n").encode(), "text/plain; charset=utf-8")


# -- the HTTP side: h11 over asyncio streams ------------------------------------------


Handler = Callable[[ApiRequest], Awaitable[Reply]]


async def serve_connection(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, handler: Handler
) -> None:
    """Serve API requests on one connection, keep-alive included."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
    peername = writer.get_extra_info("peername")
    peer = peername[0] if isinstance(peername, tuple) else None
    try:
        while True:
            try:
                request = await _read_request(conn, reader, peer)
            except h11.RemoteProtocolError as exc:
                reply = json_reply(exc.error_status_hint, {"error": f"bad HTTP request: {exc}"})
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    _write_reply(conn, writer, reply, head_only=False)
                await close_after_refusal(reader, writer)
                return
            except BadRequest as exc:
                _write_reply(conn, writer, error_response(exc), head_only=False)
                await close_after_refusal(reader, writer)
                return
            if request is None:
                return
            reply = await handler(request)
            _write_reply(conn, writer, reply, head_only=request.method == "HEAD")
            await writer.drain()
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()
    except OSError:  # ConnectionError, TimeoutError, ENOTCONN: the client has gone
        pass
    finally:
        writer.close()


async def _read_request(
    conn: h11.Connection, reader: asyncio.StreamReader, peer: str | None
) -> ApiRequest | None:
    head: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            async with asyncio.timeout(IDLE_TIMEOUT):
                conn.receive_data(await reader.read(65536))
            continue
        if isinstance(event, h11.Request):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                raise BadRequest(f"the body is larger than {MAX_BODY} bytes; send only the hash")
        elif isinstance(event, h11.EndOfMessage) and head is not None:
            return ApiRequest(
                method=head.method.decode("ascii", "replace"),
                path=head.target.decode("ascii", "replace").partition("?")[0],
                headers={n.decode("latin-1"): v.decode("latin-1") for n, v in head.headers},
                body=bytes(body),
                peer=peer,
            )
        else:  # ConnectionClosed
            return None


def _write_reply(
    conn: h11.Connection, writer: asyncio.StreamWriter, reply: Reply, head_only: bool
) -> None:
    headers = [
        ("Content-Type", reply.content_type),
        ("Content-Length", str(len(reply.body))),
        ("Cache-Control", "no-store"),
        *reply.headers,
    ]
    if conn.their_state is not h11.DONE:
        headers.append(("Connection", "close"))
    data = conn.send(h11.Response(status_code=reply.status, headers=headers))
    if not head_only:
        data += conn.send(h11.Data(data=reply.body))
    data += conn.send(h11.EndOfMessage())
    # A client that left while its request was handled has a closed transport: writing to
    # it raises on uvloop and logs on asyncio's loop, and nobody would read the answer.
    if not writer.is_closing():
        writer.write(data)
