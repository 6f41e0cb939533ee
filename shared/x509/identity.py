"""Who is calling: the facts an authorizer needs, read once from the caller's verified certificate."""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from shared.x509 import certs
from shared.x509.files import MaterialError
from shared.x509.spiffe import InvalidSvid, SpiffeId, svid_id


@dataclass(frozen=True)
class PeerIdentity:
    """The caller as its certificate describes it. TLS has already verified the chain before we get here.

    caller = PeerIdentity.from_certificate(leaf)
    caller.sha256, caller.spiffe_id        # what allow-lists and logs name
    """

    sha256: str  # SHA-256 of the leaf's DER, lowercase hex: what allow-lists name
    subject: str  # RFC 4514, e.g. "CN=service-a,O=mtls-mesh"; informative only, never used to decide
    spiffe_id: str | None  # spiffe://<trust-domain>/<name>, if the certificate is a valid X509-SVID
    svid_problem: str | None  # otherwise: which X509-SVID rule it breaks
    dns_names: tuple[str, ...]
    is_leaf: bool  # False for a CA certificate (BasicConstraints CA:TRUE) presented as a client certificate
    client_auth: bool  # the certificate was issued for TLS client authentication (EKU clientAuth)
    issuer: str = ""  # RFC 4514; informative only: a new CA may carry the old one's name
    serial: int = 0
    # The issuing CA's key identifier (hex): with the serial, what a CRL in force names. The leaf's AKI here;
    # per connection, the key of the CA its chain was verified with (shared.tls.connection_peer).
    issuer_key_id: str = ""
    not_after: dt.datetime | None = None
    # SHA-256 of the CA certificate the chain was verified against: known per connection, not per certificate
    # (shared.tls.connection_peer), and None when the handshake resumed a session, which carries no chain.
    anchor: str | None = None

    @classmethod
    def from_certificate(cls, cert: x509.Certificate) -> PeerIdentity:
        try:
            spiffe_id, svid_problem = str(svid_id(cert)), None
        except InvalidSvid as e:
            spiffe_id, svid_problem = None, str(e)
        return cls(
            sha256=certs.thumbprint(cert),
            subject=cert.subject.rfc4514_string(),
            spiffe_id=spiffe_id,
            svid_problem=svid_problem,
            dns_names=tuple(v for kind, v in certs.subject_alt_names(cert) if kind == "DNS"),
            is_leaf=not certs.is_ca(cert),
            # No EKU extension at all means "any use" to OpenSSL; we still insist on an explicit clientAuth.
            client_auth="clientAuth" in certs.extended_key_usages(cert),
            issuer=cert.issuer.rfc4514_string(),
            serial=cert.serial_number,
            issuer_key_id=(certs.authority_key_id(cert) or b"").hex(),
            not_after=cert.not_valid_after_utc,
        )

    @classmethod
    @functools.lru_cache(maxsize=1024)
    def from_der(cls, der: bytes) -> PeerIdentity:
        """Cached: every new connection of the same peer presents the same bytes, parsed once."""
        return cls.from_certificate(x509.load_der_x509_certificate(der))

    @classmethod
    @functools.lru_cache(maxsize=256)
    def from_pem(cls, pem: str) -> PeerIdentity:
        """For servers that fill the ASGI TLS extension themselves; cached, so each certificate is parsed once."""
        return cls.from_certificate(x509.load_pem_x509_certificate(pem.encode()))

    def summary(self) -> dict[str, str | None]:
        return {"sha256": self.sha256, "subject": self.subject, "spiffe_id": self.spiffe_id}


def own_id(certificate: x509.Certificate | None, path: Path | None, needed_for: str, or_else: str = "") -> SpiffeId:
    """Our SPIFFE ID, read from our certificate in force; MaterialError naming the file and what needed it.

    There is no default trust domain anywhere: a peer's ID is derived from ours (`peer_id`), so a certificate of
    ours without a SPIFFE ID stops whatever needed one, rather than trusting a name we made up.
    """
    own = PeerIdentity.from_certificate(certificate) if certificate is not None else None
    if own is None or own.spiffe_id is None:
        problem = own.svid_problem if own else "no certificate"
        raise MaterialError(
            f"{path}: {needed_for} comes from our own SPIFFE ID, and our certificate has none ({problem}) — "
            f"issue it one with `make pki`{f', {or_else}' if or_else else ''}"
        )
    return SpiffeId.parse(own.spiffe_id)


def peer_id(certificate: x509.Certificate | None, path: Path | None, name: str, or_else: str = "") -> SpiffeId:
    """spiffe://<our own trust domain>/<name>: the SPIFFE ID the peer we call `name` must present.

    The one derivation of a peer's ID, for the services (their next hop, the token service) and the client."""
    own = own_id(certificate, path, f"the SPIFFE ID {name} must present", or_else)
    return SpiffeId(own.trust_domain, f"/{name}")
