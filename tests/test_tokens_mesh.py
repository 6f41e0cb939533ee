"""Closing the drawback, attacked for real: the chain with MESH_REQUIRE_USER_TOKEN=true and a token service, as
real processes over real mTLS. Each refusal is shown at the service that must refuse, with its reason in the
answer and in that service's log, and with the services behind it seeing nothing.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from joserfc import jws

from pki import Policy
from pki.allowlists import render_token_policy
from services.local import ServiceProcess, chain_environments, free_ports, running, token_environment
from shared.layout import Layout
from shared.tokens import LEEWAY_SECONDS
from tests import token_attacks as attacks
from tests.support import (
    Mesh,
    Service,
    authorize_by,
    forge,
    identity_of,
    start_services,
    token_claims,
    wait_until,
)

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]


class MeshTarget:
    """The local processes as a tests.token_attacks.Target."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh, self.layout = mesh, mesh.layout

    def base_url(self, name: str) -> str:
        return self.mesh[name].url

    def events(self, name: str) -> list[dict[str, Any]]:
        return self.mesh[name].events()


@pytest.fixture
def target(token_mesh: Mesh) -> MeshTarget:
    return MeshTarget(token_mesh)


def signed(mesh: Mesh, holder: str, audience: str, header: dict[str, Any] | None = None, **claims: Any) -> str:
    """A token signed with the token service's own (test-known) key: valid except for what `claims` change."""
    key = mesh.signing_key  # type: ignore[attr-defined]
    identity = identity_of(mesh.credentials(holder))
    return forge(
        key,
        {"alg": "ES256", "typ": "at+jwt", "kid": key.kid, **(header or {})},
        token_claims(identity, audience, **claims),
    )


def test_the_chain_runs_on_behalf_of_alice_with_the_actor_chain(target: MeshTarget) -> None:
    attacks.chain_runs_on_behalf_of_alice(target)


def test_an_exchanged_token_is_reused_not_exchanged_again_on_every_request(target: MeshTarget) -> None:
    token = attacks.user_token(target).json()["access_token"]
    mark = attacks.marks(target)
    for _ in range(3):
        assert attacks.chain(target, "service-a", attacks.as_(target, "client"), token).status_code == 200
    assert len(attacks.since(target, mark, "token-service", "token_granted")) == 2  # A's and B's, once each


def test_a_stolen_service_key_without_a_user_token_is_refused(target: MeshTarget) -> None:
    attacks.stolen_service_key_without_a_user_token(target)


def test_a_token_for_service_b_is_refused_at_service_c(target: MeshTarget) -> None:
    attacks.token_for_service_b_at_service_c(target)


def test_a_valid_token_on_a_connection_with_another_certificate_is_refused(target: MeshTarget, tmp_path: Path) -> None:
    attacks.valid_token_with_another_certificate(target, tmp_path)


@pytest.mark.parametrize("case", list(attacks.EXCHANGES_OUTSIDE_POLICY))
def test_exchanges_outside_the_policy_are_refused(target: MeshTarget, case: str) -> None:
    attacks.exchange_outside_policy(target, case)


def test_an_expired_subject_token_is_not_exchanged(token_mesh: Mesh, target: MeshTarget) -> None:
    old = signed(token_mesh, "client", "service-a", exp=int(time.time()) - LEEWAY_SECONDS - 1)
    response = attacks.exchange(target, old, "service-a", "service-b")
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant" and "expired" in response.json()["error_description"]


@pytest.mark.parametrize("attack", list(attacks.KEYLESS_FORGERIES))
def test_forged_tokens_are_refused_at_the_first_service(target: MeshTarget, attack: str) -> None:
    make, reason = attacks.KEYLESS_FORGERIES[attack]
    attacks.forged_token_at_the_first_service(target, make(target), reason)


# Tokens that only the token service's key could sign, each breaking one rule: refused for that rule. A time is
# a function of the moment the test runs (not of import time: a long suite would turn +600 s into the past).
SIGNED_FORGERIES: dict[str, tuple[dict[str, Any], str]] = {
    "wrong typ": ({"header": {"typ": "JWT"}}, "typ is 'JWT'"),
    "expired": ({"exp": lambda now: now - LEEWAY_SECONDS - 1}, "expired"),
    "not yet valid": ({"nbf": lambda now: now + 600}, "not valid yet"),
    "list-valued iss": ({"iss": ["spiffe://mesh.internal/token-service"]}, "issuer ["),
    "crit with an unknown extension": (
        {"header": {"crit": ["urn:example:x"], "urn:example:x": 1}},
        "not a valid signed token",
    ),
    # Python's json reads Infinity and NaN: a number, but no time.
    "exp Infinity": ({"exp": float("inf")}, "no valid expiry"),
    "exp NaN": ({"exp": float("nan")}, "no valid expiry"),
    "nbf NaN": ({"nbf": float("nan")}, "not valid yet"),
}


