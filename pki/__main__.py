"""`python -m pki`: make and inspect the mesh's certificates. `python -m pki --help` lists the commands."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from pki import ledger
from pki.allowlists import render_allow_lists
from pki.authority import Identity, PKIError
from pki.deploy import deploy
from pki.identities import discarded_by_force, init, issue_identity
from pki.lock import pki_lock
from pki.policy import POLICY_FILE, Policy
from pki.renewal import Renewer
from pki.revocation import (
    REVOCATION_REASONS,
    revoke,
    revoke_certificate,
    revoke_serial,
    revoked,
    revoked_in_place,
)
from pki.rollover import RollOver, run_command
from pki.rotation import ROTATION_GRACE, replace_now, retire, rotate_begin, rotate_finish
from shared.authz import AllowList
from shared.layout import DEFAULT_OUT, Layout
from shared.observability import log
from shared.x509 import MaterialError, extended_key_usages, is_ca, load_certificates, subject_alt_names, thumbprint

# Commands that only read pki/out take no lock; `renew` takes it for each tick and `rotate-ca` for each stage
# (a lock held for ever by `renew --watch` would shut every other command out). Every other command holds
# it from start to end, so that no two writers of pki/out ever interleave (pki.lock).
READ_ONLY = {"inspect", "fingerprint", "list"}
LOCKS_ITSELF = {"renew", "rotate-ca"}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    layout = Layout(args.out)
    try:
        if args.command in READ_ONLY | LOCKS_ITSELF:
            COMMANDS[args.command](args, layout)
        else:
            with pki_lock(layout, f"python -m pki {args.command}"):
                COMMANDS[args.command](args, layout)
    except (PKIError, MaterialError, ValueError) as e:
        print(f"pki: {e}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Every command, with help that explains what it does and why."""
    parser = argparse.ArgumentParser(
        prog="python -m pki",
        description="The mesh's certificate authority: a root CA, an intermediate that signs every identity, "
        "and allow-lists rendered from pki/policy.toml.",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: pki/out)")
    parser.add_argument("--policy", type=Path, default=POLICY_FILE, help="policy file (default: pki/policy.toml)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser(
        "init",
        help="create the CA, every identity in the policy and the allow-lists (keeps what exists)",
        description="Create what is missing under --out: root and intermediate CA, one certificate and key per "
        "identity named in the policy, and one allow-list per service. Existing material is kept, so it is "
        "safe to run again; a leaf within 7 days of expiry is re-issued. Half a CA (a key without its "
        "certificate, or the reverse) is refused, never replaced.",
    )
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
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")

    p = commands.add_parser("fingerprint", help="print the SHA-256 thumbprint of the (first) certificate in FILE")
    p.add_argument("file", type=Path, metavar="FILE")

    commands.add_parser("render", help="re-render the allow-lists from the policy (after editing it)")

    p = commands.add_parser(
        "revoke",
        help="revoke every certificate NAME was ever issued and give it a fresh one (--serial/--cert: just one)",
        description="Put every unexpired certificate the ledger (issued.json) has for NAME on the intermediate's "
        "CRL — not only the one in place: after a renewal, a stolen copy of the old one is still valid — then "
        "issue NAME a fresh key and certificate and re-render the allow-lists. Running services re-read the "
        "CRL within a second: new handshakes with a revoked certificate fail, and open connections that used "
        "it are closed. --serial S or --cert FILE revoke that one certificate only.",
    )
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
    p.add_argument("name")
    step = p.add_mutually_exclusive_group()
    step.add_argument("--begin", action="store_true", help="step 1 only")
    step.add_argument("--wait", action="store_true", help="step 2 only (returns at once in spiffe-id mode)")
    step.add_argument("--finish", action="store_true", help="step 3 only")

    p = commands.add_parser(
        "retire",
        help="after a rotation: unlist the old certificate and revoke it as superseded",
    )
    p.add_argument("name")

    p = commands.add_parser(
        "renew",
        help="re-issue every identity whose certificate has lived half its life (--watch: for ever)",
        description="Renew, with a fresh key, each identity whose certificate has lived half its life "
        "(leaf_lifetime in the policy): by thumbprint with the overlap of a rotation, by SPIFFE ID at once. "
        "Also re-signs the CRL before it expires. --deploy copies the changes into the Docker volumes.",
    )
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
    p.add_argument("dest", type=Path)
    p.add_argument("identities", nargs="+", metavar="NAME:UID", help="e.g. service-a:10001 client:10004")
    return parser


