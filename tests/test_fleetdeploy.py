"""The fleet deploy's two phases and every way they fail, against fake hosts at the
HostClient seam (tests/support/fleethosts.py); the real thing is test_fleetdeploy_e2e.py."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.support.fakes import MemoryStore
from tests.support.fleethosts import NEW, OLD, OLDER, CallLog, FakeHost
from wunderproxy.client import ClientError
from wunderproxy.deploylock import LOCK_KEY, DeployLock, LockError
from wunderproxy.fleetdeploy import (
    EXIT_INTERRUPTED,
    DeployFailed,
    FleetDeploy,
    abort_fleet,
    locked,
    rollback_target,
)
from wunderproxy.hosts import FleetError, Host


class Lines:
    """Progress lines, as the CLI writes them to stderr; ``when`` runs a hook on a line."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.hooks: list[tuple[str, Callable[[], None]]] = []

    def __call__(self, line: str) -> None:
        self.lines.append(line)
        for text, hook in self.hooks:
            if text in line:
                hook()

    def when(self, text: str, hook: Callable[[], None]) -> None:
        self.hooks.append((text, hook))

    def having(self, text: str) -> list[str]:
        return [line for line in self.lines if text in line]


@pytest.fixture
def log() -> CallLog:
    return CallLog()


@pytest.fixture
def fleet(log: CallLog) -> list[FakeHost]:
    return [FakeHost(log, f"web-{n}") for n in (1, 2, 3)]


@pytest.fixture
def progress() -> Lines:
    return Lines()


def deployer(fleet: list[FakeHost], progress: Lines, lock: DeployLock | None = None) -> FleetDeploy:
    return FleetDeploy(
        [Host(host) for host in fleet], progress, waiting_note_interval=0.05, lock=lock
    )


HOSTS_OPTIONS = (
    "--host http://web-1.test:8001 --host http://web-2.test:8001 --host http://web-3.test:8001"
)


def serving(fleet: list[FakeHost]) -> list[str | None]:
    return [host.serving for host in fleet]


def failed_deploy(fleet: list[FakeHost], progress: Lines) -> DeployFailed:
    with pytest.raises(DeployFailed) as failed:
        deployer(fleet, progress).run(NEW)
    return failed.value


# -- success -------------------------------------------------------------------------------


def test_every_host_launches_before_any_host_switches_and_all_end_on_the_new_hash(
    fleet: list[FakeHost], log: CallLog, progress: Lines
) -> None:
    result = deployer(fleet, progress).run(f" {NEW.upper()}\n")

    assert result == (
        f"deployed revision rev-b ({NEW}) to 3 hosts: web-1 (http://web-1.test:8001), "
        "web-2 (http://web-2.test:8001), web-3 (http://web-3.test:8001)"
    )
    assert serving(fleet) == [NEW, NEW, NEW]
    methods = [method for _, method, _ in log.calls]
    assert methods.index("switch") > max(i for i, m in enumerate(methods) if m == "launch")
    assert log.of("abort") == []


def test_each_host_has_a_line_when_it_waits_and_when_it_is_healthy(
    fleet: list[FakeHost], progress: Lines
) -> None:
    deployer(fleet, progress).run(NEW)

    for host in fleet:
        name = f"{host.instance} ({host.url})"
        assert f"{name}: launching {NEW}, waiting until it is healthy" in progress.lines
        assert (
            f"{name}: healthy: container {host.container_id[:8]}, revision rev-b, port 32768"
            in progress.lines
        )
        assert f"{name}: switched proxy to port 32768 of container {host.container_id[:8]}" in (
            progress.lines
        )


def test_a_slow_launch_is_reported_as_still_waiting_naming_the_host(
    fleet: list[FakeHost], progress: Lines
) -> None:
    slow = fleet[1]
    slow.hold_launch()
    progress.when("still waiting for", slow.release)

    deployer(fleet, progress).run(NEW)

    [note, *_] = progress.having("still waiting for")
    assert note.startswith(f"still waiting for web-2 ({slow.url}) (")
    assert serving(fleet) == [NEW, NEW, NEW]


# -- phase 1 fails ---------------------------------------------------------------------------


