"""`python -m cockpit status` against a real mesh (A, B, C, the token service) of its own: all well, then each
fault planted for real on its PKI — an allow-list the policy does not give, a service on an older trust
anchor, an expired CRL, a service down — each with its ✖ line and a non-zero exit.

service-c reads its trust anchors from a copy of ca.crt (MESH_CA): when pki/out publishes a new anchor, the
others take it and service-c stays on the older set, as a service that missed a deploy would.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from cockpit.__main__ import main
from pki import CertificateAuthority, Policy, init, render_allow_lists, write_crl
from pki.output import write_file
from services.local import ServiceProcess, chain_environments, free_ports, running, token_environment
from shared.layout import Layout
from tests.support import start_services, wait_until

pytestmark = pytest.mark.e2e
POLICY = Policy.load()
FAST = {"MESH_RELOAD_INTERVAL": "0.2"}


@dataclass
class Mesh:
    layout: Layout
    ports: list[int]
    processes: list[ServiceProcess]

    def status(self, *extra: str) -> tuple[int, str]:
        """`python -m cockpit status` for this mesh: its exit status and what it printed."""
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            ports = ",".join(map(str, self.ports))
            code = main(["status", "--ports", ports, "--pki-dir", str(self.layout.out), *extra])
        return code, out.getvalue()

    def until(self, *lines: str, timeout: float = 15.0) -> tuple[int, str]:
        """Status, once it prints every one of `lines` (a service takes a reload interval to take a changed file)."""
        said: list[tuple[int, str]] = []

        def printed() -> bool:
            said.append(self.status())
            return all(line in said[-1][1] for line in lines)

        wait_until(printed, timeout, lambda: said[-1][1])
        return said[-1]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("cockpit")
    layout = Layout(root / "pki")
    init(layout, POLICY)
    own_anchors = root / "service-c" / "ca.crt"
    write_file(own_anchors, layout.ca_cert.read_bytes())
    *ports, token_port = free_ports(4)
    envs = chain_environments(ports, layout.out, token_port=token_port, **FAST)
    envs[2]["MESH_CA"] = str(own_anchors)
    tokens = token_environment(token_port, layout.out, **FAST)
    processes = [
        *start_services(envs, root),
        ServiceProcess(tokens, root / "token-service.log", module="services.token_service"),
    ]
    with running(processes):
        yield Mesh(layout, [*ports, token_port], processes)


def test_a_healthy_mesh_is_all_well_with_exit_0(mesh: Mesh) -> None:
    code, text = mesh.status()
    assert code == 0, text
    assert "✖" not in text and text.rstrip().endswith("all is well")
    for name in ("service-a", "service-b", "service-c", "token-service"):
        assert f"✔ {name} reachable over mTLS as the operator" in text
        assert f"✔ {name}'s allow-list {name}.txt equals the policy's" in text
        assert f"✔ {name} trusts the anchors of {mesh.layout.out}/ca.crt" in text
    assert "✔ token-service signs with key" in text
    code, text = mesh.status("--json")
    report = json.loads(text)
    assert code == 0 and report["ok"] is True
    assert {s["target"]["name"] for s in report["mesh"]["services"]} == {
        "service-a",
        "service-b",
        "service-c",
        "token-service",
    }


def test_an_allow_list_in_force_that_differs_from_the_policy(mesh: Mesh) -> None:
    listed = mesh.layout.allow_list("service-b")
    intruder = CertificateAuthority.root("Intruder CA").issue("intruder", usages=["client"])
    write_file(listed, listed.read_bytes() + f"{intruder.sha256}  # slipped in by hand\n".encode())
    try:
        code, text = mesh.until("✖ service-b's allow-list service-b.txt in force differs from the policy")
        assert code == 1
        assert "1 entry the policy does not give" in text and "fix: `make pki` renders the policy" in text
        assert "✔ service-a's allow-list service-a.txt equals the policy's" in text
    finally:
        render_allow_lists(mesh.layout, POLICY)
    mesh.until("all is well")


def test_a_service_on_an_older_trust_anchor(mesh: Mesh) -> None:
    original = mesh.layout.ca_cert.read_bytes()
    newer = CertificateAuthority.root("Next Root CA")
    write_file(mesh.layout.ca_cert, original + newer.cert_pem())
    try:
        others = [f"✔ {name} trusts the anchors of" for name in ("service-a", "service-b", "token-service")]
        code, text = mesh.until(*others)
        assert code == 1
        assert f"✖ service-c trusts other anchors than {mesh.layout.out}/ca.crt: not " in text
    finally:
        write_file(mesh.layout.ca_cert, original)
    mesh.until("all is well")


def test_an_expired_crl(mesh: Mesh) -> None:
    write_crl(mesh.layout, dt.timedelta(seconds=3))
    try:
        # pki check says so of crl.pem the moment it expires; the line of the CRL itself, a moment later.
        code, text = mesh.until("✖ CRL #2 of CN=mtls-mesh Intermediate CA,O=mtls-mesh expired", timeout=20)
        assert code == 1
        assert "fix: the renewer" in text
        assert "✖ pki check: " in text and "crl.pem: the CRL of CN=mtls-mesh Intermediate CA" in text
    finally:
        write_crl(mesh.layout)
    mesh.until("all is well", timeout=20)


def test_a_service_down(mesh: Mesh) -> None:
    """Last: the mesh is not restarted."""
    mesh.processes[1].stop()
    code, text = mesh.status()
    assert code == 1
    assert f"✖ service-b at https://127.0.0.1:{mesh.ports[1]}: nothing accepts connections" in text
    assert "fix: start it" in text
    assert "✔ service-a reachable over mTLS as the operator" in text
