"""wunderproxy: a zero-downtime front door for Docker apps."""

__version__ = "0.1.0"
