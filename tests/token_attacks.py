"""The attacks on user tokens that need no secret of the token service: each one a function run against the
local processes (tests/test_tokens_mesh.py) and the Docker mesh (tests/compose/test_compose_tokens.py) alike.

A `Target` is a running mesh with MESH_REQUIRE_USER_TOKEN=true, seen from the host: where each service
answers, and what each one logged. Every refusal is checked at the service that must refuse, with its reason
in the answer and in that service's log, and with the services behind it seeing nothing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ssl
from pathlib import Path
from typing import Any, Protocol

import httpx

from shared.layout import Layout
from shared.tokens import ACCESS_TOKEN_TYPE, EXCHANGE_GRANT, USER_GRANT
from tests.support import (
    Credentials,
    attacker_context,
    authorize_by,
    forge,
    get,
    identity_of,
    leaf,
    post_token,
    signing_key,
    token_claims,
    write_leaf,
)

CHAIN = ("service-a", "service-b", "service-c")
SPIFFE = {name: f"spiffe://mesh.internal/{name}" for name in ("client", *CHAIN)}


class Target(Protocol):
    layout: Layout

    def base_url(self, name: str) -> str: ...

    def events(self, name: str) -> list[dict[str, Any]]: ...


# ── moves ───────────────────────────────────────────────────────────────────────────────────────────────────


def as_(target: Target, name: str) -> ssl.SSLContext:
    """A hand-built client context presenting identity `name`'s certificate (stolen, or its own)."""
    return attacker_context(target.layout.ca_cert, Credentials(target.layout.cert(name), target.layout.key(name)))


def user_token(target: Target, user: str = "alice", by: str = "client", audience: str = "service-a") -> httpx.Response:
    form = {"grant_type": USER_GRANT, "user": user, "audience": audience}
    return post_token(target.base_url("token-service"), as_(target, by), form)


def exchange(target: Target, subject: str, by: str, audience: str, scope: str | None = None) -> httpx.Response:
    form = {
        "grant_type": EXCHANGE_GRANT,
        "subject_token": subject,
        "subject_token_type": ACCESS_TOKEN_TYPE,
        "audience": audience,
        **({"scope": scope} if scope else {}),
    }
    return post_token(target.base_url("token-service"), as_(target, by), form)


def token_for(target: Target, audience: str, user: str = "alice") -> str:
    """A genuine token for `audience`, held by the service before it: got hop by hop, as the chain does."""
    token = user_token(target, user).json()["access_token"]
    for holder, next_hop in zip(("service-a", "service-b"), CHAIN[1:], strict=True):
        if CHAIN.index(audience) < CHAIN.index(next_hop):
            break
        token = exchange(target, token, holder, next_hop).json()["access_token"]
    return token


def chain(target: Target, service: str, context: ssl.SSLContext, token: str | None) -> httpx.Response:
    return get(target.base_url(service) + "/chain", service, context, token)


def marks(target: Target) -> dict[str, int]:
    return {name: len(target.events(name)) for name in (*CHAIN, "token-service")}


def since(target: Target, mark: dict[str, int], name: str, event: str | None = "user_token") -> list[dict[str, Any]]:
    return [e for e in target.events(name)[mark[name] :] if event is None or e.get("event") == event]


def saw_nothing(target: Target, mark: dict[str, int], *names: str) -> None:
    for name in names:
        assert since(target, mark, name, None) == [], f"{name} saw the request"


# ── attacks ─────────────────────────────────────────────────────────────────────────────────────────────────


def chain_runs_on_behalf_of_alice(target: Target) -> None:
    response = chain(target, "service-a", as_(target, "client"), user_token(target).json()["access_token"])
    assert response.status_code == 200, response.text
    hops = response.json()["hops"]
    client, a, b = SPIFFE["client"], SPIFFE["service-a"], SPIFFE["service-b"]
    assert [hop["on_behalf_of"]["sub"] for hop in hops] == ["alice"] * 3
    assert [hop["on_behalf_of"]["actors"] for hop in hops] == [[client], [a, client], [b, a, client]]


