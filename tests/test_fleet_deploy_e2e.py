"""Deploys across a fleet, end to end: the client commands (``python -m wunderproxy upload|
deploy|rollback|history|status``) as an operator runs them from a workstation, against the
three wunderproxies of the ``fleet`` fixture (one Docker engine, a registry per host on one
artifacts bucket of moto's S3 server, one store), with load through all three proxies.

The commands find the hosts in ``WUNDERPROXY_HOSTS`` (or ``--host``) and the store through
the first host's ``/status``, as a workstation with nothing but the hosts' addresses would.
Each test brings up one fleet (about 8 s) and checks several things in turn.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.fleet import Fleet, FleetHost
from tests.support.load import (
    DEFAULT_MIX,
    ONE_OF_EACH_CONNECTION,
    LoadGenerator,
    Outcome,
    Worker,
    assert_no_failures,
    revision_of,
)
from tests.support.process import revision_served, run_cli
from tests.support.waiting import wait_until
from wunderproxy.client import deployer
from wunderproxy.deploylock import LOCK_KEY
from wunderproxy.engine import LABEL_REVISION
from wunderproxy.launchconfig import md5_hex
from wunderproxy.store import config_key

pytestmark = pytest.mark.e2e

# Every load run is bounded: it is stopped as soon as the test has seen what it needs,
# and would stop by itself after this long or this many requests through one proxy.
LOAD_SECONDS = 120.0
LOAD_REQUESTS = 20_000
ANSWERS_WANTED = 20  # requests each proxy answers before a deploy, and after it


@pytest.fixture
def workstation(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> Fleet:
    """The fleet, with ``WUNDERPROXY_HOSTS`` naming its three manager APIs in the
    environment the client commands inherit, as an operator's shell would."""
    monkeypatch.setenv("WUNDERPROXY_HOSTS", ",".join(host.api_url for host in fleet.hosts))
    return fleet


def upload_file(fleet: Fleet, path: Path, config: dict[str, Any]) -> str:
    """Write ``config`` to ``path`` as an operator would, ``wunderproxy upload`` it, and
    return the hash it printed, checked against the file's bytes and the store."""
    raw = (json.dumps(config, indent=2) + "\n").encode()
    path.write_bytes(raw)
    uploaded = run_cli("upload", str(path))
    assert uploaded.returncode == 0, uploaded.stderr
    config_hash = uploaded.stdout.strip()
    assert config_hash == md5_hex(raw)
    assert fleet.store.get(config_key(config_hash)) == raw
    return config_hash


def deploy(config_hash: str) -> subprocess.CompletedProcess[str]:
    deployed = run_cli("deploy", config_hash)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    return deployed


def container_revisions(fleet: Fleet, host: FleetHost) -> list[str]:
    """The revisions of every container, in any state, that ``host`` started."""
    return sorted(c.labels[LABEL_REVISION] for c in fleet.containers(host))


def wait_until_each_host_runs_only(fleet: Fleet, revision: str) -> None:
    wait_until(
        lambda: all(container_revisions(fleet, host) == [revision] for host in fleet.hosts),
        f"every host runs one container, of {revision} (the others drained and removed)",
        within=60,
    )


@contextlib.contextmanager
def load_through(fleet: Fleet, mix: tuple[Worker, ...]) -> Iterator[dict[str, LoadGenerator]]:
    """A bounded load generator through each host's proxy, all at once, by instance."""
    with contextlib.ExitStack() as stack:
        yield {
            host.instance: stack.enter_context(
                LoadGenerator(host.process.proxy_port, mix, LOAD_SECONDS, LOAD_REQUESTS)
            )
            for host in fleet.hosts
        }


def wait_for_answers(loads: dict[str, LoadGenerator], after: float = 0.0) -> None:
    """Wait until ANSWERS_WANTED requests started after ``after`` have come back (answered
    or failed) through every proxy."""
    wait_until(
        lambda: all(
            load.count(lambda o: o.started > after) >= ANSWERS_WANTED for load in loads.values()
        ),
        f"{ANSWERS_WANTED} requests through every proxy",
        within=60,
    )


def stop(loads: dict[str, LoadGenerator]) -> dict[str, list[Outcome]]:
    return {instance: load.stop() for instance, load in loads.items()}


def revisions(outcomes: list[Outcome], began: float, ended: float) -> tuple[set[str], set[str]]:
    """The revisions that answered the requests over before ``began``, and those that
    answered the requests started after ``ended``."""
    before = {revision_of(o) for o in outcomes if o.finished < began}
    after = {revision_of(o) for o in outcomes if o.started > ended}
    return before, after


def test_a_deploy_under_load_through_three_proxies_fails_no_request_and_leaves_v2_alone(
    workstation: Fleet, tmp_path: Path
) -> None:
    fleet = workstation
    v1 = upload_file(fleet, tmp_path / "v1.json", fleet.config("rev1"))
    v2 = upload_file(fleet, tmp_path / "v2.json", fleet.config("rev2"))
    deploy(v1)

    with load_through(fleet, DEFAULT_MIX) as loads:
        wait_for_answers(loads)
        began = time.monotonic()
        deployed = run_cli("deploy", v2)
        ended = time.monotonic()
        wait_for_answers(loads, after=ended)
        outcomes = stop(loads)

    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    assert deployed.stdout.startswith(f"deployed revision rev2 ({v2}) to 3 hosts: ")
    for host in fleet.hosts:
        name = f"{host.instance} ({host.api_url})"
        assert f"{name}: healthy: container " in deployed.stderr
        assert f"{name}: switched proxy to port " in deployed.stderr
    for instance, answered in outcomes.items():
        assert_no_failures(answered, instance)
        assert {o.kind for o in answered} == {"keep-alive", "new-connection", "slow", "post"}
        assert revisions(answered, began, ended) == ({"rev1"}, {"rev2"}), instance
    for host in fleet.hosts:
        assert revision_served(host.process) == "revision=rev2"
        status = host.process.status()
        assert list(status["requests"]["by_status"]) == ["200"], host.instance
        # Zero failures came from the switch itself, not from peers covering for a host.
        assert (status["fallback"]["sent"], status["fallback"]["received"]) == (0, 0)
    wait_until_each_host_runs_only(fleet, "rev2")

    table = run_cli("status")
    assert table.returncode == 0, table.stdout + table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split()[:3] == ["HOST", "INSTANCE", "REVISION"]
    expected = [[host.api_url, host.instance, "rev2"] for host in fleet.hosts]
    assert [row.split()[:3] for row in rows] == expected


