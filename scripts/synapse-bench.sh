#!/usr/bin/env bash
# Runs a real, local Synapse on loopback and points the room benchmark at it, so that
# Lattice's numbers in docs/benchmarks.md can be compared with Synapse's on the same machine.
#
# Usage:
#   scripts/synapse-bench.sh [--quick]        start Synapse, run examples/room_bench against it,
#                                             stop Synapse and remove its data
#   SYNAPSE_ONLY=1 scripts/synapse-bench.sh   start Synapse and leave it running (prints how to stop it)
#
# Environment:
#   SYNAPSE_VENV     virtualenv for Synapse, reused between runs (default ~/.cache/lattice-synapse-venv)
#   SYNAPSE_VERSION  matrix-synapse version installed from PyPI (default: the pinned one below)
#   SYNAPSE_PORT     loopback port of Synapse's one HTTP listener (default 18448)
#   PYTHON           interpreter used to create the virtualenv (default python3; Synapse needs >= 3.10)
#   CARGO_TARGET_DIR defaults to ~/.cache/lattice-target, as in scripts/bench.sh
#
# Synapse runs with SQLite (its docs call that fit for testing only; Postgres is what production
# uses), a single process (no workers), presence off and every rate limit raised out of reach.
set -euo pipefail
cd "$(dirname "$0")/.."

SYNAPSE_VERSION="${SYNAPSE_VERSION:-1.163.2}"
SYNAPSE_VENV="${SYNAPSE_VENV:-$HOME/.cache/lattice-synapse-venv}"
SYNAPSE_PORT="${SYNAPSE_PORT:-18448}"
PYTHON="${PYTHON:-python3}"
URL="http://127.0.0.1:$SYNAPSE_PORT"

# --- 1. Synapse in a virtualenv outside the repository, installed once and then reused. ---------
source scripts/synapse-venv.sh
synapse_venv
installed="$("$VPY" -c 'import synapse; print(synapse.__version__)')"

# --- 5. What ran where, for pasting into docs/benchmarks.md. -------------------------------------
echo "Synapse $installed (matrix-synapse from PyPI, SQLite, one process, Python $("$VPY" -c 'import platform; print(platform.python_version())'))"
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"

# Refuse to start next to something already on the port (e.g. a Synapse left by SYNAPSE_ONLY=1).
if curl -s -o /dev/null --max-time 2 "$URL/"; then
  echo "something already answers on $URL; stop it or set SYNAPSE_PORT" >&2
  exit 1
fi

