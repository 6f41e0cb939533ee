"""User tokens, rule by rule: `shared.tokens.verify`/`check_holder`, the token policy, and the signing keys.

Every forged token here is signed by hand (tests.support.forge), the way an attacker would, so that no JOSE
library's own checks on the way out stand between the attack and the rule under test.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import ssl
import time
import types
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from joserfc.jwk import ECKey, KeySet

from pki import Policy
from services.signing import SigningKeys
from services.token_policy import GrantRefused, TokenPolicy
from shared.layout import Layout
from shared.outbound import Downstream
from shared.problem import Problem
from shared.tokens import (
    KEYS_MAX_AGE,
    LEEWAY_SECONDS,
    REFETCH_AFTER,
    REUSE_FOR,
    TokenClient,
    TokenRefused,
    UserToken,
    check_holder,
    mint,
    verify,
    x5t_s256,
)
from shared.tokens import client as client_module
from shared.x509 import MaterialError, PeerIdentity, SpiffeId
from tests.support import Credentials, forge, identity_of, signing_key, token_claims

pytestmark = pytest.mark.fast  # in-process: part of `make test-fast`

ISSUER = "spiffe://mesh.internal/token-service"


@pytest.fixture(scope="module")
def key() -> ECKey:
    return signing_key()


@pytest.fixture(scope="module")
def holder(layout: Layout) -> PeerIdentity:
    return identity_of(Credentials(layout.cert("service-a"), layout.key("service-a")))


def header(key: ECKey, **overrides: Any) -> dict[str, Any]:
    return {"alg": "ES256", "typ": "at+jwt", "kid": key.kid, **overrides}


def refusal(raw: str, keys: KeySet, audience: str = "service-b") -> str:
    with pytest.raises(TokenRefused) as refused:
        verify(raw, keys, issuer=ISSUER, audience=audience)
    return refused.value.reason


def test_a_token_the_service_signed_verifies(key: ECKey, holder: PeerIdentity) -> None:
    raw, expires = mint(
        key,
        issuer=ISSUER,
        subject="alice",
        audience="service-b",
        scopes=frozenset({"service-b"}),
        holder=holder,
        lifetime=60,
    )
    token = verify(raw, KeySet([key]), issuer=ISSUER, audience="service-b")
    assert (token.subject, token.audience, token.scopes, token.actors) == (
        "alice",
        "service-b",
        frozenset({"service-b"}),
        ("spiffe://mesh.internal/service-a",),
    )
    assert token.bound_to == x5t_s256(holder) and token.expires_at == expires
    check_holder(token, holder)


@pytest.mark.parametrize(
    ("attack", "reason"),
    [
        ("tampered payload", "signature does not match"),
        ("alg none", "algorithm is not ES256"),
        ("HMAC with the public key as secret", "algorithm is not ES256"),
        ("unknown kid", "signing key (kid) the token service does not publish"),
        ("no kid", "names no signing key"),
        ("signed by another key under our kid", "signature does not match"),
        ("wrong typ", "typ is 'JWT'"),
        ("no typ", "typ is None"),
        ("list-valued iss", "issuer ["),
        ("foreign issuer", "issuer 'spiffe://elsewhere/token-service'"),
        ("wrong audience", "the token is for 'service-c', not for service-b"),
        ("list-valued audience", "the token is for ["),
        ("expired", "the token expired"),
        ("not yet valid", "not valid yet"),
        ("no exp", "no valid expiry"),
        ("infinite exp", "no valid expiry"),
        ("crit header with an unknown extension", "not a valid signed token"),
        ("unbound (a bearer token)", "bound to no certificate"),
        ("no user", "names no user"),
        ("list-valued scope", "scope is not a space-separated string"),
        ("act loop", "actor chain"),
    ],
)
def test_forged_tokens_are_refused_naming_the_rule(key: ECKey, holder: PeerIdentity, attack: str, reason: str) -> None:
    keys = KeySet([key])
    claims = token_claims(holder, "service-b")
    now = int(time.time())
    if attack == "tampered payload":
        good = forge(key, header(key), claims)
        evil = forge(key, header(key), {**claims, "sub": "mallory"})
        raw = ".".join([*evil.split(".")[:2], good.split(".")[2]])
    elif attack == "alg none":
        raw = forge(None, header(key, alg="none"), claims, signature=b"")
    elif attack == "HMAC with the public key as secret":
        public_pem = key.as_pem(private=False)
        unsigned = forge(None, header(key, alg="HS256"), claims, signature=b"x").rsplit(".", 1)[0]
        mac = hmac.new(public_pem, unsigned.encode(), hashlib.sha256).digest()
        raw = forge(None, header(key, alg="HS256"), claims, signature=mac)
    elif attack == "unknown kid":
        other = signing_key()
        raw = forge(other, header(other), claims)
    elif attack == "no kid":
        raw = forge(key, {"alg": "ES256", "typ": "at+jwt"}, claims)
    elif attack == "signed by another key under our kid":
        raw = forge(signing_key(kid=key.kid), header(key), claims)
    elif attack == "wrong typ":
        raw = forge(key, header(key, typ="JWT"), claims)
    elif attack == "no typ":
        raw = forge(key, {"alg": "ES256", "kid": key.kid}, claims)
    elif attack == "list-valued iss":
        raw = forge(key, header(key), {**claims, "iss": [ISSUER]})
    elif attack == "foreign issuer":
        raw = forge(key, header(key), {**claims, "iss": "spiffe://elsewhere/token-service"})
    elif attack == "wrong audience":
        raw = forge(key, header(key), {**claims, "aud": "service-c"})
    elif attack == "list-valued audience":
        raw = forge(key, header(key), {**claims, "aud": ["service-b", "service-c"]})
    elif attack == "expired":
        raw = forge(key, header(key), {**claims, "exp": now - LEEWAY_SECONDS - 1})
    elif attack == "not yet valid":
        raw = forge(key, header(key), {**claims, "nbf": now + LEEWAY_SECONDS + 60})
    elif attack == "infinite exp":  # JSON as Python reads it: Infinity is a number, but no moment in time
        raw = forge(key, header(key), {**claims, "exp": float("inf")})
    elif attack == "no exp":
        raw = forge(key, header(key), {k: v for k, v in claims.items() if k != "exp"})
    elif attack == "crit header with an unknown extension":
        extension = "urn:example:must-understand"
        raw = forge(key, header(key, crit=[extension], **{extension: 1}), claims)
    elif attack == "unbound (a bearer token)":
        raw = forge(key, header(key), {k: v for k, v in claims.items() if k != "cnf"})
    elif attack == "no user":
        raw = forge(key, header(key), {**claims, "sub": ""})
    elif attack == "list-valued scope":
        raw = forge(key, header(key), {**claims, "scope": ["service-b"]})
    else:  # act loop
        act: dict[str, Any] = {"sub": holder.spiffe_id}
        for _ in range(20):
            act = {"sub": holder.spiffe_id, "act": act}
        raw = forge(key, header(key), {**claims, "act": act})
    assert reason in refusal(raw, keys)


def test_within_the_leeway_a_token_is_still_valid(key: ECKey, holder: PeerIdentity) -> None:
    now = int(time.time())
    raw = forge(key, header(key), token_claims(holder, "service-b", exp=now - LEEWAY_SECONDS + 2))
    verify(raw, KeySet([key]), issuer=ISSUER, audience="service-b")


def test_a_token_is_only_good_with_the_certificate_it_was_issued_to(
    key: ECKey, holder: PeerIdentity, layout: Layout
) -> None:
    raw = forge(key, header(key), token_claims(holder, "service-c"))
    token = verify(raw, KeySet([key]), issuer=ISSUER, audience="service-c")
    someone_else = identity_of(Credentials(layout.cert("service-b"), layout.key("service-b")))
    with pytest.raises(TokenRefused, match="bound to another certificate"):
        check_holder(token, someone_else)


def test_the_current_actor_must_be_the_caller(key: ECKey, holder: PeerIdentity) -> None:
    claims = token_claims(holder, "service-b", act={"sub": "spiffe://mesh.internal/service-b"})
    token = verify(forge(key, header(key), claims), KeySet([key]), issuer=ISSUER, audience="service-b")
    with pytest.raises(TokenRefused, match=r"holder \(act\.sub\)"):
        check_holder(token, holder)


def test_an_exchanged_token_keeps_the_user_nests_the_actors_and_never_outlives_its_predecessor(
    key: ECKey, holder: PeerIdentity
) -> None:
    previous = UserToken(
        raw="",
        subject="alice",
        audience="service-a",
        scopes=frozenset({"service-a", "service-b"}),
        actors=("spiffe://mesh.internal/client",),
        bound_to="",
        expires_at=int(time.time()) + 30,
    )
    raw, expires = mint(
        key,
        issuer=ISSUER,
        subject="alice",
        audience="service-b",
        scopes=previous.scopes,
        holder=holder,
        lifetime=300,
        previous=previous,
    )
    token = verify(raw, KeySet([key]), issuer=ISSUER, audience="service-b")
    assert token.actors == ("spiffe://mesh.internal/service-a", "spiffe://mesh.internal/client")
    assert expires == previous.expires_at


# ── the token policy ────────────────────────────────────────────────────────────────────────────────────────


@pytest.fixture(scope="module")
def policy(layout: Layout) -> TokenPolicy:
    return TokenPolicy.load(layout.tokens_policy)


def given(audience: str, scopes: str = "service-a service-b service-c") -> UserToken:
    return UserToken("", "alice", audience, frozenset(scopes.split()), (), "", int(time.time()) + 60)


def test_only_an_edge_gets_a_token_in_a_users_name(policy: TokenPolicy) -> None:
    assert policy.grant_user_token("client", "alice", "service-a", None) == {"service-a", "service-b", "service-c"}
    with pytest.raises(GrantRefused) as refused:
        policy.grant_user_token("service-a", "alice", "service-b", None)
    assert refused.value.error == "unauthorized_client" and "service-a is not an edge" in refused.value.description


@pytest.mark.parametrize(
    ("holder", "subject", "audience", "scope", "error", "words"),
    [
        ("service-c", given("service-c"), "service-a", None, "invalid_target", "service-c may not call service-a"),
        ("service-a", given("service-a"), "service-c", None, "invalid_target", "service-a may not call service-c"),
        ("service-b", given("service-b", "service-a service-b"), "service-c", "service-c", "invalid_scope", "never"),
        ("service-b", given("service-a"), "service-c", None, "invalid_grant", "it was not given to you"),
    ],
    ids=["C for A", "A skipping B", "B widening the scope", "B with A's token"],
)
def test_exchanges_outside_the_policy_are_refused(
    policy: TokenPolicy, holder: str, subject: UserToken, audience: str, scope: str | None, error: str, words: str
) -> None:
    with pytest.raises(GrantRefused) as refused:
        policy.grant_exchange(holder, subject, audience, frozenset(scope.split()) if scope else None)
    assert refused.value.error == error and words in refused.value.description


@pytest.mark.parametrize(
    "spiffe_id",
    [None, "spiffe://other.internal/service-a", "spiffe://mesh.internal/team/service-a", "spiffe://mesh.internal"],
    ids=["no SPIFFE ID", "another trust domain", "a nested path", "no path"],
)
def test_only_a_spiffe_id_of_our_trust_domain_names_a_holder(policy: TokenPolicy, spiffe_id: str | None) -> None:
    caller = PeerIdentity(
        sha256="a" * 64,
        subject="CN=service-a,O=mtls-mesh",
        spiffe_id=spiffe_id,
        svid_problem=None if spiffe_id else "no URI SAN",
        dns_names=(),
        is_leaf=True,
        client_auth=True,
    )
    with pytest.raises(GrantRefused) as refused:
        policy.holder(caller)
    assert (refused.value.error, refused.value.description) == (
        "unauthorized_client",
        "CN=service-a,O=mtls-mesh has no SPIFFE ID of mesh.internal",
    )
    assert policy.holder(dataclasses.replace(caller, spiffe_id="spiffe://mesh.internal/service-a")) == "service-a"


def test_narrowing_the_scope_is_allowed(policy: TokenPolicy) -> None:
    assert policy.grant_exchange("service-a", given("service-a"), "service-b", frozenset({"service-b"})) == {
        "service-b"
    }


def test_a_missing_or_broken_token_policy_stops_the_service_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(MaterialError, match=r"tokens\.json: token policy not found — run `make pki`"):
        TokenPolicy.load(tmp_path / "tokens.json")
    (tmp_path / "tokens.json").write_text('{"edges": []}')
    with pytest.raises(MaterialError, match="not a token policy"):
        TokenPolicy.load(tmp_path / "tokens.json")


def test_the_policy_file_says_who_is_an_edge_and_what_users_may_reach() -> None:
    policy = Policy.load()
    assert policy.edges == ("client",)
    assert "service-c" not in policy.users["bob"]
    assert policy.may_call()["service-b"] == ("service-c",)
    assert "token-service" not in {callee for callees in policy.may_call().values() for callee in callees}


# ── signing keys ────────────────────────────────────────────────────────────────────────────────────────────


def test_keys_are_published_before_they_sign_and_after_until_their_tokens_have_expired() -> None:
    now = [1000.0]
    keys = SigningKeys(roll_every=60, token_lifetime=30, clock=lambda: now[0])

    def published() -> list[str]:
        return [k["kid"] for k in keys.jwks()["keys"]]

    first = keys.current()
    upcoming = published()[1]
    assert published() == [first.kid, upcoming]  # the next key is out before it signs anything
    now[0] += 60
    second = keys.current()
    assert second.kid == upcoming
    third = published()[1]
    assert published() == [second.kid, third, first.kid]
    now[0] += 30 + LEEWAY_SECONDS  # the last token the first key signed has just expired, leeway included
    assert published() == [second.kid, third, first.kid]
    now[0] += 1
    assert published() == [second.kid, third]
    assert all("d" not in k for k in keys.jwks()["keys"])  # never the private half


def test_an_exchange_follows_the_policy_in_force_not_the_one_the_subject_token_was_issued_under(
    policy: TokenPolicy,
) -> None:
    """bob removed and alice narrowed to A and B after their tokens were issued: bob gets nothing more, alice's
    next token carries only what she may reach now, and asking for more is refused."""
    now = dataclasses.replace(policy, users={"alice": frozenset({"service-a", "service-b"})})
    bobs = dataclasses.replace(given("service-a", "service-a service-b"), subject="bob")
    with pytest.raises(GrantRefused) as refused:
        now.grant_exchange("service-a", bobs, "service-b", None)
    assert (refused.value.error, refused.value.description) == ("invalid_grant", "no user 'bob' in the policy")
    assert now.grant_exchange("service-b", given("service-b"), "service-c", None) == {"service-a", "service-b"}
    with pytest.raises(GrantRefused) as refused:
        now.grant_exchange("service-b", given("service-b"), "service-c", frozenset({"service-c"}))
    assert refused.value.error == "invalid_scope" and "service-c is not in alice's scopes" in refused.value.description
    # Narrowed at the first hop (found by attack): A's exchange was granted, and her old token for A went on
    # through the chain for its whole life (A checks the scope the token carries, not the policy).
    only_b = dataclasses.replace(policy, users={"alice": frozenset({"service-b", "service-c"})})
    with pytest.raises(GrantRefused) as refused:
        only_b.grant_exchange("service-a", given("service-a"), "service-b", None)
    assert refused.value.error == "invalid_grant" and "service-a is no longer in alice's scopes" in (
        refused.value.description
    )


# ── the key set, as a service fetches it ────────────────────────────────────────────────────────────────────


def token_client(handler: Callable[[httpx.Request], Awaitable[httpx.Response]]) -> TokenClient:
    """service-a's TokenClient, its calls to the token service answered in-process by `handler`."""
    connection = Downstream(
        "service-a",
        "token-service",
        "https://token-service",
        ssl.create_default_context(),
        5,
        SpiffeId("mesh.internal", "/token-service"),
        connect=lambda *_: httpx.MockTransport(handler),
    )
    return TokenClient(connection, ISSUER, lambda: 0)


