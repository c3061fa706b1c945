"""Incremental encoders for ``--compress``: one answer's body in, chunks of zstd, br or gzip out.

Sans-IO: :class:`AnswerEncoder` is fed the container's body as it arrives (de-chunked if the
container sent it chunked) and hands back chunk-framed compressed bytes, flushed at every
container read, so that a streamed answer (``text/event-stream``, a slow chunked one)
reaches the client as it comes; the last chunk follows the end.

Levels are a proxy's: fast, since every answer is compressed as it passes, with no cache
behind. Measured on 100 KiB of API-like JSON, source code and HTML, read 64 KiB at a time
and flushed after each read (``python3 benchmarks/compression.py``; the README has the
figures):

- ``zstd`` level 3 (the library's default): by far the cheapest (2-5 us per KiB) for about
  gzip 5's ratio. Its hash tables at 64 and 32 K entries and a 512 KiB window instead of
  128/64 K and 2 MiB: the same output on these samples, in 0.55 MiB per answer in flight
  instead of 0.94;
- ``br`` quality 4: about gzip 5's ratio (1 % worse to 4 % better) for 55-80 % of its
  CPU; quality 5 sends 5-8 % less for twice the CPU and memory. A 256 KiB window
  (``lgwin`` 18): larger ones gained nothing on these answers;
- ``gzip`` level 5: level 4 sends 4-11 % more; level 6 costs up to a quarter more CPU
  for 2-5 % less.
"""

from __future__ import annotations

import zlib
from typing import Protocol

from wunderproxy.chunked import LAST_CHUNK, ChunkedData, chunk

GZIP_LEVEL = 5
BROTLI_QUALITY = 4
BROTLI_LGWIN = 18
ZSTD_LEVEL = 3
ZSTD_WINDOW_LOG = 19
ZSTD_HASH_LOG = 16
ZSTD_CHAIN_LOG = 15

# Bytes of one read from which it is compressed on a worker thread: 0.3-0.4 ms of
# compressing at the levels above, two to four times what the trip to a worker thread and
# back costs (0.1-0.2 ms). Below the line the trip would cost as much as it saves the loop;
# above it the loop would stall every other connection for longer. (Measured by
# benchmarks/compression.py; see the README's "Compression".)
OFF_LOOP_BYTES = {"zstd": 128 * 1024, "br": 32 * 1024, "gzip": 32 * 1024}


class Compressor(Protocol):
    """One compressed stream (zlib's, brotli's and zstandard's objects, made alike)."""

    def compress(self, data: bytes) -> bytes:
        """Take ``data``; may hand back some output, or none yet."""

    def flush(self) -> bytes:
        """Everything taken so far, decodable now (the stream goes on)."""

    def finish(self) -> bytes:
        """The rest of the stream, and its end."""


class _Gzip:
    __slots__ = ("_stream",)

    def __init__(self) -> None:
        # wbits 31: a gzip header and trailer (16) around a 32 KiB deflate window (15).
        self._stream = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)

    def compress(self, data: bytes) -> bytes:
        return self._stream.compress(data)

    def flush(self) -> bytes:
        return self._stream.flush(zlib.Z_SYNC_FLUSH)

    def finish(self) -> bytes:
        return self._stream.flush(zlib.Z_FINISH)


class _Brotli:
    __slots__ = ("_stream",)

    def __init__(self) -> None:
        import brotli  # an optional module: imported when first offered

        self._stream = brotli.Compressor(quality=BROTLI_QUALITY, lgwin=BROTLI_LGWIN)

    def compress(self, data: bytes) -> bytes:
        output: bytes = self._stream.process(data)
        return output

    def flush(self) -> bytes:
        output: bytes = self._stream.flush()
        return output

    def finish(self) -> bytes:
        output: bytes = self._stream.finish()
        return output


