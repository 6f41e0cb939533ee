"""Closing the drawback, attacked for real: the chain with MESH_REQUIRE_USER_TOKEN=true and a token service, as
real processes over real mTLS. Each refusal is shown at the service that must refuse, with its reason in the
answer and in that service's log, and with the services behind it seeing nothing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.local import ServiceProcess, chain_environments, free_ports, running, token_environment
from shared.tokens import ACCESS_TOKEN_TYPE, EXCHANGE_GRANT, LEEWAY_SECONDS, USER_GRANT
from tests.support import (
    Mesh,
    Service,
    attacker_context,
    authorize_by,
    forge,
    get_as,
    identity_of,
    leaf,
    post_token,
    signing_key,
    start_services,
    token_claims,
    write_leaf,
)

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]


def as_(mesh: Mesh, name: str) -> ssl.SSLContext:
    """A hand-built client context presenting identity `name`'s certificate (stolen, or its own)."""
    return attacker_context(mesh.layout.ca_cert, mesh.credentials(name))


def user_token(mesh: Mesh, user: str = "alice", by: str = "client", audience: str = "service-a") -> httpx.Response:
    form = {"grant_type": USER_GRANT, "user": user, "audience": audience}
    return post_token(mesh["token-service"].url, as_(mesh, by), form)


def exchange(mesh: Mesh, subject: str, by: str, audience: str, scope: str | None = None) -> httpx.Response:
    form = {
        "grant_type": EXCHANGE_GRANT,
        "subject_token": subject,
        "subject_token_type": ACCESS_TOKEN_TYPE,
        "audience": audience,
        **({"scope": scope} if scope else {}),
    }
    return post_token(mesh["token-service"].url, as_(mesh, by), form)


def chain(mesh: Mesh, service: str, context: ssl.SSLContext, token: str | None) -> httpx.Response:
    return get_as(mesh[service].url + "/chain", service, context, token)


def signed(mesh: Mesh, holder: str, audience: str, header: dict[str, Any] | None = None, **claims: Any) -> str:
    """A token signed with the token service's own (test-known) key: valid except for what `claims` change."""
    key = mesh.signing_key  # type: ignore[attr-defined]
    identity = identity_of(mesh.credentials(holder))
    return forge(
        key,
        {"alg": "ES256", "typ": "at+jwt", "kid": key.kid, **(header or {})},
        token_claims(identity, audience, **claims),
    )


def token_events(service: Service, mark: int) -> list[dict[str, Any]]:
    return service.events_since(mark, "user_token")


def test_the_chain_runs_on_behalf_of_alice_with_the_actor_chain(token_mesh: Mesh) -> None:
    token = user_token(token_mesh).json()["access_token"]
    response = chain(token_mesh, "service-a", as_(token_mesh, "client"), token)
    assert response.status_code == 200, response.text
    hops = response.json()["hops"]
    client, a, b = (f"spiffe://mesh.internal/{n}" for n in ("client", "service-a", "service-b"))
    assert [hop["on_behalf_of"]["sub"] for hop in hops] == ["alice"] * 3
    assert [hop["on_behalf_of"]["actors"] for hop in hops] == [[client], [a, client], [b, a, client]]


def test_exchanged_tokens_are_cached_until_shortly_before_they_expire(token_mesh: Mesh) -> None:
    token = user_token(token_mesh).json()["access_token"]
    tokens = token_mesh["token-service"]
    mark = tokens.mark()
    for _ in range(3):
        assert chain(token_mesh, "service-a", as_(token_mesh, "client"), token).status_code == 200
    assert len(tokens.events_since(mark, "token_granted")) == 2  # A's and B's exchange, once each


def test_a_stolen_service_key_without_a_user_token_is_refused(token_mesh: Mesh) -> None:
    """service-a's key and certificate, no user token: B refuses (401) and C sees nothing; the token service
    will not mint a user token for service-a, which is no edge."""
    marks = token_mesh.marks()
    response = chain(token_mesh, "service-b", as_(token_mesh, "service-a"), None)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    assert "service-b requires a user token" in response.json()["reason"]
    [refusal] = token_events(token_mesh["service-b"], marks["service-b"])
    assert refusal["decision"] == "deny" and "requires a user token" in refusal["reason"]
    assert token_mesh["service-c"].events_since(marks["service-c"]) == []

    minted = user_token(token_mesh, by="service-a", audience="service-b")
    assert minted.status_code == 400
    assert minted.json()["error"] == "unauthorized_client"
    assert "service-a is not an edge" in minted.json()["error_description"]
    [logged] = token_mesh["token-service"].events_since(marks["token-service"], "token_refused")
    assert logged["error"] == "unauthorized_client"