@pytest.mark.parametrize("attack", list(SIGNED_FORGERIES))
def test_tokens_signed_with_the_real_key_but_breaking_a_rule_are_refused(
    token_mesh: Mesh, target: MeshTarget, attack: str
) -> None:
    changes, reason = SIGNED_FORGERIES[attack]
    now = int(time.time())
    changes = {claim: value(now) if callable(value) else value for claim, value in changes.items()}
    attacks.forged_token_at_the_first_service(target, signed(token_mesh, "client", "service-a", **changes), reason)


# Payloads only the key could sign that are no claims at all: refused after the signature, still a 401.
SIGNED_GARBAGE = {
    "a JSON list": b"[1, 2]",
    "a JSON string": b'"alice"',
    "not JSON": b"\xff\x00alice",
    "nested too deep": b"[" * 5_000 + b"]" * 5_000,
}


@pytest.mark.parametrize("payload", list(SIGNED_GARBAGE))
def test_signed_payloads_that_are_no_claims_are_refused(token_mesh: Mesh, target: MeshTarget, payload: str) -> None:
    key = token_mesh.signing_key  # type: ignore[attr-defined]
    token = jws.serialize_compact({"alg": "ES256", "typ": "at+jwt", "kid": key.kid}, SIGNED_GARBAGE[payload], key)
    attacks.forged_token_at_the_first_service(target, token, "not a valid signed token")


@pytest.mark.parametrize("case", ["list kid", "object kid", "nested JSON garbage", "signed, nested too deep"])
def test_malformed_subject_tokens_are_refused_at_exchange(token_mesh: Mesh, target: MeshTarget, case: str) -> None:
    """The token service reads subject tokens with the same rules: a 400 invalid_grant, never a 500."""
    if case == "signed, nested too deep":
        key = token_mesh.signing_key  # type: ignore[attr-defined]
        header = {"alg": "ES256", "typ": "at+jwt", "kid": key.kid}
        subject = jws.serialize_compact(header, SIGNED_GARBAGE["nested too deep"], key)
    else:
        subject = attacks.KEYLESS_FORGERIES[case][0](target)
    mark = attacks.marks(target)
    response = attacks.exchange(target, subject, "service-a", "service-b")
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_grant"
    assert "not a valid signed token" in response.json()["error_description"]
    assert attacks.since(target, mark, "token-service", "token_granted") == []
    assert [e["error"] for e in attacks.since(target, mark, "token-service", "token_refused")] == ["invalid_grant"]


def test_a_user_without_the_scope_c_requires_is_refused_at_c_after_a_and_b_accepted(target: MeshTarget) -> None:
    attacks.user_without_the_scope_of_c(target)


def test_a_signing_key_roll_fails_no_request(layout: Layout, tmp_path: Path) -> None:
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
            target = MeshTarget(mesh)
            token = attacks.user_token(target).json()["access_token"]
            kids.add(header_of(token)["kid"])
            response = attacks.chain(target, "service-a", attacks.as_(target, "client"), token)
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


def test_a_service_checks_that_the_token_service_proves_its_name(token_mesh: Mesh, tmp_path: Path) -> None:
    """service-a pointed at service-c as if it were the token service: service-c's certificate is genuine but
    not token-service's, so A fetches no keys from it and accepts no token (502 naming the hop), and C is
    sent nothing."""
    [a_port] = free_ports(1)
    [a] = chain_environments([a_port], token_mesh.layout.out, names=["service-a"], MESH_REQUIRE_USER_TOKEN="true")
    a["MESH_TOKEN_SERVICE_URL"] = token_mesh["service-c"].url
    with running(start_services([a], tmp_path)) as processes:
        target = MeshTarget(Mesh([Service(p) for p in processes], token_mesh.layout))
        token = attacks.user_token(MeshTarget(token_mesh)).json()["access_token"]
        c_before = token_mesh["service-c"].mark()
        response = attacks.chain(target, "service-a", attacks.as_(target, "client"), token)
    assert response.status_code == 502
    assert response.json()["hop"] == "service-a → token-service"
    assert "failed our check that it is token-service" in response.json()["reason"]
    assert token_mesh["service-c"].events_since(c_before, "authz") == []