def test_a_launch_failing_on_one_host_switches_none_names_it_and_status_flags_mixed_revisions(
    workstation: Fleet, tmp_path: Path
) -> None:
    fleet = workstation
    v1 = upload_file(fleet, tmp_path / "v1.json", fleet.config("rev1"))
    v2 = upload_file(fleet, tmp_path / "v2.json", fleet.config("rev2"))
    deploy(v1)
    web2 = fleet.host("web-2")
    # web-2 never pulled rev2 (its image names web-2's own registry): its launch must pull.
    web2.registry.stop()

    with load_through(fleet, ONE_OF_EACH_CONNECTION) as loads:
        wait_for_answers(loads)
        failed = run_cli("deploy", v2)
        outcomes = stop(loads)

    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert f"launch of {v2} failed on 1 of 3 hosts; nothing was switched anywhere" in (
        failed.stderr
    )
    named = [line for line in failed.stderr.splitlines() if line.startswith("  web-")]
    assert len(named) == 1, failed.stderr
    assert named[0].startswith(f"  web-2 ({web2.api_url}): 502: ")
    assert f"registry at {web2.registry.address} is unreachable" in named[0]
    for instance, answered in outcomes.items():
        assert_no_failures(answered, instance)
        assert {revision_of(o) for o in answered} == {"rev1"}, instance
    for host in fleet.hosts:
        assert revision_served(host.process) == "revision=rev1"
        assert container_revisions(fleet, host) == ["rev1"], f"rev2 left on {host.instance}"
    assert fleet.store.get(LOCK_KEY) is None

    web2.registry.start()
    deploy(v2)
    assert [revision_served(host.process) for host in fleet.hosts] == ["revision=rev2"] * 3
    wait_until_each_host_runs_only(fleet, "rev2")

    # web-1 alone back on rev1 through its own API: the fleet serves two revisions.
    web1 = fleet.host("web-1")
    assert web1.process.launch(v1).status == 200
    assert web1.process.switch(v1).status == 200
    hosts = [arg for host in fleet.hosts for arg in ("--host", host.api_url)]
    mixed = run_cli("status", *hosts)
    assert mixed.returncode == 1, mixed.stdout + mixed.stderr
    assert "hosts serve different revisions: rev1 on web-1; rev2 on web-2, web-3" in mixed.stdout


def test_a_deploy_holding_the_lock_refuses_another_history_lists_both_and_rollback_restores_v1(
    workstation: Fleet, tmp_path: Path
) -> None:
    fleet = workstation
    v1 = upload_file(fleet, tmp_path / "v1.json", fleet.config("rev1"))
    # rev2 turns healthy only once the test opens the gate, a file the app then serves: its
    # deploy holds the lock until then.
    gate = tmp_path / "gate"
    gate.mkdir()
    gated = fleet.config(
        "rev2",
        HostConfig={"Init": True, "Binds": [f"{gate}:/www/gate:ro"]},
        HealthCheckPath="/gate/open",
    )
    v2 = upload_file(fleet, tmp_path / "v2.json", gated)
    deploy(v1)

    holder = subprocess.Popen(
        [sys.executable, "-m", "wunderproxy", "deploy", v2],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: fleet.store.get(LOCK_KEY) is not None, "the rev2 deploy holds the lock")
        refused = run_cli("deploy", v1)
        (gate / "open").write_text("ok\n")
        _, holder_stderr = holder.communicate(timeout=120)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()

    assert refused.returncode == 1, refused.stdout + refused.stderr
    where = f"s3://{fleet.store_bucket}/{fleet.prefix}"
    assert f"deploy.lock in {where} is held by {deployer()} (pid {holder.pid})" in (refused.stderr)
    assert holder.returncode == 0, holder_stderr
    assert [revision_served(host.process) for host in fleet.hosts] == ["revision=rev2"] * 3

    listed = run_cli("history")
    assert listed.returncode == 0, listed.stderr
    _, newest, oldest = listed.stdout.splitlines()
    assert newest.split()[1:] == ["rev2", v2, deployer()]
    assert oldest.split()[1:] == ["rev1", v1, deployer()]

    with load_through(fleet, ONE_OF_EACH_CONNECTION) as loads:
        wait_for_answers(loads)
        began = time.monotonic()
        rolled = run_cli("rollback")
        ended = time.monotonic()
        wait_for_answers(loads, after=ended)
        outcomes = stop(loads)

    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    assert f"rolling back to revision rev1 ({v1})" in rolled.stderr
    for instance, answered in outcomes.items():
        assert_no_failures(answered, instance)
        assert revisions(answered, began, ended) == ({"rev2"}, {"rev1"}), instance
    assert [revision_served(host.process) for host in fleet.hosts] == ["revision=rev1"] * 3
    wait_until_each_host_runs_only(fleet, "rev1")
    after = run_cli("history").stdout.splitlines()
    assert [row.split()[1] for row in after[1:]] == ["rev1", "rev2", "rev1"]
