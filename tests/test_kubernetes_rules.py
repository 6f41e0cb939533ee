"""deploy/kubernetes/checks.py's rules, on the real manifests, without kubectl: the overlays rendered by
tests/kustomize.py (test_kubernetes.py checks that it renders what kubectl does), each fault planted once and
named by its rule. The schemas and the CRD schemas need the real tools: test_kubernetes.py.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from deploy.kubernetes import checks, k8s
from deploy.kubernetes.checks import NAME
from pki import Policy, init
from shared.layout import Layout
from tests.kustomize import render

pytestmark = pytest.mark.fast

Obj = dict[str, Any]
DNS_WHY = " (only a pod that calls someone resolves names, and DNS is a way out of the cluster)"
OUTSIDE_WHY = " (nothing in the mesh calls beyond the cluster)"


def stage(tmp: Path) -> Path:
    """A copy of deploy/kubernetes with what `make k8s-secrets` stages, from a PKI of our own."""
    layout = Layout(tmp / "pki")
    init(layout)
    kube = tmp / "kubernetes"
    shutil.copytree(k8s.HERE / "base", kube / "base")
    for overlay in k8s.OVERLAYS:
        shutil.copytree(
            k8s.HERE / "overlays" / overlay, kube / "overlays" / overlay, ignore=shutil.ignore_patterns("generated")
        )
    k8s.secrets(layout, Policy.load(), kube)
    return kube


@pytest.fixture(scope="module")
def manifests(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Obj]]:
    kube = stage(tmp_path_factory.mktemp("kubernetes"))
    return {overlay: render(kube / "overlays" / overlay) for overlay in k8s.OVERLAYS}


def rules(objects: list[Obj]) -> list[str]:
    """checks.py alone, without the schemas: for faults that no schema sees, at a fraction of the cost."""
    return checks.problems(objects, "mesh.internal")


def changed(objects: list[Obj], kind: str, name: str, change: Callable[[Obj], None]) -> list[Obj]:
    """A copy of `objects` in which `change` was applied to the one `kind` called `name`."""
    result = copy.deepcopy(objects)
    [target] = [o for o in result if o["kind"] == kind and o["metadata"]["name"] == name]
    change(target)
    return result


@pytest.mark.parametrize("overlay", k8s.OVERLAYS)
def test_both_overlays_keep_every_rule(manifests: dict[str, list[Obj]], overlay: str) -> None:
    assert rules(manifests[overlay]) == []


def test_a_certificate_without_client_auth_fails(manifests: dict[str, list[Obj]]) -> None:
    def server_only(certificate: Obj) -> None:
        certificate["spec"]["usages"] = ["digital signature", "server auth"]

    assert rules(changed(manifests["cert-manager"], "Certificate", "service-b", server_only)) == [
        "Certificate service-b: usages lack client auth",
        "CertificateRequestPolicy mtls-mesh-service-b: usages is ['client auth', 'digital signature', 'server auth'], "
        "where Certificate service-b needs ['digital signature', 'server auth']",
    ]


def test_a_certificate_for_another_spiffe_id_fails(manifests: dict[str, list[Obj]]) -> None:
    def wrong_name(certificate: Obj) -> None:
        certificate["spec"]["uris"] = ["spiffe://mesh.internal/service-c"]

    found = rules(changed(manifests["cert-manager"], "Certificate", "service-b", wrong_name))
    assert any("Certificate service-b: uris must be exactly [spiffe://mesh.internal/service-b]" in p for p in found)


def test_a_network_policy_that_lets_a_reach_c_fails(manifests: dict[str, list[Obj]]) -> None:
    def also_from_a(policy: Obj) -> None:
        policy["spec"]["ingress"][0]["from"].append({"podSelector": {"matchLabels": {NAME: "service-a"}}})

    def also_to_c(policy: Obj) -> None:
        policy["spec"]["egress"][0]["to"][0]["podSelector"]["matchExpressions"][0]["values"].append("service-c")

    objects = changed(manifests["static"], "NetworkPolicy", "service-c-from-service-b", also_from_a)
    assert rules(objects) == []  # A's own egress still forbids it: both ends must agree
    objects = changed(objects, "NetworkPolicy", "service-a-to-service-b", also_to_c)
    assert rules(objects) == ["the NetworkPolicies let service-a reach service-c, which the chain does not need"]


def test_a_network_policy_that_cuts_the_chain_fails(manifests: dict[str, list[Obj]]) -> None:
    objects = [o for o in manifests["static"] if o["metadata"]["name"] != "service-b-to-service-c"]
    assert rules(objects) == [
        "the NetworkPolicies keep service-b from reaching service-c, a step of the chain",
        "the NetworkPolicies keep service-b from reaching token-service, a step of the chain",
    ]


def test_without_default_deny_more_than_the_chain_is_admitted(manifests: dict[str, list[Obj]]) -> None:
    objects = [o for o in manifests["static"] if o["metadata"]["name"] != "default-deny"]
    assert rules(objects) == [
        "the NetworkPolicies let token-service reach client, which the chain does not need",
        f"the NetworkPolicies let token-service reach kube-dns, which the chain does not need{DNS_WHY}",
        f"the NetworkPolicies let token-service reach the outside, which the chain does not need{OUTSIDE_WHY}",
    ]


def test_a_secret_nobody_provides_fails(manifests: dict[str, list[Obj]]) -> None:
    objects = [
        o for o in manifests["static"] if not (o["kind"] == "Secret" and o["metadata"]["name"] == "service-b-identity")
    ]
    assert rules(objects) == ["service-b mounts Secret service-b-identity, which nothing in the overlay provides"]


def test_a_downstream_name_that_is_not_the_service_called_fails(manifests: dict[str, list[Obj]]) -> None:
    def wrong_callee(deployment: Obj) -> None:
        env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        next(e for e in env if e["name"] == "MESH_DOWNSTREAM_NAME")["value"] = "service-c"

    found = rules(changed(manifests["static"], "Deployment", "service-a", wrong_callee))
    assert found == ["Deployment service-a: MESH_DOWNSTREAM_NAME must be service-b, the Service it calls"]


def test_a_writable_root_filesystem_fails(manifests: dict[str, list[Obj]]) -> None:
    def writable(deployment: Obj) -> None:
        deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] = False

    found = rules(changed(manifests["static"], "Deployment", "service-c", writable))
    assert found == ["service-c: a read-only root filesystem and no privilege escalation"]


def test_replicas_and_hardening_as_promised(manifests: dict[str, list[Obj]]) -> None:
    deployments = {o["metadata"]["name"]: o for o in manifests["static"] if o["kind"] == "Deployment"}
    assert {name: d["spec"]["replicas"] for name, d in deployments.items()} == {
        "service-a": 2,
        "service-b": 2,
        "service-c": 1,
        "token-service": 1,
    }


def test_the_egress_graph_is_the_chain_and_dns_for_the_callers_only(manifests: dict[str, list[Obj]]) -> None:
    """On today's main, the DNS policy selected every pod: the token service, which calls nobody, could reach
    kube-dns and through it the outside."""
    for overlay in k8s.OVERLAYS:
        graph = checks.edges(manifests[overlay])
        assert graph == checks.NEEDED
        assert {target for source, target in graph if source == "token-service"} == set()
        assert {source for source, target in graph if target == checks.DNS} == {
            "client",
            "service-a",
            "service-b",
            "service-c",
        }


def test_the_token_service_with_dns_egress_fails(manifests: dict[str, list[Obj]]) -> None:
    def also_the_token_service(policy: Obj) -> None:
        policy["spec"]["podSelector"]["matchExpressions"][0]["values"].append("token-service")

    found = rules(changed(manifests["static"], "NetworkPolicy", "dns", also_the_token_service))
    assert found == [f"the NetworkPolicies let token-service reach kube-dns, which the chain does not need{DNS_WHY}"]


def test_dns_for_every_pod_fails(manifests: dict[str, list[Obj]]) -> None:
    """The DNS policy as it stood on main: `podSelector: {}`."""

    def every_pod(policy: Obj) -> None:
        policy["spec"]["podSelector"] = {}

    found = rules(changed(manifests["cert-manager"], "NetworkPolicy", "dns", every_pod))
    assert found == [f"the NetworkPolicies let token-service reach kube-dns, which the chain does not need{DNS_WHY}"]


def test_egress_to_an_address_range_fails(manifests: dict[str, list[Obj]]) -> None:
    """An ipBlock may hold the outside as well as pods: service-c may then reach both."""

    def also_anywhere_on_443(policy: Obj) -> None:
        policy["spec"]["egress"].append({"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "ports": [{"port": 443}]})

    found = rules(changed(manifests["static"], "NetworkPolicy", "service-c-to-token-service", also_anywhere_on_443))
    assert found == [f"the NetworkPolicies let service-c reach the outside, which the chain does not need{OUTSIDE_WHY}"]


def test_a_caller_without_dns_fails(manifests: dict[str, list[Obj]]) -> None:
    def not_service_b(policy: Obj) -> None:
        policy["spec"]["podSelector"]["matchExpressions"][0]["values"].remove("service-b")

    found = rules(changed(manifests["static"], "NetworkPolicy", "dns", not_service_b))
    assert found == [
        "the NetworkPolicies keep service-b from reaching kube-dns, which it needs to find the Services it calls"
    ]


def test_a_dns_rule_without_its_namespace_selector_reaches_no_dns(manifests: dict[str, list[Obj]]) -> None:
    """A podSelector alone selects pods in the policy's own namespace: kube-dns, in kube-system, is not one."""

    def without_namespace(policy: Obj) -> None:
        del policy["spec"]["egress"][0]["to"][0]["namespaceSelector"]

    found = rules(changed(manifests["static"], "NetworkPolicy", "dns", without_namespace))
    assert found == [
        f"the NetworkPolicies keep {caller} from reaching kube-dns, which it needs to find the Services it calls"
        for caller in ("client", "service-a", "service-b", "service-c")
    ]


