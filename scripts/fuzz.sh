#!/usr/bin/env bash
# Runs Ferry's fuzz targets (fuzz/tests/targets.rs) for a set time each, on
# the stable toolchain (bolero's random engine), in release mode.
#
#   scripts/fuzz.sh [TARGET|all] [DURATION]      e.g. scripts/fuzz.sh all 10m
#
# TARGET is one of: spec_documents spec_bytes cel_expressions rest_requests
# grpc_messages checkpoint_state nats_payloads exchange_messages config_files
# (default: all).
# DURATION is per target: 30s, 10m, 1h (default 1m). A failure prints the
# input and a BOLERO_RANDOM_SEED that replays it; add the input as a
# regression test next to the code it broke.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGETS=(spec_documents spec_bytes cel_expressions rest_requests grpc_messages checkpoint_state nats_payloads exchange_messages config_files)
which="${1:-all}"
duration="${2:-1m}"

to_ms() {
  local d="$1" n="${1%[smh]}"
  case "$d" in
    *s) echo $((n * 1000)) ;;
    *m) echo $((n * 60 * 1000)) ;;
    *h) echo $((n * 3600 * 1000)) ;;
    *) echo "error: DURATION must look like 30s, 10m or 1h, not '$d'" >&2; exit 2 ;;
  esac
}
ms="$(to_ms "$duration")"

if [[ "$which" == all ]]; then
  run=("${TARGETS[@]}")
else
  if [[ ! " ${TARGETS[*]} " == *" $which "* ]]; then
    echo "error: unknown target '$which'; targets: ${TARGETS[*]}" >&2
    exit 2
  fi
  run=("$which")
fi

echo "==> building the fuzz targets (release)"
cargo test --release -p ferry-fuzz --test targets --no-run -q

status=0
for t in "${run[@]}"; do
  echo "==> $t for $duration ($(date -u +%FT%TZ))"
  start=$(date +%s)
  log="$(mktemp)"
  if BOLERO_RANDOM_TEST_TIME_MS="$ms" cargo test --release -q -p ferry-fuzz --test targets "$t" -- --exact --nocapture >"$log" 2>&1; then
    grep -E "fuzz target" "$log" | sed 's/^/    /'
  else
    cat "$log"
    echo "    $t FAILED (above: the input and the seed that replays it)"
    status=1
  fi
  rm -f "$log"
  echo "    took $(( $(date +%s) - start )) s"
done
exit "$status"