def test_a_token_for_service_b_is_refused_at_service_c(token_mesh: Mesh) -> None:
    """A holds a genuine token for aud=service-b. Sent to C directly with A's certificate, the allow-list refuses
    it; with service-b's certificate (the one C admits), the token is refused for its audience."""
    subject = user_token(token_mesh).json()["access_token"]
    for_b = exchange(token_mesh, subject, by="service-a", audience="service-b").json()["access_token"]
    c = token_mesh["service-c"]
    mark = c.mark()
    assert chain(token_mesh, "service-c", as_(token_mesh, "service-a"), for_b).status_code == 403
    response = chain(token_mesh, "service-c", as_(token_mesh, "service-b"), for_b)
    assert response.status_code == 401
    assert "the token is for 'service-b', not for service-c" in response.json()["reason"]
    assert "not for service-c" in token_events(c, mark)[-1]["reason"]


def test_a_valid_token_on_a_connection_with_another_certificate_is_refused(token_mesh: Mesh, tmp_path: Path) -> None:
    """A token bound to service-a's certificate, presented with a re-issued service-a certificate (same SPIFFE
    ID, new key). By SPIFFE ID, B admits the certificate and refuses the token (cnf); by thumbprint, the
    new certificate is not even on B's allow-list. Either way C sees nothing."""
    subject = user_token(token_mesh).json()["access_token"]
    for_b = exchange(token_mesh, subject, by="service-a", audience="service-b").json()["access_token"]
    twin = write_leaf(
        token_mesh.layout, leaf(token_mesh.layout, uris=["spiffe://mesh.internal/service-a"]), tmp_path, "twin"
    )
    marks = token_mesh.marks()
    response = chain(token_mesh, "service-b", attacker_context(token_mesh.layout.ca_cert, twin), for_b)
    if authorize_by(token_mesh.layout) == "spiffe-id":
        assert response.status_code == 401
        assert "bound to another certificate" in response.json()["reason"]
        assert "bound to another certificate" in token_events(token_mesh["service-b"], marks["service-b"])[0]["reason"]
    else:
        assert response.status_code == 403
    assert token_mesh["service-c"].events_since(marks["service-c"]) == []
    # …and with the certificate it is bound to, the same token works.
    assert chain(token_mesh, "service-b", as_(token_mesh, "service-a"), for_b).status_code == 200


@pytest.mark.parametrize(
    ("case", "error", "words"),
    [
        ("C exchanging for service-a", "invalid_target", "service-c may not call service-a"),
        ("B asking for a scope the subject token lacks", "invalid_scope", "scopes never widen"),
        ("an expired subject token", "invalid_grant", "expired"),
        ("a foreign-signed subject token", "invalid_grant", "signing key (kid) the token service does not publish"),
        ("someone else's subject token", "invalid_grant", "the token is for 'service-a', not for service-b"),
    ],
)
def test_exchanges_outside_the_policy_are_refused(token_mesh: Mesh, case: str, error: str, words: str) -> None:
    if case == "C exchanging for service-a":
        response = exchange(token_mesh, signed(token_mesh, "service-b", "service-c"), "service-c", "service-a")
    elif case == "B asking for a scope the subject token lacks":
        bob = user_token(token_mesh, user="bob").json()["access_token"]
        for_b = exchange(token_mesh, bob, by="service-a", audience="service-b").json()["access_token"]
        response = exchange(token_mesh, for_b, "service-b", "service-c", scope="service-c")
    elif case == "an expired subject token":
        old = signed(token_mesh, "client", "service-a", exp=int(time.time()) - LEEWAY_SECONDS - 1)
        response = exchange(token_mesh, old, "service-a", "service-b")
    elif case == "a foreign-signed subject token":
        stranger = signing_key()
        claims = token_claims(identity_of(token_mesh.credentials("client")), "service-a")
        foreign = forge(stranger, {"alg": "ES256", "typ": "at+jwt", "kid": stranger.kid}, claims)
        response = exchange(token_mesh, foreign, "service-a", "service-b")
    else:  # B presents the token that was given to A
        response = exchange(token_mesh, user_token(token_mesh).json()["access_token"], "service-b", "service-c")
    assert response.status_code == 400
    assert response.json()["error"] == error and words in response.json()["error_description"]


def _hmac_token(mesh: Mesh) -> str:
    key = mesh.signing_key  # type: ignore[attr-defined]
    claims = token_claims(identity_of(mesh.credentials("client")), "service-a")
    unsigned = forge(None, {"alg": "HS256", "typ": "at+jwt", "kid": key.kid}, claims, signature=b"x").rsplit(".", 1)[0]
    mac = hmac.new(key.as_pem(private=False), unsigned.encode(), hashlib.sha256).digest()
    return forge(None, {"alg": "HS256", "typ": "at+jwt", "kid": key.kid}, claims, signature=mac)