def test_each_identity_has_a_policy_for_exactly_its_spiffe_id(manifests: dict[str, list[Obj]]) -> None:
    """On today's main there was no policy at all, and the CA Issuer with its key sat in mtls-mesh."""
    objects = manifests["cert-manager"]
    policies = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "CertificateRequestPolicy"}
    assert {name: p["allowed"]["uris"]["values"] for name, p in policies.items()} == {
        f"mtls-mesh-{name}": [f"spiffe://mesh.internal/{name}"] for name in k8s.IDENTITIES
    }
    for name in k8s.IDENTITIES:
        assert checks.policy_users(objects, f"mtls-mesh-{name}", "mtls-mesh") == {
            f"ServiceAccount mtls-mesh/{name}",
            checks.CERT_MANAGER,
        }
    [ca] = [o for o in objects if o["kind"] == "Secret" and o["metadata"]["name"] == "mesh-ca"]
    assert ca["metadata"]["namespace"] == "cert-manager"
    assert not any(o["kind"] == "Issuer" for o in objects)


def test_a_policy_allowing_another_spiffe_id_fails(manifests: dict[str, list[Obj]]) -> None:
    def also_service_c(policy: Obj) -> None:
        policy["spec"]["allowed"]["uris"]["values"].append("spiffe://mesh.internal/service-c")

    found = rules(changed(manifests["cert-manager"], "CertificateRequestPolicy", "mtls-mesh-service-b", also_service_c))
    assert found == [
        "CertificateRequestPolicy mtls-mesh-service-b allows the URI SANs spiffe://mesh.internal/service-b, "
        "spiffe://mesh.internal/service-c: a policy for the mesh must allow exactly one workload's SPIFFE ID",
        "Certificate service-b: no CertificateRequestPolicy allows its SPIFFE ID: approver-policy would never "
        "approve it (and with cert-manager's default approver, anything would be)",
    ]