def strangers(holder: PeerIdentity, count: int) -> list[str]:
    """Tokens that each name a kid nobody publishes (each signed by a key of its own)."""
    return [forge(k, header(k), token_claims(holder, "service-b")) for k in (signing_key() for _ in range(count))]


def test_unknown_kids_fetch_the_key_set_once_whatever_their_number(key: ECKey, holder: PeerIdentity) -> None:
    """40 tokens at once naming 40 unknown kids: one fetch (the others wait for it), every token refused; then,
    for REFETCH_AFTER, no fetch at all for unknown kids; after it, a new one fetches once more (a key roll)."""
    fetches: list[str] = []
    published = [key]

    async def jwks(request: httpx.Request) -> httpx.Response:
        fetches.append(request.url.path)
        await asyncio.sleep(0.05)  # while the fetch is under way, every other request arrives
        body = json.dumps({"keys": [k.as_dict(private=False) for k in published]}).encode()
        return httpx.Response(200, stream=httpx.ByteStream(body))  # a stream, as from the network: read once

    async def scenario() -> None:
        tokens = token_client(jwks)
        results = await asyncio.gather(
            *(tokens.verify(t, "service-b") for t in strangers(holder, 40)), return_exceptions=True
        )
        assert fetches == ["/jwks"]
        assert all(isinstance(r, TokenRefused) and "does not publish" in r.reason for r in results), results
        await asyncio.gather(*(tokens.verify(t, "service-b") for t in strangers(holder, 40)), return_exceptions=True)
        assert fetches == ["/jwks"]  # the key set just fetched answers for every kid it lacks
        rolled = signing_key()
        published.append(rolled)
        tokens._attempted -= REFETCH_AFTER  # as if REFETCH_AFTER had passed
        token = await tokens.verify(forge(rolled, header(rolled), token_claims(holder, "service-b")), "service-b")
        assert token.subject == "alice" and fetches == ["/jwks", "/jwks"]

    asyncio.run(scenario())


