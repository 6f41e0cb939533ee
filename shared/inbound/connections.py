"""The open connections of this process, and who is on the other end of each.

A handshake checks a certificate once. So when one is revoked or expires later, its open keep-alive
connections must be found and closed (`close_where`, from services.reloader). And the connection limits
(shared.inbound.limits) decide from this table whom to turn away: which connection still has no authenticated
peer and has waited longest, which caller holds how many connections, and which of them is idle. Every
connection is in it from the accept to its end, and leaves it on every way it can end (shared.inbound.handshake);
/metrics shows the counts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from shared.observability.metrics import Gauge
from shared.x509.identity import PeerIdentity

__all__ = ["ConnectionTable", "Unauthenticated", "caller_key", "close_where", "connections", "peer_address"]


def peer_address(transport: asyncio.BaseTransport) -> str:
    """ "127.0.0.1:51234", for logs."""
    peer = transport.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)


def caller_key(caller: PeerIdentity | None) -> str:
    """Whose connection this is, for the per-caller limit: its SPIFFE ID (a renewed certificate is the same
    caller), else its thumbprint; "" for callers without a certificate (client_cert=optional)."""
    if caller is None:
        return ""
    return caller.spiffe_id or caller.sha256


@dataclass(eq=False)
class Unauthenticated:
    """A connection accepted whose TLS handshake has not finished: the peer is still nobody."""

    transport: asyncio.BaseTransport
    heard_from: bool = False  # has it sent a byte (its ClientHello) yet?


class ConnectionTable:
    """Connections not yet authenticated (oldest first) and established ones (each with its caller).

    It only keeps the books; shared.inbound.handshake and shared.inbound.limits decide, and close what they take out.
    """

    def __init__(self) -> None:
        self.handshaking = 0  # TLS handshakes running (start_tls not yet returned), kept by shared.inbound.handshake
        self.unauthenticated: dict[asyncio.BaseProtocol, Unauthenticated] = {}
        self.established: dict[asyncio.BaseProtocol, tuple[asyncio.BaseTransport, PeerIdentity | None]] = {}
        self._by_caller: dict[str, dict[asyncio.BaseProtocol, None]] = {}  # per caller, oldest first
        self._idle_since: dict[asyncio.BaseProtocol, float] = {}  # established and between requests

    def __len__(self) -> int:
        return len(self.unauthenticated) + len(self.established)

    # ── before the handshake ends ──

    def accepted(self, connection: asyncio.BaseProtocol, transport: asyncio.BaseTransport) -> None:
        self.unauthenticated[connection] = Unauthenticated(transport)

    def heard_from(self, connection: asyncio.BaseProtocol) -> None:
        if entry := self.unauthenticated.get(connection):
            entry.heard_from = True

    def settled(self, connection: asyncio.BaseProtocol) -> None:
        """Its handshake ended, one way or the other: it no longer waits for one."""
        self.unauthenticated.pop(connection, None)

    def oldest_unauthenticated(self) -> asyncio.BaseProtocol | None:
        """The connection to shed first: the oldest that has not sent a byte, else the oldest of all."""
        silent = next((c for c, entry in self.unauthenticated.items() if not entry.heard_from), None)
        return silent or next(iter(self.unauthenticated), None)

    # ── established ──

    def add(
        self, connection: asyncio.BaseProtocol, transport: asyncio.BaseTransport, caller: PeerIdentity | None
    ) -> None:
        self.settled(connection)
        self.established[connection] = (transport, caller)
        self._by_caller.setdefault(caller_key(caller), {})[connection] = None
        self._idle_since[connection] = time.monotonic()

    def busy(self, connection: asyncio.BaseProtocol) -> None:
        """A request is under way on it."""
        self._idle_since.pop(connection, None)

    def idle(self, connection: asyncio.BaseProtocol) -> None:
        """Its last response has gone out."""
        if connection in self.established:
            self._idle_since[connection] = time.monotonic()

    def held_by(self, key: str) -> int:
        return len(self._by_caller.get(key, ()))

    def largest_holder(self) -> str | None:
        return max(self._by_caller, key=lambda key: len(self._by_caller[key]), default=None)

    def oldest_idle(self, key: str, sparing: asyncio.BaseProtocol) -> asyncio.BaseProtocol | None:
        """The connection of caller `key` that has been idle longest (never `sparing`), or None if all are busy."""
        idle = [c for c in self._by_caller.get(key, ()) if c is not sparing and c in self._idle_since]
        return min(idle, key=self._idle_since.__getitem__, default=None)

    # ── the end, whichever way it comes ──

    def remove(self, connection: asyncio.BaseProtocol) -> None:
        self.unauthenticated.pop(connection, None)
        self._idle_since.pop(connection, None)
        if (entry := self.established.pop(connection, None)) is not None:
            key = caller_key(entry[1])
            held = self._by_caller[key]
            del held[connection]
            if not held:
                del self._by_caller[key]

    def take_out(self, connection: asyncio.BaseProtocol) -> asyncio.BaseTransport:
        """Remove `connection` now and return its transport, for the caller to close: its room is free at once."""
        if entry := self.unauthenticated.get(connection):
            transport = entry.transport
        else:
            transport = self.established[connection][0]
        self.remove(connection)
        return transport


connections = ConnectionTable()  # one service per process

Gauge(
    "mesh_connections_established",
    "Open connections whose peer passed the TLS handshake",
    lambda: len(connections.established),
)
Gauge(
    "mesh_connections_unauthenticated",
    "Open connections whose TLS handshake has not finished (no byte yet, or the handshake under way)",
    lambda: len(connections.unauthenticated),
)
Gauge(
    "mesh_tls_handshakes_running",
    "TLS handshakes the event loop is still running (those of shed connections until their abort lands)",
    lambda: connections.handshaking,
)


def close_where(should_close: Callable[[PeerIdentity], bool]) -> int:
    """Close every open connection whose caller matches; return how many were closed."""
    doomed = [
        transport
        for transport, caller in list(connections.established.values())
        if caller is not None and should_close(caller)
    ]
    for transport in doomed:
        transport.abort()  # at once: a peer we no longer trust gets no more answers on it
    return len(doomed)