def test_a_launch_failing_on_one_host_switches_nothing_and_aborts_the_new_containers(
    fleet: list[FakeHost], log: CallLog, progress: Lines
) -> None:
    fleet[1].fail[("launch", None)] = ClientError("504: not healthy after 60 s", 504)

    failed = failed_deploy(fleet, progress)

    assert failed.exit_code == 1
    assert str(failed).startswith(
        f"launch of {NEW} failed on 1 of 3 hosts; nothing was switched anywhere and the new "
        "containers were removed:\n"
    )
    assert "  web-2 (http://web-2.test:8001): 504: not healthy after 60 s" in str(failed)
    assert log.of("switch") == []
    assert serving(fleet) == [OLD, OLD, OLD]
    assert set(log.of("abort")) == {("web-1", NEW), ("web-2", NEW), ("web-3", NEW)}
    assert all(not host.launched for host in fleet), "a launched container was left behind"
    assert progress.having("web-2 (http://web-2.test:8001): failed: 504: not healthy")


def test_a_launch_failing_cancels_the_launches_still_waiting_instead_of_waiting_for_them(
    fleet: list[FakeHost], log: CallLog, progress: Lines
) -> None:
    fleet[2].hold_launch()  # would wait 10 s unless cancelled
    fleet[1].fail[("launch", None)] = ClientError("502: image not in the registry", 502)
    started = time.monotonic()

    failed = failed_deploy(fleet, progress)

    assert time.monotonic() - started < 5, "the deploy waited for a launch it could cancel"
    assert "failed on 1 of 3 hosts" in str(failed)
    assert str(failed).endswith("  (cancelled while waiting: web-3 (http://web-3.test:8001))")
    assert progress.having("cancelling the launches still waiting on web-3")
    assert log.of("switch") == []
    assert all(not host.launched for host in fleet)
    assert serving(fleet) == [OLD, OLD, OLD]


class LaunchesAfterItsAbort(FakeHost):
    """A host whose launch request is overtaken by the abort: the abort finds nothing
    (404), then the launch goes ahead and ends healthy."""

    def abort(self, config_hash: str) -> dict[str, Any]:
        if self._gate is not None and not self._gate.is_set():
            self._log.add(self.instance, "abort", config_hash)
            self.release()
            raise ClientError(f"404: nothing of {config_hash} is launched here", 404)
        return super().abort(config_hash)


def test_a_launch_that_ends_healthy_after_its_abort_passed_is_aborted_again(
    log: CallLog, progress: Lines
) -> None:
    fleet = [FakeHost(log, "web-1"), FakeHost(log, "web-2"), LaunchesAfterItsAbort(log, "web-3")]
    fleet[2].hold_launch()
    fleet[1].fail[("launch", None)] = ClientError("502: image not in the registry", 502)

    failed_deploy(fleet, progress)

    assert [h for h, _ in log.of("abort")].count("web-3") == 2
    assert not fleet[2].launched, "its container was left behind"


def test_a_failed_launch_names_each_host_whose_abort_failed_and_how_to_remove_the_container(
    fleet: list[FakeHost], progress: Lines
) -> None:
    fleet[1].fail[("launch", None)] = ClientError("504: not healthy after 60 s", 504)
    fleet[2].fail[("abort", None)] = ClientError("cannot reach the manager at web-3: timed out")

    message = str(failed_deploy(fleet, progress))

    assert "the new containers were removed" not in message
    assert message.startswith(
        f"launch of {NEW} failed on 1 of 3 hosts; nothing was switched anywhere, but the new "
        "containers could not all be removed:\n"
        "  web-2 (http://web-2.test:8001): 504: not healthy after 60 s\n"
    )
    assert message.endswith(
        "the new container may still be on these hosts, whose abort failed:\n"
        "  web-3 (http://web-3.test:8001): cannot reach the manager at web-3: timed out\n"
        f"remove it with `wunderproxy abort {NEW} --host http://web-3.test:8001` once they "
        "answer"
    )
    assert fleet[2].launched == {NEW}, "the fake keeps what the message says may be there"
    assert serving(fleet) == [OLD, OLD, OLD]


def test_a_launch_whose_abort_failed_is_not_waited_for(
    fleet: list[FakeHost], progress: Lines
) -> None:
    fleet[2].hold_launch()  # answers only when released: a host that does not answer
    fleet[2].fail[("abort", None)] = ClientError("cannot reach the manager at web-3: timed out")
    fleet[1].fail[("launch", None)] = ClientError("502: image not in the registry", 502)
    started = time.monotonic()
    try:
        message = str(failed_deploy(fleet, progress))
    finally:
        fleet[2].release()

    assert time.monotonic() - started < 5, "the deploy waited for a host it cannot abort"
    assert "  web-3 (http://web-3.test:8001): cannot reach the manager at web-3" in message


