"""wunderproxy against nginx and haproxy, in front of the same nginx backend, under wrk.

    python3 benchmarks/suite.py [--seconds 10] [--json out.json] [--only SCENARIO ...]

Starts an nginx backend and four proxies in front of it (nginx, haproxy, and wunderproxy via
``benchmarks/proxy_only.py`` twice: without and with ``--access-log`` to a file, so that the
log's cost is measured in the same run), all pinned to core 0, and runs wrk pinned to core 1 against
each target in turn (``direct`` is the backend itself) for a fixed time per scenario:

- ``small-keepalive``: GET of about 100 bytes, 50 kept-alive connections;
- ``1mib``: GET of 1 MiB, 50 connections (compared in MiB/s);
- ``new-connection``: the small GET with ``Connection: close``, 50 connections;
- ``c1000``: the small GET on 1000 kept-alive connections;
- ``post-64k``: POST of a 64 KiB body, 50 connections (MiB/s is the uploaded bodies);
- ``idle-memory``: resident memory per idle kept-alive connection, 10,000 of them, each
  after one complete request, so that a proxy also holds what it keeps upstream (measured
  first, while every process is fresh). A proxy that opens an upstream connection per
  client needs two descriptors for each: where the open-file limit cannot be raised enough,
  fewer are held (whole thousands that fit) and the table says how many.

For each run it prints requests per second, MiB/s, median and 99th percentile latency,
failed requests (socket errors and answers outside 2xx/3xx), the CPU time the target's own
processes spent per request (user plus system, from /proc), the ratio to nginx, and how
much CPU other processes on the machine used meanwhile, or the hypervisor took from it
(steal) ("other %", in % of one core: runs
with much of it are flagged, their figures unreliable).
Everything it starts is stopped by PID at the end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Protocol

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.idle_connections import IdleResult, measure_idle
from benchmarks.peers import (
    POST_PATH,
    PROXIES,
    Peer,
    cpu_seconds,
    loads_library,
    machine_busy_seconds,
    raise_open_files,
    start_backend,
    start_wunderproxy,
    stolen_seconds,
    version_of,
    wait_until_answers,
)
from benchmarks.wrk import WrkResult, run_wrk

SERVER_CPU = 0
WRK_CPU = 1
OPEN_FILES = 131_072
BASELINE = "nginx"
IDLE_MEMORY = "idle-memory"
MIB = 1024 * 1024
POST_BODY_BYTES = 64 * 1024
IDLE_CONNECTIONS = 10_000
# CPU (in % of one core) used by processes outside the benchmark above which a run is flagged.
OTHER_LOAD_WARNING = 10
# Descriptors a proxy keeps for its listeners, logs and libraries besides connections.
FILES_SPARE = 1024


@dataclass(frozen=True)
class Scenario:
    """One wrk load: a path, a number of connections, extra wrk arguments."""

    name: str
    path: str
    connections: int
    close_connections: bool = False
    post_body_bytes: int = 0
    compare_mib: bool = False
    headers: tuple[str, ...] = ()  # more request fields, "Name: value"


SCENARIOS = {
    scenario.name: scenario
    for scenario in (
        Scenario("small-keepalive", "/small.txt", 50),
        Scenario("1mib", "/1m.bin", 50, compare_mib=True),
        Scenario("new-connection", "/small.txt", 50, close_connections=True),
        Scenario("c1000", "/small.txt", 1000),
        Scenario("post-64k", POST_PATH, 50, post_body_bytes=POST_BODY_BYTES, compare_mib=True),
    )
}


class Target(Protocol):
    """What a wrk run is aimed at: a :class:`~benchmarks.peers.Peer`, or anything else whose
    processes can be found (a container, say)."""

    name: str

    def alive(self) -> bool: ...
    def pids(self) -> list[int]: ...
    def url(self, path: str) -> str: ...


# Processes that serve every target's requests without being any target, such as Docker's
# userland proxy in front of a container: their CPU per request gets a column of its own.
Sides = Mapping[str, Callable[[], list[int]]]


@dataclass(frozen=True)
class Measurement:
    """One wrk run against one target, with the CPU time its processes spent."""

    target: str
    wrk: WrkResult | None
    cpu_seconds: float
    backend_cpu_seconds: float
    post_body_bytes: int = 0
    other_cpu_seconds: float = 0.0
    error: str = ""
    side_cpu_seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def other_load_percent(self) -> float:
        """CPU that processes outside the benchmark used meanwhile, in % of one core."""
        if self.wrk is None or self.wrk.seconds == 0:
            return math.nan
        return self.other_cpu_seconds / self.wrk.seconds * 100

    @property
    def mib_per_second(self) -> float:
        """Answers read by wrk, or for a POST the request bodies sent, in MiB/s."""
        if self.wrk is None:
            return math.nan
        if self.post_body_bytes:
            return self.wrk.requests_per_second * self.post_body_bytes / MIB
        return self.wrk.bytes_per_second / MIB

    @property
    def cpu_us_per_request(self) -> float:
        """The target's CPU time (user + system) per completed request, in µs."""
        return _per_request(self.cpu_seconds, self.wrk)

    @property
    def backend_cpu_us_per_request(self) -> float:
        """The backend's CPU time per completed request, in µs (behind a proxy)."""
        return _per_request(self.backend_cpu_seconds, self.wrk)

    def side_cpu_us_per_request(self, side: str) -> float:
        """The CPU time per completed request of the side processes named ``side``, in µs."""
        return _per_request(self.side_cpu_seconds.get(side, math.nan), self.wrk)

    def as_dict(self) -> dict[str, Any]:
        wrk = self.wrk.as_dict() if self.wrk else None
        return {
            "wrk": wrk,
            "requests_per_second": self.wrk.requests_per_second if self.wrk else None,
            "mib_per_second": _finite(self.mib_per_second),
            "p50_ms": self.wrk.p50_ms if self.wrk else None,
            "p99_ms": self.wrk.p99_ms if self.wrk else None,
            "errors": self.wrk.failed if self.wrk else None,
            "timeouts": self.wrk.timeouts if self.wrk else None,
            "cpu_seconds": self.cpu_seconds,
            "cpu_us_per_request": _finite(self.cpu_us_per_request),
            "backend_cpu_us_per_request": _finite(self.backend_cpu_us_per_request),
            **{
                f"{side}_cpu_us_per_request": _finite(self.side_cpu_us_per_request(side))
                for side in self.side_cpu_seconds
            },
            "other_load_percent_of_a_core": _finite(self.other_load_percent),
            "error": self.error or None,
        }


