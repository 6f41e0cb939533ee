"""The verified peer of a connection, as the app sees it: the ASGI TLS extension, and one typed accessor.

The ASGI spec defines a TLS extension (`scope["extensions"]["tls"]`) carrying the client's certificate
chain. No uvicorn release fills it, so `shared.inbound.handshake` does, once per connection, with `tls_extension`;
everything that wants to know who is on the other end reads it back through `VerifiedPeer.of(scope)`::

    peer = VerifiedPeer.of(request.scope)
    peer.caller.spiffe_id, peer.tls_version, peer.cipher     # 'spiffe://…/client', 'TLSv1.3', 'TLS_AES_…'

When uvicorn implements the spec, only `client_cert_chain` is needed: the identity is parsed from it.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared.tls.contexts import CIPHER_IDS
from shared.tls.peer import connection_peer
from shared.x509.identity import PeerIdentity

__all__ = ["VerifiedPeer", "expose", "tls_extension"]

# Our addition to the spec's keys: the identity, parsed once per connection.
IDENTITY_KEY = "mtls_mesh.caller"

_TLS_VERSIONS = {"TLSv1": 0x0301, "TLSv1.1": 0x0302, "TLSv1.2": 0x0303, "TLSv1.3": 0x0304}
_TLS_VERSION_NAMES = {v: k for k, v in _TLS_VERSIONS.items()}
_CIPHER_NAMES = {v: k for k, v in CIPHER_IDS.items()}


def tls_extension(ssl_object: ssl.SSLObject) -> dict[str, Any]:
    """The ASGI TLS extension for one connection, plus the parsed caller identity."""
    der = ssl_object.getpeercert(binary_form=True)
    # With the CAs its chain was verified with: facts of this connection, re-checked when trust changes.
    caller = connection_peer(ssl_object) if der else None
    cipher = ssl_object.cipher()
    return {
        "server_cert": None,
        # The leaf only (the ASGI TLS extension allows a partial chain): the CAs above it are in ca.crt.
        "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
        "client_cert_name": caller.subject if caller else None,
        "client_cert_error": None,  # under CERT_REQUIRED an invalid certificate never gets this far
        "tls_version": _TLS_VERSIONS.get(ssl_object.version() or "", 0),
        "cipher_suite": CIPHER_IDS.get(cipher[0], 0) if cipher else 0,
        IDENTITY_KEY: caller,
    }


def expose(app: Any, extension: dict[str, Any]) -> Any:
    """`app`, handing `extension` to every request as scope["extensions"]["tls"]."""

    async def app_with_tls(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            scope["extensions"] = {**(scope.get("extensions") or {}), "tls": extension}
        await app(scope, receive, send)

    return app_with_tls


@dataclass(frozen=True)
class VerifiedPeer:
    """Who is on the other end of this request's connection, and over what."""

    caller: PeerIdentity | None  # None only when the server lets callers in without a certificate
    tls_version: str  # "TLSv1.3"
    cipher: str  # OpenSSL's name, "TLS_AES_256_GCM_SHA384"

    @classmethod
    def of(cls, scope: Mapping[str, Any]) -> VerifiedPeer:
        extension = (scope.get("extensions") or {}).get("tls") or {}
        chain = extension.get("client_cert_chain") or []
        caller = (extension.get(IDENTITY_KEY) or PeerIdentity.from_pem(chain[0])) if chain else None
        return cls(
            caller=caller,
            tls_version=_TLS_VERSION_NAMES.get(extension.get("tls_version", 0), "unknown"),
            cipher=_CIPHER_NAMES.get(extension.get("cipher_suite", 0), "unknown"),
        )
