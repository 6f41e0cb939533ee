"""What the client says of an answer, or of a refusal: the hop table of a chain that answered, the problem a
service refused with, and — when a service closed the connection during the handshake — whether our own CRL
says why (our certificate revoked)."""

from __future__ import annotations

import json
from typing import Any

import httpx

from pki.revocation import revocation_reason
from shared import tls
from shared.x509 import MaterialError, PeerIdentity

__all__ = ["explain_problem", "hop_table", "own_revocation", "problem_body"]


def problem_body(response: httpx.Response) -> Any:
    """The JSON body, or the text when the answer is not JSON (a proxy's error page, say)."""
    try:
        return response.json()
    except ValueError:
        return response.text


def explain_problem(status: int, body: Any) -> str:
    """A refused or failed call as a person reads it: the HTTP status and the problem (RFC 9457) a service answered
    with — who refused, why, and for a 403 which certificate it saw."""
    problem = body if isinstance(body, dict) else {}
    service = problem.get("service", "the service")
    if status == 401:
        return f"401 from {service}: {problem.get('detail', 'a client certificate is required')}"
    if status == 403 and problem.get("reason") and "caller" not in problem:  # the user, not the certificate
        return f"403 from {service}: {problem.get('detail')}"
    if status == 403:
        caller = problem.get("caller") or {}
        return (
            f"403 from {service}: your certificate is genuine (TLS accepted it) but you are not allowed here.\n"
            f"  reason: {problem.get('reason')}\n"
            f"  you:    {caller.get('subject')}  sha256 {caller.get('sha256')}"
        )
    if status == 502:
        return f"502 from {service}: the hop {problem.get('hop')} failed.\n  reason: {problem.get('reason')}"
    return f"HTTP {status}: {json.dumps(body) if problem else body}"


def hop_table(hops: list[dict[str, Any]]) -> str:
    """Who verified whom at each hop, with the caller's full thumbprint."""
    path = " → ".join(["client", *(h["service"] for h in hops)])
    lines = [f"{path}: {len(hops)} hops, each one mutually authenticated", ""]
    lines.append(f"{'hop':<4} {'service':<10} {'verified caller (SPIFFE ID)':<34} TLS")
    for number, hop in enumerate(hops, 1):
        caller, conn = hop["caller"], hop.get("tls", {})
        lines.append(
            f"{number:<4} {hop['service']:<10} {caller.get('spiffe_id') or caller['subject']:<34} "
            f"{conn.get('version', '?')} {conn.get('cipher', '?')}"
        )
        # A pinned thumbprint is the default; a caller admitted by its name says so.
        by = " (admitted by its SPIFFE ID)" if hop.get("admitted_by") == "spiffe-id" else ""
        lines.append(f"{'':<15} sha256 {caller['sha256']}{by}")
        if user := hop.get("on_behalf_of"):  # the token this hop checked: whose, and through whom
            actors = " ← ".join(actor.rsplit("/", 1)[-1] for actor in user["actors"])
            lines.append(f"{'':<15} on behalf of {user['sub']}, held by {actors}")
    return "\n".join(lines)


def own_revocation(material: tls.TLSMaterial) -> str | None:
    """Why our own CRL (crl.pem) says our certificate is revoked, as a sentence; None if it does not say so.

    The rule is the services' own (LiveTLS.refusal): the CRL of the CA that issued us, checked as a service
    checks it. Only the reason and date are read from the CRL entry here.
    """
    if material.cert is None or material.crl is None:
        return None
    try:
        live = tls.LiveTLS(material, require_client_cert=False, outgoing=False)
    except MaterialError:  # our files do not make a consistent set (another CA's certificate, say): no verdict
        return None
    ours = live.certificate
    if ours is None or live.refusal(us := PeerIdentity.from_certificate(ours)) != "certificate revoked":
        return None
    try:  # the CRLs themselves, read again: a running service keeps only their serials
        crls = material.verify(material.read())
    except MaterialError:  # changed meanwhile, and broken: no verdict
        return None
    entry = next((e for crl in crls if (e := crl.get_revoked_certificate_by_serial_number(ours.serial_number))), None)
    if entry is None:  # changed meanwhile, and no longer says so
        return None
    why = "no reason given" if (reason := revocation_reason(entry)) == "unspecified" else f"reason {reason}"
    identity = (us.spiffe_id or material.cert.stem).rsplit("/", 1)[-1]
    return (
        f"your certificate {material.cert} (serial {ours.serial_number:x}) is revoked ({why}, since "
        f"{entry.revocation_date_utc:%Y-%m-%d %H:%M}Z) — use the new one `make revoke` put in pki/out, or "
        f"`make rotate NAME={identity}`"
    )
