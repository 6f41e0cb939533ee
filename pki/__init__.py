"""The mesh's certificate authority: a root, an intermediate, and one identity per service and client.

One entry point, `python -m pki` (`make pki` runs `init`); as a library::

    from pki import CertificateAuthority, Policy, init, revoke
    init(Layout(Path("pki/out")))                  # CA, identities, CRL, allow-lists, from policy.toml
    revoke(Layout(Path("pki/out")), "service-b", "key-compromise")   # every certificate it was ever issued

One module per task:

    authority    keys, root, intermediate, leaves (CertificateAuthority.root().intermediate().issue())
    policy       policy.toml: which identities exist and who may call whom
    identities   init (make pki) and issue: the mesh's identities, and the rules for their names and SANs
    allowlists   the policy rendered into allow/<service>.txt
    ledger       every certificate issued: what `revoke NAME` revokes, what `list` shows
    revocation   the revocation record and the CRL rendered from it
    lock         the one lock every writer of pki/out holds (commands, renewer ticks, rollover stages)
    rotation     a new key and certificate without failing a request (begin, finish, retire)
    renewal      the same, by itself, at half a certificate's life (`renew --watch`)
    rollover     a new CA, live: publish, issue, retire, each behind a gate (`rotate-ca`)
    deploy       each container's own material, for Docker
    output       atomic, permission-safe writes

Reading certificates, keys and CRLs, thumbprints and SANs is `shared.x509.certs`'s: the services read through
it too, and never import this package. Where the files live is `shared.layout.Layout`.
"""

from pki.allowlists import render_allow_lists
from pki.authority import CertificateAuthority, Identity, PKIError, load_issuer, new_key, self_signed
from pki.deploy import deploy
from pki.identities import init, issue_identity, parse_san
from pki.policy import POLICY_FILE, Policy
from pki.revocation import REVOCATION_REASONS, revoke, revoke_certificate, revoke_serial, write_crl
from pki.rotation import ROTATION_GRACE, replace_now, retire, rotate_begin, rotate_finish

__all__ = [
    "POLICY_FILE",
    "REVOCATION_REASONS",
    "ROTATION_GRACE",
    "CertificateAuthority",
    "Identity",
    "PKIError",
    "Policy",
    "deploy",
    "init",
    "issue_identity",
    "load_issuer",
    "new_key",
    "parse_san",
    "render_allow_lists",
    "replace_now",
    "retire",
    "revoke",
    "revoke_certificate",
    "revoke_serial",
    "rotate_begin",
    "rotate_finish",
    "self_signed",
    "write_crl",
]
