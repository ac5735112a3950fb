#!/usr/bin/env bash
# Joining a big room side by side (issue #11): a room made on Synapse with M members and S other
# state events (`m.bench.state`), joined over federation by a user of a second Synapse and by a
# user of Lattice (tests/interop/synapse_pair.sh with SECOND_SYNAPSE=1, all on loopback). For
# each joiner: how long its server takes to answer the client's `/join`, then until the room's
# `/joined_members` on its server answers with every member (a server that joins with partial
# state answers `/join` before it holds the room's whole state). Lattice joining a room of
# another Lattice is in federation_bench (section 5).
#
# Usage: scripts/synapse-join-bench.sh [M] [S]   (defaults 1000 and 10000)
set -euo pipefail
cd "$(dirname "$0")/.."
M="${1:-1000}"
S="${2:-10000}"
SECOND_SYNAPSE=1
source tests/interop/synapse_pair.sh

pair_bench_header

"$VPY" - "$M" "$S" "$LAT_IP:$LAT_CLIENT_PORT" "$SYN_NAME" "$SYN2_NAME" <<'PY'
import sys, time, urllib.parse
from concurrent.futures import ThreadPoolExecutor

members, states, lat_client, syn_name, syn2_name = int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:6]
LAT = f"http://{lat_client}/_matrix/client/v3"
SYN = f"https://{syn_name}/_matrix/client/v3"
SYN2 = f"https://{syn2_name}/_matrix/client/v3"
sys.path.insert(0, "scripts")
from synapse_pair_client import call, login_carol, register_on_synapse

owner = register_on_synapse(SYN, "owner")
room = call("POST", f"{SYN}/createRoom", owner, {"preset": "public_chat"})["room_id"]
quoted = urllib.parse.quote(room)
started = time.monotonic()

def put_state(n):
    answer = call("PUT", f"{SYN}/rooms/{quoted}/state/m.bench.state/{n}", owner, {"n": n})
    if "event_id" not in answer:
        raise RuntimeError(f"state event {n}: {answer}")

def add_member(n):
    token = register_on_synapse(SYN, f"member{n}")
    answer = call("POST", f"{SYN}/join/{quoted}", token, {})
    if answer.get("room_id") != room:
        raise RuntimeError(f"member {n}: {answer}")

# State events one at a time: concurrent ones fork the room, and Synapse then resolves its
# whole state for each (4.7 events/s with 16 at a time here, against 10,000 state entries).
for n in range(states):
    put_state(n)
    if (n + 1) % 1000 == 0:
        print(f"{n + 1} state events after {time.monotonic() - started:.0f} s", flush=True)
with ThreadPoolExecutor(16) as pool:
    list(pool.map(add_member, range(1, members)))
made = time.monotonic() - started
print(f"room made on Synapse in {made:.1f} s: {members} members, {states} other state events", flush=True)

def joined_count(base, token):
    answer = call("GET", f"{base}/rooms/{quoted}/joined_members", token)
    return len(answer.get("joined", {}))

rows = []
for who, base, token, query in [
    ("a user of a second Synapse", SYN2, register_on_synapse(SYN2, "erin"), {"server_name": syn_name}),
    ("a user of Lattice", LAT, login_carol(LAT), {"via": syn_name}),
]:
    sent = time.monotonic()
    answer = call("POST", f"{base}/join/{quoted}?{urllib.parse.urlencode(query)}", token, {})
    joined = time.monotonic() - sent
    if answer.get("room_id") != room:
        raise RuntimeError(f"{who} could not join: {answer}")
    # Every member, the joiner included.
    while joined_count(base, token) < members + 1:
        if time.monotonic() - sent > 1800:
            raise RuntimeError(f"{who}: the members never all showed")
        time.sleep(0.05)
    complete = time.monotonic() - sent
    rows.append((who, joined, complete))
    print(f"{who}: /join answered in {joined * 1000:.0f} ms, every member listed after {complete * 1000:.0f} ms", flush=True)

print()
print(f"| joiner of a Synapse room with {members} members and {states} other state events | `/join` answered | every member in `/joined_members` |")
print("|---|---|---|")
for who, joined, complete in rows:
    print(f"| {who} | {joined * 1000:.0f} ms | {complete * 1000:.0f} ms |")
PY
