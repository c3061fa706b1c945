"""A deploy of one launch config to every host of a fleet, from one command, in two phases.

1. ``POST /launch`` on every host at once; each host's progress is told as it changes.
2. Only once every host is healthy, ``POST /switch`` on every host.

So a launch that fails anywhere switches nothing anywhere: the fleet keeps serving the old
revision, and the new containers are removed (``POST /abort``, which also cancels the
launches still waiting, so that a failure is reported at once). A switch that fails on one
host after others switched would leave the fleet on mixed revisions: the hosts that switched
are switched back to the hash each served before (its container is still draining there, or
is launched again if it was already stopped), and the command says which host failed and
which were switched back. Ctrl-C does the same: before the switch it aborts the launches,
during it it switches back.

Where an abort fails too (the host does not answer), the message names the host and the
command that cleans up once it answers: :func:`abort_fleet` (``wunderproxy abort HASH``).

The whole deploy runs under the fleet's deploy lock (:mod:`wunderproxy.deploylock`),
renewed while it runs and released on success, failure and Ctrl-C. Before any switch the
deploy checks that the lock is still its own: if another deploy broke or took it, that
deploy may be switching the same hosts, so this one aborts its launches and stops.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any, NoReturn

from wunderproxy.client import ClientError
from wunderproxy.deploylock import DeployLock, LockError
from wunderproxy.errors import WunderproxyError
from wunderproxy.hosts import FanOut, FleetError, Host, Outcome, read_statuses
from wunderproxy.launchconfig import parse_hash
from wunderproxy.timestamps import rfc3339

Progress = Callable[[str], None]
"""Where progress lines go (the CLI: standard error)."""

WAITING_NOTE_INTERVAL = 15.0  # seconds between "still waiting for ..." lines of a launch
EXIT_INTERRUPTED = 130  # the shell's code for a command ended by Ctrl-C (128 + SIGINT)


class DeployFailed(FleetError):
    """The deploy did not complete; the message says where what went wrong and what state
    the fleet was left in. ``exit_code`` is 130 after Ctrl-C, else 1."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def locked(lock: DeployLock, force: bool, progress: Progress, work: Callable[[], str]) -> str:
    """Run ``work`` holding the deploy lock, renewed while it runs; release it however
    ``work`` ends."""
    taken = lock.acquire(force)
    if taken.broken is not None:
        progress(taken.broken)
    progress(
        f"took {lock.where}, until {rfc3339(taken.record.expires_at)} (renewed while this "
        "deploy runs)"
    )
    try:
        with lock.renewed(progress):
            return work()
    finally:
        try:
            lock.release()
        except (LockError, WunderproxyError) as error:
            progress(f"warning: could not release the deploy lock: {error}")


def rollback_target(history: list[dict[str, str]], where: str) -> dict[str, str]:
    """The newest entry of ``history`` (oldest first) whose hash differs from the newest
    entry's; FleetError when there is none."""
    if not history:
        raise FleetError(f"history.json under {where} records no deploy: nothing to roll back to")
    newest = history[-1].get("Hash")
    for entry in reversed(history[:-1]):
        if entry.get("Hash") != newest:
            return entry
    raise FleetError(
        f"history.json under {where} records no deploy of another hash than the newest "
        f"({newest}): nothing to roll back to; deploy the hash you want with "
        "`wunderproxy deploy HASH`"
    )


@dataclass(frozen=True)
class Served:
    """What a host served when the deploy began: the hash to switch back to."""

    config_hash: str | None
    revision: str | None


