"""The Docker mesh authorizing by SPIFFE ID: `authorize_by` reaches the containers through the rendered
allow-lists, and a rotation there changes no allow-list."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from pki import Policy, rotate_begin, rotate_finish
from tests.compose.stack import ROOT, Stack, running_stack
from tests.support import attacker_context, get, leaf, wait_until, write_leaf

pytestmark = pytest.mark.compose


@pytest.fixture(scope="module")
def spiffe_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("compose-spiffe")
    policy = tmp / "policy.toml"
    text = (ROOT / "pki" / "policy.toml").read_text()
    policy.write_text(text.replace('authorize_by = "thumbprint"', 'authorize_by = "spiffe-id"'))
    with running_stack(tmp, policy) as stack:
        stack.policy = Policy.load(policy)  # type: ignore[attr-defined]
        yield stack


def test_the_containers_admit_callers_by_name(spiffe_stack: Stack) -> None:
    assert (spiffe_stack.layout.allow_list("service-b").read_text()).count("spiffe://mesh.internal/service-a") == 1
    context = attacker_context(spiffe_stack.layout.ca_cert, spiffe_stack.credentials("client"))
    hops = get(spiffe_stack.url("service-a"), "service-a", context).json()["hops"]
    assert [h["admitted_by"] for h in hops] == ["spiffe-id"] * 3


@pytest.mark.parametrize(
    ("uris", "reason"),
    [
        ([], "exactly one URI SAN"),
        (["spiffe://mesh.internal/stranger"], "neither thumbprint nor SPIFFE ID is on the allow-list"),
        (["spiffe://mesh.internal/../client"], "'.' or '..' segment"),
    ],
)
def test_the_containers_refuse_by_the_rules(spiffe_stack: Stack, tmp_path: Path, uris: list[str], reason: str) -> None:
    creds = write_leaf(spiffe_stack.layout, leaf(spiffe_stack.layout, uris=uris), tmp_path, "hostile")
    response = get(spiffe_stack.url("service-a"), "service-a", attacker_context(spiffe_stack.layout.ca_cert, creds))
    assert response.status_code == 403
    assert reason in response.json()["reason"]


def test_rotating_in_the_containers_changes_no_allow_list(spiffe_stack: Stack) -> None:
    layout, policy = spiffe_stack.layout, spiffe_stack.policy  # type: ignore[attr-defined]
    allow_lists = sorted((layout.out / "allow").glob("*.txt"))
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in allow_lists}
    rotate_begin(layout, policy, "service-a")
    successor = rotate_finish(layout, policy, "service-a")
    spiffe_stack.compose("run", "--rm", "--no-deps", "-T", "pki")  # what `make rotate` does when the stack is up
    context = attacker_context(layout.ca_cert, spiffe_stack.credentials("client"))

    def b_sees_the_new_certificate() -> bool:
        hops = get(spiffe_stack.url("service-a"), "service-a", context).json()["hops"]
        return hops[1]["caller"]["sha256"] == successor.sha256

    wait_until(b_sees_the_new_certificate, timeout=30)
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in allow_lists} == before
