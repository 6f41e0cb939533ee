"""Every `ssl.SSLContext` in the project is built here: uvicorn's (server) and httpx's (client) alike.

One place decides what we trust, which certificate we present and which protocol versions we speak, so a
reader can check the whole TLS posture on one screen and no service can drift from it.

Before OpenSSL sees a file we check it ourselves with `cryptography`: OpenSSL's own errors ("[SSL] PEM lib")
name neither the file nor the fix, and a service must refuse to start with a sentence that does.
"""

from __future__ import annotations

import datetime as dt
import shutil
import ssl
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

TLSProfile = Literal["intermediate", "modern"]

# Mozilla's server-side TLS guidelines, for servers and our outgoing clients alike:
# - intermediate: TLS 1.2 and 1.3; for TLS 1.2 only forward-secret AEAD suites (ECDHE with AES-GCM or
#   ChaCha20-Poly1305). Python's defaults would also offer CBC and DHE suites, which scanners flag.
# - modern: TLS 1.3 only (all its suites are AEAD and forward-secret).
# TLS 1.0 and 1.1 are broken (RFC 8996) and never allowed.
TLS12_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)
MINIMUM_VERSION: dict[str, ssl.TLSVersion] = {
    "intermediate": ssl.TLSVersion.TLSv1_2,
    "modern": ssl.TLSVersion.TLSv1_3,
}


class TLSMaterialError(Exception):
    """A certificate, key or CA file cannot be used; the message names the file and what to do."""


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
        """Fail with a clear sentence if a file is missing, malformed, expired, too open or mismatched."""
        _load_certificates(self.ca, "CA file")
        if (self.cert is None) != (self.key is None):
            raise TLSMaterialError("a certificate needs its key and a key its certificate: give both or neither")
        chain: list[x509.Certificate] = []
        if self.cert is not None and self.key is not None:
            chain = _load_certificates(self.cert, "certificate")
            leaf = chain[0]
            now = dt.datetime.now(dt.UTC)
            if now > leaf.not_valid_after_utc:
                raise TLSMaterialError(
                    f"{self.cert}: certificate expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M}Z — "
                    "issue a new one (`make pki` renews expiring leaves)"
                )
            if now < leaf.not_valid_before_utc:
                raise TLSMaterialError(f"{self.cert}: certificate is not valid before {leaf.not_valid_before_utc}Z")
            if _load_key(self.key).public_key() != leaf.public_key():
                raise TLSMaterialError(f"{self.key}: this key does not belong to the certificate {self.cert}")
        if self.crl is not None:
            _check_crl(self.crl, chain[1:])

    def snapshot(self, directory: Path) -> TLSMaterial:
        """Copy the files into `directory` (ours alone), so that what we check is exactly what we load."""
        directory.mkdir(mode=0o700)
        copies: dict[str, Path | None] = {}
        for field in ("ca", "cert", "key", "crl"):
            source: Path | None = getattr(self, field)
            if source is None:
                copies[field] = None
                continue
            target = directory / field
            try:
                data = source.read_bytes()
            except OSError as e:
                raise TLSMaterialError(f"{source}: cannot read ({e.strerror}) — run `make pki`") from None
            if field == "key":
                _load_key(source)  # the permission check looks at the original, not our copy
            target.touch(mode=0o600)
            target.write_bytes(data)
            copies[field] = target
        return TLSMaterial(**copies)  # type: ignore[arg-type]


def server_context(
    material: TLSMaterial, *, require_client_cert: bool = True, profile: TLSProfile = "intermediate"
) -> ssl.SSLContext:
    """For uvicorn: present our certificate, and demand one from every client, signed by our CA.

    `require_client_cert=False` gives CERT_OPTIONAL (Kestrel's AllowCertificate): the handshake succeeds
    without a certificate and the application must then refuse. CERT_REQUIRED (RequireCertificate) is the
    default because it refuses at the door: a caller without a valid certificate never reaches Python code.
    """
    material.check()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _apply_profile(context, profile)
    context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    _load(context, material)
    return context


def client_context(material: TLSMaterial, *, profile: TLSProfile = "intermediate") -> ssl.SSLContext:
    """For httpx: trust only our CA, check the callee's name and revocation, present our own certificate.

    Hostname checking is what makes "the callee is service-b" true rather than "the callee has some
    certificate from our CA": every service certificate chains to the same root, so the name is what
    tells them apart. Callers connect with the callee's name as TLS server name (see shared.downstream).
    With a CRL this is the analogue of .NET's `CheckCertificateRevocationList = true`.
    """
    material.check()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname=True, CERT_REQUIRED
    _apply_profile(context, profile)
    _load(context, material)
    return context


