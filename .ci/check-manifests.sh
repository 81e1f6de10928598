#!/usr/bin/env bash
# Offline checks of the Kubernetes manifests: deploy/kubernetes/base and the
# overlays that apply it (overlays/production, overlays/local). Each overlay:
#  1. rendered by .ci/render_manifests.py: with `kubectl kustomize` where
#     kubectl (with kustomize v5) is installed, and always with the script's
#     own small resolver; the two must agree. (No registry we reach ships
#     kustomize v5; without kubectl the resolver alone renders, saying so);
#  2. every object of a Kubernetes API group: kubernetes-validate (bundled
#     schemas, no cluster, no network beyond the PyPI install), strict:
#     unknown fields fail;
#  3. the objects of CRDs that kubernetes-validate has no schema for
#     (cert-manager's Certificate and Issuer, the Prometheus Operator's
#     ServiceMonitor): validated by render_manifests.py against JSON schemas
#     generated from the published CRDs (cert-manager v1.17.1,
#     prometheus-operator v0.80.1, from the PyPI packages
#     cloudcoil.models.*), made strict the same way; the CRDs' CEL rules are
#     not checked;
#  4. .ci/check_manifest_probes.py: what no schema sees (ports, probes,
#     listen addresses, Services, init container, PodDisruptionBudget,
#     NetworkPolicy, ServiceMonitor, Certificate, Secret and ConfigMap
#     files, hardening) agrees, and every kustomization lists its files.
# The server against the manifests (the init container's migrate, run by
# several pods at once; the probes answered, SIGTERM within the grace
# period, which must hold the drain) is the Rust test tests/api/deployment.rs,
# run by `cargo test`.
# Usage: .ci/check-manifests.sh   (MANIFEST_DIR=dir checks another copy)
set -euo pipefail
cd "$(dirname "$0")/.."

# Pinned so that the bundled schemas (and so the verdict) can't change under us.
KUBERNETES_VALIDATE_VERSION=1.37.0
# The Kubernetes API the manifests are validated against (override to check
# another; kubernetes-validate $KUBERNETES_VALIDATE_VERSION ships 1.25 to 1.37).
KUBERNETES_VERSION=${KUBERNETES_VERSION:-1.34.0}
manifest_dir=${MANIFEST_DIR:-deploy/kubernetes}
overlays=(production local)
out_root=target/tmp/manifests

fail() { echo "check-manifests: FAIL: $*" >&2; exit 1; }

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check \
  "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" \
  "cloudcoil.models.cert_manager==1.17.1.0" \
  "cloudcoil.models.prometheus_operator==0.80.1.0"

for overlay in "${overlays[@]}"; do
  dir=$manifest_dir/overlays/$overlay
  out=$out_root/$overlay
  [ -f "$dir/kustomization.yaml" ] || fail "no overlay at $dir"

  echo "==> $dir: render, CRD objects against their CRDs' schemas"
  .venv/bin/python .ci/render_manifests.py "$dir" --out "$out"

  echo "==> $dir: kubernetes-validate $KUBERNETES_VALIDATE_VERSION --strict, Kubernetes $KUBERNETES_VERSION"
  manifests=("$out"/core/*.yaml)
  [ -e "${manifests[0]}" ] || fail "$dir renders no Kubernetes object"
  if ! result=$(.venv/bin/kubernetes-validate --strict -k "$KUBERNETES_VERSION" "${manifests[@]}" 2>&1); then
    echo "$result"; fail "$dir: schema validation failed"
  fi
  echo "$result"
  # kubernetes-validate only warns (exit 0) on a kind/apiVersion it has no
  # schema for, e.g. a typo in either: that is a failure here.
  if grep -q '^WARN' <<<"$result"; then fail "$dir: a resource could not be validated (see WARN above)"; fi
  for f in "${manifests[@]}"; do
    grep -qF "$f passed" <<<"$result" || fail "$f: no resource validated"
  done

  echo "==> $dir: consistency of the manifests"
  .venv/bin/python .ci/check_manifest_probes.py --rendered "$out/rendered.yaml" --tree "$manifest_dir"
done
echo "check-manifests: ${#overlays[@]} overlays passed (${overlays[*]})"
