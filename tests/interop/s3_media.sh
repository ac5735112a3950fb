#!/usr/bin/env bash
# Media in an S3-compatible bucket: Lattice with `[media.s3]` against a real S3 API server on
# loopback (moto's server, from PyPI, in a virtualenv under ~/.cache). Checks, through the real
# binary and HTTP:
#   1. a bucket that does not exist stops the start with an error naming the store;
#   2. an upload lands in the bucket under its SHA-256 (and the same bytes twice are one object),
#      downloads are byte-exact, thumbnails are made from the bucket's copy;
#   3. a 20 MiB upload goes up as a multipart upload and comes back byte-exact;
#   4. after a restart everything is still served from the bucket;
#   5. `kill -9` during an upload leaves no object and no spooled file, and no media row;
#   6. `lattice media delete` removes the object.
#
# Usage: tests/interop/s3_media.sh      (KEEP=1 keeps the data directory and logs)
set -euo pipefail
cd "$(dirname "$0")/../.."

CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/lattice-target}"
LATTICE_BIN="${LATTICE_BIN:-$CARGO_TARGET_DIR/release/lattice}"
MOTO_VENV="${MOTO_VENV:-$HOME/.cache/lattice-moto-venv}"
MOTO_VERSION=5.2.5
S3_IP=127.0.0.6
S3_PORT=19000
LAT_IP=127.0.0.6
LAT_PORT=18470
BASE="http://$LAT_IP:$LAT_PORT"

