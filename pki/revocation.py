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
from cryptography.hazmat.primitives import hashes, serialization

from pki import ledger
from pki.authority import CLOCK_SKEW, PKIError, load_issuer, now
from pki.output import write_file
from shared.certs import crl_number, load_certificates, load_crl, thumbprint
from shared.layout import Layout

__all__ = [
    "CRL_VALIDITY",
    "REVOCATION_REASONS",
    "crl_needs_renewal",
    "revoke",
    "revoke_certificate",
    "revoke_serial",
    "revoked",
    "revoked_in_place",
    "write_crl",
]

# Peers refuse a CRL past its next-update time, and with CRL checking on, that means refusing everyone.
# `make pki` re-signs the CRL when it has RENEW_BEFORE left; run it from cron in anything long-lived.
CRL_VALIDITY = dt.timedelta(days=30)
RENEW_BEFORE = dt.timedelta(days=7)
REVOCATION_REASONS = {
    "unspecified": x509.ReasonFlags.unspecified,
    "key-compromise": x509.ReasonFlags.key_compromise,
    "superseded": x509.ReasonFlags.superseded,
    "cessation-of-operation": x509.ReasonFlags.cessation_of_operation,
    "affiliation-changed": x509.ReasonFlags.affiliation_changed,
}


def crl_needs_renewal(layout: Layout) -> bool:
    """No crl.pem, or one within RENEW_BEFORE of its nextUpdate."""
    if not layout.crl.exists():
        return True
    next_update = load_crl(layout.crl).next_update_utc
    return next_update is None or next_update - RENEW_BEFORE < now()


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
        for entry in crl:
            try:
                reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
            except x509.ExtensionNotFound:
                reason = x509.ReasonFlags.unspecified
            name = next((k for k, v in REVOCATION_REASONS.items() if v == reason), "unspecified")
            record["revoked"].append(
                {"serial": f"{entry.serial_number:x}", "date": entry.revocation_date_utc.isoformat(), "reason": name}
            )
    return record


def write_crl(layout: Layout) -> x509.CertificateRevocationList:
    """Sign a new CRL with the intermediate from the revocation record: the next number, valid for CRL_VALIDITY.

    The CRL lists serial numbers, not names: it revokes one certificate, and a re-issued certificate for
    the same name (a new serial) is unaffected. Numbers and dates only go up, even if crl.pem was lost:
    a running service refuses a CRL older than the one it has (shared.tls), and rightly so.
    """
    issuing = load_issuer(layout)
    record = _read_record(layout)
    signed = now()
    number, last_update = record["crl_number"] + 1, signed - CLOCK_SKEW
    previous_updates = [dt.datetime.fromisoformat(record["last_update"])] if record["last_update"] else []
    if layout.crl.exists():
        previous = load_crl(layout.crl)
        number = max(number, crl_number(previous) + 1)
        previous_updates.append(previous.last_update_utc)
    if previous_updates:
        # OpenSSL keeps every CRL a running service has loaded and checks against the one with the latest
        # lastUpdate — keeping the *first* on a tie. So each CRL must be strictly newer than the one before,
        # even when two revocations come within the same second.
        last_update = min(max(last_update, max(previous_updates) + dt.timedelta(seconds=1)), signed)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuing.cert.subject)
        .last_update(last_update)
        .next_update(signed + CRL_VALIDITY)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuing.key.public_key()), critical=False)
    )
    for entry in record["revoked"]:
        revoked = (
            x509.RevokedCertificateBuilder()
            .serial_number(int(entry["serial"], 16))
            .revocation_date(dt.datetime.fromisoformat(entry["date"]))
            .add_extension(x509.CRLReason(REVOCATION_REASONS[entry["reason"]]), critical=False)
            .build()
        )
        builder = builder.add_revoked_certificate(revoked)
    crl = builder.sign(issuing.key, hashes.SHA256())
    record |= {"crl_number": number, "last_update": last_update.isoformat()}
    _write_record(layout, record)
    # During a CA rollover the other intermediate's CRL travels along: peers need one for each issuer in play.
    other = layout.rollover / "crl.pem"
    write_file(
        layout.crl, crl.public_bytes(serialization.Encoding.PEM) + (other.read_bytes() if other.exists() else b"")
    )
    return crl


def _write_record(layout: Layout, record: dict[str, Any]) -> None:
    write_file(layout.revocations, (json.dumps(record, indent=2) + "\n").encode())


def revoke(layout: Layout, name: str, reason: str = "unspecified") -> list[int]:
    """Revoke every unexpired certificate ever issued to `name`; return their serials.

    Not just the one in pki/out/<name>.crt: after a renewal that is the new certificate, and the stolen copy of
    the old one would keep working for the rest of its life. The ledger (pki.ledger) knows them all. The
    revocations go into the record first, then into a new CRL: whatever happens to crl.pem later, `make pki`
    renders it again with them in it. Revoking twice changes nothing.

        revoke(layout, "client", "key-compromise")   # then give it a fresh certificate: `pki revoke` does
    """
    issued = ledger.unexpired(layout, name)
    if not issued:
        raise PKIError(
            f"the ledger ({layout.ledger}) has no unexpired certificate issued to {name!r}: nothing to revoke "
            "(`python -m pki list` shows every identity and its certificates)"
        )
    _add(layout, issued, reason)
    return [int(entry.serial, 16) for entry in issued]


def revoke_serial(layout: Layout, serial: int, reason: str = "unspecified") -> ledger.Issued:
    """Revoke the one certificate with this serial number, which the ledger must know; return its entry."""
    entry = ledger.find(layout, serial)
    if entry is None:
        raise PKIError(
            f"serial {serial:x} is not in the ledger ({layout.ledger}): this CA did not issue it, or issued it "
            "before it kept a ledger — give the certificate itself with `--cert FILE`"
        )
    _add(layout, [entry], reason)
    return entry


def revoke_certificate(layout: Layout, path: Path, reason: str = "unspecified") -> ledger.Issued:
    """Revoke the (first) certificate in `path` — a copy found somewhere, an old one kept in previous/.

    It must be one of ours: in the ledger, or signed by our intermediate's key. A CRL of ours means nothing for
    a certificate another CA signed, and listing it would only say that we think it does.
    """
    cert = load_certificates(path)[0]
    entry = ledger.find(layout, cert.serial_number)
    if entry is None or entry.sha256 != thumbprint(cert):
        ours = x509.SubjectKeyIdentifier.from_public_key(load_issuer(layout).key.public_key()).digest.hex()
        if ledger.issuer_key_id(cert) != ours:
            raise PKIError(
                f"{path}: not a certificate this CA issued (not in {layout.ledger.name}, not signed by "
                f"{layout.intermediate_cert.name}'s key): our CRL cannot revoke it"
            )
        entry = ledger.Issued.of(path.stem, cert)
    _add(layout, [entry], reason)
    return entry


def _add(layout: Layout, issued: list[ledger.Issued], reason: str) -> None:
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
    write_crl(layout)


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