def _per_request(seconds: float, wrk: WrkResult | None) -> float:
    if wrk is None or wrk.requests == 0:
        return math.nan
    return seconds / wrk.requests * 1e6


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


# --- running --------------------------------------------------------------------------


@contextmanager
def running_targets(
    work: Path, baseline: Path | None = None, wunderproxy_options: Sequence[str] = ()
) -> Iterator[dict[str, Peer]]:
    """The backend and every proxy, started, answering, and stopped at the end; with
    ``baseline``, also the wunderproxy of that working tree (``wunderproxy@base``), and
    with ``wunderproxy_options``, this tree's wunderproxy targets get those options."""
    started: list[Peer] = []
    starts = [
        functools.partial(start, extra=wunderproxy_options)
        if name.startswith("wunderproxy") and wunderproxy_options
        else start
        for name, start in PROXIES.items()
    ]
    if baseline is not None:
        starts.append(functools.partial(start_wunderproxy, checkout=baseline))
    try:
        backend = start_backend(work, SERVER_CPU)
        started.append(backend)
        wait_until_answers(backend)
        for start in starts:
            peer = start(work, backend, SERVER_CPU)
            started.append(peer)
            wait_until_answers(peer)
        yield {peer.name: peer for peer in started}
    finally:
        for peer in reversed(started):
            peer.stop()


def wrk_script(work: Path, body_bytes: int) -> Path:
    """A wrk Lua script that sends a POST with a body of ``body_bytes``."""
    script = work / f"post-{body_bytes}.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f'wrk.body = string.rep("x", {body_bytes})\n'
        'wrk.headers["Content-Type"] = "application/octet-stream"\n'
    )
    return script


def wrk_arguments(scenario: Scenario, work: Path) -> tuple[str, ...]:
    """Extra wrk arguments of a scenario: headers and script."""
    extra: list[str] = []
    if scenario.close_connections:
        extra += ["-H", "Connection: close"]
    for field in scenario.headers:
        extra += ["-H", field]
    if scenario.post_body_bytes:
        extra += ["-s", str(wrk_script(work, scenario.post_body_bytes))]
    return tuple(extra)


