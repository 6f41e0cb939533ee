"""Certificate authorities and the certificates they issue, on `cryptography`: keys, roots, intermediates, leaves.

The API is meant to be guessed::

    root = CertificateAuthority.root("mtls-mesh Root CA")
    issuing = root.intermediate("mtls-mesh Intermediate CA")
    service_b = issuing.issue("service-b", dns=["service-b"], uris=["spiffe://mesh.internal/service-b"])
    service_b.write(Path("pki/out"))          # service-b.crt (leaf, then intermediate) and service-b.key (0600)

Why a root *and* an intermediate: the root key signs once and can then be kept offline; everything day to
day (identities, revocation lists) is signed by the intermediate, which peers learn about from the chain
each leaf carries. Peers only ever trust the root.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from pki.output import write_file
from shared.layout import Layout
from shared.x509 import EKU_OIDS, KeyType, PrivateKey, load_certificates, load_key, thumbprint
from shared.x509 import key_type as key_type_of

__all__ = [
    "CertificateAuthority",
    "Identity",
    "Usage",
    "load_issuer",
    "new_key",
    "self_signed",
]

Usage = Literal["server", "client"]

ORGANIZATION = "mtls-mesh"
ROOT_VALIDITY = dt.timedelta(days=3650)
INTERMEDIATE_VALIDITY = dt.timedelta(days=1825)
# Leaves are short-lived on purpose: a stolen key is worth less when its certificate dies soon.
LEAF_VALIDITY = dt.timedelta(days=90)
# Certificates are back-dated a little so that a peer whose clock runs slightly behind accepts them.
CLOCK_SKEW = dt.timedelta(minutes=5)


class PKIError(Exception):
    """Something about the PKI material or policy is wrong; the message says what and how to fix it."""


def new_key(key_type: KeyType = "ecdsa") -> PrivateKey:
    """ECDSA P-256 by default: small, fast handshakes, supported everywhere. RSA-2048 for old peers."""
    if key_type == "ecdsa":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise PKIError(f"unknown key type {key_type!r}: use 'ecdsa' or 'rsa'")


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def now() -> dt.datetime:
    """The current time, to the second: certificates carry no fractions."""
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _sign(builder: x509.CertificateBuilder, key: PrivateKey) -> x509.Certificate:
    # ECDSA and RSA both sign with SHA-256 here; Ed25519 would take None, but peers support it less widely.
    return builder.sign(key, hashes.SHA256())


@dataclass
@dataclass
class Identity:
    """A certificate, its private key, and the chain up to (not including) the root."""

    cert: x509.Certificate
    key: PrivateKey
    chain: list[x509.Certificate] = field(default_factory=list)

    @property
    def sha256(self) -> str:
        return thumbprint(self.cert)

    def cert_pem(self) -> bytes:
        """Leaf first, then the intermediates: what a TLS peer must send so the other side can build the chain."""
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in [self.cert, *self.chain])

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write(self, out: Path, name: str | None = None) -> tuple[Path, Path]:
        """Write `<name>.crt` and `<name>.key` (0600) into `out`; return their paths."""
        name = name or self.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value  # type: ignore[assignment]
        cert_path, key_path = out / f"{name}.crt", out / f"{name}.key"
        write_file(key_path, self.key_pem(), private=True)
        write_file(cert_path, self.cert_pem())
        return cert_path, key_path

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> Identity:
        leaf, *chain = load_certificates(cert_path)
        return cls(leaf, load_key(key_path), chain)


class CertificateAuthority(Identity):
    """An identity that may sign certificates."""

    @classmethod
    def root(cls, common_name: str = "mtls-mesh Root CA", key_type: KeyType = "ecdsa") -> CertificateAuthority:
        """A self-signed root: the one certificate every peer trusts (`ca.crt`)."""
        key = new_key(key_type)
        builder = (
            _self_issued(common_name, key, ROOT_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(_ca_key_usage(), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        )
        return cls(_sign(builder, key), key)

    def intermediate(self, common_name: str = "mtls-mesh Intermediate CA") -> CertificateAuthority:
        """A CA below this one that cannot sign further CAs (path length 0); it issues every identity."""
        key = new_key(key_type_of(self.key))
        start = now()
        builder = (
            self._builder(common_name, key, start - CLOCK_SKEW, start + INTERMEDIATE_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_ca_key_usage(), critical=True)
        )
        return CertificateAuthority(_sign(builder, self.key), key, self._chain_below())

    def issue(
        self,
        name: str,
        *,
        dns: Sequence[str] = (),
        ips: Sequence[str] = (),
        uris: Sequence[str] = (),
        usages: Iterable[Usage] = ("server", "client"),
        key_type: KeyType | None = None,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        lifetime: dt.timedelta = LEAF_VALIDITY,
    ) -> Identity:
        """A leaf certificate for `name` (its Common Name), with the given SANs and extended key usages.

        Peers identify a service by its Subject Alternative Names, never by the Common Name: RFC 6125
        made CN matching legacy, and OpenSSL ignores the CN as soon as a SAN is present. The Extended Key
        Usage says what the certificate may be used for: `server` (serverAuth) lets it answer TLS
        connections, `client` (clientAuth) lets it make them. A service needs both; a client only the latter.
        """
        key = new_key(key_type or key_type_of(self.key))
        start = now()
        sans: list[x509.GeneralName] = [
            *(x509.DNSName(d) for d in dns),
            *(x509.IPAddress(ipaddress.ip_address(i)) for i in ips),
            *(x509.UniformResourceIdentifier(u) for u in uris),
        ]
        ekus = [EKU_OIDS[f"{u}Auth"] for u in usages]  # server → serverAuth, client → clientAuth
        builder = (
            self._builder(name, key, not_before or start - CLOCK_SKEW, not_after or start + lifetime)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    # Signatures only, for ECDSA and RSA keys alike: every suite we allow is (EC)DHE, so no peer
                    # encrypts a key to an RSA leaf (keyEncipherment), and RFC 5280 lints flag it beside TLS EKUs.
                    digital_signature=True,
                    key_encipherment=False,
                    content_commitment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
        )
        if ekus:  # an empty EKU extension is invalid; leaving it out means "any use"
            builder = builder.add_extension(x509.ExtendedKeyUsage(ekus), critical=False)
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return Identity(_sign(builder, self.key), key, self._chain_below())

    def _chain_below(self) -> list[x509.Certificate]:
        """What a certificate we sign must carry: us and our own chain, but never the root (peers have it)."""
        is_root = self.cert.subject == self.cert.issuer
        return [] if is_root else [self.cert, *self.chain]

    def _builder(
        self, common_name: str, key: PrivateKey, not_before: dt.datetime, not_after: dt.datetime
    ) -> x509.CertificateBuilder:
        ski = x509.SubjectKeyIdentifier.from_public_key(self.key.public_key())
        return (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        )


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        key_cert_sign=True,
        crl_sign=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        encipher_only=False,
        decipher_only=False,
    )


def load_issuer(layout: Layout) -> CertificateAuthority:
    """The intermediate, which signs every identity and the CRL — refused if its key is not the certificate's.

    A key restored from the wrong backup would sign a CRL and certificates that no peer can verify: every
    service would then refuse everyone. Better to stop before signing anything.
    """
    issuer = CertificateAuthority.load(layout.intermediate_cert, layout.intermediate_key)
    if issuer.key.public_key() != issuer.cert.public_key():
        if (layout.rollover / "incoming.key").exists():
            raise PKIError(
                f"{layout.intermediate_key} does not belong to {layout.intermediate_cert}: a CA rollover stopped "
                "while it switched intermediates — run `make rotate-ca` again (ROOT=1 if it was a root rollover) "
                "to finish it; nothing was signed"
            )
        raise PKIError(
            f"{layout.intermediate_key} does not belong to {layout.intermediate_cert}: nothing was signed — "
            "put back the key that matches the certificate (a backup of pki/out), or start a new CA with "
            "`python -m pki init --force`"
        )
    return issuer


def _self_issued(common_name: str, key: PrivateKey, validity: dt.timedelta) -> x509.CertificateBuilder:
    """Subject and issuer the same: a root CA, or a self-signed leaf."""
    start = now()
    return (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - CLOCK_SKEW)
        .not_valid_after(start + validity)
    )


def self_signed(name: str, *, dns: Sequence[str] = (), key_type: KeyType = "ecdsa") -> Identity:
    """A leaf that vouches for itself: no CA of ours signed it, so every peer must refuse it."""
    key = new_key(key_type)
    builder = (
        _self_issued(name, key, LEAF_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(list(EKU_OIDS.values())),
            critical=False,
        )
    )
    if dns:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(d) for d in dns]), critical=False)
    return Identity(_sign(builder, key), key)
