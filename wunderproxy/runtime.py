"""The event loop wunderproxy runs on, and the process settings that make it fast."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections.abc import Coroutine
from typing import Any, Literal

log = logging.getLogger("wunderproxy")

LoopChoice = Literal["auto", "asyncio", "uvloop"]

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Buffers of a proxied body are allocated and freed by the thousand per second. Above
# glibc's default thresholds (128 KiB, adjusted dynamically) each one may become an
# mmap/munmap pair or trim the heap, which made 1 MiB bodies run at a fraction of their
# speed; keeping them in the heap avoids that.
_MALLOC_THRESHOLD = 4 * 1024 * 1024


def tune_malloc() -> bool:
    """Raise glibc's mmap and trim thresholds; False where there is no glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(
        mallopt(_M_MMAP_THRESHOLD, _MALLOC_THRESHOLD)
        and mallopt(_M_TRIM_THRESHOLD, _MALLOC_THRESHOLD)
    )


def run_event_loop(main: Coroutine[Any, Any, None], loop: LoopChoice = "auto") -> None:
    """Run ``main`` on uvloop when installed (or asked for), else on asyncio's own loop."""
    tune_malloc()
    if loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if loop == "uvloop":
                raise
        else:
            log.debug("running on uvloop")
            uvloop.run(main)
            return
    asyncio.run(main)
