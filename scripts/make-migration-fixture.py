#!/usr/bin/env python3
"""Writes tests/fixtures/schema1-store.tar.gz: a data directory written by a schema-1 release.

Usage: scripts/make-migration-fixture.py PATH/TO/PREVIOUS/lattice [OUTPUT.tar.gz]

Starts that binary on loopback with a fresh data directory, fills it through the client API
(users, rooms, messages, state changes, an edit, a thread, a reaction, a reference, redactions,
receipts, tags and account data), stops it with SIGTERM and packs the data directory without
RocksDB's text logs. The migration tests (tests/it/migration.rs) open the result with the
current binary. Only the standard library is used.
"""

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request

SERVER_NAME = "hs1.localhost"
PASSWORD = "fixture-password"


class Client:
    def __init__(self, base, token=None):
        self.base = base
        self.token = token
        self.txn = 0

    def call(self, method, path, body=None, expect=200):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("content-type", "application/json")
        if self.token:
            request.add_header("authorization", "Bearer " + self.token)
        try:
            with urllib.request.urlopen(request) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, raw = error.code, error.read()
        value = json.loads(raw) if raw else {}
        if status != expect:
            raise SystemExit(f"{method} {path}: {status} {value}")
        return value

    def send(self, room, kind, content):
        self.txn += 1
        path = f"/_matrix/client/v3/rooms/{room}/send/{kind}/t{self.txn}"
        return self.call("PUT", path, content)["event_id"]

    def state(self, room, kind, key, content):
        return self.call("PUT", f"/_matrix/client/v3/rooms/{room}/state/{kind}/{key}", content)["event_id"]


def register(base, name, registration_token):
    body = {"username": name, "password": PASSWORD, "initial_device_display_name": "fixture"}
    challenge = Client(base).call("POST", "/_matrix/client/v3/register", body, expect=401)
    body["auth"] = {"type": "m.login.registration_token", "token": registration_token,
                    "session": challenge["session"]}
    response = Client(base).call("POST", "/_matrix/client/v3/register", body)
    return Client(base, response["access_token"])


def start(binary, data_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LATTICE_")}
    env.update({
        "LATTICE_DATA_DIR": data_dir,
        "LATTICE_LISTEN__ADDRESS": "127.0.0.1:0",
        "LATTICE_SERVER_NAME": SERVER_NAME,
        "LATTICE_RATE_LIMITS__ENABLED": "false",
        "LATTICE_AUTH__PASSWORD_HASH_MEMORY_KIB": "1024",
        "LATTICE_AUTH__PASSWORD_HASH_ITERATIONS": "1",
    })
    child = subprocess.Popen([binary, "serve"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    token = None
    for line in child.stdout:
        if line.startswith("First start: registration token (shown only now): "):
            token = line.rsplit(": ", 1)[1].strip()
        elif line.startswith("Serving the client API on http://"):
            return child, "http://" + line.split("http://", 1)[1].strip(), token
    raise SystemExit("the server exited during start-up")


def fill(base, registration_token):
    alice, bob, carol = (register(base, name, registration_token) for name in ("alice", "bob", "carol"))
    user = lambda name: f"@{name}:{SERVER_NAME}"
    rooms = []
    for index in range(3):
        room = alice.call("POST", "/_matrix/client/v3/createRoom",
                          {"name": f"room {index}", "preset": "private_chat",
                           "invite": [user("bob")]})["room_id"]
        bob.call("POST", f"/_matrix/client/v3/join/{room}", {})
        rooms.append(room)
    main = rooms[0]
    carol.call("POST", f"/_matrix/client/v3/rooms/{main}/join", {}, expect=403)
    alice.call("POST", f"/_matrix/client/v3/rooms/{main}/invite", {"user_id": user("carol")})

    messages = []
    for index in range(30):
        sender = alice if index % 2 == 0 else bob
        messages.append(sender.send(main, "m.room.message", {"msgtype": "m.text", "body": f"message {index}"}))
    alice.state(main, "m.room.topic", "", {"topic": "a topic"})
    alice.state(main, "m.room.name", "", {"name": "the main room"})
    # An edit, a thread with two replies, a reaction and a reference.
    alice.send(main, "m.room.message", {
        "msgtype": "m.text", "body": "* message 0 (edited)",
        "m.new_content": {"msgtype": "m.text", "body": "message 0 (edited)"},
        "m.relates_to": {"rel_type": "m.replace", "event_id": messages[0]}})
    for reply in range(2):
        sender = bob if reply == 0 else alice
        sender.send(main, "m.room.message", {
            "msgtype": "m.text", "body": f"thread reply {reply}",
            "m.relates_to": {"rel_type": "m.thread", "event_id": messages[1]}})
    bob.send(main, "m.reaction", {"m.relates_to": {"rel_type": "m.annotation", "event_id": messages[2],
                                                   "key": "👍"}})
    alice.send(main, "m.room.message", {"msgtype": "m.text", "body": "see above",
                                        "m.relates_to": {"rel_type": "m.reference", "event_id": messages[3]}})
    # A reacted-to reaction that is then redacted, and a redacted plain message.
    doomed = alice.send(main, "m.reaction", {"m.relates_to": {"rel_type": "m.annotation",
                                                              "event_id": messages[4], "key": "x"}})
    alice.call("PUT", f"/_matrix/client/v3/rooms/{main}/redact/{doomed}/r1", {"reason": "oops"})
    alice.call("PUT", f"/_matrix/client/v3/rooms/{main}/redact/{messages[5]}/r2", {"reason": "spam"})

    alice.call("POST", f"/_matrix/client/v3/rooms/{main}/receipt/m.read/{messages[20]}", {})
    bob.call("POST", f"/_matrix/client/v3/rooms/{main}/receipt/m.read/{messages[25]}", {})
    bob.call("POST", f"/_matrix/client/v3/rooms/{main}/receipt/m.read.private/{messages[26]}", {})
    alice.call("POST", f"/_matrix/client/v3/rooms/{main}/read_markers",
               {"m.fully_read": messages[29], "m.read": messages[29]})
    alice.call("PUT", f"/_matrix/client/v3/user/{user('alice')}/rooms/{main}/tags/m.favourite", {"order": 0.25})
    alice.call("PUT", f"/_matrix/client/v3/user/{user('alice')}/account_data/org.example.settings",
               {"theme": "dark"})

    # Enough events that a migration in one-row chunks outlasts the log pipe the kill test
    # stops reading (see tests/it/migration.rs).
    for index, room in enumerate(rooms[1:], start=1):
        for message in range(400 if index == 1 else 8):
            bob.send(room, "m.room.message", {"msgtype": "m.text", "body": f"room {index} message {message}"})
        alice.state(room, "m.room.topic", "", {"topic": f"topic {index}"})
    bob.call("POST", f"/_matrix/client/v3/rooms/{rooms[2]}/leave", {})


def main():
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    binary = os.path.abspath(sys.argv[1])
    output = sys.argv[2] if len(sys.argv) > 2 else "tests/fixtures/schema1-store.tar.gz"
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = os.path.join(scratch, "data")
        child, base, token = start(binary, data_dir)
        try:
            fill(base, token)
        finally:
            child.terminate()
            child.wait(timeout=60)
        db = os.path.join(data_dir, "db")
        for name in os.listdir(db):
            if name.startswith("LOG"):
                os.remove(os.path.join(db, name))
        os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
        with tarfile.open(output, "w:gz") as archive:
            archive.add(data_dir, arcname="data")
    print(f"wrote {output} ({os.path.getsize(output)} bytes)")


if __name__ == "__main__":
    main()