class _Zstd:
    __slots__ = ("_stream", "_zstandard")

    def __init__(self) -> None:
        import zstandard  # an optional module: imported when first offered

        parameters = zstandard.ZstdCompressionParameters.from_level(
            ZSTD_LEVEL,
            window_log=ZSTD_WINDOW_LOG,
            hash_log=ZSTD_HASH_LOG,
            chain_log=ZSTD_CHAIN_LOG,
        )
        # A compressor per answer: one compressobj at a time may use a ZstdCompressor.
        compressor = zstandard.ZstdCompressor(compression_params=parameters)
        self._stream = compressor.compressobj()
        self._zstandard = zstandard

    def compress(self, data: bytes) -> bytes:
        return self._stream.compress(data)

    def flush(self) -> bytes:
        return self._stream.flush(self._zstandard.COMPRESSOBJ_FLUSH_BLOCK)

    def finish(self) -> bytes:
        return self._stream.flush(self._zstandard.COMPRESSOBJ_FLUSH_FINISH)


_COMPRESSORS: dict[str, type[Compressor]] = {"zstd": _Zstd, "br": _Brotli, "gzip": _Gzip}


def new_compressor(encoding: str) -> Compressor:
    """A new stream of ``encoding`` (zstd, br or gzip) at the levels above."""
    return _COMPRESSORS[encoding]()


class AnswerEncoder:
    """Compresses one answer's body into chunks, one container read at a time.

    For each read: :meth:`take` its body bytes (and :meth:`end` if the answer ended in
    it), then :meth:`encode` hands back what goes to the client; or, off the loop,
    :meth:`compress` what :meth:`held` hands over. ``head`` is the answer's head as
    rewritten for the encoding (see :mod:`wunderproxy.compression`).
    """

    __slots__ = (
        "_compressor",
        "_data",
        "_ended",
        "_taken",
        "_unchunk",
        "busy",
        "encoding",
        "head",
        "waiting",
    )

    def __init__(self, encoding: str, head: bytes, chunked: bool) -> None:
        self.encoding = encoding
        self.head = head
        # Compressing on a worker thread: the container's reads that come meanwhile
        # wait here, in order, for their turn.
        self.busy = False
        self.waiting: list[bytes] = []
        self._compressor = new_compressor(encoding)
        self._unchunk = ChunkedData() if chunked else None
        self._data: list[bytes] = []  # body bytes taken since the last encode
        self._taken = 0  # their length
        self._ended = False

    def take(self, body: bytes) -> None:
        """The next bytes of the container's body, as framed on its connection."""
        if self._unchunk is not None:
            body = self._unchunk.feed(body)
        if body:
            self._data.append(body)
            self._taken += len(body)

    def end(self) -> None:
        """The body ended (its last bytes were taken)."""
        self._ended = True

    @property
    def off_loop(self) -> bool:
        """True when the body taken since the last :meth:`encode` is large enough that
        compressing it on the event loop would stall every other connection."""
        return self._taken >= OFF_LOOP_BYTES[self.encoding]

    def encode(self) -> bytes:
        """What goes to the client for the body taken since the last call (see
        :meth:`compress`)."""
        return self.compress(self.held())

    def held(self) -> bytes:
        """The body taken since the last call, handed over to be compressed."""
        data, self._data, self._taken = self._data, [], 0
        return data[0] if len(data) == 1 else b"".join(data)

    def compress(self, data: bytes) -> bytes:
        """``data`` (from :meth:`held`) compressed and framed as chunks, flushed so that the
        client can decode all of it now; after :meth:`end`, the stream's end and the last
        chunk (with the container's trailer fields, if it sent any).

        The costly step: it touches only the compressor, so that it may run on a worker
        thread while the loop goes on (and calls nothing else of this object).
        """
        compressor = self._compressor
        output = compressor.compress(data) if data else b""
        if not self._ended:
            return chunk(output + compressor.flush()) if data else b""
        output += compressor.finish()
        unchunk = self._unchunk
        if unchunk is not None and unchunk.trailer is not None:
            return chunk(output) + b"0\r\n" + unchunk.trailer
        return chunk(output) + LAST_CHUNK
