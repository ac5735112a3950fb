#!/usr/bin/env bash
# Federation interop between a real Synapse and Lattice on loopback, in both directions:
#   1. Lattice, asked as a notary, fetches Synapse's keys from Synapse and checks them;
#   2. Synapse, asked as a notary, fetches Lattice's keys from Lattice and checks them;
#   3. a Synapse user reads a Lattice user's profile: Synapse sends a signed
#      GET /_matrix/federation/v1/query/profile, which Lattice verifies with Synapse's key;
#   4. a Synapse user joins a Lattice room by alias, and messages flow both ways;
#   5. a Lattice user joins a Synapse room by alias, and messages flow both ways;
#   6. invites both ways (createRoom with an invitee of the other server), accepted; and a
#      Lattice user refusing a Synapse invite;
#   7. and more (end-to-end encryption keys, history, profiles, upgrades, knocks, bans, media):
#      see the numbered sections below.
#
# Usage: tests/interop/synapse_keys.sh
#
# Environment: see tests/interop/synapse_pair.sh, which starts both servers.
set -euo pipefail
cd "$(dirname "$0")/../.."

source tests/interop/synapse_pair.sh

passed=0
failed=0
check() {
  local what="$1" ok="$2"
  if [ "$ok" = yes ]; then echo "ok   $what"; passed=$((passed + 1)); else echo "FAIL $what"; failed=$((failed + 1)); fi
}
json_has() { "$VPY" -c "import json,sys; d=json.load(sys.stdin); sys.exit(0 if ($1) else 1)"; }

# 1. Lattice as notary for Synapse.
if curl -sk "https://$LAT_NAME/_matrix/key/v2/query/$SYN_NAME" \
  | json_has "any(k['server_name']=='$SYN_NAME' and k['verify_keys'] and '$LAT_NAME' in k['signatures'] for k in d['server_keys'])"; then
  check "Lattice fetched and countersigned Synapse's keys" yes
else
  check "Lattice fetched and countersigned Synapse's keys" no
fi

# 2. Synapse as notary for Lattice. Synapse fetches on a cache miss only for key IDs named in
# the query, so ask for Lattice's current key by ID (Synapse 1.163 also insists on
# minimum_valid_until_ts, which the spec makes optional).
LAT_KEY_ID="$(curl -sk "https://$LAT_NAME/_matrix/key/v2/server" | "$VPY" -c 'import json,sys; print(next(iter(json.load(sys.stdin)["verify_keys"])))')"
if curl -sk -X POST "https://$SYN_NAME/_matrix/key/v2/query" -d "{\"server_keys\":{\"$LAT_NAME\":{\"$LAT_KEY_ID\":{\"minimum_valid_until_ts\":0}}}}" \
  | json_has "any(k['server_name']=='$LAT_NAME' and k['verify_keys'] and '$SYN_NAME' in k['signatures'] for k in d['server_keys'])"; then
  check "Synapse fetched and countersigned Lattice's keys" yes
else
  check "Synapse fetched and countersigned Lattice's keys" no
fi

# 3. A Synapse user reads carol's profile on Lattice: a signed request Lattice must verify.
curl -sk -X PUT "http://$LAT_IP:$LAT_CLIENT_PORT/_matrix/client/v3/profile/@carol:$LAT_NAME/displayname" \
  -H "Authorization: Bearer $(curl -sk -X POST "http://$LAT_IP:$LAT_CLIENT_PORT/_matrix/client/v3/login" \
    -d '{"type":"m.login.password","identifier":{"type":"m.id.user","user":"carol"},"password":"correct horse battery"}' \
    | "$VPY" -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')" \
  -d '{"displayname":"Carol on Lattice"}' >/dev/null
register() {
  local session
  session="$(curl -sk -X POST "https://$SYN_NAME/_matrix/client/v3/register" -d '{"username":"dave","password":"correct horse battery"}' \
    | "$VPY" -c 'import json,sys; print(json.load(sys.stdin)["session"])')"
  curl -sk -X POST "https://$SYN_NAME/_matrix/client/v3/register" \
    -d "{\"username\":\"dave\",\"password\":\"correct horse battery\",\"auth\":{\"type\":\"m.login.dummy\",\"session\":\"$session\"}}" \
    | "$VPY" -c 'import json,sys; print(json.load(sys.stdin)["access_token"])'
}
DAVE="$(register)"
if curl -sk "https://$SYN_NAME/_matrix/client/v3/profile/@carol:$LAT_NAME" -H "Authorization: Bearer $DAVE" \
  | json_has "d.get('displayname') == 'Carol on Lattice'"; then
  check "Synapse's signed profile query was verified and answered by Lattice" yes
