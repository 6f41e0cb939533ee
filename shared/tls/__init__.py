"""TLS material, the contexts built from it, and the trust a running service checks every peer against."""

from __future__ import annotations

from shared.tls.contexts import CIPHER_IDS, MINIMUM_VERSION, TLS12_CIPHERS, TLSProfile, client_context, server_context
from shared.tls.live import LiveTLS, Recheck, Trust
from shared.tls.material import TLSMaterial
from shared.tls.peer import connection_peer
from shared.tls.reading import Read, Revocations, read

__all__ = [
    "CIPHER_IDS",
    "MINIMUM_VERSION",
    "TLS12_CIPHERS",
    "LiveTLS",
    "Read",
    "Recheck",
    "Revocations",
    "TLSMaterial",
    "TLSProfile",
    "Trust",
    "client_context",
    "connection_peer",
    "read",
    "server_context",
]