def test_a_host_whose_status_cannot_be_read_stops_the_deploy_before_any_launch(
    fleet: list[FakeHost], log: CallLog, progress: Lines
) -> None:
    fleet[2].fail[("status", None)] = ClientError("cannot reach the manager at web-3")

    failed = failed_deploy(fleet, progress)

    assert "cannot read /status of http://web-3.test:8001: cannot reach" in str(failed)
    assert "Nothing was launched" in str(failed)
    assert log.of("launch") == []


def test_ctrl_c_while_launching_aborts_everywhere_and_switches_nothing(
    fleet: list[FakeHost], log: CallLog, progress: Lines
) -> None:
    fleet[2].hold_launch()

    def press_ctrl_c() -> None:
        fleet[2].release()  # its launch answers later; the abort must still remove it
        raise KeyboardInterrupt

    progress.when("web-1 (http://web-1.test:8001): healthy", press_ctrl_c)

    failed = failed_deploy(fleet, progress)

    assert failed.exit_code == EXIT_INTERRUPTED
    assert "interrupted before any switch" in str(failed)
    assert log.of("switch") == []
    assert {host for host, _ in log.of("abort")} == {"web-1", "web-2", "web-3"}
    assert serving(fleet) == [OLD, OLD, OLD]


def test_ctrl_c_while_launching_aborts_again_a_launch_that_ended_healthy_after_its_abort(
    log: CallLog, progress: Lines
) -> None:
    late = LaunchesAfterItsAbort(log, "web-3")
    fleet = [FakeHost(log, "web-1"), FakeHost(log, "web-2"), late]
    late.hold_launch()
    done = threading.Event()
    launch = late.launch

    def launch_then_say_so(config_hash: str) -> dict[str, Any]:
        try:
            return launch(config_hash)
        finally:
            done.set()

    late.launch = launch_then_say_so  # type: ignore[method-assign]

    def press_ctrl_c() -> None:
        raise KeyboardInterrupt

    progress.when("web-1 (http://web-1.test:8001): healthy", press_ctrl_c)

    failed = failed_deploy(fleet, progress)

    assert done.wait(10), "web-3's launch never ended"
    assert failed.exit_code == EXIT_INTERRUPTED
    assert [h for h, _ in log.of("abort")].count("web-3") == 2
    assert not late.launched, "its container was left behind"
    assert str(failed).endswith("which all serve what they served before")


def test_ctrl_c_while_launching_names_each_host_whose_abort_failed(
    fleet: list[FakeHost], progress: Lines
) -> None:
    fleet[2].fail[("abort", None)] = ClientError("cannot reach the manager at web-3: timed out")

    def press_ctrl_c() -> None:
        raise KeyboardInterrupt

    progress.when("web-3 (http://web-3.test:8001): healthy", press_ctrl_c)

    failed = failed_deploy(fleet, progress)

    assert failed.exit_code == EXIT_INTERRUPTED
    assert str(failed) == (
        "interrupted before any switch; every host serves what it served before, but "
        f"{NEW} could not be aborted everywhere:\n"
        "the new container may still be on these hosts, whose abort failed:\n"
        "  web-3 (http://web-3.test:8001): cannot reach the manager at web-3: timed out\n"
        f"remove it with `wunderproxy abort {NEW} --host http://web-3.test:8001` once they "
        "answer"
    )
    assert fleet[2].launched == {NEW}


# -- phase 2 fails ---------------------------------------------------------------------------


def test_a_switch_failing_on_one_host_switches_the_others_back_to_what_they_served(
    fleet: list[FakeHost], log: CallLog, progress: Lines
) -> None:
    fleet[1].fail[("switch", NEW)] = ClientError("502: S3 put failed", 502)

    failed = failed_deploy(fleet, progress)

    message = str(failed)
    assert failed.exit_code == 1
    assert message.startswith(f"switch to {NEW} failed:\n")
    assert "  web-2 (http://web-2.test:8001): 502: S3 put failed" in message
    assert (
        "switched back to what they served before: web-1 (http://web-1.test:8001), "
        "web-3 (http://web-3.test:8001)"
    ) in message
    assert message.endswith("the fleet serves what it served before")
    assert serving(fleet) == [OLD, OLD, OLD]
    assert log.of("abort") == [("web-2", NEW)], "the failed host's launched container goes"
    assert not fleet[1].launched