# ── one function per command ──────────────────────────────────────────────────────────────────────────────


def cmd_init(args: argparse.Namespace, layout: Layout) -> None:
    policy = Policy.load(args.policy)
    if args.force and (lost := discarded_by_force(layout)):
        print(f"init --force: throwing away {'; '.join(lost)}")
    created = init(layout, policy, key_type=args.key_type, force=args.force)
    print(f"created: {', '.join(created)}" if created else f"{shown(args.out)}: up to date, nothing created")
    print(f"allow-lists rendered from {shown(args.policy)} into {shown(layout.out / 'allow')}/")
    for name in revoked_in_place(layout, [*policy.services, *policy.clients]):
        print(
            f"warning: {name}'s certificate is revoked, so every peer refuses it (a service using it stays "
            f"unhealthy): give it a new one with `make rotate NAME={name}`",
            file=sys.stderr,
        )


def cmd_issue(args: argparse.Namespace, layout: Layout) -> None:
    policy = Policy.load(args.policy)
    identity = issue_identity(
        layout, policy, args.name, extra_sans=args.san, client_only=args.client_only, key_type=args.key_type
    )
    print(f"issued {shown(layout.cert(args.name))} and {shown(layout.key(args.name))}")
    print(f"sha256 {identity.sha256}  (on no allow-list: add it to {shown(args.policy)}, then `make pki`)")


def cmd_inspect(args: argparse.Namespace, layout: Layout) -> None:
    for path in args.files:
        print(describe(path, layout))


def cmd_fingerprint(args: argparse.Namespace, layout: Layout) -> None:
    print(thumbprint(load_certificates(args.file)[0]))


def cmd_revoke(args: argparse.Namespace, layout: Layout) -> None:
    policy = Policy.load(args.policy)
    said = "no reason given" if args.reason == "unspecified" else f"reason {args.reason}"  # RFC 5280 §5.3.1
    one = args.serial is not None or args.cert is not None
    if one == bool(args.name):
        raise PKIError("name the identity to revoke (all of its certificates), or give --serial S or --cert FILE")
    if one:
        entry = revoke_serial(layout, args.serial, args.reason) if args.cert is None else None
        entry = entry or revoke_certificate(layout, args.cert, args.reason)
        name = entry.name
        print(f"revoked {name}'s certificate {entry.serial} ({said}) in {shown(layout.crl)}")
    else:
        name = args.name
        serials = revoke(layout, name, args.reason)
        listed = ", ".join(f"{serial:x}" for serial in serials)
        print(f"revoked every unexpired certificate of {name} ({listed}; {said}) in {shown(layout.crl)}")
    if fresh := _take_revoked_out_of_use(layout, policy, name):
        print(f"{name}: fresh key and certificate in place, sha256 {fresh.sha256}")
    print(
        "next: services that read pki/out (make run) refuse the revoked certificates within a second; the "
        "Docker mesh gets them from `make revoke` (or `docker compose run --rm --no-deps pki`). "
        f"`python -m pki list` shows {name}'s certificates."
    )


def _take_revoked_out_of_use(layout: Layout, policy: Policy, name: str) -> Identity | None:
    """A revoked certificate is neither presented nor listed: drop it from next/ and previous/ (by thumbprint it
    would stay on the allow-lists), and put a fresh one in place of the one in use. Returns the fresh one."""
    serials = revoked(layout)

    def is_revoked(path: Path) -> bool:
        return path.exists() and f"{load_certificates(path)[0].serial_number:x}" in serials

    if is_revoked(layout.next_cert(name)):
        layout.next_cert(name).unlink()
        layout.next_key(name).unlink(missing_ok=True)
    if is_revoked(layout.previous_cert(name)):
        layout.previous_cert(name).unlink()
    fresh = replace_now(layout, policy, name) if is_revoked(layout.cert(name)) else None
    render_allow_lists(layout, policy)
    return fresh


