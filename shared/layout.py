"""Where the mesh's files live: one fixed layout under one directory, read by everyone, written by `pki`.

    pki/out/ca.crt                   the trust anchor every service and client loads
    pki/out/intermediate.crt, .key   the CA that signs every identity (its key never leaves the PKI)
    pki/out/<name>.crt, <name>.key   an identity: leaf followed by the intermediate; key 0600
    pki/out/crl.pem                  the intermediate's revocation list
    pki/out/revocations.json         the CA's record of revocations, which crl.pem is rendered from
    pki/out/issued.json              the ledger: every certificate the CA issued (what `pki revoke NAME` revokes)
    pki/out/.lock                    held by whichever `pki` command or renewer tick is writing pki/out
    pki/out/allow/<service>.txt      who may call <service>; allow/metrics.txt: who may read /metrics
    pki/out/tokens.json              the token service's policy: edges, users and their scopes, who calls whom
    pki/out/next/, previous/         a rotation in progress: the successor, then the predecessor

`MESH_PKI_DIR` moves the whole layout (the containers use /pki)::

    material = Layout().material("service-a")   # TLSMaterial(ca, cert, key, crl) for service-a
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from shared.tls.material import TLSMaterial

__all__ = ["DEFAULT_OUT", "Layout"]

# MESH_PKI_DIR is the one setting every part of the project reads to find the PKI (services, client, CLI).
DEFAULT_OUT = Path(os.environ.get("MESH_PKI_DIR") or Path(__file__).resolve().parents[1] / "pki" / "out")


@dataclass(frozen=True)
class Layout:
    """The paths below `out`. Tests, docs and Docker rely on these names."""

    out: Path = DEFAULT_OUT

    def material(self, name: str, *, with_crl: bool = True) -> TLSMaterial:
        """Everything identity `name` loads to speak mTLS: the trust anchor, its own pair, the CRL."""
        return TLSMaterial(self.ca_cert, self.cert(name), self.key(name), self.crl if with_crl else None)

    @property
    def ca_cert(self) -> Path:
        return self.out / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.out / "ca.key"

    @property
    def intermediate_cert(self) -> Path:
        return self.out / "intermediate.crt"

    @property
    def intermediate_key(self) -> Path:
        return self.out / "intermediate.key"

    def cert(self, name: str) -> Path:
        return self.out / f"{name}.crt"

    def key(self, name: str) -> Path:
        return self.out / f"{name}.key"

    @property
    def crl(self) -> Path:
        return self.out / "crl.pem"

    @property
    def revocations(self) -> Path:
        """The CA's record of every revocation; crl.pem is rendered from it and can always be re-made."""
        return self.out / "revocations.json"

    @property
    def ledger(self) -> Path:
        """Every certificate the CA issued, with its name and serial: so that all of an identity's can be revoked."""
        return self.out / "issued.json"

    @property
    def lock(self) -> Path:
        """The one lock every writer of this directory holds (pki.lock)."""
        return self.out / ".lock"

    def allow_list(self, service: str) -> Path:
        return self.out / "allow" / f"{service}.txt"

    @property
    def metrics_allow_list(self) -> Path:
        """Who may read /metrics, on every service."""
        return self.out / "allow" / "metrics.txt"

    @property
    def tokens_policy(self) -> Path:
        """What the token service may grant, rendered from policy.toml's [tokens] and [allow]."""
        return self.out / "tokens.json"

    @property
    def rollover(self) -> Path:
        """A CA rollover under way: the new CA (then the old one) and the other intermediate's CRL."""
        return self.out / "rollover"

    def next_cert(self, name: str) -> Path:
        """During a rotation: the new certificate, listed on allow-lists but not yet presented."""
        return self.out / "next" / f"{name}.crt"

    def next_key(self, name: str) -> Path:
        return self.out / "next" / f"{name}.key"

    def previous_cert(self, name: str) -> Path:
        """After a rotation: the old certificate, still listed until `retire`."""
        return self.out / "previous" / f"{name}.crt"
