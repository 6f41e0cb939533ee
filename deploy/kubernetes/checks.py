"""What no schema can check, checked on rendered manifests: that the pieces of the mesh fit together.

    problems(objects, trust_domain="mesh.internal")   # [] when every rule holds; else one sentence per fault

- every `Certificate` carries the SPIFFE ID its workload runs as, and the usages it needs (server auth and
  client auth for a service, client auth for the client), with a new key at each renewal;
- every Secret and ConfigMap a pod mounts exists in the overlay (or is made by a Certificate or a Bundle),
  with the keys the pod reads;
- the NetworkPolicies admit exactly the chain's edges on the service port, no more and no fewer;
- ports, probes, Services and the `MESH_*` addresses agree; every container is hardened.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

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
NAME = "app.kubernetes.io/name"


def problems(objects: list[Obj], trust_domain: str = "mesh.internal") -> list[str]:
    return [
        *certificate_problems(objects, trust_domain),
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


def edges(objects: list[Obj]) -> set[tuple[str, str]]:
    """Which workload may open a TCP connection to which, on the service port, under the NetworkPolicies."""
    labels = {workload: template["metadata"].get("labels", {}) for workload, template in templates(objects)}
    policies = of_kind(objects, "NetworkPolicy")
    allowed = set()
    for source, source_labels in labels.items():
        for target, target_labels in labels.items():
            if source == target:
                continue
            if _admits(policies, "Egress", source_labels, target_labels) and _admits(
                policies, "Ingress", target_labels, source_labels
            ):
                allowed.add((source, target))
    return allowed


def network_problems(objects: list[Obj]) -> list[str]:
    allowed = edges(objects)
    return [
        *(
            f"the NetworkPolicies let {a} reach {b}, which the chain does not need"
            for a, b in sorted(allowed - CHAIN_EDGES)
        ),
        *(
            f"the NetworkPolicies keep {a} from reaching {b}, a step of the chain"
            for a, b in sorted(CHAIN_EDGES - allowed)
        ),
    ]


def _admits(policies: list[Obj], direction: str, subject: dict[str, str], peer: dict[str, str]) -> bool:
    """Whether traffic in `direction` of the pod `subject`, to or from the pod `peer` (same namespace), on PORT
    over TCP is allowed: a pod no policy of that direction selects is not isolated; otherwise some rule must match."""
    selecting = [
        p
        for p in policies
        if direction in p["spec"].get("policyTypes", ["Ingress"]) and selects(p["spec"].get("podSelector", {}), subject)
    ]
    if not selecting:
        return True
    key, peers = ("from", "ingress") if direction == "Ingress" else ("to", "egress")
    for policy in selecting:
        for rule in policy["spec"].get(peers, []):
            ports = rule.get("ports")
            port_ok = not ports or any(
                p.get("protocol", "TCP") == "TCP" and p.get("port") in (None, PORT, "https") for p in ports
            )
            peer_ok = key not in rule or not rule[key] or any(_peer_matches(x, peer) for x in rule[key])
            if port_ok and peer_ok:
                return True
    return False


def _peer_matches(peer_rule: Obj, labels: dict[str, str]) -> bool:
    if "ipBlock" in peer_rule:
        return True  # an address range may cover pod addresses: count it as reaching everyone
    if "namespaceSelector" in peer_rule:
        namespace = {"kubernetes.io/metadata.name": "mtls-mesh"}
        if not selects(peer_rule["namespaceSelector"], namespace):
            return False
    return selects(peer_rule.get("podSelector", {}), labels)


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


def of_kind(objects: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objects if o and o.get("kind") == kind]


def templates(objects: list[Obj]) -> list[tuple[str, Obj]]:
    """(workload name, pod template) for every Deployment and Job."""
    workloads = of_kind(objects, "Deployment") + of_kind(objects, "Job")
    return [(o["metadata"]["name"], o["spec"]["template"]) for o in workloads]


def pods(objects: list[Obj]) -> list[tuple[str, Obj]]:
    """(workload name, pod spec) for every Deployment and Job."""
    return [(name, template["spec"]) for name, template in templates(objects)]