def test_a_switch_back_to_a_container_already_stopped_launches_it_again(
    fleet: list[FakeHost], log: CallLog, progress: Lines
) -> None:
    fleet[2].fail[("switch", NEW)] = ClientError("502: S3 put failed", 502)
    # Its old container drained at once (nothing in flight) and is gone.
    fleet[0].on_switch = lambda: fleet[0].draining.clear()

    failed_deploy(fleet, progress)

    assert ("web-1", OLD) in log.of("launch")
    assert serving(fleet) == [OLD, OLD, OLD]
    assert progress.having("web-1 (http://web-1.test:8001): its previous container is gone")


def test_a_switch_back_that_fails_is_named_and_the_fleet_is_said_to_be_mixed(
    fleet: list[FakeHost], progress: Lines
) -> None:
    fleet[1].fail[("switch", NEW)] = ClientError("502: S3 put failed", 502)
    fleet[0].fail[("switch", OLD)] = ClientError("cannot reach the manager at web-1")

    failed = failed_deploy(fleet, progress)

    message = str(failed)
    assert "could NOT be switched back, still serving the new hash:" in message
    assert "  web-1 (http://web-1.test:8001): cannot reach the manager at web-1" in message
    assert "switched back to what they served before: web-3 (http://web-3.test:8001)" in message
    assert message.endswith(
        "the fleet serves mixed revisions: see what each host serves with `wunderproxy "
        f"status {HOSTS_OPTIONS}`, then deploy again the hash you want"
    )
    assert serving(fleet) == [NEW, OLD, OLD]


def test_a_host_that_served_nothing_before_cannot_be_switched_back_and_says_so(
    log: CallLog, progress: Lines
) -> None:
    fleet = [FakeHost(log, "web-1", serving=None), FakeHost(log, "web-2")]
    fleet[1].fail[("switch", NEW)] = ClientError("502: S3 put failed", 502)

    failed = failed_deploy(fleet, progress)

    assert "web-1 (http://web-1.test:8001): it served nothing before" in str(failed)
    assert serving(fleet) == [NEW, OLD]


def test_a_switch_whose_answer_was_lost_but_happened_is_switched_back_too(
    fleet: list[FakeHost], progress: Lines
) -> None:
    fleet[1].fail[("switch", NEW)] = ClientError("cannot reach the manager: timed out")
    fleet[1].switched_despite_error = True
    fleet[2].fail[("switch", NEW)] = ClientError("502: S3 put failed", 502)

    failed_deploy(fleet, progress)

    assert serving(fleet) == [OLD, OLD, OLD]


def test_a_switch_whose_answer_was_lost_and_whose_abort_failed_is_named_as_unknown(
    fleet: list[FakeHost], progress: Lines
) -> None:
    fleet[1].fail[("switch", NEW)] = ClientError("cannot reach the manager: timed out")
    fleet[1].switched_despite_error = True
    fleet[1].fail[("abort", NEW)] = ClientError("cannot reach the manager at web-2: refused")

    failed = failed_deploy(fleet, progress)

    message = str(failed)
    assert failed.exit_code == 1
    assert "the fleet serves what it served before" not in message
    assert (
        "serving UNKNOWN: their switch may have happened, and the abort that would tell "
        "failed too:\n"
        "  web-2 (http://web-2.test:8001): cannot reach the manager at web-2: refused\n"
    ) in message
    assert message.endswith(
        "the fleet may serve mixed revisions: see what each host serves with `wunderproxy "
        f"status {HOSTS_OPTIONS}`, then deploy again the hash you want; `wunderproxy abort "
        f"{NEW} --host http://web-2.test:8001` removes the new container where it does not "
        "serve"
    )
    assert serving(fleet) == [OLD, NEW, OLD], "web-2 did switch: the message must not hide it"


def test_ctrl_c_while_switching_lets_the_switches_answer_then_switches_back(
    fleet: list[FakeHost], log: CallLog, progress: Lines
) -> None:
    assert threading.current_thread() is threading.main_thread()
    pressed = threading.Event()

    def press_ctrl_c_once() -> None:
        if not pressed.is_set():
            pressed.set()
            signal.raise_signal(signal.SIGINT)

    fleet[1].on_switch = press_ctrl_c_once

    failed = failed_deploy(fleet, progress)

    assert failed.exit_code == EXIT_INTERRUPTED
    assert str(failed).startswith(f"switch to {NEW} interrupted:\n")
    assert progress.having("interrupted: waiting for the switches under way, then switching back")
    assert len(log.of("switch")) == 6, "three switches, then three switches back"
    assert serving(fleet) == [OLD, OLD, OLD]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_malformed_hash_is_refused_before_any_host_is_asked(
    fleet: list[FakeHost], log: CallLog, progress: Lines
) -> None:
    with pytest.raises(FleetError, match="is not a config hash"):
        deployer(fleet, progress).run("v2")
    assert log.calls == []


