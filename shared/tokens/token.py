"""User tokens: what one is, how the token service makes one, and how a service checks one — one copy of it.

A user token is a JWT access token (RFC 9068, `typ: at+jwt`) signed with ES256 by the token service. It says
on whose behalf a request is made (`sub`), for which service (`aud`), what it may do (`scope`: the services
the user may reach), and who holds it: `cnf.x5t#S256` is the SHA-256 of the holder's certificate (RFC 8705),
so the token is worth nothing on a connection made with any other certificate, and `act` names the holder
and, nested, every earlier holder (RFC 8693)::

    {"iss": "spiffe://mesh.internal/token-service", "sub": "alice", "aud": "service-b",
     "scope": "service-a service-b service-c", "cnf": {"x5t#S256": "<A's certificate>"},
     "act": {"sub": "spiffe://mesh.internal/service-a", "act": {"sub": "spiffe://mesh.internal/client"}}, …}

    token = verify(raw, keys, issuer=…, audience="service-b")   # TokenRefused, naming the rule, if not
    check_holder(token, caller)                                  # …and the certificate on this connection

joserfc checks the signature, the algorithm and `crit`; every claim rule is written out here, in the order a
service applies them, because a token library's defaults are not a policy (joserfc's `decode` ignores `typ`).
"""

from __future__ import annotations

import base64
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from joserfc import jwt
from joserfc.errors import (
    BadSignatureError,
    InvalidHeaderValueError,
    InvalidKeyIdError,
    JoseError,
    UnsupportedAlgorithmError,
)
from joserfc.jwk import ECKey, KeySet

from shared.problem import echo
from shared.x509.identity import PeerIdentity

__all__ = [
    "ACCESS_TOKEN_TYPE",
    "ALGORITHM",
    "EXCHANGE_GRANT",
    "LEEWAY_SECONDS",
    "MAX_ACTORS",
    "TOKEN_SERVICE",
    "TYP",
    "USER_GRANT",
    "TokenRefused",
    "UserToken",
    "check_holder",
    "mint",
    "verify",
    "x5t_s256",
]

TOKEN_SERVICE = "token-service"  # the identity that signs user tokens; its SPIFFE ID is their `iss`
ALGORITHM = "ES256"  # P-256, like the mesh's own keys; the only algorithm a verifier accepts
TYP = "at+jwt"  # RFC 9068: an access token, never an ID token or any other JWT signed by the same key
LEEWAY_SECONDS = 5  # clocks differ a little between machines; tokens live minutes
MAX_ACTORS = 8  # a longer delegation chain than any path through the mesh means a loop: refused

# POST /token's grants. Exchange is RFC 8693's; asking for a user's first token is an extension grant
# (RFC 6749 §4.5) of this project: an edge vouches for a user it has authenticated itself.
EXCHANGE_GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
USER_GRANT = "urn:mtls-mesh:params:oauth:grant-type:edge-user"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"


class TokenRefused(Exception):
    """A token failed a rule: `reason` says which, `error` is RFC 6750's code (invalid_token, insufficient_scope).

    What it becomes in HTTP is decided at the edge (shared.tokens.onbehalf), not here."""

    def __init__(self, reason: str, error: str = "invalid_token") -> None:
        super().__init__(reason)
        self.reason, self.error = reason, error


@dataclass(frozen=True)
class UserToken:
    """A verified token's claims, as the services use them."""

    raw: str
    subject: str  # the user: sub
    audience: str  # the service it is for: aud
    scopes: frozenset[str]  # the services a request for this user may reach
    actors: tuple[str, ...]  # SPIFFE IDs of its holder and, after it, every earlier holder (act, act.act, …)
    bound_to: str  # cnf.x5t#S256: base64url SHA-256 of the holder's certificate
    expires_at: int  # exp, seconds since the epoch

    def summary(self) -> dict[str, Any]:
        """For the hop table: on whose behalf, through whom."""
        return {"sub": self.subject, "actors": list(self.actors), "scope": " ".join(sorted(self.scopes))}


def x5t_s256(caller: PeerIdentity) -> str:
    """RFC 8705's certificate thumbprint: the SHA-256 of the DER (our hex thumbprint), base64url, no padding."""
    return base64.urlsafe_b64encode(bytes.fromhex(caller.sha256)).rstrip(b"=").decode()


def mint(
    key: ECKey,
    *,
    issuer: str,
    subject: str,
    audience: str,
    scopes: frozenset[str],
    holder: PeerIdentity,
    lifetime: int,
    previous: UserToken | None = None,
) -> tuple[str, int]:
    """Sign a token for `holder`'s certificate; returns it and its expiry. An exchanged token (`previous`)
    keeps the user, never outlives its predecessor, and nests the predecessor's actors under `holder`."""
    now = int(time.time())
    expires = min(now + lifetime, previous.expires_at) if previous else now + lifetime
    actors = [holder.spiffe_id, *(previous.actors if previous else ())]
    act: dict[str, Any] | None = None
    for actor in reversed(actors):  # innermost first: the earliest holder ends up deepest
        act = {"sub": actor, **({"act": act} if act else {})}
    claims = {
        "iss": issuer,
        "sub": subject,
        "aud": audience,
        "scope": " ".join(sorted(scopes)),
        "client_id": holder.spiffe_id,  # RFC 9068 asks for it: the holder, as in act.sub
        "cnf": {"x5t#S256": x5t_s256(holder)},
        "act": act,
        "iat": now,
        "nbf": now,
        "exp": expires,
        "jti": uuid.uuid4().hex,
    }
    header = {"alg": ALGORITHM, "typ": TYP, "kid": key.kid}
    return jwt.encode(header, claims, key, algorithms=[ALGORITHM]), expires