else
  check "Synapse's signed profile query was verified and answered by Lattice" no
fi

# --- Rooms across the two servers (federation part 2). -------------------------------------------
lat() { curl -sk "$@" -H "Authorization: Bearer $CAROL" -H 'Content-Type: application/json'; }
syn() { curl -sk "$@" -H "Authorization: Bearer $DAVE" -H 'Content-Type: application/json'; }
LAT_C="http://$LAT_IP:$LAT_CLIENT_PORT/_matrix/client/v3"
SYN_C="https://$SYN_NAME/_matrix/client/v3"
CAROL="$(curl -sk -X POST "$LAT_C/login" \
  -d '{"type":"m.login.password","identifier":{"type":"m.id.user","user":"carol"},"password":"correct horse battery"}' \
  | "$VPY" -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')"
field() { "$VPY" -c "import json,sys; print(json.load(sys.stdin).get('$1',''))"; }
# Waits until `$1` (a command printing JSON) satisfies the Python expression `$2` on `d`.
eventually() {
  for _ in $(seq 1 150); do
    if eval "$1" | json_has "$2" 2>/dev/null; then return 0; fi
    sleep 0.2
  done
  return 1
}
messages() { "$1" "$2/rooms/$3/messages?dir=b&limit=50"; }
has_body() { echo "any(e.get('content',{}).get('body')=='$1' for e in d.get('chunk',[]))"; }

# 4. A Synapse user joins a Lattice room by its alias, and they chat both ways.
LAT_ROOM="$(lat -X POST "$LAT_C/createRoom" -d '{"preset":"public_chat","room_alias_name":"interop","name":"On Lattice"}' | field room_id)"
JOINED="$(syn -X POST "$SYN_C/join/%23interop:$LAT_NAME" -d '{}' | field room_id)"
check "Synapse joined a Lattice room by alias (make_join/send_join to Lattice)" "$([ -n "$LAT_ROOM" ] && [ "$JOINED" = "$LAT_ROOM" ] && echo yes || echo no)"
lat -X PUT "$LAT_C/rooms/$LAT_ROOM/send/m.room.message/t1" -d '{"msgtype":"m.text","body":"from-lattice-1"}' >/dev/null
eventually "messages syn $SYN_C $LAT_ROOM" "$(has_body from-lattice-1)" && ok=yes || ok=no
check "a Lattice message reached Synapse (Lattice's queue -> Synapse's /send)" "$ok"
syn -X PUT "$SYN_C/rooms/$LAT_ROOM/send/m.room.message/t2" -d '{"msgtype":"m.text","body":"from-synapse-1"}' >/dev/null
eventually "messages lat $LAT_C $LAT_ROOM" "$(has_body from-synapse-1)" && ok=yes || ok=no
check "a Synapse message reached Lattice (Synapse -> Lattice's /send)" "$ok"

# 5. A Lattice user joins a Synapse room by its alias, and they chat both ways.
SYN_ROOM="$(syn -X POST "$SYN_C/createRoom" -d '{"preset":"public_chat","room_alias_name":"interop2","name":"On Synapse"}' | field room_id)"
JOINED="$(lat -X POST "$LAT_C/join/%23interop2:$SYN_NAME" -d '{}' | field room_id)"
check "Lattice joined a Synapse room by alias (query/directory, make_join/send_join to Synapse)" "$([ -n "$SYN_ROOM" ] && [ "$JOINED" = "$SYN_ROOM" ] && echo yes || echo no)"
syn -X PUT "$SYN_C/rooms/$SYN_ROOM/send/m.room.message/t3" -d '{"msgtype":"m.text","body":"from-synapse-2"}' >/dev/null
eventually "messages lat $LAT_C $SYN_ROOM" "$(has_body from-synapse-2)" && ok=yes || ok=no
check "a Synapse message reached Lattice in Synapse's room" "$ok"
lat -X PUT "$LAT_C/rooms/$SYN_ROOM/send/m.room.message/t4" -d '{"msgtype":"m.text","body":"from-lattice-2"}' >/dev/null
eventually "messages syn $SYN_C $SYN_ROOM" "$(has_body from-lattice-2)" && ok=yes || ok=no
check "a Lattice message reached Synapse in Synapse's room" "$ok"