def test_a_wildcard_policy_fails(manifests: dict[str, list[Obj]]) -> None:
    def any_id(policy: Obj) -> None:
        policy["spec"]["allowed"]["uris"]["values"] = ["spiffe://mesh.internal/*"]

    found = rules(changed(manifests["cert-manager"], "CertificateRequestPolicy", "mtls-mesh-client", any_id))
    assert found == [
        "CertificateRequestPolicy mtls-mesh-client allows the URI SANs spiffe://mesh.internal/*: "
        "a policy for the mesh must allow exactly one workload's SPIFFE ID",
        "Certificate client: no CertificateRequestPolicy allows its SPIFFE ID: approver-policy would never "
        "approve it (and with cert-manager's default approver, anything would be)",
    ]


def test_a_service_account_that_may_use_another_identitys_policy_fails(manifests: dict[str, list[Obj]]) -> None:
    def also_service_b(binding: Obj) -> None:
        binding["subjects"].append({"kind": "ServiceAccount", "name": "service-b", "namespace": "mtls-mesh"})

    found = rules(changed(manifests["cert-manager"], "RoleBinding", "use-policy-service-c", also_service_b))
    assert found == [
        "CertificateRequestPolicy mtls-mesh-service-c (for service-c) may be used by ServiceAccount "
        "mtls-mesh/service-b: only service-c's ServiceAccount and cert-manager's controller may"
    ]


