#!/usr/bin/env bash
# Offline checks of the Kubernetes manifests in deploy/kubernetes:
#  1. schema validation with kubernetes-validate (bundled schemas, no cluster,
#     no network beyond the PyPI install), strict: unknown fields fail;
#  2. .ci/check_manifest_probes.py: what no schema sees (ports, probes,
#     listen addresses, Service, Job, Secret and ConfigMap files, hardening)
#     agrees.
# The server against the manifests (their probes answered, SIGTERM within
# the grace period, which must hold the drain) is the
# Rust test tests/api/deployment.rs, run by `cargo test`.
# Usage: .ci/check-manifests.sh   (MANIFEST_DIR=dir checks another copy)
set -euo pipefail
cd "$(dirname "$0")/.."

# Pinned so that the bundled schemas (and so the verdict) can't change under us.
KUBERNETES_VALIDATE_VERSION=1.37.0
# The Kubernetes API the manifests are validated against (override to check
# another; kubernetes-validate $KUBERNETES_VALIDATE_VERSION ships 1.25 to 1.37).
KUBERNETES_VERSION=${KUBERNETES_VERSION:-1.34.0}
manifest_dir=${MANIFEST_DIR:-deploy/kubernetes}

fail() { echo "check-manifests: FAIL: $*" >&2; exit 1; }

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check \
  "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"

# Every manifest but kustomization.yaml (a kustomize file, not a Kubernetes object).
manifests=()
for f in "$manifest_dir"/*.yaml "$manifest_dir"/*.yml; do
  [ -e "$f" ] || continue
  [ "$(basename "$f")" = kustomization.yaml ] && continue
  manifests+=("$f")
done
[ ${#manifests[@]} -gt 0 ] || fail "no manifests in $manifest_dir"

echo "==> kubernetes-validate $KUBERNETES_VALIDATE_VERSION --strict, Kubernetes $KUBERNETES_VERSION"
if ! out=$(.venv/bin/kubernetes-validate --strict -k "$KUBERNETES_VERSION" "${manifests[@]}" 2>&1); then
  echo "$out"; fail "schema validation failed"
fi
echo "$out"
# kubernetes-validate only warns (exit 0) on a kind/apiVersion it has no schema
# for, e.g. a typo in either: that is a failure here.
if grep -q '^WARN' <<<"$out"; then fail "a resource could not be validated (see WARN above)"; fi
for f in "${manifests[@]}"; do
  grep -qF "$f passed" <<<"$out" || fail "$f: no resource validated"
done

echo "==> consistency of the manifests"
.venv/bin/python .ci/check_manifest_probes.py --manifests "$manifest_dir"