def test_a_token_service_that_is_down_gets_one_attempt_not_one_per_request(holder: PeerIdentity) -> None:
    """40 requests while the token service does not answer: one attempt, and each request a 502 naming the hop
    (not a 401 that would blame the token)."""
    attempts: list[str] = []

    async def down(request: httpx.Request) -> httpx.Response:
        attempts.append(request.url.path)
        await asyncio.sleep(0.05)
        raise httpx.ConnectError("connection refused", request=request)

    async def scenario() -> list[BaseException]:
        tokens = token_client(down)
        return await asyncio.gather(
            *(tokens.verify(t, "service-b") for t in strangers(holder, 40)), return_exceptions=True
        )

    results = asyncio.run(scenario())
    assert attempts == ["/jwks"]
    assert all(isinstance(r, Problem) and r.status == 502 for r in results), results
    assert {r.extra["hop"] for r in results if isinstance(r, Problem)} == {"service-a → token-service"}


def test_a_verified_token_is_not_verified_again_but_still_refused_when_it_no_longer_holds(
    key: ECKey, holder: PeerIdentity, layout: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second time a token arrives it comes from the cache (no ES256 verification) — and is still refused
    on a connection with another certificate (cnf, checked on every request), once its key is no longer
    published, and after its expiry."""
    published = [key]
    verified: list[str] = []
    real_verify = client_module.verify

    def counting(raw: str, keys: KeySet, **kwargs: Any) -> UserToken:
        verified.append(raw)
        return real_verify(raw, keys, **kwargs)

    monkeypatch.setattr(client_module, "verify", counting)

    async def jwks(request: httpx.Request) -> httpx.Response:
        body = json.dumps({"keys": [k.as_dict(private=False) for k in published]}).encode()
        return httpx.Response(200, stream=httpx.ByteStream(body))

    async def scenario() -> None:
        tokens = token_client(jwks)
        raw = forge(key, header(key), token_claims(holder, "service-b"))
        first = await tokens.verify(raw, "service-b")
        assert await tokens.verify(raw, "service-b") == first and verified == [raw]  # the second: from the cache
        # cnf: the same cached token, on a connection made with service-b's certificate instead of service-a's.
        other = identity_of(Credentials(layout.cert("service-b"), layout.key("service-b")))
        with pytest.raises(TokenRefused, match="bound to another certificate"):
            check_holder(await tokens.verify(raw, "service-b"), other)
        check_holder(await tokens.verify(raw, "service-b"), holder)
        # Expiry: a token within the leeway of its exp, cached, then past it.
        ending = forge(key, header(key), token_claims(holder, "service-b", exp=int(time.time()) - LEEWAY_SECONDS + 1))
        await tokens.verify(ending, "service-b")
        await tokens.verify(ending, "service-b")
        assert verified.count(ending) == 1
        await asyncio.sleep(1.1 + time.time() % 1)  # past exp + leeway, counted in whole seconds
        with pytest.raises(TokenRefused, match="expired"):
            await tokens.verify(ending, "service-b")
        # The signing key withdrawn: the next key set (due after KEYS_MAX_AGE) lacks it, and the cache follows.
        published[:] = [signing_key()]
        tokens._fetched -= KEYS_MAX_AGE + 1
        tokens._attempted -= KEYS_MAX_AGE + 1
        with pytest.raises(TokenRefused, match="does not publish"):
            await tokens.verify(raw, "service-b")

    asyncio.run(scenario())


def test_an_exchanged_token_is_reused_for_a_while_not_until_it_expires(
    key: ECKey, holder: PeerIdentity, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by attack: a user taken out of the token policy went on through the whole chain for minutes, on the
    tokens A and B had exchanged for her before (reused until shortly before their expiry); the token service,
    which re-checks her at each exchange, never saw her again. Now a service asks again after REUSE_FOR."""
    exchanges: list[str] = []
    clock = [time.time()]
    monkeypatch.setattr(client_module, "time", types.SimpleNamespace(time=lambda: clock[0], monotonic=time.monotonic))

    async def token_service(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/jwks":
            body = {"keys": [key.as_dict(private=False)]}
        else:
            exchanges.append(request.url.path)
            body = {"access_token": f"onward-{len(exchanges)}", "expires_in": 300}
        return httpx.Response(200, stream=httpx.ByteStream(json.dumps(body).encode()))

    async def scenario() -> None:
        tokens = token_client(token_service)
        given = await tokens.verify(forge(key, header(key), token_claims(holder, "service-a")), "service-a")
        assert await tokens.exchange(given, "service-b") == "onward-1"
        clock[0] += REUSE_FOR - 1
        assert await tokens.exchange(given, "service-b") == "onward-1" and len(exchanges) == 1  # reused
        clock[0] += 2
        assert await tokens.exchange(given, "service-b") == "onward-2"  # asked again: the policy in force decides

    asyncio.run(scenario())