# 6. Invites both ways, as clients start direct chats: createRoom with the other user invited;
#    the invitee's server countersigns (/invite v2), the invitee sees it in /sync and joins
#    through the inviter's server. Then a refused invite (make_leave/send_leave to Synapse).
invited() { echo "'$1' in d.get('rooms',{}).get('invite',{})"; }
joined_member() { echo "'$1' in d.get('joined',{})"; }
DM1="$(lat -X POST "$LAT_C/createRoom" -d "{\"preset\":\"trusted_private_chat\",\"is_direct\":true,\"invite\":[\"@dave:$SYN_NAME\"]}" | field room_id)"
eventually "syn $SYN_C/sync?timeout=0" "$(invited "$DM1")" && ok=yes || ok=no
check "a Lattice user's invite reached Synapse's user (Lattice -> Synapse /invite)" "$ok"
syn -X POST "$SYN_C/join/$DM1" -d '{}' >/dev/null
eventually "lat $LAT_C/rooms/$DM1/joined_members" "$(joined_member "@dave:$SYN_NAME")" && ok=yes || ok=no
check "Synapse's user accepted it (joined through Lattice)" "$ok"
DM2="$(syn -X POST "$SYN_C/createRoom" -d "{\"preset\":\"trusted_private_chat\",\"is_direct\":true,\"invite\":[\"@carol:$LAT_NAME\"],\"name\":\"From Synapse\"}" | field room_id)"
eventually "lat $LAT_C/sync?timeout=0" "$(invited "$DM2") and any(e.get('content',{}).get('name')=='From Synapse' for e in d['rooms']['invite']['$DM2']['invite_state']['events'])" && ok=yes || ok=no
check "a Synapse user's invite reached Lattice's user, with the room's name (Synapse -> Lattice /invite)" "$ok"
lat -X POST "$LAT_C/join/$DM2" -d '{}' >/dev/null
eventually "syn $SYN_C/rooms/$DM2/joined_members" "$(joined_member "@carol:$LAT_NAME")" && ok=yes || ok=no
check "Lattice's user accepted it (joined through Synapse)" "$ok"
DM3="$(syn -X POST "$SYN_C/createRoom" -d "{\"preset\":\"private_chat\",\"invite\":[\"@carol:$LAT_NAME\"]}" | field room_id)"
eventually "lat $LAT_C/sync?timeout=0" "$(invited "$DM3")" && ok=yes || ok=no
lat -X POST "$LAT_C/rooms/$DM3/leave" -d '{}' >/dev/null
member_is() { echo "d.get('membership')=='$1'"; }
eventually "syn $SYN_C/rooms/$DM3/state/m.room.member/@carol:$LAT_NAME" "$(member_is leave)" && [ "$ok" = yes ] && ok=yes || ok=no
check "Lattice's user refused a Synapse invite (make_leave/send_leave to Synapse)" "$ok"

