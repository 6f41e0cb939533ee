"""Every `ssl.SSLContext` in the project is built here: uvicorn's (server) and httpx's (client) alike.

One place decides what we trust, which certificate we present and which protocol versions we speak, so a
reader can check the whole TLS posture on one screen and no service can drift from it.

Before OpenSSL sees a file we check it ourselves with `cryptography`: OpenSSL's own errors ("[SSL] PEM lib")
name neither the file nor the fix, and a service must refuse to start with a sentence that does.
"""

from __future__ import annotations

import datetime as dt
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

# TLS 1.0 and 1.1 are broken (RFC 8996). Python ≥ 3.10 already defaults to 1.2, but a security default
# that lives in someone else's code can change under us; this one is ours.
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


class TLSMaterialError(Exception):
    """A certificate, key or CA file cannot be used; the message names the file and what to do."""


@dataclass(frozen=True)
class TLSMaterial:
    """The three files every peer needs: whom it trusts, and who it is."""

    ca: Path  # the trust anchor (pki/out/ca.crt): the only CA whose certificates we accept
    cert: Path | None = None  # our leaf, followed by the intermediate that signed it
    key: Path | None = None  # our private key, readable by us alone

    def check(self) -> None:
        """Fail with a clear sentence if a file is missing, malformed, expired, too open or mismatched."""
        _load_certificates(self.ca, "CA file")
        if self.cert is None and self.key is None:
            return
        if self.cert is None or self.key is None:
            raise TLSMaterialError("a certificate needs its key and a key its certificate: give both or neither")
        leaf = _load_certificates(self.cert, "certificate")[0]
        now = dt.datetime.now(dt.UTC)
        if now > leaf.not_valid_after_utc:
            raise TLSMaterialError(
                f"{self.cert}: certificate expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M}Z — "
                "issue a new one (`make pki` renews expiring leaves)"
            )
        if now < leaf.not_valid_before_utc:
            raise TLSMaterialError(f"{self.cert}: certificate is not valid before {leaf.not_valid_before_utc}Z")
        key = _load_key(self.key)
        if key.public_key() != leaf.public_key():
            raise TLSMaterialError(f"{self.key}: this key does not belong to the certificate {self.cert}")


def server_context(material: TLSMaterial, *, require_client_cert: bool = True) -> ssl.SSLContext:
    """For uvicorn: present our certificate, and demand one from every client, signed by our CA.

    `require_client_cert=False` gives CERT_OPTIONAL (Kestrel's AllowCertificate): the handshake succeeds
    without a certificate and the application must then refuse. CERT_REQUIRED (RequireCertificate) is the
    default because it refuses at the door: a caller without a valid certificate never reaches Python code.
    """
    material.check()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    # Only our CA: not the system bundle, or any public CA's customer could present a "valid" certificate.
    context.load_verify_locations(cafile=material.ca)
    context.load_cert_chain(material.cert, material.key)
    return context


def client_context(material: TLSMaterial) -> ssl.SSLContext:
    """For httpx: trust only our CA, check the callee's name, and present our own certificate (if any).

    Hostname checking is what makes "the callee is service-b" true rather than "the callee has some
    certificate from our CA": every service certificate chains to the same root, so the name is what
    tells them apart. Callers connect with the callee's name as TLS server name (see shared.downstream).
    """
    material.check()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname=True, CERT_REQUIRED
    context.minimum_version = MINIMUM_VERSION
    context.load_verify_locations(cafile=material.ca)
    if material.cert is not None:
        context.load_cert_chain(material.cert, material.key)
    return context


def _load_certificates(path: Path, what: str) -> list[x509.Certificate]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TLSMaterialError(f"{path}: {what} not found — run `make pki`, or point MESH_PKI_DIR at it") from None
    except OSError as e:
        raise TLSMaterialError(f"{path}: cannot read {what} ({e.strerror})") from None
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TLSMaterialError(f"{path}: {what} is not a PEM certificate — regenerate it with `make pki`") from None


def _load_key(path: Path) -> PrivateKeyTypes:
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except FileNotFoundError:
        raise TLSMaterialError(f"{path}: private key not found — run `make pki`") from None
    except OSError as e:
        raise TLSMaterialError(f"{path}: cannot read private key ({e.strerror})") from None
    # Like ssh: a key others can read is a key others may have copied. Refuse rather than widen trust.
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TLSMaterialError(
            f"{path}: private key is accessible by other users (mode {stat.S_IMODE(mode):04o}) — run `chmod 600 {path}`"
        )
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise TLSMaterialError(f"{path}: not an unencrypted PEM private key — regenerate it with `make pki`") from None
