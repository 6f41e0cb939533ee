"""The Kubernetes overlays, rendered by the real kubectl (kustomize) and validated offline: every object against
the Kubernetes schemas in strict mode, cert-manager's and trust-manager's against their CRD schemas, and the
rules no schema knows (deploy/kubernetes/checks.py). Each kind of fault is planted once, and must be caught.
The rules alone are tested without kubectl, in test_kubernetes_rules.py.

No cluster runs here: nothing proves that an API server accepts these objects, that a CNI enforces the
NetworkPolicies, or that cert-manager issues the Certificates (README: "Running on Kubernetes").
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.kubernetes import k8s
from deploy.kubernetes.checks import NAME
from tests.kustomize import render
from tests.test_kubernetes_rules import DNS_WHY, OUTSIDE_WHY, changed, stage

Obj = dict[str, Any]


def tools_missing() -> str | None:
    missing = [str(p) for p in (k8s.KUBECTL, k8s.VALIDATOR, k8s.CRD_MODELS) if not p.exists()]
    return f"the Kubernetes tools are not installed ({', '.join(missing)}): make k8s-tools" if missing else None


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return stage(tmp_path_factory.mktemp("kubernetes"))


@pytest.fixture(scope="module")
def rendered(request: pytest.FixtureRequest) -> dict[str, list[Obj]]:
    """Both overlays, staged from a PKI of our own into a copy of deploy/kubernetes, then rendered."""
    if reason := tools_missing():
        if os.environ.get("MESH_REQUIRE_K8S_TOOLS") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    staged: Path = request.getfixturevalue("staged")  # only now: a PKI costs seconds, a skip nothing
    return {overlay: k8s.load(path) for overlay, path in k8s.render(staged).items()}


@pytest.mark.skipif(not k8s.KUBECTL.exists(), reason="kubectl is not installed: make k8s-tools")
def test_the_stand_in_renders_what_kubectl_renders(staged: Path) -> None:
    """tests/kustomize.py, which the rules' tests render with (test_kubernetes_rules.py), is kubectl's equal here."""

    def by_name(objects: list[Obj]) -> dict[tuple[str, str, str], Obj]:
        for secret in (o for o in objects if o["kind"] == "Secret"):  # kubectl wraps base64: compare the bytes
            secret["data"] = {key: base64.b64decode(value) for key, value in secret["data"].items()}
        return {(o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]): o for o in objects}

    for overlay, path in k8s.render(staged).items():
        assert by_name(render(staged / "overlays" / overlay)) == by_name(k8s.load(path)), overlay


def problems_with(objects: list[Obj], tmp_path: Path) -> list[str]:
    path = tmp_path / "overlay.yaml"
    path.write_text(yaml.safe_dump_all(objects))
    return k8s.validate(path, "mesh.internal")


@pytest.mark.parametrize("overlay", k8s.OVERLAYS)
def test_both_overlays_render_and_validate(rendered: dict[str, list[Obj]], overlay: str, tmp_path: Path) -> None:
    objects = rendered[overlay]
    kinds = {o["kind"] for o in objects}
    assert {"Namespace", "Deployment", "Service", "ServiceAccount", "NetworkPolicy", "Job"} <= kinds
    if overlay == "cert-manager":
        assert {"Certificate", "ClusterIssuer", "CertificateRequestPolicy", "Role", "RoleBinding", "Bundle"} <= kinds
        assert "Issuer" not in kinds
    assert problems_with(objects, tmp_path) == []


def test_a_misspelled_field_fails_the_schema(rendered: dict[str, list[Obj]], tmp_path: Path) -> None:
    def misspell(deployment: Obj) -> None:
        deployment["spec"]["replica"] = deployment["spec"].pop("replicas")

    found = problems_with(changed(rendered["static"], "Deployment", "service-a", misspell), tmp_path)
    assert any("deployment/service-a" in p and "'replica' was unexpected" in p for p in found), found


def test_a_certificate_without_client_auth_fails(rendered: dict[str, list[Obj]], tmp_path: Path) -> None:
    def server_only(certificate: Obj) -> None:
        certificate["spec"]["usages"] = ["digital signature", "server auth"]

    found = problems_with(changed(rendered["cert-manager"], "Certificate", "service-b", server_only), tmp_path)
    assert found == [
        "Certificate service-b: usages lack client auth",
        "CertificateRequestPolicy mtls-mesh-service-b: usages is ['client auth', 'digital signature', 'server auth'], "
        "where Certificate service-b needs ['digital signature', 'server auth']",
    ]


def test_a_usage_cert_manager_does_not_know_fails_the_crd_schema(
    rendered: dict[str, list[Obj]], tmp_path: Path
) -> None:
    def misspelled_usage(certificate: Obj) -> None:
        certificate["spec"]["usages"] = ["digital signature", "server auth", "client-auth"]

    found = problems_with(changed(rendered["cert-manager"], "Certificate", "service-b", misspelled_usage), tmp_path)
    assert any(p.startswith("CRD schema: Certificate service-b:") and "usages" in p for p in found), found


def test_a_certificate_for_another_spiffe_id_fails(rendered: dict[str, list[Obj]], tmp_path: Path) -> None:
    def wrong_name(certificate: Obj) -> None:
        certificate["spec"]["uris"] = ["spiffe://mesh.internal/service-c"]

    found = problems_with(changed(rendered["cert-manager"], "Certificate", "service-b", wrong_name), tmp_path)
    assert any("Certificate service-b: uris must be exactly [spiffe://mesh.internal/service-b]" in p for p in found)


def test_a_network_policy_that_lets_a_reach_c_fails(rendered: dict[str, list[Obj]], tmp_path: Path) -> None:
    def also_from_a(policy: Obj) -> None:
        policy["spec"]["ingress"][0]["from"].append({"podSelector": {"matchLabels": {NAME: "service-a"}}})

    def also_to_c(policy: Obj) -> None:
        policy["spec"]["egress"][0]["to"][0]["podSelector"]["matchExpressions"][0]["values"].append("service-c")

    objects = changed(rendered["static"], "NetworkPolicy", "service-c-from-service-b", also_from_a)
    assert problems_with(objects, tmp_path) == []  # A's own egress still forbids it: both ends must agree
    objects = changed(objects, "NetworkPolicy", "service-a-to-service-b", also_to_c)
    assert problems_with(objects, tmp_path) == [
        "the NetworkPolicies let service-a reach service-c, which the chain does not need"
    ]


def test_a_network_policy_that_cuts_the_chain_fails(rendered: dict[str, list[Obj]], tmp_path: Path) -> None:
    objects = [o for o in rendered["static"] if o["metadata"]["name"] != "service-b-to-service-c"]
    assert problems_with(objects, tmp_path) == [
        "the NetworkPolicies keep service-b from reaching service-c, a step of the chain",
        "the NetworkPolicies keep service-b from reaching token-service, a step of the chain",
    ]


def test_without_default_deny_more_than_the_chain_is_admitted(rendered: dict[str, list[Obj]], tmp_path: Path) -> None:
    """A pod no policy selects is not isolated: without the default deny, the token service — which no egress
    policy names, since it calls nobody — may reach kube-dns, the outside, and anyone who takes no ingress
    policy: here, the client."""
    objects = [o for o in rendered["static"] if o["metadata"]["name"] != "default-deny"]
    assert problems_with(objects, tmp_path) == [
        "the NetworkPolicies let token-service reach client, which the chain does not need",
        f"the NetworkPolicies let token-service reach kube-dns, which the chain does not need{DNS_WHY}",
        f"the NetworkPolicies let token-service reach the outside, which the chain does not need{OUTSIDE_WHY}",
    ]


# ── the issuer and approver-policy (cert-manager overlay) ─────────────────────────────────────────────────────


def test_a_policy_with_a_key_size_that_is_no_number_fails_the_crd_schema(
    rendered: dict[str, list[Obj]], tmp_path: Path
) -> None:
    """approver-policy's CRD schema (from @kubernetes-models/cert-manager) checks the policies too."""

    def size_as_text(policy: Obj) -> None:
        policy["spec"]["constraints"]["privateKey"]["minSize"] = "256"

    objects = changed(rendered["cert-manager"], "CertificateRequestPolicy", "mtls-mesh-service-b", size_as_text)
    assert problems_with(objects, tmp_path) == [
        "CRD schema: CertificateRequestPolicy mtls-mesh-service-b: data/spec/constraints/privateKey/minSize must be "
        "integer"
    ]


