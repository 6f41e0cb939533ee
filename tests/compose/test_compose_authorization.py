"""The Docker mesh in both modes: `authorize_by` reaches the containers through the rendered allow-lists,
the X509-SVID rules hold there, and (by name) a rotation changes no allow-list."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest

from pki import Policy, rotate_begin, rotate_finish
from tests.compose.stack import Stack
from tests.support import attacker_context, authorize_by, get, leaf, wait_until, write_leaf

pytestmark = pytest.mark.compose


def by_name(stack: Stack) -> bool:
    return authorize_by(stack.layout) == "spiffe-id"


def test_the_containers_admit_callers_as_the_policy_says(stack: Stack) -> None:
    context = attacker_context(stack.layout.ca_cert, stack.credentials("client"))
    hops = get(stack.url("service-a"), "service-a", context).json()["hops"]
    assert [h["admitted_by"] for h in hops] == [authorize_by(stack.layout)] * 3


@pytest.mark.parametrize(
    ("uris", "reason"),
    [
        ([], "exactly one URI SAN"),
        (["spiffe://mesh.internal/stranger"], "thumbprint and SPIFFE ID are not on the allow-list"),
        (["spiffe://mesh.internal/../client"], "'.' or '..' segment"),
    ],
)
def test_the_containers_refuse_by_the_rules(stack: Stack, tmp_path: Path, uris: list[str], reason: str) -> None:
    creds = write_leaf(stack.layout, leaf(stack.layout, uris=uris), tmp_path, "hostile")
    response = get(stack.url("service-a"), "service-a", attacker_context(stack.layout.ca_cert, creds))
    assert response.status_code == 403
    assert (reason if by_name(stack) else "thumbprint is not on the allow-list") in response.json()["reason"]


def test_rotating_by_name_in_the_containers_changes_no_allow_list(stack: Stack) -> None:
    if not by_name(stack):
        pytest.skip("by thumbprint, a rotation lists the successor (tests/test_rotation.py)")
    layout = stack.layout
    policy = dataclasses.replace(Policy.load(), authorize_by="spiffe-id")
    allow_lists = sorted((layout.out / "allow").glob("*.txt"))
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in allow_lists}
    rotate_begin(layout, policy, "service-a")
    successor = rotate_finish(layout, policy, "service-a")
    stack.compose("run", "--rm", "--no-deps", "-T", "pki")  # what `make rotate` does when the stack is up
    context = attacker_context(layout.ca_cert, stack.credentials("client"))

    def b_sees_the_new_certificate() -> bool:
        hops = get(stack.url("service-a"), "service-a", context).json()["hops"]
        return hops[1]["caller"]["sha256"] == successor.sha256

    wait_until(b_sees_the_new_certificate, timeout=30)
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in allow_lists} == before