# 7. End-to-end encryption keys and to-device messages both ways (signed with signedjson from
#    Synapse's own virtualenv): each server asks the other for its user's keys
#    (/user/keys/query, /user/keys/claim) and relays to-device messages (m.direct_to_device).
keys_for() {
  "$VPY" - "$1" "$2" <<'PY'
import json, sys
from signedjson.key import encode_verify_key_base64, generate_signing_key
from signedjson.sign import sign_json
user, device = sys.argv[1], sys.argv[2]
key = generate_signing_key(device)
device_keys = sign_json({
    "user_id": user, "device_id": device,
    "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
    "keys": {"ed25519:" + device: encode_verify_key_base64(key.verify_key), "curve25519:" + device: "curve"},
}, user, key)
one_time = sign_json({"key": "otk-" + device}, user, key)
print(json.dumps({"device_keys": device_keys, "one_time_keys": {"signed_curve25519:AAAAAQ": one_time}}))
PY
}
CAROL_DEV="$(lat "$LAT_C/account/whoami" | field device_id)"
DAVE_DEV="$(syn "$SYN_C/account/whoami" | field device_id)"
lat -X POST "$LAT_C/keys/upload" -d "$(keys_for "@carol:$LAT_NAME" "$CAROL_DEV")" >/dev/null
syn -X POST "$SYN_C/keys/upload" -d "$(keys_for "@dave:$SYN_NAME" "$DAVE_DEV")" >/dev/null
has_device() { echo "'$2' in d.get('device_keys',{}).get('$1',{})"; }
lat -X POST "$LAT_C/keys/query" -d "{\"device_keys\":{\"@dave:$SYN_NAME\":[]}}" | json_has "$(has_device "@dave:$SYN_NAME" "$DAVE_DEV")" && ok=yes || ok=no
check "Lattice fetched a Synapse user's device keys (/user/keys/query to Synapse)" "$ok"
syn -X POST "$SYN_C/keys/query" -d "{\"device_keys\":{\"@carol:$LAT_NAME\":[]}}" | json_has "$(has_device "@carol:$LAT_NAME" "$CAROL_DEV")" && ok=yes || ok=no
check "Synapse fetched a Lattice user's device keys (/user/keys/query to Lattice)" "$ok"
claimed() { echo "'signed_curve25519:AAAAAQ' in d.get('one_time_keys',{}).get('$1',{}).get('$2',{})"; }
lat -X POST "$LAT_C/keys/claim" -d "{\"one_time_keys\":{\"@dave:$SYN_NAME\":{\"$DAVE_DEV\":\"signed_curve25519\"}}}" | json_has "$(claimed "@dave:$SYN_NAME" "$DAVE_DEV")" && ok=yes || ok=no
check "Lattice claimed a Synapse device's one-time key (/user/keys/claim to Synapse)" "$ok"
syn -X POST "$SYN_C/keys/claim" -d "{\"one_time_keys\":{\"@carol:$LAT_NAME\":{\"$CAROL_DEV\":\"signed_curve25519\"}}}" | json_has "$(claimed "@carol:$LAT_NAME" "$CAROL_DEV")" && ok=yes || ok=no
check "Synapse claimed a Lattice device's one-time key (/user/keys/claim to Lattice)" "$ok"
to_device_has() { echo "any(e.get('content',{}).get('note')=='$1' for e in d.get('to_device',{}).get('events',[]))"; }
# Synapse answers an identical /sync from a cache for a while, so each poll asks with another
# timeout (part of its cache key).
DAVE_SINCE="$(syn "$SYN_C/sync?timeout=0" | field next_batch)"
lat -X PUT "$LAT_C/sendToDevice/m.interop.test/td1" -d "{\"messages\":{\"@dave:$SYN_NAME\":{\"$DAVE_DEV\":{\"note\":\"from-lattice\"}}}}" >/dev/null
ok=no
for poll in $(seq 1 60); do
  if syn "$SYN_C/sync?timeout=$((poll * 10))&since=$DAVE_SINCE" | json_has "$(to_device_has from-lattice)" 2>/dev/null; then ok=yes; break; fi
  sleep 0.3
done
check "a Lattice to-device message reached the Synapse device (m.direct_to_device)" "$ok"
syn -X PUT "$SYN_C/sendToDevice/m.interop.test/td2" -d "{\"messages\":{\"@carol:$LAT_NAME\":{\"$CAROL_DEV\":{\"note\":\"from-synapse\"}}}}" >/dev/null
eventually "lat $LAT_C/sync?timeout=0" "$(to_device_has from-synapse)" && ok=yes || ok=no
check "a Synapse to-device message reached the Lattice device (m.direct_to_device)" "$ok"
# carol logs in on a second device and publishes its keys: Synapse, which shares rooms with her,
# hears of it (m.device_list_update, resyncing through /user/devices when it sees a gap) and
# shows it to dave.
CAROL2="$(curl -sk -X POST "$LAT_C/login" \
  -d '{"type":"m.login.password","identifier":{"type":"m.id.user","user":"carol"},"password":"correct horse battery"}')"
CAROL2_TOKEN="$(echo "$CAROL2" | field access_token)"
CAROL2_DEV="$(echo "$CAROL2" | field device_id)"
curl -sk -X POST "$LAT_C/keys/upload" -H "Authorization: Bearer $CAROL2_TOKEN" -H 'Content-Type: application/json' \
  -d "$(keys_for "@carol:$LAT_NAME" "$CAROL2_DEV")" >/dev/null
