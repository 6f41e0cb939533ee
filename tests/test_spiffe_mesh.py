"""The mesh authorizing by SPIFFE ID (`authorize_by = "spiffe-id"`), attacked at each of the three services;
and the callee checked by its SPIFFE ID, in both modes.

Every hostile certificate here is issued by our own intermediate, so TLS accepts it (but for a leaf marked
CA): what refuses it is the X509-SVID rules and the allow-list, with a reason naming the rule.
"""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pki import Policy, init
from services.local import CHAIN, chain_environments, running
from shared.layout import Layout
from tests.support import (
    Credentials,
    Mesh,
    Service,
    attacker_context,
    authorize_by,
    free_ports,
    get,
    leaf,
    start_services,
    write_leaf,
)

pytestmark = pytest.mark.e2e

SPIFFE_POLICY = dataclasses.replace(Policy.load(), authorize_by="spiffe-id")
# Who may call each service, by the policy: the identity a hostile certificate pretends to be there.
CALLER = {"service-a": "client", "service-b": "service-a", "service-c": "service-b"}


@pytest.fixture(scope="module")
def spiffe_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    layout = Layout(tmp_path_factory.mktemp("pki"))
    init(layout, SPIFFE_POLICY)
    logs = tmp_path_factory.mktemp("logs")
    processes = start_services(chain_environments(free_ports(3), layout.out), logs)
    with running(processes):
        yield Mesh([Service(p) for p in processes], layout)


def hostile(name: str) -> dict[str, dict]:
    """Certificates for `name`'s place, each breaking one rule (from our own intermediate, with clientAuth)."""
    td = "mesh.internal"
    return {
        "no URI SAN": {"uris": []},
        "two URI SANs": {"uris": [f"spiffe://{td}/{name}", f"spiffe://{td}/{name}-2"]},
        "not spiffe": {"uris": [f"https://{td}/{name}"]},
        "another trust domain": {"uris": [f"spiffe://other.internal/{name}"]},
        "upper-case trust domain": {"uris": [f"spiffe://MESH.internal/{name}"]},
        "dot-dot segment": {"uris": [f"spiffe://{td}/../{name}"]},
        "empty segment": {"uris": [f"spiffe://{td}//{name}"]},
        "query": {"uris": [f"spiffe://{td}/{name}?admin=1"]},
        "fragment": {"uris": [f"spiffe://{td}/{name}#admin"]},
        "keyCertSign": {"uris": [f"spiffe://{td}/{name}"], "key_cert_sign": True},
        "valid but not listed": {"uris": [f"spiffe://{td}/stranger"]},
    }


REASONS = {
    "no URI SAN": "exactly one URI SAN; this certificate has 0",
    "two URI SANs": "exactly one URI SAN; this certificate has 2",
    "not spiffe": "the scheme must be spiffe://",
    "another trust domain": "thumbprint and SPIFFE ID are not on the allow-list",
    "upper-case trust domain": "may hold only a-z",
    "dot-dot segment": "'.' or '..' segment",
    "empty segment": "empty segment",
    "query": "no query or fragment",
    "fragment": "no query or fragment",
    "keyCertSign": "keyCertSign or cRLSign",
    "valid but not listed": "thumbprint and SPIFFE ID are not on the allow-list",
}


@pytest.mark.parametrize("service", CHAIN)
@pytest.mark.parametrize("case", list(REASONS))
def test_certificates_that_break_a_rule_are_refused_with_the_rule(
    spiffe_mesh: Mesh, tmp_path: Path, service: str, case: str
) -> None:
    mesh = spiffe_mesh
    cert = leaf(mesh.layout, **hostile(CALLER[service])[case])
    creds = write_leaf(mesh.layout, cert, tmp_path, "hostile")
    marks = mesh.marks()
    response = get(f"{mesh[service].url}/chain", service, attacker_context(mesh.layout.ca_cert, creds))
    assert response.status_code == 403, response.text
    assert REASONS[case] in response.json()["reason"]
    seen = mesh.events_since(marks)
    assert [e["decision"] for e in seen[service]] == ["deny"]
    assert all(not events for name, events in seen.items() if name != service), "the request went further"


@pytest.mark.parametrize("service", CHAIN)
def test_a_leaf_marked_ca_is_refused(spiffe_mesh: Mesh, tmp_path: Path, service: str) -> None:
    """TLS lets it through (a path length of 0 does not count the end certificate); the first rule of the
    policy, a CA is no caller, refuses it — and the X509-SVID rule would too."""
    mesh = spiffe_mesh
    cert = leaf(mesh.layout, uris=[f"spiffe://mesh.internal/{CALLER[service]}"], ca=True)
    creds = write_leaf(mesh.layout, cert, tmp_path, "ca-leaf")
    marks = mesh.marks()
    response = get(f"{mesh[service].url}/chain", service, attacker_context(mesh.layout.ca_cert, creds))
    assert response.status_code == 403
    assert "a CA cannot be a caller" in response.json()["reason"]
    seen = mesh.events_since(marks)
    assert all(not events for name, events in seen.items() if name != service), "the request went further"


