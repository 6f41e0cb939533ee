"""Authorization: TLS said the caller's certificate is genuine; this decides whether that caller may come in.

Shaped after go-spiffe's authorizers: an `Authorizer` takes a peer's identity and returns a `Decision` —
allowed, or denied with a reason. Small constructors build them; policy composes them:

    authorize_all(authorize_client_leaf(), authorize_trusted_now(live.refusal), authorize_listed(allow_list))

reads "admit a leaf client certificate, trusted now, that is on the allow-list". The same type
authorizes the other direction: a caller checks its callee with
`authorize_id(SpiffeId.parse("spiffe://mesh.internal/service-b"))` (shared.outbound.callee). Nothing else in the
project knows how a decision is made; `shared.authz.Guard` applies an authorizer to every request.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from shared.authz.allowlist import AllowList
from shared.x509.identity import PeerIdentity
from shared.x509.spiffe import SpiffeId

__all__ = [
    "Authorizer",
    "Decision",
    "authorize_all",
    "authorize_client_leaf",
    "authorize_id",
    "authorize_ids",
    "authorize_listed",
    "authorize_trusted_now",
]


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str  # a sentence, for the log and the 403 body
    code: str  # a stable short name, for metrics labels and alerting


Authorizer = Callable[[PeerIdentity], Decision]


def authorize_trusted_now(refusal: Callable[[PeerIdentity], str | None]) -> Authorizer:
    """Admit a caller whose certificate a handshake would still accept now (`refusal`: shared.tls.LiveTLS.refusal).

    TLS verifies a certificate once, when the connection opens. A certificate revoked, expired or from a CA no
    longer trusted since then is refused on its next request, whether the connection was kept busy past the
    certificate's expiry or the request was read just before a reload closed the connection (services.reloader).
    """

    def authorize(caller: PeerIdentity) -> Decision:
        if (why := refusal(caller)) is not None:
            reason = f"the certificate is no longer trusted since its connection opened: {why}"
            return Decision(False, reason, "no_longer_trusted")
        return Decision(True, "the certificate is still trusted", "trusted_now")

    return authorize


def authorize_client_leaf() -> Authorizer:
    """Admit only end-entity certificates issued for client authentication; a CA certificate is no caller."""

    def authorize(caller: PeerIdentity) -> Decision:
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


def authorize_id(expected: SpiffeId) -> Authorizer:
    """Admit the peer whose certificate is a valid X509-SVID for exactly `expected`."""
    return authorize_ids(expected)


def authorize_ids(*allowed: SpiffeId) -> Authorizer:
    """Admit peers whose certificate is a valid X509-SVID for one of `allowed`."""

    def authorize(peer: PeerIdentity) -> Decision:
        if peer.spiffe_id is None:
            return Decision(False, f"the certificate has no SPIFFE ID: {peer.svid_problem}", "no_spiffe_id")
        if SpiffeId.parse(peer.spiffe_id) in allowed:
            return Decision(True, f"SPIFFE ID {peer.spiffe_id} is allowed", "spiffe_id")
        return Decision(False, f"SPIFFE ID {peer.spiffe_id} is not {_either(allowed)}", "other_spiffe_id")

    return authorize


def authorize_listed(allow_list: AllowList) -> Authorizer:
    """Admit callers the allow-list names — by thumbprint (a pin) or by SPIFFE ID (a name); deny the rest."""
    by_id = authorize_ids(*allow_list.ids)

    def authorize(caller: PeerIdentity) -> Decision:
        if caller.sha256 in allow_list:
            label = allow_list.label(caller.sha256)
            return Decision(True, f"thumbprint is on {allow_list.source.name} as {label!r}", "listed")
        if not allow_list.ids:
            return Decision(False, f"thumbprint is not on the allow-list {allow_list.source.name}", "not_listed")
        decision = by_id(caller)
        if decision.allowed:
            return Decision(True, f"SPIFFE ID {caller.spiffe_id} is on {allow_list.source.name}", "listed_spiffe_id")
        if decision.code == "no_spiffe_id":
            return decision
        return Decision(
            False, f"thumbprint and SPIFFE ID are not on the allow-list {allow_list.source.name}", "not_listed"
        )

    return authorize


def _either(ids: tuple[SpiffeId, ...]) -> str:
    return " or ".join(map(str, sorted(ids))) or "any allowed ID (none is)"


def authorize_all(*authorizers: Authorizer) -> Authorizer:
    """Admit only callers that every authorizer admits; the first denial gives the reason."""

    def authorize(caller: PeerIdentity) -> Decision:
        decision = Decision(False, "no authorizer was given: deny by default", "no_authorizer")
        for authorizer in authorizers:
            decision = authorizer(caller)
            if not decision.allowed:
                return decision
        return decision

    return authorize
