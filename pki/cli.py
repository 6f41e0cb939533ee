"""`python -m pki`'s command line: every command, with help that explains what it does and why.

Each command names its function and how it holds pki/out's lock (`set_defaults(func=…, lock=…)`):
"none" for those that only read it; "itself" for `renew` (each tick) and `rotate-ca` (each stage), as a lock
held for ever by `renew --watch` would shut every other command out; "whole" for every other command, so
that no two writers of pki/out ever interleave (pki.lock).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pki.commands import (
    cmd_check,
    cmd_deploy,
    cmd_fingerprint,
    cmd_init,
    cmd_inspect,
    cmd_issue,
    cmd_list,
    cmd_render,
    cmd_renew,
    cmd_retire,
    cmd_revoke,
    cmd_rotate,
    cmd_rotate_ca,
)
from pki.policy import POLICY_FILE
from pki.revocation import REVOCATION_REASONS
from shared.cli import add_version
from shared.layout import DEFAULT_OUT

__all__ = ["build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """Every command, with help that explains what it does and why."""
    parser = argparse.ArgumentParser(
        prog="python -m pki",
        description="The mesh's certificate authority: a root CA, an intermediate that signs every identity, "
        "and allow-lists rendered from pki/policy.toml.",
    )
    add_version(parser)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: pki/out)")
    parser.add_argument("--policy", type=Path, default=POLICY_FILE, help="policy file (default: pki/policy.toml)")
    # How each command holds pki/out's lock (pki.lock): "whole" from start to end, unless it says otherwise.
    parser.set_defaults(lock="whole")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser(
        "check",
        help="the doctor: policy, permissions, CA / intermediate / CRL / leaves agree, allow-lists as rendered",
        description="Read the policy and pki/out and say everything that is wrong, each with its fix; exit 1 if "
        "anything is. Every command that writes runs the part of it that no command repairs first, and `init` "
        'says "up to date" only when all of it holds.',
    )
    p.set_defaults(func=cmd_check, lock="none")

    p = commands.add_parser(
        "init",
        help="create the CA, every identity in the policy and the allow-lists (keeps what exists)",
        description="Create what is missing under --out: root and intermediate CA, one certificate and key per "
        "identity named in the policy, and one allow-list per service. Existing material is kept, so it is "
        "safe to run again; an expired leaf is re-issued (one due for renewal is the renewer's: `renew`). Half "
        "a CA (a key without its certificate, or the reverse) is refused, never replaced.",
    )
    p.set_defaults(func=cmd_init)
    p.add_argument(
        "--force",
        action="store_true",
        help="throw the CA away and start a new one: every identity re-issued, every revocation forgotten (says what)",
    )
    p.add_argument("--key-type", choices=["ecdsa", "rsa"], default="ecdsa", help="ECDSA P-256 (default) or RSA-2048")

    p = commands.add_parser(
        "issue",
        help="issue a new identity signed by our intermediate (on no allow-list until the policy says so)",
        description="Issue NAME.crt and NAME.key (0600) under --out, signed by our intermediate. The certificate "
        "chains to ca.crt, so TLS accepts it everywhere; no service lets it in until the policy lists it. "
        "That is the point: being trusted by the CA is not the same as being allowed. An existing identity is "
        "refused: a new key for it is `make rotate NAME=…`.",
    )
    p.set_defaults(func=cmd_issue)
    p.add_argument("name")
    p.add_argument(
        "--san",
        action="append",
        default=[],
        help="extra SAN: DNS:name, IP:addr, URI:… or a bare value (repeatable)",
    )
    p.add_argument("--client-only", action="store_true", help="clientAuth only, no localhost SANs (like `client`)")
    p.add_argument("--key-type", choices=["ecdsa", "rsa"], default=None, help="default: the CA's key type")

    p = commands.add_parser("inspect", help="show subject, SANs, EKU, validity, issuer, thumbprint, revocation")
    p.set_defaults(func=cmd_inspect, lock="none")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")

    p = commands.add_parser("fingerprint", help="print the SHA-256 thumbprint of the (first) certificate in FILE")
    p.set_defaults(func=cmd_fingerprint, lock="none")
    p.add_argument("file", type=Path, metavar="FILE")

    p = commands.add_parser("render", help="re-render the allow-lists from the policy (after editing it)")
    p.set_defaults(func=cmd_render)

    p = commands.add_parser(
        "revoke",
        help="revoke every certificate NAME was ever issued and give it a fresh one (--serial/--cert: just one)",
        description="Put every unexpired certificate the ledger (issued.json) has for NAME on the intermediate's "
        "CRL — not only the one in place: after a renewal, a stolen copy of the old one is still valid — then "
        "issue NAME a fresh key and certificate and re-render the allow-lists. Running services re-read the "
        "CRL within a second: new handshakes with a revoked certificate fail, and open connections that used "
        "it are closed. --serial S or --cert FILE revoke that one certificate only.",
    )
    p.set_defaults(func=cmd_revoke)
    p.add_argument("name", nargs="?", help="the identity (omit with --serial or --cert)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--serial", type=lambda text: int(text.replace(":", ""), 16), help="a serial number, in hex")
    which.add_argument("--cert", type=Path, metavar="FILE", help="a certificate file (e.g. a copy found elsewhere)")
    p.add_argument(
        "--reason",
        choices=sorted(REVOCATION_REASONS),
        default="unspecified",
        help="the CRL entries' reason code; unspecified (the default) writes none, as RFC 5280 §5.3.1 asks",
    )

    p = commands.add_parser(
        "list",
        help="every identity and its certificates: serial, expiry, issuer, revoked or not, on which allow-lists",
    )
    p.set_defaults(func=cmd_list, lock="none")
    p.add_argument("--json", action="store_true", help="machine-readable")

    p = commands.add_parser(
        "rotate",
        help="give an identity a new key and certificate without failing a request",
        description="1. issue the successor into next/ and list it on the allow-lists next to the current one; "
        "2. wait until every service has re-read its allow-list; 3. put the new key and certificate in place, "
        'keeping the old one listed (previous/) until `retire`. With authorize_by = "spiffe-id" the '
        "allow-lists name the identity, not the certificate: nothing to list, nothing to wait for. --begin, "
        "--wait and --finish run one step each, for when something must happen in between (the compose stack "
        "deploys to its volumes).",
    )
    p.set_defaults(func=cmd_rotate)
    p.add_argument("name")
    step = p.add_mutually_exclusive_group()
    step.add_argument("--begin", action="store_true", help="step 1 only")
    step.add_argument("--wait", action="store_true", help="step 2 only (returns at once in spiffe-id mode)")
    step.add_argument("--finish", action="store_true", help="step 3 only")

    p = commands.add_parser(
        "retire",
        help="after a rotation: unlist the old certificate and revoke it as superseded",
    )
    p.set_defaults(func=cmd_retire)
    p.add_argument("name")

    p = commands.add_parser(
        "renew",
        help="re-issue every identity whose certificate has lived half its life (--watch: for ever)",
        description="Renew, with a fresh key, each identity whose certificate has lived half its life "
        "(leaf_lifetime in the policy): by thumbprint with the overlap of a rotation, by SPIFFE ID at once. "
        "Also re-signs the CRL before it expires. --deploy copies the changes into the Docker volumes.",
    )
    p.set_defaults(func=cmd_renew, lock="itself")
    p.add_argument("--watch", action="store_true", help="keep looking, every --interval seconds")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between looks (default 1)")
    p.add_argument("--deploy", nargs="+", metavar="DEST NAME:UID", help="after each change, deploy as `deploy` does")

    p = commands.add_parser(
        "rotate-ca",
        help="roll the intermediate CA over (--root: the root too), live: publish, issue, retire, with gates",
        description="Stage by stage, each waiting until every --service reports it on /healthz: publish the new "
        "CA (trust and CRL), issue every identity from it, retire the old. A gate that does not hold stops the "
        "rollover naming the service and the stage; running the command again continues where it stopped.",
    )
    p.set_defaults(func=cmd_rotate_ca, lock="itself")
    p.add_argument("--root", action="store_true", help="a new root as well as a new intermediate")
    p.add_argument(
        "--service", action="append", default=[], metavar="NAME=URL", help="e.g. service-a=https://127.0.0.1:8443"
    )
    p.add_argument("--after-each-stage", metavar="COMMAND", help="run after each stage's files are written (deploy)")
    p.add_argument("--gate-timeout", type=float, default=30.0, help="seconds a gate may take (default 30)")

    p = commands.add_parser(
        "deploy",
        help="copy what each identity needs into DEST/NAME, owned by its UID (the compose pki job)",
        description="For each NAME:UID, copy into DEST/NAME exactly what that identity needs — its own key "
        "(0600) and certificate, ca.crt, crl.pem, and for a service its allow-list and the metrics allow-list — "
        "owned by UID, and remove anything else there. No identity ever receives another's key, and the CA keys "
        "are never copied: services verify, they do not sign.",
    )
    p.set_defaults(func=cmd_deploy)
    p.add_argument("dest", type=Path)
    p.add_argument("identities", nargs="+", metavar="NAME:UID", help="e.g. service-a:10001 client:10004")
    return parser
