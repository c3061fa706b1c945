"""Slow request heads (slowloris) against wunderproxy and nginx, beside normal traffic.

    python3 benchmarks/slowloris.py [--seconds 15] [--attackers 2000] [--header-timeout 5]
                                    [--ramp 0] [--only wunderproxy nginx] [--json out.json]

Starts an nginx backend, wunderproxy's real proxy (``benchmarks/proxy_only.py``) and nginx
as a reverse proxy in front of it, both with the same header timeout (``--header-timeout``,
nginx's ``client_header_timeout``). Backend and proxies are pinned to core 0; wrk and the
attackers (this process) to core 1. Then, for each proxy in turn:

- (A) ``wrk -c50`` on ``/small.txt`` for ``--seconds``, nothing else running;
- (B) the same wrk run while ``--attackers`` connections trickle request heads: each
  connects, sends a request line and one header line, then one byte every
  ``--interval`` seconds, never finishing the head. All open at once (a burst) unless
  ``--ramp`` spreads their first connects over that many seconds. When the proxy closes
  one, it reconnects at once, so the attack lasts the whole wrk run; after it, nobody
  reconnects and the last round is waited for (at most header timeout + 10 s).

It prints the normal clients' req/s, p50 and p99 in (A) and (B) and the ratio of the
p99s; wrk's errors; the proxy's resident memory (VmRSS from /proc) before the attack, its
peak in each half of the attack (read every 0.2 s: does it level off?) and after it; for
every trickling connection the time from its first byte to the end it saw (an answer or a
close): the maximum and the 99th percentile, and both minus the header timeout (the target:
at most 1 s); how many were answered 408 and how many were closed bare; how many were never
closed; wunderproxy's ``/status`` count of header timeouts; and how late the attackers' own
loop ran (it would delay the ends they time) and how much CPU they used. "other %" is the
CPU that processes outside this benchmark used during each wrk run, in % of one core, as
``suite.py`` reports it (above 10 %: flagged). Last, whether a proxy logged a warning or
an error (a traceback under attack would show there).
Everything it starts is stopped by PID at the end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import http.client
import json
import math
import os
import platform
import resource
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.peers import (
    HOST,
    Peer,
    free_port,
    loads_library,
    process_tree,
    raise_open_files,
    rss_kib,
    start_backend,
    start_nginx_proxy,
    start_wunderproxy,
    version_of,
    wait_until_answers,
)
from benchmarks.suite import (
    OPEN_FILES,
    OTHER_LOAD_WARNING,
    SCENARIOS,
    SERVER_CPU,
    WRK_CPU,
    Measurement,
    log_problems,
    logs_report,
    measure,
    progress,
    render,
)
from wunderproxy.runtime import run_event_loop

TARGETS = ("wunderproxy", "nginx")
# The normal clients: the suite's small GET on 50 kept-alive connections.
NORMAL = SCENARIOS["small-keepalive"]
# What a trickling connection sends at once, then one byte of a second header's name at a
# time: a head that is valid so far and never ends.
HEAD_START = f"GET /small.txt HTTP/1.1\r\nHost: {HOST}\r\nUser-Agent: slowloris\r\n".encode()
TRICKLE_BYTE = b"x"
# How long after the attack stops a connection the proxy has not closed is given up on.
GIVE_UP_AFTER_TIMEOUT = 10.0
# The targets of issue 11: p99 under attack at most twice that without; every trickling
# connection ended at most a second after the header timeout.
P99_RATIO_TARGET = 2.0
LATE_TARGET_SECONDS = 1.0
KIB_PER_MIB = 1024


# --- the attackers --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Trickle:
    """What one trickling connection saw, in ``time.monotonic()`` seconds."""

    first_byte: float  # its request line went out
    answered: float | None  # the first byte of an answer arrived
    status: int | None  # that answer's status code
    closed: float | None  # the proxy closed it (EOF or reset); None: never, we gave up

    @property
    def ended_after(self) -> float | None:
        """Seconds from its first byte to the first sign of its end (answer or close)."""
        ends = [t for t in (self.answered, self.closed) if t is not None]
        return min(ends) - self.first_byte if ends else None


class TrickleProtocol(asyncio.Protocol):
    """One trickling connection. It sends a head's beginning as it connects, and notes
    when an answer begins and when the proxy closes in the callbacks themselves, so that
    no task wake-up stands between an event and its time."""

    __slots__ = ("_on_end", "_start", "answered", "closed", "ended", "first_byte", "transport")

    def __init__(self, on_end: Callable[[TrickleProtocol], None]) -> None:
        self._on_end = on_end
        self._start = b""  # the first bytes of an answer, for its status
        self.transport: asyncio.Transport | None = None
        self.first_byte = 0.0
        self.answered: float | None = None
        self.closed: float | None = None
        self.ended = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.first_byte = time.monotonic()
        self.transport.write(HEAD_START)

    def data_received(self, data: bytes) -> None:
        if self.answered is None:
            self.answered = time.monotonic()
        if len(self._start) < 16:
            self._start += data[:16]

    def eof_received(self) -> bool:
        self.closed = time.monotonic()
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed is None and exc is not None:  # a reset is a close too
            self.closed = time.monotonic()
        self.ended = True
        self._on_end(self)

    def nudge(self) -> None:
        """One more byte of the head."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(TRICKLE_BYTE)

    def result(self) -> Trickle:
        start = self._start
        status = int(start[9:12]) if start[:7] == b"HTTP/1." and start[9:12].isdigit() else None
        return Trickle(self.first_byte, self.answered, status, self.closed)


