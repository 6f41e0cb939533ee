"""Revocation: the CA's record of revoked certificates, and the CRL rendered from it.

    revoke(layout, "service-b", "key-compromise")   # every unexpired certificate the ledger has for service-b,
                                                    # recorded in revocations.json, then a new crl.pem

The record is the truth and the CRL its signed copy: a lost crl.pem is rendered again, whole, by `make pki`.
CRL numbers and lastUpdate only ever go up, because a running service refuses a CRL older than its own.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization

from pki import ledger
from pki.authority import CLOCK_SKEW, CertificateAuthority, PKIError, load_issuer, now
from pki.output import write_file
from shared.layout import Layout
from shared.x509 import MaterialError, crl_number, load_certificates, load_crl, load_crls, thumbprint

__all__ = [
    "CRL_VALIDITY",
    "REVOCATION_REASONS",
    "crl_needs_renewal",
    "first_crl",
    "revocation_reason",
    "revoke",
    "revoke_certificate",
    "revoke_serial",
    "revoked",
    "revoked_in_place",
    "write_crl",
]

# Peers refuse a CRL past its nextUpdate, and with CRL checking on, that means refusing every leaf of its CA.
# So every CRL we can sign is re-signed once half its lifetime (the policy's crl_lifetime) has passed: by the
# renewer (`python -m pki renew --watch`) on schedule, or by `make pki`. The services warn at a quarter left.
CRL_VALIDITY = dt.timedelta(days=30)  # the policy's default crl_lifetime; `pki revoke` signs for the policy's own
RESIGN_AT = 0.5  # of crl_lifetime left
# RFC 5280 §5.3.1: rather than the reason code `unspecified`, no reason code at all.
REVOCATION_REASONS = {
    "unspecified": x509.ReasonFlags.unspecified,
    "key-compromise": x509.ReasonFlags.key_compromise,
    "superseded": x509.ReasonFlags.superseded,
    "cessation-of-operation": x509.ReasonFlags.cessation_of_operation,
    "affiliation-changed": x509.ReasonFlags.affiliation_changed,
}


def crl_needs_renewal(layout: Layout, lifetime: dt.timedelta = CRL_VALIDITY) -> bool:
    """No crl.pem; or any CRL in it (one per CA in play: two during a rollover) with less than half of
    `lifetime` left — or with more than `lifetime` left, signed before the policy shortened it."""
    if not layout.crl.exists():
        return True
    left = [_time_left(crl) for crl in load_crls(layout.crl)]
    return not left or any(s is None or s < lifetime * RESIGN_AT or s > lifetime + SLACK for s in left)


SLACK = dt.timedelta(seconds=1)  # `now()` drops the fractions of a second the CRL was signed at


def _time_left(crl: x509.CertificateRevocationList) -> dt.timedelta | None:
    return None if crl.next_update_utc is None else crl.next_update_utc - now()


def _read_record(layout: Layout) -> dict[str, Any]:
    """The revocation record: {"crl_number", "last_update", "revoked": [{"serial", "date", "reason", "name"}]}.

    A PKI made before the record existed gets one seeded from its crl.pem.
    """
    if layout.revocations.exists():
        try:
            return json.loads(layout.revocations.read_text())
        except (OSError, ValueError) as e:
            raise PKIError(
                f"{layout.revocations}: unreadable revocation record ({e}); restore it from backup"
            ) from None
    record: dict[str, Any] = {"crl_number": 0, "last_update": None, "revoked": []}
    if layout.crl.exists():
        crl = load_crl(layout.crl)
        record["crl_number"] = crl_number(crl)
        record["last_update"] = crl.last_update_utc.isoformat()
        record["revoked"] = [_as_record(entry) for entry in crl]
    return record


def write_crl(layout: Layout, lifetime: dt.timedelta = CRL_VALIDITY) -> x509.CertificateRevocationList:
    """Sign every CRL whose CA key we hold, valid for `lifetime`, and write them into crl.pem: the
    intermediate's from the revocation record (returned), and during a CA rollover the other intermediate's.

    The CRL lists serial numbers, not names: it revokes one certificate, and a re-issued certificate for
    the same name (a new serial) is unaffected. Numbers and dates only go up, even if crl.pem was lost:
    a running service refuses a CRL older than the one it has (shared.tls), and rightly so.
    """
    issuing = load_issuer(layout)
    record = _read_record(layout)
    previous = load_crl(layout.crl) if layout.crl.exists() else None
    floor = dt.datetime.fromisoformat(record["last_update"]) if record["last_update"] else None
    if previous is not None:
        floor = max(floor or previous.last_update_utc, previous.last_update_utc)
    number = max(record["crl_number"], crl_number(previous) if previous is not None else 0) + 1
    crl = _sign(issuing, record["revoked"], number, floor, lifetime)
    record |= {"crl_number": number, "last_update": crl.last_update_utc.isoformat()}
    _write_record(layout, record)
    write_file(layout.crl, _pem(crl) + _resign_other(layout, record["revoked"], lifetime))
    return crl


def first_crl(issuer: CertificateAuthority, lifetime: dt.timedelta = CRL_VALIDITY) -> bytes:
    """A new intermediate's first CRL: no entries yet, but peers need one to accept its leaves."""
    return _pem(_sign(issuer, [], 1, None, lifetime))


