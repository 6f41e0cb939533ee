"""`kubectl kustomize`, for exactly the features deploy/kubernetes uses, so that checks.py's rules can be tested
on the real manifests without kubectl (tests/test_kubernetes_rules.py).

Resources (files and directories), a namespace and labels for a directory's own resources, secret and
ConfigMap generators with fixed names, strategic-merge patches by kind (lists of named items merged by name),
and image tags. Anything else in a kustomization.yaml is refused, so that a new feature cannot be silently
ignored; test_kubernetes.py checks that this renders what kubectl does, whenever kubectl is installed.
"""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]
KNOWN = {
    "apiVersion",
    "kind",
    "namespace",
    "labels",
    "resources",
    "patches",
    "images",
    "generatorOptions",
    "secretGenerator",
    "configMapGenerator",
}
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterIssuer",
    "ClusterRole",
    "ClusterRoleBinding",
    "CertificateRequestPolicy",
    "Bundle",
}


def render(directory: Path) -> list[Obj]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    if unknown := set(kustomization) - KNOWN:
        raise NotImplementedError(f"{directory}/kustomization.yaml uses {sorted(unknown)}: teach tests/kustomize.py")
    generates = "secretGenerator" in kustomization or "configMapGenerator" in kustomization
    if generates and kustomization.get("generatorOptions") != {"disableNameSuffixHash": True}:
        raise NotImplementedError(f"{directory}: generated names with a hash suffix")
    own: list[Obj] = []
    inherited: list[Obj] = []
    for resource in kustomization.get("resources", []):
        path = directory / resource
        if path.is_dir():
            inherited += render(path)
        else:
            own += [o for o in yaml.safe_load_all(path.read_text()) if o]
    for kind, key in (("Secret", "secretGenerator"), ("ConfigMap", "configMapGenerator")):
        own += [_generated(kind, generator, directory) for generator in kustomization.get(key, [])]
    for o in own:
        if (namespace := kustomization.get("namespace")) and o["kind"] not in CLUSTER_SCOPED:
            o["metadata"]["namespace"] = namespace
        for labels in kustomization.get("labels", []):
            o["metadata"]["labels"] = {**o["metadata"].get("labels", {}), **labels["pairs"]}
    objects = inherited + own
    for patch in kustomization.get("patches", []):
        body = yaml.safe_load((directory / patch["path"]).read_text())
        for o in objects:
            if o["kind"] == patch["target"]["kind"]:
                o["spec"] = _merge(o["spec"], body["spec"])
    for image in kustomization.get("images", []):
        for o in objects:
            for container in o.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                if container.get("image") == image["name"]:
                    container["image"] = f"{image['newName']}:{image['newTag']}"
    return [_sorted(o) for o in objects]


def _sorted(value: Any) -> Any:
    """Maps with their keys in order, as kubectl writes them."""
    if isinstance(value, dict):
        return {key: _sorted(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [_sorted(item) for item in value]
    return value


def _generated(kind: str, generator: Obj, directory: Path) -> Obj:
    data = {}
    for entry in generator["files"]:
        key, _, path = entry.rpartition("=") if "=" in entry else (Path(entry).name, "", entry)
        content = (directory / path).read_bytes()
        data[key] = base64.b64encode(content).decode() if kind == "Secret" else content.decode()
    metadata = {"name": generator["name"], "namespace": generator["namespace"]}
    return {"apiVersion": "v1", "kind": kind, "metadata": metadata, "data": data} | (
        {"type": generator["type"]} if "type" in generator else {}
    )


def _merge(base: Any, patch: Any) -> Any:
    """Strategic merge as the Kubernetes types we patch define it: maps merge, lists of named items merge by
    name (in kubectl's order), any other list is replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        return {**base, **{key: _merge(base.get(key), value) for key, value in patch.items()}}
    if isinstance(base, list) and isinstance(patch, list) and all(isinstance(i, dict) and "name" in i for i in patch):
        # The patch's items first (merged with the base's of the same name), then the base's other items.
        patched = {item["name"] for item in patch}
        ours = {item["name"]: item for item in base}
        return [_merge(ours.get(i["name"]), i) for i in patch] + [i for i in base if i["name"] not in patched]
    return copy.deepcopy(patch)
