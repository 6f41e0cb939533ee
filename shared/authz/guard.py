"""The FastAPI dependency that applies an authorizer to every request, and returns what it decided.

authorizers = Authorizers(api=service_policy(allow_list, live))  # an Authorizer per resource (services.wiring)
guard = Guard("service-b", authorizers)                 # guards the resource "api"
router = APIRouter(dependencies=[Depends(guard)])       # every route behind it is guarded
Caller = Annotated[Admitted, Depends(guard)]            # and a handler can ask who called, and by which rule
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fastapi import Request

from shared.authz.rules import Authorizer, Decision
from shared.inbound.asgi import VerifiedPeer
from shared.observability import Counter, recent
from shared.problem import Problem
from shared.x509.identity import PeerIdentity

__all__ = ["Admitted", "Authorizers", "Guard"]

log = logging.getLogger("mesh.authz")
authz_decisions = Counter(
    "mesh_authz_decisions_total",
    "Authorization decisions, by protected resource, verdict, reason and caller",
    ["resource", "decision", "reason", "caller", "caller_sha256"],
)


# The rules that admit a caller (Decision.code), as the hop table names them.
_ADMITTED_BY = {"listed": "thumbprint", "listed_spiffe_id": "spiffe-id"}


@dataclass(frozen=True)
class Admitted:
    """The guard's verdict on a caller it let in: who, and by which rule."""

    caller: PeerIdentity
    rule: str  # Decision.code of the rule that admitted it

    @property
    def by(self) -> str:
        """What the caller was recognised by: "thumbprint" or "spiffe-id" (or the rule's code)."""
        return _ADMITTED_BY.get(self.rule, self.rule)


class Authorizers:
    """The authorizer in force for each resource of a service ("api", "metrics"): replaced whole when its
    allow-list changes (services.reloader), read afresh by the guard on every request. Never edited in place."""

    def __init__(self, **by_resource: Authorizer) -> None:
        self._by_resource = dict(by_resource)

    def __getitem__(self, resource: str) -> Authorizer:
        return self._by_resource[resource]

    def replace(self, resource: str, authorizer: Authorizer) -> None:
        if resource not in self._by_resource:
            raise KeyError(f"no authorizer for {resource!r}: a reload may replace one, never add one")
        self._by_resource[resource] = authorizer


class Guard:
    """Admits a caller if the authorizer in force for `resource` does; otherwise refuses with a problem document.

    Apply it to every route that does business (`APIRouter(dependencies=[Depends(guard)])`), and take
    `admitted: Annotated[Admitted, Depends(guard)]` where the handler needs to know who called.
    """

    def __init__(self, service: str, authorizers: Authorizers, resource: str = "api") -> None:
        self.service = service
        self.authorizers = authorizers
        self.resource = resource  # what this guard protects, in logs and metrics: "api", "metrics"

    async def __call__(self, request: Request) -> Admitted:
        # async on purpose: a plain `def` dependency would be sent to a thread pool on every request.
        caller = VerifiedPeer.of(request.scope).caller
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
        decision = self.authorizers[self.resource](caller)
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
        return Admitted(caller, decision.code)

    def _log(self, caller: PeerIdentity | None, decision: Decision) -> None:
        verdict = "allow" if decision.allowed else "deny"
        log.log(
            logging.INFO if decision.allowed else logging.WARNING,  # a refusal is what an operator looks for
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
        if self.resource == "api" or not decision.allowed:  # the operator's own reads would drown the rest
            recent.record("allow-list", verdict, decision.reason, decision.code, caller)
