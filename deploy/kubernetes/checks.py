"""What no schema can check, checked on rendered manifests: that the pieces of the mesh fit together.

    problems(objects, trust_domain="mesh.internal")   # [] when every rule holds; else one sentence per fault

- every `Certificate` carries the SPIFFE ID its workload runs as, and the usages it needs (server auth and
  client auth for a service, client auth for the client), with a new key at each renewal;
- the CA stays out of the workloads' namespace: Certificates name a ClusterIssuer whose Secret lives in
  cert-manager's namespace; no Issuer, and no Secret holding a CA certificate, sits beside the workloads;
- approver-policy limits each identity to itself: every CertificateRequestPolicy that could approve a mesh
  request allows exactly one workload's SPIFFE ID and exactly what its Certificate asks for, and only that
  workload's ServiceAccount (and cert-manager's controller, which requests Certificates) may use it;
- every Secret and ConfigMap a pod mounts exists in the overlay (or is made by a Certificate or a Bundle),
  with the keys the pod reads;
- the egress graph is exactly what the chain needs: its edges on the service port (both ends' policies
  agreeing), DNS for the pods that call someone, and nothing else — no DNS for the token service, nothing
  beyond the cluster;
- ports, probes, Services and the `MESH_*` addresses agree; every container is hardened.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from shared.x509 import MaterialError, is_ca, parse_certificates

Obj = dict[str, Any]

PORT = 8443
CHAIN_EDGES = frozenset(
    {
        ("client", "service-a"),
        ("service-a", "service-b"),
        ("service-b", "service-c"),
        *((caller, "token-service") for caller in ("client", "service-a", "service-b", "service-c")),
    }
)
CALLERS = frozenset(caller for caller, _ in CHAIN_EDGES)
DNS, OUT = "kube-dns", "the outside"  # destinations beyond the namespace, in the egress graph
# The egress graph the chain needs: its edges, and DNS for the pods that call someone (they dial Services by
# name). The token service calls nobody, so it reaches nothing at all: not even DNS, which is a way out.
NEEDED = CHAIN_EDGES | {(caller, DNS) for caller in CALLERS}
NAME = "app.kubernetes.io/name"


def problems(objects: list[Obj], trust_domain: str = "mesh.internal") -> list[str]:
    return [
        *certificate_problems(objects, trust_domain),
        *issuer_problems(objects),
        *policy_problems(objects, trust_domain),
        *mount_problems(objects),
        *network_problems(objects),
        *wiring_problems(objects),
        *hardening_problems(objects),
    ]


# ── certificates ────────────────────────────────────────────────────────────────────────────────────────────


def certificate_problems(objects: list[Obj], trust_domain: str) -> list[str]:
    found = []
    servers = {o["metadata"]["name"] for o in of_kind(objects, "Deployment")}
    mounted = {secret: workload for workload, pod in pods(objects) for secret in secrets_mounted(pod)}
    for cert in of_kind(objects, "Certificate"):
        name, spec = cert["metadata"]["name"], cert.get("spec", {})
        usages = set(spec.get("usages", []))
        needed = {"client auth", "server auth"} if name in servers else {"client auth"}
        if missing := needed - usages:
            found.append(f"Certificate {name}: usages lack {', '.join(sorted(missing))}")
        if spec.get("uris") != [f"spiffe://{trust_domain}/{name}"]:
            found.append(
                f"Certificate {name}: uris must be exactly [spiffe://{trust_domain}/{name}], not {spec.get('uris')}"
            )
        if name in servers and name not in spec.get("dnsNames", []):
            found.append(f"Certificate {name}: dnsNames lack {name}, the name its callers check")
        if spec.get("privateKey", {}).get("rotationPolicy") != "Always":
            found.append(f"Certificate {name}: privateKey.rotationPolicy must be Always (a new key at each renewal)")
        workload = mounted.get(spec.get("secretName", ""))
        if workload is None:
            found.append(f"Certificate {name}: no workload mounts its Secret {spec.get('secretName')}")
        elif workload != name:
            found.append(f"Certificate {name}: its Secret is mounted by {workload}, which runs as another identity")
    return found


# ── who signs, and what: the issuer and approver-policy ────────────────────────────────────────────────────

CLUSTER_RESOURCE_NAMESPACE = "cert-manager"  # where a ClusterIssuer reads its CA Secret (cert-manager's default)
# cert-manager's controller: it creates the CertificateRequest of every Certificate, so it is their requester.
CERT_MANAGER = "ServiceAccount cert-manager/cert-manager"
POLICY_GROUP, POLICIES = "policy.cert-manager.io", "certificaterequestpolicies"


def issuer_problems(objects: list[Obj]) -> list[str]:
    """The CA and its key stay out of the workloads' namespace: Certificates name a ClusterIssuer, whose Secret
    lives in cert-manager's namespace, and no Issuer or CA key pair sits where the workloads run."""
    found = []
    home = {o["metadata"].get("namespace") for o in workloads(objects)}
    cluster_issuers = {o["metadata"]["name"]: o for o in of_kind(objects, "ClusterIssuer")}
    ca_secrets = {
        o["spec"]["ca"]["secretName"] for o in of_kind(objects, "Issuer", "ClusterIssuer") if "ca" in o["spec"]
    }
    secrets = {(o["metadata"].get("namespace"), o["metadata"]["name"]): o for o in of_kind(objects, "Secret")}
    for issuer in of_kind(objects, "Issuer"):
        if (namespace := issuer["metadata"].get("namespace")) in home:
            found.append(
                f"Issuer {issuer['metadata']['name']} sits in {namespace}, the workloads' namespace, with the CA "
                f"Secret it signs with: use a ClusterIssuer, whose Secret lives in {CLUSTER_RESOURCE_NAMESPACE}"
            )
    for cert in of_kind(objects, "Certificate"):
        ref = cert["spec"].get("issuerRef", {})
        if ref.get("kind") != "ClusterIssuer" or ref.get("name") not in cluster_issuers:
            found.append(
                f"Certificate {cert['metadata']['name']}: its issuerRef names {ref.get('kind', 'Issuer')} "
                f"{ref.get('name')}, which is no ClusterIssuer of the overlay (the CA must not sit beside the "
                "workloads)"
            )
    for name, issuer in cluster_issuers.items():
        secret = issuer["spec"].get("ca", {}).get("secretName")
        if secret and (CLUSTER_RESOURCE_NAMESPACE, secret) not in secrets:
            found.append(
                f"ClusterIssuer {name} reads Secret {secret} from {CLUSTER_RESOURCE_NAMESPACE}, "
                "which the overlay does not provide there"
            )
    for (namespace, name), secret in secrets.items():
        if namespace not in home:
            continue
        try:
            holds_ca = name in ca_secrets or _leads_with_a_ca(secret, f"Secret {namespace}/{name}")
        except MaterialError as e:
            found.append(str(e))
            continue
        if holds_ca:
            found.append(
                f"Secret {name} in {namespace}, the workloads' namespace, holds a CA's key pair: whoever can read "
                f"Secrets there can sign any SPIFFE ID — keep it in {CLUSTER_RESOURCE_NAMESPACE}, for a ClusterIssuer"
            )
    return found