def stolen_service_key_without_a_user_token(target: Target) -> None:
    """service-a's key and certificate, no user token: B refuses (401) and C sees nothing; the token service
    will not mint a user token for service-a, which is no edge."""
    mark = marks(target)
    response = chain(target, "service-b", as_(target, "service-a"), None)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    assert "service-b requires a user token" in response.json()["reason"]
    [refusal] = since(target, mark, "service-b")
    assert refusal["decision"] == "deny" and "requires a user token" in refusal["reason"]
    saw_nothing(target, mark, "service-c")

    minted = user_token(target, by="service-a", audience="service-b")
    assert minted.status_code == 400
    assert minted.json()["error"] == "unauthorized_client"
    assert "service-a is not an edge" in minted.json()["error_description"]
    [logged] = since(target, mark, "token-service", "token_refused")
    assert logged["error"] == "unauthorized_client"


def token_for_service_b_at_service_c(target: Target) -> None:
    """A genuine token for aud=service-b, sent to C directly: with A's certificate the allow-list refuses it;
    with service-b's certificate (the one C admits), the token is refused for its audience."""
    for_b = token_for(target, "service-b")
    mark = marks(target)
    assert chain(target, "service-c", as_(target, "service-a"), for_b).status_code == 403
    response = chain(target, "service-c", as_(target, "service-b"), for_b)
    assert response.status_code == 401
    assert "the token is for 'service-b', not for service-c" in response.json()["reason"]
    assert "not for service-c" in since(target, mark, "service-c")[-1]["reason"]


def valid_token_with_another_certificate(target: Target, tmp: Path) -> None:
    """A token bound to service-a's certificate, presented with a re-issued service-a certificate (same SPIFFE
    ID, new key). By SPIFFE ID, B admits the certificate and refuses the token (cnf); by thumbprint, the new
    certificate is not even on B's allow-list. Either way C sees nothing."""
    for_b = token_for(target, "service-b")
    twin = write_leaf(target.layout, leaf(target.layout, uris=[SPIFFE["service-a"]]), tmp, "twin")
    # Used once as it should be, so that B has it verified and cached: the cache spares the signature, not cnf.
    assert chain(target, "service-b", as_(target, "service-a"), for_b).status_code == 200
    mark = marks(target)
    response = chain(target, "service-b", attacker_context(target.layout.ca_cert, twin), for_b)
    if authorize_by(target.layout) == "spiffe-id":
        assert response.status_code == 401
        assert "bound to another certificate" in response.json()["reason"]
        assert "bound to another certificate" in since(target, mark, "service-b")[0]["reason"]
    else:
        assert response.status_code == 403
    saw_nothing(target, mark, "service-c")
    # …while with the certificate it is bound to, the same token works.
    assert chain(target, "service-b", as_(target, "service-a"), for_b).status_code == 200


EXCHANGES_OUTSIDE_POLICY = {
    "C exchanging for service-a": ("invalid_target", "service-c may not call service-a"),
    "B asking for a scope the subject token lacks": ("invalid_scope", "scopes never widen"),
    "a foreign-signed subject token": ("invalid_grant", "signing key (kid) the token service does not publish"),
    "B exchanging the token given to A": ("invalid_grant", "the token is for 'service-a', not for service-b"),
}


def exchange_outside_policy(target: Target, case: str) -> None:
    error, words = EXCHANGES_OUTSIDE_POLICY[case]
    if case == "C exchanging for service-a":
        response = exchange(target, token_for(target, "service-c"), "service-c", "service-a")
    elif case == "B asking for a scope the subject token lacks":
        response = exchange(target, token_for(target, "service-b", user="bob"), "service-b", "service-c", "service-c")
    elif case == "a foreign-signed subject token":
        stranger = signing_key()
        claims = token_claims(identity_of(_credentials(target, "client")), "service-a")
        foreign = forge(stranger, {"alg": "ES256", "typ": "at+jwt", "kid": stranger.kid}, claims)
        response = exchange(target, foreign, "service-a", "service-b")
    else:
        response = exchange(target, token_for(target, "service-a"), "service-b", "service-c")
    assert response.status_code == 400
    assert response.json()["error"] == error and words in response.json()["error_description"]


def _tampered(target: Target) -> str:
    header, _, signature = token_for(target, "service-a").split(".")
    evil = forge(None, {}, {**token_claims(identity_of(_credentials(target, "client")), "service-a"), "sub": "mallory"})
    return f"{header}.{evil.split('.')[1]}.{signature}"


def _alg_none(target: Target) -> str:
    claims = token_claims(identity_of(_credentials(target, "client")), "service-a")
    return forge(None, {"alg": "none", "typ": "at+jwt"}, claims, signature=b"")


