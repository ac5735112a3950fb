#!/usr/bin/env bash
# Federation delivery side by side (issue #11): Synapse and Lattice federating on loopback
# (tests/interop/synapse_pair.sh), one room of each server's making, both users joined. In each
# direction:
#   - latency: K messages one at a time; the reader on the other server long-polls /sync, and a
#     message's latency runs from the writer's send until the reader's /sync answers with it;
#   - burst: N messages from 10 concurrent senders on the writer's server, then one more, which
#     cites them all; timed until that one is in the reader's /sync (the writer's own send rate
#     bounds it: it is printed too).
# The same client code drives every direction, so each direction's figures are one server's
# outbound path plus the other's inbound path. A second Synapse gives Synapse to Synapse on the
# same machine; Lattice to Lattice is in federation_bench.
#
# Usage: scripts/synapse-federation-bench.sh [K] [N]   (defaults 300 and 2000)
set -euo pipefail
cd "$(dirname "$0")/.."
K="${1:-300}"
N="${2:-2000}"
SECOND_SYNAPSE=1
source tests/interop/synapse_pair.sh

pair_bench_header

"$VPY" - "$K" "$N" "$LAT_IP:$LAT_CLIENT_PORT" "$LAT_NAME" "$SYN_NAME" "$SYN2_NAME" <<'PY'
import json, statistics, sys, threading, time, urllib.parse
from concurrent.futures import ThreadPoolExecutor

k, n, lat_client, lat_name, syn_name, syn2_name = int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:7]
LAT = f"http://{lat_client}/_matrix/client/v3"
SYN = f"https://{syn_name}/_matrix/client/v3"
SYN2 = f"https://{syn2_name}/_matrix/client/v3"
sys.path.insert(0, "scripts")
from synapse_pair_client import call, login_carol, register_on_synapse

TIMELINE = json.dumps({"room": {"timeline": {"limit": 5000}}})

class Reader:
    """Long-polls /sync for one room on a thread and records when each body first appears."""
    def __init__(self, base, token, room):
        self.base, self.token, self.room = base, token, room
        self.seen, self.lock, self.stop = {}, threading.Lock(), False
        answer = call("GET", f"{base}/sync?timeout=0&filter={urllib.parse.quote(TIMELINE)}", token)
        self.since = answer["next_batch"]
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop:
            # A timeline long enough that a burst between two syncs is never cut short.
            query = urllib.parse.urlencode({"since": self.since, "timeout": "10000", "filter": TIMELINE})
            answer = call("GET", f"{self.base}/sync?{query}", self.token)
            now = time.monotonic()
            self.since = answer.get("next_batch", self.since)
            timeline = answer.get("rooms", {}).get("join", {}).get(self.room, {}).get("timeline", {})
            events = timeline.get("events", [])
            if timeline.get("limited"):
                events = self.page_back(timeline.get("prev_batch")) + events
            with self.lock:
                for event in events:
                    body = event.get("content", {}).get("body")
                    if body is not None and body not in self.seen:
                        self.seen[body] = now

    def page_back(self, token):
        """What a limited timeline left out: earlier events, back to one already seen."""
        events = []
        while token:
            query = urllib.parse.urlencode({"from": token, "dir": "b", "limit": "1000"})
            page = call("GET", f"{self.base}/rooms/{self.room}/messages?{query}", self.token)
            chunk = page.get("chunk", [])
            events = list(reversed(chunk)) + events
            with self.lock:
                if not chunk or any(e.get("content", {}).get("body") in self.seen for e in chunk):
                    return events
            token = page.get("end")
        return events

    def wait_for(self, body, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if body in self.seen:
                    return self.seen[body]
            time.sleep(0.0005)
        raise RuntimeError(f"{body} never arrived")

    def count(self, prefix):
        with self.lock:
            return sum(1 for body in self.seen if body.startswith(prefix))

def send(base, token, room, txn, body):
    answer = call("PUT", f"{base}/rooms/{room}/send/m.room.message/{txn}", token, {"msgtype": "m.text", "body": body})
    if "event_id" not in answer:
        raise RuntimeError(f"send failed: {answer}")

def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]

carol = login_carol(LAT)
dave = register_on_synapse(SYN, "dave")
erin = register_on_synapse(SYN2, "erin")
rows = []
for (writer_base, writer, writer_server, reader_base, reader, tag, who) in [
    (LAT, carol, lat_name, SYN, dave, "l2s", "Lattice → Synapse"),
    (SYN, dave, syn_name, LAT, carol, "s2l", "Synapse → Lattice"),
    (SYN, dave, syn_name, SYN2, erin, "s2s", "Synapse → Synapse"),
]:
    room = call("POST", f"{writer_base}/createRoom", writer, {"preset": "public_chat"})["room_id"]
    via = urllib.parse.urlencode({"via": writer_server, "server_name": writer_server})
    joined = call("POST", f"{reader_base}/join/{urllib.parse.quote(room)}?{via}", reader, {})
    if joined.get("room_id") != room:
        raise RuntimeError(f"join failed: {joined}")
    watcher = Reader(reader_base, reader, room)
    # Warm-up: the first message also settles keys and connections.
    send(writer_base, writer, room, f"{tag}-warm", f"{tag}-warm")
    watcher.wait_for(f"{tag}-warm")
    latencies = []
    for i in range(k):
        body = f"{tag}-lat-{i}"
        start = time.monotonic()
        send(writer_base, writer, room, body, body)
        latencies.append(1000 * (watcher.wait_for(body) - start))
    start = time.monotonic()
    with ThreadPoolExecutor(10) as pool:
        list(pool.map(lambda i: send(writer_base, writer, room, f"{tag}-burst-{i}", f"{tag}-burst-{i}"), range(n)))
    sent = time.monotonic() - start
    # One more message after the burst: it cites the room's newest events, so its server
    # sends it after them and the reader's server stores it only once all are stored (a
    # limited /sync may skip some burst messages in the reader's view, never the last one).
    send(writer_base, writer, room, f"{tag}-end", f"{tag}-end")
    total = watcher.wait_for(f"{tag}-end", timeout=1800) - start
    arrived = watcher.count(f"{tag}-burst-")
    watcher.stop = True
    rows.append((who, statistics.median(latencies), percentile(latencies, 0.99), n, sent, arrived, total))
    print(f"{who}: p50 {statistics.median(latencies):.2f} ms, burst in {total:.2f} s ({arrived} seen in /sync)", flush=True)

print()
print(f"| direction | delivery latency p50 / p99 ({k} messages, one in flight) | {n} messages from 10 senders: sent in | all stored on the reader's server after |")
print("|---|---|---|---|")
for who, p50, p99, n, sent, arrived, total in rows:
    print(f"| {who} | {p50:.2f} / {p99:.2f} ms | {sent:.2f} s ({n / sent:.0f} msg/s) | {total:.2f} s = **{n / total:.0f} PDU/s** |")
PY
