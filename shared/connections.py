"""The open connections of this process, and who is on the other end of each.

A certificate is checked once, at the handshake. So when one is revoked later, its open keep-alive
connections must be found and closed (`close_where`), and the connection limits (shared.limits) need to
know how many there are.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from shared.identity import CallerIdentity

__all__ = ["ConnectionTable", "close_where", "connections", "peer_address"]


def peer_address(transport: asyncio.BaseTransport) -> str:
    """ "127.0.0.1:51234", for logs."""
    peer = transport.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)


class ConnectionTable:
    """Handshakes in progress (a count) and established connections (each with its caller)."""

    def __init__(self) -> None:
        self.handshaking = 0
        self.established: dict[asyncio.BaseProtocol, tuple[asyncio.BaseTransport, CallerIdentity | None]] = {}

    def __len__(self) -> int:
        return self.handshaking + len(self.established)

    def add(
        self, connection: asyncio.BaseProtocol, transport: asyncio.BaseTransport, caller: CallerIdentity | None
    ) -> None:
        self.established[connection] = (transport, caller)

    def remove(self, connection: asyncio.BaseProtocol) -> None:
        self.established.pop(connection, None)


connections = ConnectionTable()  # one service per process


def close_where(should_close: Callable[[CallerIdentity], bool]) -> int:
    """Close every open connection whose caller matches; return how many were closed."""
    doomed = [
        transport
        for transport, caller in list(connections.established.values())
        if caller is not None and should_close(caller)
    ]
    for transport in doomed:
        transport.abort()  # at once: a peer we no longer trust gets no more answers on it
    return len(doomed)
