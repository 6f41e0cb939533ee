"""The mesh's identities, made from the policy: `make pki` (`init`) and `python -m pki issue`.

    init(Layout())                                   # CA, every identity, the CRL, the allow-lists
    issue_identity(Layout(), Policy.load(), "billing", client_only=True)

A service is reached by its name: its certificate carries `DNS:<name>` (callers check it), plus
`DNS:localhost` and `IP:127.0.0.1` where the policy's loopback_sans says so (`make run`, not Docker or
Kubernetes); every identity carries `spiffe://<trust-domain>/<name>`.
Peers identify a service by these Subject Alternative Names, never by the Common Name (RFC 6125).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import shutil
from collections.abc import Sequence
from pathlib import Path

from pki.allowlists import render_allow_lists
from pki.authority import CertificateAuthority, Identity, PKIError, load_issuer, now
from pki.output import write_file
from pki.policy import Policy, check_identity_name
from pki.revocation import crl_needs_renewal, write_crl
from shared.certs import KeyType, load_certificates, subject_alt_names
from shared.layout import Layout

__all__ = ["SAN_KINDS", "init", "issue_identity", "parse_san", "service_sans"]

# `init` re-issues a leaf that is this close to expiry.
RENEW_BEFORE = dt.timedelta(days=7)
# How `python -m pki inspect` labels a SAN → the keyword `CertificateAuthority.issue` takes it by.
SAN_KINDS = {"DNS": "dns", "IP": "ips", "URI": "uris"}
LOOPBACK_DNS, LOOPBACK_IP = "localhost", "127.0.0.1"


def service_sans(name: str, policy: Policy) -> dict[str, list[str]]:
    """A service is reached by its name inside the mesh; by localhost/127.0.0.1 only on one machine
    (policy.loopback_sans): in a container or a pod, a name that every process has would prove nothing."""
    if policy.loopback_sans:
        return {"dns": [name, LOOPBACK_DNS], "ips": [LOOPBACK_IP]}
    return {"dns": [name], "ips": []}


def _needs_renewal(path: Path, policy: Policy, name: str) -> bool:
    """Missing, close to expiry, or a service's certificate with loopback SANs where the deployment wants none
    (a pki/out made by `make run`, then used by Docker or Kubernetes). Not the other way round: no caller
    needs them (every caller checks the service's name), and renewals keep a certificate's SANs as they are."""
    if not path.exists():
        return True
    leaf = load_certificates(path)[0]
    loopback = {("DNS", LOOPBACK_DNS), ("IP", LOOPBACK_IP)} & set(subject_alt_names(leaf))
    unwanted = name in policy.services and not policy.loopback_sans and bool(loopback)
    return unwanted or leaf.not_valid_after_utc - RENEW_BEFORE < now()


def init(
    layout: Layout,
    policy: Policy | None = None,
    *,
    key_type: KeyType = "ecdsa",
    force: bool = False,
) -> list[str]:
    """Create whatever is missing (everything with `force`), then render the allow-lists.

    Existing material is kept, so running it twice changes nothing: a thumbprint that was already on an
    allow-list stays valid. A leaf close to expiry is re-issued. Returns what was created, for the log.
    """
    policy = policy or Policy.load()
    created: list[str] = []
    if force or not layout.ca_cert.exists() or not layout.intermediate_cert.exists():
        # A new CA: nothing of the old one may linger — not its rotation leftovers (they would stay listed),
        # not its revocations (its serials mean nothing to the new intermediate), not its CRL.
        for leftover in (layout.out / "next", layout.out / "previous"):
            shutil.rmtree(leftover, ignore_errors=True)
        layout.revocations.unlink(missing_ok=True)
        layout.crl.unlink(missing_ok=True)
        root = CertificateAuthority.root(key_type=key_type)
        issuing = root.intermediate()
        write_file(layout.ca_key, root.key_pem(), private=True)
        write_file(layout.ca_cert, root.cert_pem())
        write_file(layout.intermediate_key, issuing.key_pem(), private=True)
        write_file(layout.intermediate_cert, issuing.cert_pem())
        created += ["ca", "intermediate"]
        force = True  # identities signed by an old CA would no longer verify
    for name in policy.services + policy.clients:
        if force or _needs_renewal(layout.cert(name), policy, name):
            issue_identity(layout, policy, name, client_only=name in policy.clients, key_type=key_type)
            created.append(name)
    if crl_needs_renewal(layout, policy.crl_lifetime):
        # From the revocation record: a lost crl.pem comes back with every revocation.
        write_crl(layout, policy.crl_lifetime)
        created.append("crl")
    render_allow_lists(layout, policy)
    return created


def issue_identity(
    layout: Layout,
    policy: Policy,
    name: str,
    *,
    extra_sans: Sequence[str] = (),
    client_only: bool = False,
    key_type: KeyType | None = None,
) -> Identity:
    """Issue `name` from our intermediate and write it into the layout. It is on no allow-list by itself.

    Extra SANs may add addresses, never another identity: callers check a callee by its name, so a
    certificate for `billing` that also said `DNS:service-b` would pass as service-b. The SPIFFE ID always
    comes from `name`.
    """
    check_identity_name(name)
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
