#!/usr/bin/env bash
# Benchmarks of the real `lattice` binary on loopback: start-up time, idle RSS, and
# whoami / login throughput under wrk. Prints a Markdown block for docs/benchmarks.md.
# Usage: scripts/bench.sh            (DURATION=10s CONNECTIONS=64 THREADS=2 to tune)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/lattice-target}"
DURATION="${DURATION:-10s}"
CONNECTIONS="${CONNECTIONS:-64}"
THREADS="${THREADS:-2}"
PORT="${PORT:-18008}"

command -v wrk >/dev/null || { [ "$(id -u)" -eq 0 ] && apt-get install -y -qq wrk >/dev/null || sudo apt-get install -y -qq wrk; }
# Every target, as `make run` builds: the binary alone would resolve other host features and
# compile RocksDB a second time.
cargo build --release --workspace --all-targets --quiet
BIN="$CARGO_TARGET_DIR/release/lattice"
DATA="$(mktemp -d)"
LOG="$DATA/server.log"
trap 'kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null; rm -rf "$DATA"' EXIT
export LATTICE_DATA_DIR="$DATA" LATTICE_LISTEN__ADDRESS="127.0.0.1:$PORT" LATTICE_RATE_LIMITS__ENABLED=false
export LATTICE_LOGGING__LEVEL=warn
URL="http://127.0.0.1:$PORT"

wait_serving() {
  for _ in $(seq 1 400); do
    curl -sf "$URL/_matrix/client/versions" >/dev/null && return 0
    sleep 0.005
  done
  echo "server did not start" >&2; exit 1
}

# First start: creates the data dir and prints a registration token.
"$BIN" serve >"$DATA/stdout" 2>"$LOG" & PID=$!
wait_serving
TOKEN=$(sed -n 's/^First start: registration token (shown only now): //p' "$DATA/stdout")
kill -TERM "$PID"; wait "$PID" || true

# Start-up on an existing data dir, to the first answered request.
start=$(date +%s.%N)
"$BIN" serve >/dev/null 2>>"$LOG" & PID=$!
wait_serving
startup_ms=$(echo "($(date +%s.%N) - $start) * 1000" | bc)

sleep 2
idle_rss_kib=$(awk '/VmRSS/ {print $2}' "/proc/$PID/status")

# One account; register with the first-start token through the UIA flow.
session=$(curl -s -XPOST "$URL/_matrix/client/v3/register" -d '{"username":"bench","password":"bench-password"}' | sed -n 's/.*"session":"\([^"]*\)".*/\1/p')
ACCESS=$(curl -s -XPOST "$URL/_matrix/client/v3/register" \
  -d "{\"username\":\"bench\",\"password\":\"bench-password\",\"auth\":{\"type\":\"m.login.registration_token\",\"token\":\"$TOKEN\",\"session\":\"$session\"}}" \
  | sed -n 's/.*"access_token":"\([^"]*\)".*/\1/p')
[ -n "$ACCESS" ] || { echo "registration failed" >&2; exit 1; }

whoami=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -H "Authorization: Bearer $ACCESS" "$URL/_matrix/client/v3/account/whoami")
loaded_rss_kib=$(awk '/VmRSS/ {print $2}' "/proc/$PID/status")

cat >"$DATA/login.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"type":"m.login.password","identifier":{"type":"m.id.user","user":"bench"},"password":"bench-password"}'
wrk.headers["Content-Type"] = "application/json"
LUA
login=$(wrk -t"$THREADS" -c8 -d"$DURATION" --latency -s "$DATA/login.lua" "$URL/_matrix/client/v3/login")

# Messages into one room through the client API: one user, unique transaction IDs per request.
ROOM=$(curl -s -XPOST "$URL/_matrix/client/v3/createRoom" -H "Authorization: Bearer $ACCESS" -d '{"name":"bench"}' \
  | sed -n 's/.*"room_id":"\([^"]*\)".*/\1/p')
cat >"$DATA/send.lua" <<LUA
counter = 0
request = function()
  counter = counter + 1
  local path = "/_matrix/client/v3/rooms/$ROOM/send/m.room.message/" .. wrk.thread:get("id") .. "-" .. counter
  return wrk.format("PUT", path, { ["Authorization"] = "Bearer $ACCESS", ["Content-Type"] = "application/json" },
    '{"msgtype":"m.text","body":"benchmark message"}')
end
setup = function(thread) thread:set("id", math.random(1, 1000000000)) end
LUA
send=$(wrk -t"$THREADS" -c10 -d"$DURATION" --latency -s "$DATA/send.lua" "$URL")

rps() { echo "$1" | awk '/Requests\/sec/ {print $2}'; }
pct() { echo "$1" | awk -v p="$2" '$1 == p {print $2}'; }
non2xx() { echo "$1" | awk '/Non-2xx/ {print $NF}'; }

echo "### $(date -u +%Y-%m-%d) on $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(lscpu | sed -n 's/^Model name: *//p')"
echo
echo "| measure | value |"
echo "|---|---|"
echo "| start-up to first answered request (existing data dir) | ${startup_ms%.*} ms |"
echo "| idle RSS | $((idle_rss_kib / 1024)) MiB |"
echo "| whoami, $CONNECTIONS connections, $DURATION | $(rps "$whoami") req/s (p50 $(pct "$whoami" 50%), p99 $(pct "$whoami" 99%)) |"
echo "| RSS after the whoami load | $((loaded_rss_kib / 1024)) MiB |"
echo "| login (argon2id 19 MiB × 2 passes), 8 connections, $DURATION | $(rps "$login") req/s (p50 $(pct "$login" 50%), p99 $(pct "$login" 99%)) |"
echo "| messages sent into one room (PUT /send), 10 connections, $DURATION | $(rps "$send") msg/s (p50 $(pct "$send" 50%), p99 $(pct "$send" 99%)) |"
if [ -n "$(non2xx "$whoami")$(non2xx "$login")$(non2xx "$send")" ]; then
  echo; echo "non-2xx responses: whoami $(non2xx "$whoami"), login $(non2xx "$login"), send $(non2xx "$send")"
fi
