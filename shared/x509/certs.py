"""What certificate files say: the one home of every rule for reading certificates, keys and CRLs.

The PKI tool, the services, the client, the bench and the tests all read material through here, so a
thumbprint, a SAN or a CRL number means the same thing everywhere, and every complaint is one error type
whose message names the file and the fix::

    leaf, *chain = load_certificates(Path("pki/out/service-a.crt"))
    thumbprint(leaf)             # 'b3c1…' — SHA-256 of the DER, what allow-lists name
    subject_alt_names(leaf)      # [('DNS', 'service-a'), ('DNS', 'localhost'), ('IP', '127.0.0.1'), ('URI', 'spiffe://…')]

Reading here is plain: the PKI tool reads its own files. A service reads the files that decide who gets in
through `shared.x509.read_protected` first, and parses the bytes with the `parse_*` functions.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from shared.x509.files import MaterialError

__all__ = [
    "EKU_OIDS",
    "KeyType",
    "MaterialError",
    "PrivateKey",
    "authority_key_id",
    "crl_blocks",
    "crl_number",
    "extended_key_usages",
    "is_ca",
    "key_id",
    "key_type",
    "load_certificates",
    "load_crl",
    "load_crls",
    "load_key",
    "normalise_thumbprint",
    "parse_certificates",
    "parse_crl",
    "parse_key",
    "subject_alt_names",
    "thumbprint",
]

KeyType = Literal["ecdsa", "rsa"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

# The two extended key usages the mesh speaks of, by the names `python -m pki inspect` prints.
EKU_OIDS = {"serverAuth": ExtendedKeyUsageOID.SERVER_AUTH, "clientAuth": ExtendedKeyUsageOID.CLIENT_AUTH}
_EKU_NAMES = {oid: name for name, oid in EKU_OIDS.items()}
_SAN_LABELS = {x509.DNSName: "DNS", x509.IPAddress: "IP", x509.UniformResourceIdentifier: "URI"}


# ── reading files ─────────────────────────────────────────────────────────────────────────────────────────


def load_certificates(path: Path, what: str = "certificate") -> list[x509.Certificate]:
    """Every certificate in a PEM file, in order (for our leaves: the leaf, then the intermediate)."""
    return parse_certificates(_read(path, what), path, what)


def load_key(path: Path) -> PrivateKey:
    """An unencrypted PEM private key (ECDSA or RSA)."""
    return parse_key(_read(path, "private key"), path)


def load_crl(path: Path) -> x509.CertificateRevocationList:
    """The first CRL in a PEM file: in a crl.pem, the current intermediate's (pki writes it first)."""
    return parse_crl(_read(path, "CRL"), path)


def load_crls(path: Path) -> list[x509.CertificateRevocationList]:
    """Every CRL in a PEM file, in order: a crl.pem holds one per intermediate in play (two during a rollover)."""
    return [parse_crl(block, path) for block in crl_blocks(_read(path, "CRL"))]


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise MaterialError(f"{path}: {what} not found — run `make pki`, or point MESH_PKI_DIR at it") from None
    except OSError as e:
        raise MaterialError(f"{path}: cannot read {what} ({e.strerror})") from None


def parse_certificates(data: bytes, path: Path, what: str = "certificate") -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        if b"PRIVATE KEY-----" in data:  # a .key given for a .crt: saying "regenerate it" would cost them the key
            raise MaterialError(f"{path}: this is a private key, not a certificate — give its .crt file") from None
        raise MaterialError(f"{path}: {what} is not a PEM certificate — regenerate it with `make pki`") from None


def parse_key(data: bytes, path: Path) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise MaterialError(f"{path}: not an unencrypted PEM private key — regenerate it with `make pki`") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise MaterialError(f"{path}: only ECDSA and RSA keys are supported")
    return key


def crl_blocks(data: bytes) -> list[bytes]:
    """Each PEM CRL in `data`, in order: a crl.pem holds one per intermediate in play (two during a rollover)."""
    marker = b"-----BEGIN X509 CRL-----"
    return [marker + block for block in data.split(marker)[1:]]


def parse_crl(data: bytes, path: Path) -> x509.CertificateRevocationList:
    try:
        return x509.load_pem_x509_crl(data)
    except ValueError:
        raise MaterialError(f"{path}: not a PEM CRL — regenerate it with `make pki`") from None


# ── what a certificate says ───────────────────────────────────────────────────────────────────────────────


def thumbprint(cert: x509.Certificate) -> str:
    """The certificate's identity for allow-lists: SHA-256 of its DER encoding, lowercase hex, no colons.

    It equals `openssl x509 -noout -fingerprint -sha256` with the colons removed, lowercased.
    """
    return cert.fingerprint(hashes.SHA256()).hex()


_SHA256_HEX = re.compile(r"[0-9a-f]{64}")  # 64 hex digits, ASCII only


def normalise_thumbprint(text: str) -> str:
    """Accept `AB:CD:…` or `abcd…` as people paste them; return the canonical lowercase form or raise ValueError."""
    candidate = text.strip().replace(":", "").lower()
    if not _SHA256_HEX.fullmatch(candidate):
        raise ValueError(f"{text.strip()!r} is not a SHA-256 thumbprint (64 hex digits, colons allowed)")
    return candidate


def subject_alt_names(cert: x509.Certificate) -> list[tuple[str, str]]:
    """[("DNS", "service-a"), ("IP", "127.0.0.1"), ("URI", "spiffe://…")], in certificate order."""
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [(_SAN_LABELS.get(type(n), type(n).__name__), str(n.value)) for n in names]


def extended_key_usages(cert: x509.Certificate) -> list[str]:
    """["serverAuth", "clientAuth"], or dotted OIDs for others; [] when there is no EKU (OpenSSL: any use)."""
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return []
    return [_EKU_NAMES.get(u, u.dotted_string) for u in usages]


def is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def key_type(key: PrivateKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey | object) -> KeyType:
    """ "rsa" for an RSA key (private or public), "ecdsa" otherwise."""
    return "rsa" if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey) else "ecdsa"


def crl_number(crl: x509.CertificateRevocationList) -> int:
    """The CRL's sequence number (0 if it has none): a newer list always has a higher one."""
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return 0


def key_id(cert: x509.Certificate) -> bytes | None:
    """A CA's Subject Key Identifier: what its leaves and CRLs name it by (AKI). Names can repeat; keys do not."""
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return None


def authority_key_id(signed: x509.Certificate | x509.CertificateRevocationList) -> bytes | None:
    """The key identifier of the CA that signed a certificate or CRL (its AKI), or None if it does not say."""
    try:
        return signed.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    except x509.ExtensionNotFound:
        return None
