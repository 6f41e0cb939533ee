"""The mesh's identities, made from the policy: `make pki` (`init`) and `python -m pki issue`.

    init(Layout())                                   # CA, every identity, the CRL, the allow-lists
    issue_identity(Layout(), Policy.load(), "billing", client_only=True)

A service is reached by its name: its certificate carries `DNS:<name>` (callers check it), plus
`DNS:localhost` and `IP:127.0.0.1` where the policy's loopback_sans says so (`make run`, not Docker or
Kubernetes); every identity carries `spiffe://<trust-domain>/<name>`.
Peers identify a service by these Subject Alternative Names, never by the Common Name (RFC 6125).
"""

from __future__ import annotations

import ipaddress
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from pki import ledger
from pki.allowlists import render_allow_lists
from pki.authority import CertificateAuthority, Identity, PKIError, load_issuer, now
from pki.output import write_file
from pki.policy import Policy, check_identity_name
from pki.revocation import crl_needs_renewal, write_crl
from shared.layout import Layout
from shared.x509 import KeyType, load_certificates, subject_alt_names

__all__ = ["SAN_KINDS", "discarded_by_force", "init", "issue_identity", "parse_san", "service_sans"]

# How `python -m pki inspect` labels a SAN → the keyword `CertificateAuthority.issue` takes it by.
SAN_KINDS = {"DNS": "dns", "IP": "ips", "URI": "uris"}
LOOPBACK_DNS, LOOPBACK_IP = "localhost", "127.0.0.1"


def service_sans(name: str, policy: Policy) -> dict[str, list[str]]:
    """A service is reached by its name inside the mesh; by localhost/127.0.0.1 only on one machine
    (policy.loopback_sans): in a container or a pod, a name that every process has would prove nothing."""
    if policy.loopback_sans:
        return {"dns": [name, LOOPBACK_DNS], "ips": [LOOPBACK_IP]}
    return {"dns": [name], "ips": []}


def _unusable(path: Path, policy: Policy, name: str) -> bool:
    """Missing, expired, or a service's certificate with loopback SANs where the deployment wants none (a pki/out
    made by `make run`, then used by Docker or Kubernetes). Not the other way round: no caller needs them (every
    caller checks the service's name), and renewals keep a certificate's SANs as they are.

    A certificate merely due for renewal is usable: the renewer renews it, with an overlap that keeps every
    caller in (by thumbprint, the successor is listed before it is used). Re-issued here, in place, callers
    that pin it were refused until the services re-read their files (found by attack: 210 of 399 requests)."""
    if not path.exists():
        return True
    leaf = load_certificates(path)[0]
    loopback = {("DNS", LOOPBACK_DNS), ("IP", LOOPBACK_IP)} & set(subject_alt_names(leaf))
    unwanted = name in policy.services and not policy.loopback_sans and bool(loopback)
    return unwanted or now() >= leaf.not_valid_after_utc


def init(
    layout: Layout,
    policy: Policy | None = None,
    *,
    key_type: KeyType = "ecdsa",
    force: bool = False,
) -> list[str]:
    """Create whatever is missing (everything with `force`), then render the allow-lists.

    Existing material is kept, so running it twice changes nothing: a thumbprint that was already on an
    allow-list stays valid. A leaf that has expired is re-issued; one due for renewal is the renewer's
    (`pki.renewal.due` names them). Returns what was created, for the log.

    A new CA is made only where there is none at all. Half a CA — a key without its certificate, or the
    reverse — or a revocation record without a CA is refused: replacing it would re-issue every identity
    under a new CA and forget every revocation, quietly. Only `force` throws the old CA away (see
    `discarded_by_force` for what that loses).
    """
    policy = policy or Policy.load()
    created: list[str] = []
    if force or no_ca(layout):
        # A new CA: nothing of the old one may linger — not its rotation leftovers (they would stay listed),
        # not its revocations and ledger (its serials mean nothing to the new intermediate), not its CRL.
        for leftover in (layout.out / "next", layout.out / "previous", layout.rollover):
            shutil.rmtree(leftover, ignore_errors=True)
        for record in (layout.revocations, layout.ledger, layout.crl):
            record.unlink(missing_ok=True)
        root = CertificateAuthority.root(key_type=key_type)
        issuing = root.intermediate()
        write_file(layout.ca_key, root.key_pem(), private=True)
        write_file(layout.ca_cert, root.cert_pem())
        write_file(layout.intermediate_key, issuing.key_pem(), private=True)
        write_file(layout.intermediate_cert, issuing.cert_pem())
        created += ["ca", "intermediate"]
        force = True  # identities signed by an old CA would no longer verify
    for name in policy.services + policy.clients:
        if force or _unusable(layout.cert(name), policy, name):
            issue_identity(layout, policy, name, client_only=name in policy.clients, key_type=key_type, replace=True)
            created.append(name)
    if crl_needs_renewal(layout, policy.crl_lifetime):
        # From the revocation record: a lost crl.pem comes back with every revocation.
        write_crl(layout, policy.crl_lifetime)
        created.append("crl")
    render_allow_lists(layout, policy)
    return created


