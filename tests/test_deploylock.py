"""The deploy lock, on the embedded store and on a real S3 server (moto's, over HTTP)."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.support.fakes import MemoryStore
from tests.support.waiting import wait_until
from wunderproxy.deploylock import LOCK_KEY, DeployLock, LockError, LockRecord
from wunderproxy.store import FileStore, S3Store, Store

T0 = datetime(2026, 11, 24, 12, 0, 0, tzinfo=UTC)


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "file":
        return FileStore(tmp_path, "apps/myapp")
    bucket: str = request.getfixturevalue("s3_bucket")
    return S3Store(bucket, "apps/myapp")


def at(moment: datetime) -> Callable[[], datetime]:
    return lambda: moment


def lock(
    store: Store, owner: str, now: datetime = T0, ttl: float = 900, pid: int = 4242
) -> DeployLock:
    return DeployLock(store, owner, ttl, pid=pid, clock=at(now))


def test_a_free_lock_is_taken_and_released(store: Store) -> None:
    alice = lock(store, "alice@deploy-1")

    taken = alice.acquire()

    assert taken.broken is None
    document = json.loads(store.get(LOCK_KEY) or b"")
    assert document["owner"] == "alice@deploy-1"
    assert document["pid"] == 4242
    assert document["taken_at"] == "2026-11-24T12:00:00Z"
    assert document["expires_at"] == "2026-11-24T12:15:00Z"
    alice.release()
    assert store.get(LOCK_KEY) is None


def test_a_second_deploy_while_the_lock_is_held_is_refused_naming_the_holder(
    store: Store,
) -> None:
    lock(store, "alice@deploy-1").acquire()
    held = store.get(LOCK_KEY)

    with pytest.raises(LockError) as refused:
        lock(store, "bob@laptop", T0 + timedelta(minutes=5), pid=7).acquire()

    message = str(refused.value)
    assert f"deploy.lock in {store.description} is held by alice@deploy-1 (pid 4242)" in message
    assert "since 2026-11-24T12:00:00Z" in message
    assert "expires at 2026-11-24T12:15:00Z (in 10 min)" in message
    assert "--force" in message
    assert store.get(LOCK_KEY) == held


def test_an_expired_lock_is_taken_over_without_force_and_the_message_says_so(
    store: Store,
) -> None:
    lock(store, "alice@deploy-1", ttl=60).acquire()

    taken = lock(store, "bob@laptop", T0 + timedelta(minutes=3)).acquire()

    assert taken.broken is not None
    assert "held by alice@deploy-1 (pid 4242)" in taken.broken
    assert "expired 2 min ago (an expired lock needs no --force)" in taken.broken
    assert LockRecord.decode(store.get(LOCK_KEY) or b"").owner == "bob@laptop"


def test_force_breaks_a_lock_that_has_not_expired_and_its_holder_learns_it_at_the_end(
    store: Store,
) -> None:
    alice = lock(store, "alice@deploy-1")
    alice.acquire()

    taken = lock(store, "bob@laptop", T0 + timedelta(minutes=1)).acquire(force=True)

    assert taken.broken is not None
    assert "broke deploy.lock" in taken.broken
    assert "would have expired in 14 min (--force)" in taken.broken
    with pytest.raises(LockError, match="was no longer this deploy's when it ended"):
        alice.release()
    assert LockRecord.decode(store.get(LOCK_KEY) or b"").owner == "bob@laptop", (
        "releasing must never remove someone else's lock"
    )


def test_an_unreadable_lock_is_refused_unless_forced(store: Store) -> None:
    store.put(LOCK_KEY, b"")

    with pytest.raises(LockError, match=r"not a lock this version can read .*--force"):
        lock(store, "bob@laptop").acquire()
    taken = lock(store, "bob@laptop").acquire(force=True)

    assert taken.broken is not None and "unreadable" in taken.broken


def test_of_deploys_racing_for_one_expired_lock_exactly_one_takes_it(store: Store) -> None:
    lock(store, "alice@deploy-1", ttl=60).acquire()
    racers = 6
    barrier = threading.Barrier(racers)

    def take(n: int) -> str:
        contender = lock(store, f"racer-{n}@ci", T0 + timedelta(hours=1), pid=n)
        barrier.wait()
        try:
            contender.acquire()
        except LockError as error:
            return str(error)
        return "taken"

    with ThreadPoolExecutor(racers) as pool:
        outcomes = list(pool.map(take, range(racers)))

    assert outcomes.count("taken") == 1
    winner = LockRecord.decode(store.get(LOCK_KEY) or b"").owner
    assert winner == f"racer-{outcomes.index('taken')}@ci"
    for outcome in outcomes:
        assert outcome == "taken" or "held by racer-" in outcome or "changed 3 times" in outcome


class Clock:
    """A clock a test moves by hand."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def test_renewing_moves_the_expiry_so_that_a_live_deploy_is_not_taken_over(
    store: Store,
) -> None:
    clock = Clock()
    alice = DeployLock(store, "alice@deploy-1", 60, pid=4242, clock=clock)
    alice.acquire()
    clock.now = T0 + timedelta(seconds=50)

    alice.renew()

    record = LockRecord.decode(store.get(LOCK_KEY) or b"")
    assert (record.taken_at, record.expires_at) == (T0, T0 + timedelta(seconds=110))
    with pytest.raises(LockError, match=r"held by alice@deploy-1 .* expires at .*12:01:50Z"):
        lock(store, "bob@laptop", T0 + timedelta(seconds=70)).acquire()
    alice.check()
    alice.release()
    assert store.get(LOCK_KEY) is None


