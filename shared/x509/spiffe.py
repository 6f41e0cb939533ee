"""SPIFFE IDs and X509-SVIDs: the name the CA vouches for, read by the rules of the SPIFFE standard.

    SpiffeId.parse("spiffe://mesh.internal/service-a")    # SpiffeId(trust_domain='mesh.internal', path='/service-a')
    svid_id(leaf)                                         # the SPIFFE ID of a certificate, or InvalidSvid(rule)

The rules (SPIFFE-ID.md and X509-SVID.md in github.com/spiffe/spiffe, as go-spiffe enforces them): the
scheme is `spiffe`; the trust domain is lowercase letters, digits, `.`, `-` and `_`; the path, if any, is
segments of `[A-Za-z0-9._-]`, none empty, none `.` or `..`; no query, fragment, port or user info; at most
2048 bytes. An X509-SVID leaf carries exactly one URI SAN, that ID, and is no CA: CA=false, neither
keyCertSign nor cRLSign. A certificate that breaks a rule has no SPIFFE ID at all — never a guessed one.

Why not the PyPI `spiffe` package: it parses X509-SVIDs offline, but brings gRPC, protobuf and PyJWT for
the Workload API we do not use. This is the parse alone, tested against the specification's examples.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cryptography import x509

__all__ = ["InvalidSpiffeId", "InvalidSvid", "SpiffeId", "svid_id"]

MAX_LENGTH = 2048
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")


class InvalidSpiffeId(ValueError):
    """The text is not a SPIFFE ID; the message says which rule it breaks."""


class InvalidSvid(ValueError):
    """The certificate is not an X509-SVID; the message says which rule it breaks."""


@dataclass(frozen=True, order=True)
class SpiffeId:
    trust_domain: str
    path: str = ""  # "" or "/segment/…"

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        """The SPIFFE ID in `text`, or InvalidSpiffeId naming the rule it breaks."""
        if len(text.encode()) > MAX_LENGTH:
            raise InvalidSpiffeId(f"longer than {MAX_LENGTH} bytes")
        scheme, separator, rest = text.partition("://")
        if not separator or scheme != "spiffe":
            raise InvalidSpiffeId("the scheme must be spiffe:// (lowercase)")
        if "?" in rest or "#" in rest:
            raise InvalidSpiffeId("a SPIFFE ID has no query or fragment")
        authority, slash, path = rest.partition("/")
        if "@" in authority or ":" in authority:
            raise InvalidSpiffeId("the trust domain has no user info and no port")
        if not authority:
            raise InvalidSpiffeId("the trust domain is empty")
        if not _TRUST_DOMAIN.fullmatch(authority):
            raise InvalidSpiffeId(f"the trust domain {authority!r} may hold only a-z, 0-9, '.', '-' and '_'")
        if slash:
            for segment in path.split("/"):
                if not segment:
                    raise InvalidSpiffeId("the path has an empty segment (// or a trailing /)")
                if segment in (".", ".."):
                    raise InvalidSpiffeId("the path has a '.' or '..' segment")
                if not _SEGMENT.fullmatch(segment):
                    raise InvalidSpiffeId(f"the path segment {segment!r} may hold only A-Z, a-z, 0-9, '.', '-' and '_'")
        return cls(authority, slash + path)

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}{self.path}"


def svid_id(cert: x509.Certificate) -> SpiffeId:
    """The SPIFFE ID of an X509-SVID leaf, or InvalidSvid saying which rule the certificate breaks."""
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        if basic.ca:
            raise InvalidSvid("it is a CA certificate (CA=true), not a leaf SVID")
    except x509.ExtensionNotFound:
        pass
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if usage.key_cert_sign or usage.crl_sign:
            raise InvalidSvid("a leaf SVID may not sign certificates or CRLs (keyCertSign or cRLSign is set)")
    except x509.ExtensionNotFound:
        pass
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if len(uris) != 1:
        raise InvalidSvid(f"an X509-SVID has exactly one URI SAN; this certificate has {len(uris)}")
    try:
        return SpiffeId.parse(uris[0])
    except InvalidSpiffeId as e:
        raise InvalidSvid(f"its URI SAN {uris[0]!r} is no SPIFFE ID: {e}") from None
