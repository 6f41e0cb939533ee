"""`python -m pki check`, the doctor for the PKI on disk: every way pki/out can be wrong, each with its fix.

    findings = check(layout, policy_path)      # [] when all is well
    gate(layout, policy_path)                  # PKIError naming what no `pki` command repairs

What it reads, in order (a broken CA stops it: nothing below can be judged without one):

- the policy: a TOML error or an unknown key, with its line (pki.policy);
- permissions: pki/out and its directories writable by us alone, keys readable by us alone, every other file
  writable by us alone — the rules a service applies when it reads them (shared.x509.files);
- the CA: the intermediate's key is its certificate's (pki.authority), and a CA of ca.crt signed it;
- crl.pem: every CRL in it signed by our intermediate (or the other one, during a rollover);
- every identity of the policy: its files load as a service would load them (shared.tls.LiveTLS: expiry, key,
  a CRL of its CA, none expired), its chain leads to a CA of ca.crt, and it is not revoked;
- the allow-lists: each file is what the policy renders now (pki.allowlists), byte for byte.

Writing commands run `gate` first: it refuses them while the policy, a permission or the CA is broken, which
no command repairs. The rest each has a command that repairs it, named in its fix; `init` re-signs a CRL it
finds wrong, and says "up to date" only when `check` finds nothing.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from pki.allowlists import rendered_allow_lists
from pki.authority import PKIError, load_issuer
from pki.identities import no_ca
from pki.policy import Policy
from pki.revocation import revocation_record, revoked_in_place
from shared.layout import Layout
from shared.tls import LiveTLS, TLSMaterial
from shared.x509 import (
    MaterialError,
    authority_key_id,
    crl_number,
    key_id,
    load_certificates,
    load_crls,
    read_protected,
)

__all__ = ["Finding", "check", "gate"]

Kind = Literal["policy", "permissions", "ca", "crl", "identity", "allow-list"]


@dataclass(frozen=True)
class Finding:
    kind: Kind
    text: str  # what is wrong, naming the file; the fix follows " — " where the rule's own sentence gives it


def check(layout: Layout, policy_path: Path, *, blocking_only: bool = False) -> list[Finding]:
    """Everything wrong, in the order of the module's list. `blocking_only`: only what no `pki` command repairs —
    the policy, permissions, the CA (kinds "policy", "permissions", "ca") — which is also cheap to read."""
    try:
        policy = Policy.load(policy_path)
    except PKIError as e:
        return [Finding("policy", str(e))]
    try:
        if no_ca(layout):
            return []  # no PKI yet: `make pki` makes one
    except PKIError as e:  # half a CA, or the records of one without it
        return [Finding("ca", str(e))]
    findings = _permissions(layout)
    if findings:
        return findings  # nothing else is read from files others may have changed
    findings = _authority(layout)
    if findings or blocking_only:
        return findings
    return [*_crls(layout), *_identities(layout, policy), *_allow_lists(layout, policy)]


def gate(layout: Layout, policy_path: Path) -> None:
    """Before a command writes pki/out: refuse while something is wrong that no command repairs."""
    if blocking := check(layout, policy_path, blocking_only=True):
        raise PKIError(
            "nothing was written — fix this first (`python -m pki check` says all that is wrong):\n  "
            + "\n  ".join(f.text for f in blocking)
        )


def _permissions(layout: Layout) -> list[Finding]:
    findings = []
    for directory in [layout.out, *sorted(p for p in layout.out.rglob("*") if p.is_dir())]:
        mode = stat.S_IMODE(directory.stat().st_mode)
        if mode & (stat.S_IWGRP | stat.S_IWOTH):
            findings.append(
                Finding(
                    "permissions",
                    f"{directory}: directory writable by other users (mode {mode:04o}), who could replace any file "
                    f"in it — run `chmod go-w {directory}`",
                )
            )
    for path in sorted(p for p in layout.out.rglob("*") if p.is_file() and not p.name.startswith(".")):
        if os.geteuid() == 0 and path.stat().st_uid != 0:
            # The compose pki job: root, on your checkout's pki/out (owned by you), which shared.x509.files' owner
            # rule refuses; each container applies that rule to what it is deployed, as it reads it.
            continue
        try:
            read_protected(path, "private key" if path.suffix == ".key" else "file", private=path.suffix == ".key")
        except MaterialError as e:
            findings.append(Finding("permissions", str(e)))
    return findings


def _authority(layout: Layout) -> list[Finding]:
    try:
        issuer = load_issuer(layout)
        anchors = load_certificates(layout.ca_cert, "CA file")
    except (PKIError, MaterialError) as e:
        return [Finding("ca", str(e))]
    if not any(_issued_by(issuer.cert, anchor) for anchor in anchors):
        return [
            Finding(
                "ca",
                f"{layout.intermediate_cert}: not signed by any CA of {layout.ca_cert}, so nothing it signs is "
                "trusted — put back the ca.crt that belongs to it (a backup of pki/out), or start a new CA with "
                "`python -m pki init --force`",
            )
        ]
    return []


def _crls(layout: Layout) -> list[Finding]:
    if not layout.crl.exists():
        return [Finding("crl", f"{layout.crl}: no CRL, so every service refuses to start — run `make pki`")]
    ours = [load_certificates(layout.intermediate_cert)[0]]
    ours += [load_certificates(p)[0] for p in sorted(layout.rollover.glob("*.crt")) if layout.rollover.is_dir()]
    findings = []
    record = revocation_record(layout)
    signers: set[bytes] = set()
    for crl in load_crls(layout.crl):
        signer = next((ca for ca in ours if _signed(crl, ca)), None)
        name = crl.issuer.rfc4514_string()
        if signer is not None and signer.public_key().public_bytes(*_SPKI) in signers:
            findings.append(
                Finding(
                    "crl",
                    f"{layout.crl}: two CRLs of {name}, and services refuse the whole file — `make pki` re-signs it "
                    "from the revocation record",
                )
            )
        elif signer is not None:
            signers.add(signer.public_key().public_bytes(*_SPKI))
        if signer is not None and signer is ours[0] and (behind := _behind_the_record(crl, record)):
            findings.append(
                Finding(
                    "crl",
                    f"{layout.crl}: the CRL of {name} is older than the revocation record ({behind}): a service "
                    "started on it would let those certificates in — `make pki` re-signs it from the record",
                )
            )
        if signer is None:
            aki = (authority_key_id(crl) or b"").hex()[:16]
            findings.append(
                Finding(
                    "crl",
                    f"{layout.crl}: the CRL of {name} (key id {aki or 'none'}…) is not signed by our intermediate's "
                    "key, and services refuse the whole file — `make pki` re-signs it from the revocation record",
                )
            )
    return findings


_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _behind_the_record(crl: x509.CertificateRevocationList, record: dict[str, Any]) -> str:
    """What the revocation record (revocations.json) has that this CRL of our intermediate lacks, or "" if none:
    a crl.pem put back from before a revocation is genuine, signed and unexpired — and un-revokes."""
    listed = {entry.serial_number for entry in crl}
    missing = sorted(serial for entry in record["revoked"] if (serial := int(entry["serial"], 16)) not in listed)
    behind = []
    if crl_number(crl) < record["crl_number"]:
        behind.append(f"number {crl_number(crl)}, the record's {record['crl_number']}")
    if missing:
        behind.append(f"it lacks the revoked serial(s) {', '.join(f'{s:x}' for s in missing)}")
    return "; ".join(behind)


def _identities(layout: Layout, policy: Policy) -> list[Finding]:
    findings = []
    anchors = load_certificates(layout.ca_cert, "CA file")
    names = [*policy.services, *policy.clients]
    refused: dict[str, list[str]] = {}  # what a service would say on loading → whose files (an expired CRL: all)
    for name in names:
        if not layout.cert(name).exists():
            findings.append(Finding("identity", f"{layout.cert(name)}: {name} has no certificate — run `make pki`"))
            continue
        try:
            _load_as_a_service(layout.material(name))
        except MaterialError as e:
            refused.setdefault(str(e), []).append(name)
            continue
        chain = load_certificates(layout.cert(name))
        if len(chain) < 2 or not _issued_by(chain[0], chain[1]) or not any(_issued_by(chain[1], a) for a in anchors):
            findings.append(
                Finding(
                    "identity",
                    f"{layout.cert(name)}: its chain does not lead to a CA of {layout.ca_cert} (issued by a CA no "
                    f"longer trusted), so every peer refuses it — `make rotate NAME={name}` issues it a new one",
                )
            )
    findings += [Finding("identity", f"{', '.join(who)}: {said}") for said, who in refused.items()]
    for name in revoked_in_place(layout, names):
        findings.append(
            Finding(
                "identity",
                f"{layout.cert(name)}: {name}'s certificate is revoked, so every peer refuses it — "
                f"`make rotate NAME={name}` gives it a new one",
            )
        )
    return findings


def _load_as_a_service(material: TLSMaterial) -> None:
    """The very checks a service makes when it loads these files: one copy of each rule."""
    if os.geteuid() == 0 and any(path.stat().st_uid != 0 for path in material.files() if path.exists()):
        # The compose pki job, root on your files (see _permissions): the same checks of what the files say,
        # without shared.x509.files' owner rule, which each container applies to what it is deployed.
        paths = {"ca": material.ca, "cert": material.cert, "key": material.key, "crl": material.crl}
        material.verify({field: path.read_bytes() for field, path in paths.items() if path is not None})
        return
    LiveTLS(material, outgoing=False)


def _allow_lists(layout: Layout, policy: Policy) -> list[Finding]:
    findings = []
    for path, text in rendered_allow_lists(layout, policy).items():
        if not path.exists() or path.read_bytes() != text:
            findings.append(
                Finding(
                    "allow-list",
                    f"{path}: not what the policy renders (missing, edited by hand, or the policy changed since) — "
                    "`python -m pki render` (or `make pki`) renders it again",
                )
            )
    return findings


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _signed(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    signer = authority_key_id(crl)
    return (signer is None or signer == key_id(ca)) and crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