class FleetDeploy:
    """Deploys a hash to ``hosts``, telling ``progress`` how each host fares."""

    def __init__(
        self,
        hosts: Sequence[Host],
        progress: Progress,
        waiting_note_interval: float = WAITING_NOTE_INTERVAL,
        lock: DeployLock | None = None,
    ) -> None:
        """``lock``: the deploy lock this deploy holds, checked before anything is
        switched."""
        if not hosts:
            raise FleetError("no hosts to deploy to: give --host API_URL (or WUNDERPROXY_HOSTS)")
        self._hosts = list(hosts)
        self._progress = progress
        self._note_interval = waiting_note_interval
        self._lock = lock
        self._before: dict[Host, Served] = {}

    def run(self, raw_hash: str) -> str:
        """Launch everywhere, then switch everywhere; the result line, or DeployFailed."""
        config_hash = _parsed(raw_hash)
        self._read_what_hosts_serve()
        launched = self._launch_everywhere(config_hash)
        self._check_lock(config_hash)
        self._switch_everywhere(config_hash)
        revisions = sorted({str(answer.get("revision")) for answer in launched.values()})
        names = ", ".join(host.name for host in self._hosts)
        return (
            f"deployed revision {', '.join(revisions)} ({config_hash}) to "
            f"{_hosts(len(self._hosts))}: {names}"
        )

    # -- before: what each host serves ------------------------------------------------

    def _read_what_hosts_serve(self) -> None:
        outcomes = read_statuses(self._hosts)
        unreachable = [o for o in outcomes if o.error is not None]
        if unreachable:
            raise DeployFailed(
                "cannot read /status of "
                + "; ".join(f"{o.host.name}: {o.error}" for o in unreachable)
                + ". Nothing was launched: bring the host back, or leave it out of --host"
            )
        self._hosts = []
        for outcome in outcomes:
            status = outcome.value or {}
            host = outcome.host.named(status)
            current = status.get("current") or {}
            self._before[host] = Served(current.get("hash"), current.get("revision"))
            self._hosts.append(host)

    # -- phase 1: launch ----------------------------------------------------------------

    def _launch_everywhere(self, config_hash: str) -> dict[Host, dict[str, Any]]:
        for host in self._hosts:
            self._progress(f"{host.name}: launching {config_hash}, waiting until it is healthy")
        launches = FanOut(self._hosts, lambda host: host.client.launch(config_hash))
        healthy: dict[Host, dict[str, Any]] = {}
        failed: list[Outcome[dict[str, Any]]] = []
        began = time.monotonic()
        try:
            # Until the first failure: from then on the deploy cannot succeed, and the
            # launches still waiting are cancelled rather than waited for.
            while launches.pending and not failed:
                outcome = launches.next(self._note_interval)
                if outcome is None:
                    waiting = ", ".join(host.name for host in launches.pending)
                    self._progress(
                        f"still waiting for {waiting} ({time.monotonic() - began:.0f} s)"
                    )
                elif outcome.error is not None:
                    failed.append(outcome)
                    self._progress(f"{outcome.host.name}: failed: {outcome.error}")
                else:
                    answer = outcome.value or {}
                    healthy[outcome.host] = answer
                    self._progress(f"{outcome.host.name}: healthy: {_container_facts(answer)}")
        except KeyboardInterrupt:
            self._progress("interrupted: aborting the launches; nothing was switched")
            _, left = self._abort_launches(config_hash, launches)
            _stopped_before_switching(
                "interrupted before any switch", config_hash, left, EXIT_INTERRUPTED
            )
        if failed:
            self._fail_launch(config_hash, launches, failed)
        return healthy

    def _fail_launch(
        self,
        config_hash: str,
        launches: FanOut[dict[str, Any]],
        failed: list[Outcome[dict[str, Any]]],
    ) -> NoReturn:
        """Abort ``config_hash`` everywhere, the launches still waiting included, and say
        where it failed and why."""
        if launches.pending:
            waiting = ", ".join(host.name for host in launches.pending)
            self._progress(f"cancelling the launches still waiting on {waiting}")
        rest, left = self._abort_launches(config_hash, launches)
        cancelled = []
        for outcome in rest:
            if outcome.error is None:
                continue  # healthy just after its abort passed, and aborted again
            if outcome.error.status == 409:
                cancelled.append(outcome.host.name)
            else:
                failed.append(outcome)
                self._progress(f"{outcome.host.name}: failed: {outcome.error}")
        failed.sort(key=lambda o: self._hosts.index(o.host))
        lines = [f"  {o.host.name}: {o.error}" for o in failed]
        if cancelled:
            lines.append(f"  (cancelled while waiting: {', '.join(cancelled)})")
        removed = (
            ", but the new containers could not all be removed"
            if left
            else " and the new containers were removed"
        )
        raise DeployFailed(
            f"launch of {config_hash} failed on {len(failed)} of {_hosts(len(self._hosts))}; "
            f"nothing was switched anywhere{removed}:\n"
            + "\n".join(lines + _left_behind(config_hash, left))
        )

    def _abort_launches(
        self, config_hash: str, launches: FanOut[dict[str, Any]]
    ) -> tuple[list[Outcome[dict[str, Any]]], dict[Host, ClientError]]:
        """Abort ``config_hash`` on every host and wait for the launches still under way
        (the abort cancels them, so they answer at once); a launch that ended healthy just
        after its abort passed is aborted again. The outcomes of those launches, and the
        hosts where the new container may still be, with the abort's error."""
        # Also on the failed hosts: harmless (404), and it removes a container whose
        # launch failed only on the way back to us (a timeout, a dropped connection).
        aborted = abort_everywhere(config_hash, self._hosts, self._progress)
        # A launch whose abort failed is not waited for: its host may not answer for
        # minutes, and it is named as one that may keep the new container anyway.
        rest = launches.all(not_waiting_for=_failed(aborted))
        late_healthy = [outcome.host for outcome in rest if outcome.error is None]
        if late_healthy:
            aborted.update(abort_everywhere(config_hash, late_healthy, self._progress))
        return rest, _failed(aborted)

    # -- between the phases: is the lock still ours? ---------------------------------------

    def _check_lock(self, config_hash: str) -> None:
        """Switch nothing unless the deploy lock is still this deploy's: another deploy
        that took it may be switching the same hosts. If it is not, abort everywhere."""
        if self._lock is None:
            return
        try:
            self._lock.check()
        except LockError as error:
            self._progress("stopping before any switch: aborting the launches")
            aborted = abort_everywhere(config_hash, self._hosts, self._progress)
            _stopped_before_switching(
                f"stopped before any switch: {error}", config_hash, _failed(aborted)
            )

    # -- phase 2: switch ----------------------------------------------------------------

    def _switch_everywhere(self, config_hash: str) -> None:
        switched: list[Host] = []
        failed: list[Outcome[dict[str, Any]]] = []
        # Every switch's outcome must be known to switch back the right hosts, and switches
        # take milliseconds: a Ctrl-C now is acted on once they have answered.
        with _ctrl_c_deferred(self._progress) as interrupted:
            switches = FanOut(self._hosts, lambda host: host.client.switch(config_hash))
            for outcome in switches.all():
                if outcome.error is not None:
                    failed.append(outcome)
                    self._progress(f"{outcome.host.name}: switch failed: {outcome.error}")
                else:
                    switched.append(outcome.host)
                    self._progress(f"{outcome.host.name}: {(outcome.value or {}).get('message')}")
        if failed or interrupted.is_set():
            self._recover(config_hash, switched, failed, interrupted.is_set())

    def _recover(
        self,
        config_hash: str,
        switched: list[Host],
        failed: list[Outcome[dict[str, Any]]],
        interrupted: bool,
    ) -> None:
        """Bring every host back to what it served before; DeployFailed saying how it went."""
        failed.sort(key=lambda o: self._hosts.index(o.host))
        lines = [f"  {o.host.name}: {o.error}" for o in failed]
        if interrupted:
            lines.append("  interrupted (Ctrl-C) while switching")
        # A switch that failed on the way back to us may have happened: /abort finds out
        # (409: it serves the new hash), and otherwise removes the launched container.
        # Any other error of the abort leaves the host's state unknown.
        aborted = abort_everywhere(config_hash, [o.host for o in failed], self._progress)
        unknown: dict[Host, ClientError] = {}
        for host, error in _failed(aborted).items():
            if error.status == 409:
                switched.append(host)
            else:
                unknown[host] = error
        back, stuck = self._switch_back(config_hash, switched)
        if back:
            lines.append("switched back to what they served before: " + ", ".join(back))
        if stuck:
            lines.append("could NOT be switched back, still serving the new hash:")
            lines += [f"  {line}" for line in stuck]
        if unknown:
            lines.append(
                "serving UNKNOWN: their switch may have happened, and the abort that would "
                "tell failed too:"
            )
            lines += [f"  {host.name}: {error}" for host, error in unknown.items()]
        if stuck or unknown:
            lines.append(
                f"the fleet {'serves' if stuck else 'may serve'} mixed revisions: see what "
                f"each host serves with `wunderproxy status {_host_options(self._hosts)}`, "
                "then deploy again the hash you want"
                + (
                    f"; `wunderproxy abort {config_hash} {_host_options(unknown)}` removes "
                    "the new container where it does not serve"
                    if unknown
                    else ""
                )
            )
        else:
            lines.append("the fleet serves what it served before")
        what = "interrupted" if interrupted and not failed else "failed"
        raise DeployFailed(
            f"switch to {config_hash} {what}:\n" + "\n".join(lines),
            EXIT_INTERRUPTED if interrupted else 1,
        )

    def _switch_back(self, config_hash: str, hosts: list[Host]) -> tuple[list[str], list[str]]:
        """Switch ``hosts`` back to the hash each served before: the names switched back,
        and a line for each that could not be."""
        back: list[str] = []
        stuck: list[str] = []
        movable: list[Host] = []
        for host in hosts:
            before = self._before[host].config_hash
            if before is None:
                stuck.append(
                    f"{host.name}: it served nothing before, so there is nothing to go back to"
                )
            elif before != config_hash:
                movable.append(host)
        outcomes = {o.host: o for o in FanOut(movable, self._switch_host_back).all()}
        for outcome in (outcomes[host] for host in self._hosts if host in outcomes):
            if outcome.error is None:
                back.append(outcome.host.name)
                self._progress(
                    f"{outcome.host.name}: switched back to {self._before[outcome.host].revision}"
                )
            else:
                stuck.append(f"{outcome.host.name}: {outcome.error}")
                self._progress(f"{outcome.host.name}: switch back failed: {outcome.error}")
        return back, stuck

    def _switch_host_back(self, host: Host) -> dict[str, Any]:
        """Switch to the hash served before: at once while its container drains, else
        (404: already stopped) after launching it again."""
        before = self._before[host].config_hash
        assert before is not None
        try:
            return host.client.switch(before)
        except ClientError as error:
            if error.status != 404:
                raise
        self._progress(f"{host.name}: its previous container is gone: launching {before} again")
        host.client.launch(before)
        return host.client.switch(before)


