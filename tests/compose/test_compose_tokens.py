"""Closing the drawback in the Docker mesh: MESH_REQUIRE_USER_TOKEN=true reaches every container, the token
service runs as a container of its own, and every attack that needs no secret of the token service is refused
there as it is locally (tests/token_attacks.py). SPIFFE-ID mode, where a re-issued certificate passes the
allow-list and only the token's binding (cnf) stops it; the local tests run both modes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import token_attacks as attacks
from tests.compose.stack import ROOT, Stack, running_stack

pytestmark = pytest.mark.compose


@pytest.fixture(scope="module")
def token_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("compose-tokens")
    policy = tmp / "policy.toml"
    policy.write_text((ROOT / "pki" / "policy.toml").read_text().replace('"thumbprint"', '"spiffe-id"', 1))
    with running_stack(tmp, policy, MESH_REQUIRE_USER_TOKEN="true") as stack:
        yield stack


def test_the_containers_run_the_chain_on_behalf_of_alice(token_stack: Stack) -> None:
    attacks.chain_runs_on_behalf_of_alice(token_stack)


def test_the_client_container_calls_as_alice_when_tokens_are_required(token_stack: Stack) -> None:
    """What `MESH_REQUIRE_USER_TOKEN=true make up` runs: the edge client, on behalf of alice."""
    result = token_stack.compose("run", "--rm", "-e", "MESH_CLIENT_USER=alice", "client")
    assert "on behalf of alice, held by service-b ← service-a ← client" in result.stdout
    refused = token_stack.compose("run", "--rm", "client", check=False)
    assert refused.returncode == 1 and "service-a requires a user token" in refused.stdout


def test_a_stolen_service_key_without_a_user_token_is_refused(token_stack: Stack) -> None:
    attacks.stolen_service_key_without_a_user_token(token_stack)


def test_a_token_for_service_b_is_refused_at_service_c(token_stack: Stack) -> None:
    attacks.token_for_service_b_at_service_c(token_stack)


def test_a_valid_token_with_a_reissued_certificate_is_refused(token_stack: Stack, tmp_path: Path) -> None:
    attacks.valid_token_with_another_certificate(token_stack, tmp_path)


@pytest.mark.parametrize("case", list(attacks.EXCHANGES_OUTSIDE_POLICY))
def test_exchanges_outside_the_policy_are_refused(token_stack: Stack, case: str) -> None:
    attacks.exchange_outside_policy(token_stack, case)


@pytest.mark.parametrize("attack", list(attacks.KEYLESS_FORGERIES))
def test_forged_tokens_are_refused_at_the_first_service(token_stack: Stack, attack: str) -> None:
    make, reason = attacks.KEYLESS_FORGERIES[attack]
    attacks.forged_token_at_the_first_service(token_stack, make(token_stack), reason)


def test_a_user_without_the_scope_c_requires_is_refused_at_c(token_stack: Stack) -> None:
    attacks.user_without_the_scope_of_c(token_stack)