eventually "syn -X POST $SYN_C/keys/query -d '{\"device_keys\":{\"@carol:$LAT_NAME\":[]}}'" "$(has_device "@carol:$LAT_NAME" "$CAROL2_DEV")" && ok=yes || ok=no
check "a new Lattice device reached Synapse's view of the user's devices" "$ok"

# 8. History from before a server joined, profiles and bans. dave writes 100 messages in a new
#    Synapse room before carol joins it, 8 at a time, so the room's history forks into branches
#    (each a gap of its own for Lattice): carol jumps to the date of the 50th (Lattice asks
#    Synapse /timestamp_to_event and backfills the event), then pages back to the room's
#    create event (/backfill from Synapse).
HIST_ROOM="$(syn -X POST "$SYN_C/createRoom" -d '{"preset":"public_chat","room_alias_name":"history"}' | field room_id)"
send_history() {
  curl -sk -o /dev/null -X PUT "$SYN_C/rooms/$HIST_ROOM/send/m.room.message/h$1" -H "Authorization: Bearer $DAVE" \
    -H 'Content-Type: application/json' -d "{\"msgtype\":\"m.text\",\"body\":\"hist-$1\"}"
}
export -f send_history
export SYN_C HIST_ROOM DAVE
seq 1 49 | xargs -P 8 -I{} bash -c 'send_history {}'
HIST_50="$(syn -X PUT "$SYN_C/rooms/$HIST_ROOM/send/m.room.message/h50" -d '{"msgtype":"m.text","body":"hist-50"}' | field event_id)"
seq 51 100 | xargs -P 8 -I{} bash -c 'send_history {}'
HIST_50_TS="$(syn "$SYN_C/rooms/$HIST_ROOM/event/$HIST_50" | field origin_server_ts)"
lat -X POST "$LAT_C/join/%23history:$SYN_NAME" -d '{}' >/dev/null
lat "http://$LAT_IP:$LAT_CLIENT_PORT/_matrix/client/v1/rooms/$HIST_ROOM/timestamp_to_event?ts=$HIST_50_TS&dir=f" \
  | json_has "d.get('event_id')=='$HIST_50'" && ok=yes || ok=no
check "Lattice jumped to a date before it joined a Synapse room (/timestamp_to_event to Synapse)" "$ok"
seen=""
FROM=""
for _ in $(seq 1 12); do
  PAGE="$(lat "$LAT_C/rooms/$HIST_ROOM/messages?dir=b&limit=50${FROM:+&from=$FROM}")"
  seen="$seen $(echo "$PAGE" | "$VPY" -c 'import json,sys; print(" ".join(e.get("content",{}).get("body", e["type"]) for e in json.load(sys.stdin).get("chunk",[])))')"
  FROM="$(echo "$PAGE" | field end)"
  [ -z "$FROM" ] && break
done
count="$(for w in $seen; do echo "$w"; done | grep '^hist-' | sort -u | wc -l)"
check "Lattice paged back through 100 messages written 8 at a time before it joined (/backfill from Synapse, saw $count)" "$([ "$count" = 100 ] && echo yes || echo no)"
check "Lattice's pages reached the room's create event" "$(for w in $seen; do echo "$w"; done | grep -qx 'm.room.create' && echo yes || echo no)"
# The other way: carol writes 30 messages in a new Lattice room before dave joins; Synapse
# backfills them from Lattice as dave pages back.
BACK_ROOM="$(lat -X POST "$LAT_C/createRoom" -d '{"preset":"public_chat","room_alias_name":"history2"}' | field room_id)"
for i in $(seq 1 30); do
  lat -X PUT "$LAT_C/rooms/$BACK_ROOM/send/m.room.message/b$i" -d "{\"msgtype\":\"m.text\",\"body\":\"back-$i\"}" >/dev/null
done
syn -X POST "$SYN_C/join/%23history2:$LAT_NAME" -d '{}' >/dev/null
seen=""
FROM=""
for _ in $(seq 1 12); do
  PAGE="$(syn "$SYN_C/rooms/$BACK_ROOM/messages?dir=b&limit=20${FROM:+&from=$FROM}")"
  seen="$seen $(echo "$PAGE" | "$VPY" -c 'import json,sys; print(" ".join(e.get("content",{}).get("body","") for e in json.load(sys.stdin).get("chunk",[])))')"
  FROM="$(echo "$PAGE" | field end)"
  [ -z "$FROM" ] && break