def test_a_deploy_needs_hosts(progress: Lines) -> None:
    with pytest.raises(FleetError, match="--host"):
        FleetDeploy([], progress)


# -- the lock --------------------------------------------------------------------------------


def test_the_lock_is_held_while_the_deploy_runs_and_released_after(
    fleet: list[FakeHost], progress: Lines
) -> None:
    store = MemoryStore()
    seen: list[bytes | None] = []
    progress.when("healthy", lambda: seen.append(store.get(LOCK_KEY)))

    locked(DeployLock(store, "ops@ci"), False, progress, lambda: deployer(fleet, progress).run(NEW))

    assert all(raw is not None and b'"owner": "ops@ci"' in raw for raw in seen)
    assert store.get(LOCK_KEY) is None
    assert progress.lines[0].startswith(f"took deploy.lock in {store.description}, until ")


@pytest.mark.parametrize(
    "ending", [DeployFailed("launch failed"), KeyboardInterrupt()], ids=["failure", "ctrl-c"]
)
def test_the_lock_is_released_when_the_deploy_fails_or_is_interrupted(
    progress: Lines, ending: BaseException
) -> None:
    store = MemoryStore()

    def work() -> str:
        assert store.get(LOCK_KEY) is not None
        raise ending

    with pytest.raises(type(ending)):
        locked(DeployLock(store, "ops@ci"), False, progress, work)
    assert store.get(LOCK_KEY) is None


def test_a_held_lock_stops_a_second_deploy_before_it_asks_any_host(
    fleet: list[FakeHost], log: CallLog, progress: Lines
) -> None:
    store = MemoryStore()
    DeployLock(store, "alice@deploy-1").acquire()

    with pytest.raises(LockError, match="held by alice@deploy-1"):
        locked(DeployLock(store, "bob@laptop"), False, progress, lambda: "not run")
    assert log.calls == []


def test_a_forced_deploy_says_which_lock_it_broke(fleet: list[FakeHost], progress: Lines) -> None:
    store = MemoryStore()
    DeployLock(store, "alice@deploy-1").acquire()

    locked(
        DeployLock(store, "bob@laptop"), True, progress, lambda: deployer(fleet, progress).run(NEW)
    )

    assert progress.lines[0].startswith("broke deploy.lock in ")
    assert "held by alice@deploy-1" in progress.lines[0]
    assert serving(fleet) == [NEW, NEW, NEW]


def test_a_deploy_whose_lock_was_taken_while_it_launched_switches_nothing_and_aborts(
    fleet: list[FakeHost], log: CallLog, progress: Lines
) -> None:
    store = MemoryStore()
    lock = DeployLock(store, "ops@ci")
    # Another deploy breaks the lock while this one waits for its launches.
    progress.when(
        "web-2 (http://web-2.test:8001): healthy",
        lambda: DeployLock(store, "bob@laptop", pid=7).acquire(force=True),
    )

    with pytest.raises(DeployFailed) as failed:
        locked(lock, False, progress, lambda: deployer(fleet, progress, lock).run(NEW))

    message = str(failed.value)
    assert failed.value.exit_code == 1
    assert message.startswith(
        f"stopped before any switch: deploy.lock in {store.description} is no longer this "
        "deploy's: it is held by bob@laptop (pid 7) since "
    )
    assert message.endswith(
        f"; {NEW} was aborted on every host, which all serve what they served before"
    )
    assert log.of("switch") == []
    assert set(log.of("abort")) == {("web-1", NEW), ("web-2", NEW), ("web-3", NEW)}
    assert serving(fleet) == [OLD, OLD, OLD]
    assert all(not host.launched for host in fleet)
    assert b'"owner": "bob@laptop"' in (store.get(LOCK_KEY) or b""), "bob's lock stays"
    assert not progress.having("could not release"), "the loss was said once, not again"