FORGERIES = {
    "tampered payload": (
        lambda m: ".".join(
            [
                *signed(m, "client", "service-a", sub="mallory").split(".")[:2],
                signed(m, "client", "service-a").split(".")[2],
            ]
        ),
        "signature does not match",
    ),
    "alg none": (
        lambda m: forge(
            None,
            {"alg": "none", "typ": "at+jwt"},
            token_claims(identity_of(m.credentials("client")), "service-a"),
            signature=b"",
        ),
        "algorithm is not ES256",
    ),
    "HMAC with the public key as secret": (_hmac_token, "algorithm is not ES256"),
    "unknown kid": (
        lambda m: signed(m, "client", "service-a", header={"kid": "nobody-published-this"}),
        "does not publish",
    ),
    "wrong typ": (lambda m: signed(m, "client", "service-a", header={"typ": "JWT"}), "typ is 'JWT'"),
    "expired": (lambda m: signed(m, "client", "service-a", exp=int(time.time()) - LEEWAY_SECONDS - 1), "expired"),
    "not yet valid": (lambda m: signed(m, "client", "service-a", nbf=int(time.time()) + 600), "not valid yet"),
    "list-valued iss": (
        lambda m: signed(m, "client", "service-a", iss=["spiffe://mesh.internal/token-service"]),
        "issuer [",
    ),
    "crit with an unknown extension": (
        lambda m: signed(m, "client", "service-a", header={"crit": ["urn:example:x"], "urn:example:x": 1}),
        "not a valid signed token",
    ),
}


@pytest.mark.parametrize("attack", list(FORGERIES))
def test_forged_tokens_are_refused_at_the_first_service(token_mesh: Mesh, attack: str) -> None:
    make, reason = FORGERIES[attack]
    marks = token_mesh.marks()
    response = chain(token_mesh, "service-a", as_(token_mesh, "client"), make(token_mesh))
    assert response.status_code == 401, response.text
    assert reason in response.json()["reason"]
    [logged] = token_events(token_mesh["service-a"], marks["service-a"])
    assert logged["decision"] == "deny" and reason in logged["reason"]
    for behind in ("service-b", "service-c"):
        assert token_mesh[behind].events_since(marks[behind]) == []
    assert token_mesh["token-service"].events_since(marks["token-service"], "token_granted") == []


def test_a_user_without_the_scope_c_requires_is_refused_at_c_after_a_and_b_accepted(token_mesh: Mesh) -> None:
    bob = user_token(token_mesh, user="bob").json()["access_token"]
    marks = token_mesh.marks()
    response = chain(token_mesh, "service-a", as_(token_mesh, "client"), bob)
    assert response.status_code == 502
    assert "service-c refused service-b: bob may not reach service-c" in response.json()["reason"]
    decisions = {name: token_events(token_mesh[name], marks[name]) for name in ("service-a", "service-b", "service-c")}
    assert [e["decision"] for e in decisions["service-a"] + decisions["service-b"]] == ["allow", "allow"]
    [refused] = decisions["service-c"]
    assert refused["decision"] == "deny" and "bob may not reach service-c" in refused["reason"]


def test_a_signing_key_roll_fails_no_request(layout, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A token service that rolls its key every 3 s; tokens keep verifying across the roll, because the next key
    was published before it signed anything."""
    a_port, token_port = free_ports(2)
    [a] = chain_environments([a_port], layout.out, names=["service-a"], token_port=token_port)
    a["MESH_REQUIRE_USER_TOKEN"] = "true"
    tokens = ServiceProcess(
        token_environment(token_port, layout.out, MESH_SIGNING_KEY_LIFETIME="3"),
        tmp_path / "token-service.log",
        module="services.token_service",
    )
    with running([*start_services([a], tmp_path), tokens]) as processes:
        mesh = Mesh([Service(p) for p in processes], layout)
        kids, failures, deadline = set(), [], time.monotonic() + 20
        while len(kids) < 2 and time.monotonic() < deadline:
            token = user_token(mesh).json()["access_token"]
            kids.add(header_of(token)["kid"])
            response = chain(mesh, "service-a", as_(mesh, "client"), token)
            if response.status_code != 200:
                failures.append(response.text)
        assert len(kids) == 2, "the key did not roll"
        assert failures == []


def header_of(token: str) -> dict[str, Any]:
    return json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))


def test_the_cli_calls_on_behalf_of_a_user(token_mesh: Mesh) -> None:
    env = {
        **os.environ,
        "MESH_PKI_DIR": str(token_mesh.layout.out),
        "MESH_TOKEN_URL": token_mesh["token-service"].url,
    }
    result = subprocess.run(
        [sys.executable, "-m", "client", token_mesh["service-a"].url + "/chain", "--user", "alice"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "on behalf of alice, held by service-b ← service-a ← client" in result.stdout
    refused = subprocess.run(
        [sys.executable, "-m", "client", token_mesh["service-a"].url + "/chain"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode == 1 and "service-a requires a user token" in refused.stdout
