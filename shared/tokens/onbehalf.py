"""The FastAPI dependency that checks the user token of every request: on whose behalf it is made.

    on_behalf = OnBehalfOf("service-b", tokens, required=True)
    User = Annotated[UserToken | None, Depends(on_behalf)]

It runs after the certificate guard (`shared.authz.guard`), on the same connection's verified certificate, and
checks in this order, answering RFC 6750's 401 `invalid_token` or 403 `insufficient_scope` with a problem
document naming the rule: the token's signature, `kid`, `typ`, `iss`, `aud`, `exp`/`nbf` (shared.tokens.verify);
that it is bound to the certificate on this connection and held by the caller (check_holder); and that its
scope lets the user reach this service.
"""

from __future__ import annotations

import logging

from fastapi import Request

from shared.inbound.asgi import VerifiedPeer
from shared.observability import Counter, recent
from shared.problem import Problem
from shared.tokens.client import TokenClient
from shared.tokens.token import TokenRefused, UserToken, check_holder
from shared.x509.identity import PeerIdentity

__all__ = ["OnBehalfOf"]

log = logging.getLogger("mesh.authz")
token_decisions = Counter(
    "mesh_user_token_decisions_total", "User token checks, by verdict and reason", ["decision", "reason"]
)


class OnBehalfOf:
    def __init__(self, service: str, tokens: TokenClient | None, required: bool) -> None:
        self.service, self.tokens, self.required = service, tokens, required

    async def __call__(self, request: Request) -> UserToken | None:
        caller = VerifiedPeer.of(request.scope).caller
        try:
            raw = _bearer(request.headers.get("authorization"))
            if raw is None:
                if not self.required:
                    return None
                raise TokenRefused(f"{self.service} requires a user token (Authorization: Bearer …); none was sent")
            if self.tokens is None:
                raise TokenRefused(f"{self.service} is not set up to check user tokens (no MESH_TOKEN_SERVICE_URL)")
            if caller is None:
                raise TokenRefused("a certificate-bound token needs a client certificate on the connection")
            token = await self.tokens.verify(raw, audience=self.service)
            check_holder(token, caller)
            if self.service not in token.scopes:
                raise TokenRefused(
                    f"{token.subject} may not reach {self.service}: it is not in the token's scope "
                    f"({' '.join(sorted(token.scopes)) or 'empty'})",
                    error="insufficient_scope",
                )
        except TokenRefused as refused:
            self._log(caller, None, refused.reason, refused.error)
            status = 403 if refused.error == "insufficient_scope" else 401  # RFC 6750 §3.1
            raise Problem(
                status,
                refused.error.replace("_", "-"),
                "User token refused" if status == 401 else "User not allowed here",
                f"{self.service} refused the request: {refused.reason}.",
                headers={"WWW-Authenticate": f'Bearer error="{refused.error}"'},
                service=self.service,
                reason=refused.reason,
            ) from None
        self._log(caller, token, "valid, bound to this connection's certificate, in scope", "valid")
        return token

    def _log(self, caller: PeerIdentity | None, token: UserToken | None, reason: str, code: str) -> None:
        verdict = "allow" if token else "deny"
        log.info(
            "user_token",
            extra={
                "decision": verdict,
                "reason": reason,
                "user": token.subject if token else None,
                "actors": list(token.actors) if token else None,
                "caller_sha256": caller.sha256 if caller else None,
            },
        )
        token_decisions.inc(decision=verdict, reason=code)
        recent.record("token", verdict, reason, None if token is None else code, caller)


def _bearer(header: str | None) -> str | None:
    """The token of `Authorization: Bearer <token>` (the scheme is case-insensitive, RFC 9110 §11.1)."""
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise TokenRefused("the Authorization header is not `Bearer <token>`")
    return token.strip()
