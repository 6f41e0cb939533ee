"""Every `ssl.SSLContext` in the project is built here: the services' (server) and their calls' (client) alike.

One place decides what we trust, which certificate we present and which protocol versions we speak, so a
reader can check the whole TLS posture on one screen and no service can drift from it. (Only experiments
adjust a context built here: the bench caps one at TLS 1.2, the post-handshake-auth demo asks for a
certificate late. The tests' attackers build theirs by hand, as attackers would.)

Before OpenSSL sees a file we check it ourselves with `cryptography`: OpenSSL's own errors ("[SSL] PEM lib")
name neither the file nor the fix, and a service must refuse to start with a sentence that does.
"""

from __future__ import annotations

import _ssl
import datetime as dt
import functools
import hashlib
import ssl
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from cryptography import x509

from shared.certs import (
    authority_key_id,
    crl_blocks,
    crl_number,
    key_id,
    parse_certificates,
    parse_crl,
    parse_key,
    thumbprint,
)
from shared.files import MaterialError, read_protected
from shared.identity import CallerIdentity

TLSProfile = Literal["intermediate", "modern"]
# LiveTLS.recheck: why the trust in force now refuses the peer of a just-completed handshake, or None.
Recheck = Callable[[ssl.SSLObject], str | None]

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


def _cipher_ids() -> dict[str, int]:
    """OpenSSL cipher name → IANA 16-bit id (the ASGI TLS extension wants the number; OpenSSL says the name)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # only asked for its list, never used to connect
    context.set_ciphers("ALL:@SECLEVEL=0")
    return {c["name"]: c["id"] & 0xFFFF for c in context.get_ciphers()}


CIPHER_IDS = _cipher_ids()
MINIMUM_VERSION: dict[str, ssl.TLSVersion] = {
    "intermediate": ssl.TLSVersion.TLSv1_2,
    "modern": ssl.TLSVersion.TLSv1_3,
}


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
    # No session tickets: a resumed handshake checks no certificate, no expiry and no CRL, so a peer revoked
    # (or expired) since its first handshake would get back in with a ticket. No TLS 1.3 tickets, no TLS 1.2
    # tickets. TLS 1.2's session-ID cache cannot be switched off from Python: the protocol re-checks every
    # session resumed that way (LiveTLS.recheck, shared.handshake).
    context.num_tickets = 0
    context.options |= ssl.OP_NO_TICKET
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
    # OpenSSL falls back to the Common Name when a certificate has no DNS SAN (a URI or IP SAN does not stop
    # it), so a certificate with CN=service-b and only a SPIFFE ID would pass as service-b. Names are SANs.
    context.hostname_checks_common_name = False
    _load(context, material)
    return context


def _apply_profile(context: ssl.SSLContext, profile: TLSProfile) -> None:
    if profile not in MINIMUM_VERSION:
        raise MaterialError(f"unknown TLS profile {profile!r}: use 'intermediate' or 'modern'")
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


@dataclass(frozen=True)
class Trust:
    """What a peer certificate is checked against while we run, computed once per reload: set lookups only.

    CAs are named by key, never by name: `pki init --force` makes a new CA with the old one's names.
    """

    anchors: frozenset[str]  # SHA-256 of every CA certificate in ca.crt
    issuers: frozenset[str] | None  # key ids (hex) of the CAs whose leaves count: one CRL each; None: no CRL
    revoked: frozenset[tuple[str, int]]  # (issuer key id, serial) of every certificate the CRLs revoke


class LiveTLS:
    """A running service's TLS contexts, rebuilt from its files whenever they change and swapped in whole.

    We run the handshake ourselves (shared.handshake), and it asks for `server` on every new connection; the
    pool towards the next hop is renewed with `client`. So a rebuilt pair takes effect from the next
    connection on, whatever changed: a renewed certificate, a revocation, a CA added to ca.crt — or taken out
    of it, which loading into a live OpenSSL context could never do. A broken file raises and changes nothing.
    Each file is read once, checked, and written to a private temporary directory only for OpenSSL to load
    (it reads from paths only), then deleted: no copy of the key outlives it.

    A handshake verifies the peer with the context it began with, and it may end after a reload: so every
    handshake, on either side, is checked again against `trust` as it is when it completes (`recheck`), and
    every open connection when it changes (`refusal`, services.reloader). One rule for the three.

    Revocations only grow: a CRL older than the one in force for its issuer, or one that drops a revoked
    certificate, is refused — a lost crl.pem must never quietly un-revoke anyone. "Its issuer" is a key: a
    new CA (`pki init --force`: new keys, the same names) is a new issuer, and its CRL is taken whole, the old
    CA's with it gone. Then the old CA's leaves have no CRL in force and its certificate may have left
    ca.crt: new handshakes refuse them, and the reloader closes their open connections. Refusing the new CA
    instead would leave a service trusting a CA that the PKI, and every service restarted since, no longer
    knows — a mesh split in two. Either way, never half: no old-CA connection outlives the reload.
    """

    def __init__(
        self,
        material: TLSMaterial,
        *,
        require_client_cert: bool = True,
        outgoing: bool = True,
        profile: TLSProfile = "intermediate",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.material = material
        self.clock = clock  # seconds since the epoch: what `refusal` judges a peer's expiry by
        self.require_client_cert = require_client_cert
        self.outgoing = outgoing
        self.profile = profile
        self.crls: list[x509.CertificateRevocationList] = []
        self._crls_by_key: dict[str, x509.CertificateRevocationList] = {}
        self.generation = 0
        self.reload()

    def reload(self) -> None:
        """Build new contexts from the files as they are now and swap them in, or raise and change nothing."""
        data = self.material.read()
        crls = self.material.verify(data)
        anchors = parse_certificates(data["ca"], self.material.ca, "CA file")
        chain = parse_certificates(data["cert"], self.material.cert, "certificate") if "cert" in data else []  # type: ignore[arg-type]
        if len(chain) > 1 and self.material.crl is not None:
            _require_crl_of(chain[1], crls, self.material.crl, self.material.cert)  # type: ignore[arg-type]
        keyed = {_crl_key(crl, [*anchors, *chain[1:]], self.material.crl): crl for crl in crls}  # type: ignore[arg-type]
        for key, crl in keyed.items():
            if key in self._crls_by_key:
                _check_successor(self._crls_by_key[key], crl, self.material.crl)  # type: ignore[arg-type]
        with _scratch() as directory:
            files = self.material.written_to(directory, data)
            server = server_context(files, require_client_cert=self.require_client_cert, profile=self.profile)
            client = client_context(files, profile=self.profile) if self.outgoing else None
        self.server, self.client, self.crls, self._crls_by_key = server, client, crls, keyed
        self.anchors = [thumbprint(anchor) for anchor in anchors]  # what we trust, for /healthz and the gates
        self.trust = Trust(
            anchors=frozenset(self.anchors),
            issuers=frozenset(keyed) if self.material.crl is not None else None,
            revoked=frozenset((key, entry.serial_number) for key, crl in keyed.items() for entry in crl),
        )
        self.certificate = chain[0] if chain else None
        self.generation += 1

    def recheck(self, ssl_object: ssl.SSLObject) -> str | None:
        """Why the trust in force now refuses the peer of this just-completed handshake, or None.

        The handshake verified the chain with the context it began with, which a reload may have replaced
        since: a revocation, a CA retired or replaced. A resumed session carries no chain to name its CA: it
        passes only on the context in force, under which the full handshake it resumes was made.
        """
        peer = connection_peer(ssl_object)
        if peer is None:
            return None  # no certificate: CERT_REQUIRED refused it already, CERT_OPTIONAL leaves it to the app
        if peer.anchor is None and ssl_object.context not in (self.server, self.client):
            return "resumed a session made under trust that has changed since (a full handshake is needed)"
        return self.refusal(peer)

    def refusal(self, peer: CallerIdentity) -> str | None:
        """Why a peer verified earlier would be refused now, or None. Set lookups only: it runs on every handshake."""
        trust = self.trust
        if peer.not_after is not None and dt.datetime.fromtimestamp(self.clock(), dt.UTC) > peer.not_after:
            return "certificate has expired"
        if peer.anchor is not None and peer.anchor not in trust.anchors:
            return f"its root CA (SHA-256 {peer.anchor[:16]}…) is no longer trusted: it is not in ca.crt"
        if trust.issuers is not None and peer.issuer_key_id not in trust.issuers:
            issuer = peer.issuer_key_id[:16] or "none"
            return f"its issuing CA (key id {issuer}…) is no longer trusted: no CRL of it is in force"
        if (peer.issuer_key_id, peer.serial) in trust.revoked:
            return "certificate revoked"
        return None


def connection_peer(ssl_object: ssl.SSLObject) -> CallerIdentity | None:
    """The peer of this connection, with the CAs its chain was verified with: the CA certificate it chained to
    (`anchor`) and the key of the CA that issued it — what OpenSSL verified, not what the leaf claims (a leaf
    need not carry an AKI). A resumed session has no chain: then no anchor, and the issuer key the leaf names.

    Python 3.13 has `get_verified_chain()` (DER bytes); 3.10 to 3.12 have it on the inner `_sslobj` only
    (certificate objects). A blocking socket (the CLI client's) is that inner object itself.
    """
    der = ssl_object.getpeercert(True)
    if not der:
        return None
    peer = CallerIdentity.from_der(der)
    get_chain = getattr(ssl_object, "get_verified_chain", None) or getattr(
        getattr(ssl_object, "_sslobj", None), "get_verified_chain", None
    )
    chain = [c if isinstance(c, bytes) else c.public_bytes(_ssl.ENCODING_DER) for c in (get_chain() or [])]
    if not chain:
        return peer
    issuer = chain[1] if len(chain) > 1 else chain[0]  # a chain of one: a self-signed certificate we trust as such
    return replace(peer, anchor=hashlib.sha256(chain[-1]).hexdigest(), issuer_key_id=_key_id(issuer))


@functools.lru_cache(maxsize=64)
def _key_id(der: bytes) -> str:
    """The key id (hex) of a CA certificate: parsed once, since every peer of a mesh shows the same few CAs."""
    return (key_id(x509.load_der_x509_certificate(der)) or b"").hex()


@contextmanager
def _scratch() -> Iterator[Path]:
    """A directory only we can enter (0700), removed with everything in it as soon as OpenSSL has read it."""
    with tempfile.TemporaryDirectory(prefix="mesh-tls-") as directory:
        yield Path(directory)


def _crl_key(crl: x509.CertificateRevocationList, cas: list[x509.Certificate], path: Path) -> str:
    """The key id (hex) of the CA that signed `crl`: its AKI, or for a CRL that omits it (RFC 5280 says it
    must not), the key of the CA certificate of ours that bears its issuer's name."""
    if (signer := authority_key_id(crl)) is not None:
        return signer.hex()
    for ca in cas:
        if ca.subject == crl.issuer and (key := key_id(ca)) is not None:
            return key.hex()
    raise MaterialError(
        f"{path}: a CRL of {crl.issuer.rfc4514_string()} names no issuer key (AuthorityKeyIdentifier) and no CA "
        "certificate of ours bears that name — regenerate it with `make pki`"
    )


def _check_successor(current: x509.CertificateRevocationList, new: x509.CertificateRevocationList, path: Path) -> None:
    """Refuse a CRL from the same issuer key that is older than the one in force, or that forgets a revocation."""
    dropped = {entry.serial_number for entry in current} - {entry.serial_number for entry in new}
    if crl_number(new) < crl_number(current) or dropped:
        what = f"number {crl_number(new)} with {len(list(new))} entries; in force: number {crl_number(current)}"
        if dropped:
            what += f", and it drops the revoked serial(s) {', '.join(f'{s:x}' for s in sorted(dropped))}"
        raise MaterialError(
            f"{path}: refusing a CRL of {new.issuer.rfc4514_string()} (the same key as the one in force) that would "
            f"un-revoke certificates ({what}) — the CA's revocation record (pki/out/revocations.json) re-creates "
            "the full list: run `make pki`"
        )


def _require_crl_of(
    issuer: x509.Certificate, crls: list[x509.CertificateRevocationList], path: Path, cert: Path
) -> None:
    """Refuse a crl.pem without a CRL that the CA which signed a service's own certificate signed with its key.

    Its peers are the service's: without its CRL OpenSSL refuses every one of them, and the revocations in force
    for it would be forgotten (a CRL signed by a stray key — a CA key restored from the wrong backup — once took its
    place: the mesh went down, and an older crl.pem put back after it un-revoked a stolen key).
    """
    ours = key_id(issuer)

    def signed_by_it(crl: x509.CertificateRevocationList) -> bool:  # a matching AKI was verified in _usable_crl
        signer = authority_key_id(crl)
        return signer == ours if signer is not None else crl.is_signature_valid(issuer.public_key())

    if not any(crl.issuer == issuer.subject and signed_by_it(crl) for crl in crls):
        raise MaterialError(
            f"{path}: no CRL signed by {issuer.subject.rfc4514_string()}, the CA that signed {cert}, so the whole file "
            "is refused and the revocations in force stay as they were — run `make pki` to re-sign it (it stops, "
            "naming the files, if the CA's key does not belong to its certificate)"
        )


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
