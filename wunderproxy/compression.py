"""Compression of answers (``--compress``): which answers, which encoding, what head.

Sans-IO, like :mod:`wunderproxy.framing`: :func:`start` reads a request's head and its
answer's head and says whether and how that answer is compressed; the bytes are then
compressed by :class:`~wunderproxy.encoders.AnswerEncoder`. Nothing here is called unless
``--compress`` is on.

An answer is compressed when all of these hold (nginx's gzip module does the same, and for
the same reasons):

- the client accepts an encoding offered (:func:`negotiate`);
- the request is HTTP/1.1 and neither HEAD nor CONNECT, and the answer is HTTP/1.1: an
  answer to HTTP/1.0 cannot be chunked, and closing the connection after each compressed
  answer would cost HTTP/1.0 keep-alive clients more than compression saves them (nginx's
  ``gzip_http_version`` is 1.1 by default too);
- its status is 2xx, 3xx or 4xx/5xx with a body: not 1xx, 204, 304 (no body), nor 206 (its
  byte ranges are of the uncompressed representation; RFC 9110 section 14);
- its media type is one of ``--compress-types`` (``type/*`` and ``type/*+suffix`` allowed);
- it has a body of at least ``--compress-min-size`` bytes, or of unknown length;
- it has no ``Content-Encoding`` (it is encoded already) and no ``Cache-Control:
  no-transform`` (RFC 9110 section 7.7: a proxy must not change the content).

The head then says so (:func:`rewrite_head`): ``Content-Encoding``, ``Vary:
Accept-Encoding`` (caches must keep one copy per encoding), chunked instead of a length, a
weak ETag (RFC 9110 section 8.8.1: the bytes differ from the identity representation's,
so a strong validator would lie), and no ``Accept-Ranges`` (ranges are of the identity
bytes).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import re

from wunderproxy.config import COMPRESS_ENCODINGS, Front
from wunderproxy.encoders import AnswerEncoder
from wunderproxy.fields import TOKEN, comma_tokens, stripped
from wunderproxy.framing import with_connection_close

log = logging.getLogger("wunderproxy.compression")

# The module each encoding needs; gzip's (zlib) is in the standard library.
_MODULES = {"zstd": "zstandard", "br": "brotli", "gzip": "zlib"}

# The fields read, as field_values looks for them.
_ACCEPT_ENCODING = b"\r\naccept-encoding:"
_CONTENT_TYPE = b"\r\ncontent-type:"
_CONTENT_LENGTH = b"\r\ncontent-length:"
_CONTENT_ENCODING = b"\r\ncontent-encoding:"
_CACHE_CONTROL = b"\r\ncache-control:"
_TRANSFER_ENCODING = b"\r\ntransfer-encoding:"
_CODING = re.compile(TOKEN)
# RFC 9110 section 12.4.2: 0 to 1, at most three decimals.
_QVALUE = re.compile(rb"0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?")
# RFC 9110 section 8.4.1.3: x-gzip is gzip.
_ALIASES = {b"x-gzip": b"gzip"}
# Answers without a body, or whose body is a range of the uncompressed one.
_NEVER = frozenset((204, 206, 304))


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


def start(
    front: Front, method: bytes, request_head: bytes, status: int, answer_head: bytes
) -> AnswerEncoder | None:
    """An encoder for this answer with its rewritten head, or None to pass it untouched."""
    if method in (b"HEAD", b"CONNECT") or status < 200 or status in _NEVER:
        return None
    request_line = request_head[: request_head.find(b"\r\n")]
    if not request_line.endswith(b" HTTP/1.1") or not answer_head.startswith(b"HTTP/1.1 "):
        return None
    # Most answers that stay as they are are small: their length is looked at first.
    lowered = answer_head.lower()
    length = field_values(lowered, _CONTENT_LENGTH)
    if length is not None and int(length) < max(front.compress_min_size, 1):
        return None  # an empty body only grows
    encoding = _negotiated(field_values(request_head.lower(), _ACCEPT_ENCODING), front.compress)
    if encoding is None:
        return None
    content_type = field_values(lowered, _CONTENT_TYPE)
    if content_type is None or not _type_matches(content_type, front.compress_types):
        return None
    if _CONTENT_ENCODING in lowered:
        return None
    cache_control = field_values(lowered, _CACHE_CONTROL)
    if cache_control is not None and b"no-transform" in comma_tokens(cache_control):
        return None
    chunked = _TRANSFER_ENCODING in lowered
    head = rewrite_head(answer_head, encoding)
    if length is None and not chunked:
        # Delimited by the container's close, so the client connection closes after it
        # too: say so, now that the client could otherwise see the end in the chunks.
        head = with_connection_close(head)
    return AnswerEncoder(encoding, head, chunked)


# Browsers send the same few Accept-Encoding values again and again, and an app the same
# few Content-Types: reading one costs several times more than looking its answer up. A
# value that misses the cache costs what it would without one; one over _CACHED bytes is
# never kept, so that the caches stay small whatever clients send.
_CACHED = 128


def _negotiated(accept_encoding: bytes | None, offered: tuple[str, ...]) -> str | None:
    if accept_encoding is not None and len(accept_encoding) > _CACHED:
        return negotiate(accept_encoding, offered)
    return _negotiated_cached(accept_encoding, offered)


@functools.lru_cache(maxsize=1024)
def _negotiated_cached(accept_encoding: bytes | None, offered: tuple[str, ...]) -> str | None:
    return negotiate(accept_encoding, offered)


def _type_matches(content_type: bytes, patterns: tuple[str, ...]) -> bool:
    if len(content_type) > _CACHED:
        return media_type_matches(content_type, patterns)
    return _type_matches_cached(content_type, patterns)


@functools.lru_cache(maxsize=1024)
def _type_matches_cached(content_type: bytes, patterns: tuple[str, ...]) -> bool:
    return media_type_matches(content_type, patterns)


def negotiate(accept_encoding: bytes | None, offered: tuple[str, ...]) -> str | None:
    """The encoding of ``offered`` (best first) the client prefers, or None for none.

    ``accept_encoding``: the request's Accept-Encoding (its fields joined by commas), None
    without one. RFC 9110 section 12.5.3: the highest q-value wins, ``q=0`` refuses an
    encoding, ``*`` stands for every encoding not named, and an encoding not named (with no
    ``*``) is not accepted; ``identity`` named with a higher q-value than every encoding
    means "do not compress". On a tie the order of ``offered`` decides. A coding that is not
    a token is ignored, and a q-value that is not one (``q=high``, ``q=2``) refuses its
    coding, as nginx reads it: sending an encoding the client may not have meant to accept
    is worse than sending none.
    """
    if not accept_encoding:
        return None  # absent, or empty: "no encoding, please" (RFC 9110 section 12.5.3)
    weights = accepted_weights(accept_encoding)
    anything = weights.get(b"*", 0.0)
    best, best_weight = None, 0.0
    for name in offered:
        weight = weights.get(name.encode(), anything)
        if weight > best_weight:
            best, best_weight = name, weight
    if best is not None and weights.get(b"identity", 0.0) > best_weight:
        return None
    return best


def accepted_weights(accept_encoding: bytes) -> dict[bytes, float]:
    """Each coding of an Accept-Encoding value with its q-value (lower case; a coding
    named twice keeps its lower weight)."""
    weights: dict[bytes, float] = {}
    for member in accept_encoding.split(b","):
        coding, *parameters = member.split(b";")
        coding = stripped(coding).lower()
        if _CODING.fullmatch(coding) is None:
            continue  # an empty list member (allowed), or not a coding at all
        coding = _ALIASES.get(coding, coding)
        weight = 1.0
        for parameter in parameters:
            name, _, value = parameter.partition(b"=")
            if stripped(name).lower() == b"q":
                value = stripped(value)
                weight = float(value) if _QVALUE.fullmatch(value) else 0.0
        weights[coding] = min(weight, weights.get(coding, weight))
    return weights


def media_type_matches(content_type: bytes, patterns: tuple[str, ...]) -> bool:
    """True when the media type of ``content_type`` (parameters ignored) is one of
    ``patterns``: ``type/subtype``, ``type/*``, ``type/*+suffix`` or ``*/*``."""
    media = content_type.partition(b";")[0].strip(b" \t").lower().decode("latin-1")
    kind, _, subtype = media.partition("/")
    if not kind or not subtype:
        return False
    for pattern in patterns:
        pattern_kind, _, pattern_subtype = pattern.lower().partition("/")
        if pattern_kind not in (kind, "*"):
            continue
        if pattern_subtype in (subtype, "*"):
            return True
        if pattern_subtype.startswith("*+") and subtype.endswith(pattern_subtype[1:]):
            return True
    return False


def rewrite_head(head: bytes, encoding: str) -> bytes:
    """``head`` of an answer about to be compressed with ``encoding``: chunked with
    ``Content-Encoding``, ``Vary: Accept-Encoding`` added (to a Vary field there is, if
    any), a strong ETag made weak, no Content-Length and no Accept-Ranges.

    ``head`` was read by :mod:`wunderproxy.responsehead`: its lines end in CRLF.
    """
    lines = head.split(b"\r\n")[:-2]  # without the blank line that ends it
    kept = [lines[0]]
    varies = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        lower = name.lower()
        if lower in (b"content-length", b"accept-ranges", b"transfer-encoding"):
            continue  # framing is ours to say now; ranges of the identity bytes
        if lower == b"etag":
            value = stripped(value)
            if not value.startswith(b"W/"):
                line = name + b": W/" + value
        elif lower == b"vary" and not varies:
            tokens = comma_tokens(value)
            if not tokens:
                line = name + b": Accept-Encoding"
            elif b"*" not in tokens and b"accept-encoding" not in tokens:
                line = name + b": " + stripped(value) + b", Accept-Encoding"
            varies = True
        kept.append(line)
    if not varies:
        kept.append(b"Vary: Accept-Encoding")
    kept.append(b"Content-Encoding: " + encoding.encode())
    kept.append(b"Transfer-Encoding: chunked")
    return b"\r\n".join(kept) + b"\r\n\r\n"


def field_values(lowered_head: bytes, key: bytes) -> bytes | None:
    """The values of a field in a head, joined as one list, or None without one.

    ``lowered_head``: the head in lower case; ``key``: CRLF, the field's name in lower case
    and a colon. Plain searches, not a pattern (this runs for every answer while --compress
    is on): the head was read by the strict grammar of :mod:`wunderproxy.fields`, so every
    field line follows a CRLF and starts with its name and a colon.
    """
    at = lowered_head.find(key)
    if at < 0:
        return None
    end = lowered_head.find(b"\r\n", at + len(key))
    value = lowered_head[at + len(key) : end].strip(b" \t")
    if lowered_head.find(key, end) < 0:
        return value  # the common case: the field once
    values = [value]
    while (at := lowered_head.find(key, end)) >= 0:
        end = lowered_head.find(b"\r\n", at + len(key))
        values.append(lowered_head[at + len(key) : end].strip(b" \t"))
    return b", ".join(values)
