"""One function per `python -m pki` command (pki.cli names them): each reads its arguments, does the work
through the pki modules, and says what it did and what to do next."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pki.allowlists import render_allow_lists
from pki.authority import Identity, PKIError
from pki.check import check
from pki.deploy import deploy
from pki.identities import discarded_by_force, init, issue_identity
from pki.policy import Policy
from pki.renewal import Renewer, due
from pki.report import describe, inventory, shown
from pki.revocation import revoke, revoke_certificate, revoke_serial, revoked, write_crl
from pki.rollover import RollOver, run_command
from pki.rotation import ROTATION_GRACE, replace_now, retire, rotate_begin, rotate_finish
from shared.layout import Layout
from shared.observability import log
from shared.x509 import load_certificates, thumbprint


def cmd_check(args: argparse.Namespace, layout: Layout) -> None:
    if findings := check(layout, args.policy):
        print("\n".join(f"✖ {finding.text}" for finding in findings))
        raise PKIError(f"{len(findings)} problem{'s' if len(findings) > 1 else ''} in {shown(layout.out)}")
    print(f"✔ {shown(layout.out)} and {shown(args.policy)}: all is well")


def cmd_init(args: argparse.Namespace, layout: Layout) -> None:
    policy = Policy.load(args.policy)
    if args.force and (lost := discarded_by_force(layout)):
        print(f"init --force: throwing away {'; '.join(lost)}")
    resign = not args.force and any(f.kind == "crl" for f in check(layout, args.policy))
    created = init(layout, policy, key_type=args.key_type, force=args.force)
    if resign and "crl" not in created:
        write_crl(layout, policy.crl_lifetime)  # a CRL from a stray key, or expired: from the revocation record
        created.append("crl")
    print(f"created: {', '.join(created)}" if created else f"{shown(args.out)}: nothing created")
    if renewable := due(layout, policy):
        print(
            f"due for renewal: {', '.join(renewable)} — the renewer renews them with an overlap (`make run` and "
            "`make up` start one); `python -m pki renew` does it now"
        )
    print(f"allow-lists rendered from {shown(args.policy)} into {shown(layout.out / 'allow')}/")
    if findings := check(layout, args.policy):
        print("\n".join(f"✖ {finding.text}" for finding in findings), file=sys.stderr)
        raise PKIError(f"{shown(layout.out)} is not in order: {len(findings)} problem(s) above, each with its fix")
    print(f"{shown(args.out)}: up to date (`python -m pki check` finds nothing wrong)")


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
        lifetime = policy.crl_lifetime
        entry = revoke_serial(layout, args.serial, args.reason, lifetime=lifetime) if args.cert is None else None
        entry = entry or revoke_certificate(layout, args.cert, args.reason, lifetime=lifetime)
        name = entry.name
        print(f"revoked {name}'s certificate {entry.serial} ({said}) in {shown(layout.crl)}")
    else:
        name = args.name
        serials = revoke(layout, name, args.reason, lifetime=policy.crl_lifetime)
        listed = ", ".join(f"{serial:x}" for serial in serials)
        print(f"revoked every unexpired certificate of {name} ({listed}; {said}) in {shown(layout.crl)}")
    if fresh := _take_revoked_out_of_use(layout, policy, name):
        print(f"{name}: fresh key and certificate in place, sha256 {fresh.sha256}")
    print(
        "next: services that read pki/out (make run) refuse the revoked certificates within a second; the "
        "Docker mesh gets them from `make revoke` (or `make pki`). "
        f"`python -m pki list` shows {name}'s certificates; `make status` shows which services hold the new CRL."
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
