#!/usr/bin/env bash
# Coverage-guided fuzzing of request decoding and validation: the libFuzzer
# target in fuzz/ for N seconds (default 30).
#
#     bash .ci/fuzz.sh          # 30 s, as CI runs it
#     bash .ci/fuzz.sh 600      # longer, by hand
#
# Built like cargo-fuzz builds it, with one difference: only the code under
# test is instrumented (.ci/fuzz-instrument), so the dependencies are the
# ones the tests already compiled instead of a second, instrumented build of
# all of them (which took about 10 minutes of CI). The corpus starts from
# the committed seeds every run; a crash writes its input under
# fuzz/artifacts/ and fails.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-30}"
RUSTC_WORKSPACE_WRAPPER="$PWD/.ci/fuzz-instrument" \
  cargo build -p customer-mapping-fuzz --bin decode_and_validate
mkdir -p fuzz/corpus/decode_and_validate fuzz/artifacts/decode_and_validate target
target/debug/decode_and_validate \
  -artifact_prefix=fuzz/artifacts/decode_and_validate/ -max_total_time="$seconds" \
  fuzz/corpus/decode_and_validate fuzz/seeds/decode_and_validate \
  > target/fuzz.log 2>&1 || { tail -n 40 target/fuzz.log; exit 1; }
grep -E "^Done [0-9]+ runs" target/fuzz.log