def measure(
    scenario: Scenario,
    target: Target,
    backend: Target,
    seconds: float,
    extra: tuple[str, ...],
    sides: Sides | None = None,
) -> Measurement:
    """One bounded wrk run against ``target``, reading CPU times around it (also of the
    ``sides``' processes, each apart)."""
    if not target.alive():
        return Measurement(target.name, None, 0.0, 0.0, error="process exited")
    pids, backend_pids = target.pids(), backend.pids()
    side_pids = {name: find() for name, find in (sides or {}).items()}
    side_before = {name: cpu_seconds(found) for name, found in side_pids.items()}
    cpu_before, backend_before = cpu_seconds(pids), cpu_seconds(backend_pids)
    busy_before, wrk_before = machine_busy_seconds(), _waited_children_cpu()
    stolen_before = stolen_seconds()
    url = target.url(scenario.path)
    try:
        result = run_wrk(url, seconds, scenario.connections, cpu=WRK_CPU, extra=extra)
    except (subprocess.SubprocessError, ValueError) as error:
        return Measurement(target.name, None, 0.0, 0.0, error=str(error).splitlines()[0])
    busy = machine_busy_seconds() - busy_before
    stolen = stolen_seconds() - stolen_before
    target_cpu = cpu_seconds(pids) - cpu_before
    backend_cpu = cpu_seconds(backend_pids) - backend_before
    side_cpu = {name: cpu_seconds(found) - side_before[name] for name, found in side_pids.items()}
    ours = target_cpu + _waited_children_cpu() - wrk_before + sum(side_cpu.values())
    if target is not backend:
        ours += backend_cpu
    return Measurement(
        target=target.name,
        wrk=result,
        cpu_seconds=target_cpu,
        backend_cpu_seconds=backend_cpu,
        post_body_bytes=scenario.post_body_bytes,
        # A virtual machine's cores are shared: time the host gave to others counts too.
        other_cpu_seconds=max(0.0, busy - ours) + stolen,
        side_cpu_seconds=side_cpu,
    )


def _waited_children_cpu() -> float:
    """CPU time of the children this process waited for (so far: every wrk run)."""
    times = os.times()
    return times.children_user + times.children_system


def run_scenario(
    scenario: Scenario,
    peers: Mapping[str, Target],
    work: Path,
    seconds: float,
    warmup: float,
    sides: Sides | None = None,
) -> dict[str, Measurement]:
    """Every target, one after another, each after an unmeasured warm-up run."""
    extra = wrk_arguments(scenario, work)
    results: dict[str, Measurement] = {}
    for name in peers:  # direct first, then every proxy in the order they started
        progress(f"{scenario.name}: {name}")
        if warmup > 0:
            measure(scenario, peers[name], peers["direct"], warmup, extra)
            time.sleep(0.5)
        results[name] = measure(scenario, peers[name], peers["direct"], seconds, extra, sides)
        time.sleep(1.0)
    return results


def run_idle_memory(peers: dict[str, Peer], count: int) -> dict[str, IdleResult]:
    """:func:`measure_idle` against every target, one after another."""
    results: dict[str, IdleResult] = {}
    for name in peers:
        progress(f"{IDLE_MEMORY}: {name} ({count} connections)")
        results[name] = measure_idle(peers[name].port, peers[name].process.pid, count)
        time.sleep(2.0)
    return results


# --- printing -------------------------------------------------------------------------