def test_a_deploy_that_outlives_its_lock_ttl_keeps_the_lock_by_renewing_it(
    fleet: list[FakeHost], progress: Lines
) -> None:
    store = MemoryStore()
    ttl = 3.0  # renewed every second: two renewals may come late by a second each
    lock = DeployLock(store, "ops@ci", ttl)
    slow = fleet[2]
    slow.hold_launch()
    others: list[str] = []

    def another_deploy_after_the_first_expiry() -> None:
        slow.launch_started.wait(10)
        time.sleep(ttl + 1)
        try:
            DeployLock(store, "bob@laptop").acquire()
            others.append("taken")
        except LockError as error:
            others.append(str(error))
        finally:
            slow.release()

    threading.Thread(target=another_deploy_after_the_first_expiry, daemon=True).start()
    result = locked(lock, False, progress, lambda: deployer(fleet, progress, lock).run(NEW))

    assert result.startswith(f"deployed revision rev-b ({NEW}) to 3 hosts")
    [refusal] = others
    assert "is held by ops@ci" in refusal
    assert serving(fleet) == [NEW, NEW, NEW]
    assert store.get(LOCK_KEY) is None


def test_a_lock_that_cannot_be_released_is_a_warning_not_a_failed_deploy(
    progress: Lines,
) -> None:
    store = MemoryStore()
    lock = DeployLock(store, "ops@ci")

    def broken_meanwhile() -> str:
        store.objects[LOCK_KEY] = b"someone else's"
        return "deployed"

    assert locked(lock, False, progress, broken_meanwhile) == "deployed"
    assert progress.having("warning: could not release the deploy lock: ")
    assert store.objects[LOCK_KEY] == b"someone else's"


# -- abort -----------------------------------------------------------------------------------


def test_abort_fleet_says_what_happened_on_each_host_and_nothing_there_is_fine(
    fleet: list[FakeHost], log: CallLog, progress: Lines
) -> None:
    fleet[0].launched.add(NEW)

    abort_fleet(f" {NEW}\n", [Host(host) for host in fleet], progress)

    assert set(log.of("abort")) == {("web-1", NEW), ("web-2", NEW), ("web-3", NEW)}
    assert sorted(progress.lines) == [
        f"http://web-1.test:8001: aborted {NEW}: stopped and removed container",
        f"http://web-2.test:8001: nothing of {NEW} to remove",
        f"http://web-3.test:8001: nothing of {NEW} to remove",
    ]
    assert not fleet[0].launched


def test_abort_fleet_names_each_host_where_it_failed_and_what_to_do_there(
    fleet: list[FakeHost], progress: Lines
) -> None:
    fleet[0].serving = NEW
    fleet[2].fail[("abort", None)] = ClientError("cannot reach the manager at web-3: refused")

    with pytest.raises(FleetError) as failed:
        abort_fleet(NEW, [Host(host) for host in fleet], progress)

    assert str(failed.value) == (
        f"abort of {NEW} failed on 2 of 3 hosts:\n"
        f"  http://web-1.test:8001: 409: {NEW} serves now\n"
        "    it serves there: switch http://web-1.test:8001 to another hash first, which "
        "drains and removes its container\n"
        "  http://web-3.test:8001: cannot reach the manager at web-3: refused\n"
        "run the abort again once the hosts that did not answer do"
    )


def test_abort_fleet_refuses_a_malformed_hash_before_asking_any_host(
    fleet: list[FakeHost], log: CallLog, progress: Lines
) -> None:
    with pytest.raises(FleetError, match="is not a config hash"):
        abort_fleet("v2", [Host(host) for host in fleet], progress)
    assert log.calls == []


# -- rollback --------------------------------------------------------------------------------


def entry(config_hash: str, revision: str) -> dict[str, str]:
    return {"Hash": config_hash, "Revision": revision, "DeployedAt": "t", "DeployedBy": "u@h"}


def test_rollback_goes_to_the_newest_entry_with_another_hash_than_the_newest() -> None:
    history = [entry(OLDER, "r1"), entry(OLD, "r2"), entry(NEW, "r3"), entry(NEW, "r3")]

    assert rollback_target(history, "s3://b/p") == entry(OLD, "r2")


@pytest.mark.parametrize(
    ("history", "says"),
    [([], "records no deploy: nothing"), ([entry(NEW, "r3")] * 2, "no deploy of another hash")],
    ids=["empty", "one-hash"],
)
def test_rollback_with_nothing_to_go_back_to_says_so(
    history: list[dict[str, str]], says: str
) -> None:
    with pytest.raises(FleetError, match=says):
        rollback_target(history, "s3://b/p")