done
count="$(for w in $seen; do echo "$w"; done | grep '^back-' | sort -u | wc -l)"
check "Synapse paged back through 30 messages from before it joined (/backfill from Lattice, saw $count)" "$([ "$count" = 30 ] && echo yes || echo no)"
# Profile changes travel as member events.
syn -X PUT "$SYN_C/profile/@dave:$SYN_NAME/displayname" -d '{"displayname":"Dave Renamed"}' >/dev/null
eventually "lat $LAT_C/rooms/$LAT_ROOM/state/m.room.member/@dave:$SYN_NAME" "d.get('displayname')=='Dave Renamed'" && ok=yes || ok=no
check "a Synapse user's new display name reached Lattice's room" "$ok"
lat -X PUT "$LAT_C/profile/@carol:$LAT_NAME/displayname" -d '{"displayname":"Carol Renamed"}' >/dev/null
eventually "syn $SYN_C/rooms/$SYN_ROOM/state/m.room.member/@carol:$LAT_NAME" "d.get('displayname')=='Carol Renamed'" && ok=yes || ok=no
check "a Lattice user's new display name reached Synapse's room" "$ok"
# Room upgrades: each server's user upgrades a room the other's user is in; the tombstone
# reaches the other server, whose user follows it into the replacement room.
UP1="$(lat -X POST "$LAT_C/createRoom" -d '{"preset":"public_chat","room_alias_name":"upgrade1","room_version":"11"}' | field room_id)"
syn -X POST "$SYN_C/join/%23upgrade1:$LAT_NAME" -d '{}' >/dev/null
NEW1="$(lat -X POST "$LAT_C/rooms/$UP1/upgrade" -d '{"new_version":"12"}' | field replacement_room)"
eventually "syn $SYN_C/rooms/$UP1/state/m.room.tombstone/" "d.get('replacement_room')=='$NEW1' and '$NEW1' != ''" && ok=yes || ok=no
syn -X POST "$SYN_C/join/$NEW1?server_name=$LAT_NAME" -d '{}' >/dev/null
eventually "lat $LAT_C/rooms/$NEW1/joined_members" "$(joined_member "@dave:$SYN_NAME")" && [ "$ok" = yes ] && ok=yes || ok=no
check "a Lattice room upgrade reached Synapse, whose user followed it into the new room" "$ok"
UP2="$(syn -X POST "$SYN_C/createRoom" -d '{"preset":"public_chat","room_alias_name":"upgrade2","room_version":"11"}' | field room_id)"
lat -X POST "$LAT_C/join/%23upgrade2:$SYN_NAME" -d '{}' >/dev/null
NEW2="$(syn -X POST "$SYN_C/rooms/$UP2/upgrade" -d '{"new_version":"12"}' | field replacement_room)"
eventually "lat $LAT_C/rooms/$UP2/state/m.room.tombstone/" "d.get('replacement_room')=='$NEW2' and '$NEW2' != ''" && ok=yes || ok=no
lat -X POST "$LAT_C/join/$NEW2?server_name=$SYN_NAME" -d '{}' >/dev/null
eventually "syn $SYN_C/rooms/$NEW2/joined_members" "$(joined_member "@carol:$LAT_NAME")" && [ "$ok" = yes ] && ok=yes || ok=no
check "a Synapse room upgrade reached Lattice, whose user followed it into the new room" "$ok"
# Knocks both ways: each server's user knocks by alias on a room of the other whose join rule
# is `knock` (make_knock/send_knock), and is let in (an invite, then a join).
knock_rules='"initial_state":[{"type":"m.room.join_rules","state_key":"","content":{"join_rule":"knock"}}]'
KN1="$(lat -X POST "$LAT_C/createRoom" -d "{\"preset\":\"private_chat\",\"room_alias_name\":\"knock1\",$knock_rules}" | field room_id)"
syn -X POST "$SYN_C/knock/%23knock1:$LAT_NAME" -d '{"reason":"interop"}' >/dev/null
eventually "lat $LAT_C/rooms/$KN1/state/m.room.member/@dave:$SYN_NAME" "$(member_is knock)" && ok=yes || ok=no
check "a Synapse user knocked on a Lattice room (make_knock/send_knock to Lattice)" "$ok"
lat -X POST "$LAT_C/rooms/$KN1/invite" -d "{\"user_id\":\"@dave:$SYN_NAME\"}" >/dev/null
ok=no
for poll in $(seq 1 60); do
  syn -X POST "$SYN_C/join/$KN1?server_name=$LAT_NAME" -d '{}' >/dev/null
  if lat "$LAT_C/rooms/$KN1/joined_members" | json_has "$(joined_member "@dave:$SYN_NAME")" 2>/dev/null; then ok=yes; break; fi
  sleep 0.3