[ -x "$LATTICE_BIN" ] || { echo "no lattice binary at $LATTICE_BIN (set LATTICE_BIN or build it)" >&2; exit 1; }
if [ "$("$MOTO_VENV/bin/python" -c 'import moto; print(moto.__version__)' 2>/dev/null || true)" != "$MOTO_VERSION" ]; then
  echo "installing moto[server]==$MOTO_VERSION into $MOTO_VENV" >&2
  [ -x "$MOTO_VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$MOTO_VENV"
  "$MOTO_VENV/bin/pip" install --quiet --disable-pip-version-check "moto[server]==$MOTO_VERSION"
fi
PY="$MOTO_VENV/bin/python"

DIR="$(mktemp -d "${TMPDIR:-/tmp}/lattice-s3.XXXXXX")"
S3_PID=""
LAT_PID=""
stop_lattice() {
  local signal="${1:-TERM}"
  if [ -n "$LAT_PID" ] && kill -0 "$LAT_PID" 2>/dev/null; then
    kill "-$signal" "$LAT_PID" 2>/dev/null || true
    for _ in $(seq 1 200); do kill -0 "$LAT_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$LAT_PID" 2>/dev/null || true
    wait "$LAT_PID" 2>/dev/null || true
  fi
  LAT_PID=""
}
cleanup() {
  stop_lattice
  if [ -n "$S3_PID" ]; then kill "$S3_PID" 2>/dev/null || true; wait "$S3_PID" 2>/dev/null || true; fi
  if [ "${KEEP:-0}" = 1 ]; then echo "kept $DIR" >&2; else rm -rf "$DIR"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

passed=0
failed=0
check() {
  if [ "$2" = yes ]; then echo "ok   $1"; passed=$((passed + 1)); else echo "FAIL $1"; failed=$((failed + 1)); fi
}
field() { "$PY" -c "import json,sys; print(json.load(sys.stdin).get('$1',''))"; }

"$MOTO_VENV/bin/moto_server" -H "$S3_IP" -p "$S3_PORT" >"$DIR/moto.out" 2>&1 &
S3_PID=$!
for _ in $(seq 1 100); do curl -s -o /dev/null "http://$S3_IP:$S3_PORT/" && break; sleep 0.1; done
# s3 ACTION [ARGS]: the bucket as S3 clients see it (boto3, installed with moto).
s3() {
  "$PY" - "$@" <<EOF
import sys, boto3
s3 = boto3.client("s3", endpoint_url="http://$S3_IP:$S3_PORT", region_name="us-east-1",
                  aws_access_key_id="lattice", aws_secret_access_key="lattice-secret")
action = sys.argv[1]
if action == "create":
    s3.create_bucket(Bucket="lattice-media")
elif action == "keys":
    for o in s3.list_objects_v2(Bucket="lattice-media").get("Contents", []):
        print(o["Key"], o["Size"])
EOF
}

export LATTICE_SERVER_NAME="$LAT_IP:$LAT_PORT"
export LATTICE_DATA_DIR="$DIR/data"
export LATTICE_LISTEN__ADDRESS="$LAT_IP:$LAT_PORT"
export LATTICE_RATE_LIMITS__ENABLED=false
export LATTICE_MEDIA__S3__BUCKET=lattice-media
export LATTICE_MEDIA__S3__ENDPOINT="http://$S3_IP:$S3_PORT"
export LATTICE_MEDIA__S3__ALLOW_HTTP=true
export LATTICE_MEDIA__S3__ACCESS_KEY_ID=lattice
export LATTICE_MEDIA__S3__SECRET_ACCESS_KEY=lattice-secret
export LATTICE_MEDIA__S3__PREFIX=media/
export LATTICE_MEDIA__MAX_UPLOAD_SIZE=104857600

start_lattice() {
  "$LATTICE_BIN" serve >>"$DIR/lattice.out" 2>&1 &
  LAT_PID=$!
  for _ in $(seq 1 300); do
    curl -s -o /dev/null "$BASE/_matrix/client/versions" && return 0
    kill -0 "$LAT_PID" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

# 1. No bucket yet: the server refuses to start and says why.
if start_lattice; then ok=no; stop_lattice; else ok=yes; fi
grep -q "lattice-media" "$DIR/lattice.out" && [ "$ok" = yes ] || ok=no
check "a missing bucket stops the start with an error naming it" "$ok"
wait "$LAT_PID" 2>/dev/null || true
LAT_PID=""

s3 create
echo "s3 media test password" | "$LATTICE_BIN" user create alice --password-stdin >/dev/null
start_lattice || { tail -n 30 "$DIR/lattice.out" >&2; exit 1; }
TOKEN="$(curl -s -X POST "$BASE/_matrix/client/v3/login" \
  -d '{"type":"m.login.password","identifier":{"type":"m.id.user","user":"alice"},"password":"s3 media test password"}' | field access_token)"
auth=(-H "Authorization: Bearer $TOKEN")
upload() { curl -s "${auth[@]}" -X POST "$BASE/_matrix/media/v3/upload?filename=$1" -H "Content-Type: $2" --data-binary "@$DIR/$1" | field content_uri; }
download() { curl -s "${auth[@]}" -o "$2" -w '%{http_code}' "$BASE/_matrix/client/v1/media/download/${1#mxc://}"; }
sha() { sha256sum "$1" | cut -d' ' -f1; }

# 2. A picture: stored under its hash, served back, thumbnailed.
"$PY" - <<EOF
import struct, zlib
w, h = 400, 300
raw = b"".join(b"\0" + bytes(v for x in range(w) for v in (x % 256, y % 256, 90)) for y in range(h))
def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
       + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
open("$DIR/picture.png", "wb").write(png)
EOF
MXC="$(upload picture.png image/png)"
keys="$(s3 keys)"
hash="$(sha "$DIR/picture.png")"
echo "$keys" | grep -q "^media/${hash:0:2}/$hash " && ok=yes || ok=no
check "an upload is an object named by its SHA-256 under the prefix" "$ok"
MXC2="$(upload picture.png image/png)"
[ "$(s3 keys | grep -c "$hash")" = 1 ] && [ "$MXC2" != "$MXC" ] && ok=yes || ok=no
check "the same bytes uploaded twice are one object" "$ok"
[ "$(download "$MXC" "$DIR/back.png")" = 200 ] && cmp -s "$DIR/picture.png" "$DIR/back.png" && ok=yes || ok=no
check "a download from the bucket is byte-exact" "$ok"
status="$(curl -s "${auth[@]}" -o "$DIR/thumb" -w '%{http_code}' "$BASE/_matrix/client/v1/media/thumbnail/${MXC#mxc://}?width=96&height=96&method=crop")"
size="$("$PY" -c "import struct; d=open('$DIR/thumb','rb').read(); print(d[:8]==b'\x89PNG\r\n\x1a\n' and struct.unpack('>II', d[16:24]))")"
[ "$status" = 200 ] && [ "$size" = "(96, 96)" ] && ok=yes || ok=no
check "a 96x96 thumbnail is made from the bucket's copy (and stored there)" "$ok"

# 3. A 20 MiB file: more than one 10 MiB part.
head -c $((20 << 20)) /dev/urandom >"$DIR/big.bin"
BIG="$(upload big.bin application/octet-stream)"
[ "$(download "$BIG" "$DIR/big.back")" = 200 ] && cmp -s "$DIR/big.bin" "$DIR/big.back" && ok=yes || ok=no
check "a 20 MiB upload (multipart to S3) comes back byte-exact" "$ok"

# 4. A restart: served from the bucket.
stop_lattice
start_lattice || { tail -n 30 "$DIR/lattice.out" >&2; exit 1; }
[ "$(download "$MXC" "$DIR/again.png")" = 200 ] && cmp -s "$DIR/picture.png" "$DIR/again.png" \
  && [ "$(download "$BIG" "$DIR/big.again")" = 200 ] && cmp -s "$DIR/big.bin" "$DIR/big.again" && ok=yes || ok=no
check "after a restart both files are served from the bucket" "$ok"

# 5. kill -9 in the middle of an upload: nothing in the bucket, nothing spooled after a restart.
objects_before="$(s3 keys | wc -l)"
head -c $((60 << 20)) /dev/urandom >"$DIR/partial.bin"
"$PY" - "$DIR/partial.bin" <<EOF &
import socket, sys, time
data = open(sys.argv[1], 'rb').read()
s = socket.create_connection(("$LAT_IP", $LAT_PORT))
s.sendall(b"POST /_matrix/media/v3/upload?filename=p.bin HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer $TOKEN\r\n"
          b"Content-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n" % len(data))
s.sendall(data[: len(data) // 2])
time.sleep(30)
EOF
SENDER=$!
for _ in $(seq 1 100); do
  [ -n "$(ls "$DIR/data/media/tmp" 2>/dev/null)" ] && [ "$(stat -c %s "$DIR"/data/media/tmp/* 2>/dev/null | sort -n | tail -1)" -gt $((10 << 20)) ] && break
  sleep 0.1
done
spooled="$(ls "$DIR/data/media/tmp" | wc -l)"
stop_lattice KILL
kill "$SENDER" 2>/dev/null || true
wait "$SENDER" 2>/dev/null || true
start_lattice || { tail -n 30 "$DIR/lattice.out" >&2; exit 1; }
[ "$spooled" -ge 1 ] && [ "$(s3 keys | wc -l)" = "$objects_before" ] && [ -z "$(ls "$DIR/data/media/tmp")" ] && ok=yes || ok=no
check "kill -9 during an upload: no object in the bucket, the spooled part removed at start (spooled: $spooled)" "$ok"

# 6. The operator deletes media: its object goes once nothing names it.
stop_lattice
"$LATTICE_BIN" media delete "$BIG" >/dev/null
"$LATTICE_BIN" media delete "$MXC" >/dev/null
big_hash="$(sha "$DIR/big.bin")"
keys="$(s3 keys)"
! echo "$keys" | grep -q "$big_hash" && echo "$keys" | grep -q "$hash" && ok=yes || ok=no
check "lattice media delete removes an object nothing else names, and keeps one still named" "$ok"
"$LATTICE_BIN" media delete "$MXC2" >/dev/null
! s3 keys | grep -q "$hash" && ok=yes || ok=no
check "deleting the last name removes the object" "$ok"

echo "$passed passed, $failed failed"
if [ "$failed" -gt 0 ]; then
  tail -n 40 "$DIR/lattice.out" >&2
  exit 1
fi
