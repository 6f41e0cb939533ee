"""`make k8s-podman`: run the rendered static overlay's workloads with `podman kube play`, call the chain through
them, and show untrusted callers refused — the closest thing to a cluster this machine can run.

No Kubernetes control plane can be installed here, but podman runs Deployments from Kubernetes YAML. Podman
4.3 (Debian bookworm) is not Kubernetes, and four adaptations are needed; each is made here, in code, on
the rendered YAML, and nowhere else:

1. **Volumes.** Podman supports hostPath, configMap, emptyDir and PVC volumes — not `secret` or `projected`.
   A ConfigMap volume would do, but podman writes its files root-owned and world-readable whatever
   `defaultMode` and `fsGroup` say, and the services refuse a key others can read (as they should). So each
   workload's `pki` volume becomes a hostPath holding exactly what `pki deploy` gives its Docker volume: its
   own key (0600, its uid), its certificate, the trust anchor, the CRL, its allow-lists.
2. **Names.** Podman ignores Services, so `service-b` resolves to nothing; each pod is reached by the name
   podman gives it (`service-b-pod-0`). Only the address changes: MESH_DOWNSTREAM_NAME — what the callee
   must prove — stays `service-b`.
3. **Ports.** Podman publishes each container port on the host; only service-a's and the token service's
   are, on 127.0.0.1.
4. **Limits.** Podman raises the open-files and process limits of every container beyond what this
   (itself containerised) machine allows; a containers.conf of ours sets lower ones.

Services, NetworkPolicies, ServiceAccounts and the Namespace are left out: podman ignores them. Nothing
here enforces a NetworkPolicy, and one replica per Deployment runs (podman starts one pod per Deployment).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

from deploy.kubernetes.k8s import HERE, load
from pki import Policy
from pki.deploy import deploy
from shared.layout import DEFAULT_OUT, Layout

UIDS = {"service-a": 10001, "service-b": 10002, "service-c": 10003, "token-service": 10005}
NETWORK = "mtls-mesh-podman"
IMAGE = "mtls-mesh:local"
CONTAINERS_CONF = '[containers]\ndefault_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]\n'


def adapt(objects: list[dict[str, Any]], material: Path, port: int) -> list[dict[str, Any]]:
    """The Deployments of the rendered static overlay, as podman 4.3 can run them (see the module's doc)."""
    adapted = []
    for deployment in (copy.deepcopy(o) for o in objects if o["kind"] == "Deployment"):
        name = deployment["metadata"]["name"]
        deployment["spec"]["replicas"] = 1
        pod = deployment["spec"]["template"]["spec"]
        pod["volumes"] = [
            {"name": "pki", "hostPath": {"path": str(material / name), "type": "Directory"}}
            if volume["name"] == "pki"
            else volume
            for volume in pod["volumes"]
        ]
        container = pod["containers"][0]
        container["image"] = f"localhost/{IMAGE}"
        for env in container["env"]:
            if env["name"] in ("MESH_DOWNSTREAM_URL", "MESH_TOKEN_SERVICE_URL"):
                url = urlsplit(env["value"])
                env["value"] = urlunsplit(url._replace(netloc=f"{url.hostname}-pod-0:{url.port}"))
        # Podman publishes every container port on the host: only what the host calls is, on 127.0.0.1 — the
        # chain's entry, and the token service (for the edge's user token).
        if name in ("service-a", "token-service"):
            published = port if name == "service-a" else port + 1
            container["ports"] = [{**p, "hostPort": published, "hostIP": "127.0.0.1"} for p in container["ports"]]
        else:
            del container["ports"]
        adapted.append(deployment)
    return adapted


def podman(*args: str, conf: Path, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CONTAINERS_CONF": str(conf)}
    result = subprocess.run(["podman", *args], capture_output=True, text=True, env=env, timeout=timeout)
    if check and result.returncode != 0:
        raise SystemExit(f"podman {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
    return result


def main() -> int:
    layout, policy = Layout(DEFAULT_OUT), Policy.load()
    rendered = HERE / "rendered" / "static.yaml"
    if not rendered.exists():
        raise SystemExit("k8s-podman: no rendered static overlay — run `make k8s` first")
    with tempfile.TemporaryDirectory(prefix="mesh-podman-") as scratch:
        root = Path(scratch)
        conf = root / "containers.conf"
        conf.write_text(CONTAINERS_CONF)
        material = root / "pki"
        for name, uid in UIDS.items():
            (material / name).mkdir(parents=True)
            deploy(layout, policy, name, material / name, (uid, uid))
        port = 18443
        manifest = root / "podman.yaml"
        manifest.write_text(yaml.safe_dump_all(adapt(load(rendered), material, port)))
        print("k8s-podman: loading the image into podman", flush=True)
        saved = subprocess.run(["docker", "save", IMAGE], capture_output=True, check=True).stdout
        subprocess.run(["podman", "load"], input=saved, capture_output=True, check=True)
        podman("network", "rm", "-f", NETWORK, conf=conf, check=False)  # a leftover of an interrupted run
        podman("network", "create", NETWORK, conf=conf)
        try:
            print(f"k8s-podman: podman kube play {rendered.relative_to(HERE.parents[1])} (adapted)", flush=True)
            podman("kube", "play", "--network", NETWORK, str(manifest), conf=conf)
            return call_and_attack(layout, port, root)
        finally:
            podman("kube", "down", str(manifest), conf=conf, check=False)
            podman("network", "rm", "-f", NETWORK, conf=conf, check=False)


def call_and_attack(layout: Layout, port: int, root: Path) -> int:
    """The chain through the pods, as the client; then refusals, as TLS and the allow-list give them."""
    url = f"https://127.0.0.1:{port}/chain"
    client = [sys.executable, "-m", "client", url, "--pki-dir", str(layout.out)]
    deadline = time.monotonic() + 120
    while True:
        done = subprocess.run(client, capture_output=True, text=True)
        if done.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(2)
    print(done.stdout.strip())
    if done.returncode != 0:
        print(f"k8s-podman: the chain did not answer within 120 s: {done.stdout.strip()}")
        return 1
    as_alice = subprocess.run(
        [*client, "--user", "alice", "--token-url", f"https://127.0.0.1:{port + 1}"], capture_output=True, text=True
    )
    print(f"\non behalf of alice: exit {as_alice.returncode}\n{as_alice.stdout.strip()}")
    if as_alice.returncode != 0:
        return 1
    from pki import CertificateAuthority

    stranger = (
        CertificateAuthority.root("Foreign Root CA")
        .intermediate("Foreign Issuing CA")
        .issue("client", usages=["client"], uris=["spiffe://mesh.internal/client"])
    )
    cert, key = stranger.write(root, "stranger")
    refusals = {
        "a certificate from another CA": [*client, "--cert", str(cert), "--key", str(key)],
        "our operator, on no allow-list of service-a": [
            *client, "--cert", str(layout.cert("operator")), "--key", str(layout.key("operator"))
        ],
    }  # fmt: skip
    failures = 0
    for what, command in refusals.items():
        refused = subprocess.run(command, capture_output=True, text=True)
        print(f"\n{what}: exit {refused.returncode}\n{refused.stdout.strip()}")
        failures += refused.returncode != 1
    status = json.loads(subprocess.run([*client, "--json"], capture_output=True, text=True).stdout)
    print(f"\nk8s-podman: {len(status['hops'])} hops through the pods; {len(refusals) - failures} of "
          f"{len(refusals)} untrusted callers refused")  # fmt: skip
    return 1 if failures or len(status["hops"]) != 3 else 0


if __name__ == "__main__":
    sys.exit(main())