def progress(message: str) -> None:
    """A progress line on stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def render(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain text table, first column left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    lines = []
    for row in [headers, *rows]:
        cells = [
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells))
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _number(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}" if math.isfinite(value) else "-"


def _ratio(value: float, baseline: float) -> str:
    if not (math.isfinite(value) and math.isfinite(baseline)) or baseline == 0:
        return "-"
    return f"{value / baseline:.2f}"


def scenario_table(scenario: Scenario, results: dict[str, Measurement]) -> str:
    """The table of one scenario, with the ratio to nginx (req/s, or MiB/s)."""

    def compared(measurement: Measurement) -> float:
        if measurement.wrk is None:
            return math.nan
        if scenario.compare_mib:
            return measurement.mib_per_second
        return measurement.wrk.requests_per_second

    baseline = compared(results[BASELINE]) if BASELINE in results else math.nan
    sides = sorted({side for m in results.values() for side in m.side_cpu_seconds})
    rows = []
    for name, m in results.items():
        if m.wrk is None:
            failed = [name, "-", "-", "-", "-", m.error or "failed", "-", "-"]
            rows.append(failed + ["-"] * (len(sides) + 2))
            continue
        rows.append(
            [
                name,
                _number(m.wrk.requests_per_second),
                _number(m.mib_per_second, 1),
                _number(m.wrk.p50_ms, 2),
                _number(m.wrk.p99_ms, 2),
                str(m.wrk.failed),
                str(m.wrk.timeouts),
                _number(m.cpu_us_per_request, 1),
                *(_number(m.side_cpu_us_per_request(side), 1) for side in sides),
                _ratio(compared(m), baseline),
                _number(m.other_load_percent),
            ]
        )
    what = "MiB/s" if scenario.compare_mib else "req/s"
    headers = ["target", "req/s", "MiB/s", "p50 ms", "p99 ms", "errors", "timeouts"]
    headers += ["CPU µs/req", *(f"{side} µs/req" for side in sides)]
    headers += [f"{what} vs nginx", "other %"]
    title = f"== {scenario.name}: {scenario.path}, {scenario.connections} connections"
    if scenario.close_connections:
        title += ", Connection: close"
    for field in scenario.headers:
        title += f", {field}"
    if scenario.post_body_bytes:
        title += f", POST {scenario.post_body_bytes // 1024} KiB (MiB/s = bodies sent)"
    table = f"{title}\n{render(headers, rows)}"
    busy = [name for name, m in results.items() if m.other_load_percent > OTHER_LOAD_WARNING]
    if busy:
        table += (
            f"\nnote: other processes on this machine used more than {OTHER_LOAD_WARNING}% "
            f"of a core during the runs of {', '.join(busy)}: those figures are unreliable"
        )
    return table


def memory_table(results: dict[str, IdleResult]) -> str:
    """The table of resident memory per idle connection, with the ratio to nginx."""
    baseline = results[BASELINE].kib_per_connection if BASELINE in results else math.nan
    rows = [
        [
            name,
            f"{r.held}/{r.wanted}",
            str(r.failed),
            _number(r.rss_before_kib / 1024, 1),
            _number(r.rss_after_kib / 1024, 1),
            _number(r.kib_per_connection, 2),
            _ratio(r.kib_per_connection, baseline),
            f"{r.sockets_after - r.sockets_before:+,}",
        ]
        for name, r in results.items()
    ]
    headers = ["target", "held", "failed", "RSS before MiB", "RSS after MiB", "KiB/conn"]
    headers += ["vs nginx", "sockets held"]
    notes = [f"  {name}: first error {r.first_error}" for name, r in results.items() if r.failed]
    count = max((r.wanted for r in results.values()), default=0)
    title = f"== {IDLE_MEMORY}: {count} idle kept-alive connections, each after one GET"
    legend = "(sockets held: the target's open sockets, client and upstream, minus before)"
    return "\n".join([title, render(headers, rows), legend, *notes])


def log_problems(peers: dict[str, Peer]) -> dict[str, dict[str, Any]]:
    """Per target: warning and error lines in its log, and the first one."""
    found = {}
    for name, peer in peers.items():
        count, first = peer.log_problems()
        found[name] = {"lines": count, "first": first}
    return found


def logs_report(problems: dict[str, dict[str, Any]]) -> str:
    """One line per target: clean, or how many problems it logged and the first."""
    lines = ["== logs"]
    for name, found in problems.items():
        if found["lines"]:
            lines.append(f"{name}: {found['lines']} warning/error lines, first: {found['first']}")
        else:
            lines.append(f"{name}: no warnings or errors")
    return "\n".join(lines)


def machine_facts(peers: dict[str, Peer] | None = None) -> dict[str, Any]:
    """nproc, kernel, Python, the peers' versions and whether wunderproxy runs on uvloop."""
    facts: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "wrk": version_of(["wrk", "-v"]).split(" [")[0],
    }
    if peers:
        facts["nginx"] = peers["nginx"].versions
        facts["haproxy"] = peers["haproxy"].versions
        facts["wunderproxy_uvloop"] = loads_library(peers["wunderproxy"].process.pid, "uvloop")
    return facts


