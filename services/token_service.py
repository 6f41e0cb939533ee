"""`python -m services.token_service`: the token service — the same mTLS stack as every service, plus
`POST /token` and `GET /jwks`.

It signs user tokens (shared/tokens/token.py) and decides every request from the token policy
(services/token_policy.py, rendered from pki/policy.toml). The caller is known by its certificate, checked
during the handshake and against allow/token-service.txt like any call in the mesh; every token it gets is
bound to that certificate. Two grants:

    POST /token  grant_type=urn:mtls-mesh:params:oauth:grant-type:edge-user
                 user=alice  audience=service-a                    # an edge, for a user it authenticated
    POST /token  grant_type=urn:ietf:params:oauth:grant-type:token-exchange
                 subject_token=…  subject_token_type=…:access_token  audience=service-b      # RFC 8693

Answers are RFC 8693 §2.2: `{"access_token", "issued_token_type", "token_type": "Bearer", "expires_in",
"scope"}`, or `400 {"error", "error_description"}` (RFC 6749 §5.2). Same `MESH_*` settings as a service
(services/config.py); MESH_NAME=token-service, MESH_PORT=8446 under `make run`.
"""

import logging
import sys
import time
from dataclasses import replace
from typing import Annotated, Any
from urllib.parse import parse_qs

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from services.__main__ import main as serve
from services.app import base_app
from services.config import ServiceConfig
from services.reloader import Reload
from services.signing import SigningKeys
from services.token_policy import GrantRefused, TokenPolicy
from services.wiring import build
from shared import tls
from shared.authz import Admitted
from shared.observability import Counter
from shared.problem import echo
from shared.tokens import ACCESS_TOKEN_TYPE, EXCHANGE_GRANT, USER_GRANT, TokenRefused, mint, verify
from shared.x509 import own_id

__all__ = ["create_token_app"]

log = logging.getLogger("mesh.tokens")
grants = Counter(
    "mesh_token_grants_total", "Token requests, by grant, verdict and error", ["grant", "decision", "error"]
)


class LivePolicy:
    """The token policy in force: replaced whole when tokens.json changes (make pki), or kept if the new one is
    broken. Tokens already signed may live as long as the old policy said: replaced keys are kept for the longer."""

    def __init__(self, policy: TokenPolicy, keys: SigningKeys) -> None:
        self.policy, self.keys = policy, keys

    def take(self, policy: TokenPolicy) -> None:
        self.keys.token_lifetime = max(self.keys.token_lifetime, policy.lifetime)
        self.policy = policy


def create_token_app(config: ServiceConfig, live: tls.LiveTLS) -> FastAPI:
    files = config.files
    service = build(config, live)
    issuer = str(own_id(live.certificate, files.cert, "the issuer (iss) of every token it signs"))
    policy = TokenPolicy.load(files.tokens_policy)  # before anything listens: no policy, no service
    live_policy = LivePolicy(policy, SigningKeys(config.signing_key_lifetime, policy.lifetime))
    keys = live_policy.keys
    app = base_app(
        replace(
            service,
            reloads={**service.reloads, files.tokens_policy: Reload(TokenPolicy.load, live_policy.take)},
            status=keys.status,
        )
    )
    Caller = Annotated[Admitted, Depends(service.guard)]

    @app.get("/jwks", dependencies=[Depends(service.guard)])
    async def jwks() -> dict[str, Any]:
        """The public keys tokens are signed with: the current one and those whose tokens may still be valid."""
        return keys.jwks()

    @app.post("/token")
    async def token(request: Request, admitted: Caller) -> JSONResponse:
        """Grant a token bound to the caller's certificate, or refuse with the rule it broke."""
        caller, policy = admitted.caller, live_policy.policy
        form = _form(await request.body())
        grant = form.get("grant_type", "")
        try:
            holder = policy.holder(caller)
            audience, requested = form.get("audience", ""), _scopes(form.get("scope"))
            if not audience:
                raise GrantRefused("invalid_request", "audience is required: the service the token is for")
            if grant == USER_GRANT:
                user = form.get("user", "")
                scopes = policy.grant_user_token(holder, user, audience, requested)
                previous = None
            elif grant == EXCHANGE_GRANT:
                if form.get("subject_token_type") != ACCESS_TOKEN_TYPE:
                    raise GrantRefused("invalid_request", f"subject_token_type must be {ACCESS_TOKEN_TYPE}")
                try:
                    previous = verify(form.get("subject_token", ""), keys.key_set(), issuer=issuer, audience=holder)
                except TokenRefused as e:
                    raise GrantRefused("invalid_grant", f"subject token: {e.reason}") from None
                user = previous.subject
                scopes = policy.grant_exchange(holder, previous, audience, requested)
            else:
                raise GrantRefused("unsupported_grant_type", f"grant_type {echo(grant)} is not one this service grants")
        except GrantRefused as refused:
            said = {"error": refused.error, "reason": refused.description}
            log.info("token_refused", extra={"grant": echo(grant, quote=False), "caller": caller.spiffe_id, **said})
            grants.inc(grant=_grant_name(grant), decision="deny", error=refused.error)
            status = 401 if refused.error == "invalid_client" else 400
            body = {"error": refused.error, "error_description": refused.description}
            return JSONResponse(body, status_code=status, headers={"Cache-Control": "no-store"})
        signed, expires = mint(
            keys.current(),
            issuer=issuer,
            subject=user,
            audience=audience,
            scopes=scopes,
            holder=caller,
            lifetime=policy.lifetime,
            previous=previous,
        )
        granted = {"grant": grant, "caller": caller.spiffe_id, "user": user, "audience": audience}
        log.info("token_granted", extra=granted)
        grants.inc(grant=_grant_name(grant), decision="allow", error="")
        body = {
            "access_token": signed,
            "issued_token_type": ACCESS_TOKEN_TYPE,
            # RFC 8705 keeps the Bearer scheme: the binding is checked against the connection, not the header.
            "token_type": "Bearer",
            "expires_in": max(0, expires - int(time.time())),
            "scope": " ".join(sorted(scopes)),
        }
        return JSONResponse(body, headers={"Cache-Control": "no-store"})  # RFC 6749 §5.1

    return app


def _form(body: bytes) -> dict[str, str]:
    """application/x-www-form-urlencoded, each field once (a repeated field is refused by being dropped).

    Parsed with the standard library rather than python-multipart: four short fields need no parser of
    multipart bodies, and the body is already bounded (MESH_MAX_BODY_BYTES)."""
    fields = parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True)
    return {name: values[0] for name, values in fields.items() if len(values) == 1}


def _scopes(text: str | None) -> frozenset[str] | None:
    return frozenset(text.split()) if text is not None else None


def _grant_name(grant: str) -> str:
    return {USER_GRANT: "user", EXCHANGE_GRANT: "exchange"}.get(grant, "other")


if __name__ == "__main__":
    sys.exit(serve(create_token_app))