@dataclass
class AttackRecord:
    """Everything the attackers saw (filled in by the attack's thread)."""

    trickles: list[Trickle] = dataclasses.field(default_factory=list)
    connect_errors: int = 0
    first_error: str = ""
    max_loop_lag: float = 0.0  # the attackers' own lateness: it delays what they measure
    cpu_seconds: float = 0.0


class Attack:
    """``count`` trickling connections, sustained by reconnecting, in a thread of their own
    (its own event loop, uvloop when installed), so that wrk runs meanwhile.

    As the original slowloris does, one loop sends a byte on every open connection each
    ``interval``. Bounded: whatever happens, it stops after ``time_limit`` seconds, and
    connections still open ``GIVE_UP_AFTER_TIMEOUT`` seconds past the header timeout after
    :meth:`stop` are cut and counted as never closed.
    """

    def __init__(
        self, port: int, count: int, interval: float, ramp: float, header_timeout: float
    ) -> None:
        self.port = port
        self.count = count
        self.interval = interval
        self.ramp = ramp
        self.header_timeout = header_timeout
        self.record = AttackRecord()
        self.opened = threading.Event()  # every first connection was tried
        self._open: set[TrickleProtocol] = set()
        self._connecting = 0
        self._first_tries = 0
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._thread: threading.Thread | None = None

    def start(self, time_limit: float) -> None:
        """Begin, and return once every attacker's first connection was tried."""
        self._thread = threading.Thread(target=self._run, args=(time_limit,), daemon=True)
        self._thread.start()
        if not self.opened.wait(timeout=self.ramp + 60):
            raise RuntimeError("the attackers could not open their connections within 60 s")

    def stop(self) -> AttackRecord:
        """No more reconnects; wait for the last round to end (bounded), then the record."""
        assert self._thread is not None and self._loop is not None
        self._loop.call_soon_threadsafe(self._stop)
        self._thread.join(timeout=self.header_timeout + GIVE_UP_AFTER_TIMEOUT + 30)
        return self.record

    def _run(self, time_limit: float) -> None:
        cpu_before = time.thread_time()
        try:
            run_event_loop(self._attack(time_limit))
        finally:
            self.record.cpu_seconds = time.thread_time() - cpu_before
            self.opened.set()

    async def _attack(self, time_limit: float) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        for i in range(self.count):
            loop.call_later(i * self.ramp / self.count, self._spawn_connect)
        tickers = [
            asyncio.ensure_future(self._trickle_bytes()),
            asyncio.ensure_future(self._measure_lag()),
        ]
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(time_limit):
                    await self._done.wait()
        finally:
            self._stopping = True
            for protocol in list(self._open):  # given up on: counted as never closed
                if protocol.transport is not None:
                    protocol.transport.abort()
            await asyncio.sleep(0.1)  # their connection_lost runs and records them
            for task in [*tickers, *self._tasks]:
                task.cancel()
            await asyncio.gather(*tickers, *self._tasks, return_exceptions=True)

    def _stop(self) -> None:
        self._stopping = True
        assert self._loop is not None
        self._loop.call_later(self.header_timeout + GIVE_UP_AFTER_TIMEOUT, self._give_up)
        self._check_done()

    def _give_up(self) -> None:
        assert self._done is not None
        self._done.set()

    def _check_done(self) -> None:
        if self._stopping and not self._open and not self._connecting:
            assert self._done is not None
            self._done.set()

    def _spawn_connect(self) -> None:
        if self._stopping:
            self._check_done()
            return
        self._connecting += 1
        task = asyncio.ensure_future(self._connect())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self) -> None:
        assert self._loop is not None
        try:
            _, protocol = await self._loop.create_connection(
                lambda: TrickleProtocol(self._ended), HOST, self.port
            )
        except OSError as error:
            self.record.connect_errors += 1
            self.record.first_error = self.record.first_error or repr(error)
            # Not a tight loop on a refusing port: try again a byte's time later.
            self._loop.call_later(self.interval, self._spawn_connect)
        else:
            if not protocol.ended:
                self._open.add(protocol)
        finally:
            self._connecting -= 1
            if self._first_tries < self.count:
                self._first_tries += 1
                if self._first_tries == self.count:
                    self.opened.set()
            self._check_done()

    def _ended(self, protocol: TrickleProtocol) -> None:
        self._open.discard(protocol)
        self.record.trickles.append(protocol.result())
        if self._stopping:
            self._check_done()
        else:
            self._spawn_connect()  # the attack goes on: reconnect at once

    async def _trickle_bytes(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            for protocol in list(self._open):
                protocol.nudge()

    async def _measure_lag(self) -> None:
        """How late this loop wakes up: a measured end is late by up to this much."""
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.1)
            late = time.monotonic() - before - 0.1
            self.record.max_loop_lag = max(self.record.max_loop_lag, late)


