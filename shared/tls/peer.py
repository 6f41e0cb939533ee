"""Who is on the other end of a TLS connection, with the CAs OpenSSL verified its chain with."""

from __future__ import annotations

import _ssl
import functools
import hashlib
import ssl
from dataclasses import replace

from cryptography import x509

from shared.x509.certs import key_id
from shared.x509.identity import PeerIdentity


def connection_peer(ssl_object: ssl.SSLObject) -> PeerIdentity | None:
    """The peer of this connection, with the CAs its chain was verified with: the CA certificate it chained to
    (`anchor`) and the key of the CA that issued it — what OpenSSL verified, not what the leaf claims (a leaf
    need not carry an AKI). A resumed session has no chain: then no anchor, and the issuer key the leaf names.

    Python 3.13 has `get_verified_chain()` (DER bytes); 3.10 to 3.12 have it on the inner `_sslobj` only
    (certificate objects). A blocking socket (the CLI client's) is that inner object itself.
    """
    der = ssl_object.getpeercert(True)
    if not der:
        return None
    peer = PeerIdentity.from_der(der)
    chain = verified_chain(ssl_object)
    if not chain:
        return peer
    issuer = chain[1] if len(chain) > 1 else chain[0]  # a chain of one: a self-signed certificate we trust as such
    return replace(peer, anchor=hashlib.sha256(chain[-1]).hexdigest(), issuer_key_id=_key_id(issuer))


def verified_chain(ssl_object: ssl.SSLObject) -> list[bytes]:
    """The peer's chain as OpenSSL verified it, leaf first, up to the CA in ca.crt (DER); empty when resumed."""
    get_chain = getattr(ssl_object, "get_verified_chain", None) or getattr(
        getattr(ssl_object, "_sslobj", None), "get_verified_chain", None
    )
    return [c if isinstance(c, bytes) else c.public_bytes(_ssl.ENCODING_DER) for c in (get_chain() or [])]


@functools.lru_cache(maxsize=64)
def _key_id(der: bytes) -> str:
    """The key id (hex) of a CA certificate: parsed once, since every peer of a mesh shows the same few CAs."""
    return (key_id(x509.load_der_x509_certificate(der)) or b"").hex()