def _apply_profile(context: ssl.SSLContext, profile: TLSProfile) -> None:
    if profile not in MINIMUM_VERSION:
        raise TLSMaterialError(f"unknown TLS profile {profile!r}: use 'intermediate' or 'modern'")
    context.minimum_version = MINIMUM_VERSION[profile]
    context.set_ciphers(TLS12_CIPHERS)  # TLS 1.2 only; TLS 1.3 suites are configured apart, all fine
    # Compression leaks secrets (CRIME); renegotiation lets a peer restart the handshake mid-connection:
    # a CPU sink and, historically, an injection vector. TLS 1.3 has neither.
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION


def _load(context: ssl.SSLContext, material: TLSMaterial) -> None:
    # Only our CA: not the system bundle, or any public CA's customer could present a "valid" certificate.
    context.load_verify_locations(cafile=material.ca)
    if material.crl is not None:
        # The leaf only: our CRL is the intermediate's, and CHAIN would also demand one from the root.
        # Loading a newer CRL into a live context takes effect for the next handshake: OpenSSL keeps every
        # CRL it was given and uses the one with the latest lastUpdate (pki makes each one strictly later).
        context.load_verify_locations(cafile=material.crl)
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    if material.cert is not None:
        context.load_cert_chain(material.cert, material.key)


class LiveTLS:
    """A running service's two contexts, kept for its whole life and updated in place when files change.

    uvicorn binds its listening socket to one SSLContext for good, so reloading means loading new files
    into that same context. OpenSSL can leave a context half-updated when a load fails (say, a key that
    does not match its certificate), so new files are first copied aside, checked, and loaded into
    throwaway contexts; only material that passed goes into the live ones, and new handshakes use it.

    The trust anchor can be extended this way but not shrunk: removing a CA from ca.crt needs a restart.
    """

    def __init__(
        self,
        material: TLSMaterial,
        *,
        require_client_cert: bool = True,
        outgoing: bool = True,
        profile: TLSProfile = "intermediate",
    ) -> None:
        self.material = material
        self.require_client_cert = require_client_cert
        self.profile = profile
        self._scratch = Path(tempfile.mkdtemp(prefix="mesh-tls-"))
        self._generation = 0
        snapshot = self._snapshot()
        self.server = server_context(snapshot, require_client_cert=require_client_cert, profile=profile)
        self.client = client_context(snapshot, profile=profile) if outgoing else None

    def reload(self) -> None:
        """Check the files as they are now and load them into the live contexts, or raise and change nothing."""
        snapshot = self._snapshot()
        server_context(snapshot, require_client_cert=self.require_client_cert, profile=self.profile)
        if self.client is not None:
            client_context(snapshot, profile=self.profile)
        for context in (self.server, self.client):
            if context is not None:
                _load(context, snapshot)

    def _snapshot(self) -> TLSMaterial:
        self.material.check()  # first the files themselves, so that a complaint names the real file
        self._generation += 1
        for old in self._scratch.iterdir():  # OpenSSL has read them; nothing refers to the files any more
            shutil.rmtree(old)
        return self.material.snapshot(self._scratch / str(self._generation))


def revoked_serials(crl_path: Path) -> set[tuple[str, int]]:
    """(issuer, serial) of every certificate the CRL revokes; empty if it cannot be read."""
    try:
        crl = x509.load_pem_x509_crl(crl_path.read_bytes())
    except (OSError, ValueError):
        return set()
    issuer = crl.issuer.rfc4514_string()
    return {(issuer, entry.serial_number) for entry in crl}


def _check_crl(path: Path, intermediates: list[x509.Certificate]) -> None:
    try:
        crl = x509.load_pem_x509_crl(path.read_bytes())
    except FileNotFoundError:
        raise TLSMaterialError(f"{path}: CRL not found — run `make pki` to create it") from None
    except (OSError, ValueError):
        raise TLSMaterialError(f"{path}: not a PEM CRL — regenerate it with `make pki`") from None
    next_update = crl.next_update_utc
    if next_update is not None and next_update < dt.datetime.now(dt.UTC):
        # OpenSSL would then refuse every peer: better to refuse the file and say so.
        raise TLSMaterialError(f"{path}: CRL expired on {next_update:%Y-%m-%d %H:%M}Z — run `make pki` to re-sign it")
    try:
        signer_key_id = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    except x509.ExtensionNotFound:
        signer_key_id = None
    for issuer in intermediates:
        try:
            key_id = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
        except x509.ExtensionNotFound:
            continue
        # Only our own intermediate can judge our CRL (a foreign CA may well use the same name).
        if key_id == signer_key_id and not crl.is_signature_valid(issuer.public_key()):
            raise TLSMaterialError(f"{path}: CRL signature does not verify with {issuer.subject.rfc4514_string()}")


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
