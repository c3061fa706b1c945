"""wunderproxy: a zero-downtime front door for Docker apps."""

from wunderproxy import native

__version__ = "0.1.0"

# Before any module of the hot path is imported: a compiled module older than its .py
# would otherwise run in its place without a word (see wunderproxy.native).
native.check_build()
