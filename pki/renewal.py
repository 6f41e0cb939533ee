"""Certificates that renew themselves: each identity re-issued, with a fresh key, at half its life.

    python -m pki renew --watch      # `make run` starts it; in Docker it is the `renewer` container

SPIRE renews its SVIDs at half life, cert-manager at `renewBefore`: long enough before expiry that a failed
renewal has time to be noticed and retried. A renewal is a rotation without a person (pki.rotation):

- by thumbprint, the successor is listed on the allow-lists first; after ROTATION_GRACE (every callee has
  re-read its list) it is put in place; after another grace (every caller has switched) the predecessor is
  unlisted. It is not revoked: it expires soon anyway, and a CRL that grew at every renewal would make every
  handshake slower (see the README's Performance section);
- by SPIFFE ID, the successor carries the same name: it is put in place at once, nothing else changes.

The running services pick the new files up through their live reload and replace their outgoing pools.
The renewer also re-signs every CRL whose CA key we hold (both intermediates' during a CA rollover) at half
the policy's crl_lifetime — the job `make pki` otherwise needs a cron for.
"""

from __future__ import annotations

import datetime as dt
import logging
import signal
import time
from collections.abc import Callable

from cryptography import x509

from pki.allowlists import render_allow_lists
from pki.authority import CLOCK_SKEW, now
from pki.lock import pki_lock
from pki.policy import Policy
from pki.revocation import crl_needs_renewal, write_crl
from pki.rotation import ROTATION_GRACE, rotate_begin, rotate_finish
from shared.layout import Layout
from shared.x509 import load_certificates, load_crls

__all__ = ["RENEW_AT", "Renewer", "due"]

RENEW_AT = 0.5  # of a certificate's life
# A rotation begun this long ago and not finished was abandoned: `make rotate` finishes within seconds.
ABANDONED = dt.timedelta(minutes=2)
log = logging.getLogger("mesh.renewer")


def due(layout: Layout, policy: Policy, at: dt.datetime | None = None) -> list[str]:
    """The identities whose certificate has lived RENEW_AT of its life (measured on the certificate itself)."""
    at = at or now()
    names = []
    for name in [*policy.services, *policy.clients]:
        if layout.cert(name).exists() and at >= renewal_time(load_certificates(layout.cert(name))[0]):
            names.append(name)
    return names


def renewal_time(cert: x509.Certificate) -> dt.datetime:
    return renewal_due(cert.not_valid_before_utc, cert.not_valid_after_utc)


def renewal_due(not_before: dt.datetime, not_after: dt.datetime) -> dt.datetime:
    """When the renewer replaces a certificate valid from `not_before` to `not_after` (also `cockpit status`'s
    rule for "renewal due" and "renewal overdue")."""
    issued = not_before + CLOCK_SKEW  # certificates are back-dated by the clock skew
    return issued + (not_after - issued) * RENEW_AT


class Renewer:
    """Renews what is due, unlists what it replaced once every caller has switched, keeps the CRL fresh.

    Renewer(Layout(), Policy.load(), on_change=deploy).watch(interval=1.0)
    """

    def __init__(
        self,
        layout: Layout,
        policy: Policy,
        on_change: Callable[[], None] = lambda: None,
        wait: Callable[[float], None] = time.sleep,
        reread: Callable[[], Policy] | None = None,
    ) -> None:
        self.layout, self.policy, self.on_change, self.wait = layout, policy, on_change, wait
        self.reread = reread  # the policy file, read again at every tick: a new leaf_lifetime applies at once
        self.replaced: dict[str, float] = {}  # name → when its predecessor stopped being presented

    def tick(self) -> bool:
        """One look, holding pki/out's lock (pki.lock): renew what is due, unlist old predecessors, re-sign the
        CRL. True if anything changed."""
        with pki_lock(self.layout, "the renewer"):
            return self._tick()

    def _tick(self) -> bool:
        if self.reread is not None:
            self.policy = self.reread()
        changed = False
        if names := self._not_being_rotated(due(self.layout, self.policy)):
            self.renew(names)
            changed = True
        grace = ROTATION_GRACE.total_seconds()
        if finished := [name for name, at in self.replaced.items() if time.monotonic() - at >= grace]:
            for name in finished:
                self.layout.previous_cert(name).unlink(missing_ok=True)
                del self.replaced[name]
            render_allow_lists(self.layout, self.policy)
            log.info("unlisted", extra={"identities": finished})
            changed = True
        if crl_needs_renewal(self.layout, self.policy.crl_lifetime):
            # Every CRL whose CA key we hold: during a stalled CA rollover the other intermediate's too.
            write_crl(self.layout, self.policy.crl_lifetime)
            crls = load_crls(self.layout.crl)
            until = {crl.issuer.rfc4514_string(): f"{crl.next_update_utc:%Y-%m-%dT%H:%M:%SZ}" for crl in crls}
            log.info("crl_resigned", extra={"next_update": until})
            changed = True
        if changed:
            self.on_change()
        return changed

    def _not_being_rotated(self, names: list[str]) -> list[str]:
        """A rotation someone began (`make rotate` runs its steps as separate commands) is theirs to finish:
        renewing in between would replace their successor, and their `--finish` would find none. One begun
        longer than ABANDONED ago was abandoned (a process killed between the steps): renewal takes over."""
        cutoff = time.time() - ABANDONED.total_seconds()
        waiting = [
            name
            for name in names
            if self.layout.next_cert(name).exists() and self.layout.next_cert(name).stat().st_mtime > cutoff
        ]
        if waiting:
            log.warning("renewal_deferred", extra={"identities": waiting, "reason": "a rotation is under way"})
        return [name for name in names if name not in waiting]

    def renew(self, names: list[str]) -> None:
        """Rotate every identity in `names` at once: one grace period for all of them."""
        old = {name: load_certificates(self.layout.cert(name))[0].serial_number for name in names}
        for name in names:
            rotate_begin(self.layout, self.policy, name)
        if self.policy.authorize_by == "thumbprint":
            self.on_change()  # the successors are listed: let the callees read it before they are used
            self.wait(ROTATION_GRACE.total_seconds())
        for name in names:
            successor = rotate_finish(self.layout, self.policy, name)
            self.replaced[name] = time.monotonic()
            log.info(
                "renewed",
                extra={
                    "identity": name,
                    "serial": f"{old[name]:x} → {successor.cert.serial_number:x}",
                    "expires": f"{successor.cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}",
                },
            )

    def watch(self, interval: float = 1.0) -> None:
        """Tick every `interval` seconds, until SIGTERM (a container stopping) or Ctrl-C. SIGTERM lets the tick
        under way finish: stopped between a rotation's two steps, it would leave a successor in next/."""
        stopping = False

        def stop(signum: int, frame: object) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGTERM, stop)
        while not stopping:
            try:
                self.tick()
            except Exception as e:  # a failed renewal is retried at the next tick, and said
                log.error("renewal_failed", extra={"reason": f"{type(e).__name__}: {e}"})
            if not stopping:
                time.sleep(interval)
