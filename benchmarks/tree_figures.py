"""What one round of ``--workers`` figures costs, for ``/status`` and for ``/metrics``.

A worker with an hour of traffic over 3 revisions (3,000 requests a minute): the size of its
answer (``collect`` and pickle, as the channel sends it), and the supervisor's time to
unpickle N such answers and add them up, the best of 5 rounds.

    PYTHONPATH=$PWD python3 benchmarks/tree_figures.py
"""

from __future__ import annotations

import pickle
import random
import time

from wunderproxy.channel import TellFigures
from wunderproxy.state import Home, ProxyState
from wunderproxy.traffic import Traffic
from wunderproxy.treefigures import add_up, collect

MINUTES = 61
REQUESTS_A_MINUTE = 3000
REVISIONS = ("rev1", "rev2", "rev3")
STATUSES = (200, 200, 304, 404, 500, 502)
ROUNDS = 5


def busy_worker() -> ProxyState:
    """A worker's state after an hour of traffic (a fake clock, a fixed seed)."""
    rng = random.Random(1)
    now = [0.0]
    state = ProxyState("app", "v", Home("i", "bucket", "prefix"))
    state.traffic = Traffic(lambda: now[0])
    for minute in range(MINUTES):
        now[0] = minute * 60.0
        for _ in range(REQUESTS_A_MINUTE):
            state.traffic.record(
                rng.choice(REVISIONS), rng.choice(STATUSES), rng.expovariate(50), 100, 1000
            )
    return state


def main() -> None:
    state = busy_worker()
    for document, minutes in (("/status", True), ("/metrics", False)):
        answer = TellFigures(1, collect(state, minutes), minutes)
        data = pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL)
        for workers in (2, 64):
            best = float("inf")
            for _ in range(ROUNDS):
                began = time.perf_counter()
                add_up([pickle.loads(data).figures for _ in range(workers)])
                best = min(best, time.perf_counter() - began)
            print(
                f"{document}: {len(data)} bytes a worker; the supervisor, {workers} workers: "
                f"{best * 1e3:.1f} ms"
            )


if __name__ == "__main__":
    main()