def test_a_lock_taken_by_another_deploy_is_neither_renewed_nor_released_and_check_names_it(
    store: Store,
) -> None:
    alice = lock(store, "alice@deploy-1", ttl=60)
    alice.acquire()
    lock(store, "bob@laptop", T0 + timedelta(minutes=2), pid=7).acquire()
    bobs = store.get(LOCK_KEY)

    with pytest.raises(LockError) as lost:
        alice.renew()

    assert str(lost.value) == (
        f"deploy.lock in {store.description} is no longer this deploy's: it is held by "
        "bob@laptop (pid 7) since 2026-11-24T12:02:00Z (broken with --force, or taken over "
        "after this deploy's expired at 2026-11-24T12:01:00Z); another deploy may be running"
    )
    with pytest.raises(LockError, match="it is held by bob@laptop"):
        alice.check()
    alice.release()  # nothing to release, and nothing to warn about again
    assert store.get(LOCK_KEY) == bobs


def test_check_names_who_took_the_lock_and_says_when_it_was_removed(store: Store) -> None:
    alice = lock(store, "alice@deploy-1")
    alice.acquire()
    alice.check()
    store.delete(LOCK_KEY, store.get(LOCK_KEY) or b"")

    with pytest.raises(LockError, match="is no longer this deploy's: someone removed it"):
        alice.check()


def test_the_lock_is_renewed_every_third_of_its_ttl_while_the_block_runs(store: Store) -> None:
    alice = DeployLock(store, "alice@deploy-1", 0.6)
    alice.acquire()
    warnings: list[str] = []
    expiries: set[datetime] = set()

    def renewed_twice() -> bool:
        expiries.add(LockRecord.decode(store.get(LOCK_KEY) or b"").expires_at)
        return len(expiries) >= 3

    with alice.renewed(warnings.append):
        wait_until(renewed_twice, "the lock renewed twice", within=10)
    alice.release()

    assert warnings == []
    assert store.get(LOCK_KEY) is None


def test_a_renewal_that_finds_the_lock_taken_warns_once_and_stops(store: Store) -> None:
    alice = DeployLock(store, "alice@deploy-1", 0.6)
    alice.acquire()
    lock(store, "bob@laptop", datetime.now(UTC), pid=7).acquire(force=True)
    warnings: list[str] = []

    with alice.renewed(warnings.append):
        wait_until(lambda: bool(warnings), "a warning", within=10)
        time.sleep(0.5)  # more than two renewal intervals: none may warn again

    assert len(warnings) == 1
    assert warnings[0].startswith(f"warning: deploy.lock in {store.description} is no longer")
    assert LockRecord.decode(store.get(LOCK_KEY) or b"").owner == "bob@laptop"


class IgnoresConditions(MemoryStore):
    """An S3-compatible server without conditional writes: ``create`` always writes, and
    another deploy's write lands right after the first one."""

    def __init__(self, other: bytes) -> None:
        super().__init__()
        self.other = other

    def create(self, key: str, data: bytes) -> bool:
        self.put(key, data)
        self.put(key, self.other)
        return True


def test_a_lock_overwritten_right_after_it_was_written_is_found_by_reading_it_back() -> None:
    other = LockRecord("carol@ci", 9, T0, T0 + timedelta(minutes=15), "c0ffee").encode()
    store = IgnoresConditions(other)

    with pytest.raises(LockError, match=r"taken by carol@ci \(pid 9\) .* at the same moment"):
        lock(store, "bob@laptop").acquire()
    assert store.get(LOCK_KEY) == other, "the other deploy's lock is left alone"


def test_the_refusal_says_when_the_holder_ran_here_and_its_process_is_gone() -> None:
    store = MemoryStore()
    gone = subprocess.Popen(["true"])
    gone.wait()
    lock(store, f"alice@{socket.gethostname()}", pid=gone.pid).acquire()

    with pytest.raises(LockError, match=f"pid {gone.pid} no longer runs on this host"):
        lock(store, "bob@laptop").acquire()


def test_a_lock_ttl_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive number of seconds"):
        DeployLock(MemoryStore(), "bob@laptop", 0)
