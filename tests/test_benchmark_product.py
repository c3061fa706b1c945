"""benchmarks/product.py, the suite's end-to-end scenario, still runs: wunderproxy started by
its CLI before a real container in both network modes, beside nginx, for a second a run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import docker
import pytest

from tests.support.docker import labelled_containers

pytestmark = pytest.mark.e2e

PRODUCT = Path(__file__).resolve().parents[1] / "benchmarks" / "product.py"
TARGETS = {"direct", "nginx", "wunderproxy-w1", "wunderproxy-w2"}
RUN_TIMEOUT = 400  # seconds; it took about 40 here while others ran tests


def test_the_product_benchmark_measures_every_target_in_both_modes_and_cleans_up(
    tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    figures_path = tmp_path / "product.json"
    options = ["--seconds", "1", "--warmup", "0", "--only", "small-keepalive"]
    benchmark = subprocess.Popen(
        [sys.executable, str(PRODUCT), *options, "--json", str(figures_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = benchmark.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        # SIGTERM, not the SIGKILL of subprocess.run: the benchmark removes what it started.
        benchmark.terminate()
        output, _ = benchmark.communicate(timeout=120)
        pytest.fail(f"the product benchmark took more than {RUN_TIMEOUT} s:\n{output}")
    assert benchmark.returncode == 0, output
    figures = json.loads(figures_path.read_text())
    for mode in ("bridge", "host"):
        measured = figures["modes"][mode]["scenarios"]["small-keepalive"]
        assert measured.keys() == TARGETS, mode
        for target, figure in measured.items():
            assert figure["error"] is None, (mode, target, figure)
            assert figure["wrk"]["requests"] > 0, (mode, target)
            assert figure["errors"] == 0, (mode, target, figure)
            assert figure["cpu_us_per_request"] > 0, (mode, target)
            # Only a published port is served by Docker's userland proxy, for every target.
            hop = figure.get("docker-proxy_cpu_us_per_request")
            assert (hop is not None and hop > 0) if mode == "bridge" else hop is None, (
                mode,
                target,
                figure,
            )
    [(key, value)] = figures["labels"].items()
    assert labelled_containers(docker_client, f"{key}={value}") == []
    assert docker_client.images.list(filters={"label": f"{key}={value}"}) == []
