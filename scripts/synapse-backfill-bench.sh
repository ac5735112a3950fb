#!/usr/bin/env bash
# Backfill side by side (issue #10, "ingest rate of backfilled remote events"): Synapse and
# Lattice federating on loopback (tests/interop/synapse_pair.sh). Each server's user writes N
# messages into a room of their own before the other server's user joins it; the joiner then
# pages back through all of them with /messages (limit 100), and every page past the joined
# server's local history is fetched with /backfill from the room's server, checked and stored.
# Prints how long each direction took until the N-th message was seen, and the rate.
#
# Usage: scripts/synapse-backfill-bench.sh [N]   (default 10000)
# Both directions include the other server's /backfill answers; the same client loop runs
# against both.
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-10000}"
source tests/interop/synapse_pair.sh

pair_bench_header

"$VPY" - "$N" "$LAT_IP:$LAT_CLIENT_PORT" "$LAT_NAME" "$SYN_NAME" <<'PY'
import sys, time, urllib.parse
from concurrent.futures import ThreadPoolExecutor

n, lat_client, lat_name, syn_name = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
LAT = f"http://{lat_client}/_matrix/client/v3"
SYN = f"https://{syn_name}/_matrix/client/v3"
sys.path.insert(0, "scripts")
from synapse_pair_client import call, login_carol, register_on_synapse

def fill(base, token, room, prefix):
    def send(i):
        answer = call("PUT", f"{base}/rooms/{room}/send/m.room.message/{prefix}{i}", token,
                      {"msgtype": "m.text", "body": f"{prefix}-{i}"})
        if "event_id" not in answer:
            raise RuntimeError(f"send failed: {answer}")
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(send, range(n)))

def page_back(base, token, room, prefix):
    """Pages back until every message is seen; returns (seconds, pages)."""
    seen, start, pages, token_from = set(), time.monotonic(), 0, None
    while len(seen) < n:
        query = {"dir": "b", "limit": "100"}
        if token_from:
            query["from"] = token_from
        page = call("GET", f"{base}/rooms/{room}/messages?{urllib.parse.urlencode(query)}", token)
        pages += 1
        for event in page.get("chunk", []):
            body = event.get("content", {}).get("body", "")
            if body.startswith(prefix + "-"):
                seen.add(body)
        token_from = page.get("end")
        if not token_from:
            break
    return time.monotonic() - start, pages, len(seen)

carol = login_carol(LAT)
dave = register_on_synapse(SYN, "dave")
results = []
for (writer_base, writer, reader_base, reader, prefix, alias, who) in [
    (SYN, dave, LAT, carol, "syn", f"bench-s:{syn_name}", "Lattice backfills from Synapse"),
    (LAT, carol, SYN, dave, "lat", f"bench-l:{lat_name}", "Synapse backfills from Lattice"),
]:
    room = call("POST", f"{writer_base}/createRoom", writer,
                {"preset": "public_chat", "room_alias_name": alias.split(":")[0]})["room_id"]
    t = time.monotonic()
    fill(writer_base, writer, room, prefix)
    print(f"wrote {n} messages on the room's server in {time.monotonic() - t:.1f} s", flush=True)
    joined = call("POST", f"{reader_base}/join/{urllib.parse.quote('#' + alias)}", reader, {})
    if joined.get("room_id") != room:
        raise RuntimeError(f"join failed: {joined}")
    seconds, pages, seen = page_back(reader_base, reader, room, prefix)
    results.append((who, seconds, pages, seen))
    print(f"{who}: {seen}/{n} messages in {seconds:.1f} s over {pages} pages", flush=True)

print()
print(f"| paging back through {n} messages written before the reader's server joined | seconds | events/s | pages |")
print("|---|---|---|---|")
for who, seconds, pages, seen in results:
    print(f"| {who} ({seen} seen) | {seconds:.1f} | **{seen / seconds:.0f}** | {pages} |")
PY