def abort_everywhere(
    config_hash: str, hosts: Sequence[Host], progress: Progress
) -> dict[Host, ClientError | None]:
    """``POST /abort`` of ``config_hash`` on every host at once, a progress line for each
    as it answers; by host, in the order given, the error where it failed, else None.
    404 (nothing of it there) counts as done: nothing of it runs there."""
    results: dict[Host, ClientError | None] = {}
    for outcome in FanOut(hosts, lambda host: host.client.abort(config_hash)).all():
        error = outcome.error
        if error is not None and error.status == 404:
            progress(f"{outcome.host.name}: nothing of {config_hash} to remove")
            error = None
        elif error is not None:
            progress(f"{outcome.host.name}: abort failed: {error}")
        else:
            progress(f"{outcome.host.name}: {(outcome.value or {}).get('message')}")
        results[outcome.host] = error
    return {host: results[host] for host in hosts}


def _failed(aborted: dict[Host, ClientError | None]) -> dict[Host, ClientError]:
    """The hosts where an abort failed, with its error."""
    return {host: error for host, error in aborted.items() if error is not None}


def abort_fleet(raw_hash: str, hosts: Sequence[Host], report: Progress) -> None:
    """``POST /abort`` of a hash on every host, a line for each (``report``); FleetError
    naming the hosts where it failed and what to do there."""
    config_hash = _parsed(raw_hash)
    failed = _failed(abort_everywhere(config_hash, hosts, report))
    if not failed:
        return
    lines = [f"abort of {config_hash} failed on {len(failed)} of {_hosts(len(hosts))}:"]
    for host, error in failed.items():
        lines.append(f"  {host.name}: {error}")
        if error.status == 409:
            lines.append(
                f"    it serves there: switch {host.client.url} to another hash first, "
                "which drains and removes its container"
            )
    if any(error.status is None for error in failed.values()):
        lines.append("run the abort again once the hosts that did not answer do")
    raise FleetError("\n".join(lines))