# --- 2. A fresh directory with a generated config, patched for the benchmark. --------------------
DIR="$(mktemp -d "${TMPDIR:-/tmp}/lattice-synapse.XXXXXX")"
PID=""
cleanup() {
  if [ -n "$PID" ] && kill -0 "$PID" 2>/dev/null; then
    kill -TERM "$PID" 2>/dev/null || true
    # Wait up to 20 s for a clean shutdown, then force it.
    for _ in $(seq 1 200); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
  fi
  rm -rf "$DIR"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --generate-config writes homeserver.yaml with fresh secrets (macaroon, form, registration
# shared secret), a log config and a signing key; everything else is set below.
"$VPY" -m synapse.app.homeserver --generate-config --server-name synapse.localhost --report-stats=no \
  --config-path "$DIR/homeserver.yaml" --config-directory "$DIR" --data-directory "$DIR/data" >/dev/null

"$VPY" - "$DIR" "$SYNAPSE_PORT" <<'PY'
import os, sys, yaml

d, port = sys.argv[1], int(sys.argv[2])
path = f"{d}/homeserver.yaml"
with open(path) as f:
    cfg = yaml.safe_load(f)

# Out of reach of any benchmark: a million actions a second, a million in a burst.
OFF = {"per_second": 1_000_000, "burst_count": 1_000_000}

cfg.update({
    "server_name": "synapse.localhost",
    "public_baseurl": f"http://127.0.0.1:{port}/",
    "pid_file": f"{d}/homeserver.pid",
    # One plain-HTTP listener on loopback, client API only (no federation).
    "listeners": [{
        "port": port,
        "bind_addresses": ["127.0.0.1"],
        "type": "http",
        "tls": False,
        "x_forwarded": False,
        "resources": [{"names": ["client"], "compress": False}],
    }],
    "database": {"name": "sqlite3", "args": {"database": f"{d}/data/homeserver.db"}},
    "media_store_path": f"{d}/data/media_store",
    "signing_key_path": f"{d}/synapse.localhost.signing.key",
    "log_config": f"{d}/log.yaml",
    "report_stats": False,
    "enable_metrics": False,
    # Nothing to fetch from other servers.
    "trusted_key_servers": [],
    "suppress_key_server_warning": True,
    # Open registration: the UIA flow is a single m.login.dummy stage.
    "enable_registration": True,
    "enable_registration_without_verification": True,
    "presence": {"enabled": False},
    # The benchmarks register thousands of users; password hashing is not what they measure
    # (the Lattice side runs with a cheap argon2 setting for the same reason).
    "bcrypt_rounds": 4,
    # Every rate limit of Synapse 1.16x (synapse/config/ratelimiting.py).
    "rc_message": OFF,
    "rc_registration": OFF,
    "rc_registration_token_validity": OFF,
    "rc_login": {"address": OFF, "account": OFF, "failed_attempts": OFF},
    "rc_joins": {"local": OFF, "remote": OFF},
    "rc_joins_per_room": OFF,
    "rc_invites": {"per_room": OFF, "per_user": OFF, "per_issuer": OFF},
    "rc_third_party_invite": OFF,
    "rc_3pid_validation": OFF,
    "rc_admin_redaction": OFF,
    "rc_room_creation": OFF,
    "rc_presence": {"per_user": OFF},
    "rc_key_requests": OFF,
    "rc_media_create": OFF,
    "rc_delayed_event_mgmt": OFF,
    "rc_reports": OFF,
    "rc_user_directory": OFF,
    "rc_profile": OFF,
    "rc_federation": {"window_size": 1000, "sleep_limit": 1_000_000, "sleep_delay": 0,
                      "reject_limit": 1_000_000, "concurrent": 1_000_000},
    "federation_rr_transactions_per_room_per_second": 1_000_000,
    "remote_media_download_per_second": "1G",
    "remote_media_download_burst_count": "100G",
})
with open(path, "w") as f:
    yaml.safe_dump(cfg, f, sort_keys=False)

# Logging at WARNING into one file in the directory.
log = {
    "version": 1,
    "formatters": {"precise": {"format": "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(request)s - %(message)s"}},
    "handlers": {"file": {"class": "logging.FileHandler", "formatter": "precise",
                          "filename": f"{d}/homeserver.log", "encoding": "utf8"}},
    "loggers": {"synapse.storage.SQL": {"level": "WARNING"}},
    "root": {"level": "WARNING", "handlers": ["file"]},
    "disable_existing_loggers": False,
}
with open(f"{d}/log.yaml", "w") as f:
    yaml.safe_dump(log, f, sort_keys=False)
os.remove(f"{d}/synapse.localhost.log.config")  # generated, replaced by log.yaml
PY

# --- 3. Start Synapse and wait until it answers. --------------------------------------------------
"$VPY" -m synapse.app.homeserver -c "$DIR/homeserver.yaml" >"$DIR/stdout.log" 2>&1 </dev/null &
PID=$!
start=$(date +%s.%N)
deadline=$(( $(date +%s) + 60 ))
until curl -sf -o /dev/null --max-time 2 "$URL/_matrix/client/versions"; do
  if ! kill -0 "$PID" 2>/dev/null || [ "$(date +%s)" -ge "$deadline" ]; then
    if kill -0 "$PID" 2>/dev/null; then echo "Synapse did not answer on $URL within 60 s" >&2
    else echo "Synapse exited before answering on $URL" >&2; fi
    echo "--- $DIR/stdout.log (tail) ---" >&2; tail -n 30 "$DIR/stdout.log" >&2 || true
    echo "--- $DIR/homeserver.log (tail) ---" >&2; tail -n 30 "$DIR/homeserver.log" >&2 || true
    exit 1
  fi
  sleep 0.1
done
startup_s=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN {print b - a}')
sleep 2 # let start-up background work settle before reading the idle RSS
idle_rss_kib=$(awk '/^VmRSS/ {print $2}' "/proc/$PID/status")
printf 'Synapse up at %s, PID %s, start-up to first answer %.1f s, idle RSS %.1f MiB\n' \
  "$URL" "$PID" "$startup_s" "$(awk -v k="$idle_rss_kib" 'BEGIN {print k / 1024}')"

# --- 4. The room benchmark against it, or leave it running. --------------------------------------
if [ "${SYNAPSE_ONLY:-0}" = "1" ]; then
  trap - EXIT INT TERM
  echo "SYNAPSE_ONLY=1: leaving Synapse running."
  echo "  URL:  $URL   (server_name synapse.localhost, open registration with m.login.dummy)"
  echo "  PID:  $PID"
  echo "  data: $DIR   (logs: $DIR/homeserver.log, $DIR/stdout.log)"
  echo "  stop: kill $PID && while kill -0 $PID 2>/dev/null; do sleep 0.2; done && rm -rf $DIR"
  exit 0
fi

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/lattice-target}"
cargo run --release --example room_bench -- --url "$URL" --pid "$PID" "$@"
