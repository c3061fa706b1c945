"""The strict grammar of HTTP/1.1 header fields, shared by request and response heads.

Bytes pass through the proxy untouched, so the proxy and the parser behind it (or the
client in front) must read every message's framing the same way, or one of them can be
made to see a message the other does not (request smuggling, response splitting). The
safe answer is to accept only heads that every parser reads alike: the RFC 9112 grammar
without its obsolete and lenient corners. Refused here, with the rule each breaks:

- line ends other than CRLF: a bare LF or a bare CR (RFC 9112 section 2.2 allows a
  recipient to accept a bare LF; parsers that do and parsers that don't disagree on
  where a head ends);
- obsolete line folding, a line that starts with a space or tab (RFC 9112 section 5.2:
  a server must reject it or replace it; a naive server reads it as a header of its own);
- whitespace between a field name and its colon (RFC 9112 section 5.1: must be rejected);
- control bytes (NUL, CR, VT, ...) anywhere in a name or a value (RFC 9110 section 5.5).

A field value may hold visible ASCII, spaces and tabs between words, and obs-text
(bytes 0x80-0xFF), which RFC 9110 section 5.5 still allows.
"""

from __future__ import annotations

import re

# What follows a field's colon up to its CRLF: optional whitespace, a value (words of
# visible ASCII or obs-text with runs of SP/HTAB between), optional whitespace (RFC 9110
# section 5.5). Those three together are exactly any run of visible ASCII, obs-text, SP and
# HTAB, which the regular expression engine checks a byte at a time with no backtracking:
# a response head of ten fields reads in half the instructions that the words cost.
_AFTER_COLON = rb"[\t\x20-\x7e\x80-\xff]*"
TOKEN = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
# Every field line of a head, then the blank line that ends it.
FIELD_LINES = rb"(?:" + TOKEN + rb":" + _AFTER_COLON + rb"\r\n)*\r\n"
_TOKEN = re.compile(TOKEN)
FIELD_LINE = re.compile(TOKEN + rb":" + _AFTER_COLON + rb"\r\n")
DIGITS = re.compile(rb"[0-9]+")
# A Content-Length of 19 digits or more may wrap around in a parser that reads it into a
# 64-bit integer, and then frames a body of another length; no real body is that large.
MAX_LENGTH_DIGITS = 18


class HeadError(ValueError):
    """A head breaks the grammar or its framing is ambiguous; the message says how."""


def head_end(data: bytes | bytearray, start: int = 0) -> int:
    """Where the head that begins at ``start`` ends (just after its first empty line), or
    -1 if it has not ended yet.

    An empty line is CRLF or a bare LF (h11._receivebuffer reads the same), so that a head
    with bare LFs is refused as soon as it is whole instead of waiting for a CRLF CRLF
    that never comes. Two ``find`` calls, the second bounded by the first's hit: a
    regular expression for both costs twice as many instructions, since it looks at
    every byte in Python's engine where ``find`` skips through them.
    """
    crlf = data.find(b"\n\r\n", start)
    bare = data.find(b"\n\n", start, len(data) if crlf < 0 else crlf + 2)
    if bare >= 0:
        return bare + 2
    return crlf + 3 if crlf >= 0 else -1


# The header a wunderproxy adds to a request it sends on to a peer (see fallback.py).
FALLBACK_FIELD = "x-wunderproxy-fallback"


def fields_pattern(*names: str) -> re.Pattern[bytes]:
    """A pattern finding the given fields' lines in a head already checked as well-formed."""
    alternatives = "|".join(names).encode()
    return re.compile(rb"\r\n(" + alternatives + rb"):([^\r]*)", re.IGNORECASE)


def stripped(value: bytes) -> bytes:
    """A field value without the optional whitespace around it (RFC 9110 section 5.5)."""
    return value.strip(b" \t")


