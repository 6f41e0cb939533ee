"""Authorization: TLS said the caller's certificate is genuine; this decides whether that caller may come in.

Shaped after go-spiffe's authorizers: an `Authorizer` takes the caller's identity and returns a
`Decision` — allowed, or denied with a reason. Small constructors build them; policy composes them:

    authorize_all(authorize_client_leaf(), authorize_listed(allow_list))

reads "admit a leaf client certificate whose thumbprint is on the allow-list". Nothing else in the project
knows how a decision is made. `Guard` applies an authorizer to every request as a FastAPI dependency.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Request

from pki import normalise_thumbprint
from shared.asgi_tls import IDENTITY_KEY
from shared.files import read_protected
from shared.identity import CallerIdentity
from shared.metrics import Counter
from shared.problem import Problem

log = logging.getLogger("mesh.authz")
authz_decisions = Counter(
    "mesh_authz_decisions_total",
    "Authorization decisions, by protected resource, verdict, reason and caller",
    ["resource", "decision", "reason", "caller", "caller_sha256"],
)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str  # a sentence, for the log and the 403 body
    code: str  # a stable short name, for metrics labels and alerting


Authorizer = Callable[[CallerIdentity], Decision]


def authorize_any() -> Authorizer:
    """Admit every caller whose certificate passed TLS verification."""
    return lambda caller: Decision(True, "any verified certificate is admitted", "any")


def authorize_client_leaf() -> Authorizer:
    """Admit only end-entity certificates issued for client authentication; a CA certificate is no caller."""

    def authorize(caller: CallerIdentity) -> Decision:
        if not caller.is_leaf:
            return Decision(
                False, "the certificate is a CA certificate, not a leaf; a CA cannot be a caller", "ca_certificate"
            )
        if not caller.client_auth:
            return Decision(
                False, "the certificate was not issued for client authentication (no clientAuth EKU)", "no_client_auth"
            )
        return Decision(True, "a leaf certificate issued for client authentication", "client_leaf")

    return authorize


def authorize_listed(allow_list: AllowList) -> Authorizer:
    """Admit callers whose certificate thumbprint is on the allow-list; deny everyone else."""

    def authorize(caller: CallerIdentity) -> Decision:
        if caller.sha256 in allow_list:
            label = allow_list.label(caller.sha256)
            return Decision(True, f"thumbprint is on {allow_list.source.name} as {label!r}", "listed")
        return Decision(False, f"thumbprint is not on the allow-list {allow_list.source.name}", "not_listed")

    return authorize


def authorize_all(*authorizers: Authorizer) -> Authorizer:
    """Admit only callers that every authorizer admits; the first denial gives the reason."""

    def authorize(caller: CallerIdentity) -> Decision:
        decision = Decision(False, "no authorizer was given: deny by default", "no_authorizer")
        for authorizer in authorizers:
            decision = authorizer(caller)
            if not decision.allowed:
                return decision
        return decision

    return authorize


# ── allow-list files ───────────────────────────────────────────────────────────────────────────────────


class AllowListError(Exception):
    """The allow-list file cannot be used; the message names the file (and line) and what to do."""


@dataclass(frozen=True)
class AllowList:
    """The thumbprints that may call one service, each with the name its comment gives it.

    File format (rendered by `make pki` from pki/policy.toml):

        # comment lines and blank lines are ignored
        3b0f…64 hex digits…9a1c  # service-a spiffe://mesh.internal/service-a

    Colons and upper case are accepted (`3B:0F:…`, as `openssl x509 -fingerprint` prints). Any other
    content is an error, never skipped: a line we cannot read might have been meant to deny someone.
    """

    source: Path
    entries: Mapping[str, str]  # thumbprint → label

    @classmethod
    def load(cls, path: Path) -> AllowList:
        data = read_protected(path, "allow-list", AllowListError)
        try:
            text = data.decode()
        except UnicodeDecodeError as e:
            raise AllowListError(f"{path}: allow-list is not UTF-8 text ({e})") from None
        return cls(path, parse_allow_list(text, path))

    def __contains__(self, sha256: str) -> bool:
        return sha256 in self.entries

    def label(self, sha256: str) -> str:
        return self.entries.get(sha256) or sha256[:16]


def parse_allow_list(text: str, source: Path) -> dict[str, str]:
    entries: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        value, _, comment = line.partition("#")
        if not value.strip():
            continue
        try:
            sha256 = normalise_thumbprint(value)
        except ValueError as e:
            raise AllowListError(f"{source}:{number}: {e} — fix or delete the line, then restart") from None
        entries[sha256] = comment.strip()
    return entries


# ── the FastAPI dependency ─────────────────────────────────────────────────────────────────────────────


def caller_identity(scope: Mapping[str, Any]) -> CallerIdentity | None:
    """The caller's verified certificate, from the ASGI TLS extension (see shared.asgi_tls)."""
    tls = (scope.get("extensions") or {}).get("tls") or {}
    chain = tls.get("client_cert_chain") or []
    if not chain:
        return None
    return tls.get(IDENTITY_KEY) or CallerIdentity.from_pem(chain[0])


class Guard:
    """Returns the caller's identity if `authorizer` admits it; otherwise refuses with a problem document.

    Apply it to every route that does business (`APIRouter(dependencies=[Depends(guard)])`), and take
    `caller: Annotated[CallerIdentity, Depends(guard)]` where the handler needs to know who called.
    """

    def __init__(self, service: str, authorizer: Authorizer, resource: str = "api") -> None:
        self.service = service
        self.authorizer = authorizer
        self.resource = resource  # what this guard protects, in logs and metrics: "api", "metrics"

    async def __call__(self, request: Request) -> CallerIdentity:
        # async on purpose: a plain `def` dependency would be sent to a thread pool on every request.
        caller = caller_identity(request.scope)
        if caller is None:
            # Only reachable when the server runs with an optional client certificate (CERT_OPTIONAL):
            # under CERT_REQUIRED the handshake already failed and no request exists.
            self._log(None, Decision(False, "no client certificate was presented", "no_certificate"))
            raise Problem(
                401,
                "certificate-required",
                "Client certificate required",
                f"{self.service} requires a client certificate; none was presented on this connection.",
                service=self.service,
            )
        decision = self.authorizer(caller)
        self._log(caller, decision)
        if not decision.allowed:
            raise Problem(
                403,
                "forbidden",
                "Caller not allowed",
                f"{self.service} refused the caller {caller.subject} (sha256 {caller.sha256}): {decision.reason}.",
                service=self.service,
                caller=caller.summary(),
                reason=decision.reason,
            )
        return caller

    def _log(self, caller: CallerIdentity | None, decision: Decision) -> None:
        verdict = "allow" if decision.allowed else "deny"
        log.info(
            "authz",
            extra={
                "resource": self.resource,
                "decision": verdict,
                "caller_sha256": caller.sha256 if caller else None,
                "caller_subject": caller.subject if caller else None,
                "reason": decision.reason,
            },
        )
        authz_decisions.inc(
            resource=self.resource,
            decision=verdict,
            reason=decision.code,
            caller=(caller.spiffe_id or caller.subject) if caller else "none",
            caller_sha256=caller.sha256 if caller else "none",
        )