def _parsed(raw_hash: str) -> str:
    """The config hash in ``raw_hash``; FleetError saying what is wrong with it."""
    try:
        return parse_hash(raw_hash)
    except WunderproxyError as error:
        raise FleetError(str(error)) from error


def _stopped_before_switching(
    why: str, config_hash: str, left: dict[Host, ClientError], exit_code: int = 1
) -> NoReturn:
    """DeployFailed for a deploy that ``why`` stopped after its launches were aborted,
    naming the hosts in ``left`` where the abort failed."""
    if not left:
        raise DeployFailed(
            f"{why}; {config_hash} was aborted on every host, which all serve what they "
            "served before",
            exit_code,
        ) from None
    raise DeployFailed(
        f"{why}; every host serves what it served before, but {config_hash} could not be "
        "aborted everywhere:\n" + "\n".join(_left_behind(config_hash, left)),
        exit_code,
    ) from None


def _left_behind(config_hash: str, left: dict[Host, ClientError]) -> list[str]:
    """Lines naming each host where the new container may still be (its abort failed),
    and the command that removes it; none when every abort went through."""
    if not left:
        return []
    return [
        "the new container may still be on these hosts, whose abort failed:",
        *(f"  {host.name}: {error}" for host, error in left.items()),
        f"remove it with `wunderproxy abort {config_hash} {_host_options(left)}` once they answer",
    ]


def _host_options(hosts: Iterable[Host]) -> str:
    """``--host URL`` for each host, as a command names them."""
    return " ".join(f"--host {host.client.url}" for host in hosts)


@contextlib.contextmanager
def _ctrl_c_deferred(progress: Progress) -> Iterator[threading.Event]:
    """Within the block, a first Ctrl-C only sets the event it yields; a second one
    raises KeyboardInterrupt as usual. Only the main thread can handle signals: elsewhere
    (a test's thread), Ctrl-C is left as it is."""
    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield interrupted
        return

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        if interrupted.is_set():
            raise KeyboardInterrupt
        interrupted.set()
        progress("interrupted: waiting for the switches under way, then switching back")

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)


def _hosts(count: int) -> str:
    """``1 host``, ``3 hosts``."""
    return f"{count} host{'s' if count != 1 else ''}"


def _container_facts(answer: dict[str, Any]) -> str:
    container = str(answer.get("container_id") or "?")[:8]
    return f"container {container}, revision {answer.get('revision')}, port {answer.get('port')}"