def _framing_value(value: bytes) -> bytes:
    """A framing field's value, which may follow its colon after one space and no other
    whitespace: a tab, or spaces around it, are allowed by RFC 9110 but read differently
    by naive parsers, and a parser that sees no valid framing field frames no body."""
    bare = value[1:] if value[:1] == b" " else value
    if bare.strip(b" \t") != bare:
        raise HeadError(f"whitespace around the framing value {value!r}; send 'Name: value'")
    return bare


def content_length(value: bytes, seen: bytes | None) -> bytes:
    """Check one Content-Length field (``seen``: the one before it, if any)."""
    if seen is not None:
        # RFC 9110 section 8.6 lets a recipient accept a list of equal values; parsers
        # differ on it, and no honest sender repeats the field.
        raise HeadError("Content-Length is given twice; send it once")
    value = _framing_value(value)
    if DIGITS.fullmatch(value) is None:
        raise HeadError(
            f"Content-Length {value!r} is not a decimal number (no sign, space, hex or list)"
        )
    if len(value) > MAX_LENGTH_DIGITS:
        raise HeadError(f"Content-Length {value!r} is too large")
    return value


def transfer_encoding(value: bytes, seen: bytes | None) -> bytes:
    """Check one Transfer-Encoding field: only ``chunked``, alone, is read.

    RFC 9112 section 6.3 frames by Transfer-Encoding only when chunked is its final
    coding; anything else (``xchunked``, ``chunked, identity``, a second field) is read
    differently by different parsers, and no client needs to send it to a server.
    """
    if seen is not None:
        raise HeadError("Transfer-Encoding is given twice; send it once, as 'chunked'")
    value = _framing_value(value)
    if value.lower() != b"chunked":
        raise HeadError(
            f"Transfer-Encoding {value!r} is not supported; only 'chunked' is (RFC 9112 6.1)"
        )
    return value


def comma_tokens(value: bytes) -> list[bytes]:
    """A comma-separated header value as h11 reads it: lower-cased, stripped, non-empty."""
    return [token.strip().lower() for token in value.split(b",") if token.strip()]


def explain(head: bytes, first_line: re.Pattern[bytes], what: str) -> str:
    """Why ``head`` (up to and including its blank line) is not well-formed.

    Only called once a head was refused: it walks the lines one by one, which the fast
    path never does.
    """
    lines = head.split(b"\n")
    for number, line in enumerate(lines[:-1], start=1):
        if not line.endswith(b"\r"):
            return f"line {number} of the {what} ends in a bare LF; end lines with CRLF"
        line = line[:-1]
        if b"\r" in line:
            return f"line {number} of the {what} has a bare CR; CR is only allowed before LF"
        if number == 1:
            if first_line.fullmatch(line + b"\r\n") is None:
                return f"bad {what} line {_shown(line)}"
            continue
        if not line:
            break
        if line[:1] in (b" ", b"\t"):
            return (
                f"line {number} of the {what} starts with whitespace (obsolete line folding, "
                "refused by RFC 9112 section 5.2); put each field on one line"
            )
        name, colon, _ = line.partition(b":")
        if not colon:
            return f"line {number} of the {what} has no colon: {_shown(line)}"
        if name.rstrip(b" \t") != name:
            return (
                f"field {_shown(name.rstrip())} has whitespace before its colon "
                "(refused by RFC 9112 section 5.1)"
            )
        if _TOKEN.fullmatch(name) is None:
            return f"field name {_shown(name)} is not a token (RFC 9110 section 5.1)"
        if FIELD_LINE.fullmatch(line + b"\r\n") is None:
            return f"field {_shown(name)} has a control byte in its value: {_shown(line)}"
    return f"the {what} is not well-formed HTTP/1.1"


def _shown(data: bytes, limit: int = 60) -> str:
    """Bytes for an error message: short, control bytes escaped."""
    shown = repr(data[:limit])
    return shown + "..." if len(data) > limit else shown
