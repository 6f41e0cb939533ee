"""GET /status: what a running service holds right now, for the operator (`python -m cockpit status`).

/healthz says which trust anchors and certificate are in force, to any peer of the mesh. /status adds what
only an operator should read — the allow-lists in force name every caller — so it has the guard of
/metrics (allow/metrics.txt): the CRLs held with their next update and revoked serials, the trust
generation, each allow-list as the service reads it now (a refused reload keeps the old one), and what a
service adds of its own (the token service: its signing keys).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared.authz import AllowList
from shared.tls import LiveTLS, Revocations
from shared.x509 import PeerIdentity

__all__ = ["allow_list_status", "service_status"]


def service_status(
    name: str, live: LiveTLS, allow_lists: dict[Path, AllowList], extra: Callable[[], dict[str, Any]] | None
) -> dict[str, Any]:
    own = live.certificate
    identity = PeerIdentity.from_certificate(own) if own is not None else None
    return {
        "service": name,
        "generation": live.generation,
        "trust_anchors": live.anchors,
        "certificate": {
            "serial": f"{own.serial_number:x}",
            "spiffe_id": identity.spiffe_id if identity else None,
            "sha256": identity.sha256 if identity else None,
            "issuer": own.issuer.rfc4514_string(),
            "not_before": _time(own.not_valid_before_utc),
            "not_after": _time(own.not_valid_after_utc),
        }
        if own is not None
        else None,
        "crls": [_crl(crl) for crl in live.crls],
        "allow_lists": {path.name: allow_list_status(allow) for path, allow in sorted(allow_lists.items())},
        **(extra() if extra is not None else {}),
    }


def allow_list_status(allow: AllowList) -> dict[str, Any]:
    """An allow-list as its service decides by it: the mode and the callers, sorted."""
    thumbprints, ids = sorted(allow.entries), sorted(map(str, allow.ids))
    mode = "mixed" if thumbprints and ids else "spiffe-id" if ids else "thumbprint" if thumbprints else "empty"
    return {"mode": mode, "thumbprints": thumbprints, "spiffe_ids": ids}


def _crl(crl: Revocations) -> dict[str, Any]:
    return {
        "issuer": crl.issuer,
        "issuer_key_id": crl.key,
        "number": crl.number,
        "last_update": _time(crl.last_update),
        "next_update": _time(crl.next_update) if crl.next_update else None,
        "revoked": sorted(f"{serial:x}" for serial in crl.serials),
    }


def _time(at: Any) -> str:
    return f"{at:%Y-%m-%dT%H:%M:%SZ}"
