"""The files a peer's TLS is made of — CA, certificate, key, CRL — read once and checked before OpenSSL sees them.

OpenSSL's own errors ("[SSL] PEM lib") name neither the file nor the fix, and a service must refuse to start
with a sentence that does: so `cryptography` reads every file first, by the rules of shared.x509.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from shared.x509.certs import authority_key_id, crl_blocks, key_id, parse_certificates, parse_crl, parse_key
from shared.x509.files import MaterialError, read_protected


@dataclass(frozen=True)
class TLSMaterial:
    """The files a peer needs: whom it trusts, who it is, and which certificates are no longer good."""

    ca: Path  # the trust anchor (pki/out/ca.crt): the only CA whose certificates we accept
    cert: Path | None = None  # our leaf, followed by the intermediate that signed it
    key: Path | None = None  # our private key, readable by us alone
    crl: Path | None = None  # the intermediate's revocation list; peers' leaves are checked against it

    def files(self) -> list[Path]:
        return [p for p in (self.ca, self.cert, self.key, self.crl) if p is not None]

    def check(self) -> None:
        """Fail with a clear sentence if a file is missing, malformed, expired, unsafe or mismatched."""
        self.verify(self.read())

    def read(self) -> dict[str, bytes]:
        """Each file's bytes, read once, from files only we (or root) can change; the key readable by us alone."""
        paths = {"ca": self.ca, "cert": self.cert, "key": self.key, "crl": self.crl}
        return {
            field: read_protected(path, _WHAT[field], private=field == "key")
            for field, path in paths.items()
            if path is not None
        }

    def verify(self, data: dict[str, bytes]) -> list[x509.CertificateRevocationList]:
        """Check what `read()` returned, naming our files in every complaint; return the CRLs (one per issuer)."""
        parse_certificates(data["ca"], self.ca, "CA file")
        if (self.cert is None) != (self.key is None):
            raise MaterialError("a certificate needs its key and a key its certificate: give both or neither")
        chain: list[x509.Certificate] = []
        if self.cert is not None and self.key is not None:
            chain = parse_certificates(data["cert"], self.cert, "certificate")
            leaf = chain[0]
            now = dt.datetime.now(dt.UTC)
            if now > leaf.not_valid_after_utc:
                raise MaterialError(
                    f"{self.cert}: certificate expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M}Z — "
                    "issue a new one (`make pki` renews expiring leaves)"
                )
            if now < leaf.not_valid_before_utc:
                raise MaterialError(f"{self.cert}: certificate is not valid before {leaf.not_valid_before_utc}Z")
            if parse_key(data["key"], self.key).public_key() != leaf.public_key():
                raise MaterialError(f"{self.key}: this key does not belong to the certificate {self.cert}")
        if self.crl is None:
            return []
        # One CRL per intermediate in play: during a CA rollover, the old one's and the new one's.
        blocks = crl_blocks(data["crl"])
        if not blocks:
            raise MaterialError(f"{self.crl}: not a PEM CRL — regenerate it with `make pki`")
        return [_usable_crl(block, self.crl, chain[1:]) for block in blocks]

    def written_to(self, directory: Path, data: dict[str, bytes]) -> TLSMaterial:
        """`data` as files in `directory` (ours alone, 0700), for OpenSSL, which loads from paths only."""
        copies: dict[str, Path] = {}
        for field, content in data.items():
            copies[field] = directory / field
            copies[field].touch(mode=0o600)
            copies[field].write_bytes(content)
        return TLSMaterial(**copies)  # type: ignore[arg-type]


_WHAT = {"ca": "CA file", "cert": "certificate", "key": "private key", "crl": "CRL"}


def _usable_crl(data: bytes, path: Path, intermediates: list[x509.Certificate]) -> x509.CertificateRevocationList:
    """The CRL, if OpenSSL will accept it: not expired, and signed by our intermediate when it claims to be."""
    crl = parse_crl(data, path)
    next_update = crl.next_update_utc
    if next_update is not None and next_update < dt.datetime.now(dt.UTC):
        # OpenSSL would then refuse every peer: better to refuse the file and say so. `make pki` re-signs the CRL
        # of every CA whose key the PKI holds (the old one's too, during a rollover).
        raise MaterialError(
            f"{path}: the CRL of {crl.issuer.rfc4514_string()} expired on {next_update:%Y-%m-%d %H:%M}Z, so the "
            "whole file is refused and the revocations in force stay as they were — run `make pki` to re-sign it"
        )
    signer = authority_key_id(crl)
    for issuer in intermediates:
        # Only our own intermediate can judge our CRL (a foreign CA may well use the same name): matched by key.
        if signer is not None and key_id(issuer) == signer and not crl.is_signature_valid(issuer.public_key()):
            raise MaterialError(f"{path}: CRL signature does not verify with {issuer.subject.rfc4514_string()}")
    return crl
