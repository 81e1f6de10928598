#!/usr/bin/env bash
# Lints the wire contract in proto/ with buf and checks it for breaking changes
# against the previous commit. Usage: bash .ci/buf.sh
#
# buf comes from the npm package @bufbuild/buf pinned in .ci/buf/package-lock.json
# (installed with `npm ci`); at run time it needs no network (buf.yaml has no deps).
#
# The breaking-change baseline is, in order:
#   - $BUF_AGAINST_REF when set (any commit-ish, e.g. origin/main);
#   - else the merge-base with the upstream branch, when HEAD is not on it;
#   - else HEAD~1 (CI checks out main itself, so this is the last commit).
# The working tree is compared, so uncommitted proto changes are checked too.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

echo "buf: npm ci in .ci/buf"
(cd .ci/buf && npm ci --silent --no-audit --no-fund)
buf=$repo/.ci/buf/node_modules/.bin/buf
"$buf" --version

echo "buf: lint"
"$buf" lint
echo "buf: lint OK"

# --- breaking --------------------------------------------------------------
if [ "$(git rev-parse --is-shallow-repository)" = true ]; then
  echo "buf: this clone is shallow; fetch the history (git fetch --unshallow) to check breaking changes" >&2
  exit 1
fi

against=${BUF_AGAINST_REF:-}
if [ -z "$against" ]; then
  upstream=$(git rev-parse --abbrev-ref --symbolic-full-name '@{upstream}' 2>/dev/null || true)
  if [ -n "$upstream" ]; then
    base=$(git merge-base HEAD "$upstream" 2>/dev/null || true)
    if [ -n "$base" ] && [ "$base" != "$(git rev-parse HEAD)" ]; then
      against=$base
    fi
  fi
fi
if [ -z "$against" ]; then
  if ! git rev-parse --verify --quiet 'HEAD~1^{commit}' >/dev/null; then
    echo "buf: breaking SKIPPED: HEAD is the first commit, there is no previous contract"
    exit 0
  fi
  against=HEAD~1
fi
against_sha=$(git rev-parse --verify "$against^{commit}")
label="$against ($(git rev-parse --short "$against_sha"))"

if ! git cat-file -e "$against_sha:proto" 2>/dev/null; then
  echo "buf: breaking SKIPPED: $label has no proto/ directory, there is no previous contract"
  exit 0
fi

# Extract the previous contract into a temporary directory. When that commit
# had no buf.yaml (it predates buf), judge it with today's buf.yaml, which
# sets the module root proto/ and excludes the vendored proto/google.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
paths=(proto)
if git cat-file -e "$against_sha:buf.yaml" 2>/dev/null; then paths+=(buf.yaml); fi
git archive --format=tar "$against_sha" -- "${paths[@]}" | tar -x -C "$tmp"
if [ ! -f "$tmp/buf.yaml" ]; then
  cp buf.yaml "$tmp/buf.yaml"
  echo "buf: $label has no buf.yaml; using the current one for it"
fi

echo "buf: breaking against $label"
"$buf" breaking --against "$tmp"
echo "buf: breaking OK against $label"