def _hmac_with_the_public_key(target: Target) -> str:
    """The classic: fetch the published key and use it as an HMAC secret, hoping the verifier follows `alg`."""
    with httpx.Client(verify=as_(target, "client"), timeout=10) as client:
        jwk = client.get(target.base_url("token-service") + "/jwks", extensions={"sni_hostname": "token-service"})
    published = jwk.json()["keys"][0]
    from joserfc.jwk import ECKey

    secret = ECKey.import_key(published).as_pem(private=False)
    header = {"alg": "HS256", "typ": "at+jwt", "kid": published["kid"]}
    claims = token_claims(identity_of(_credentials(target, "client")), "service-a")
    unsigned = forge(None, header, claims, signature=b"x").rsplit(".", 1)[0]
    return forge(None, header, claims, signature=hmac.new(secret, unsigned.encode(), hashlib.sha256).digest())


def _unknown_kid(target: Target) -> str:
    mine = signing_key()
    claims = token_claims(identity_of(_credentials(target, "client")), "service-a")
    return forge(mine, {"alg": "ES256", "typ": "at+jwt", "kid": mine.kid}, claims)


def _with_header(**fields: Any) -> Any:
    """A token signed by a key of our own whose header carries `fields`: malformed before any key is looked up."""

    def make(target: Target) -> str:
        mine = signing_key()
        claims = token_claims(identity_of(_credentials(target, "client")), "service-a")
        return forge(mine, {"alg": "ES256", "typ": "at+jwt", "kid": mine.kid, **fields}, claims)

    return make


def _segments(header: bytes, payload: bytes = b"{}", signature: bytes = b"sig") -> Any:
    """Three base64url segments of whatever bytes an attacker likes: not JSON, not an object, nested too deep."""
    return lambda target: ".".join(
        base64.urlsafe_b64encode(part).rstrip(b"=").decode() for part in (header, payload, signature)
    )


KEYLESS_FORGERIES = {
    "tampered payload": (_tampered, "signature does not match"),
    "alg none": (_alg_none, "algorithm is not ES256"),
    "HMAC with the public key as secret": (_hmac_with_the_public_key, "algorithm is not ES256"),
    "unknown kid": (_unknown_kid, "does not publish"),
    # Malformed tokens: each a 401 naming what is wrong, never a 500 (a JSON list as kid once was one).
    "list kid": (_with_header(kid=["a", "b"]), "'kid' in header must be a str"),
    "object kid": (_with_header(kid={"kid": "a"}), "'kid' in header must be a str"),
    "numeric kid": (_with_header(kid=7), "'kid' in header must be a str"),
    "non-string alg": (_with_header(alg=["ES256"]), "'alg' in header must be a str"),
    "huge token": (_with_header(pad="x" * 9_000), "not a valid signed token"),
    "non-base64": (lambda target: "!!!.@@@.###", "not a valid signed token"),
    "a header that is a JSON list": (_segments(b'["ES256"]'), "not a valid signed token"),
    "nested JSON garbage": (_segments(b"[" * 5_000 + b"]" * 5_000), "not a valid signed token"),
    "not a JWS at all": (lambda target: "Zm9v", "not a valid signed token"),
}


def forged_token_at_the_first_service(target: Target, token: str, reason: str) -> None:
    mark = marks(target)
    response = chain(target, "service-a", as_(target, "client"), token)
    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert reason in response.json()["reason"]
    [logged] = since(target, mark, "service-a")
    assert logged["decision"] == "deny" and reason in logged["reason"]
    assert since(target, mark, "service-a", "unexpected_error") == []  # no stack trace in the log either
    saw_nothing(target, mark, "service-b", "service-c")
    assert since(target, mark, "token-service", "token_granted") == []


def user_without_the_scope_of_c(target: Target) -> None:
    """bob may reach A and B, not C: A and B accept his token, C refuses it (403), and the client learns where."""
    bob = user_token(target, user="bob").json()["access_token"]
    mark = marks(target)
    response = chain(target, "service-a", as_(target, "client"), bob)
    assert response.status_code == 502
    assert "service-c refused service-b: bob may not reach service-c" in response.json()["reason"]
    accepted = since(target, mark, "service-a") + since(target, mark, "service-b")
    assert [e["decision"] for e in accepted] == ["allow", "allow"]
    [refused] = since(target, mark, "service-c")
    assert refused["decision"] == "deny" and "bob may not reach service-c" in refused["reason"]


def _credentials(target: Target, name: str) -> Credentials:
    return Credentials(target.layout.cert(name), target.layout.key(name))
