"""The FastAPI dependency that applies an authorizer to every request, and says what it decided.

guard = Guard("service-b", authorize_all(authorize_client_leaf(), authorize_listed(allow_list)))
router = APIRouter(dependencies=[Depends(guard)])       # every route behind it is guarded
Caller = Annotated[PeerIdentity, Depends(guard)]        # and a handler can ask who called
"""

from __future__ import annotations

import logging

from fastapi import Request

from shared.authz.rules import Authorizer, Decision
from shared.inbound.asgi import VerifiedPeer
from shared.observability.metrics import Counter
from shared.problem import Problem
from shared.x509.identity import PeerIdentity

__all__ = ["Guard"]

log = logging.getLogger("mesh.authz")
authz_decisions = Counter(
    "mesh_authz_decisions_total",
    "Authorization decisions, by protected resource, verdict, reason and caller",
    ["resource", "decision", "reason", "caller", "caller_sha256"],
)


class Guard:
    """Returns the caller's identity if `authorizer` admits it; otherwise refuses with a problem document.

    Apply it to every route that does business (`APIRouter(dependencies=[Depends(guard)])`), and take
    `caller: Annotated[PeerIdentity, Depends(guard)]` where the handler needs to know who called.
    """

    def __init__(self, service: str, authorizer: Authorizer, resource: str = "api") -> None:
        self.service = service
        self.authorizer = authorizer
        self.resource = resource  # what this guard protects, in logs and metrics: "api", "metrics"

    async def __call__(self, request: Request) -> PeerIdentity:
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
        request.state.admitted_by = decision.code  # which rule let the caller in, for the handler to report
        return caller

    def _log(self, caller: PeerIdentity | None, decision: Decision) -> None:
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
