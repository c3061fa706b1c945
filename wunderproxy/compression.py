"""Compression of answers (``--compress``): which encodings this process can offer."""

from __future__ import annotations

import importlib.util
import logging

from wunderproxy.config import COMPRESS_ENCODINGS

log = logging.getLogger("wunderproxy.compression")

# The module each encoding needs; gzip's (zlib) is in the standard library.
_MODULES = {"zstd": "zstandard", "br": "brotli", "gzip": "zlib"}


def available_encodings() -> tuple[str, ...]:
    """The encodings of COMPRESS_ENCODINGS whose module is installed, best first.

    One that is missing is left out, and said so once at start-up with how to install it.
    """
    found = tuple(name for name in COMPRESS_ENCODINGS if importlib.util.find_spec(_MODULES[name]))
    missing = [name for name in COMPRESS_ENCODINGS if name not in found]
    if missing:
        log.warning(
            "--compress: %s not offered, its module is not installed; "
            "pip install 'wunderproxy[compress]' to offer it",
            " and ".join(missing),
        )
    return found