def _leads_with_a_ca(secret: Obj, what: str) -> bool:
    """Whether the first certificate of the Secret's tls.crt (its own, before any chain) is a CA's."""
    if not (data := secret.get("data", {}).get("tls.crt")):
        return False
    return is_ca(parse_certificates(base64.b64decode(data), Path(what), "tls.crt")[0])


def policy_problems(objects: list[Obj], trust_domain: str) -> list[str]:
    """approver-policy limits each identity to itself: every CertificateRequestPolicy that could approve a mesh
    request allows exactly one workload's SPIFFE ID and exactly what that workload's Certificate asks for, from
    the mesh's issuer, in the workloads' namespace; only that workload's ServiceAccount and cert-manager's
    controller may use it; and every Certificate has such a policy."""
    certificates = {c["metadata"]["name"]: c for c in of_kind(objects, "Certificate")}
    if not certificates:
        return []
    found = []
    namespaces = {n["metadata"]["name"]: n["metadata"].get("labels", {}) for n in of_kind(objects, "Namespace")}
    accounts = {
        o["metadata"]["name"]: f"ServiceAccount {o['metadata'].get('namespace')}/"
        f"{o['spec']['template']['spec'].get('serviceAccountName', 'default')}"
        for o in workloads(objects)
    }
    covered = set()
    for policy in of_kind(objects, "CertificateRequestPolicy"):
        name, spec = policy["metadata"]["name"], policy.get("spec", {})
        if not any(_selects_request(spec.get("selector", {}), c, namespaces) for c in certificates.values()):
            continue  # not one of ours: it can approve no request of the mesh
        uris = spec.get("allowed", {}).get("uris") or {}
        workload = next((w for w in certificates if uris.get("values") == [f"spiffe://{trust_domain}/{w}"]), None)
        if workload is None:
            found.append(
                f"CertificateRequestPolicy {name} allows the URI SANs {', '.join(uris.get('values', [])) or 'none'}: "
                "a policy for the mesh must allow exactly one workload's SPIFFE ID"
            )
            continue
        covered.add(workload)
        found += _looser_than(name, spec, certificates[workload])
        found += _used_by_others(objects, name, certificates[workload], accounts.get(workload))
    found += [
        f"Certificate {name}: no CertificateRequestPolicy allows its SPIFFE ID: approver-policy would never "
        "approve it (and with cert-manager's default approver, anything would be)"
        for name in sorted(set(certificates) - covered)
    ]
    return found


