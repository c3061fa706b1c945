"""The hosts of a fleet as the client commands reach them: their managers, asked all at once,
and the store they share.

Every call to a host runs in a thread of its own, so that a deploy to ten hosts takes as long
as the slowest host, not the sum; the threads are daemons, so that a host that does not
answer never keeps the command from exiting on Ctrl-C.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from wunderproxy.client import ClientError

if TYPE_CHECKING:
    from wunderproxy.store import Store

T = TypeVar("T")


class FleetError(Exception):
    """A fleet command cannot go on; the message says what was wrong and what to do."""


class HostClient(Protocol):
    """What the fleet commands ask of one host's manager (:class:`ManagerClient`)."""

    @property
    def url(self) -> str: ...

    def status(self) -> dict[str, Any]: ...
    def launch(self, config_hash: str) -> dict[str, Any]: ...
    def switch(self, config_hash: str) -> dict[str, Any]: ...
    def abort(self, config_hash: str) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Host:
    """One host: its manager, and its instance name once its ``/status`` told it."""

    client: HostClient
    instance: str | None = None

    @property
    def name(self) -> str:
        """``web-1 (http://10.0.0.1:8001)``, or the URL alone before the instance is known."""
        url = self.client.url
        return f"{self.instance} ({url})" if self.instance else url

    def named(self, status: dict[str, Any]) -> Host:
        """This host with the instance its ``/status`` names."""
        instance = status.get("instance")
        return dataclasses.replace(self, instance=instance if isinstance(instance, str) else None)


@dataclass(frozen=True)
class Outcome(Generic[T]):
    """What one host's call came to: a value, or the error that came instead."""

    host: Host
    value: T | None = None
    error: ClientError | None = None


class FanOut(Generic[T]):
    """``call(host)`` on every host at once; outcomes are handed back as they come."""

    def __init__(self, hosts: Sequence[Host], call: Callable[[Host], T]) -> None:
        self.pending: list[Host] = list(hosts)
        self._outcomes: queue.SimpleQueue[Outcome[T]] = queue.SimpleQueue()
        for host in hosts:
            threading.Thread(
                target=self._run, args=(host, call), name=f"host {host.name}", daemon=True
            ).start()

    def next(self, timeout: float | None = None) -> Outcome[T] | None:
        """The next outcome, or None when none came within ``timeout`` seconds."""
        try:
            outcome = self._outcomes.get(timeout=timeout)
        except queue.Empty:
            return None
        self.pending.remove(outcome.host)
        return outcome

    def all(self, not_waiting_for: Collection[Host] = ()) -> list[Outcome[T]]:
        """Every outcome still to come, in the order they came; once only hosts in
        ``not_waiting_for`` are pending, without waiting for theirs."""
        outcomes = []
        while any(host not in not_waiting_for for host in self.pending):
            outcome = self.next()
            if outcome is not None:
                outcomes.append(outcome)
        return outcomes

    def _run(self, host: Host, call: Callable[[Host], T]) -> None:
        try:
            self._outcomes.put(Outcome(host, value=call(host)))
        except ClientError as error:
            self._outcomes.put(Outcome(host, error=error))
        except Exception as error:  # a bug: report it for this host rather than hang
            unexpected = ClientError(f"unexpected {type(error).__name__}: {error}")
            self._outcomes.put(Outcome(host, error=unexpected))


def read_statuses(hosts: Sequence[Host]) -> list[Outcome[dict[str, Any]]]:
    """Every host's ``/status``, in the order the hosts were given."""
    by_host = {o.host: o for o in FanOut(hosts, lambda host: host.client.status()).all()}
    return [by_host[host] for host in hosts]


def find_store(store: str | None, prefix: str | None, hosts: Sequence[Host]) -> Store:
    """The store named by ``--store`` and ``--prefix``, else the one the first host's
    ``/status`` names; FleetError saying what to give when neither is there."""
    if store is not None and prefix is None:
        raise FleetError(f"--store {store} needs --prefix PREFIX too (or WUNDERPROXY_PREFIX)")
    if store is None and prefix is not None:
        raise FleetError(f"--prefix {prefix} needs --store BUCKET|file://DIR too")
    if store is None or prefix is None:
        store, prefix = _store_of_first_host(hosts)
    # Imported here: boto3 takes longer to import than the rest of the client together.
    from wunderproxy.store import open_store

    try:
        return open_store(store, prefix.strip("/"))
    except ValueError as error:
        raise FleetError(f"--store {store!r}: {error}") from error


def _store_of_first_host(hosts: Sequence[Host]) -> tuple[str, str]:
    ask = (
        "give --store BUCKET|file://DIR and --prefix PREFIX (or WUNDERPROXY_STORE and "
        "WUNDERPROXY_PREFIX)"
    )
    if not hosts:
        raise FleetError(f"no store to use: {ask}, or --host of a wunderproxy to ask")
    host = hosts[0]
    try:
        status = host.client.status()
    except ClientError as error:
        raise FleetError(f"cannot ask {host.name} for its store: {error}; {ask}") from error
    where = status.get("store")
    if not (
        isinstance(where, dict)
        and isinstance(where.get("bucket"), str)
        and isinstance(where.get("prefix"), str)
    ):
        raise FleetError(
            f"{host.name}/status names no store (a wunderproxy older than this client?); {ask}"
        )
    return where["bucket"], where["prefix"]
