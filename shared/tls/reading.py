"""What a reload reads: every TLS file checked, each CRL reduced to what a running service checks peers against.

`read(material)` is a pure function of the files with a picklable result, so that it can run anywhere: in the
service's own thread at start, off the event loop while it runs — on a worker thread, or for a large CRL in a
child process (services.offload). A CRL of 100,000 entries is megabytes of ASN.1, parsed by calls that hold the
interpreter lock for tens of milliseconds each, and 100,000 Python objects: read in-process it stalled every
request in flight. What comes back is small to hand over: one set of serials per CRL, never the CRL's objects.

    read(TLSMaterial(ca, cert, key, crl))   # → Read, or MaterialError naming the file and the fix
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from shared.packed import Serials
from shared.tls.material import TLSMaterial
from shared.x509.certs import authority_key_id, crl_number, key_id, parse_certificates, thumbprint
from shared.x509.files import MaterialError

__all__ = ["Read", "Revocations", "read", "verify_later"]


@dataclass(frozen=True)
class Revocations:
    """One CRL as a running service uses it: whose it is, which it is, when it is good, and what it revokes."""

    issuer: str  # the CA's name (RFC 4514), for people
    key: str  # the key id (hex) of the CA that signed it: CAs are told apart by key (shared.tls.live)
    number: int  # its CRLNumber: a successor must not be lower
    last_update: dt.datetime
    next_update: dt.datetime | None
    serials: Serials  # of every certificate it revokes, packed: handed over in a millisecond at 100,000
    # Kept only while its signature is still to be verified: a CRL of another intermediate of ours, during a CA
    # rollover, whose certificate comes with the first peer it issued (LiveTLS.recheck).
    der: bytes | None = None


@dataclass(frozen=True)
class Read:
    """The TLS files, checked: their bytes for OpenSSL, and what the trust in force is built from."""

    # "ca", and "cert" and "key" if given: exactly what was checked (the CRL aside). Not in repr: it holds the key.
    files: dict[str, bytes] = field(repr=False)
    anchors: list[str]  # SHA-256 of every CA certificate in ca.crt, in its order
    revocations: dict[str, Revocations]  # one CRL per CA, by its key id, in crl.pem's order
    checked_against: list[Revocations]  # the CRLs in force when it was read: none here un-revokes any of them


def read(material: TLSMaterial, in_force: Iterable[Revocations] = ()) -> Read:
    """Read and check `material`'s files once, or raise MaterialError naming the file and the fix. `in_force`:
    the CRLs a running service holds, which a CRL of the same CA (by key) may replace but never un-revoke."""
    data = material.read()
    crls = material.verify(data)
    anchors = parse_certificates(data["ca"], material.ca, "CA file")
    chain = parse_certificates(data["cert"], material.cert, "certificate") if "cert" in data else []  # type: ignore[arg-type]
    keyed: dict[str, x509.CertificateRevocationList] = {}
    if material.crl is not None:
        if len(chain) > 1:
            _require_crl_of(chain[1], crls, material.crl, material.cert)  # type: ignore[arg-type]
        keyed = _one_per_key(crls, [*anchors, *chain[1:]], material.crl)
    unverified = _verify_signatures(keyed, anchors, chain[1:], material.crl)  # type: ignore[arg-type]
    revocations = {key: _reduced(key, crl, material.crl, keep_der=key in unverified) for key, crl in keyed.items()}
    held = list(in_force)
    for current in held:
        if current.key in revocations:
            _check_successor(current, revocations[current.key], material.crl)  # type: ignore[arg-type]
    return Read(
        files={field: content for field, content in data.items() if field != "crl"},
        anchors=[thumbprint(anchor) for anchor in anchors],
        revocations=revocations,
        checked_against=held,
    )


def _reduced(key: str, crl: x509.CertificateRevocationList, path: Path | None, *, keep_der: bool) -> Revocations:
    try:
        serials = Serials.of(entry.serial_number for entry in crl)
    except ValueError as e:
        raise MaterialError(f"{path}: the CRL of {crl.issuer.rfc4514_string()} lists {e} — regenerate it") from None
    return Revocations(
        issuer=crl.issuer.rfc4514_string(),
        key=key,
        number=crl_number(crl),
        last_update=crl.last_update_utc,
        next_update=crl.next_update_utc,
        serials=serials,
        der=crl.public_bytes(Encoding.DER) if keep_der else None,
    )


def _check_successor(current: Revocations, new: Revocations, path: Path) -> None:
    """Refuse a CRL from the same issuer key that is older than the one in force, or that forgets a revocation."""
    dropped = current.serials - new.serials
    if new.number < current.number or dropped:
        what = f"number {new.number} with {len(new.serials)} entries; in force: number {current.number}"
        if dropped:
            what += f", and it drops the revoked serial(s) {', '.join(f'{s:x}' for s in sorted(dropped))}"
        raise MaterialError(
            f"{path}: refusing a CRL of {new.issuer} (the same key as the one in force) that would "
            f"un-revoke certificates ({what}) — the CA's revocation record (pki/out/revocations.json) re-creates "
            "the full list: run `make pki`"
        )


def verify_later(revocations: Revocations, issuer: x509.Certificate) -> bool:
    """Whether `issuer` — from a peer's verified chain — signed the CRL kept for it (`Revocations.der`)."""
    assert revocations.der is not None
    crl = x509.load_der_x509_crl(revocations.der)
    return crl.issuer == issuer.subject and crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]


def _one_per_key(
    crls: list[x509.CertificateRevocationList], cas: list[x509.Certificate], path: Path
) -> dict[str, x509.CertificateRevocationList]:
    """Each CRL by the key of the CA that signed it — one per key. Two of one CA would leave the choice to the
    order of the file, and an older one placed last (genuine, signed, unexpired) would un-revoke certificates."""
    keyed: dict[str, x509.CertificateRevocationList] = {}
    for crl in crls:
        key = _crl_key(crl, cas, path)
        if key in keyed:
            raise MaterialError(
                f"{path}: two CRLs of {crl.issuer.rfc4514_string()} (numbers {crl_number(keyed[key])} and "
                f"{crl_number(crl)}), so the whole file is refused and the revocations in force stay as they were — "
                "one CRL per CA: run `make pki` to re-sign it"
            )
        keyed[key] = crl
    return keyed


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


def _verify_signatures(
    keyed: dict[str, x509.CertificateRevocationList],
    anchors: list[x509.Certificate],
    intermediates: list[x509.Certificate],
    path: Path,
) -> set[str]:
    """Verify each CRL whose CA certificate we hold (TLSMaterial.verify did those of our own intermediates that
    name it); return the keys of the others, for `LiveTLS.recheck` to verify with a peer's verified chain."""
    ours = {key.hex(): ca for ca in [*anchors, *intermediates] if (key := key_id(ca)) is not None}
    checked = {key.hex() for ca in intermediates if (key := key_id(ca)) is not None}
    unverified = set()
    for key, crl in keyed.items():
        ca = ours.get(key)
        if ca is None:
            unverified.add(key)
        elif not (key in checked and authority_key_id(crl) is not None) and (
            crl.issuer != ca.subject or not crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
        ):
            raise MaterialError(f"{path}: CRL signature does not verify with {ca.subject.rfc4514_string()}")
    return unverified


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
