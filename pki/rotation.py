"""Rotation: a new key and certificate for an identity, without failing a single request.

A rotation must not fail a single request. The callees of the rotated identity must accept the new
certificate *before* it is presented, and keep accepting the old one while connections that use it
drain. So it has three steps:
  1. begin:  issue the new certificate into next/, and list both thumbprints on the allow-lists;
  2. finish: (once every callee has re-read its allow-list) put the new key and certificate in place,
             keeping the old certificate in previous/ — still listed;
  3. retire: (later, at leisure) drop the old thumbprint and revoke the old certificate as superseded.
"""

from __future__ import annotations

import datetime as dt
import time

from pki import ledger
from pki.allowlists import render_allow_lists
from pki.authority import Identity, PKIError, Usage, load_issuer
from pki.identities import SAN_KINDS
from pki.output import write_file
from pki.policy import Policy
from pki.revocation import revoke_certificate
from shared.layout import Layout
from shared.x509 import extended_key_usages, key_type, load_certificates, subject_alt_names

__all__ = ["ROTATION_GRACE", "clear_stale_successor", "replace_now", "retire", "rotate_begin", "rotate_finish"]

# How long `rotate` waits between listing the new thumbprint and presenting the new certificate, so every
# callee has re-read its allow-list first (services poll every second by default).
ROTATION_GRACE = dt.timedelta(seconds=3)


def rotate_begin(layout: Layout, policy: Policy, name: str) -> Identity:
    """Issue a successor with the same SANs and usages as the current certificate; list it alongside."""
    current = load_certificates(layout.cert(name))[0]
    sans: dict[str, list[str]] = {"dns": [], "ips": [], "uris": []}
    for kind, value in subject_alt_names(current):
        sans[SAN_KINDS[kind]].append(value)
    usages: list[Usage] = [u for u in ("server", "client") if f"{u}Auth" in extended_key_usages(current)]
    successor = load_issuer(layout).issue(
        name, **sans, usages=usages, key_type=key_type(current.public_key()), lifetime=policy.leaf_lifetime
    )
    ledger.record(layout, name, successor.cert)
    successor.write(layout.out / "next", name)
    render_allow_lists(layout, policy)
    return successor


def rotate_finish(layout: Layout, policy: Policy, name: str) -> Identity:
    """Present the successor: old certificate to previous/ (still listed), new key and certificate in place."""
    if not layout.next_cert(name).exists():
        raise PKIError(f"no rotation of {name} is under way: run `python -m pki rotate {name}`")
    successor = Identity.load(layout.next_cert(name), layout.next_key(name))
    write_file(layout.previous_cert(name), layout.cert(name).read_bytes())
    # Key first, then certificate: a service reloading in between sees a mismatch, refuses it, and
    # simply picks up the complete pair on its next look.
    write_file(layout.key(name), successor.key_pem(), private=True)
    write_file(layout.cert(name), successor.cert_pem())
    layout.next_cert(name).unlink()
    layout.next_key(name).unlink()
    render_allow_lists(layout, policy)
    return successor


def clear_stale_successor(layout: Layout, name: str) -> None:
    """What a `rotate_finish` stopped after its switch leaves in next/ — the successor, already in place, or its
    key alone — goes. A successor not yet in place is a rotation under way, and stays."""
    cert, key = layout.next_cert(name), layout.next_key(name)
    if cert.exists() and cert.read_bytes() == layout.cert(name).read_bytes():
        cert.unlink()
    if key.exists() and not cert.exists():
        key.unlink()


def retire(layout: Layout, policy: Policy, name: str) -> int | None:
    """End the overlap: drop the old thumbprint from the allow-lists and revoke the old certificate.

    Not within ROTATION_GRACE of `rotate_finish`: until every service has re-read its files, one may still
    present the old certificate, and revoking it then would cut that service off. So this waits out the rest.
    """
    previous = layout.previous_cert(name)
    if not previous.exists():
        return None
    if (left := ROTATION_GRACE.total_seconds() - (time.time() - previous.stat().st_mtime)) > 0:
        time.sleep(left)
    serial = int(revoke_certificate(layout, previous, "superseded", lifetime=policy.crl_lifetime).serial, 16)
    previous.unlink()
    render_allow_lists(layout, policy)
    return serial


def replace_now(layout: Layout, policy: Policy, name: str) -> Identity:
    """A successor put in place at once, with no overlap and nothing kept in previous/: after a revocation,
    when the old certificate is refused everywhere anyway and must not stay on an allow-list."""
    rotate_begin(layout, policy, name)
    successor = rotate_finish(layout, policy, name)
    layout.previous_cert(name).unlink(missing_ok=True)
    render_allow_lists(layout, policy)
    return successor
