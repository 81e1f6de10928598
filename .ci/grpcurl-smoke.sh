#!/usr/bin/env bash
# Runs the README's grpcurl session against the built server (SQLite in a
# temporary directory) and checks each answer. Usage: grpcurl-smoke.sh GRPCURL BINARY
set -euo pipefail
grpcurl=$1
binary=$(realpath "$2")
repo=$(cd "$(dirname "$0")/.." && pwd)

workdir=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
addr="127.0.0.1:$port"
(cd "$workdir" && exec "$binary" --listen-addr "$addr" >"$workdir/server.log" 2>&1) &
server=$!
trap 'kill $server 2>/dev/null || true; wait $server 2>/dev/null || true; rm -rf "$workdir"' EXIT

call() { # call METHOD JSON
  "$grpcurl" -plaintext -import-path "$repo/proto" \
    -proto customermapping/v1/customer_mapping.proto -proto google/rpc/error_details.proto \
    -d "$2" "$addr" "customermapping.v1.CustomerMapping/$1" 2>&1 || true # errors are checked by content
}
expect() { # expect OUTPUT PATTERN...
  local out=$1; shift
  for pattern in "$@"; do
    if ! grep -qF -- "$pattern" <<<"$out"; then
      echo "grpcurl smoke: expected '$pattern' in:"; echo "$out"; echo "server log:"; cat "$workdir/server.log"; exit 1
    fi
  done
}

# Wait (bounded) until the server answers.
for _ in $(seq 1 100); do
  if out=$(call Get '{"user_id":"probe"}') && grep -q NotFound <<<"$out"; then break; fi
  kill -0 $server 2>/dev/null || { echo "server exited:"; cat "$workdir/server.log"; exit 1; }
  sleep 0.1
done

out=$(call Link '{"user_id":"user-42","stripe_customer_id":"cus_NffrFeUfNV2Hib"}')
expect "$out" '"userId": "user-42"' '"stripeCustomerId": "cus_NffrFeUfNV2Hib"' '"created": true'
out=$(call Link '{"user_id":"user-42","stripe_customer_id":"cus_NffrFeUfNV2Hib"}')
expect "$out" '"userId": "user-42"'
if grep -q '"created"' <<<"$out"; then echo "repeat Link must report created=false: $out"; exit 1; fi
out=$(call Get '{"stripe_customer_id":"cus_NffrFeUfNV2Hib"}')
expect "$out" '"userId": "user-42"'
out=$(call Link '{"user_id":"user-42","stripe_customer_id":"cus_OtherCustomer1"}')
expect "$out" 'Code: AlreadyExists' '"reason":"USER_ALREADY_LINKED"' '"domain":"customermapping.v1"' \
  '"metadata":{"stripeCustomerId":"cus_NffrFeUfNV2Hib","userId":"user-42"}'
out=$(call Link '{"user_id":"user 42","stripe_customer_id":"cus_"}')
expect "$out" 'Code: InvalidArgument' '"field":"user_id"' '"field":"stripe_customer_id"'
out=$(call Unlink '{"user_id":"user-42"}')
expect "$out" '"stripeCustomerId": "cus_NffrFeUfNV2Hib"'
out=$(call Get '{"user_id":"user-42"}')
expect "$out" 'Code: NotFound' '"reason":"MAPPING_NOT_FOUND"'
echo "grpcurl smoke: 7 calls answered as documented"