def _looser_than(name: str, spec: Obj, certificate: Obj) -> list[str]:
    """Where the policy `name` allows other than exactly what `certificate` asks for."""
    allowed, constraints, selector = spec.get("allowed", {}), spec.get("constraints", {}), spec.get("selector", {})
    cert, workload = certificate["spec"], certificate["metadata"]["name"]
    wanted = {
        "uris.required": (allowed.get("uris", {}).get("required"), True),
        "commonName": (allowed.get("commonName", {}).get("value"), cert.get("commonName")),
        "dnsNames": (sorted(allowed.get("dnsNames", {}).get("values", [])), sorted(cert.get("dnsNames", []))),
        "usages": (sorted(allowed.get("usages", [])), sorted(cert.get("usages", []))),
        "isCA": (bool(allowed.get("isCA")), False),
        "maxDuration": (constraints.get("maxDuration"), cert.get("duration")),
        "privateKey.algorithm": (
            constraints.get("privateKey", {}).get("algorithm"),
            cert.get("privateKey", {}).get("algorithm"),
        ),
        "selector.issuerRef": (selector.get("issuerRef"), {"group": "cert-manager.io", **cert["issuerRef"]}),
        "selector.namespace.matchNames": (
            selector.get("namespace", {}).get("matchNames"),
            [certificate["metadata"].get("namespace")],
        ),
    }
    return [
        f"CertificateRequestPolicy {name}: {field} is {have}, where Certificate {workload} needs {want}"
        for field, (have, want) in wanted.items()
        if have != want
    ]


def _used_by_others(objects: list[Obj], name: str, certificate: Obj, account: str | None) -> list[str]:
    """Who may use the policy `name` for `certificate`'s identity, other than its workload's ServiceAccount
    (`account`) and cert-manager's controller — and which of those two may not."""
    workload, namespace = certificate["metadata"]["name"], certificate["metadata"].get("namespace", "")
    users = policy_users(objects, name, namespace)
    own = ({account: "its own ServiceAccount"} if account else {}) | {CERT_MANAGER: "which requests it"}
    return [
        *(
            f"CertificateRequestPolicy {name} (for {workload}) may be used by {user}: only {workload}'s "
            "ServiceAccount and cert-manager's controller may"
            for user in sorted(users - set(own))
        ),
        *(
            f"CertificateRequestPolicy {name} (for {workload}) may not be used by {user}, {why}"
            for user, why in own.items()
            if user not in users
        ),
    ]


def _selects_request(selector: Obj, cert: Obj, namespaces: dict[str, dict[str, str]]) -> bool:
    """Whether a policy's selector matches the requests a Certificate makes: issuerRef fields and namespace
    names may hold `*` wildcards; an absent field matches everything, as approver-policy reads them."""
    ref = {"group": "cert-manager.io", **cert["spec"].get("issuerRef", {})}
    if any(not _wildcard(pattern, ref.get(key, "")) for key, pattern in selector.get("issuerRef", {}).items()):
        return False
    namespace = cert["metadata"].get("namespace", "")
    wanted = selector.get("namespace", {})
    if "matchNames" in wanted and not any(_wildcard(n, namespace) for n in wanted["matchNames"]):
        return False
    labels = {**namespaces.get(namespace, {}), "kubernetes.io/metadata.name": namespace}
    return selects({"matchLabels": wanted.get("matchLabels", {})}, labels)


