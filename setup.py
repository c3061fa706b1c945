"""The optional compiled build; everything else about the package is in pyproject.toml.

``WUNDERPROXY_COMPILE=1 pip install .`` (or ``-e .``) compiles the hot path listed in
``wunderproxy/native.py`` with mypyc. mypy reaches the isolated build environment as a
setup requirement: setuptools' PEP 517 backend answers pip's
``get_requires_for_build_wheel`` (and ``..._editable``) with it, at the version range of
pyproject.toml's ``compile`` extra, before this file runs again to build. With
``--no-build-isolation`` it must be installed beforehand.

Without the variable nothing is compiled, and no compiler or mypy is needed; the compiled
modules an earlier compiled build left in the source tree are removed, because Python
imports them before the ``.py`` files beside them (an editable install would keep running
them).
"""

from __future__ import annotations

import json
import os
import sys
import tomllib
from importlib.machinery import EXTENSION_SUFFIXES
from importlib.util import module_from_spec, spec_from_file_location
from pathlib import Path
from types import ModuleType
from typing import Any

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
VARIABLE = "WUNDERPROXY_COMPILE"


def load_native() -> ModuleType:
    """``wunderproxy/native.py`` by its path: importing the package would need its
    dependencies, which the build environment does not have."""
    spec = spec_from_file_location("wunderproxy_native", ROOT / "wunderproxy" / "native.py")
    assert spec is not None and spec.loader is not None
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def wants_compiled() -> bool:
    value = os.environ.get(VARIABLE, "")
    if value not in ("", "0", "1"):
        sys.exit(f"{VARIABLE}={value!r}: set it to 1 to compile the hot path, or 0 (or unset)")
    return value == "1"


def mypy_requirement() -> list[str]:
    with (ROOT / "pyproject.toml").open("rb") as pyproject:
        return list(tomllib.load(pyproject)["project"]["optional-dependencies"]["compile"])


def compiled_build(native: ModuleType) -> dict[str, Any]:
    """setup()'s arguments for the compiled build.

    When pip first asks the backend what the build requires, mypy is not there yet:
    then setup_requires names it, and setuptools hands that to pip without building. A
    build that still lacks it (``--no-build-isolation``) stops with what to do.
    """
    requirement = mypy_requirement()
    try:
        from mypyc.build import mypycify
    except ImportError as error:
        return {
            "setup_requires": requirement,
            "cmdclass": {
                "build_py": refusal(
                    f"{VARIABLE}=1 needs mypyc at build time ({error}): "
                    f"let pip install it into its isolated build environment (do not pass "
                    f"--no-build-isolation), or install {' '.join(map(repr, requirement))} first"
                )
            },
        }
    package = ROOT / "wunderproxy"
    sources = {name: package / f"{name}.py" for name in native.COMPILED}
    # mypyc names modules after paths relative to the working directory. The compiled
    # modules import only the standard library and the package, but the package's other
    # modules import its dependencies, which the build environment need not have: their
    # errors are not the build's (``mypy --strict wunderproxy`` checks them).
    paths = [os.path.relpath(path) for path in sources.values()]
    options = ["--follow-imports=silent"]
    extensions = mypycify([*options, *paths], opt_level="3", group_name=native.GROUP)
    record = {name: native.source_digest(path) for name, path in sources.items()}
    (package / native.SOURCES_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return {"setup_requires": requirement, "ext_modules": extensions}


def refusal(message: str) -> type[build_py]:
    """A build_py command that stops the build with ``message``."""

    class Refuse(build_py):
        def run(self) -> None:
            sys.exit(message)

    return Refuse


def remove_compiled(native: ModuleType) -> None:
    """Remove what a compiled build left in the source tree, saying so."""
    package = ROOT / "wunderproxy"
    # Every extension module there, on the list or not any more (see native.check_build).
    leftovers = [
        package / native.SOURCES_FILE,
        *native.extension_modules(package).values(),
        *(ROOT / f"{native.GROUP}__mypyc{suffix}" for suffix in EXTENSION_SUFFIXES),
    ]
    for path in leftovers:
        if path.exists():
            print(f"pure-Python build: removing {path.relative_to(ROOT)}", file=sys.stderr)
            path.unlink()


native = load_native()
if wants_compiled():
    setup(**compiled_build(native))
else:
    remove_compiled(native)
    setup()
