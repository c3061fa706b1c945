"""The fleet's deploy lock: ``PREFIX/deploy.lock`` in the store, held while a deploy runs.

The lock is a small JSON document naming its holder (``user@host`` and pid), when it was
taken and when it expires. It lives in the store every host and every deploy machine
already share, so no other service is needed.

- Taking a free lock is one atomic :meth:`~wunderproxy.store.Store.create` (S3's
  ``If-None-Match: *``, a hard link on a file system): of two deploys starting at once,
  one gets it and the other is refused, naming the winner.
- A lock whose expiry has passed is taken over without ``--force``: its deploy has had its
  time (default 15 min) and is taken to be dead.
- ``--force`` also breaks a lock that has not expired. That is what it is for: a deploy
  killed with ``kill -9`` or lost with its machine leaves a lock that would otherwise block
  the fleet until it expires, and the operator knows what the lock cannot. When the holder
  ran on this very host and its pid has gone, the refusal says so.
- Breaking (expired or forced) removes the lock only if it still holds the bytes that were
  judged stale (:meth:`~wunderproxy.store.Store.delete`), then creates a new one: of two
  deploys breaking the same stale lock, one wins.
- After writing, the lock is read back and compared: on a store that ignores conditional
  writes, a deploy that was overwritten finds out before doing anything.
- While the deploy runs, the lock is renewed every TTL/3 (:meth:`DeployLock.renewed`): its
  expiry moves to TTL from now, written only if the lock still holds this deploy's bytes
  (:meth:`~wunderproxy.store.Store.replace`). So a deploy that runs longer than the TTL
  is not taken over while it lives, and one that dies stops renewing: its lock expires
  TTL after its last renewal.
- :meth:`DeployLock.check` tells a deploy, before it switches anything, whether the lock
  is still its own.
- Release removes the lock only if it is still this deploy's, and says so if it was not.

Times are the deploy machine's clock in UTC: machines that deploy should keep it right.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from wunderproxy.errors import WunderproxyError
from wunderproxy.timestamps import rfc3339

if TYPE_CHECKING:
    from wunderproxy.store import Store

LOCK_KEY = "deploy.lock"
DEFAULT_LOCK_TTL = 900.0  # seconds: longer than any sane deploy, short enough to outwait
# A lock that changes between reading it and writing ours this often means deploys keep
# starting at the same moment: give up and say so rather than loop.
TAKE_ATTEMPTS = 3
# Renewals in a TTL: the lock outlasts one failed renewal (the store briefly down) with a
# third of its TTL to spare.
RENEWALS_PER_TTL = 3


class LockError(Exception):
    """The lock could not be taken (or released); the message says who holds it and what
    to do."""


@dataclass(frozen=True)
class LockRecord:
    """What ``deploy.lock`` holds. ``token`` tells two records of one owner and pid apart."""

    owner: str
    pid: int
    taken_at: datetime
    expires_at: datetime
    token: str

    def encode(self) -> bytes:
        """The bytes stored in ``deploy.lock``."""
        document = {
            "owner": self.owner,
            "pid": self.pid,
            "taken_at": rfc3339(self.taken_at),
            "expires_at": rfc3339(self.expires_at),
            "token": self.token,
        }
        return (json.dumps(document, indent=2) + "\n").encode()

    @classmethod
    def decode(cls, raw: bytes) -> LockRecord:
        """Parse ``deploy.lock``; ValueError when it is not a lock this version wrote."""
        try:
            document: Any = json.loads(raw)
            return cls(
                owner=str(document["owner"]),
                pid=int(document["pid"]),
                taken_at=_parse_time(document["taken_at"]),
                expires_at=_parse_time(document["expires_at"]),
                token=str(document["token"]),
            )
        except (ValueError, KeyError, TypeError, RecursionError) as error:
            raise ValueError(f"not a deploy lock: {error}") from error

    def describe(self) -> str:
        """``alice@deploy-1 (pid 4242) since 2026-11-24T12:00:00Z``."""
        return f"{self.owner} (pid {self.pid}) since {rfc3339(self.taken_at)}"


@dataclass(frozen=True)
class Taken:
    """The lock as taken, and what became of the one it replaced (None: it was free)."""

    record: LockRecord
    broken: str | None


def _parse_time(text: object) -> datetime:
    moment = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    if moment.tzinfo is None:
        raise ValueError(f"time {text!r} has no time zone")
    return moment


def _duration(seconds: float) -> str:
    """``45 s``, ``14 min``, ``3 h``: how long, as a person says it."""
    seconds = abs(seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.0f} h"


class DeployLock:
    """Takes and releases ``deploy.lock`` in ``store`` for ``owner`` (``user@host``)."""

    def __init__(
        self,
        store: Store,
        owner: str,
        ttl: float = DEFAULT_LOCK_TTL,
        *,
        pid: int | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if ttl <= 0:
            raise ValueError(f"lock TTL must be a positive number of seconds, not {ttl}")
        self._store = store
        self._owner = owner
        self._ttl = ttl
        self._pid = os.getpid() if pid is None else pid
        self._clock = clock
        self._held: LockRecord | None = None
        self._lost: str | None = None  # why the lock held is no longer ours, once found
        # Serialises the renewal thread with acquire, check and release.
        self._mutex = threading.Lock()

    @property
    def where(self) -> str:
        """``deploy.lock in s3://bucket/prefix``, for messages."""
        return f"{LOCK_KEY} in {self._store.description}"

    def acquire(self, force: bool = False) -> Taken:
        """Take the lock; LockError naming the holder when it is held and not expired
        (unless ``force``)."""
        broken: str | None = None
        for _ in range(TAKE_ATTEMPTS):
            now = self._clock()
            mine = LockRecord(
                self._owner,
                self._pid,
                now,
                now + timedelta(seconds=self._ttl),
                secrets.token_hex(8),
            )
            raw = self._store.get(LOCK_KEY)
            if raw is not None:
                note = self._breakable(raw, now, force)
                if not self._store.delete(LOCK_KEY, raw):
                    continue  # it changed since it was read: look again
                broken = note
            if self._store.create(LOCK_KEY, mine.encode()):
                self._check_written(mine)
                with self._mutex:
                    self._held = mine
                return Taken(mine, broken)
        raise LockError(
            f"{self.where} changed {TAKE_ATTEMPTS} times while this deploy tried to take it: "
            "other deploys are starting right now; run again in a moment"
        )

    def release(self) -> None:
        """Remove the lock if it is still this deploy's; LockError if it was not (someone
        broke or took it meanwhile) or it could not be removed."""
        with self._mutex:
            held, self._held = self._held, None
            if held is None or self._store.delete(LOCK_KEY, held.encode()):
                return
        raise LockError(
            f"{self.where} was no longer this deploy's when it ended (broken with --force "
            f"or taken over after it expired at {rfc3339(held.expires_at)}): another deploy "
            "may have run at the same time; check `wunderproxy status` on every host"
        )

    def check(self) -> None:
        """LockError saying who holds the lock now when it is no longer this deploy's,
        or when the store cannot tell; from then on this deploy holds nothing."""
        with self._mutex:
            held = self._held
            if held is None:
                raise LockError(self._lost or f"this deploy does not hold {self.where}")
            try:
                raw = self._store.get(LOCK_KEY)
            except WunderproxyError as error:
                raise LockError(
                    f"cannot read {self.where} to check that it is still this deploy's: {error}"
                ) from error
            if raw != held.encode():
                raise LockError(self._lose(held, raw))

    def renew(self) -> None:
        """Move the lock's expiry to TTL from now, if it is still this deploy's; LockError
        saying who holds it now if it is not (from then on this deploy holds nothing)."""
        with self._mutex:
            held = self._held
            if held is None:
                return
            renewed = dataclasses.replace(
                held, expires_at=self._clock() + timedelta(seconds=self._ttl)
            )
            replaced = self._store.replace(LOCK_KEY, held.encode(), renewed.encode())
            # Read back on a refusal: a renewal that went through but whose answer was lost
            # is refused when retried, and is still this deploy's.
            raw = None if replaced else self._store.get(LOCK_KEY)
            if not (replaced or raw == renewed.encode()):
                raise LockError(self._lose(held, raw))
            self._held = renewed

    def _lose(self, held: LockRecord, raw: bytes | None) -> str:
        """Hold nothing from now on, and say why: ``raw`` (what the lock holds now) is not
        the deploy's ``held``. Called with the mutex held."""
        if raw is None:
            now = "someone removed it"
        else:
            try:
                now = f"it is held by {LockRecord.decode(raw).describe()}"
            except ValueError:
                now = "it holds something that is not a lock"
        self._held = None
        self._lost = (
            f"{self.where} is no longer this deploy's: {now} (broken with --force, or taken "
            f"over after this deploy's expired at {rfc3339(held.expires_at)}); another "
            "deploy may be running"
        )
        return self._lost

    @contextlib.contextmanager
    def renewed(self, warn: Callable[[str], None]) -> Iterator[None]:
        """Renew the lock every TTL/3 while the block runs, from a thread of its own;
        what goes wrong is told to ``warn``."""
        stop = threading.Event()
        # A daemon, and not joined: a renewal blocked on a store that does not answer must
        # not hold up the end of the deploy. Once the block ends, a renewal still under way
        # is either done before the release (the mutex) or finds nothing to renew.
        threading.Thread(
            target=self._keep_renewing, args=(stop, warn), name="deploy lock", daemon=True
        ).start()
        try:
            yield
        finally:
            stop.set()

    def _keep_renewing(self, stop: threading.Event, warn: Callable[[str], None]) -> None:
        interval = self._ttl / RENEWALS_PER_TTL
        while not stop.wait(interval):
            try:
                self.renew()
            except LockError as error:
                warn(f"warning: {error}")
                return
            except WunderproxyError as error:
                warn(
                    f"warning: could not renew {self.where}: {error}; trying again in "
                    f"{_duration(interval)}"
                )

    def _breakable(self, raw: bytes, now: datetime, force: bool) -> str:
        """What breaking the lock in ``raw`` means, for the operator; LockError when it
        may not be broken."""
        try:
            held = LockRecord.decode(raw)
        except ValueError as error:
            if force:
                return f"broke {self.where}, which was unreadable ({error}) (--force)"
            raise LockError(
                f"{self.where} exists but is not a lock this version can read ({error}); "
                "if no deploy is running, break it with --force"
            ) from error
        left = (held.expires_at - now).total_seconds()
        if left <= 0:
            return (
                f"took over {self.where} held by {held.describe()}: it expired "
                f"{_duration(left)} ago (an expired lock needs no --force)"
            )
        if force:
            return (
                f"broke {self.where} held by {held.describe()}, which would have expired "
                f"in {_duration(left)} (--force)"
            )
        raise LockError(
            f"{self.where} is held by {held.describe()}; it expires at "
            f"{rfc3339(held.expires_at)} (in {_duration(left)}). Another deploy is running: "
            "wait until it ends, or, if it no longer runs (killed, its machine lost), break "
            f"the lock with --force{_gone_note(held)}"
        )

    def _check_written(self, mine: LockRecord) -> None:
        """Read the lock back: a store that ignored the conditional write may have let
        another deploy overwrite it."""
        raw = self._store.get(LOCK_KEY)
        if raw == mine.encode():
            return
        try:
            holder = LockRecord.decode(raw or b"").describe()
        except ValueError:
            holder = "someone else"
        raise LockError(
            f"{self.where} was taken by {holder} at the same moment as this deploy (the "
            "store did not refuse the second write); run again once that deploy has ended"
        )


def _gone_note(held: LockRecord) -> str:
    """A hint when the holder ran on this host and its process is gone."""
    host = held.owner.rpartition("@")[2]
    if host != socket.gethostname() or held.pid <= 0:
        return ""
    try:
        os.kill(held.pid, 0)
    except ProcessLookupError:
        return f" (pid {held.pid} no longer runs on this host: that deploy is gone)"
    except PermissionError:
        pass  # it runs, as another user
    return ""