def header(facts: dict[str, Any], seconds: float, warmup: float) -> str:
    """The lines printed before the tables."""
    uvloop = "yes" if facts.get("wunderproxy_uvloop") else "no (asyncio's own loop)"
    return "\n".join(
        [
            f"machine: {facts['nproc']} cores, Linux {facts['kernel']}, Python {facts['python']}",
            f"peers: {facts.get('nginx', '?')}; {facts.get('haproxy', '?')}; {facts['wrk']}",
            f"wunderproxy on uvloop: {uvloop}; open-file limit {facts['open_files_limit']}",
            f"backend and proxies on core {SERVER_CPU}, wrk (1 thread) on core {WRK_CPU}; "
            f"{seconds:g} s per run after a {warmup:g} s warm-up",
        ]
    )


# --- main -----------------------------------------------------------------------------


def idle_connection_count(open_files: int, wanted: int = IDLE_CONNECTIONS) -> int:
    """``wanted``, or the whole thousands that fit when a proxy needs two descriptors per
    connection (client and upstream) under the open-file limit, whichever is fewer."""
    fits = (open_files - FILES_SPARE) // 2 // 1000 * 1000
    return max(1000, min(wanted, fits))


def stop_on_sigterm(signum: int, frame: object) -> NoReturn:
    raise SystemExit(128 + signum)


def run_options(description: str) -> argparse.ArgumentParser:
    """A command line with the options every wrk benchmark has: --seconds, --warmup, --json."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each wrk run")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured run before each")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    return parser


def parsed(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """The options of ``parser`` (made by :func:`run_options`), their bounds checked."""
    args = parser.parse_args(argv)
    if not 0 < args.seconds <= 600 or not 0 <= args.warmup <= 60:
        parser.error("--seconds must be in (0, 600] and --warmup in [0, 60]")
    return args


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = run_options(__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only",
        nargs="+",
        choices=[*SCENARIOS, IDLE_MEMORY],
        help="run only these scenarios",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="also measure the wunderproxy of this working tree (e.g. a `git worktree` of an "
        "earlier commit) as wunderproxy@base, to compare before and after in one run",
    )
    parser.add_argument(
        "--wunderproxy-option",
        action="append",
        default=[],
        metavar="OPTION",
        help="pass OPTION to this tree's wunderproxy targets (not to --baseline's), e.g. "
        "--wunderproxy-option=--keep-upstream; may be repeated",
    )
    parser.add_argument(
        "--idle-connections",
        type=int,
        help="connections held for idle-memory (default 10,000, fewer if the open-file "
        "limit cannot hold two per connection in one process)",
    )
    return parsed(parser, argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_arguments(argv)
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    chosen = args.only or [IDLE_MEMORY, *SCENARIOS]
    open_files = raise_open_files(OPEN_FILES)
    idle_count = args.idle_connections or idle_connection_count(open_files)
    started = time.monotonic()
    figures: dict[str, Any] = {"scenarios": {}}
    with (
        tempfile.TemporaryDirectory(prefix="wunderproxy-suite-") as work_dir,
        running_targets(Path(work_dir), args.baseline, args.wunderproxy_option) as peers,
    ):
        work = Path(work_dir)
        facts = machine_facts(peers) | {"open_files_limit": open_files}
        figures["machine"] = facts
        figures["settings"] = {
            "seconds": args.seconds,
            "warmup": args.warmup,
            "idle_connections": idle_count,
            "wunderproxy_options": args.wunderproxy_option,
        }
        print(header(facts, args.seconds, args.warmup), flush=True)
        if IDLE_MEMORY in chosen:
            idle = run_idle_memory(peers, idle_count)
            figures[IDLE_MEMORY] = {name: r.as_dict() for name, r in idle.items()}
            print(f"\n{memory_table(idle)}", flush=True)
        for name in (name for name in SCENARIOS if name in chosen):
            scenario = SCENARIOS[name]
            results = run_scenario(scenario, peers, work, args.seconds, args.warmup)
            figures["scenarios"][name] = {t: m.as_dict() for t, m in results.items()}
            print(f"\n{scenario_table(scenario, results)}", flush=True)
        figures["logs"] = log_problems(peers)
        print(f"\n{logs_report(figures['logs'])}", flush=True)
    figures["elapsed_seconds"] = time.monotonic() - started
    print(f"\ntotal {figures['elapsed_seconds']:.0f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
