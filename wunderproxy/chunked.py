"""A strict reader of chunked bodies (RFC 9112 section 7.1), one read at a time.

It says where a chunked body ends and hands back the bytes it consumed, framing included,
to be forwarded as they are. Like the heads, the framing is held to what every parser
reads alike, since the parser behind the proxy (or the client in front) reads the same
bytes:

- a chunk size is 1 to 16 hex digits: more may wrap around in a parser that reads it
  into 64 bits, which then sees the chunk's data as the next message (h11 reads 20);
- a chunk extension is ``;name`` or ``;name=value`` of tokens, no whitespace or quotes:
  parsers differ on quoted strings and on a bare CR inside them;
- every line ends in CRLF, and chunk data is followed by exactly CRLF;
- trailer fields follow the grammar of :mod:`wunderproxy.fields`, and none of them is
  Content-Length or Transfer-Encoding (RFC 9110 section 6.5.1; llhttp refuses them).
"""

from __future__ import annotations

import re

from wunderproxy.fields import FIELD_LINE, TOKEN, HeadError

_SIZE_LINE = re.compile(rb"([0-9a-fA-F]{1,16})(?:;" + TOKEN + rb"(?:=" + TOKEN + rb")?)*\r\n")
# Fields a trailer may not carry: a recipient that merges trailers into the head would
# frame the message, or the next one, by them.
_FRAMING_FIELDS = (b"content-length", b"transfer-encoding")
# The longest chunk-size line or trailer line waited for (sizes and extensions are short).
MAX_LINE = 4096

_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)


class BodyTooLarge(HeadError):
    """The body goes past the size allowed."""


class ChunkedReader:
    """Reads one chunked body; :meth:`read` takes what it can from a buffer."""

    __slots__ = ("_left", "_max_body", "_max_trailer", "_state", "_trailer", "received")

    def __init__(self, max_body: int | None, max_trailer: int) -> None:
        self._state = _SIZE
        self._left = 0  # data bytes left in the current chunk
        self._max_body = max_body
        self._max_trailer = max_trailer
        self._trailer = 0  # trailer bytes read so far
        self.received = 0  # data bytes announced so far

    @property
    def done(self) -> bool:
        return self._state == _DONE

    def read(self, buffer: bytearray) -> tuple[bytes, bytes]:
        """Consume from ``buffer`` as much of the body as it holds; return those bytes,
        cut in two: chunks, then the last chunk and trailers (empty until they are read).

        Raises :class:`HeadError` on broken framing and :class:`BodyTooLarge` when the
        chunks announced pass the limit (before their data is consumed).
        """
        at = 0
        end = len(buffer)
        last = 0 if self._state == _TRAILER else -1  # where the last chunk starts
        while at < end and self._state != _DONE:
            state = self._state
            if state == _DATA:
                step = min(self._left, end - at)
                self._left -= step
                at += step
                if not self._left:
                    self._state = _DATA_END
            elif state == _DATA_END:
                if end - at < 2:
                    if buffer[at] != 13:  # not CR
                        raise HeadError("chunk data is not followed by CRLF")
                    break
                if buffer[at : at + 2] != b"\r\n":
                    raise HeadError("chunk data is not followed by CRLF; check the chunk size")
                at += 2
                self._state = _SIZE
            else:
                line_end = buffer.find(b"\n", at)
                if line_end < 0:
                    if end - at > MAX_LINE:
                        raise HeadError("a chunk-size or trailer line is too long")
                    break
                line = bytes(buffer[at : line_end + 1])
                if state == _SIZE:
                    self._size_line(line)
                    if self._state == _TRAILER:
                        last = at
                else:
                    self._trailer_line(line)
                at = line_end + 1
        if last < 0 or self._state != _DONE:
            last = at  # until the body ends, all of it goes out as chunks
        chunks, ending = bytes(buffer[:last]), bytes(buffer[last:at])
        del buffer[:at]
        return chunks, ending

    def _size_line(self, line: bytes) -> None:
        size_line = _SIZE_LINE.fullmatch(line)
        if size_line is None:
            raise HeadError(
                f"bad chunk-size line {line[:40]!r}: 1 to 16 hex digits, then optional "
                ";name=value extensions of tokens, then CRLF"
            )
        size = int(size_line.group(1), 16)
        self.received += size
        if self._max_body is not None and self.received > self._max_body:
            raise BodyTooLarge(f"the chunked body passes the {self._max_body}-byte limit")
        if size:
            self._left = size
            self._state = _DATA
        else:
            self._state = _TRAILER

    def _trailer_line(self, line: bytes) -> None:
        if line == b"\r\n":
            self._state = _DONE
            return
        self._trailer += len(line)
        if self._trailer > self._max_trailer:
            raise HeadError("the chunked body's trailer fields are too large")
        if FIELD_LINE.fullmatch(line) is None:
            raise HeadError(f"bad trailer field line {line[:40]!r}")
        name = line[: line.index(b":")]
        if name.lower() in _FRAMING_FIELDS:
            raise HeadError(
                f"{name.decode('ascii')} is not allowed in a trailer (RFC 9110 section "
                "6.5.1: framing fields in trailers are not framing, yet some parsers read "
                "them so); send it in the head, or not at all"
            )


def chunk(data: bytes) -> bytes:
    """``data`` framed as one chunk; nothing for no data (a chunk of size 0 would end the
    body)."""
    if not data:
        return b""
    return b"%x\r\n%b\r\n" % (len(data), data)


# The last chunk of a body without trailer fields.
LAST_CHUNK = b"0\r\n\r\n"


class ChunkedData:
    """The data of a chunked body that a :class:`ChunkedReader` accepted, framing removed.

    Fed the bytes that reader consumed, in order and cut anywhere, it hands back the chunks'
    data; once the last chunk was read, the bytes after it are the trailer section
    (``trailer``: its fields and the blank line that ends it). Extensions are dropped.
    The framing was checked already, so this reads it without checking it again.
    """

    __slots__ = ("_left", "_line", "trailer")

    def __init__(self) -> None:
        self._left = 0  # data bytes left in the current chunk; -1: the CRLF after them
        self._line = b""  # the start of a chunk-size line or CRLF cut by a read
        self.trailer: bytes | None = None  # None until the last chunk

    def feed(self, framed: bytes) -> bytes:
        """The data in ``framed``, the next bytes of the body."""
        if self.trailer is not None:
            self.trailer += framed
            return b""
        if self._line:
            framed, self._line = self._line + framed, b""
        data = []
        at, end = 0, len(framed)
        while at < end:
            left = self._left
            if left > 0:
                step = min(left, end - at)
                data.append(framed[at : at + step])
                at += step
                self._left = left - step or -1
                continue
            line_end = framed.find(b"\n", at)
            if line_end < 0:
                self._line = framed[at:]
                break
            if left < 0:  # the CRLF after a chunk's data
                self._left = 0
            else:
                size = int(framed[at:line_end].partition(b";")[0], 16)
                if not size:
                    self.trailer = framed[line_end + 1 :]
                    break
                self._left = size
            at = line_end + 1
        return b"".join(data)
