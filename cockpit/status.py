"""Judge what cockpit.collect read: one ✔ or ✖ line per fact, each ✖ with what to do about it.

    checks = judge(collect(targets, layout, policy_path))
    all(check.ok for check in checks)                  # `python -m cockpit status` exits 0 only then

The rules reuse the mesh's own: renewal at half a certificate's life (pki.renewal), a CRL is worth a
warning once under WARN_AT of its life left and the fix for it (services.reloader).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from cockpit.collect import Crl, MeshStatus, ServiceStatus
from services.reloader import FIX as CRL_FIX
from services.reloader import WARN_AT
from shared.tokens import TOKEN_SERVICE

__all__ = ["Check", "judge", "render"]

# How long past its renewal time a certificate or CRL may be before the renewer counts as not keeping up: it
# looks every second, and a service re-reads its files every second.
OVERDUE_AFTER = dt.timedelta(seconds=30)
DEPLOY = (
    "it has not taken pki/out's current files: `make run`'s services re-read pki/out within a second (look for "
    "reload_refused in its log); the Docker mesh gets them with `make pki`; or restart it"
)


@dataclass(frozen=True)
class Check:
    ok: bool
    text: str  # what was found, as a sentence
    fix: str = ""  # on a ✖: what to do next

    def line(self) -> str:
        return f"✔ {self.text}" if self.ok else f"✖ {self.text}\n    fix: {self.fix}"


def judge(mesh: MeshStatus) -> list[Check]:
    return list(_judge(mesh))


def render(checks: list[Check]) -> str:
    failed = sum(not c.ok for c in checks)
    summary = "all is well" if not failed else f"{failed} problem{'s' if failed > 1 else ''}"
    return "\n".join([*(c.line() for c in checks), summary])


def as_json(mesh: MeshStatus, checks: list[Check]) -> dict[str, object]:
    return {"ok": all(c.ok for c in checks), "checks": [asdict(c) for c in checks], "mesh": mesh.as_json()}


def _judge(mesh: MeshStatus) -> Iterator[Check]:
    ref, at = mesh.reference, mesh.at
    if ref.error:
        yield Check(False, f"{ref.pki_dir} cannot be read as the reference: {ref.error}", "run `make pki`")
    for problem in ref.problems:
        text, _, fix = problem.partition(" — ")
        yield Check(False, f"pki check: {text}", fix or "`python -m pki check` says what to do")
    revoked = mesh.revoked()
    for service in mesh.services:
        yield from _service(service, mesh, revoked)
    yield from _crls(mesh)
    late = [
        f"{s.target.name}'s certificate (due {_ago(s.certificate.renewal_due, at)})"
        for s in mesh.services
        if s.certificate is not None and at > s.certificate.renewal_due + OVERDUE_AFTER
    ]
    late += [f"the CRL of {c.issuer} (due {_ago(_resign_at(c), at)})" for c in _distinct(mesh) if _overdue(c, at)]
    if late:
        yield Check(
            False,
            f"renewer not keeping up: {'; '.join(late)} not renewed",
            "the renewer (`make run` starts it, in Docker the `renewer` container) must be running — look for "
            "renewal_failed in its log; `make pki` renews once",
        )
    elif any(s.reachable for s in mesh.services):
        yield Check(True, "renewer keeping up: every certificate and CRL renewed before it is due")
    named = [f"{name} ({serial})" for serial, name in revoked.items()]
    yield Check(True, f"revoked: {', '.join(named)}" if named else "revoked: nobody")


def _service(service: ServiceStatus, mesh: MeshStatus, revoked: dict[str, str]) -> Iterator[Check]:
    name, ref, at = service.target.name, mesh.reference, mesh.at
    if not service.reachable:
        if service.answered == 403:
            fix = f"put the operator on {name}'s allow/metrics.txt (policy.toml's `metrics`), then `make pki`"
        elif service.answered is not None:
            fix = f"see {name}'s log for why it answered so"
        else:
            fix = (
                "start it (`make run`, or `make up` for the Docker mesh), or give its address (PORTS=A,B,C,T or "
                "--service NAME=URL)"
            )
        yield Check(False, f"{name} at {service.target.url}: {service.error}", fix)
        return
    yield Check(True, f"{name} reachable over mTLS as the operator (trust generation {service.generation})")
    cert = service.certificate
    if cert is None:
        yield Check(False, f"{name} presents no certificate of its own", "issue it one: `make pki`")
    elif cert.not_after <= at:
        expired = f"{name}'s certificate (serial {cert.serial}) expired {_ago(cert.not_after, at)}"
        yield Check(False, expired, "`make pki`")
    elif cert.serial in revoked:
        revoked_one = f"{name} presents its revoked certificate (serial {cert.serial})"
        yield Check(False, revoked_one, f"`make rotate NAME={name}`")
    else:
        yield Check(
            True,
            f"{name} certificate serial {cert.serial} ({cert.spiffe_id}) expires {_in(cert.not_after, at)}, "
            f"renewal due {_in(cert.renewal_due, at)}",
        )
    if ref.error:
        return
    if set(service.trust_anchors) != set(ref.trust_anchors):
        extra = sorted(set(service.trust_anchors) - set(ref.trust_anchors))
        missing = sorted(set(ref.trust_anchors) - set(service.trust_anchors))
        yield Check(
            False,
            f"{name} trusts other anchors than {ref.pki_dir}/ca.crt: "
            + "; ".join([*(f"also {a[:16]}…" for a in extra), *(f"not {a[:16]}…" for a in missing)]),
            DEPLOY,
        )
    else:
        yield Check(True, f"{name} trusts the anchors of {ref.pki_dir}/ca.crt ({_short(ref.trust_anchors)})")
    held, wanted = {(c.issuer_key_id, c.number) for c in service.crls}, {(c.issuer_key_id, c.number) for c in ref.crls}
    if held != wanted:
        yield Check(
            False,
            f"{name} holds other CRLs than {ref.pki_dir}/crl.pem: {_crl_numbers(service.crls)} instead of "
            f"{_crl_numbers(ref.crls)}",
            DEPLOY,
        )
    else:
        yield Check(True, f"{name} holds the CRLs of {ref.pki_dir}/crl.pem ({_crl_numbers(ref.crls)})")
    for file, in_force in sorted(service.allow_lists.items()):
        policy = ref.allow_lists.get(file)
        if policy is None:  # MESH_ALLOW_LIST pointed elsewhere: what it admits is nowhere in the policy
            yield Check(
                False,
                f"{name} takes its allow-list from {file}, a file the policy does not render: who it admits is "
                "not what pki/policy.toml says, and cannot be compared",
                "point the service at pki/out/allow/ (unset MESH_ALLOW_LIST) and let `make pki` render the list",
            )
            continue
        if in_force.entries != policy.entries:
            more, fewer = len(in_force.entries - policy.entries), len(policy.entries - in_force.entries)
            yield Check(
                False,
                f"{name}'s allow-list {file} in force differs from the policy: {_entries(more)} the policy does "
                f"not give, {_entries(fewer)} it gives missing",
                "`make pki` renders the policy into pki/out/allow/; the service re-reads it within a second (its "
                "log says reload_refused if it cannot); the Docker mesh gets it with `make pki`",
            )
        else:
            size = _entries(len(in_force.entries))
            yield Check(True, f"{name}'s allow-list {file} equals the policy's ({in_force.mode}, {size})")
    if name == TOKEN_SERVICE:
        keys = service.signing_keys
        if keys is None:
            yield Check(False, f"{name} reports no signing keys", "restart it: `make run`, or `make up` (Docker)")
        else:
            yield Check(
                True,
                f"{name} signs with key {keys.current[:16]}…; the next, {keys.next[:16]}…, takes over "
                f"{_in(keys.next_signs_at, at)}",
            )


def _crls(mesh: MeshStatus) -> Iterator[Check]:
    at = mesh.at
    for crl in _distinct(mesh):
        label = f"CRL #{crl.number} of {crl.issuer}"
        if crl.next_update is None:
            yield Check(True, f"{label} has no next update")
        elif crl.next_update <= at:
            yield Check(
                False,
                f"{label} expired {_ago(crl.next_update, at)}: every certificate of that CA is refused",
                CRL_FIX,
            )
        elif crl.next_update - at < (crl.next_update - crl.last_update) * WARN_AT:
            yield Check(False, f"{label} expires {_in(crl.next_update, at)}", CRL_FIX)
        else:
            yield Check(True, f"{label}: next update {_in(crl.next_update, at)}")


def _distinct(mesh: MeshStatus) -> list[Crl]:
    """Every CRL held by a service or in pki/out, once."""
    seen: dict[tuple[str, int], Crl] = {}
    for crl in [*mesh.reference.crls, *(c for s in mesh.services for c in s.crls)]:
        seen.setdefault((crl.issuer_key_id, crl.number), crl)
    return list(seen.values())


def _resign_at(crl: Crl) -> dt.datetime:
    """The renewer re-signs a CRL at half its life (pki.revocation)."""
    return crl.last_update + ((crl.next_update or crl.last_update) - crl.last_update) / 2


def _overdue(crl: Crl, at: dt.datetime) -> bool:
    return crl.next_update is not None and at > _resign_at(crl) + OVERDUE_AFTER and at < crl.next_update


def _crl_numbers(crls: tuple[Crl, ...]) -> str:
    return ", ".join(f"#{c.number} of {c.issuer_key_id[:8]}…" for c in crls) or "none"


def _entries(count: int) -> str:
    return f"{count} entr{'y' if count == 1 else 'ies'}"


def _short(anchors: tuple[str, ...]) -> str:
    return ", ".join(f"{a[:16]}…" for a in anchors)


def _in(when: dt.datetime, at: dt.datetime) -> str:
    return f"in {_span(when - at)}" if when > at else f"{_span(at - when)} ago"


def _ago(when: dt.datetime, at: dt.datetime) -> str:
    return _in(when, at)


def _span(delta: dt.timedelta) -> str:
    seconds = int(delta.total_seconds())
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {seconds}s" if minutes else f"{seconds}s"
