"""Which build of wunderproxy the tests run.

The suite runs the pure-Python build. ``tests/test_compiled.py`` runs part of it again in
a child pytest on a compiled copy, with ``WUNDERPROXY_TEST_BUILD=compiled``: there this
plugin fails the run unless the compiled modules were imported, and the ``wunderproxy``
processes the tests start must say so in ``/status`` ``features.compiled``.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from wunderproxy import native

VARIABLE = "WUNDERPROXY_TEST_BUILD"


def expects_compiled() -> bool:
    """True in the compiled copy's run."""
    return os.environ.get(VARIABLE) == "compiled"


def pytest_configure(config: pytest.Config) -> None:
    if native.is_compiled() == expects_compiled():
        return
    if expects_compiled():
        raise pytest.UsageError(
            f"{VARIABLE}=compiled, but wunderproxy's hot path is imported as Python here; "
            "PYTHONPATH must lead to the compiled copy"
        )
    raise pytest.UsageError(
        "the suite runs the pure-Python build, but this wunderproxy is compiled "
        f"({native.describe()}): reinstall it with `pip install -e .` (without "
        "WUNDERPROXY_COMPILE); tests/test_compiled.py tests a compiled copy by itself"
    )


def assert_process_build(status: dict[str, Any], log: str) -> None:
    """A wunderproxy process runs the build the tests run, by its ``/status`` and by its
    start-up log, where the build's line comes before the one saying that it listens.

    In a take-over, ``/status`` may come from the process it replaces (same ports), whose
    build is the same; this one's log then has no such lines yet.
    """
    compiled = status["features"]["compiled"]
    assert compiled is expects_compiled(), f"/status features.compiled is {compiled}"
    if " for app " in log:
        line = "hot path: compiled with mypyc (" if compiled else "hot path: pure Python ("
        assert line in log, f"no {line!r} line in its log:\n{log}"
