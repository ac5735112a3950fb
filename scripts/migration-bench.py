#!/usr/bin/env python3
"""Measures the schema migration rate on a generated store.

Usage: scripts/migration-bench.py PREVIOUS/lattice CURRENT/lattice [ROOMS] [MESSAGES_PER_ROOM]

Fills a fresh data directory with the previous release (schema 1): ROOMS rooms (default 20)
of MESSAGES_PER_ROOM messages (default 1000), every tenth a thread reply and every tenth a
reaction, sent from 8 client threads. Then starts the current binary on it and reads the
migration's own log lines (`migrating database schema` … `database schema migrated`) for the
time taken; prints rows read per step and rows/s overall.
"""

import concurrent.futures
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("fixture", os.path.join(HERE, "make-migration-fixture.py"))
fixture = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fixture)


def fill(base, token, rooms, per_room):
    alice = fixture.register(base, "alice", token)
    ids = [alice.call("POST", "/_matrix/client/v3/createRoom", {"name": f"bench {i}"})["room_id"]
           for i in range(rooms)]

    def room_work(room):
        client = fixture.Client(base, alice.token)
        client.txn = hash(room) & 0xFFFFFF
        root = None
        for i in range(per_room):
            content = {"msgtype": "m.text", "body": f"message {i}"}
            if root and i % 10 == 5:
                content["m.relates_to"] = {"rel_type": "m.thread", "event_id": root}
            if root and i % 10 == 7:
                client.send(room, "m.reaction", {"m.relates_to": {"rel_type": "m.annotation",
                                                                  "event_id": root, "key": "+"}})
                continue
            event = client.send(room, "m.room.message", content)
            if i % 100 == 0:
                root = event

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(room_work, ids))


def migrate(binary, data_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LATTICE_") and k != "RUST_LOG"}
    env.update({"LATTICE_DATA_DIR": data_dir, "LATTICE_LISTEN__ADDRESS": "127.0.0.1:0",
                "LATTICE_SERVER_NAME": fixture.SERVER_NAME, "LATTICE_LOGGING__FORMAT": "json",
                "LATTICE_LOGGING__LEVEL": "info"})
    child = subprocess.Popen([binary, "serve"], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    started, rows = None, {}
    for line in child.stderr:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        fields = entry.get("fields", {})
        message = fields.get("message", "")
        if message == "migrating database schema":
            started = time.monotonic()
        elif message == "migration step done":
            rows[fields["step"]] = (fields["rows_done"], fields["elapsed_ms"])
        elif message == "database schema migrated":
            elapsed = time.monotonic() - started
            break
    child.terminate()
    child.wait(timeout=60)
    return elapsed, rows


def main():
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    previous, current = map(os.path.abspath, sys.argv[1:3])
    rooms = int(sys.argv[3]) if len(sys.argv) > 3 else 20
    per_room = int(sys.argv[4]) if len(sys.argv) > 4 else 1000
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = os.path.join(scratch, "data")
        child, base, token = fixture.start(previous, data_dir)
        begun = time.monotonic()
        try:
            fill(base, token, rooms, per_room)
        finally:
            child.terminate()
            child.wait(timeout=60)
        print(f"filled {rooms} rooms x {per_room} messages in {time.monotonic() - begun:.1f} s")
        elapsed, rows = migrate(current, data_dir)
        total = sum(count for count, _ in rows.values())
        for step, (count, ms) in rows.items():
            print(f"  {step}: {count} rows in {ms} ms")
        print(f"migrated in {elapsed:.2f} s; {total} rows read by steps, {total / elapsed:.0f} rows/s")


if __name__ == "__main__":
    main()
