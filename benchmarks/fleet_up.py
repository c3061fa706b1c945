"""How long a fleet on this machine takes to come up, to serve, and to go away.

    python3 benchmarks/fleet_up.py [--runs 3] [--size 3]

Each run starts moto's S3 server and a fleet (tests/support/fleet.py: one registry per host
on one artifacts bucket, rev1 and rev2 built and pushed through the first registry, one
wunderproxy per host), launches and switches rev1 on every host, and tears it all down. It
prints the seconds of each step. Everything started is stopped by PID; the containers and
images it made are labelled and removed.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import uuid
from pathlib import Path

import docker

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.fleet import running_fleet
from tests.support.s3 import moto_server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size", type=int, default=3, help="hosts in the fleet")
    args = parser.parse_args()

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's line per request
    client = docker.from_env()
    labels = {"wunderproxy.test": f"bench-{uuid.uuid4().hex[:8]}"}
    for run in range(1, args.runs + 1):
        with moto_server() as endpoint, tempfile.TemporaryDirectory() as work:
            app = f"wp-bench-{uuid.uuid4().hex[:8]}"
            with running_fleet(Path(work), endpoint, client, app, labels, size=args.size) as fleet:
                began = time.monotonic()
                fleet.serve("rev1")
                served = time.monotonic() - began
                began = time.monotonic()
            gone = time.monotonic() - began
        steps = ", ".join(f"{step} {seconds:.2f}" for step, seconds in fleet.timings.items())
        print(
            f"run {run}: up ({steps}); rev1 launched and switched on {args.size} hosts "
            f"{served:.2f}; torn down {gone:.2f} (seconds)"
        )
    client.close()


if __name__ == "__main__":
    main()