def _resign_other(layout: Layout, record: list[dict[str, Any]], lifetime: dt.timedelta) -> bytes:
    """During a CA rollover, the other intermediate's CRL, re-signed with its key (rollover/intermediate.key):
    left as it was, it would expire mid-rollover, and a service refuses a crl.pem with an expired CRL whole.

    It keeps its own entries and takes the record's for certificates that CA signed — and those whose issuer
    the record does not say (made before it did): serials are random 159-bit numbers, so a serial listed under
    the other CA revokes nothing else.
    """
    path = layout.rollover / "crl.pem"
    if not path.exists():
        return b""
    previous = load_crl(path)
    cert, key = layout.rollover / "intermediate.crt", layout.rollover / "intermediate.key"
    try:
        signer = CertificateAuthority.load(cert, key)
    except MaterialError as e:
        raise PKIError(
            f"{path}: the CRL of {previous.issuer.rfc4514_string()} cannot be re-signed without its CA ({key}: "
            f"{e}); restore {cert.name} and {key.name} from backup, then run `make rotate-ca` to finish the rollover"
        ) from None
    if signer.cert.subject != previous.issuer or not previous.is_signature_valid(signer.cert.public_key()):
        raise PKIError(f"{path}: not signed by {cert} — the rollover's files do not belong together")
    key_id = x509.SubjectKeyIdentifier.from_public_key(signer.key.public_key()).digest.hex()
    its_own = [entry for entry in record if entry.get("issuer_key_id", key_id) in (key_id, "")]
    entries = {entry["serial"]: entry for entry in [*map(_as_record, previous), *its_own]}
    crl = _sign(signer, list(entries.values()), crl_number(previous) + 1, previous.last_update_utc, lifetime)
    write_file(path, _pem(crl))
    return _pem(crl)


def _sign(
    issuer: CertificateAuthority,
    entries: list[dict[str, Any]],
    number: int,
    floor: dt.datetime | None,
    lifetime: dt.timedelta,
) -> x509.CertificateRevocationList:
    """A CRL valid for `lifetime` from now, its lastUpdate back-dated for slow clocks but later than `floor`."""
    signed = now()
    # Back-dated like certificates (a peer whose clock runs behind must accept it), but never by more than a
    # quarter of its life: a 20-second CRL back-dated 5 minutes would spend its whole validity in the past.
    last_update = signed - min(CLOCK_SKEW, dt.timedelta(seconds=lifetime.total_seconds() // 4))
    if floor is not None:
        # OpenSSL keeps every CRL a running service has loaded and checks against the one with the latest
        # lastUpdate — keeping the *first* on a tie. So each CRL must be strictly newer than the one before,
        # even when two revocations come within the same second.
        last_update = min(max(last_update, floor + dt.timedelta(seconds=1)), signed)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.cert.subject)
        .last_update(last_update)
        .next_update(signed + lifetime)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False)
    )
    for entry in entries:
        revoked_cert = (
            x509.RevokedCertificateBuilder()
            .serial_number(int(entry["serial"], 16))
            .revocation_date(dt.datetime.fromisoformat(entry["date"]))
        )
        if (reason := REVOCATION_REASONS[entry["reason"]]) != x509.ReasonFlags.unspecified:  # RFC 5280 §5.3.1
            revoked_cert = revoked_cert.add_extension(x509.CRLReason(reason), critical=False)
        builder = builder.add_revoked_certificate(revoked_cert.build())
    return builder.sign(issuer.key, hashes.SHA256())


def revocation_reason(entry: x509.RevokedCertificate) -> str:
    """Why a CRL entry says its certificate was revoked, by its name in REVOCATION_REASONS (another code by
    RFC 5280's); `unspecified` when it says nothing, as pki writes it (RFC 5280 §5.3.1)."""
    try:
        flag = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except x509.ExtensionNotFound:
        return "unspecified"
    return next((name for name, known in REVOCATION_REASONS.items() if known == flag), flag.value)


