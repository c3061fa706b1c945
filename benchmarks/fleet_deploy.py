"""What a fleet deploy costs the users: a v1 -> v2 deploy of three hosts under load.

    python3 benchmarks/fleet_deploy.py [--runs 3] [--before 5] [--after 3]

Each run starts moto's S3 server and a fleet of three hosts (tests/support/fleet.py: a
wunderproxy and a registry per host, one store, one artifacts bucket), deploys rev1 with
``python -m wunderproxy deploy`` as a workstation would, and then runs the tests' load
generator (tests/support/load.py, its default mix: keep-alive and new-connection GETs,
two-second GETs, 16 KiB POSTs) through all three proxies at once: ``--before`` seconds of
steady load, then ``wunderproxy deploy`` of rev2, then ``--after`` seconds.

It prints the requests sent and failed, the deploy command's wall time and its phases (from
when its progress lines arrived: launch from the first ``launching`` line to the last
``healthy`` one, switch from there to the last ``switched`` one), and the latency of the
requests that started before the deploy, and of those that started while it ran from its
first launch to its exit (before that, the command only starts, finds the store, takes the
lock and reads each host's status). The two-second requests are left out of the
percentiles: they sleep by design. Every load run is bounded in time and count
and goes to 127.0.0.1 only; everything started is stopped by PID, and the containers,
images and buckets made are removed.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import docker

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.slowloris import percentile
from tests.support.fleet import Fleet, running_fleet
from tests.support.load import LoadGenerator, Outcome, revision_of
from tests.support.s3 import moto_server

WARM_UP = 1.0  # seconds of load left out of "before": connections being opened
LOAD_REQUESTS = 50_000  # per proxy: a bound the runs stay well below
DEPLOY_TIMEOUT = 300.0  # seconds; a deploy that takes longer fails the run
SLOW = "slow"  # the load's two-second requests: left out of the percentiles
# What the deploy's progress lines say, per host, as each phase moves on.
PHASE_MARKERS = ("took deploy.lock", ": launching ", ": healthy: ", ": switched proxy to port ")


@dataclass(frozen=True)
class Deploy:
    """One ``wunderproxy deploy`` that succeeded: when it started, ended, and reached each
    phase (``time.monotonic()`` seconds)."""

    began: float  # monotonic times: the command started, ...
    ended: float  # ... exited,
    locked: float  # ... printed that it took the lock,
    first_launching: float  # ... its first "launching" line,
    launched: float  # ... its last "healthy" one,
    switched: float  # ... and its last "switched" one.

    @property
    def wall(self) -> float:
        return self.ended - self.began

    @property
    def lead_in(self) -> float:
        """From the start to the lock taken: the interpreter, the store found, the lock."""
        return self.locked - self.began

    @property
    def launch_phase(self) -> float:
        return self.launched - self.first_launching

    @property
    def switch_phase(self) -> float:
        return self.switched - self.launched


@dataclass(frozen=True)
class Run:
    """One run's figures."""

    sent: int
    failed: int
    deploy: Deploy
    before: list[float]  # milliseconds, sorted: requests started before the deploy
    during: list[float]  # ... from its first launch to its end (the fleet changing)
    answered_by: dict[str, int]  # revision -> requests it answered


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--before", type=float, default=5.0, help="seconds of load before")
    parser.add_argument("--after", type=float, default=3.0, help="seconds of load after")
    args = parser.parse_args()

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's line per request
    client = docker.from_env()
    labels = {"wunderproxy.test": f"bench-{uuid.uuid4().hex[:8]}"}
    runs = []
    for number in range(1, args.runs + 1):
        with moto_server() as endpoint, tempfile.TemporaryDirectory() as work:
            app = f"wp-bench-{uuid.uuid4().hex[:8]}"
            with running_fleet(Path(work), endpoint, client, app, labels) as fleet:
                run = measure(fleet, args.before, args.after)
        runs.append(run)
        print(f"run {number}: {describe(run)}", flush=True)
    client.close()
    print(summary(runs))


