"""A service's side of a connection: the handshake done by us, what one peer may hold, who is on the other end."""

from __future__ import annotations

from shared.inbound.asgi import IDENTITY_KEY, VerifiedPeer, expose, tls_extension
from shared.inbound.connections import (
    ConnectionTable,
    Unauthenticated,
    caller_key,
    close_where,
    connections,
    peer_address,
)
from shared.inbound.handshake import TLSHttpToolsProtocol, TLSTermination, tls_protocol, tls_refusals
from shared.inbound.limits import (
    ConnectionLimits,
    Deadline,
    DeclaredBodyLimit,
    RequestLimits,
    SampledLog,
    connections_closed,
    raise_open_files_limit,
    sampled_log,
)
from shared.inbound.onewrite import HeldHead, OneWriteResponses

__all__ = [
    "IDENTITY_KEY",
    "ConnectionLimits",
    "ConnectionTable",
    "Deadline",
    "DeclaredBodyLimit",
    "HeldHead",
    "OneWriteResponses",
    "RequestLimits",
    "SampledLog",
    "TLSHttpToolsProtocol",
    "TLSTermination",
    "Unauthenticated",
    "VerifiedPeer",
    "caller_key",
    "close_where",
    "connections",
    "connections_closed",
    "expose",
    "peer_address",
    "raise_open_files_limit",
    "sampled_log",
    "tls_extension",
    "tls_protocol",
    "tls_refusals",
]