def _ca_files(layout: Layout) -> list[Path]:
    return [layout.ca_cert, layout.ca_key, layout.intermediate_cert, layout.intermediate_key]


def no_ca(layout: Layout) -> bool:
    """True when there is no CA at all and nothing that belonged to one; refuses (PKIError) half of one."""
    present = [path for path in _ca_files(layout) if path.exists()]
    if present and len(present) < len(_ca_files(layout)):
        missing = [path for path in _ca_files(layout) if not path.exists()]
        raise PKIError(
            f"half a CA in {layout.out}: {', '.join(p.name for p in present)} present, "
            f"{', '.join(p.name for p in missing)} missing. Nothing was changed: a new CA would re-issue every "
            "identity and forget every revocation. Restore the missing file(s) from backup; or, to throw this CA "
            "away for good, run `python -m pki init --force` (`make pki-force`), which lists what it discards"
        )
    if present:
        return False
    records = [path for path in (layout.revocations, layout.ledger) if path.exists()]
    if records:
        raise PKIError(
            f"no CA in {layout.out}, but {' and '.join(p.name for p in records)} of one: restore ca.crt, ca.key, "
            "intermediate.crt and intermediate.key from backup; or, to start a new CA and drop its revocations, "
            "run `python -m pki init --force` (`make pki-force`)"
        )
    return True


def discarded_by_force(layout: Layout) -> list[str]:
    """What `init --force` throws away, in words: said before it happens."""
    lost = [path.name for path in _ca_files(layout) if path.exists()]
    if layout.revocations.exists():
        try:
            count = len(json.loads(layout.revocations.read_text())["revoked"])
            lost.append(f"{layout.revocations.name} ({count} revocations: those certificates are forgotten)")
        except (OSError, ValueError, KeyError, TypeError):
            lost.append(f"{layout.revocations.name} (unreadable)")
    if layout.ledger.exists():
        lost.append(f"{layout.ledger.name} (the ledger of issued certificates)")
    lost += [f"{d.name}/ (a rotation or rollover under way)" for d in (layout.out / "next", layout.out / "previous",
             layout.rollover) if d.is_dir() and any(d.iterdir())]  # fmt: skip
    return lost


def issue_identity(
    layout: Layout,
    policy: Policy,
    name: str,
    *,
    extra_sans: Sequence[str] = (),
    client_only: bool = False,
    key_type: KeyType | None = None,
    replace: bool = False,
) -> Identity:
    """Issue `name` from our intermediate and write it into the layout. It is on no allow-list by itself.

    An identity that exists is not replaced unless `replace` (init re-issuing an expiring leaf): overwriting a
    running service's key takes it down. A new key for an existing identity is a rotation (`make rotate`).

    Extra SANs may add addresses, never another identity: callers check a callee by its name, so a
    certificate for `billing` that also said `DNS:service-b` would pass as service-b. The SPIFFE ID always
    comes from `name`.
    """
    check_identity_name(name)
    if not replace and (layout.cert(name).exists() or layout.key(name).exists()):
        raise PKIError(
            f"{name} exists ({layout.cert(name)}): issuing again would overwrite the key it runs with. For a new "
            f"key and certificate without failing a request: `make rotate NAME={name}`; if its key was stolen: "
            f"`python -m pki revoke {name}` (revokes every certificate it has and issues a fresh one)"
        )
    sans: dict[str, list[str]] = {"dns": [], "ips": [], "uris": [policy.spiffe_id(name)]}
    if not client_only:
        for kind, values in service_sans(name, policy).items():
            sans[kind] += values
    others = (set(policy.services) | set(policy.clients)) - {name}
    for san in extra_sans:
        kind, value = parse_san(san)
        if kind == "dns" and (value.lower().rstrip(".") in others or "*" in value):
            raise PKIError(
                f"--san {san}: a certificate for {name} may not carry {value!r}, the name of another identity "
                "(or a wildcard): it would pass as that identity wherever callers check names"
            )
        if kind == "uris" and value.lower().startswith("spiffe:"):
            raise PKIError(f"--san {san}: the SPIFFE ID comes from the name ({policy.spiffe_id(name)}), never by hand")
        sans[kind].append(value)
    identity = load_issuer(layout).issue(
        name,
        **sans,
        usages=("client",) if client_only else ("server", "client"),
        key_type=key_type,
        lifetime=policy.leaf_lifetime,
    )
    ledger.record(layout, name, identity.cert)
    identity.write(layout.out, name)
    return identity


def parse_san(text: str) -> tuple[str, str]:
    """`DNS:name`, `IP:addr`, `URI:scheme://…`, or a bare value whose kind is guessed."""
    prefix, sep, value = text.partition(":")
    kinds = {"dns": "dns", "ip": "ips", "uri": "uris"}
    if sep and prefix.lower() in kinds and not value.startswith("//"):
        kind, text = kinds[prefix.lower()], value
        if kind == "ips":
            ipaddress.ip_address(text)
        return kind, text
    if "://" in text:
        return "uris", text
    try:
        ipaddress.ip_address(text)
        return "ips", text
    except ValueError:
        return "dns", text