def _as_record(entry: x509.RevokedCertificate) -> dict[str, str]:
    """A CRL entry as the record writes it: with a reason pki can sign again (else `unspecified`)."""
    reason = revocation_reason(entry)
    reason = reason if reason in REVOCATION_REASONS else "unspecified"
    return {"serial": f"{entry.serial_number:x}", "date": entry.revocation_date_utc.isoformat(), "reason": reason}


def _pem(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.PEM)


def _write_record(layout: Layout, record: dict[str, Any]) -> None:
    write_file(layout.revocations, (json.dumps(record, indent=2) + "\n").encode())


def revoke(layout: Layout, name: str, reason: str = "unspecified", lifetime: dt.timedelta = CRL_VALIDITY) -> list[int]:
    """Revoke every unexpired certificate ever issued to `name`; return their serials.

    Not just the one in pki/out/<name>.crt: after a renewal that is the new certificate, and the stolen copy of
    the old one would keep working for the rest of its life. The ledger (pki.ledger) knows them all. The
    revocations go into the record first, then into a new CRL: whatever happens to crl.pem later, `make pki`
    renders it again with them in it, signed for `lifetime` (pass the policy's crl_lifetime). Revoking twice
    changes nothing.

        revoke(layout, "client", "key-compromise")   # then give it a fresh certificate: `pki revoke` does
    """
    issued = ledger.unexpired(layout, name)
    if not issued:
        raise PKIError(
            f"the ledger ({layout.ledger}) has no unexpired certificate issued to {name!r}: nothing to revoke "
            "(`python -m pki list` shows every identity and its certificates)"
        )
    _add(layout, issued, reason, lifetime)
    return [int(entry.serial, 16) for entry in issued]


def revoke_serial(layout: Layout, serial: int, reason: str, *, lifetime: dt.timedelta) -> ledger.Issued:
    """Revoke the one certificate with this serial number, which the ledger must know; return its entry."""
    entry = ledger.find(layout, serial)
    if entry is None:
        raise PKIError(
            f"serial {serial:x} is not in the ledger ({layout.ledger}): this CA did not issue it, or issued it "
            "before it kept a ledger — give the certificate itself with `--cert FILE`"
        )
    _add(layout, [entry], reason, lifetime)
    return entry


def revoke_certificate(layout: Layout, path: Path, reason: str, *, lifetime: dt.timedelta) -> ledger.Issued:
    """Revoke the (first) certificate in `path` — a copy found somewhere, an old one kept in previous/.

    It must be one of ours: in the ledger, or signed by our intermediate's key. A CRL of ours means nothing for
    a certificate another CA signed, and listing it would only say that we think it does.
    """
    cert = load_certificates(path)[0]
    entry = ledger.find(layout, cert.serial_number)
    if entry is None or entry.sha256 != thumbprint(cert):
        # Its signature, not the key id it claims: anyone can copy our AKI and a live certificate's serial into
        # a file of their own, and revoking that serial would cut off the identity that really holds it.
        if not _signed_by(cert, load_issuer(layout).cert):
            raise PKIError(
                f"{path}: not a certificate this CA issued (not in {layout.ledger.name}, not signed by "
                f"{layout.intermediate_cert.name}'s key): our CRL cannot revoke it"
            )
        entry = ledger.Issued.of(path.stem, cert)
    _add(layout, [entry], reason, lifetime)
    return entry


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _add(layout: Layout, issued: list[ledger.Issued], reason: str, lifetime: dt.timedelta) -> None:
    if reason not in REVOCATION_REASONS:
        raise PKIError(f"unknown reason {reason!r}: choose one of {', '.join(REVOCATION_REASONS)}")
    record = _read_record(layout)
    known = {entry["serial"] for entry in record["revoked"]}
    fresh = [entry for entry in issued if entry.serial not in known]
    if not fresh:
        return
    date = now().isoformat()
    record["revoked"] += [
        {"serial": e.serial, "date": date, "reason": reason, "name": e.name, "issuer_key_id": e.issuer_key_id}
        for e in fresh
    ]
    _write_record(layout, record)
    write_crl(layout, lifetime)


def revocation_record(layout: Layout) -> dict[str, Any]:
    """The revocation record, read-only: what every CRL of our intermediate must at least say (pki.check)."""
    return _read_record(layout)


def revoked(layout: Layout) -> dict[str, dict[str, Any]]:
    """Serial (hex) → its entry in the revocation record (date, reason, name)."""
    return {entry["serial"]: entry for entry in _read_record(layout)["revoked"]}


def revoked_in_place(layout: Layout, names: list[str]) -> list[str]:
    """The identities whose current certificate is revoked: every peer refuses them until they are re-issued."""
    serials = revoked(layout)
    return [
        name
        for name in names
        if layout.cert(name).exists() and f"{load_certificates(layout.cert(name))[0].serial_number:x}" in serials
    ]