def verify(raw: str, keys: KeySet, *, issuer: str, audience: str, now: float | None = None) -> UserToken:
    """Every rule that does not need the connection, in this order: signature and `kid`; `typ`; `iss`; `aud`
    is `audience`; `exp` and `nbf`; the claims' shapes. Raises TokenRefused naming the first rule broken."""
    token = _signed(raw, keys)  # before this, nothing in the token can be believed
    header, claims = token.header, token.claims
    if header.get("typ") != TYP:
        raise TokenRefused(f"typ is {echo(header.get('typ'))}, not {TYP!r}: not an access token of this mesh")
    if not isinstance(claims.get("iss"), str) or claims["iss"] != issuer:
        raise TokenRefused(f"issuer {echo(claims.get('iss'))} is not {issuer}")
    if not isinstance(claims.get("aud"), str) or claims["aud"] != audience:
        raise TokenRefused(f"the token is for {echo(claims.get('aud'))}, not for {audience}")
    now = time.time() if now is None else now
    exp, nbf = claims.get("exp"), claims.get("nbf", claims.get("iat"))
    if not _is_time(exp):
        raise TokenRefused("the token has no valid expiry (exp)")
    if now > exp + LEEWAY_SECONDS:
        raise TokenRefused(f"the token expired {int(now) - int(exp)} s ago")
    if nbf is not None and (not _is_time(nbf) or now < nbf - LEEWAY_SECONDS):
        raise TokenRefused("the token is not valid yet (nbf)")
    sub, scope, cnf = claims.get("sub"), claims.get("scope", ""), claims.get("cnf")
    if not isinstance(sub, str) or not sub:
        raise TokenRefused("the token names no user (sub)")
    if not isinstance(scope, str):
        raise TokenRefused("scope is not a space-separated string")
    if not isinstance(cnf, dict) or not isinstance(cnf.get("x5t#S256"), str):
        raise TokenRefused("the token is bound to no certificate (cnf.x5t#S256): a bearer token is not accepted")
    return UserToken(
        raw=raw,
        subject=sub,
        audience=claims["aud"],
        scopes=frozenset(scope.split()),
        actors=_actors(claims.get("act")),
        bound_to=cnf["x5t#S256"],
        expires_at=int(exp),
    )


def check_holder(token: UserToken, caller: PeerIdentity) -> None:
    """RFC 8705 §3: the token is bound to the certificate on *this* connection; and its current actor is the
    caller (RFC 8693 §4.1: only the current actor counts for decisions; the nested ones are history)."""
    if token.bound_to != x5t_s256(caller):
        raise TokenRefused(
            f"the token is bound to another certificate (cnf.x5t#S256 {echo(token.bound_to, quote=False)}), not to the "
            f"one on this connection ({x5t_s256(caller)}): a token is only good with the certificate it was issued to"
        )
    if not token.actors or token.actors[0] != caller.spiffe_id:
        holder = echo(token.actors[0]) if token.actors else "nobody"
        raise TokenRefused(f"the token's holder (act.sub) is {holder}, not the caller {caller.spiffe_id}")


def _signed(raw: str, keys: KeySet) -> jwt.Token:
    """The token, once its signature has been checked with the key its `kid` names."""
    try:
        token = jwt.decode(raw, keys, algorithms=[ALGORITHM])
    except UnsupportedAlgorithmError:
        raise TokenRefused(f"the token's algorithm is not {ALGORITHM}") from None
    except InvalidKeyIdError:
        raise TokenRefused("the token names a signing key (kid) the token service does not publish") from None
    except BadSignatureError:
        raise TokenRefused("the signature does not match: the token was altered or signed by someone else") from None
    except InvalidHeaderValueError as e:  # "'kid' in header must be a str": a registered name, none of the token's text
        raise TokenRefused(f"not a valid signed token ({e.description})") from None
    except JoseError as e:  # crit, unsupported headers, …: joserfc's fixed code, never the text the token carried
        raise TokenRefused(f"not a valid signed token ({e.error})") from None
    except (ValueError, TypeError):  # malformed base64 or JSON
        raise TokenRefused("not a valid signed token (its base64 or JSON is malformed)") from None
    except RecursionError:  # JSON nested deeper than Python's stack: garbage, whoever signed it
        raise TokenRefused("not a valid signed token (its JSON is nested too deep)") from None
    if "kid" not in token.header:
        raise TokenRefused("the token names no signing key (kid)")
    return token


def _actors(act: Any) -> tuple[str, ...]:
    actors: list[str] = []
    while isinstance(act, dict) and isinstance(act.get("sub"), str) and len(actors) <= MAX_ACTORS:
        actors.append(act["sub"])
        act = act.get("act")
    if act is not None or len(actors) > MAX_ACTORS:
        raise TokenRefused("the actor chain (act) is malformed or longer than any path through the mesh")
    return tuple(actors)


def _is_time(value: Any) -> bool:
    # Python's json reads Infinity and NaN: numbers, but no moment in time (and int() of either raises).
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, int) and not isinstance(value, bool)