# --- what the target does ---------------------------------------------------------------


class RssSampler:
    """Reads a process tree's resident memory every ``every`` seconds in a thread: its
    peak, and every reading (seconds since the start, KiB) to see whether it levels off."""

    def __init__(self, pid: int, every: float = 0.2) -> None:
        self.pid = pid
        self.every = every
        self.samples: list[tuple[float, int]] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @property
    def peak_kib(self) -> int:
        return max((kib for _, kib in self.samples), default=0)

    def peak_between(self, start: float, end: float) -> int:
        """The highest reading from ``start`` to ``end`` seconds after sampling began."""
        return max((kib for at, kib in self.samples if start <= at <= end), default=0)

    def _sample(self) -> None:
        began = time.monotonic()
        while not self._done.is_set():
            self.samples.append((time.monotonic() - began, rss_kib(process_tree(self.pid))))
            self._done.wait(self.every)

    @contextlib.contextmanager
    def sampling(self) -> Iterator[RssSampler]:
        self._thread.start()
        try:
            yield self
        finally:
            self._done.set()
            self._thread.join()


def header_timeouts(api_port: int | None) -> int | None:
    """wunderproxy's ``/status`` count of header timeouts (None for a peer without one)."""
    if api_port is None:
        return None
    connection = http.client.HTTPConnection(HOST, api_port, timeout=10)
    try:
        connection.request("GET", "/status", headers={"Accept": "application/json"})
        status = json.loads(connection.getresponse().read())
    finally:
        connection.close()
    return int(status["timeouts"].get("header", 0))