done
check "Lattice let the knocking Synapse user in (invite, then a join)" "$ok"
KN2="$(syn -X POST "$SYN_C/createRoom" -d "{\"preset\":\"private_chat\",\"room_alias_name\":\"knock2\",\"name\":\"Knock on Synapse\",$knock_rules}" | field room_id)"
KNOCKED="$(lat -X POST "$LAT_C/knock/%23knock2:$SYN_NAME" -d '{"reason":"interop"}' | field room_id)"
eventually "syn $SYN_C/rooms/$KN2/state/m.room.member/@carol:$LAT_NAME" "$(member_is knock)" && [ "$KNOCKED" = "$KN2" ] && ok=yes || ok=no
check "a Lattice user knocked on a Synapse room (make_knock/send_knock to Synapse)" "$ok"
eventually "lat $LAT_C/sync?timeout=0" "any(e.get('content',{}).get('name')=='Knock on Synapse' for e in d['rooms']['knock']['$KN2']['knock_state']['events'])" && ok=yes || ok=no
check "Lattice's user sees the Synapse room described while knocking (knock_room_state)" "$ok"
syn -X POST "$SYN_C/rooms/$KN2/invite" -d "{\"user_id\":\"@carol:$LAT_NAME\"}" >/dev/null
eventually "lat $LAT_C/sync?timeout=0" "$(invited "$KN2")" && ok=yes || ok=no
lat -X POST "$LAT_C/join/$KN2" -d '{}' >/dev/null
eventually "syn $SYN_C/rooms/$KN2/joined_members" "$(joined_member "@carol:$LAT_NAME")" && [ "$ok" = yes ] && ok=yes || ok=no
check "Synapse let the knocking Lattice user in (invite, then a join through Synapse)" "$ok"
# Bans: each room's creator bans the other server's user, whose own server then refuses to
# send for them.
lat -X POST "$LAT_C/rooms/$LAT_ROOM/ban" -d "{\"user_id\":\"@dave:$SYN_NAME\",\"reason\":\"interop\"}" >/dev/null
ok=no
for poll in $(seq 1 60); do
  status="$(syn -o /dev/null -w '%{http_code}' -X PUT "$SYN_C/rooms/$LAT_ROOM/send/m.room.message/ban$poll" -d '{"msgtype":"m.text","body":"after-ban"}')"
  if [ "$status" = 403 ]; then ok=yes; break; fi
  sleep 0.3
done
check "Lattice's ban reached Synapse (Synapse refuses to send for the banned user)" "$ok"
syn -X POST "$SYN_C/rooms/$SYN_ROOM/ban" -d "{\"user_id\":\"@carol:$LAT_NAME\",\"reason\":\"interop\"}" >/dev/null
ok=no
for poll in $(seq 1 60); do
  status="$(lat -o /dev/null -w '%{http_code}' -X PUT "$LAT_C/rooms/$SYN_ROOM/send/m.room.message/ban$poll" -d '{"msgtype":"m.text","body":"after-ban"}')"
  if [ "$status" = 403 ]; then ok=yes; break; fi
  sleep 0.3
done
check "Synapse's ban reached Lattice (Lattice refuses to send for the banned user)" "$ok"

# 9. An encrypted room across the two servers, through matrix-sdk with end-to-end encryption:
#    carol (Lattice) creates it and invites dave (Synapse), each decrypts the other's message
#    (device keys, one-time key claims and to-device room keys over federation both ways).
E2EE_PAIR="$(dirname "$LATTICE_BIN")/examples/e2ee_pair"
if [ -x "$E2EE_PAIR" ]; then
  "$E2EE_PAIR" "http://$LAT_IP:$LAT_CLIENT_PORT" carol "https://$SYN_NAME" dave "correct horse battery" \
    >"$DIR/e2ee_pair.out" 2>&1 && ok=yes || ok=no
  cat "$DIR/e2ee_pair.out" | grep -E '^(ok|FAIL)' | sed 's/^/     /'
