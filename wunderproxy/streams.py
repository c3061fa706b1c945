"""Small helpers shared by the proxy and the manager for asyncio streams."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress

# Seconds to keep reading (and dropping) a client's bytes after refusing its request, so
# that closing does not reset the connection before the client read the answer
# (RFC 9112 section 9.6). The proxy and the manager both refuse this way.
LINGER = 1.0


async def close_after_refusal(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Close a connection whose request was refused, so that the client reads the answer.

    Closing a socket with unread input makes the kernel send RST, and the client may then
    lose the answer still in flight (RFC 9112 section 9.6 asks for a half-close first): so
    flush, half-close, drop what the client still sends for a moment, then close.

    A client may have gone already. The kernel then refuses the half-close (ENOTCONN), or
    the loop has closed the transport: either way there is nobody left to tell, so this
    returns quietly.
    """
    try:
        await writer.drain()
        if writer.is_closing():
            return
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(LINGER):
            while await reader.read(65536):
                pass
    except OSError:  # ConnectionError, TimeoutError, ENOTCONN: the client has gone
        pass
    finally:
        writer.close()


def is_loopback(host: str | None) -> bool:
    """True for a loopback address, an IPv4-mapped one (a dual-stack socket), or None
    (a Unix socket, which only this host can reach)."""
    if host is None:
        return True
    with contextlib.suppress(ValueError):
        address = ipaddress.ip_address(host.partition("%")[0])
        mapped = getattr(address, "ipv4_mapped", None)
        return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))
    return host == "localhost"
