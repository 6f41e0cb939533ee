"""What RFC 5280 lints (pkilint, zlint) ask of our certificates and CRLs, and SANs only where a deployment needs them.

- a CRL entry revoked for no particular reason carries no reason code, rather than `unspecified` (§5.3.1);
- every leaf, ECDSA or RSA, is for signatures only: no keyEncipherment (every suite we allow is (EC)DHE);
- `DNS:localhost` and `IP:127.0.0.1` only where the policy's loopback_sans (or MESH_LOOPBACK_SANS) says so:
  `make run` and the tests, not Docker or Kubernetes — and nothing in the mesh needs them.
"""

from __future__ import annotations

import dataclasses
import ssl
import subprocess
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from pki import Policy, init, load_issuer, revoke, rotate_begin
from pki.__main__ import main
from services.local import chain_environments, running
from shared.layout import Layout
from shared.x509 import load_certificates, load_crl, subject_alt_names
from tests.compose.stack import ROOT
from tests.support import Credentials, attacker_context, free_ports, get, start_services

POLICY = Policy.load()
LOOPBACK = {("DNS", "localhost"), ("IP", "127.0.0.1")}
OTHER_USAGES = ("content_commitment", "key_encipherment", "data_encipherment", "key_agreement", "key_cert_sign")


def reason_of(entry: x509.RevokedCertificate) -> x509.ReasonFlags | None:
    try:
        return entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except x509.ExtensionNotFound:
        return None


def test_a_revocation_without_a_reason_carries_no_reason_code(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    layout = Layout(tmp_path)
    init(layout, POLICY)
    names = {f"{load_certificates(layout.cert(n))[0].serial_number:x}": n for n in ("client", "operator", "service-c")}
    assert main(["--out", str(tmp_path), "revoke", "client"]) == 0  # the CLI's default
    assert "no reason given" in capsys.readouterr().out
    revoke(layout, "operator", "key-compromise")
    revoke(layout, "service-c", "unspecified")  # said explicitly: still no reason code (RFC 5280 §5.3.1)
    reasons = {names[f"{entry.serial_number:x}"]: reason_of(entry) for entry in load_crl(layout.crl)}
    assert reasons == {"client": None, "operator": x509.ReasonFlags.key_compromise, "service-c": None}
    # The record still reads back the same, and `make pki` renders the CRL from it unchanged in that respect.
    layout.crl.unlink()
    init(layout, POLICY)
    assert {names[f"{e.serial_number:x}"]: reason_of(e) for e in load_crl(layout.crl)} == reasons


def test_make_revoke_gives_no_reason_unless_asked() -> None:
    dry = ["make", "-n", "-s", "-C", str(ROOT), "revoke", "NAME=service-b"]
    assert "--reason" not in subprocess.run(dry, capture_output=True, text=True, check=True).stdout
    asked = subprocess.run([*dry, "REASON=key-compromise"], capture_output=True, text=True, check=True).stdout
    assert "--reason key-compromise" in asked


@pytest.mark.parametrize("key_type", ["ecdsa", "rsa"])
def test_every_leaf_is_for_signatures_only(tmp_path: Path, key_type: str) -> None:
    layout = Layout(tmp_path)
    init(layout, POLICY, key_type=key_type)  # type: ignore[arg-type]
    for name in [*POLICY.services, *POLICY.clients]:
        leaf = load_certificates(layout.cert(name))[0]
        usage = leaf.extensions.get_extension_for_class(x509.KeyUsage)
        assert usage.critical
        assert usage.value.digital_signature
        assert not any(getattr(usage.value, flag) for flag in OTHER_USAGES), f"{name} ({key_type}): {usage.value}"


def test_loopback_sans_are_a_policy_setting_the_deployment_can_override(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = (ROOT / "pki" / "policy.toml").read_text()
    assert "loopback_sans = true" in text and POLICY.loopback_sans  # `make run` and the tests
    path = tmp_path / "policy.toml"
    path.write_text(text.replace("loopback_sans = true", "loopback_sans = false"))
    assert not Policy.load(path).loopback_sans
    monkeypatch.setenv("MESH_LOOPBACK_SANS", "false")  # the Docker pki job and renewer, `make k8s-secrets`
    assert not Policy.load().loopback_sans
    monkeypatch.setenv("MESH_LOOPBACK_SANS", "no")
    with pytest.raises(Exception, match=r"loopback_sans = 'no'.*write true or false"):
        Policy.load()


def test_docker_and_kubernetes_issue_without_loopback_sans() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for job in ("pki", "renewer"):  # every container that issues certificates
        assert compose[job]["environment"]["MESH_LOOPBACK_SANS"] == "false", job
    issuing = [name for name, s in compose.items() if "-m pki" in " ".join(map(str, s.get("command") or []))]
    assert sorted(issuing) == ["pki", "renewer"]
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\nk8s-secrets:", 1)[1].split("\n\n", 1)[0]
    assert "MESH_LOOPBACK_SANS=false $(PY) -m pki init" in recipe
    assert recipe.index("pki init") < recipe.index("deploy.kubernetes.k8s secrets")


def test_init_takes_loopback_sans_off_services_where_the_deployment_wants_none(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    init(layout, POLICY)  # made by `make run`
    # A client that asked for a loopback name itself (`pki issue --san`) keeps it: the setting is the services'.
    load_issuer(layout).issue("client", dns=["localhost"], uris=[POLICY.spiffe_id("client")], usages=["client"]).write(
        layout.out, "client"
    )
    client_before = layout.cert("client").read_bytes()
    without = dataclasses.replace(POLICY, loopback_sans=False)
    created = init(layout, without)  # then used by Docker (the pki job) or Kubernetes (make k8s-secrets)
    assert sorted(created) == sorted(POLICY.services)
    for name in POLICY.services:
        assert not LOOPBACK & set(subject_alt_names(load_certificates(layout.cert(name))[0])), name
    assert layout.cert("client").read_bytes() == client_before
    # Not the other way round (no caller needs them), and a renewal keeps a certificate's SANs as they are.
    assert init(layout, POLICY) == []
    successor = rotate_begin(layout, POLICY, "service-a")
    assert subject_alt_names(successor.cert) == [("DNS", "service-a"), ("URI", "spiffe://mesh.internal/service-a")]


@pytest.mark.e2e
def test_a_mesh_of_rsa_leaves_without_loopback_sans_works_over_tls_1_2_and_1_3(tmp_path: Path) -> None:
    """Real handshakes: RSA leaves for signatures only (ECDHE-RSA in TLS 1.2, RSA-PSS in 1.3), and names only."""
    layout = Layout(tmp_path / "pki")
    init(layout, dataclasses.replace(POLICY, loopback_sans=False), key_type="rsa")
    for name in POLICY.services:
        sans = set(subject_alt_names(load_certificates(layout.cert(name))[0]))
        assert not LOOPBACK & sans and ("DNS", name) in sans
    envs = chain_environments(free_ports(3), layout.out)
    client = Credentials(layout.cert("client"), layout.key("client"))
    with running(start_services(envs, tmp_path)):
        url = f"https://127.0.0.1:{envs[0]['MESH_PORT']}/chain"
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            context = attacker_context(layout.ca_cert, client)
            context.minimum_version = context.maximum_version = version
            response = get(url, "service-a", context)
            assert response.status_code == 200, response.text
            assert [hop["service"] for hop in response.json()["hops"]] == ["service-a", "service-b", "service-c"]