def measure(fleet: Fleet, before: float, after: float) -> Run:
    """Deploy rev1, then rev2 under load through every proxy; the figures."""
    deploy(fleet, fleet.hashes["rev1"])
    with ExitStack() as stack:
        loads = [
            stack.enter_context(
                LoadGenerator(
                    host.process.proxy_port,
                    max_seconds=before + after + DEPLOY_TIMEOUT,
                    max_requests=LOAD_REQUESTS,
                )
            )
            for host in fleet.hosts
        ]
        started = time.monotonic()
        time.sleep(WARM_UP + before)
        second = deploy(fleet, fleet.hashes["rev2"])
        time.sleep(after)
        outcomes = [outcome for load in loads for outcome in load.stop()]
    answered_by = Counter(revision_of(o) for o in outcomes if not o.failed)
    return Run(
        sent=len(outcomes),
        failed=sum(1 for o in outcomes if o.failed),
        deploy=second,
        before=latencies(outcomes, started + WARM_UP, second.began),
        during=latencies(outcomes, second.first_launching, second.ended),
        answered_by=dict(sorted(answered_by.items())),
    )


def deploy(fleet: Fleet, config_hash: str) -> Deploy:
    """``python -m wunderproxy deploy HASH`` to every host, timing its progress lines."""
    environment = {
        **os.environ,
        "WUNDERPROXY_HOSTS": ",".join(host.api_url for host in fleet.hosts),
    }
    began = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "wunderproxy", "deploy", config_hash],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
    )
    assert process.stderr is not None
    seen: dict[str, list[float]] = {marker: [] for marker in PHASE_MARKERS}
    lines = []
    # Progress goes to standard error a line at a time (Python flushes it at each line);
    # the result, one line, waits in the stdout pipe until the end.
    for line in process.stderr:
        arrived = time.monotonic()
        lines.append(line.rstrip("\n"))
        for marker, times in seen.items():
            if marker in line:
                times.append(arrived)
    process.communicate(timeout=DEPLOY_TIMEOUT)
    ended = time.monotonic()
    if process.returncode != 0 or not all(seen.values()):
        said = "\n".join(lines)
        raise SystemExit(f"deploy {config_hash} failed ({process.returncode}):\n{said}")
    locked, launching, healthy, switched = seen.values()
    return Deploy(began, ended, min(locked), min(launching), max(healthy), max(switched))


def latencies(outcomes: Sequence[Outcome], since: float, until: float) -> list[float]:
    """Milliseconds each request took that started in [since, until), slow ones left out."""
    return sorted(
        (o.finished - o.started) * 1000
        for o in outcomes
        if o.kind != SLOW and since <= o.started < until
    )


def describe(run: Run) -> str:
    d = run.deploy
    return (
        f"{run.sent} requests through 3 proxies, {run.failed} failed "
        f"(answers by revision: {run.answered_by}); deploy {d.wall:.2f} s "
        f"(lock taken after {d.lead_in:.2f}, launch {d.launch_phase:.2f}, "
        f"switch {d.switch_phase:.2f}); "
        f"before: p50 {percentile(run.before, 50):.1f} ms, p99 {percentile(run.before, 99):.1f} "
        f"ms ({len(run.before)} requests); during: p50 {percentile(run.during, 50):.1f} ms, "
        f"p99 {percentile(run.during, 99):.1f} ms ({len(run.during)} requests)"
    )


def summary(runs: list[Run]) -> str:
    """The range over the runs of each figure."""

    def span(values: list[float], digits: int = 1) -> str:
        low, high = min(values), max(values)
        return f"{low:.{digits}f}" if low == high else f"{low:.{digits}f}-{high:.{digits}f}"

    rows = [
        ("requests sent", span([r.sent for r in runs], 0)),
        ("failed", span([r.failed for r in runs], 0)),
        ("deploy wall time, s", span([r.deploy.wall for r in runs], 2)),
        ("  lock taken after, s", span([r.deploy.lead_in for r in runs], 2)),
        ("  launch phase, s", span([r.deploy.launch_phase for r in runs], 2)),
        ("  switch phase, s", span([r.deploy.switch_phase for r in runs], 2)),
        ("p50 before, ms", span([percentile(r.before, 50) for r in runs])),
        ("p50 during, ms", span([percentile(r.during, 50) for r in runs])),
        ("p99 before, ms", span([percentile(r.before, 99) for r in runs])),
        ("p99 during, ms", span([percentile(r.during, 99) for r in runs])),
        ("requests before/during", ", ".join(f"{len(r.before)}/{len(r.during)}" for r in runs)),
    ]
    width = max(len(name) for name, _ in rows)
    return f"\nover {len(runs)} runs:\n" + "\n".join(f"{n:<{width}}  {v}" for n, v in rows)


if __name__ == "__main__":
    main()
