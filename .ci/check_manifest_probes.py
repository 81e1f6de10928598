#!/usr/bin/env python3
"""Static consistency of deploy/kubernetes: what a schema cannot see.

Ports, listen addresses, probes and the Service agree; liveness does not
follow database health; the database URL, the TLS files and the policy are
files of Secret/ConfigMap volumes mounted as directories (rotations reach the
pod) and readable by the non-root user; the Job migrates with the same image
and the replicas don't; the grace period holds the drain; the kustomization
lists every manifest. What the server does with all this (the probes answered,
SIGTERM, the policy loaded) is tests/api/deployment.rs, against the binary.

Usage: check_manifest_probes.py [--manifests DIR]; exits 1 naming every problem.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path, PurePosixPath

import yaml

problems: list[str] = []


def check(ok: bool, msg: str) -> None:
    if not ok:
        problems.append(msg)


def load(d: Path) -> dict[str, list[dict]]:
    by_kind: dict[str, list[dict]] = {}
    for path in sorted(d.glob("*.y*ml")):
        if path.name != "kustomization.yaml":
            for doc in yaml.safe_load_all(path.read_text()):
                if doc:
                    by_kind.setdefault(doc["kind"], []).append(doc)
    return by_kind


def only(items: list, what: str):
    if len(items) != 1:
        sys.exit(f"check-manifests: FAIL: expected exactly one {what}, found {len(items)}")
    return items[0]


def port_of(addr: str) -> int:
    m = re.fullmatch(r"(0\.0\.0\.0|\[::\]):(\d+)", addr)
    check(m is not None, f"{addr}: listen on 0.0.0.0:PORT (the kubelet and Service reach the pod IP)")
    return int(m.group(2)) if m else -1


def check_pod(where: str, spec: dict, by_kind: dict) -> tuple[dict, dict, dict[str, tuple[str, str]]]:
    """The container, its literal env, and for each path-valued env var its
    (Secret or ConfigMap name, key); checks mounts and hardening."""
    c = only(spec["containers"], f"container in {where}")
    env = {e["name"]: str(e["value"]) for e in c.get("env", []) if "value" in e}
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    psc, csc = spec.get("securityContext", {}), c.get("securityContext", {})
    check(csc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, f"{where}: runAsNonRoot")
    check(csc.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem")
    check(csc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation: false")
    check(spec.get("automountServiceAccountToken") is False, f"{where}: automountServiceAccountToken: false")
    files: dict[str, tuple[str, str]] = {}
    for m in c.get("volumeMounts", []):
        vol = volumes.get(m["name"], {})
        src = vol.get("secret") or vol.get("configMap")
        check(src is not None, f"{where}: mount {m['name']} is not a Secret or ConfigMap volume")
        check("subPath" not in m, f"{where}: mount {m['name']} uses subPath, which never sees updates")
        if src is None:
            continue
        mode = src.get("defaultMode", 0o644)
        check(bool(mode & 0o004 or (mode & 0o040 and "fsGroup" in psc)),
              f"{where}: volume {m['name']} mode {mode:#o} unreadable by the non-root user")
        name = src.get("secretName") or src.get("name")
        for var, path in env.items():
            p = PurePosixPath(path)
            if p.is_relative_to(m["mountPath"]) and p != PurePosixPath(m["mountPath"]):
                files[var] = (name, str(p.relative_to(m["mountPath"])))
                kind = "Secret" if "secretName" in src else "ConfigMap"
                obj = next((o for o in by_kind.get(kind, []) if o["metadata"]["name"] == name), None)
                if obj is not None:
                    keys = {**obj.get("data", {}), **obj.get("stringData", {})}
                    check(files[var][1] in keys, f"{where}: {var}: {kind} {name} has no key {files[var][1]}")
    for var in ("DATABASE_URL_FILE",):
        check(var in files, f"{where}: {var} is not a file of a mounted Secret")
    check("DATABASE_URL" not in {e["name"] for e in c.get("env", [])},
          f"{where}: DATABASE_URL is set: use DATABASE_URL_FILE only")
    return c, env, files


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--manifests", default=str(Path(__file__).resolve().parent.parent / "deploy/kubernetes"))
    ap.add_argument("binary", nargs="?", help="ignored (the live checks are a Rust test now)")
    d = Path(ap.parse_args().manifests)
    by_kind = load(d)
    dep, svc, job = (only(by_kind.get(k, []), k) for k in ("Deployment", "Service", "Job"))
    pod = dep["spec"]["template"]
    c, env, files = check_pod("Deployment", pod["spec"], by_kind)
    jc, _, job_files = check_pod("Job", job["spec"]["template"]["spec"], by_kind)
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", []) if "name" in p}

    for var, name in (("LISTEN_ADDR", "grpc"), ("HEALTH_LISTEN_ADDR", "health"), ("METRICS_ADDR", "metrics")):
        check(var in env and port_of(env[var]) == ports.get(name), f"{var} != container port {name}")
    for kind in ("readinessProbe", "startupProbe"):
        probe = c.get(kind, {}).get("grpc")
        check(probe is not None and probe.get("port") == ports.get("health"),
              f"{kind}: a gRPC probe of the plaintext health port {ports.get('health')} "
              f"(the kubelet has no client certificate for the gRPC port)")
    live = c.get("livenessProbe", {})
    check("grpc" not in live and "tcpSocket" in live,
          "livenessProbe: tcpSocket, not gRPC health (a database outage must not restart every pod)")
    check(env.get("ALLOW_INSECURE_PLAINTEXT", "false") == "false", "ALLOW_INSECURE_PLAINTEXT is set")
    tls = {files.get(v, ("", ""))[0] for v in ("TLS_CERT_FILE", "TLS_KEY_FILE", "TLS_CLIENT_CA_FILE")}
    check(len(tls) == 1 and "" not in tls, "TLS_CERT_FILE, TLS_KEY_FILE, TLS_CLIENT_CA_FILE: files of one Secret")
    check([files.get(v, ("", ""))[1] for v in ("TLS_CERT_FILE", "TLS_KEY_FILE", "TLS_CLIENT_CA_FILE")]
          == ["tls.crt", "tls.key", "ca.crt"], "TLS files: cert-manager's tls.crt, tls.key, ca.crt")
    check("POLICY_FILE" in files, "POLICY_FILE is not a file of the policy ConfigMap")

    selector = svc["spec"].get("selector", {})
    labels = pod["metadata"].get("labels", {})
    check(bool(selector) and all(labels.get(k) == v for k, v in selector.items()), "the Service selects no pod")
    job_labels = job["spec"]["template"].get("metadata", {}).get("labels", {})
    check(not all(job_labels.get(k) == v for k, v in selector.items()), "the Service selects the Job's pod")
    for sp in svc["spec"].get("ports", []):
        target = sp.get("targetPort", sp["port"])
        check(ports.get(target, target) == ports.get(sp.get("name")), f"Service port {sp.get('name')}: wrong target")
    check(any(sp.get("appProtocol") == "grpc" for sp in svc["spec"]["ports"]), "Service: appProtocol: grpc")

    check(env.get("MIGRATE_ON_START") == "false", "Deployment: MIGRATE_ON_START must be \"false\" (the Job migrates)")
    check(jc.get("args") == ["migrate"] and jc.get("image") == c.get("image"), "Job: args [migrate], same image")
    check(job_files.get("DATABASE_URL_FILE") == files.get("DATABASE_URL_FILE"), "Job and Deployment: one database Secret")
    for key in ("backoffLimit", "activeDeadlineSeconds"):
        check(key in job["spec"], f"Job: spec.{key} is not set")


    kz = d / "kustomization.yaml"
    present = {p.name for p in d.glob("*.y*ml")} - {"kustomization.yaml"}
    check(not kz.exists() or set(yaml.safe_load(kz.read_text())["resources"]) == present,
          "kustomization.yaml does not list every manifest")

    for p in problems:
        print(f"check-manifests: FAIL: {p}", file=sys.stderr)
    if problems:
        sys.exit(1)
    print(f"check-manifests: manifests agree (gRPC {ports['grpc']} mutual TLS, health {ports['health']} "
          f"plaintext for the probes, metrics {ports['metrics']})")


if __name__ == "__main__":
    main()
