"""The compiled build (``WUNDERPROXY_COMPILE=1``), tested as the pure one is.

A copy of the tree is compiled with mypyc by ``setup.py`` (what ``pip install -e .``
runs), then a child pytest runs the proxy's tests on it: the framing, the head and
chunked readers, the forwarder in process (limits, timeouts, kept container connections,
spares) and ``wunderproxy run`` processes against the real Docker engine. The child fails
unless the compiled modules were the ones imported, there and in those processes (see
``tests/support/build.py``). Building takes about a minute here, the child run under two.

Left out, to keep this near four minutes on two cores: the longer files (response
buffering, deploys, switches under load, fuzzing through processes), which run the same
compiled modules through the same paths as the files below (``test_response_buffering``
passes compiled too). No file needed a seam to run compiled: what they monkeypatch is
outside the compiled list.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.build import VARIABLE
from wunderproxy import native

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[1]
BUILD_TIMEOUT = 900.0
RUN_TIMEOUT = 1200.0

CHILD_TESTS = [
    "tests/test_framing.py",
    "tests/test_requesthead.py",
    "tests/test_responsehead.py",
    "tests/test_smuggling.py",
    "tests/test_proxy.py",
    "tests/test_keepupstream.py",
    "tests/test_keepupstream_proxy.py",
    "tests/test_timeouts.py",
    "tests/test_spares.py",
    "tests/test_compression_proxy.py",
    "tests/test_request_buffering.py",
    "tests/test_forwarded_proxy.py",
    "tests/test_traffic.py",
    "tests/test_histogram.py",
    "tests/test_limits_e2e.py",
    "tests/test_listeners.py",
]


def copy_tree(destination: Path, source: Path = ROOT) -> Path:
    """What the build and the tests need of ``source``, without anything compiled."""
    ignore = shutil.ignore_patterns("__pycache__", "*.so", native.SOURCES_FILE, ".*")
    for directory in ("wunderproxy", "tests", "benchmarks"):
        shutil.copytree(source / directory, destination / directory, ignore=ignore)
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(source / name, destination / name)
    return destination


def run(tree: Path, *command: str, timeout: float, **env: str) -> subprocess.CompletedProcess[str]:
    """``python COMMAND`` in ``tree``, importing wunderproxy from there."""
    return subprocess.run(
        [sys.executable, *command],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def tail(result: subprocess.CompletedProcess[str], lines: int = 60) -> str:
    return "\n".join((result.stdout + result.stderr).splitlines()[-lines:])


def extension_modules(tree: Path) -> list[str]:
    return sorted(path.name.split(".")[0] for path in (tree / "wunderproxy").glob("*.so"))


@pytest.fixture(scope="module")
def compiled_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tree, its hot path compiled in place."""
    tree = copy_tree(tmp_path_factory.mktemp("compiled"))
    built = run(
        tree, "setup.py", "build_ext", "--inplace", timeout=BUILD_TIMEOUT, WUNDERPROXY_COMPILE="1"
    )
    if built.returncode != 0:
        pytest.fail(
            f"the compiled build failed (exit {built.returncode}; it needs gcc, the Python "
            f"headers and mypy as pyproject.toml's compile extra names it):\n{tail(built)}"
        )
    return tree


def test_the_build_compiles_every_module_of_the_list(compiled_tree: Path) -> None:
    assert extension_modules(compiled_tree) == sorted(native.COMPILED)
    assert list(compiled_tree.glob(f"{native.GROUP}__mypyc.*.so")), "no shared library"
    recorded = (compiled_tree / "wunderproxy" / native.SOURCES_FILE).read_text()
    for name in native.COMPILED:
        digest = native.source_digest(compiled_tree / "wunderproxy" / f"{name}.py")
        assert digest in recorded, f"{name}.py's digest is not recorded"


def test_the_proxy_tests_pass_on_the_compiled_build(compiled_tree: Path) -> None:
    result = run(
        compiled_tree,
        *("-m", "pytest", "-q", "-p", "no:cacheprovider", *CHILD_TESTS),
        timeout=RUN_TIMEOUT,
        **{VARIABLE: "compiled"},
    )
    assert result.returncode == 0, f"the compiled run failed:\n{tail(result)}"
    summary = result.stdout.strip().splitlines()[-1]
    # Every test ran: a skip would hide a module that does not work compiled.
    assert re.fullmatch(r"=* ?\d+ passed in .*", summary), summary


def test_a_source_edited_after_the_build_stops_the_import_saying_what_to_do(
    compiled_tree: Path, tmp_path: Path
) -> None:
    tree = shutil.copytree(compiled_tree, tmp_path / "edited", symlinks=True)
    with (tree / "wunderproxy" / "forwarder.py").open("a") as source:
        source.write("# edited after the build\n")

    result = run(tree, "-c", "import wunderproxy.forwarder", timeout=60)

    assert result.returncode != 0
    assert "StaleBuild: wunderproxy: forwarder.py in" in result.stderr
    assert "changed after it was compiled" in result.stderr
    assert "WUNDERPROXY_COMPILE=1 pip install -e ." in result.stderr


def test_the_pure_build_removes_what_the_compiled_one_left(
    compiled_tree: Path, tmp_path: Path
) -> None:
    tree = shutil.copytree(compiled_tree, tmp_path / "pure", symlinks=True)

    # setup.py runs this way for every pip command, `pip install -e .` included.
    result = run(tree, "setup.py", "--name", timeout=120)

    assert result.returncode == 0, tail(result)
    assert "pure-Python build: removing wunderproxy/forwarder." in result.stderr
    assert extension_modules(tree) == []
    assert not list(tree.glob("*.so"))
    assert not (tree / "wunderproxy" / native.SOURCES_FILE).exists()
    check = (
        "from wunderproxy import forwarder, native; print(native.is_compiled(), forwarder.__file__)"
    )
    imported = run(tree, "-c", check, timeout=60)
    assert imported.stdout.split() == ["False", str(tree / "wunderproxy" / "forwarder.py")]


def test_a_module_taken_off_the_list_is_refused_then_removed_by_the_pure_build(
    compiled_tree: Path, tmp_path: Path
) -> None:
    tree = shutil.copytree(compiled_tree, tmp_path / "unlisted", symlinks=True)
    native_py = tree / "wunderproxy" / "native.py"
    native_py.write_text(native_py.read_text().replace('    "listeners",\n', "", 1))

    result = run(tree, "-c", "import wunderproxy.listeners", timeout=60)

    assert result.returncode != 0
    assert "StaleBuild: wunderproxy: compiled modules that are not on the list" in result.stderr
    assert "(listeners) would run in place of their .py files" in result.stderr
    cleaned = run(tree, "setup.py", "--name", timeout=120)
    assert cleaned.returncode == 0, tail(cleaned)
    assert extension_modules(tree) == []
    imported = run(tree, "-c", "import wunderproxy.listeners as m; print(m.__file__)", timeout=60)
    assert imported.stdout.split() == [str(tree / "wunderproxy" / "listeners.py")]


def test_a_build_without_its_shared_library_is_refused_saying_what_to_do(
    compiled_tree: Path, tmp_path: Path
) -> None:
    tree = shutil.copytree(compiled_tree, tmp_path / "no-library", symlinks=True)
    for library in tree.glob(f"{native.GROUP}__mypyc.*.so"):
        library.unlink()

    result = run(tree, "-c", "import wunderproxy", timeout=60)

    assert result.returncode != 0
    assert f"shared library {native.GROUP}__mypyc is missing" in result.stderr
    assert "WUNDERPROXY_COMPILE=1 pip install -e ." in result.stderr
