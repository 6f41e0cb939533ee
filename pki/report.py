"""What `pki inspect` and `pki list` show: certificates described for a person, identities inventoried."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from pki import ledger
from pki.policy import Policy
from pki.revocation import revoked
from shared.authz import AllowList
from shared.layout import Layout
from shared.x509 import extended_key_usages, is_ca, load_certificates, subject_alt_names, thumbprint

__all__ = ["describe", "inventory", "shown"]


def inventory(layout: Layout, policy: Policy) -> dict[str, list[dict[str, object]]]:
    """Every identity (the policy's, then any other the ledger knows) → its certificates, oldest first."""
    serials = revoked(layout)
    allow_lists = {path.stem: AllowList.load(path) for path in sorted((layout.out / "allow").glob("*.txt"))}
    places = {
        "in place": layout.cert,
        "next (rotation under way)": layout.next_cert,
        "previous (until retired)": layout.previous_cert,
    }
    at = dt.datetime.now(dt.UTC)
    result: dict[str, list[dict[str, object]]] = {name: [] for name in [*policy.services, *policy.clients]}
    for entry in ledger.entries(layout):
        in_use = [
            where
            for where, path in places.items()
            if path(entry.name).exists() and thumbprint(load_certificates(path(entry.name))[0]) == entry.sha256
        ]
        result.setdefault(entry.name, []).append(
            {
                **asdict(entry),
                "expired": entry.expires <= at,
                "revoked": serials.get(entry.serial),
                "where": ", ".join(in_use),
                "allow_lists": [
                    service
                    for service, allow in allow_lists.items()
                    if entry.sha256 in allow or entry.spiffe_id in {str(i) for i in allow.ids}
                ],
            }
        )
    return result


def shown(path: Path) -> Path:
    """A path as the user would type it: relative to where they are, when it is below it."""
    try:
        return path.resolve().relative_to(Path.cwd())
    except ValueError:
        return path


def describe(path: Path, layout: Layout | None = None) -> str:
    """A human summary of every certificate in a PEM file; with `layout`, whether its CA revoked them."""
    certs = load_certificates(path)
    serials = revoked(layout) if layout is not None and layout.revocations.exists() else {}
    issued = {e.serial for e in ledger.entries(layout)} if layout is not None and layout.out.is_dir() else set()
    blocks = []
    for i, cert in enumerate(certs, 1):
        rows = {
            "subject": cert.subject.rfc4514_string(),
            "issuer": cert.issuer.rfc4514_string(),
            "serial": f"{cert.serial_number:x}",
            "valid": _validity(cert),
            "key": _key_description(cert),
            "SANs": ", ".join(f"{kind}:{value}" for kind, value in subject_alt_names(cert)) or "none",
            "EKU": ", ".join(extended_key_usages(cert)) or "none (any use)",
            "CA": "yes" if is_ca(cert) else "no",
            "sha256": thumbprint(cert),
        }
        if layout is not None and not is_ca(cert):
            serial = f"{cert.serial_number:x}"
            if entry := serials.get(serial):
                rows["revoked"] = f"YES, {entry['date']:.19}Z ({entry['reason']})"
            else:
                rows["revoked"] = "no" if serial in issued else f"unknown: not in {shown(layout.ledger)}"
        heading = f"{path}" + (f"  (certificate {i} of {len(certs)})" if len(certs) > 1 else "")
        blocks.append(heading + "\n" + "\n".join(f"  {k:<8} {v}" for k, v in rows.items()))
    return "\n\n".join(blocks)


def _validity(cert: x509.Certificate) -> str:
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    now = dt.datetime.now(dt.UTC)
    if now < start:
        state = "NOT YET VALID"
    elif now > end:
        state = "EXPIRED"
    else:
        state = f"{(end - now).days} days left"
    return f"{start:%Y-%m-%d %H:%M}Z → {end:%Y-%m-%d %H:%M}Z ({state})"


def _key_description(cert: x509.Certificate) -> str:
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"ECDSA {key.curve.name}"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA-{key.key_size}"
    return type(key).__name__