def test_the_token_service_takes_a_changed_policy_live_and_refuses_a_broken_one(layout: Layout, tmp_path: Path) -> None:
    """`make pki` after editing [tokens]: the running token service follows — for new tokens and at every exchange,
    whatever tokens were given out before — and a broken tokens.json changes nothing."""
    pki = Layout(tmp_path / "pki")
    shutil.copytree(layout.out, pki.out)
    [port] = free_ports(1)
    environment = token_environment(port, pki.out, MESH_RELOAD_INTERVAL="0.2")
    tokens = ServiceProcess(environment, tmp_path / "token-service.log", module="services.token_service")
    with running([tokens]):
        target = MeshTarget(Mesh([Service(tokens)], pki))
        assert attacks.user_token(target, user="bob").status_code == 200
        pki.tokens_policy.write_text("{ not json")
        wait_until(lambda: any(e.get("event") == "reload_refused" for e in target.events("token-service")))
        assert attacks.user_token(target, user="bob").status_code == 200  # the old policy stays
        # Tokens given out under the old policy, valid for minutes yet: bob's for A, alice's (every scope) for B.
        bobs, alices = (
            attacks.user_token(target, user="bob").json()["access_token"],
            attacks.token_for(target, "service-b"),
        )
        narrower = dataclasses.replace(Policy.load(), users={"alice": ("service-a", "service-b")})
        render_token_policy(pki, narrower)
        wait_until(lambda: attacks.user_token(target, user="bob").status_code == 400)
        assert attacks.user_token(target, user="bob").json()["error_description"] == "no user 'bob' in the policy"
        mark = {"token-service": len(target.events("token-service"))}
        removed = attacks.exchange(target, bobs, "service-a", "service-b")
        assert removed.status_code == 400, removed.text
        assert removed.json() == {"error": "invalid_grant", "error_description": "no user 'bob' in the policy"}
        widened = attacks.exchange(target, alices, "service-b", "service-c", scope="service-c")
        assert widened.status_code == 400, widened.text
        assert widened.json()["error"] == "invalid_scope"
        assert "service-c is not in alice's scopes" in widened.json()["error_description"]
        assert attacks.since(target, mark, "token-service", "token_granted") == []
        assert len(attacks.since(target, mark, "token-service", "token_refused")) == 2
        # Unasked, an exchange carries what the user may reach now, not what the old token said.
        narrowed = attacks.exchange(target, alices, "service-b", "service-c")
        assert narrowed.status_code == 200 and narrowed.json()["scope"] == "service-a service-b"


def test_unknown_kids_fetch_the_key_set_once_not_once_per_request(token_mesh: Mesh, tmp_path: Path) -> None:
    """40 requests at once, each with a token naming a key nobody publishes, at a service-a that holds no keys
    yet: one GET /jwks reaches the token service (one fetch at a time, the others wait for it), and no more (the
    key set just fetched is the answer for every kid it lacks, for a few seconds). Every request gets its 401."""
    if authorize_by(token_mesh.layout) != "thumbprint":
        pytest.skip("fetching keys does not depend on the allow-list mode: once is enough")
    [port] = free_ports(1)
    [env] = chain_environments(
        [port], token_mesh.layout.out, names=["service-a"], token_port=token_mesh["token-service"].port
    )
    env["MESH_REQUIRE_USER_TOKEN"] = "true"
    target = MeshTarget(token_mesh)
    forged = [attacks.KEYLESS_FORGERIES["unknown kid"][0](target) for _ in range(40)]
    tokens = token_mesh["token-service"]
    with running(start_services([env], tmp_path)) as processes:
        service_a = Service(processes[0])
        mark = tokens.mark()
        responses = asyncio.run(burst(f"{service_a.url}/chain", attacks.as_(target, "client"), forged))
        refusals = service_a.events_since(0, "user_token")
    assert [r.status_code for r in responses] == [401] * len(forged)
    assert all("does not publish" in r.json()["reason"] for r in responses)
    assert len([e for e in refusals if "does not publish" in e["reason"]]) == len(forged)
    fetches = tokens.events_since(mark, "authz")  # nothing else calls the token service meanwhile
    assert 1 <= len(fetches) <= 2, f"{len(fetches)} key set fetches for {len(forged)} requests"
    assert tokens.events_since(mark, "token_granted") == tokens.events_since(mark, "token_refused") == []


async def burst(url: str, context: ssl.SSLContext, tokens: list[str]) -> list[httpx.Response]:
    """One connection per token, opened first (a request without a token: 401 before any key is needed); then
    every token sent at once, so that they reach the service together."""
    limits = httpx.Limits(max_connections=len(tokens), max_keepalive_connections=len(tokens))
    async with httpx.AsyncClient(verify=context, limits=limits, timeout=30) as client:

        async def get(token: str | None) -> httpx.Response:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            return await client.get(url, headers=headers, extensions={"sni_hostname": "service-a"})

        opened = await asyncio.gather(*(get(None) for _ in tokens))
        assert {r.status_code for r in opened} == {401}
        return await asyncio.gather(*(get(token) for token in tokens))
