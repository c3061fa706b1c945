"""The states of one request/response cycle on a proxied connection, as tables.

:class:`~wunderproxy.framing.Exchange` keeps one state per direction and one for the
upstream connection, and moves each only along these tables (as h11's ``_state.py``
does for a connection's two roles), so that what may follow what is read here, not
worked out from combinations of flags.

The client's side: a request head is read (``IDLE`` to ``BODY``), its body ends
(``DONE``), and once its answer has ended too the cycle closes: back to ``IDLE``, or
``CLOSED`` when the connection carries no further request. ``ERROR``: the client broke
HTTP/1.1; nothing more is read. ``SWITCHED``: the container accepted an upgrade and
both directions are opaque from then on.

The answer's side: the request goes upstream (``WAITING``) or is answered by the proxy
(``ANSWERED``); the container's answer ends (``ANSWERED``) or switches protocols.

The upstream connection: ``UNUSED`` until a request goes up on it (``BUSY``). An answer
that keeps it alive makes it ``KEPT``, then ``REUSABLE`` once the cycle closes (the
request's body may still be going up after an early answer). ``SPENT`` when it cannot
carry another request: the answer closed it, the container closed it or spoke out of
turn, or a request body was cut off midway. A request sent on a new connection makes
it ``BUSY`` whatever it was.
"""

from __future__ import annotations

from typing import Final

# The client's side.
IDLE: Final = "IDLE"
BODY: Final = "BODY"
DONE: Final = "DONE"
CLOSED: Final = "CLOSED"
ERROR: Final = "ERROR"
SWITCHED: Final = "SWITCHED"
# The answer's side (IDLE and SWITCHED too).
WAITING: Final = "WAITING"
ANSWERED: Final = "ANSWERED"
# The upstream connection.
UNUSED: Final = "UNUSED"
BUSY: Final = "BUSY"
KEPT: Final = "KEPT"
REUSABLE: Final = "REUSABLE"
SPENT: Final = "SPENT"

Table = dict[tuple[str, str], str]

CLIENT: Final[Table] = {
    (IDLE, "head"): BODY,
    (BODY, "end"): DONE,
    (DONE, "next"): IDLE,
    (DONE, "last"): CLOSED,
    (DONE, "switch"): SWITCHED,
    (IDLE, "error"): ERROR,
    (BODY, "error"): ERROR,
    (DONE, "error"): ERROR,
}

ANSWER: Final[Table] = {
    (IDLE, "forward"): WAITING,
    # Sent again on a new connection: the container closed a kept-alive one under it.
    (WAITING, "resend"): WAITING,
    (IDLE, "local"): ANSWERED,
    # The container failed (or timed out) before any byte of its answer: the proxy answers.
    (WAITING, "local"): ANSWERED,
    (WAITING, "end"): ANSWERED,
    (WAITING, "switch"): SWITCHED,
    (ANSWERED, "next"): IDLE,
}

UPSTREAM: Final[Table] = {
    (UNUSED, "forward"): BUSY,
    (REUSABLE, "forward"): BUSY,
    (BUSY, "keep"): KEPT,
    (BUSY, "spend"): SPENT,
    (KEPT, "next"): REUSABLE,
    **{(state, "spend"): SPENT for state in (UNUSED, KEPT, REUSABLE, SPENT)},
    **{(state, "fresh"): BUSY for state in (UNUSED, BUSY, KEPT, REUSABLE, SPENT)},
}


class StateError(Exception):
    """The exchange was driven out of order (a bug in the caller, not in the bytes).

    An Exception, not a RuntimeError: mypyc cannot compile a class derived from most
    built-in exception types, and nothing catches RuntimeError for this one.
    """


def advance(table: Table, state: str, event: str) -> str:
    """The state after ``event`` in ``state``, by ``table``."""
    try:
        return table[state, event]
    except KeyError:
        raise StateError(f"{event!r} cannot happen in state {state}") from None