def _wildcard(pattern: str, value: str) -> bool:
    return re.fullmatch(".*".join(map(re.escape, pattern.split("*"))), value) is not None


def policy_users(objects: list[Obj], policy: str, namespace: str) -> set[str]:
    """Who may `use` the CertificateRequestPolicy `policy` for requests in `namespace` — the question
    approver-policy asks the API server — as "Kind [namespace/]name" of each RBAC subject."""
    roles = {
        (o["kind"], o["metadata"].get("namespace") if o["kind"] == "Role" else None, o["metadata"]["name"]): o
        for o in of_kind(objects, "Role", "ClusterRole")
    }
    users = set()
    for binding in of_kind(objects, "RoleBinding", "ClusterRoleBinding"):
        bound_in = binding["metadata"].get("namespace") if binding["kind"] == "RoleBinding" else None
        if binding["kind"] == "RoleBinding" and bound_in != namespace:
            continue
        ref = binding["roleRef"]
        role = roles.get((ref["kind"], bound_in if ref["kind"] == "Role" else None, ref["name"]), {})
        if any(_grants_use(rule, policy) for rule in role.get("rules", [])):
            for subject in binding.get("subjects", []):
                scope = f"{subject.get('namespace', bound_in)}/" if subject["kind"] == "ServiceAccount" else ""
                users.add(f"{subject['kind']} {scope}{subject['name']}")
    return users


def _grants_use(rule: Obj, policy: str) -> bool:
    return (
        bool({POLICY_GROUP, "*"} & set(rule.get("apiGroups", [])))
        and bool({POLICIES, "*"} & set(rule.get("resources", [])))
        and bool({"use", "*"} & set(rule.get("verbs", [])))
        and (not rule.get("resourceNames") or policy in rule["resourceNames"])
    )


# ── mounts ──────────────────────────────────────────────────────────────────────────────────────────────────


def mount_problems(objects: list[Obj]) -> list[str]:
    """Each mounted Secret/ConfigMap exists (or a Certificate/Bundle makes it) and has the keys read from it."""
    keys: dict[tuple[str, str], set[str] | None] = {}  # (kind, name) → its keys; None: made by cert-manager
    for o in of_kind(objects, "Secret") + of_kind(objects, "ConfigMap"):
        keys[(o["kind"], o["metadata"]["name"])] = set(o.get("data", {})) | set(o.get("stringData", {}))
    for cert in of_kind(objects, "Certificate"):
        keys[("Secret", cert["spec"]["secretName"])] = {"tls.crt", "tls.key", "ca.crt"}
    for bundle in of_kind(objects, "Bundle"):  # trust-manager writes a ConfigMap named after the Bundle
        target = bundle.get("spec", {}).get("target", {}).get("configMap", {})
        keys[("ConfigMap", bundle["metadata"]["name"])] = {target.get("key")}
    found = []
    for workload, pod in pods(objects):
        for kind, name, wanted in sources(pod):
            have = keys.get((kind, name), "missing")
            if have == "missing":
                found.append(f"{workload} mounts {kind} {name}, which nothing in the overlay provides")
            elif have is not None and (absent := wanted - have):
                found.append(f"{workload} reads {', '.join(sorted(absent))} from {kind} {name}, which lacks it")
    return found


def sources(pod: Obj) -> Iterable[tuple[str, str, set[str]]]:
    """(kind, name, keys read) for every Secret and ConfigMap a pod's volumes draw on."""
    for volume in pod.get("volumes", []):
        for source in [volume, *volume.get("projected", {}).get("sources", [])]:
            if "secret" in source:
                ref = source["secret"]
                yield "Secret", ref.get("secretName") or ref.get("name"), {i["key"] for i in ref.get("items", [])}
            if "configMap" in source:
                ref = source["configMap"]
                yield "ConfigMap", ref["name"], {i["key"] for i in ref.get("items", [])}


def secrets_mounted(pod: Obj) -> list[str]:
    return [name for kind, name, _ in sources(pod) if kind == "Secret"]


# ── the network ─────────────────────────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Peer:
    """Somewhere a pod may send packets: the namespace it sits in (None: an address beyond the cluster), its pod
    labels, and the (protocol, port) traffic to it goes to (None: any port counts as a way out)."""

    namespace: str | None
    labels: dict[str, str]
    ports: tuple[tuple[str, int | str], ...] | None


