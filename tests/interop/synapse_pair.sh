# Sourced by tests/interop/synapse_keys.sh and scripts/synapse-backfill-bench.sh: starts a real
# Synapse (PyPI, in a virtualenv outside the repository) and Lattice federating with each other
# on loopback, and waits until both answer. Both stop, and their directory is removed, when the
# sourcing script exits (KEEP=1 keeps the directory).
#
# Environment:
#   LATTICE_BIN      the lattice binary (default $CARGO_TARGET_DIR/release/lattice; build it first
#                    with `cargo build --release --workspace --all-targets`)
#   SYNAPSE_VENV     virtualenv for Synapse, reused between runs (default ~/.cache/lattice-synapse-venv)
#   SYNAPSE_VERSION  matrix-synapse version installed from PyPI
#   PYTHON           interpreter used to create the virtualenv (default python3; Synapse needs >= 3.10)
#
# Sets: LAT_NAME, SYN_NAME (server names), LAT_IP, LAT_CLIENT_PORT, SYN_IP, SYN_PORT, DIR,
# VPY (the virtualenv's python), LAT_PID, SYN_PID; creates the Lattice user carol (password
# "correct horse battery"). Synapse registration is open (m.login.dummy). With SECOND_SYNAPSE=1
# a second Synapse runs too (SYN2_NAME on 127.0.0.4:18452, directory $DIR/syn2, SYN2_PID).
#
# Both servers are named by IP literal and port (127.0.0.2:18449 and 127.0.0.3:18450), so no
# DNS, .well-known or /etc/hosts entry is involved. Lattice verifies Synapse's certificate
# (trusted_ca); Synapse runs with federation_verify_certificates off (test network only).
SYNAPSE_VERSION="${SYNAPSE_VERSION:-1.163.2}"
SYNAPSE_VENV="${SYNAPSE_VENV:-$HOME/.cache/lattice-synapse-venv}"
PYTHON="${PYTHON:-python3}"
CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/lattice-target}"
LATTICE_BIN="${LATTICE_BIN:-$CARGO_TARGET_DIR/release/lattice}"
LAT_IP=127.0.0.2
LAT_PORT=18449
LAT_CLIENT_PORT=18451
SYN_IP=127.0.0.3
SYN_PORT=18450
LAT_NAME="$LAT_IP:$LAT_PORT"
SYN_NAME="$SYN_IP:$SYN_PORT"
SYN2_IP=127.0.0.4
SYN2_PORT=18452
SYN2_NAME="$SYN2_IP:$SYN2_PORT"

[ -x "$LATTICE_BIN" ] || { echo "no lattice binary at $LATTICE_BIN (set LATTICE_BIN or build it)" >&2; exit 1; }

# --- Synapse in a virtualenv outside the repository, installed once and then reused. ------------
source scripts/synapse-venv.sh
synapse_venv

