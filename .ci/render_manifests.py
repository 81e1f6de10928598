#!/usr/bin/env python3
"""Renders a kustomize overlay of deploy/kubernetes and checks what only a
rendering shows; used by .ci/check-manifests.sh.

1. Renders the overlay twice when it can: with the resolver below (base
   resources, `namespace`, `replicas`, `images`, and `patches` that are JSON
   6902 operations or strategic-merge `$patch: delete`: what these overlays
   use, nothing more) and with `kubectl kustomize` (kustomize v5) where
   kubectl is installed; the two must give the same objects. Where kubectl is
   missing (no registry we reach ships kustomize v5: Debian's
   kubernetes-client is kubectl 1.20, with kustomize v2, which predates
   `patches`), the resolver alone renders, and this says so.
2. Writes the rendered objects to OUT/rendered.yaml, and every object of a
   Kubernetes API group to OUT/core/, one file each, for kubernetes-validate.
3. Validates the objects of the CRDs (cert-manager's Certificate, Issuer,
   ClusterIssuer; the Prometheus Operator's ServiceMonitor), which
   kubernetes-validate has no schema for: against JSON schemas generated from
   the published CRDs of cert-manager v1.17.1 and prometheus-operator v0.80.1
   (the PyPI packages cloudcoil.models.cert_manager and
   cloudcoil.models.prometheus_operator, pydantic models generated from those
   CRDs), made strict the way kubernetes-validate's strict schemas are: an
   unknown field fails. Types, enums and required fields are checked; the
   CRDs' CEL rules (x-kubernetes-validations) are not.

Usage: render_manifests.py OVERLAY_DIR --out DIR; exits 1 naming every problem.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import yaml

problems: list[str] = []

# Kinds kustomize's namespace transformer leaves alone (cluster-scoped).
CLUSTER_SCOPED = {"Namespace", "ClusterIssuer", "ClusterRole", "ClusterRoleBinding",
                  "CustomResourceDefinition", "PersistentVolume", "StorageClass", "PriorityClass"}


def load_yaml_docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def key(obj: dict) -> tuple[str, str, str, str]:
    md = obj.get("metadata", {})
    return (obj.get("apiVersion", ""), obj.get("kind", ""), md.get("namespace", ""), md.get("name", ""))


# --- The resolver -------------------------------------------------------------

def json_pointer(path: str) -> list[str]:
    return [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]


def json6902(obj: dict, ops: list[dict], where: str) -> None:
    for op in ops:
        *parents, last = json_pointer(op["path"])
        node = obj
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        idx = int(last) if isinstance(node, list) and last != "-" else last
        kind = op["op"]
        if kind == "test":
            if node[idx] != op["value"]:
                raise SystemExit(f"render: FAIL: {where}: test {op['path']} == {op['value']!r} failed")
        elif kind in ("replace", "add"):
            if isinstance(node, list) and kind == "add":
                node.insert(len(node) if idx == "-" else idx, op["value"])
            else:
                node[idx] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del node[idx]
        else:
            raise SystemExit(f"render: FAIL: {where}: JSON patch op {kind} is not supported here")


def matches(obj: dict, target: dict) -> bool:
    return all(
        (target.get(field) is None or target[field] == value)
        for field, value in (("kind", obj.get("kind")), ("name", obj["metadata"].get("name")))
    )


def resolve(d: Path) -> list[dict]:
    kz = yaml.safe_load((d / "kustomization.yaml").read_text())
    unsupported = set(kz) - {"apiVersion", "kind", "namespace", "resources", "replicas", "images", "patches"}
    if unsupported:
        raise SystemExit(f"render: FAIL: {d}: the resolver does not support {sorted(unsupported)}")
    objects: list[dict] = []
    for res in kz.get("resources", []):
        p = (d / res).resolve()
        objects += resolve(p) if p.is_dir() else load_yaml_docs(p.read_text())
    for patch in kz.get("patches", []):
        text = (d / patch["path"]).read_text() if "path" in patch else patch["patch"]
        doc = yaml.safe_load(text)
        target = patch.get("target", {})
        if isinstance(doc, list):
            hits = [o for o in objects if matches(o, target)]
            if len(hits) != 1:
                raise SystemExit(f"render: FAIL: {d}: patch {patch} matches {len(hits)} objects")
            json6902(hits[0], doc, f"{d}: {patch.get('path', 'inline patch')}")
        elif doc.get("$patch") == "delete":
            gone = {k: v for k, v in doc.items() if k != "$patch"}
            before = len(objects)
            objects = [o for o in objects if not (o["kind"] == gone["kind"]
                                                  and o["metadata"]["name"] == gone["metadata"]["name"])]
            if len(objects) != before - 1:
                raise SystemExit(f"render: FAIL: {d}: $patch: delete of {gone['kind']} removed {before - len(objects)}")
        else:
            raise SystemExit(f"render: FAIL: {d}: only JSON 6902 patches and $patch: delete are supported")
    for r in kz.get("replicas", []):
        for o in objects:
            if o["kind"] in ("Deployment", "StatefulSet", "ReplicaSet") and o["metadata"]["name"] == r["name"]:
                o["spec"]["replicas"] = r["count"]
    for img in kz.get("images", []):
        for o in objects:
            pod = o.get("spec", {}).get("template", {}).get("spec", {})
            for c in pod.get("containers", []) + pod.get("initContainers", []):
                name = re.split(r"[:@]", c["image"], maxsplit=1)[0]
                if name == img["name"]:
                    c["image"] = img.get("newName", name) + (
                        "@" + img["digest"] if "digest" in img else ":" + str(img.get("newTag", "latest")))
    if "namespace" in kz:
        for o in objects:
            if o["kind"] not in CLUSTER_SCOPED:
                o["metadata"]["namespace"] = kz["namespace"]
    return objects


def kubectl_kustomize(d: Path) -> list[dict] | None:
    """kubectl's rendering, or None (saying why) where kubectl has no kustomize v5."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        print("render: kubectl not installed: rendered by the resolver alone")
        return None
    try:
        version = json.loads(subprocess.run([kubectl, "version", "--client", "-o", "json"], check=True,
                                            capture_output=True, text=True, timeout=60).stdout)
    except (subprocess.SubprocessError, ValueError) as e:
        print(f"render: kubectl version failed ({e}): rendered by the resolver alone")
        return None
    kv = version.get("kustomizeVersion", "")
    if not re.match(r"v[5-9]\.", kv):
        print(f"render: kubectl's kustomize is {kv or 'absent'}, not v5: rendered by the resolver alone")
        return None
    out = subprocess.run([kubectl, "kustomize", str(d)], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise SystemExit(f"render: FAIL: kubectl kustomize {d}: {out.stderr.strip()}")
    print(f"render: kubectl kustomize ({kv}) and the resolver")
    return load_yaml_docs(out.stdout)


# --- The CRDs' schemas ----------------------------------------------------------

def strict(node):
    """additionalProperties: false wherever properties are listed and nothing
    else is said, as in kubernetes-validate's strict schemas."""
    if isinstance(node, dict):
        if "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for v in node.values():
            strict(v)
    elif isinstance(node, list):
        for v in node:
            strict(v)
    return node


def crd_schemas() -> dict[tuple[str, str], tuple[str, dict]]:
    from cloudcoil.models.cert_manager import v1 as cert_manager
    from cloudcoil.models.prometheus_operator import v1 as prometheus_operator

    models = {
        ("cert-manager.io/v1", "Certificate"): ("cert-manager v1.17.1", cert_manager.Certificate),
        ("cert-manager.io/v1", "Issuer"): ("cert-manager v1.17.1", cert_manager.Issuer),
        ("cert-manager.io/v1", "ClusterIssuer"): ("cert-manager v1.17.1", cert_manager.ClusterIssuer),
        ("monitoring.coreos.com/v1", "ServiceMonitor"): ("prometheus-operator v0.80.1",
                                                         prometheus_operator.ServiceMonitor),
    }
    return {k: (src, strict(m.model_json_schema(by_alias=True))) for k, (src, m) in models.items()}


def is_core(api_version: str) -> bool:
    group = api_version.rpartition("/")[0]
    return group == "" or "." not in group or group.endswith(".k8s.io")


def describe(err: jsonschema.ValidationError) -> str:
    err = jsonschema.exceptions.best_match([err])
    while err.context:
        err = jsonschema.exceptions.best_match(err.context)
    return f"{'/'.join(str(p) for p in err.absolute_path) or '(root)'}: {err.message}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("overlay")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    d, out = Path(args.overlay), Path(args.out)

    ours = resolve(d)
    theirs = kubectl_kustomize(d)
    if theirs is not None:
        a, b = {key(o): o for o in ours}, {key(o): o for o in theirs}
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                problems.append(f"{d}: {k} rendered by {'kubectl' if k in b else 'the resolver'} only")
            elif a[k] != b[k]:
                problems.append(f"{d}: {k} differs between kubectl kustomize and the resolver")
        rendered = theirs
    else:
        rendered = ours

    if out.exists():
        shutil.rmtree(out)
    (out / "core").mkdir(parents=True)
    (out / "rendered.yaml").write_text(yaml.safe_dump_all(rendered, sort_keys=False))
    schemas = crd_schemas()
    for i, o in enumerate(rendered):
        name = f"{i:02d}-{o['kind'].lower()}-{o['metadata']['name']}.yaml"
        if is_core(o["apiVersion"]):
            (out / "core" / name).write_text(yaml.safe_dump(o, sort_keys=False))
            continue
        schema = schemas.get((o["apiVersion"], o["kind"]))
        if schema is None:
            problems.append(f"{d}: no schema for {o['apiVersion']} {o['kind']} {o['metadata']['name']}")
            continue
        source, schema = schema
        errors = list(jsonschema.Draft202012Validator(schema).iter_errors(o))
        for e in errors:
            problems.append(f"{d}: {o['kind']} {o['metadata']['name']}: {describe(e)}")
        if not errors:
            print(f"INFO {d}: {o['kind'].lower()}/{o['metadata']['name']} passed against the {source} CRD schema (strict)")

    for p in problems:
        print(f"render: FAIL: {p}", file=sys.stderr)
    if problems:
        sys.exit(1)
    print(f"render: {d}: {len(rendered)} objects -> {out}/rendered.yaml")


if __name__ == "__main__":
    main()
