#!/usr/bin/env bash
# Element Web's SDK against Lattice: matrix-js-sdk (tests/js, pinned in its package-lock.json)
# logs in, starts its client the way Element Web does, syncs, and checks what Element shows —
# unread and highlight counts for a mention, the timeline, members, typing, receipts, profiles,
# redactions, tags and account data. See tests/js/startup.mjs for the checks.
#
# Usage: tests/interop/js_sdk.sh
#
# Environment:
#   LATTICE_BIN   the lattice binary (default $CARGO_TARGET_DIR/release/lattice; build it first
#                 with `cargo build --release --workspace --all-targets`)
#   SDK_LOG       the SDK's log level (default silent; e.g. debug)
#   KEEP=1        keep the server's data directory and log
#
# Node.js >= 22 and the packages come from scripts/js-sdk-env.sh (as in scripts/setup.sh): the
# system's node when new enough, otherwise one from the npm registry under ~/.cache.
set -euo pipefail
cd "$(dirname "$0")/../.."

CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/lattice-target}"
LATTICE_BIN="${LATTICE_BIN:-$CARGO_TARGET_DIR/release/lattice}"
LAT_IP=127.0.0.4
LAT_PORT=18460

[ -x "$LATTICE_BIN" ] || { echo "no lattice binary at $LATTICE_BIN (set LATTICE_BIN or build it)" >&2; exit 1; }

source scripts/js-sdk-env.sh
js_sdk_node
js_sdk_packages

DIR="$(mktemp -d "${TMPDIR:-/tmp}/lattice-js-sdk.XXXXXX")"
LAT_PID=""
cleanup() {
  if [ -n "$LAT_PID" ] && kill -0 "$LAT_PID" 2>/dev/null; then
    kill -TERM "$LAT_PID" 2>/dev/null || true
    for _ in $(seq 1 200); do kill -0 "$LAT_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$LAT_PID" 2>/dev/null || true
    wait "$LAT_PID" 2>/dev/null || true
  fi
  if [ "${KEEP:-0}" = 1 ]; then echo "kept $DIR" >&2; else rm -rf "$DIR"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Registration needs a token (the default mode): alice is made by the operator's command, bob
# registers through the client API with a one-use token, as a new Element user would.
export LATTICE_SERVER_NAME="$LAT_IP:$LAT_PORT"
export LATTICE_DATA_DIR="$DIR/data"
export LATTICE_LISTEN__ADDRESS="$LAT_IP:$LAT_PORT"
export LATTICE_REGISTRATION__MODE=token
export LATTICE_RATE_LIMITS__ENABLED=false
# ruma's state resolution logs every auth check at info; the log tail shown on failure stays readable.
export LATTICE_LOGGING__LEVEL="${LATTICE_LOGGING__LEVEL:-info,ruma_state_res=warn}"
ALICE_PASSWORD="alice's long password for the sdk check"
echo "$ALICE_PASSWORD" | "$LATTICE_BIN" user create alice --password-stdin >/dev/null
REGISTRATION_TOKEN="$("$LATTICE_BIN" registration-token create --uses 1 | tail -n 1)"
"$LATTICE_BIN" serve >"$DIR/lattice.out" 2>&1 &
LAT_PID=$!

for _ in $(seq 1 300); do
  curl -s -o /dev/null --max-time 2 "http://$LAT_IP:$LAT_PORT/_matrix/client/versions" && break
  kill -0 "$LAT_PID" 2>/dev/null || { echo "lattice exited:" >&2; tail -n 30 "$DIR/lattice.out" >&2; exit 1; }
  sleep 0.1
done

status=0
LATTICE_URL="http://$LAT_IP:$LAT_PORT" ALICE_PASSWORD="$ALICE_PASSWORD" REGISTRATION_TOKEN="$REGISTRATION_TOKEN" \
  node tests/js/startup.mjs || status=$?
if [ "$status" -ne 0 ]; then
  echo "matrix-js-sdk start-up check failed (exit $status); the server's log ends:" >&2
  tail -n 40 "$DIR/lattice.out" >&2
fi
exit "$status"