SERVICE = (("TCP", PORT), ("TCP", "https"))  # the service port, by number or by the container port's name
KUBE_DNS = Peer("kube-system", {"k8s-app": "kube-dns"}, (("UDP", 53), ("TCP", 53)))
OUTSIDE = Peer(None, {}, None)


def edges(objects: list[Obj]) -> set[tuple[str, str]]:
    """Which workload may open a connection to which destination under the NetworkPolicies: to another
    workload on the service port (its egress and the other's ingress must both admit it), to kube-dns on port
    53, to the outside (an address beyond the cluster) on any port — the egress graph, DNS included."""
    peers = {
        o["metadata"]["name"]: Peer(
            o["metadata"].get("namespace"), o["spec"]["template"]["metadata"]["labels"], SERVICE
        )
        for o in workloads(objects)
    }
    policies = of_kind(objects, "NetworkPolicy")
    allowed = set()
    for source, peer in peers.items():
        for target, destination in [*peers.items(), (DNS, KUBE_DNS), (OUT, OUTSIDE)]:
            if source == target or not _admits(policies, "Egress", peer, destination):
                continue
            # Ingress is ours to check only for our own pods; kube-dns and the outside answer whoever reaches them.
            if target not in peers or _admits(policies, "Ingress", destination, replace(peer, ports=SERVICE)):
                allowed.add((source, target))
    return allowed


def network_problems(objects: list[Obj]) -> list[str]:
    allowed = edges(objects)
    return [
        *(_needless(a, b) for a, b in sorted(allowed - NEEDED)),
        *(_missing(a, b) for a, b in sorted(NEEDED - allowed)),
    ]


def _missing(source: str, target: str) -> str:
    if target == DNS:
        return f"the NetworkPolicies keep {source} from reaching kube-dns, which it needs to find the Services it calls"
    return f"the NetworkPolicies keep {source} from reaching {target}, a step of the chain"


def _needless(source: str, target: str) -> str:
    why = {
        DNS: " (only a pod that calls someone resolves names, and DNS is a way out of the cluster)",
        OUT: " (nothing in the mesh calls beyond the cluster)",
    }.get(target, "")
    return f"the NetworkPolicies let {source} reach {target}, which the chain does not need{why}"


def _admits(policies: list[Obj], direction: str, subject: Peer, peer: Peer) -> bool:
    """Whether traffic in `direction` of the pod `subject`, to or from `peer`, is allowed: a pod that no policy
    of that direction selects is not isolated; otherwise some rule of a selecting policy must match."""
    selecting = [
        p
        for p in policies
        if direction in p["spec"].get("policyTypes", ["Ingress"])
        and p["metadata"].get("namespace") == subject.namespace
        and selects(p["spec"].get("podSelector", {}), subject.labels)
    ]
    if not selecting:
        return True
    key, peers = ("from", "ingress") if direction == "Ingress" else ("to", "egress")
    for policy in selecting:
        for rule in policy["spec"].get(peers, []):
            port_ok = not rule.get("ports") or any(_port_matches(port, peer) for port in rule["ports"])
            namespace = policy["metadata"].get("namespace")
            peer_ok = not rule.get(key) or any(_peer_matches(x, peer, namespace) for x in rule[key])
            if port_ok and peer_ok:
                return True
    return False


def _port_matches(rule_port: Obj, peer: Peer) -> bool:
    if peer.ports is None:
        return True  # to the outside, any port is a way out
    protocol, port = rule_port.get("protocol", "TCP"), rule_port.get("port")
    return any(protocol == p and port in (None, number) for p, number in peer.ports)


def _peer_matches(peer_rule: Obj, peer: Peer, policy_namespace: str | None) -> bool:
    if "ipBlock" in peer_rule:
        return True  # an address range may cover pod addresses as well as the outside: count it as reaching all
    if peer.namespace is None:
        return False  # pod and namespace selectors select pods in the cluster, never an outside address
    if "namespaceSelector" in peer_rule:
        if not selects(peer_rule["namespaceSelector"], {"kubernetes.io/metadata.name": peer.namespace}):
            return False
    elif peer.namespace != policy_namespace:
        return False  # a podSelector alone selects pods in the policy's own namespace
    return selects(peer_rule.get("podSelector", {}), peer.labels)


