"""benchmarks/product.py, the suite's end-to-end scenario, still runs: wunderproxy started by
its CLI before a real container in both network modes, beside nginx, for a second a run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest

from benchmarks import product
from tests.support.docker import labelled_containers
from tests.support.process import end_by_sigterm

PRODUCT = Path(__file__).resolve().parents[1] / "benchmarks" / "product.py"
TARGETS = {"direct", "nginx", "wunderproxy-w1", "wunderproxy-w2"}
RUN_TIMEOUT = 400  # seconds; it took about 40 here while others ran tests


@pytest.mark.e2e
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
        # SIGTERM first, not the SIGKILL of subprocess.run: the benchmark removes what it
        # started; SIGKILL only if it ignores that for 120 s.
        output = end_by_sigterm(benchmark, grace=120)
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


CONTAINER = "c" * 64


def test_wunderproxies_that_all_serve_the_one_running_container_pass_the_adoption_check() -> None:
    assert product.adoption_problem([CONTAINER], {"w1": CONTAINER, "w2": CONTAINER}) is None


@pytest.mark.parametrize(
    ("running", "serving", "problem"),
    [
        ([CONTAINER, "d" * 64], {"w1": CONTAINER}, "2 containers of the app run, not 1"),
        ([], {"w1": None}, "0 containers of the app run, not 1"),
        (
            [CONTAINER],
            {"w1": CONTAINER, "w2": "d" * 64, "w3": None},
            f"not every wunderproxy adopted container {CONTAINER[:12]}: w2 serves "
            f"{'d' * 64}, w3 serves None",
        ),
    ],
)
def test_a_second_container_or_a_wunderproxy_serving_another_fails_the_adoption_check(
    running: list[str], serving: dict[str, str | None], problem: str
) -> None:
    found = product.adoption_problem(running, serving)

    assert found is not None
    assert found.startswith(problem)


@pytest.mark.e2e
def test_the_benchmarks_clean_up_runs_every_step_although_one_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, docker_client: docker.DockerClient
) -> None:
    steps: list[str] = []
    monkeypatch.setattr(docker_client, "close", lambda: steps.append("close"))
    monkeypatch.setattr(product.docker, "from_env", lambda: docker_client)
    registries: list[subprocess.Popen[bytes]] = []
    real_start_registry = product.start_registry

    def start_registry(*args: Any) -> subprocess.Popen[bytes]:
        registries.append(real_start_registry(*args))
        return registries[-1]

    def remove_containers(client: docker.DockerClient, label: str) -> None:
        steps.append("remove_containers")
        raise docker.errors.APIError("the engine failed removing containers")

    # The image is not needed here: the registry, the client and the clean-up are real.
    monkeypatch.setattr(product, "start_registry", start_registry)
    monkeypatch.setattr(product, "build_nginx_image", lambda *args: None)
    monkeypatch.setattr(product, "push_image", lambda *args: None)
    monkeypatch.setattr(product, "remove_containers", remove_containers)
    monkeypatch.setattr(product, "remove_images", lambda *args: steps.append("remove_images"))

    with pytest.raises(docker.errors.APIError) as caught, product.bench_image(tmp_path):
        raise RuntimeError("the run failed")

    assert steps == ["remove_containers", "remove_images", "close"]
    [registry] = registries
    assert registry.poll() is not None, "the registry was left running"
    # The run's own error is kept as the cause of what the clean-up raised.
    assert isinstance(caught.value.__context__, RuntimeError)


def test_a_benchmark_that_ignores_sigterm_is_killed_once_its_grace_is_over() -> None:
    stubborn = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "print('ignoring SIGTERM', flush=True)\n"
            "time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert stubborn.stdout is not None
        assert stubborn.stdout.readline() == "ignoring SIGTERM\n"  # the handler is in place
        output = end_by_sigterm(stubborn, grace=0.5)
    finally:
        if stubborn.poll() is None:  # only if the helper failed: leave nothing behind
            stubborn.kill()
            stubborn.wait()
    assert stubborn.returncode == -signal.SIGKILL
    assert output == ""
