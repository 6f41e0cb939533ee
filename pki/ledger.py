"""The ledger: every certificate the CA issued, so that all of an identity's certificates can be found again.

    record(layout, "client", identity.cert)           # before the certificate is written anywhere
    [entry.serial for entry in unexpired(layout, "client")]

A CRL lists serial numbers; a name does not revoke anything. Without a record of what was issued, revoking
"the client" can only mean the certificate in pki/out/client.crt — which, after an automatic renewal, is the
*new* one, while the stolen copy of the old one keeps working. So every path that issues (init, issue,
rotate, renew, rotate-ca) records the certificate here first, as step-ca keeps its database and SPIRE its
registration entries, and `pki revoke NAME` revokes every unexpired certificate the ledger has for NAME.

The ledger lives in pki/out/issued.json, beside revocations.json and with the same rules: written
atomically, never dropped except by `pki init --force` (which says so), unreadable means stop.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass

from cryptography import x509

from pki.authority import PKIError, now
from pki.output import write_file
from shared.layout import Layout
from shared.x509 import PeerIdentity, authority_key_id, load_certificates, thumbprint

__all__ = ["Issued", "entries", "find", "record", "unexpired"]

# An expired certificate is refused by every peer and need not be revoked; the ledger keeps it this much
# longer for `pki list` and the record, then drops it, so that hourly certificates do not grow it for ever.
KEEP_EXPIRED = dt.timedelta(days=30)


@dataclass(frozen=True)
class Issued:
    """One certificate the CA issued: enough to revoke it, find it on an allow-list, and tell its CA."""

    serial: str  # hex, as the CRL and `pki inspect` show it
    name: str
    sha256: str
    spiffe_id: str | None
    not_after: str  # ISO 8601, UTC
    issuer_key_id: str  # hex of the Authority Key Identifier: which CA key signed it

    @property
    def expires(self) -> dt.datetime:
        return dt.datetime.fromisoformat(self.not_after)

    @classmethod
    def of(cls, name: str, cert: x509.Certificate) -> Issued:
        return cls(
            serial=f"{cert.serial_number:x}",
            name=name,
            sha256=thumbprint(cert),
            spiffe_id=PeerIdentity.from_certificate(cert).spiffe_id,
            not_after=cert.not_valid_after_utc.isoformat(),
            issuer_key_id=(authority_key_id(cert) or b"").hex(),  # empty for a certificate that names none
        )


def record(layout: Layout, name: str, cert: x509.Certificate) -> Issued:
    """Add `cert`, issued to `name`, to the ledger. Call it before the certificate leaves the CA."""
    issued = Issued.of(name, cert)
    cutoff = now() - KEEP_EXPIRED
    kept = [e for e in entries(layout) if e.expires > cutoff and e.serial != issued.serial]
    _write(layout, [*kept, issued])
    return issued


def entries(layout: Layout) -> list[Issued]:
    """Every certificate in the ledger, oldest first. A PKI made before the ledger existed gets one seeded from
    the certificates it still has on disk (in place, next/ and previous/): the older ones are gone with it."""
    if not layout.ledger.exists():
        return _seeded(layout)
    try:
        document = json.loads(layout.ledger.read_text())
        return [Issued(**entry) for entry in document["certificates"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PKIError(
            f"{layout.ledger}: unreadable ledger of issued certificates ({e}); restore it from backup — without "
            "it, `pki revoke NAME` cannot find NAME's older certificates"
        ) from None


def find(layout: Layout, serial: int) -> Issued | None:
    return next((e for e in entries(layout) if e.serial == f"{serial:x}"), None)


def unexpired(layout: Layout, name: str, at: dt.datetime | None = None) -> list[Issued]:
    """Every certificate issued to `name` that a peer would still accept by date: what revoking `name` means."""
    at = at or now()
    return [e for e in entries(layout) if e.name == name and e.expires > at]


def _write(layout: Layout, issued: list[Issued]) -> None:
    document = {
        "comment": "Every certificate this CA issued (python -m pki). Never edit or delete: `pki revoke NAME` "
        "revokes what is listed here for NAME.",
        "certificates": [asdict(e) for e in issued],
    }
    write_file(layout.ledger, (json.dumps(document, indent=2) + "\n").encode())


def _seeded(layout: Layout) -> list[Issued]:
    found: dict[str, Issued] = {}
    for directory in (layout.out, layout.out / "next", layout.out / "previous"):
        for path in sorted(directory.glob("*.crt")) if directory.is_dir() else []:
            if path.stem in ("ca", "intermediate"):
                continue
            cert = load_certificates(path)[0]
            found.setdefault(f"{cert.serial_number:x}", Issued.of(path.stem, cert))
    return list(found.values())
