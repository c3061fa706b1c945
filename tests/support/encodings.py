"""Decoders of zstd, br and gzip for checking what a client of ``--compress`` receives."""

from __future__ import annotations

import zlib
from collections.abc import Callable

import brotli
import zstandard

ENCODINGS = ("zstd", "br", "gzip")


def decoder(encoding: str) -> Callable[[bytes], bytes]:
    """An incremental decoder of ``encoding``: call it with each piece received, it
    returns what that piece decodes to (a client decoding as it reads)."""
    if encoding == "gzip":
        return zlib.decompressobj(31).decompress
    if encoding == "br":
        process: Callable[[bytes], bytes] = brotli.Decompressor().process
        return process
    if encoding == "zstd":
        return zstandard.ZstdDecompressor().decompressobj().decompress
    raise ValueError(f"no decoder for {encoding!r}")


def decoded(encoding: str, data: bytes) -> bytes:
    """``data`` decoded whole; fails if it is not one complete stream of ``encoding``."""
    if encoding == "gzip":
        stream = zlib.decompressobj(31)
        plain = stream.decompress(data)
        assert stream.eof and not stream.unused_data, "a gzip stream cut short or followed by more"
        return plain
    if encoding == "br":
        decompressor = brotli.Decompressor()
        plain = decompressor.process(data)
        assert decompressor.is_finished(), "a br stream cut short"
        return bytes(plain)
    if encoding == "zstd":
        stream = zstandard.ZstdDecompressor().decompressobj()
        plain = stream.decompress(data)
        assert stream.eof and not stream.unused_data, "a zstd stream cut short or followed by more"
        return plain
    raise ValueError(f"no decoder for {encoding!r}")