DIR="$(mktemp -d "${TMPDIR:-/tmp}/lattice-interop.XXXXXX")"
SYN_PID=""
SYN2_PID=""
LAT_PID=""
stop() {
  local pid="$1"
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  fi
}
cleanup() {
  stop "$SYN_PID"
  stop "$SYN2_PID"
  stop "$LAT_PID"
  if [ "${KEEP:-0}" = 1 ]; then echo "kept $DIR" >&2; else rm -rf "$DIR"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- Lattice's certificate (IP address in the subjectAltName). ----------------------------------
"$LATTICE_BIN" tls self-signed --name "$LAT_IP" --out "$DIR/lat-tls" >/dev/null

# --- A Synapse named NAME on IP:PORT in directory D, with one TLS listener for the client and
# federation resources and its certificate in D/syn-tls; started in the background ($! its pid).
start_synapse() {
  local name="$1" ip="$2" port="$3" d="$4"
  mkdir -p "$d"
  "$LATTICE_BIN" tls self-signed --name "$ip" --out "$d/syn-tls" >/dev/null
  "$VPY" -m synapse.app.homeserver --generate-config --server-name "$name" --report-stats=no \
    --config-path "$d/homeserver.yaml" --config-directory "$d" --data-directory "$d/syn-data" >/dev/null
  "$VPY" - "$d" "$ip" "$port" "$name" <<'PY'
import sys, yaml
d, ip, port, name = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
path = f"{d}/homeserver.yaml"
with open(path) as f:
    cfg = yaml.safe_load(f)
OFF = {"per_second": 1_000_000, "burst_count": 1_000_000}
cfg.update({
    "server_name": name,
    "public_baseurl": f"https://{name}/",
    "pid_file": f"{d}/homeserver.pid",
    "listeners": [{
        "port": port, "bind_addresses": [ip], "type": "http", "tls": True, "x_forwarded": False,
        "resources": [{"names": ["client", "federation"], "compress": False}],
    }],
    "tls_certificate_path": f"{d}/syn-tls/cert.pem",
    "tls_private_key_path": f"{d}/syn-tls/key.pem",
    "database": {"name": "sqlite3", "args": {"database": f"{d}/syn-data/homeserver.db"}},
    "media_store_path": f"{d}/syn-data/media_store",
    "log_config": f"{d}/log.yaml",
    "report_stats": False,
    "trusted_key_servers": [],
    "suppress_key_server_warning": True,
    "enable_registration": True,
    "enable_registration_without_verification": True,
    "presence": {"enabled": False},
    # Loopback peers with self-signed certificates: a test network only.
    "federation_verify_certificates": False,
    # Outbound requests to loopback are blocked by default; IP-literal server names are
    # checked against the block list alone (Synapse 1.163 still reads these names).
    "ip_range_blacklist": [],
    "ip_range_whitelist": ["127.0.0.0/8"],
    "rc_registration": OFF,
    "rc_login": {"address": OFF, "account": OFF, "failed_attempts": OFF},
    "rc_message": OFF,
    # Inbound federation requests are not throttled either (the backfill benchmark pages
    # through Synapse as fast as Lattice asks).
    "rc_federation": {"window_size": 1000, "sleep_limit": 1_000_000, "sleep_delay": 0,
                      "reject_limit": 1_000_000, "concurrent": 1_000_000},
    "rc_joins": {"local": OFF, "remote": OFF},
    "rc_joins_per_room": OFF,
})
with open(path, "w") as f:
    yaml.safe_dump(cfg, f)
PY
  # In its directory: the generated log configuration writes homeserver.log to the working directory.
  (cd "$d" && exec "$VPY" -m synapse.app.homeserver --config-path "$d/homeserver.yaml") >"$d/synapse.out" 2>&1 &
}
start_synapse "$SYN_NAME" "$SYN_IP" "$SYN_PORT" "$DIR"
SYN_PID=$!
# A second Synapse for Synapse-to-Synapse figures (scripts/synapse-federation-bench.sh).
if [ "${SECOND_SYNAPSE:-0}" = 1 ]; then
  start_synapse "$SYN2_NAME" "$SYN2_IP" "$SYN2_PORT" "$DIR/syn2"
  SYN2_PID=$!
fi

# --- Lattice: federation on, Synapse's certificate trusted, no DNS. ------------------------------
export LATTICE_SERVER_NAME="$LAT_NAME"
export LATTICE_DATA_DIR="$DIR/lat-data"
export LATTICE_LISTEN__ADDRESS="$LAT_IP:$LAT_CLIENT_PORT"
export LATTICE_REGISTRATION__MODE=open
export LATTICE_RATE_LIMITS__ENABLED=false
export LATTICE_FEDERATION__LISTEN="$LAT_IP:$LAT_PORT"
export LATTICE_FEDERATION__TLS_CERT="$DIR/lat-tls/cert.pem"
export LATTICE_FEDERATION__TLS_KEY="$DIR/lat-tls/key.pem"
export LATTICE_FEDERATION__TRUSTED_CA="$DIR/syn-tls/cert.pem"
export LATTICE_FEDERATION__DNS=false
# The peers are IP-literal server names on loopback, which the outbound address policy denies
# unless allowed (resolve pins would be trusted, IP literals are another server's word).
export LATTICE_FEDERATION__IP_RANGE_ALLOW='["127.0.0.0/8"]'
echo "correct horse battery" | "$LATTICE_BIN" user create carol --password-stdin >/dev/null
"$LATTICE_BIN" serve >"$DIR/lattice.out" 2>&1 &
LAT_PID=$!

# What a benchmark on these servers prints first: the machine, the time and load, both versions.
pair_bench_header() {
  echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), load: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "Synapse $("$VPY" -c 'import synapse; print(synapse.__version__)'), Lattice $(git rev-parse --short HEAD)"
}

wait_for() {
  for _ in $(seq 1 300); do
    if curl -sk -o /dev/null --max-time 2 "$1"; then return 0; fi
    sleep 0.1
  done
  echo "nothing answers on $1" >&2
  tail -n 30 "$DIR/synapse.out" "$DIR/lattice.out" >&2
  exit 1
}
wait_for "https://$SYN_NAME/_matrix/key/v2/server"
wait_for "https://$LAT_NAME/_matrix/key/v2/server"
if [ -n "$SYN2_PID" ]; then wait_for "https://$SYN2_NAME/_matrix/key/v2/server"; fi