def cmd_list(args: argparse.Namespace, layout: Layout) -> None:
    identities = inventory(layout, Policy.load(args.policy))
    if args.json:
        print(json.dumps(identities, indent=2))
        return
    for name, certificates in identities.items():
        print(name + ("" if certificates else "  (no certificate in the ledger)"))
        for c in certificates:
            state = f"REVOKED ({c['revoked']['reason']})" if c["revoked"] else "valid"
            if c["expired"]:
                state = "expired" + (" and revoked" if c["revoked"] else "")
            where = f", {c['where']}" if c["where"] else ""
            allowed = ", ".join(c["allow_lists"]) or "none"
            print(
                f"  serial {c['serial']}  until {c['not_after']:.16}Z  issuer key {c['issuer_key_id'][:16]}  "
                f"{state}{where}  allow-lists: {allowed}"
            )


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


def cmd_rotate(args: argparse.Namespace, layout: Layout) -> None:
    policy = Policy.load(args.policy)
    every_step = not (args.begin or args.wait or args.finish)
    by_thumbprint = policy.authorize_by == "thumbprint"
    if args.begin or every_step:
        successor = rotate_begin(layout, policy, args.name)
        listed = "listed next to the current one" if by_thumbprint else "issued (allow-lists name the identity)"
        print(f"{args.name}: successor sha256 {successor.sha256} {listed}")
    if (args.wait or every_step) and by_thumbprint:
        time.sleep(ROTATION_GRACE.total_seconds())  # every callee re-reads its allow-list first
    if args.finish or every_step:
        rotate_finish(layout, policy, args.name)
        old = "old one listed until `pki retire`" if by_thumbprint else "old one valid until `pki retire` revokes it"
        print(f"{args.name}: new key and certificate in place; {old}")


def cmd_retire(args: argparse.Namespace, layout: Layout) -> None:
    serial = retire(layout, Policy.load(args.policy), args.name)
    print(f"{args.name}: old certificate {serial:x} unlisted and revoked" if serial else "nothing to retire")


def cmd_renew(args: argparse.Namespace, layout: Layout) -> None:
    log.configure("renewer")
    policy = Policy.load(args.policy)

    def deploy_all() -> None:
        if args.deploy:
            dest, *identities = args.deploy
            deploy_to(layout, policy, Path(dest), identities)

    renewer = Renewer(layout, policy, on_change=deploy_all, reread=lambda: Policy.load(args.policy))
    if args.watch:
        deploy_all()
        renewer.watch(args.interval)
    elif not renewer.tick():
        print("nothing to renew")


def cmd_rotate_ca(args: argparse.Namespace, layout: Layout) -> None:
    services = dict(spec.split("=", 1) for spec in args.service)
    if not services:
        raise PKIError("name the services to wait for: --service service-a=https://127.0.0.1:8443 …")
    after = run_command(args.after_each_stage) if args.after_each_stage else (lambda: None)
    RollOver(layout, Policy.load(args.policy), services, args.root, after, args.gate_timeout, log=_say).run()
    print(f"the {'root and intermediate' if args.root else 'intermediate'} CA rolled over; the old one is retired")


def _say(line: str) -> None:
    print(line, flush=True)


def cmd_deploy(args: argparse.Namespace, layout: Layout) -> None:
    deploy_to(layout, Policy.load(args.policy), args.dest, args.identities)


def deploy_to(layout: Layout, policy: Policy, dest: Path, identities: list[str]) -> None:
    for spec in identities:
        name, _, uid = spec.partition(":")
        if not uid.isdigit():
            raise PKIError(f"{spec!r}: give NAME:UID, e.g. service-a:10001")
        copied = deploy(layout, policy, name, dest / name, (int(uid), int(uid)))
        print(f"deployed {name} to {dest / name} for uid {uid}: {', '.join(copied)}", flush=True)


def cmd_render(args: argparse.Namespace, layout: Layout) -> None:
    render_allow_lists(layout, Policy.load(args.policy))
    print(f"allow-lists rendered from {shown(args.policy)} into {shown(layout.out / 'allow')}/")


COMMANDS: dict[str, Callable[[argparse.Namespace, Layout], None]] = {
    "init": cmd_init,
    "issue": cmd_issue,
    "inspect": cmd_inspect,
    "list": cmd_list,
    "fingerprint": cmd_fingerprint,
    "revoke": cmd_revoke,
    "rotate": cmd_rotate,
    "retire": cmd_retire,
    "renew": cmd_renew,
    "rotate-ca": cmd_rotate_ca,
    "deploy": cmd_deploy,
    "render": cmd_render,
}


# ── helpers ───────────────────────────────────────────────────────────────────────────────────────────────


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


if __name__ == "__main__":
    sys.exit(main())
