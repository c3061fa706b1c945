"""Which build runs: the pure-Python modules, or the hot path compiled with mypyc.

``WUNDERPROXY_COMPILE=1 pip install .`` (or ``-e .``) compiles the modules of
:data:`COMPILED` into extension modules (see ``setup.py``); without it every module is
plain Python. This module is the one list of them: ``setup.py`` loads this file by its path
(so it imports nothing but the standard library, and nothing of the package), and a
running process reports from it which build it runs (a start-up log line and ``/status``
``features.compiled``).

The import system prefers an extension module to the ``.py`` beside it, so a ``.py``
edited after it was compiled would silently not run. The build records the SHA-256 of
every source it compiled in :data:`SOURCES_FILE`, and :func:`check_build` (run when the
package is imported) refuses to start from compiled modules whose sources changed since,
or from a build that compiled only some of the list.

What mypy accepts but compiled code gets wrong (``tests/test_compiled.py`` runs the
proxy's tests on a compiled copy to catch it):

- mypyc trusts mypy's narrowing. ``if self._x is not y: return`` narrows ``self._x`` for
  the rest of the function, even past calls that set it to None; a later read of it then
  raises TypeError. Compare through a local (``x = self._x``) where calls follow.
- One type per name in a function: two ``except ... as exc`` clauses of different types
  need two names.
- Classes of these modules are native: their methods cannot be replaced at run time
  (monkeypatching), and they cannot derive from most built-in types but ``Exception``.
"""

from __future__ import annotations

import functools
import hashlib
import json
from importlib.machinery import EXTENSION_SUFFIXES
from importlib.util import find_spec
from pathlib import Path
from typing import Final

PACKAGE: Final = "wunderproxy"

#: The hot path: what every request runs through (framing, head readers, the forwarder
#: and its container connections, the counters), and every new connection (the listener,
#: --keep-upstream's rewrite). Modules named here must compile with
#: mypyc: no monkeypatching of their classes, no inheriting from most built-in types.
COMPILED: Final = (
    "fields",
    "cycle",
    "requesthead",
    "responsehead",
    "chunked",
    "framing",
    "forwarder",
    "upstream",
    "state",
    "traffic",
    "histogram",
    "keepupstream",
    "listeners",
)

#: mypyc compiles the modules as one group, whose shared library is the top-level module
#: ``wunderproxy__mypyc`` (beside the package, not in it).
GROUP: Final = PACKAGE

#: Written into the package by a compiled build: ``{module: SHA-256 of its source}``.
SOURCES_FILE: Final = "compiled-sources.json"

REBUILD: Final = (
    "rebuild it (WUNDERPROXY_COMPILE=1 pip install -e .), or go back to the pure-Python "
    "build (pip install -e . without the variable removes the compiled modules)"
)


class StaleBuild(ImportError):
    """The compiled modules do not match the sources beside them."""


def source_digest(path: Path) -> str:
    """The SHA-256 of a module's source, as the build records it."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def extension_modules(package_dir: Path) -> dict[str, Path]:
    """Every extension module in ``package_dir`` and its file: all of them, not only those
    of :data:`COMPILED` (one taken off the list since the build would still be imported
    in place of its ``.py``)."""
    found: dict[str, Path] = {}
    for path in package_dir.iterdir():
        # The first suffix that fits: EXTENSION_SUFFIXES lists ".cpython-311-...so" first.
        suffix = next((s for s in EXTENSION_SUFFIXES if path.name.endswith(s)), None)
        if suffix is not None:
            found[path.name.removesuffix(suffix)] = path
    return found


def _extension_paths() -> dict[str, Path]:
    return extension_modules(Path(__file__).resolve().parent)


@functools.cache
def is_compiled() -> bool:
    """True when this process runs the compiled hot path (:func:`check_build` ensures
    that it is all of :data:`COMPILED` or none of it)."""
    return bool(_extension_paths())


def describe() -> str:
    """Which build runs, for the start-up log."""
    if is_compiled():
        return f"compiled with mypyc ({len(COMPILED)} modules: {', '.join(COMPILED)})"
    return "pure Python (WUNDERPROXY_COMPILE=1 at install time compiles it)"


def check_build() -> None:
    """Raise :class:`StaleBuild`, saying what to do, when compiled modules would run
    other code than their ``.py`` sources, or when only some of :data:`COMPILED` are
    compiled; do nothing for a pure-Python build."""
    extensions = _extension_paths()
    if not extensions:
        return
    unlisted = sorted(name for name in extensions if name not in COMPILED)
    if unlisted:
        raise StaleBuild(
            f"{PACKAGE}: compiled modules that are not on the list any more "
            f"({', '.join(unlisted)}) would run in place of their .py files: {REBUILD}"
        )
    missing = [name for name in COMPILED if name not in extensions]
    if missing:
        raise StaleBuild(
            f"{PACKAGE}: the compiled build lacks {', '.join(missing)} (the list changed "
            f"since it was built, or the build is incomplete): {REBUILD}"
        )
    if find_spec(f"{GROUP}__mypyc") is None:
        raise StaleBuild(
            f"{PACKAGE}: the compiled build's shared library {GROUP}__mypyc is missing "
            f"(the compiled modules cannot load without it): {REBUILD}"
        )
    package_dir = next(iter(extensions.values())).parent
    try:
        recorded = json.loads((package_dir / SOURCES_FILE).read_text())
    except (OSError, ValueError) as error:
        raise StaleBuild(
            f"{PACKAGE}: compiled modules in {package_dir} without a readable record of "
            f"their sources ({SOURCES_FILE}: {error}), so they may not match the .py "
            f"files beside them: {REBUILD}"
        ) from None
    # A build shipped without its sources cannot be stale.
    changed = [
        name
        for name, extension in extensions.items()
        if (source := extension.with_name(f"{name}.py")).exists()
        and recorded.get(name) != source_digest(source)
    ]
    if changed:
        sources = ", ".join(f"{name}.py" for name in changed)
        it = "it was" if len(changed) == 1 else "they were"
        raise StaleBuild(
            f"{PACKAGE}: {sources} in {package_dir} changed after {it} compiled, and "
            f"Python imports the compiled modules first: they would run the old code; "
            f"{REBUILD}"
        )
