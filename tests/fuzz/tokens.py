"""Forged user tokens for the fuzz tests: the keys, the strategies that change a good token's header and claims,
and the rule for what a verifier may accept — shared by the in-process properties and the one against the mesh.
"""

from __future__ import annotations

import math
from typing import Any

from hypothesis import strategies as st
from joserfc.jwk import KeySet

from shared.tokens import ALGORITHM, TYP
from tests.support import signing_key

KEY, STRANGER_KEY = signing_key(), signing_key()
KEYS = KeySet([KEY])
ISSUER, AUDIENCE, NOW = "spiffe://mesh.internal/token-service", "service-b", 1_800_000_000


def good_header() -> dict[str, Any]:
    return {"alg": ALGORITHM, "typ": TYP, "kid": KEY.kid}


def good_claims(now: float = NOW) -> dict[str, Any]:
    holder = "spiffe://mesh.internal/service-a"
    return {
        "iss": ISSUER,
        "sub": "alice",
        "aud": AUDIENCE,
        "scope": "service-a service-b",
        "client_id": holder,
        "cnf": {"x5t#S256": "x" * 43},
        "act": {"sub": holder, "act": {"sub": "spiffe://mesh.internal/client"}},
        "iat": int(now),
        "nbf": int(now),
        "exp": int(now) + 300,
        "jti": "fuzz",
    }


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=8,
)
# Values one step away from valid, which random JSON rarely hits.
near_misses = st.sampled_from(
    [KEY.kid, STRANGER_KEY.kid, TYP, "JWT", ALGORITHM, "none", "HS256", "ES384", ISSUER, AUDIENCE, [AUDIENCE], NOW,
     NOW + 10**12, -1, True, "", math.inf, math.nan, {"x5t#S256": 1}, {"sub": 1}, {"sub": "a", "act": []},
     {"sub": "a", "act": {"sub": "b"}}, ["b64"], False]
)  # fmt: skip
DELETE = object()
header_changes = st.dictionaries(
    st.sampled_from(["alg", "typ", "kid", "crit", "b64", "jku", "jwk", "x5c", "cty", "zip"]),
    st.one_of(near_misses, json_values, st.just(DELETE)),
    max_size=3,
)
# Times get values of their own: JSON numbers Python reads (NaN, Infinity, huge ones), and near the edges.
times = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, NOW - 6, NOW + 6, NOW + 0.5, 10**400, -(10**400), 1e308]),
    st.floats(),
    st.integers(),
)
claim_changes = st.one_of(
    st.dictionaries(
        st.sampled_from(["iss", "sub", "aud", "scope", "cnf", "act", "iat", "nbf", "exp"]),
        st.one_of(near_misses, json_values, st.just(DELETE)),
        max_size=3,
    ),
    st.dictionaries(st.sampled_from(["iat", "nbf", "exp"]), st.one_of(times, st.just(DELETE)), min_size=1),
)


# Mostly our key, so that the claim rules after the signature are reached; no key: an empty signature.
signers = st.sampled_from([KEY, KEY, KEY, STRANGER_KEY, None])


def changed(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in {**base, **changes}.items() if v is not DELETE}


def assert_acceptable(
    header: dict[str, Any], claims: dict[str, Any], signer: Any, now: float = NOW, audience: str = AUDIENCE
) -> None:
    """What a token that verify() accepted must have been: signed by `signer`, the token service's key (KEY, unless
    the test runs against a real one), and every rule of shared/tokens/token.py met."""
    assert signer is not None and signer is not STRANGER_KEY, "accepted a token no key of ours signed"
    assert header.get("alg") == ALGORITHM and header.get("typ") == TYP and header.get("kid") == signer.kid, header
    assert claims.get("iss") == ISSUER and claims.get("aud") == audience
    exp, nbf = claims.get("exp"), claims.get("nbf", claims.get("iat"))
    assert finite_number(exp) and exp + 5 >= now, exp
    assert nbf is None or (finite_number(nbf) and nbf - 5 <= now), nbf
    assert isinstance(claims.get("sub"), str) and claims["sub"]
    assert isinstance(claims.get("cnf"), dict) and isinstance(claims["cnf"].get("x5t#S256"), str)


def finite_number(value: Any) -> bool:
    return type(value) is int or (type(value) is float and math.isfinite(value))