# --- one target -------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetResult:
    """(A) and (B) against one proxy, and what the attack met."""

    name: str
    alone: Measurement
    attacked: Measurement
    attack: AttackRecord
    attack_seconds: float
    header_timeout: float
    rss_before_kib: int
    rss_peak_kib: int
    rss_halves_kib: tuple[int, int]  # the peak in the attack's first and second half
    rss_after_kib: int
    status_header_timeouts: int | None

    @property
    def p99_ratio(self) -> float:
        if self.alone.wrk is None or self.attacked.wrk is None or not self.alone.wrk.p99_ms:
            return math.nan
        return self.attacked.wrk.p99_ms / self.alone.wrk.p99_ms

    def ends(self) -> list[float]:
        """Seconds from first byte to end, of every trickling connection that ended."""
        return sorted(e for t in self.attack.trickles if (e := t.ended_after) is not None)

    def counts(self) -> dict[str, int]:
        """Trickling connections by how they ended."""
        trickles = self.attack.trickles
        return {
            "connections": len(trickles),
            "answered_408": sum(t.status == 408 for t in trickles),
            "answered_other": sum(t.answered is not None and t.status != 408 for t in trickles),
            "closed_bare": sum(t.answered is None and t.closed is not None for t in trickles),
            "never_closed": sum(t.closed is None and t.answered is None for t in trickles),
            "connect_errors": self.attack.connect_errors,
        }

    @property
    def late_max(self) -> float:
        """The latest end minus the header timeout, in seconds."""
        ends = self.ends()
        return ends[-1] - self.header_timeout if ends else math.nan

    @property
    def late_p99(self) -> float:
        ends = self.ends()
        return percentile(ends, 99) - self.header_timeout if ends else math.nan

    @property
    def passed(self) -> dict[str, bool]:
        """The targets of issue 11, each met or not."""
        counts = self.counts()
        return {
            "p99_within_2x": self.p99_ratio <= P99_RATIO_TARGET,
            "closed_within_timeout_plus_1s": counts["never_closed"] == 0
            and self.late_max <= LATE_TARGET_SECONDS,
        }

    def as_dict(self) -> dict[str, Any]:
        ends = self.ends()
        return {
            "alone": self.alone.as_dict(),
            "attacked": self.attacked.as_dict(),
            "p99_ratio": _finite(self.p99_ratio),
            "trickling": self.counts()
            | {
                "ended_after_max_s": ends[-1] if ends else None,
                "ended_after_p99_s": percentile(ends, 99) if ends else None,
                "ended_after_p50_s": percentile(ends, 50) if ends else None,
                "late_max_s": _finite(self.late_max),
                "late_p99_s": _finite(self.late_p99),
                "first_connect_error": self.attack.first_error or None,
                "attackers_max_loop_lag_s": self.attack.max_loop_lag,
                "attackers_cpu_seconds": self.attack.cpu_seconds,
                "attack_seconds": self.attack_seconds,
            },
            "rss_kib": {
                "before": self.rss_before_kib,
                "peak": self.rss_peak_kib,
                "peak_first_half": self.rss_halves_kib[0],
                "peak_second_half": self.rss_halves_kib[1],
                "after": self.rss_after_kib,
            },
            "status_header_timeouts": self.status_header_timeouts,
            "passed": self.passed,
        }


def percentile(ordered: Sequence[float], which: float) -> float:
    """The nearest-rank percentile of already sorted values."""
    return ordered[max(0, math.ceil(len(ordered) * which / 100) - 1)]


