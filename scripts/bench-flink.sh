#!/usr/bin/env bash
# Runs the job of `ferry bench throughput` on Apache Flink, for comparison:
# a keyed tumbling count (N events, 10,000 integer keys, event time +1 ms per
# event, 100 ms out-of-orderness, 1-minute tumbling count per key, blackhole
# sink) at parallelism 1, with and without checkpoints every 1 s, and reports
# events per CPU-second of the Flink JVM (events/s per core).
#
# Flink comes from PyPI (`apache-flink`, which ships the Flink runtime jars)
# into its own venv, .venv-flink (override with FLINK_VENV), reused when it
# already has the pinned version. Needs Java 11+ (java on PATH or JAVA_HOME).
# Flink runs in local mode: a MiniCluster inside the JVM that PyFlink starts.
# The job is pure Table API/SQL (no Python per record); see
# scripts/bench-flink/flink_keyed_count.py for the exact job and settings.
#
#   scripts/bench-flink.sh                      # 30M events, median of 3
#   scripts/bench-flink.sh --events 2000000 --repeat 1
#   scripts/bench-flink.sh --json
#   scripts/bench-flink.sh --help               # all options
set -euo pipefail
cd "$(dirname "$0")/.."

FLINK_VERSION="${FLINK_VERSION:-2.3.0}"
VENV="${FLINK_VENV:-$PWD/.venv-flink}"
PY="${FLINK_PYTHON:-python3}"

say() { echo "==> $*" >&2; }

if ! command -v java >/dev/null 2>&1 && [ -z "${JAVA_HOME:-}" ]; then
  echo "error: java not found (Flink needs Java 11 or 17); install e.g. openjdk-17-jre-headless" >&2
  exit 1
fi

installed_version() {
  [ -x "$VENV/bin/python" ] || return 0
  "$VENV/bin/python" - <<'EOF' 2>/dev/null || true
import importlib.metadata as m
print(m.version("apache-flink"))
EOF
}

have="$(installed_version)"
if [ "$have" != "$FLINK_VERSION" ]; then
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV ($("$PY" --version 2>&1))"
    "$PY" -m venv "$VENV"
  fi
  say "installing apache-flink==$FLINK_VERSION into $VENV (about 850 MB with its dependencies; takes a minute or two)"
  "$VENV/bin/pip" install --disable-pip-version-check --progress-bar off --quiet \
    "apache-flink==$FLINK_VERSION" >&2
  have="$(installed_version)"
  if [ "$have" != "$FLINK_VERSION" ]; then
    echo "error: apache-flink==$FLINK_VERSION did not install into $VENV (found '${have:-nothing}')" >&2
    exit 1
  fi
  say "installed apache-flink $have"
else
  say "reusing $VENV (apache-flink $have)"
fi

say "running the Flink job ($*)"
exec "$VENV/bin/python" "$PWD/scripts/bench-flink/flink_keyed_count.py" "$@"
