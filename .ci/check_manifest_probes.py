#!/usr/bin/env python3
"""Static consistency of a rendered overlay of deploy/kubernetes: what a
schema cannot see.

Ports, listen addresses, probes and the Services agree; liveness does not
follow database health; the database URL, the TLS files and the policy are
files of Secret/ConfigMap volumes mounted as directories (rotations reach the
pod) and readable by the non-root user; the init container migrates with the
server's image and database Secret, and the server does not; the grace period
holds the drain; the headless Service, the PodDisruptionBudget, the
NetworkPolicy, the ServiceMonitor and the Certificate select or name what
they must; with --tree, every kustomization lists every manifest beside it.
What the server does with all this (the probes answered, SIGTERM, the policy
loaded, replicas' init containers migrating together) is
tests/api/deployment.rs, against the binary.

Usage: check_manifest_probes.py --rendered FILE [--tree DIR]; exits 1 naming
every problem.
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


def load(rendered: Path) -> dict[str, list[dict]]:
    by_kind: dict[str, list[dict]] = {}
    for doc in yaml.safe_load_all(rendered.read_text()):
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


def check_pod(where: str, spec: dict, c: dict, by_kind: dict) -> tuple[dict, dict, dict[str, tuple[str, str]]]:
    """The container, its literal env, and for each path-valued env var its
    (Secret or ConfigMap name, key); checks mounts and hardening."""
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


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_tree(root: Path) -> None:
    """Every kustomization lists every manifest beside it (as a resource or a patch)."""
    for kz_path in sorted(root.rglob("kustomization.yaml")):
        kz = yaml.safe_load(kz_path.read_text())
        listed = set(kz.get("resources", [])) | {p["path"] for p in kz.get("patches", []) if "path" in p}
        present = {p.name for p in kz_path.parent.glob("*.y*ml")} - {"kustomization.yaml"}
        check(present <= listed, f"{kz_path}: does not list {sorted(present - listed)}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rendered", required=True, help="an overlay rendered by .ci/render_manifests.py")
    ap.add_argument("--tree", help="deploy/kubernetes: check that the kustomizations list every file")
    args = ap.parse_args()
    by_kind = load(Path(args.rendered))
    if args.tree:
        check_tree(Path(args.tree))
    dep = only(by_kind.get("Deployment", []), "Deployment")
    pod = dep["spec"]["template"]
    spec = pod["spec"]
    c = only(spec["containers"], "container in the Deployment")
    init = only(spec.get("initContainers", []), "init container in the Deployment")
    c, env, files = check_pod("Deployment", spec, c, by_kind)
    ic, _, init_files = check_pod("init container", spec, init, by_kind)
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", []) if "name" in p}
    labels = pod["metadata"].get("labels", {})
    namespace = dep["metadata"].get("namespace")

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

    # Migrations: the init container, never the server.
    check(env.get("MIGRATE_ON_START") == "false",
          "Deployment: MIGRATE_ON_START must be \"false\" (the init container migrates)")
    check(ic.get("args") == ["migrate"] and ic.get("image") == c.get("image"),
          "init container: args [migrate], the server's image")
    check(init_files.get("DATABASE_URL_FILE") == files.get("DATABASE_URL_FILE"),
          "init container and server: one database Secret")
    check("Job" not in by_kind, "a Job: migrations run in the init container (a Job's template is immutable)")

    # The Services: the ClusterIP one (gRPC and metrics) and the headless one (gRPC).
    services = by_kind.get("Service", [])
    headless = [s for s in services if s["spec"].get("clusterIP") == "None"]
    cluster_ip = [s for s in services if s["spec"].get("clusterIP") != "None"]
    check(len(headless) == 1 and len(cluster_ip) == 1, "one ClusterIP and one headless Service")
    for svc in services:
        name = svc["metadata"]["name"]
        check(selects(svc["spec"].get("selector", {}), labels), f"Service {name} selects no pod")
        for sp in svc["spec"].get("ports", []):
            target = sp.get("targetPort", sp["port"])
            check(ports.get(target, target) == ports.get(sp.get("name")), f"Service {name} port {sp.get('name')}: wrong target")
        check(any(sp.get("appProtocol") == "grpc" for sp in svc["spec"]["ports"]), f"Service {name}: appProtocol: grpc")
        check(all(sp.get("name") != "health" for sp in svc["spec"]["ports"]), f"Service {name} exposes the health port")
    for svc in headless:
        check(all(sp.get("name") == "grpc" for sp in svc["spec"]["ports"]),
              "the headless Service: the gRPC port only (no metrics: scraped once, through the other)")

    # PodDisruptionBudget: selects the pods, lets a drain through one at a time.
    pdb = only(by_kind.get("PodDisruptionBudget", []), "PodDisruptionBudget")
    check(selects(pdb["spec"].get("selector", {}).get("matchLabels", {}), labels), "the PodDisruptionBudget selects no pod")
    check(pdb["spec"].get("maxUnavailable") == 1, "PodDisruptionBudget: maxUnavailable: 1 (holds for any replica count)")

    # NetworkPolicy: the pods, both directions, the three ports and nothing else.
    np = only(by_kind.get("NetworkPolicy", []), "NetworkPolicy")
    nps = np["spec"]
    check(selects(nps.get("podSelector", {}).get("matchLabels", {}), labels), "the NetworkPolicy selects no pod")
    check(sorted(nps.get("policyTypes", [])) == ["Egress", "Ingress"], "NetworkPolicy: policyTypes Ingress and Egress")
    by_port: dict = {}
    for rule in nps.get("ingress", []):
        for p in rule.get("ports", []):
            port = p["port"] if isinstance(p["port"], str) else next((n for n, v in ports.items() if v == p["port"]), p["port"])
            by_port[port] = rule.get("from")
    check(set(by_port) == {"grpc", "health", "metrics"}, f"NetworkPolicy ingress: the gRPC, health and metrics ports only, not {sorted(map(str, by_port))}")
    check(bool(by_port.get("grpc")), "NetworkPolicy: the gRPC port from the callers only (a `from`)")
    check(by_port.get("health", "x") is None, "NetworkPolicy: the health port from any source (the kubelet's probes come from the node)")
    check(bool(by_port.get("metrics")) and all("namespaceSelector" in f for f in by_port.get("metrics") or []),
          "NetworkPolicy: the metrics port from the monitoring namespace")
    egress_ports = sorted((p.get("protocol", "TCP"), p["port"]) for r in nps.get("egress", []) for p in r.get("ports", []))
    check(egress_ports == [("TCP", 53), ("TCP", 5432), ("UDP", 53)], f"NetworkPolicy egress: DNS and PostgreSQL only, not {egress_ports}")
    check(all(r.get("ports") for r in nps.get("egress", [])), "NetworkPolicy: an egress rule without ports allows every port")

    # ServiceMonitor (absent from overlays/local): exactly one Service's metrics port.
    for sm in by_kind.get("ServiceMonitor", []):
        sel = sm["spec"].get("selector", {}).get("matchLabels", {})
        scraped = [s for s in services if selects(sel, s["metadata"].get("labels", {}))
                   and any(sp.get("name") == "metrics" for sp in s["spec"]["ports"])]
        check(len(scraped) == 1, f"ServiceMonitor: selects {len(scraped)} Services with a metrics port, not 1")
        check([e.get("port") for e in sm["spec"].get("endpoints", [])] == ["metrics"], "ServiceMonitor: the metrics port")

    # The server's Certificate: the TLS Secret, the Services' names, its Issuer.
    tls_secret = next(iter(tls))
    certs = [x for x in by_kind.get("Certificate", []) if x["spec"].get("secretName") == tls_secret]
    cert = only(certs, f"Certificate writing the Secret {tls_secret}")
    names = set(cert["spec"].get("dnsNames", []))
    for svc in services:
        for dns in (f"{svc['metadata']['name']}.{namespace}.svc", f"{svc['metadata']['name']}.{namespace}.svc.cluster.local"):
            check(dns in names, f"Certificate {cert['metadata']['name']}: no dnsName {dns}")
    check("server auth" in cert["spec"].get("usages", []), "Certificate: usages server auth")
    ref = cert["spec"].get("issuerRef", {})
    if ref.get("kind", "Issuer") == "Issuer":
        check(any(i["metadata"]["name"] == ref.get("name") for i in by_kind.get("Issuer", [])),
              f"Certificate: its Issuer {ref.get('name')} is not in this overlay")

    grace = spec.get("terminationGracePeriodSeconds", 30)
    check(grace >= 30, "terminationGracePeriodSeconds below 30 s (SHUTDOWN_DRAIN_TIMEOUT's bound assumes 30)")

    for p in problems:
        print(f"check-manifests: FAIL: {args.rendered}: {p}", file=sys.stderr)
    if problems:
        sys.exit(1)
    print(f"check-manifests: {args.rendered}: manifests agree (gRPC {ports['grpc']} mutual TLS, health {ports['health']} "
          f"plaintext for the probes, metrics {ports['metrics']}; {dep['spec'].get('replicas')} replicas, "
          f"migrations in the init container)")


if __name__ == "__main__":
    main()