def test_a_secret_nobody_provides_fails(rendered: dict[str, list[Obj]], tmp_path: Path) -> None:
    objects = [
        o for o in rendered["static"] if not (o["kind"] == "Secret" and o["metadata"]["name"] == "service-b-identity")
    ]
    assert problems_with(objects, tmp_path) == [
        "service-b mounts Secret service-b-identity, which nothing in the overlay provides"
    ]


def test_a_downstream_name_that_is_not_the_service_called_fails(rendered: dict[str, list[Obj]], tmp_path: Path) -> None:
    def wrong_callee(deployment: Obj) -> None:
        env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        next(e for e in env if e["name"] == "MESH_DOWNSTREAM_NAME")["value"] = "service-c"

    found = problems_with(changed(rendered["static"], "Deployment", "service-a", wrong_callee), tmp_path)
    assert found == ["Deployment service-a: MESH_DOWNSTREAM_NAME must be service-b, the Service it calls"]


def test_a_writable_root_filesystem_fails(rendered: dict[str, list[Obj]], tmp_path: Path) -> None:
    def writable(deployment: Obj) -> None:
        deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] = False

    found = problems_with(changed(rendered["static"], "Deployment", "service-c", writable), tmp_path)
    assert found == ["service-c: a read-only root filesystem and no privilege escalation"]