def measure_own(target: Peer, backend: Peer, seconds: float) -> Measurement:
    """:func:`suite.measure` of the normal clients, with this process's own CPU time (the
    attackers') taken out of "other": it is part of the benchmark."""
    before = _own_cpu()
    result = measure(NORMAL, target, backend, seconds, ())
    own = _own_cpu() - before
    return dataclasses.replace(result, other_cpu_seconds=max(0.0, result.other_cpu_seconds - own))


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_target(
    target: Peer, backend: Peer, api_port: int | None, args: argparse.Namespace
) -> TargetResult:
    """Warm up, (A), then (B) with the attack around it, reading memory and /status."""
    progress(f"{target.name}: warm-up and (A) {args.seconds:g} s alone")
    measure(NORMAL, target, backend, args.warmup, ())
    alone = measure_own(target, backend, args.seconds)
    time.sleep(1.0)
    rss_before = rss_kib(process_tree(target.process.pid))
    timeouts_before = header_timeouts(api_port)
    attack = Attack(target.port, args.attackers, args.interval, args.ramp, args.header_timeout)
    how = f"over {args.ramp:g} s" if args.ramp else "in a burst"
    progress(f"{target.name}: (B) {args.attackers} trickling connections opened {how}")
    with RssSampler(target.process.pid).sampling() as rss:
        started = time.monotonic()
        attack.start(time_limit=args.seconds + args.ramp + 120)
        attacked = measure_own(target, backend, args.seconds)
        progress(f"{target.name}: wrk done; waiting for the last round of trickling heads")
        record = attack.stop()
        attack_seconds = time.monotonic() - started
        time.sleep(1.0)
    timeouts_after = header_timeouts(api_port)
    return TargetResult(
        name=target.name,
        alone=alone,
        attacked=attacked,
        attack=record,
        attack_seconds=attack_seconds,
        header_timeout=args.header_timeout,
        rss_before_kib=rss_before,
        rss_peak_kib=rss.peak_kib,
        rss_halves_kib=(
            rss.peak_between(0, attack_seconds / 2),
            rss.peak_between(attack_seconds / 2, attack_seconds),
        ),
        rss_after_kib=rss_kib(process_tree(target.process.pid)),
        status_header_timeouts=(
            timeouts_after - timeouts_before
            if timeouts_after is not None and timeouts_before is not None
            else None
        ),
    )


@contextlib.contextmanager
def running_peers(
    work: Path, header_timeout: float, only: Sequence[str]
) -> Iterator[tuple[Peer, dict[str, tuple[Peer, int | None]]]]:
    """The backend and the chosen proxies (with their API port, if any), answering; all
    stopped at the end."""
    started: list[Peer] = []
    try:
        backend = start_backend(work, SERVER_CPU)
        started.append(backend)
        wait_until_answers(backend)
        proxies: dict[str, tuple[Peer, int | None]] = {}
        if "wunderproxy" in only:
            api_port = free_port()
            options = ("--header-timeout", f"{header_timeout:g}", "--api", f"{HOST}:{api_port}")
            wunder = start_wunderproxy(work, backend, SERVER_CPU, extra=options)
            started.append(wunder)
            proxies["wunderproxy"] = (wunder, api_port)
        if "nginx" in only:
            nginx = start_nginx_proxy(work, backend, SERVER_CPU, header_timeout=header_timeout)
            started.append(nginx)
            proxies["nginx"] = (nginx, None)
        for peer, _ in proxies.values():
            wait_until_answers(peer)
        yield backend, proxies
    finally:
        for peer in reversed(started):
            peer.stop()


# --- printing -------------------------------------------------------------------------


