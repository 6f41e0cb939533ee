"""Rolling the CA over, live: a new intermediate (and with `root=True` a new root), in three staged steps,
each waiting at a gate until every service reports it — the order whose violation caused the outages meshes
are known for (a root removed before every peer trusted its successor).

    publish  — the new CA joins what every peer trusts: the new root into ca.crt (root rollover), the new
               intermediate's CRL into crl.pem. Gate: every service reports the new anchors and issuers.
    issue    — the new intermediate signs from now on, and every identity is renewed under it (as the
               renewer renews: by thumbprint with a rotation's overlap). Gate: every service presents a
               certificate from the new intermediate.
    retire   — the old CA leaves: the old root out of ca.crt, the old intermediate's CRL out of crl.pem (with
               leaf-only CRL checking, a CA without a CRL in force has no valid leaves), its key deleted.
               Gate: every service reports only the new.

A gate that does not hold within its time stops the rollover, naming the service and the stage; what was
published stays, and the mesh keeps working in that stage (`rotate-ca` then continues where it stopped) —
for as long as it takes: while both intermediates are in play, rollover/ holds the other one's key and CRL,
and every re-signing of crl.pem (the renewer's, `make pki`'s, `pki revoke`'s) re-signs both.

    RollOver(layout, policy, services={"service-a": "https://127.0.0.1:8443"}, root=True).run()
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from pki.allowlists import render_allow_lists
from pki.authority import CertificateAuthority, PKIError, load_issuer, now
from pki.lock import pki_lock
from pki.output import write_file
from pki.policy import Policy
from pki.renewal import Renewer
from pki.revocation import first_crl, write_crl
from pki.rotation import ROTATION_GRACE, clear_stale_successor
from shared.layout import Layout
from shared.tls import TLSMaterial, client_context
from shared.x509 import authority_key_id, crl_blocks, key_id, load_certificates, load_crls, thumbprint

__all__ = ["RollOver"]

STAGES = ("publish", "issue", "retire")


@dataclass
class RollOver:
    layout: Layout
    policy: Policy
    services: dict[str, str]  # name → base URL, as this machine reaches them
    root: bool = False
    after_each_stage: Callable[[], None] = lambda: None  # e.g. copy the files into the Docker volumes
    gate_timeout: float = 30.0
    log: Callable[[str], None] = field(default=print)

    @property
    def _stage_file(self) -> Any:
        return self.layout.rollover / "stage"

    def run(self) -> None:
        """Every stage not yet done, each followed by its gate.

        Which stages are done is read again under the lock, before each stage: two `rotate-ca` runs at once
        take turns stage by stage, and none repeats a stage the other did. (Read once before the lock, both
        published a new intermediate, and the second issue stage put the old one, parked for retirement, back
        in force.) A run whose rollover another run finished meanwhile stops, saying so.
        """
        under_way = False
        for stage in STAGES:
            started = time.monotonic()
            # One stage, gate included, holds pki/out's lock: the renewer must not rotate an identity while
            # the issue stage does (both rotated service-b, and one found its successor gone).
            with pki_lock(self.layout, f"python -m pki rotate-ca, stage {stage}"):
                done = self._stage_file.read_text().split() if self._stage_file.exists() else []
                if under_way and not done:
                    self.log("another `rotate-ca` finished this rollover meanwhile")
                    return
                if done and (done[0] == "root") != self.root:
                    raise PKIError(
                        "a rollover of the other kind is under way: finish it first (with or without ROOT=1)"
                    )
                under_way = True
                if stage in done:
                    continue
                getattr(self, stage)()
                self.after_each_stage()
                self._gate(stage)
                if stage == "retire":
                    self._finish()
                else:
                    done = done or ["root" if self.root else "intermediate"]
                    write_file(self._stage_file, " ".join([*done, stage]).encode())
            self.log(f"stage {stage}: done in {time.monotonic() - started:.1f} s, every service reports it")

    # ── the stages ────────────────────────────────────────────────────────────────────────────────────────

    def publish(self) -> None:
        old_root = CertificateAuthority.load(self.layout.ca_cert, self.layout.ca_key)
        suffix = f" {now():%Y%m%d%H%M%S}"  # a new name: peers tell the CAs apart by it
        new_root = CertificateAuthority.root("mtls-mesh Root CA" + suffix) if self.root else old_root
        new_issuer = new_root.intermediate("mtls-mesh Intermediate CA" + suffix)
        out = self.layout.rollover
        for slot in ("incoming", "intermediate"):  # the one this rollover brings; the other one in play
            write_file(out / f"{slot}.key", new_issuer.key_pem(), private=True)
            write_file(out / f"{slot}.crt", new_issuer.cert_pem())
        if self.root:
            write_file(out / "ca.key", new_root.key_pem(), private=True)
            write_file(out / "ca.crt", new_root.cert_pem())
            write_file(self.layout.ca_cert, old_root.cert_pem() + new_root.cert_pem())
        write_file(out / "crl.pem", first_crl(new_issuer, self.policy.crl_lifetime))
        write_crl(self.layout, self.policy.crl_lifetime)  # the current CRL, and the new intermediate's re-signed

    def issue(self) -> None:
        """The incoming intermediate in force, the old one parked in rollover/ until retired, every identity
        renewed under the new one. Run again after a stop — its gate timed out, or it was killed at any point —
        it carries on: it decides from the files what is left to do, never swaps twice (which put the old
        intermediate back in force) and parks the old one before anything overwrites it."""
        out, layout = self.layout.rollover, self.layout
        incoming, in_force = (out / "incoming.crt").read_bytes(), layout.intermediate_cert.read_bytes()
        if in_force != incoming:
            if (out / "intermediate.crt").read_bytes() != in_force:
                write_file(out / "crl.pem", crl_blocks(layout.crl.read_bytes())[0])  # write_crl puts ours first
                write_file(out / "intermediate.key", layout.intermediate_key.read_bytes(), private=True)
                write_file(out / "intermediate.crt", in_force)
            write_file(layout.intermediate_key, (out / "incoming.key").read_bytes(), private=True)
            write_file(layout.intermediate_cert, incoming)
        write_crl(layout, self.policy.crl_lifetime)  # the new intermediate's CRL, and the old one's re-signed
        new = key_id(load_certificates(layout.intermediate_cert)[0])

        def by_the_old(leaf: Path) -> bool:
            return authority_key_id(load_certificates(leaf)[0]) != new

        names = [*self.policy.services, *self.policy.clients]
        renewer = Renewer(layout, self.policy, on_change=self.after_each_stage)
        renewer.renew([name for name in names if by_the_old(layout.cert(name))])
        self.after_each_stage()  # the switch reaches every peer before anything is unlisted
        time.sleep(ROTATION_GRACE.total_seconds())  # every caller has switched before the old are unlisted
        for name in names:  # the old intermediate's leaves, this run's and those of a run stopped midway
            clear_stale_successor(layout, name)
            previous = layout.previous_cert(name)
            if previous.exists() and by_the_old(previous):
                previous.unlink()
        render_allow_lists(layout, self.policy)

    def retire(self) -> None:
        out, layout = self.layout.rollover, self.layout
        if self.root:
            write_file(layout.ca_key, (out / "ca.key").read_bytes(), private=True)
            write_file(layout.ca_cert, (out / "ca.crt").read_bytes())
        for old in ("crl.pem", "intermediate.key", "intermediate.crt"):  # the old intermediate, its key included
            (out / old).unlink(missing_ok=True)
        write_crl(layout, self.policy.crl_lifetime)  # the new intermediate's CRL alone

    def _finish(self) -> None:
        """rollover/ goes in one step (a rename): removed file by file, a stop midway left a rollover that no
        run could finish (its stage file kept, the new root's key gone) or, its stage file gone first, began a
        new one. What is renamed is only copies now, deleted at once, or by the next rollover if we are stopped."""
        finished = self.layout.out / ".rollover-finished"
        shutil.rmtree(finished, ignore_errors=True)
        self.layout.rollover.rename(finished)
        shutil.rmtree(finished)

    # ── the gates ─────────────────────────────────────────────────────────────────────────────────────────

    def _gate(self, stage: str) -> None:
        """Wait until every service's /healthz shows `stage` in force; or stop, naming who does not."""
        expect = self._expectation(stage)
        deadline = time.monotonic() + self.gate_timeout
        pending = dict(self.services)
        last: dict[str, str] = {}
        while pending:
            for name, url in list(pending.items()):
                try:
                    health = self._health(name, url)
                except (httpx.HTTPError, ssl.SSLError, OSError) as e:
                    last[name] = f"cannot be reached ({type(e).__name__})"
                    continue
                if expect(health):
                    del pending[name]
                else:
                    last[name] = (
                        f"reports {health.get('trust_anchors')}, {health.get('issuers')}, {health.get('certificate')}"
                    )
            if pending and time.monotonic() > deadline:
                name = next(iter(pending))
                raise PKIError(
                    f"rollover stopped at stage {stage!r}: {name} {last.get(name, 'did not answer')} within "
                    f"{self.gate_timeout:g} s. What this stage published stays, and the mesh works with it; fix "
                    f"{name} and run `make rotate-ca{' ROOT=1' if self.root else ''}` again to continue."
                )
            if pending:
                time.sleep(0.25)

    def _expectation(self, stage: str) -> Callable[[dict[str, Any]], bool]:
        anchors = sorted(thumbprint(c) for c in load_certificates(self.layout.ca_cert))
        issuers = sorted(crl.issuer.rfc4514_string() for crl in load_crls(self.layout.crl))
        current = load_issuer(self.layout).cert.subject.rfc4514_string()
        if stage == "issue":
            return lambda h: (h.get("certificate") or {}).get("issuer") == current
        return lambda h: sorted(h.get("trust_anchors", [])) == anchors and sorted(h.get("issuers", [])) == issuers

    def _health(self, name: str, url: str) -> dict[str, Any]:
        material = self.layout.material("client")
        context = client_context(TLSMaterial(material.ca, material.cert, material.key, None))
        with httpx.Client(verify=context, timeout=5) as client:
            return client.get(url.rstrip("/") + "/healthz", extensions={"sni_hostname": name}).json()


def run_command(command: str) -> Callable[[], None]:
    """`after_each_stage` for a shell command (make deploy-if-up), which must succeed."""
    return lambda: subprocess.run(command, shell=True, check=True)
