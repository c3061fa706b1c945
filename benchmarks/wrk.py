"""Run ``wrk`` (Debian's) and read its report into numbers."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from typing import Any

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


@dataclass(frozen=True)
class WrkResult:
    """One wrk run: counts, rates and latency percentiles in milliseconds."""

    requests: int
    seconds: float
    requests_per_second: float
    bytes_per_second: float
    socket_errors: int
    timeouts: int
    non_2xx_3xx: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    @property
    def failed(self) -> int:
        """Requests that got no answer or an answer outside 2xx/3xx."""
        return self.socket_errors + self.non_2xx_3xx

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"failed": self.failed}


def run_wrk(
    url: str,
    seconds: float,
    connections: int,
    threads: int = 1,
    cpu: int | None = None,
    extra: tuple[str, ...] = (),
) -> WrkResult:
    """Run wrk against ``url`` for ``seconds`` (bounded: it stops by itself)."""
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: bash .ci/setup wrk (or apt-get install wrk)")
    command = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds:g}s",
        "--timeout",
        "5s",
        "--latency",
        *extra,
        url,
    ]
    if cpu is not None:
        command = ["taskset", "-c", str(cpu), *command]
    output = subprocess.run(
        command, capture_output=True, text=True, check=True, timeout=seconds + 60
    ).stdout
    return parse_wrk(output)


def parse_wrk(output: str) -> WrkResult:
    """Read wrk's text report (with ``--latency``)."""
    done = re.search(r"(\d+) requests in ([\d.]+)(\w+),", output)
    if done is None:
        raise ValueError(f"not a wrk report:\n{output}")
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    connect, read, write, timeouts = (int(n) for n in errors.groups()) if errors else (0,) * 4
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    transfer = re.search(r"Transfer/sec:\s+([\d.]+)(\w+)", output)
    return WrkResult(
        requests=int(done.group(1)),
        seconds=_seconds(float(done.group(2)), done.group(3)),
        requests_per_second=float(rate.group(1)) if rate else 0.0,
        bytes_per_second=_bytes(float(transfer.group(1)), transfer.group(2)) if transfer else 0.0,
        socket_errors=connect + read + write + timeouts,
        timeouts=timeouts,
        non_2xx_3xx=int(non_2xx.group(1)) if non_2xx else 0,
        p50_ms=_percentile(output, "50"),
        p90_ms=_percentile(output, "90"),
        p99_ms=_percentile(output, "99"),
        max_ms=_latency(*re.findall(r"Latency\s+\S+\s+\S+\s+([\d.]+)(\w+)", output)[0]),
    )


def _percentile(output: str, which: str) -> float:
    found = re.search(rf"^\s+{which}%\s+([\d.]+)(\w+)", output, re.MULTILINE)
    return _latency(found.group(1), found.group(2)) if found else float("nan")


def _latency(value: str, unit: str) -> float:
    return float(value) * _UNITS[unit]


def _seconds(value: float, unit: str) -> float:
    return value * {"ms": 1e-3, "s": 1.0, "m": 60.0}[unit]


def _bytes(value: float, unit: str) -> float:
    return value * {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}[unit]