def _number(value: float | None, digits: int = 0) -> str:
    return f"{value:,.{digits}f}" if value is not None and math.isfinite(value) else "-"


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def normal_table(results: Sequence[TargetResult], attackers: int, seconds: float) -> str:
    """The normal clients, (A) alone and (B) under attack, with the ratio of the p99s."""
    rows = []
    for r in results:
        a, b = r.alone.wrk, r.attacked.wrk
        rows.append(
            [
                r.name,
                _number(a.requests_per_second if a else None),
                _number(a.p50_ms if a else None, 2),
                _number(a.p99_ms if a else None, 2),
                _number(b.requests_per_second if b else None),
                _number(b.p50_ms if b else None, 2),
                _number(b.p99_ms if b else None, 2),
                _number(r.p99_ratio, 2),
                f"{a.failed if a else '-'}/{b.failed if b else '-'}",
                f"{_number(r.alone.other_load_percent)}/{_number(r.attacked.other_load_percent)}",
            ]
        )
    headers = ["target", "A req/s", "A p50 ms", "A p99 ms", "B req/s", "B p50 ms", "B p99 ms"]
    headers += ["p99 B/A", "errors A/B", "other % A/B"]
    title = (
        f"== normal clients: wrk -c{NORMAL.connections} {NORMAL.path}, {seconds:g} s; "
        f"(A) alone, (B) beside {attackers:,} trickling heads"
    )
    table = f"{title}\n{render(headers, rows)}"
    busy = [
        r.name
        for r in results
        for m in (r.alone, r.attacked)
        if m.other_load_percent > OTHER_LOAD_WARNING
    ]
    if busy:
        table += (
            f"\nnote: other processes on this machine used more than {OTHER_LOAD_WARNING}% "
            f"of a core during runs of {', '.join(sorted(set(busy)))}: those figures are "
            "unreliable"
        )
    return table


def attack_table(results: Sequence[TargetResult], header_timeout: float) -> str:
    """The trickling connections: how and when they ended; the target's memory."""
    rows = []
    for r in results:
        counts, ends = r.counts(), r.ends()
        rows.append(
            [
                r.name,
                f"{counts['connections']:,}",
                f"{counts['answered_408']:,}",
                f"{counts['closed_bare']:,}",
                str(counts["answered_other"]),
                str(counts["never_closed"]),
                str(counts["connect_errors"]),
                _number(percentile(ends, 50) if ends else None, 2),
                _number(r.late_p99, 2),
                _number(r.late_max, 2),
                "/".join(
                    _number(kib / KIB_PER_MIB, 1)
                    for kib in (r.rss_before_kib, *r.rss_halves_kib, r.rss_after_kib)
                ),
                _number(r.status_header_timeouts),
            ]
        )
    headers = ["target", "heads", "408", "bare close", "other", "never closed", "conn. errors"]
    headers += ["end p50 s", "late p99 s", "late max s", "RSS MiB before/peak 1st, 2nd half/after"]
    headers += ["/status header"]
    legend = (
        "(end: seconds from a head's first byte to the answer or close it saw; late: end "
        f"minus the header timeout, target <= {LATE_TARGET_SECONDS:g} s; RSS: the highest "
        "reading in each half of the attack, to see whether it levels off)"
    )
    title = f"== trickling heads, header timeout {header_timeout:g} s"
    lag = ", ".join(f"{r.name} {r.attack.max_loop_lag * 1000:.0f} ms" for r in results)
    cpu = ", ".join(
        f"{r.name} {r.attack.cpu_seconds / r.attack_seconds * 100:.0f} %"
        for r in results
        if r.attack_seconds
    )
    notes = [f"attackers' loop lateness at most (inflates ends): {lag}"]
    notes.append(f"attackers' CPU (core {WRK_CPU}, shared with wrk): {cpu} of a core")
    return "\n".join([title, render(headers, rows), legend, *notes])


def verdict(results: Sequence[TargetResult]) -> str:
    """One line per target: the issue's two targets, met or not."""
    lines = ["== targets (p99 under attack <= 2x alone; every head ended <= timeout + 1 s)"]
    for r in results:
        passed = r.passed
        p99 = "met" if passed["p99_within_2x"] else "MISSED"
        close = "met" if passed["closed_within_timeout_plus_1s"] else "MISSED"
        lines.append(
            f"{r.name}: p99 {p99} ({_number(r.p99_ratio, 2)}x), "
            f"close {close} (late max {_number(r.late_max, 2)} s)"
        )
    return "\n".join(lines)