else
  echo "no $E2EE_PAIR (build with cargo build --release --workspace --all-targets)" >&2
  ok=no
fi
check "matrix-sdk clients on Lattice and Synapse each decrypt the other's message in an encrypted room" "$ok"

# 10. Media both ways (authenticated media over federation): each user uploads a picture to
#     their own server and the other server's user downloads it and a thumbnail of it through
#     their own server, which fetches it over /_matrix/federation/v1/media/download.
"$VPY" -c "
from PIL import Image
Image.new('RGB', (400, 300), (200, 30, 90)).save('$DIR/picture.png')
frames = [Image.new('RGB', (200, 100), (i * 80, 40, 200)) for i in range(3)]
frames[0].save('$DIR/animation.gif', save_all=True, append_images=frames[1:], duration=100, loop=0)
"
# upload TOKEN BASE FILE TYPE
upload() {
  curl -sk -X POST "$2/_matrix/media/v3/upload?filename=$3" -H "Authorization: Bearer $1" -H "Content-Type: $4" \
    --data-binary "@$DIR/$3" | field content_uri
}
LAT_MXC="$(upload "$CAROL" "http://$LAT_IP:$LAT_CLIENT_PORT" picture.png image/png)"
SYN_MXC="$(upload "$DAVE" "https://$SYN_NAME" picture.png image/png)"
LAT_MEDIA="http://$LAT_IP:$LAT_CLIENT_PORT/_matrix/client/v1/media"
SYN_MEDIA="https://$SYN_NAME/_matrix/client/v1/media"
same_bytes() { cmp -s "$1" "$2" && echo yes || echo no; }
syn "$SYN_MEDIA/download/${LAT_MXC#mxc://}" -o "$DIR/lat-via-syn.png"
check "a Synapse user downloaded a Lattice upload through Synapse (federation media download from Lattice)" "$([ -n "$LAT_MXC" ] && same_bytes "$DIR/picture.png" "$DIR/lat-via-syn.png")"
lat "$LAT_MEDIA/download/${SYN_MXC#mxc://}" -o "$DIR/syn-via-lat.png"
check "a Lattice user downloaded a Synapse upload through Lattice (federation media download from Synapse)" "$([ -n "$SYN_MXC" ] && same_bytes "$DIR/picture.png" "$DIR/syn-via-lat.png")"
image_size() { "$VPY" -c "from PIL import Image; i = Image.open('$1'); print(i.format, i.size[0], i.size[1], getattr(i, 'n_frames', 1))" 2>/dev/null; }
lat "$LAT_MEDIA/thumbnail/${SYN_MXC#mxc://}?width=96&height=96&method=crop" -o "$DIR/syn-thumb.png"
check "Lattice made a 96x96 thumbnail of Synapse media" "$([ "$(image_size "$DIR/syn-thumb.png")" = "PNG 96 96 1" ] && echo yes || echo no)"
syn "$SYN_MEDIA/thumbnail/${LAT_MXC#mxc://}?width=96&height=96&method=crop" -o "$DIR/lat-thumb"
check "Synapse made a thumbnail of Lattice media" "$(image_size "$DIR/lat-thumb" | grep -qE '^(PNG|JPEG) ' && echo yes || echo no)"
LAT_GIF="$(upload "$CAROL" "http://$LAT_IP:$LAT_CLIENT_PORT" animation.gif image/gif)"
syn "$SYN_MEDIA/download/${LAT_GIF#mxc://}" -o "$DIR/gif-via-syn.gif"
lat "$LAT_MEDIA/thumbnail/${LAT_GIF#mxc://}?width=96&height=96&method=crop&animated=true" -o "$DIR/gif-thumb"
check "an animated GIF reached Synapse whole, and Lattice's animated thumbnail keeps its 3 frames" "$(
  [ "$(same_bytes "$DIR/animation.gif" "$DIR/gif-via-syn.gif")" = yes ] && [ "$(image_size "$DIR/gif-thumb")" = "GIF 96 96 3" ] && echo yes || echo no)"

echo "$passed passed, $failed failed"
if [ "$failed" -gt 0 ]; then
  tail -n 40 "$DIR/synapse.out" "$DIR/homeserver.log" "$DIR/lattice.out" >&2
  exit 1
fi
