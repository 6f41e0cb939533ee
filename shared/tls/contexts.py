"""Every `ssl.SSLContext` in the project is built here: the services' (server) and their calls' (client) alike.

One place decides what we trust, which certificate we present and which protocol versions we speak, so a
reader can check the whole TLS posture on one screen and no service can drift from it. (Only experiments
adjust a context built here: the bench caps one at TLS 1.2, the post-handshake-auth demo asks for a
certificate late. The tests' attackers build theirs by hand, as attackers would.)
"""

from __future__ import annotations

import ssl
from typing import Literal

from shared.tls.material import TLSMaterial
from shared.x509.files import MaterialError

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


def server_context(
    material: TLSMaterial,
    *,
    require_client_cert: bool = True,
    profile: TLSProfile = "intermediate",
    openssl_crl: bool = True,
) -> ssl.SSLContext:
    """For uvicorn: present our certificate, and demand one from every client, signed by our CA.

    `require_client_cert=False` gives CERT_OPTIONAL (Kestrel's AllowCertificate): the handshake succeeds
    without a certificate and the application must then refuse. CERT_REQUIRED (RequireCertificate) is the
    default because it refuses at the door: a caller without a valid certificate never reaches Python code.
    `openssl_crl=False`: see `_load` — only for LiveTLS, which checks revocation itself.
    """
    material.check()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _apply_profile(context, profile)
    context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    # No session tickets: a resumed handshake checks no certificate, no expiry and no CRL, so a peer revoked
    # (or expired) since its first handshake would get back in with a ticket. No TLS 1.3 tickets, no TLS 1.2
    # tickets. TLS 1.2's session-ID cache cannot be switched off from Python: the protocol re-checks every
    # session resumed that way (LiveTLS.recheck, shared.inbound.handshake).
    context.num_tickets = 0
    context.options |= ssl.OP_NO_TICKET
    _load(context, material, openssl_crl)
    return context


def client_context(
    material: TLSMaterial, *, profile: TLSProfile = "intermediate", openssl_crl: bool = True
) -> ssl.SSLContext:
    """For httpx: trust only our CA, check the callee's name and revocation, present our own certificate.

    Hostname checking is what makes "the callee is service-b" true rather than "the callee has some
    certificate from our CA": every service certificate chains to the same root, so the name is what
    tells them apart. Callers connect with the callee's name as TLS server name (see shared.outbound.downstream).
    With a CRL this is the analogue of .NET's `CheckCertificateRevocationList = true`.
    """
    material.check()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname=True, CERT_REQUIRED
    _apply_profile(context, profile)
    # OpenSSL falls back to the Common Name when a certificate has no DNS SAN (a URI or IP SAN does not stop
    # it), so a certificate with CN=service-b and only a SPIFFE ID would pass as service-b. Names are SANs.
    context.hostname_checks_common_name = False
    _load(context, material, openssl_crl)
    return context


def _apply_profile(context: ssl.SSLContext, profile: TLSProfile) -> None:
    if profile not in MINIMUM_VERSION:
        raise MaterialError(f"unknown TLS profile {profile!r}: use 'intermediate' or 'modern'")
    context.minimum_version = MINIMUM_VERSION[profile]
    context.set_ciphers(TLS12_CIPHERS)  # TLS 1.2 only; TLS 1.3 suites are configured apart, all fine
    # Compression leaks secrets (CRIME); renegotiation lets a peer restart the handshake mid-connection:
    # a CPU sink and, historically, an injection vector. TLS 1.3 has neither.
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION


def _load(context: ssl.SSLContext, material: TLSMaterial, openssl_crl: bool = True) -> None:
    # Only our CA: not the system bundle, or any public CA's customer could present a "valid" certificate.
    context.load_verify_locations(cafile=material.ca)
    # OpenSSL checks the CRL's signature again on every handshake, hashing the whole list: 100,000 entries made a
    # handshake 4–5× dearer. A running service (LiveTLS) verifies each CRL once, when it loads it, and checks every
    # completed handshake against a set of revoked serials before a byte of the request is read (LiveTLS.recheck)
    # on either side: it asks for contexts without the CRL. Everyone else (the CLI client, pki's gates) keeps
    # OpenSSL's check.
    if material.crl is not None and openssl_crl:
        # The leaf only: our CRL is the intermediate's, and CHAIN would also demand one from the root.
        context.load_verify_locations(cafile=material.crl)
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    if material.cert is not None:
        context.load_cert_chain(material.cert, material.key)