def machine_facts(proxies: dict[str, tuple[Peer, int | None]]) -> dict[str, Any]:
    """Cores, kernel, Python, wrk, nginx, and whether wunderproxy runs on uvloop."""
    facts: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "wrk": version_of(["wrk", "-v"]).split(" [")[0],
        "nginx": version_of(["/usr/sbin/nginx", "-v"]),
    }
    if "wunderproxy" in proxies:
        pid = proxies["wunderproxy"][0].process.pid
        facts["wunderproxy_uvloop"] = loads_library(pid, "uvloop")
    return facts


# --- main -----------------------------------------------------------------------------


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each wrk run")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured run before (A)")
    parser.add_argument("--attackers", type=int, default=2000, help="trickling connections")
    parser.add_argument(
        "--header-timeout", type=float, default=5.0, help="both proxies' header timeout"
    )
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between bytes")
    parser.add_argument(
        "--ramp", type=float, default=0.0, help="spread first connects over S (0: a burst)"
    )
    parser.add_argument("--only", nargs="+", choices=TARGETS, help="run only these targets")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args(argv)
    if not 0 < args.seconds <= 300 or not 0 <= args.warmup <= 60:
        parser.error("--seconds must be in (0, 300] and --warmup in [0, 60]")
    if not 0 < args.attackers <= 20_000 or not 0 < args.header_timeout <= 60:
        parser.error("--attackers must be in (0, 20000] and --header-timeout in (0, 60]")
    if not 0.05 <= args.interval <= args.header_timeout or not 0 <= args.ramp <= 60:
        parser.error("--interval must be in [0.05, header timeout] and --ramp in [0, 60]")
    return args


def stop_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_arguments(argv)
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    # This process is the attackers: on wrk's core. Threads started later inherit it;
    # the servers are started through taskset onto their own.
    os.sched_setaffinity(0, {WRK_CPU})
    open_files = raise_open_files(OPEN_FILES)
    only = args.only or list(TARGETS)
    figures: dict[str, Any] = {"settings": vars(args) | {"json": None}, "targets": {}}
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="wunderproxy-slowloris-") as work_dir,
        running_peers(Path(work_dir), args.header_timeout, only) as (backend, proxies),
    ):
        facts = machine_facts(proxies) | {"open_files_limit": open_files}
        figures["machine"] = facts
        how = f"over {args.ramp:g} s" if args.ramp else "in a burst"
        print(
            f"machine: {facts['nproc']} cores, Linux {facts['kernel']}, Python {facts['python']}"
            f"; {facts['nginx']}; {facts['wrk']}; wunderproxy on uvloop: "
            f"{'yes' if facts.get('wunderproxy_uvloop') else 'no'}\n"
            f"backend and proxies on core {SERVER_CPU}, wrk and attackers on core {WRK_CPU}; "
            f"{args.attackers:,} attackers opened {how}, a byte every {args.interval:g} s, "
            f"reconnecting; header timeout {args.header_timeout:g} s",
            flush=True,
        )
        results = []
        for name in only:
            peer, api_port = proxies[name]
            results.append(run_target(peer, backend, api_port, args))
            figures["targets"][name] = results[-1].as_dict()
            time.sleep(2.0)
        print(f"\n{normal_table(results, args.attackers, args.seconds)}", flush=True)
        print(f"\n{attack_table(results, args.header_timeout)}", flush=True)
        print(f"\n{verdict(results)}", flush=True)
        figures["logs"] = log_problems({name: peer for name, (peer, _) in proxies.items()})
        print(f"\n{logs_report(figures['logs'])}", flush=True)
    figures["elapsed_seconds"] = time.monotonic() - started
    print(f"\ntotal {figures['elapsed_seconds']:.0f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