def selects(selector: Obj, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) applied to `labels`."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        present = key in labels
        if not {
            "In": present and labels.get(key) in values,
            "NotIn": not present or labels.get(key) not in values,
            "Exists": present,
            "DoesNotExist": not present,
        }[operator]:
            return False
    return True


# ── wiring and hardening ────────────────────────────────────────────────────────────────────────────────────


def wiring_problems(objects: list[Obj]) -> list[str]:
    found = []
    services = {s["metadata"]["name"]: s for s in of_kind(objects, "Service")}
    for deployment in of_kind(objects, "Deployment"):
        name, pod = deployment["metadata"]["name"], deployment["spec"]["template"]
        container = pod["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        if env.get("MESH_NAME") != name:
            found.append(f"Deployment {name}: MESH_NAME is {env.get('MESH_NAME')}, not {name}")
        if not any(p.get("containerPort") == PORT and p.get("name") == "https" for p in container.get("ports", [])):
            found.append(f"Deployment {name}: no container port {PORT} named https")
        service = services.get(name)
        if service is None:
            found.append(f"Deployment {name}: no Service {name} for its callers to reach it by name")
        else:
            if not selects({"matchLabels": service["spec"].get("selector", {})}, pod["metadata"].get("labels", {})):
                found.append(f"Service {name}: its selector does not select Deployment {name}'s pods")
            if not any(
                p.get("port") == PORT and p.get("targetPort") in ("https", PORT) for p in service["spec"]["ports"]
            ):
                found.append(f"Service {name}: no port {PORT} to the container's https port")
        for probe in ("readinessProbe", "livenessProbe"):
            command = " ".join(container.get(probe, {}).get("exec", {}).get("command", []))
            if f"https://127.0.0.1:{PORT}/healthz" not in command or '--server-name "$MESH_NAME"' not in command:
                found.append(f"Deployment {name}: its {probe} is not an mTLS call to its own /healthz as itself")
        for url_key, name_key in (("MESH_DOWNSTREAM_URL", "MESH_DOWNSTREAM_NAME"), ("MESH_TOKEN_SERVICE_URL", None)):
            if url := env.get(url_key):
                host, port = urlsplit(url).hostname, urlsplit(url).port
                if host not in services or port != PORT:
                    found.append(f"Deployment {name}: {url_key}={url} is no Service of the overlay on port {PORT}")
                if name_key and env.get(name_key) != host:
                    found.append(f"Deployment {name}: {name_key} must be {host}, the Service it calls")
    return found


def hardening_problems(objects: list[Obj]) -> list[str]:
    found = []
    for workload, pod in pods(objects):
        context = pod.get("securityContext", {})
        if not context.get("runAsNonRoot") or context.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            found.append(f"{workload}: the pod must set runAsNonRoot and seccompProfile RuntimeDefault")
        if pod.get("automountServiceAccountToken") is not False:
            found.append(f"{workload}: the pod must not mount a service-account token")
        for container in pod["containers"]:
            security = container.get("securityContext", {})
            if not security.get("readOnlyRootFilesystem") or security.get("allowPrivilegeEscalation") is not False:
                found.append(f"{workload}: a read-only root filesystem and no privilege escalation")
            if security.get("capabilities", {}).get("drop") != ["ALL"]:
                found.append(f"{workload}: all capabilities dropped")
            if not container.get("resources", {}).get("limits"):
                found.append(f"{workload}: resource limits")
    return found


# ── reading the objects ─────────────────────────────────────────────────────────────────────────────────────


def of_kind(objects: list[Obj], *kinds: str) -> list[Obj]:
    return [o for o in objects if o and o.get("kind") in kinds]


def workloads(objects: list[Obj]) -> list[Obj]:
    """Every Deployment and Job: what runs pods."""
    return of_kind(objects, "Deployment") + of_kind(objects, "Job")


def templates(objects: list[Obj]) -> list[tuple[str, Obj]]:
    """(workload name, pod template) for every Deployment and Job."""
    return [(o["metadata"]["name"], o["spec"]["template"]) for o in workloads(objects)]


def pods(objects: list[Obj]) -> list[tuple[str, Obj]]:
    """(workload name, pod spec) for every Deployment and Job."""
    return [(name, template["spec"]) for name, template in templates(objects)]
