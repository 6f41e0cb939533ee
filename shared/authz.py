"""Authorization: TLS said the caller's certificate is genuine; this decides whether that caller may come in.

Shaped after go-spiffe's authorizers: an `Authorizer` takes the caller's identity and returns a
`Decision` — allowed, or denied with a reason. Small constructors build them; policy composes them:

    authorize_all(authorize_client_leaf(), authorize_listed(allow_list))

reads "admit a leaf client certificate whose thumbprint is on the allow-list". Nothing else in the project
knows how a decision is made. `shared.guard.Guard` applies an authorizer to every request.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from shared.allowlist import AllowList
from shared.identity import CallerIdentity

__all__ = [
    "Authorizer",
    "Decision",
    "authorize_all",
    "authorize_any",
    "authorize_client_leaf",
    "authorize_listed",
]


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