def test_a_policy_its_own_service_account_may_not_use_fails(manifests: dict[str, list[Obj]]) -> None:
    objects = [o for o in manifests["cert-manager"] if o["metadata"]["name"] != "use-policy-client"]
    assert rules(objects) == [
        "CertificateRequestPolicy mtls-mesh-client (for client) may not be used by ServiceAccount mtls-mesh/client, "
        "its own ServiceAccount"
    ]


def test_a_policy_that_allows_more_than_its_certificate_needs_fails(manifests: dict[str, list[Obj]]) -> None:
    def a_ca_for_a_day(policy: Obj) -> None:
        policy["spec"]["allowed"]["isCA"] = True
        policy["spec"]["constraints"]["maxDuration"] = "24h"
        policy["spec"]["selector"]["issuerRef"]["name"] = "*"

    found = rules(changed(manifests["cert-manager"], "CertificateRequestPolicy", "mtls-mesh-service-a", a_ca_for_a_day))
    assert found == [
        "CertificateRequestPolicy mtls-mesh-service-a: isCA is True, where Certificate service-a needs False",
        "CertificateRequestPolicy mtls-mesh-service-a: maxDuration is 24h, where Certificate service-a needs 1h",
        "CertificateRequestPolicy mtls-mesh-service-a: selector.issuerRef is {'group': 'cert-manager.io', "
        "'kind': 'ClusterIssuer', 'name': '*'}, where Certificate service-a needs {'group': 'cert-manager.io', "
        "'kind': 'ClusterIssuer', 'name': 'mesh-ca'}",
    ]


def test_the_ca_secret_back_in_the_workloads_namespace_fails(manifests: dict[str, list[Obj]]) -> None:
    def in_mtls_mesh(secret: Obj) -> None:
        secret["metadata"]["namespace"] = "mtls-mesh"

    found = rules(changed(manifests["cert-manager"], "Secret", "mesh-ca", in_mtls_mesh))
    assert found == [
        "ClusterIssuer mesh-ca reads Secret mesh-ca from cert-manager, which the overlay does not provide there",
        "Secret mesh-ca in mtls-mesh, the workloads' namespace, holds a CA's key pair: whoever can read Secrets "
        "there can sign any SPIFFE ID — keep it in cert-manager, for a ClusterIssuer",
    ]


def test_a_copy_of_the_ca_key_under_another_name_fails(manifests: dict[str, list[Obj]]) -> None:
    """Found by what it holds (a CA certificate), not by its name."""
    [ca] = [o for o in manifests["cert-manager"] if o["kind"] == "Secret" and o["metadata"]["name"] == "mesh-ca"]
    copy_ = copy.deepcopy(ca)
    copy_["metadata"] = {"name": "backup", "namespace": "mtls-mesh"}
    found = rules([*manifests["cert-manager"], copy_])
    assert found == [
        "Secret backup in mtls-mesh, the workloads' namespace, holds a CA's key pair: whoever can read Secrets "
        "there can sign any SPIFFE ID — keep it in cert-manager, for a ClusterIssuer",
    ]


def test_an_issuer_in_the_workloads_namespace_fails(manifests: dict[str, list[Obj]]) -> None:
    """The cert-manager overlay as it stood on main: a namespaced CA Issuer beside the workloads."""

    def namespaced(issuer: Obj) -> None:
        issuer["kind"], issuer["metadata"]["namespace"] = "Issuer", "mtls-mesh"

    def to_the_issuer(certificate: Obj) -> None:
        certificate["spec"]["issuerRef"]["kind"] = "Issuer"

    objects = changed(manifests["cert-manager"], "ClusterIssuer", "mesh-ca", namespaced)
    objects = changed(objects, "Certificate", "service-a", to_the_issuer)
    found = rules(objects)
    assert (
        "Issuer mesh-ca sits in mtls-mesh, the workloads' namespace, with the CA Secret it signs with: use a "
        "ClusterIssuer, whose Secret lives in cert-manager"
    ) in found
    assert (
        "Certificate service-a: its issuerRef names Issuer mesh-ca, which is no ClusterIssuer of the overlay (the CA "
        "must not sit beside the workloads)"
    ) in found