@pytest.mark.parametrize("service", CHAIN)
def test_a_new_certificate_for_the_same_name_is_admitted_by_name_and_refused_by_pin(
    mesh: Mesh, tmp_path: Path, service: str
) -> None:
    """A fresh key and certificate for the caller's SPIFFE ID: a name survives it, a pin does not."""
    by_name = authorize_by(mesh.layout) == "spiffe-id"
    cert = leaf(mesh.layout, uris=[f"spiffe://mesh.internal/{CALLER[service]}"])
    creds = write_leaf(mesh.layout, cert, tmp_path, "renewed")
    response = get(f"{mesh[service].url}/chain", service, attacker_context(mesh.layout.ca_cert, creds))
    assert response.status_code == (200 if by_name else 403), response.text
    if by_name:
        assert response.json()["hops"][0]["admitted_by"] == "spiffe-id"
    else:
        assert "not on the allow-list" in response.json()["reason"]


def test_the_hop_table_says_which_rule_admitted_each_caller(mesh: Mesh) -> None:
    context = attacker_context(mesh.layout.ca_cert, mesh.credentials("client"))
    hops = get(f"{mesh['service-a'].url}/chain", "service-a", context).json()["hops"]
    assert [h["admitted_by"] for h in hops] == [authorize_by(mesh.layout)] * 3


@pytest.mark.parametrize("mode", ["thumbprint", "spiffe-id"])
def test_an_impostor_callee_with_the_right_dns_name_is_refused(tmp_path: Path, mode: str) -> None:
    """From our own CA: DNS:service-b, but the SPIFFE ID of service-c. A refuses it as service-b (502, the reason),
    and the impostor receives no HTTP request."""
    layout = Layout(tmp_path / "pki")
    init(layout, dataclasses.replace(Policy.load(), authorize_by=mode))
    cert = leaf(layout, uris=["spiffe://mesh.internal/service-c"], dns=["service-b", "localhost"])
    creds = write_leaf(layout, cert, tmp_path, "impostor")
    a_port, b_port = free_ports(2)
    impostor = {
        **chain_environments([b_port], layout.out, names=["service-c"])[0],
        "MESH_CERT": str(creds.cert),
        "MESH_KEY": str(creds.key),
    }
    a = {
        **chain_environments([a_port], layout.out, names=["service-a"])[0],
        "MESH_DOWNSTREAM_URL": f"https://127.0.0.1:{b_port}",
        "MESH_DOWNSTREAM_NAME": "service-b",
    }
    processes = start_services([a, impostor], tmp_path)
    with running(processes):
        client = attacker_context(layout.ca_cert, Credentials(layout.cert("client"), layout.key("client")))
        response = get(f"https://127.0.0.1:{a_port}/chain", "service-a", client)
        assert response.status_code == 502, response.text
        problem = response.json()
        assert problem["hop"] == "service-a → service-b"
        assert "failed our check that it is service-b" in problem["reason"]
        assert "spiffe://mesh.internal/service-c is not spiffe://mesh.internal/service-b" in problem["reason"]
        assert Service(processes[1]).events_since(0, "authz") == []


def test_the_cli_checks_the_callees_spiffe_id(spiffe_mesh: Mesh) -> None:
    mesh = spiffe_mesh
    command = [sys.executable, "-m", "client", f"{mesh['service-a'].url}/chain", "--pki-dir", str(mesh.layout.out)]
    ok = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "(admitted by its SPIFFE ID)" in ok.stdout
    wrong = subprocess.run(
        [*command, "--server-id", "spiffe://mesh.internal/service-b"], capture_output=True, text=True
    )
    assert wrong.returncode == 1
    assert "SPIFFE ID spiffe://mesh.internal/service-a is not spiffe://mesh.internal/service-b" in wrong.stdout


def test_rotation_by_name_fails_no_request_and_changes_no_allow_list(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "pki")
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(
        Path("pki/policy.toml").read_text().replace('authorize_by = "thumbprint"', 'authorize_by = "spiffe-id"')
    )
    init(layout, Policy.load(policy_file))
    envs = chain_environments(free_ports(3), layout.out, MESH_RELOAD_INTERVAL="0.5")
    allow_lists = sorted((layout.out / "allow").glob("*.txt"))
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in allow_lists}
    serial_before = layout.cert("service-b").read_bytes()
    processes = start_services(envs, tmp_path)
    with running(processes):
        rotate = f"{sys.executable} -m pki --out {layout.out} --policy {policy_file} rotate service-b"
        load = subprocess.run(
            [sys.executable, "-m", "client", f"https://127.0.0.1:{envs[0]['MESH_PORT']}/chain",
             "--pki-dir", str(layout.out), "--load", "300", "--concurrency", "4", "--during", rotate],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    assert load.returncode == 0, load.stdout + load.stderr
    assert ": 0 failed" in load.stdout
    assert layout.cert("service-b").read_bytes() != serial_before, "service-b was not rotated"
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in allow_lists} == before
