#!/usr/bin/env bash
# Builds the release `ferry` binary with the versions pinned in Cargo.lock.
# This is the one build step of the container image (deploy/docker/Dockerfile)
# and CI runs it too (scripts/test.sh), so what CI builds is what ships.
# The binary lands in ${CARGO_TARGET_DIR:-target}/release/ferry.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo build --release --locked -p ferry --bin ferry "$@"
