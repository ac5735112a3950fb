//! End-to-end encryption keys through HTTP (issue #13): device keys, one-time and fallback
//! keys, device lists in `/sync` and `/keys/changes`, cross-signing, key backup. Keys are made
//! and signed here with real ed25519 key pairs, so every signature the server checks is real.

use reqwest::Method;
use ruma::signatures::{Ed25519KeyPair, sign_json};
use serde_json::{Value, json};

use crate::support::{Http, TestServer, assert_error, create_room, sync};

/// A logged-in device with its own signing key.
pub(crate) struct Device {
    pub(crate) user: String,
    pub(crate) id: String,
    pub(crate) token: String,
    pub(crate) pair: Ed25519KeyPair,
}

pub(crate) fn key_pair(version: &str) -> Ed25519KeyPair {
    let document = Ed25519KeyPair::generate();
    Ed25519KeyPair::from_der(&document, version.to_owned()).expect("a key pair")
}

pub(crate) fn public(pair: &Ed25519KeyPair) -> String {
    ruma::serde::Base64::<ruma::serde::base64::Standard>::new(pair.public_key().to_vec()).encode()
}

/// `object` signed by `signer` with `pair` (key ID `ed25519:<pair's version>`).
pub(crate) fn signed(object: Value, signer: &str, pair: &Ed25519KeyPair) -> Value {
    let map = object.as_object().cloned().expect("an object");
    let mut canonical = ruma::canonical_json::try_from_json_map(map).expect("canonical JSON");
    sign_json(signer, pair, &mut canonical).expect("signed");
    serde_json::to_value(canonical).expect("JSON")
}

pub(crate) async fn login(server: &TestServer, name: &str) -> Device {
    let (status, body) = server.http.login(name, "pw").await;
    assert_eq!(status, 200, "{body}");
    let id = body["device_id"].as_str().expect("device ID").to_owned();
    Device {
        user: server.user_id(name),
        token: body["access_token"].as_str().expect("token").to_owned(),
        pair: key_pair(&id),
        id,
    }
}

impl Device {
    pub(crate) fn device_keys(&self) -> Value {
        let unsigned = json!({
            "user_id": self.user,
            "device_id": self.id,
            "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
            "keys": { format!("ed25519:{}", self.id): public(&self.pair), format!("curve25519:{}", self.id): "curve" },
        });
        signed(unsigned, &self.user, &self.pair)
    }

    fn one_time_key(&self, n: usize) -> Value {
        signed(json!({ "key": format!("otk-{}-{n}", self.id) }), &self.user, &self.pair)
    }

    pub(crate) async fn upload(&self, http: &Http, body: Value) -> (reqwest::StatusCode, Value) {
        http.post("/_matrix/client/v3/keys/upload", Some(&self.token), &body).await
    }

    /// Uploads the device keys, `otks` one-time keys and a fallback key.
    pub(crate) async fn publish(&self, http: &Http, otks: usize) {
        let one_time_keys: serde_json::Map<String, Value> =
            (0..otks).map(|n| (format!("signed_curve25519:{n:04}"), self.one_time_key(n))).collect();
        let fallback = signed(json!({ "key": "fallback", "fallback": true }), &self.user, &self.pair);
        let body = json!({
            "device_keys": self.device_keys(),
            "one_time_keys": one_time_keys,
            "fallback_keys": { "signed_curve25519:fb": fallback },
        });
        let response = self.upload(http, body).await;
        assert_eq!(response.0, 200, "{}", response.1);
        assert_eq!(response.1["one_time_key_counts"]["signed_curve25519"], otks);
    }
}

pub(crate) async fn query(http: &Http, token: &str, users: Value) -> Value {
    let (status, body) =
        http.post("/_matrix/client/v3/keys/query", Some(token), &json!({ "device_keys": users })).await;
    assert_eq!(status, 200, "{body}");
    body
}

pub(crate) async fn claim(http: &Http, token: &str, user: &str, device: &str) -> Value {
    let body = json!({ "one_time_keys": { user: { device: "signed_curve25519" } } });
    let (status, body) = http.post("/_matrix/client/v3/keys/claim", Some(token), &body).await;
    assert_eq!(status, 200, "{body}");
    body["one_time_keys"][user][device].clone()
}

async fn join(http: &Http, token: &str, room: &str) {
    let (status, body) = http.post(&format!("/_matrix/client/v3/join/{room}"), Some(token), &json!({})).await;
    assert_eq!(status, 200, "{body}");
}

async fn leave(http: &Http, token: &str, room: &str) {
    let (status, body) = http.post(&format!("/_matrix/client/v3/rooms/{room}/leave"), Some(token), &json!({})).await;
    assert_eq!(status, 200, "{body}");
}

/// A JSON list of strings, sorted (for comparing two answers' user lists).
fn sorted(list: &Value) -> Vec<String> {
    let mut users: Vec<String> =
        list.as_array().into_iter().flatten().filter_map(|u| u.as_str().map(str::to_owned)).collect();
    users.sort();
    users
}

pub(crate) fn listed(list: &Value, user: &str) -> bool {
    list.as_array().is_some_and(|users| users.iter().any(|u| u == user))
}

async fn next_batch(http: &Http, token: &str) -> String {
    sync(http, token, "timeout=0").await["next_batch"].as_str().expect("token").to_owned()
}

async fn sync_since(http: &Http, token: &str, since: &str) -> Value {
    sync(http, token, &format!("timeout=0&since={since}")).await
}

#[tokio::test]
async fn device_keys_must_be_the_callers_own_validly_signed_and_never_change() {
    let server = TestServer::start().await;
    let http = &server.http;
    server.register("alice", "pw").await;
    server.register("bob", "pw").await;
    let alice = login(&server, "alice").await;
    let bob = login(&server, "bob").await;

    // Keys naming another device, or another user, are refused.
    let mut other_device = alice.device_keys();
    other_device["device_id"] = json!(bob.id);
    assert_error(&alice.upload(http, json!({ "device_keys": other_device })).await, 400, "M_INVALID_PARAM");
    assert_error(&alice.upload(http, json!({ "device_keys": bob.device_keys() })).await, 400, "M_INVALID_PARAM");
    // A signature by a key that is not the device's own is refused.
    let mut unsigned = alice.device_keys();
    unsigned.as_object_mut().unwrap().remove("signatures");
    let forged = signed(unsigned.clone(), &alice.user, &key_pair(&alice.id));
    assert_error(&alice.upload(http, json!({ "device_keys": forged })).await, 400, "M_INVALID_PARAM");
    // Unsigned keys too, with nothing half-stored: the one-time keys of a refused upload are gone.
    let refused = json!({ "device_keys": unsigned, "one_time_keys": { "signed_curve25519:x": alice.one_time_key(0) } });
    assert_error(&alice.upload(http, refused).await, 400, "M_INVALID_PARAM");
    let found = query(http, &bob.token, json!({ &alice.user: [] })).await;
    assert_eq!(found["device_keys"][&alice.user], json!({}), "nothing stored: {found}");
    assert!(claim(http, &bob.token, &alice.user, &alice.id).await.is_null());

    // The real keys are taken; the same again is fine; different ones are refused.
    alice.publish(http, 2).await;
    assert_eq!(alice.upload(http, json!({ "device_keys": alice.device_keys() })).await.0, 200);
    let new_pair = key_pair(&alice.id);
    let mut different = unsigned.clone();
    different["keys"][format!("ed25519:{}", alice.id)] = json!(public(&new_pair));
    let different = signed(different, &alice.user, &new_pair);
    assert_error(&alice.upload(http, json!({ "device_keys": different })).await, 400, "M_INVALID_PARAM");

    // A one-time key under an existing ID with another value, a badly signed one, a malformed ID.
    let clash = json!({ "one_time_keys": { "signed_curve25519:0000": alice.one_time_key(7) } });
    assert_error(&alice.upload(http, clash).await, 400, "M_INVALID_PARAM");
    let bad = json!({ "one_time_keys": { "signed_curve25519:new": bob.one_time_key(1) } });
    assert_error(&alice.upload(http, bad).await, 400, "M_INVALID_PARAM");
    let malformed = json!({ "one_time_keys": { "no-algorithm": "abc" } });
    assert!(alice.upload(http, malformed).await.0.is_client_error());

    // Bob sees Alice's device with its display name and its signature intact.
    let found = query(http, &bob.token, json!({ &alice.user: [] })).await;
    let keys = &found["device_keys"][&alice.user][&alice.id];
    assert_eq!(keys["keys"][format!("ed25519:{}", alice.id)], public(&alice.pair), "{found}");
    assert!(keys["signatures"][&alice.user][format!("ed25519:{}", alice.id)].is_string());
    // Named devices: unknown ones are left out; other servers' users are failures.
    let found = query(http, &bob.token, json!({ &alice.user: ["NOPE"], "@x:elsewhere.example": [] })).await;
    assert_eq!(found["device_keys"][&alice.user], json!({}));
    assert!(found["failures"]["elsewhere.example"].is_object(), "{found}");
    server.stop().await;
}

#[tokio::test]
async fn a_one_time_key_is_claimed_once_then_the_fallback_key() {
    let server = TestServer::start().await;
    let http = &server.http;
    server.register("alice", "pw").await;
    server.register("bob", "pw").await;
    let alice = login(&server, "alice").await;
    let bob = login(&server, "bob").await;
    alice.publish(http, 5).await;
    let counts = sync(http, &alice.token, "timeout=0").await;
    assert_eq!(counts["device_one_time_keys_count"]["signed_curve25519"], 5, "{counts}");
    assert_eq!(counts["device_unused_fallback_key_types"], json!(["signed_curve25519"]));

    // Ten claims at once for five keys: each key goes to exactly one claimer; the rest get the
    // fallback key.
    let claims: Vec<_> = (0..10)
        .map(|_| {
            let (http, token, user, id) = (http.clone(), bob.token.clone(), alice.user.clone(), alice.id.clone());
            tokio::spawn(async move { claim(&http, &token, &user, &id).await })
        })
        .collect();
    let mut one_time = std::collections::BTreeSet::new();
    let mut fallbacks = 0;
    for claim in claims {
        let keys = claim.await.expect("claim task");
        let (key_id, key) = keys.as_object().and_then(|k| k.iter().next()).expect("a key for every claim");
        if key_id == "signed_curve25519:fb" {
            assert_eq!(key["fallback"], true);
            fallbacks += 1;
        } else {
            assert!(one_time.insert(key_id.clone()), "{key_id} handed out twice");
        }
    }
    assert_eq!((one_time.len(), fallbacks), (5, 5));
    let counts = sync(http, &alice.token, "timeout=0").await;
    assert_eq!(counts["device_one_time_keys_count"]["signed_curve25519"], 0, "{counts}");
    assert_eq!(counts["device_unused_fallback_key_types"], json!([]), "the fallback key was used");
    // A new fallback key is unused again.
    let fallback = signed(json!({ "key": "fallback2", "fallback": true }), &alice.user, &alice.pair);
    assert_eq!(alice.upload(http, json!({ "fallback_keys": { "signed_curve25519:fb2": fallback } })).await.0, 200);
    let counts = sync(http, &alice.token, "timeout=0").await;
    assert_eq!(counts["device_unused_fallback_key_types"], json!(["signed_curve25519"]));
    // A device without keys, and an unknown one, give nothing.
    let bare = login(&server, "alice").await;
    assert!(claim(http, &bob.token, &alice.user, &bare.id).await.is_null());
    assert!(claim(http, &bob.token, &alice.user, "NOPE").await.is_null());
    server.stop().await;
}

#[tokio::test]
async fn a_key_change_reaches_exactly_the_users_sharing_a_room() {
    let server = TestServer::start().await;
    let http = &server.http;
    for name in ["alice", "bob", "carol", "dave"] {
        server.register(name, "pw").await;
    }
    let alice = login(&server, "alice").await;
    let bob = login(&server, "bob").await;
    let carol = login(&server, "carol").await;
    let dave = login(&server, "dave").await;
    let room = create_room(http, &alice.token, json!({ "preset": "public_chat" })).await;
    join(http, &bob.token, &room).await;
    let (bob_since, carol_since) = (next_batch(http, &bob.token).await, next_batch(http, &carol.token).await);

    // Bob and Carol long-poll; Alice's new keys wake Bob only, and he is told.
    let long_poll = |token: &str, since: &str| {
        let (http, token, since) = (http.clone(), token.to_owned(), since.to_owned());
        tokio::spawn(async move { sync(&http, &token, &format!("timeout=30000&since={since}")).await })
    };
    let waiting = long_poll(&bob.token, &bob_since);
    let carol_waiting = long_poll(&carol.token, &carol_since);
    server.until_sync_waiters(2).await;
    let wakeups = server.sync_wakeups();
    alice.publish(http, 1).await;
    let woken = waiting.await.expect("sync task");
    assert!(listed(&woken["device_lists"]["changed"], &alice.user), "{woken}");
    assert_eq!(server.sync_wakeups() - wakeups, 1, "one wake-up, Bob's: Carol shares no room with Alice");
    assert_eq!(server.sync_waiters(), 1, "Carol is still waiting");
    carol_waiting.abort();
    // Carol shares no room with Alice: nothing for her, in /sync or /keys/changes.
    let carol_sync = sync_since(http, &carol.token, &carol_since).await;
    assert!(!listed(&carol_sync["device_lists"]["changed"], &alice.user), "{carol_sync}");
    let path =
        |from: &str, to: &Value| format!("/_matrix/client/v3/keys/changes?from={from}&to={}", to.as_str().unwrap());
    let (status, changes) = http.get(&path(&carol_since, &carol_sync["next_batch"]), Some(&carol.token)).await;
    assert_eq!(status, 200, "{changes}");
    assert!(!listed(&changes["changed"], &alice.user), "{changes}");
    let (_, changes) = http.get(&path(&bob_since, &woken["next_batch"]), Some(&bob.token)).await;
    assert!(listed(&changes["changed"], &alice.user), "{changes}");
    // Old five-part tokens are still read.
    let five: Vec<&str> = bob_since.rsplitn(2, '_').collect();
    let (status, _) = http.get(&format!("/_matrix/client/v3/sync?timeout=0&since={}", five[1]), Some(&bob.token)).await;
    assert_eq!(status, 200);

    // Dave joins: Bob is told Dave's devices are new to him; Dave leaves: Bob is told he left.
    let since = woken["next_batch"].as_str().unwrap().to_owned();
    join(http, &dave.token, &room).await;
    let after_join = sync_since(http, &bob.token, &since).await;
    assert!(listed(&after_join["device_lists"]["changed"], &dave.user), "{after_join}");
    let since = after_join["next_batch"].as_str().unwrap().to_owned();
    leave(http, &dave.token, &room).await;
    let after_leave = sync_since(http, &bob.token, &since).await;
    assert!(listed(&after_leave["device_lists"]["left"], &dave.user), "{after_leave}");
    assert!(!listed(&after_leave["device_lists"]["changed"], &dave.user));
    // /keys/changes between the same tokens says the same as /sync: Dave is in `left`.
    let (status, changes) = http.get(&path(&since, &after_leave["next_batch"]), Some(&bob.token)).await;
    assert_eq!(status, 200, "{changes}");
    assert!(listed(&changes["left"], &dave.user) && !listed(&changes["changed"], &dave.user), "{changes}");
    assert_eq!(sorted(&changes["left"]), sorted(&after_leave["device_lists"]["left"]), "{changes} {after_leave}");
    assert_eq!(sorted(&changes["changed"]), sorted(&after_leave["device_lists"]["changed"]));
    // Bob leaves: Alice, whom he shares no other room with, is in his `left`.
    let since = after_leave["next_batch"].as_str().unwrap().to_owned();
    leave(http, &bob.token, &room).await;
    let bob_left = sync_since(http, &bob.token, &since).await;
    assert!(listed(&bob_left["device_lists"]["left"], &alice.user), "{bob_left}");
    let (_, changes) = http.get(&path(&since, &bob_left["next_batch"]), Some(&bob.token)).await;
    assert!(listed(&changes["left"], &alice.user), "after his last shared room: {changes}");
    assert_eq!(sorted(&changes["left"]), sorted(&bob_left["device_lists"]["left"]), "{changes} {bob_left}");
    // Alice, who stayed, is told Bob left too, by both.
    let (_, changes) = http.get(&path(&since, &bob_left["next_batch"]), Some(&alice.token)).await;
    assert!(listed(&changes["left"], &bob.user), "{changes}");

    // A deleted device is a change too, and its keys are gone.
    let alice_since = next_batch(http, &alice.token).await;
    let second = login(&server, "alice").await;
    second.publish(http, 1).await;
    let (status, body) = http
        .request(Method::DELETE, &format!("/_matrix/client/v3/devices/{}", second.id), Some(&alice.token), None)
        .await;
    assert_eq!(status, 401, "UIA first: {body}");
    let auth = json!({ "auth": { "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "alice" },
                                 "password": "pw", "session": body["session"] } });
    let (status, body) = http
        .request(
            Method::DELETE,
            &format!("/_matrix/client/v3/devices/{}", second.id),
            Some(&alice.token),
            Some(auth.to_string().into_bytes()),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let found = query(http, &alice.token, json!({ &alice.user: [] })).await;
    assert!(found["device_keys"][&alice.user].get(&second.id).is_none(), "{found}");
    assert!(found["device_keys"][&alice.user].get(&alice.id).is_some());
    let changes = sync_since(http, &alice.token, &alice_since).await;
    assert!(listed(&changes["device_lists"]["changed"], &alice.user), "{changes}");
    server.stop().await;
}

/// A user's cross-signing keys, each signed as the spec asks.
struct CrossSigning {
    master: Ed25519KeyPair,
    self_signing: Ed25519KeyPair,
    user_signing: Ed25519KeyPair,
}

impl CrossSigning {
    fn new() -> Self {
        // A cross-signing key's ID is its public key.
        let pair = || {
            let document = Ed25519KeyPair::generate();
            let version = public(&Ed25519KeyPair::from_der(&document, String::new()).expect("pair"));
            Ed25519KeyPair::from_der(&document, version).expect("pair")
        };
        Self { master: pair(), self_signing: pair(), user_signing: pair() }
    }

    fn key(user: &str, usage: &str, pair: &Ed25519KeyPair) -> Value {
        json!({ "user_id": user, "usage": [usage], "keys": { format!("ed25519:{}", public(pair)): public(pair) } })
    }

    fn upload_body(&self, user: &str) -> Value {
        json!({
            "master_key": Self::key(user, "master", &self.master),
            "self_signing_key": signed(Self::key(user, "self_signing", &self.self_signing), user, &self.master),
            "user_signing_key": signed(Self::key(user, "user_signing", &self.user_signing), user, &self.master),
        })
    }
}

async fn upload_signing(http: &Http, token: &str, body: &Value) -> (reqwest::StatusCode, Value) {
    http.post("/_matrix/client/v3/keys/device_signing/upload", Some(token), body).await
}

#[tokio::test]
async fn cross_signing_keys_and_signatures_are_checked_and_shown_to_the_right_users() {
    let server = TestServer::start().await;
    let http = &server.http;
    for name in ["alice", "bob", "carol"] {
        server.register(name, "pw").await;
    }
    let alice = login(&server, "alice").await;
    let bob = login(&server, "bob").await;
    let carol = login(&server, "carol").await;
    alice.publish(http, 0).await;
    let alice_keys = CrossSigning::new();
    let bob_keys = CrossSigning::new();

    // A self-signing key not signed by the master key is refused.
    let mut unsigned = alice_keys.upload_body(&alice.user);
    unsigned["self_signing_key"] = CrossSigning::key(&alice.user, "self_signing", &alice_keys.self_signing);
    assert_error(&upload_signing(http, &alice.token, &unsigned).await, 400, "M_INVALID_PARAM");
    // Someone else's keys too.
    assert_error(&upload_signing(http, &alice.token, &bob_keys.upload_body(&bob.user)).await, 400, "M_INVALID_PARAM");
    // The first upload needs no password; the same again neither; a replacement does.
    assert_eq!(upload_signing(http, &alice.token, &alice_keys.upload_body(&alice.user)).await.0, 200);
    assert_eq!(upload_signing(http, &alice.token, &alice_keys.upload_body(&alice.user)).await.0, 200);
    assert_eq!(upload_signing(http, &bob.token, &bob_keys.upload_body(&bob.user)).await.0, 200);
    let replacement = CrossSigning::new();
    let (status, challenge) = upload_signing(http, &alice.token, &replacement.upload_body(&alice.user)).await;
    assert_eq!(status, 401, "{challenge}");

    // Alice signs her device with her self-signing key: everyone sees it.
    let device_signed = signed(alice.device_keys(), &alice.user, &alice_keys.self_signing);
    let body = json!({ &alice.user: { &alice.id: device_signed } });
    let (status, result) = http.post("/_matrix/client/v3/keys/signatures/upload", Some(&alice.token), &body).await;
    assert_eq!((status.as_u16(), &result["failures"]), (200, &json!({})), "{result}");
    let ssk_id = format!("ed25519:{}", public(&alice_keys.self_signing));
    let seen = query(http, &carol.token, json!({ &alice.user: [] })).await;
    assert!(seen["device_keys"][&alice.user][&alice.id]["signatures"][&alice.user][&ssk_id].is_string(), "{seen}");
    assert!(seen["master_keys"][&alice.user].is_object());
    assert!(seen["self_signing_keys"][&alice.user].is_object());
    assert!(seen["user_signing_keys"].get(&alice.user).is_none(), "only Alice sees her user-signing key");
    let own = query(http, &alice.token, json!({ &alice.user: [] })).await;
    assert!(own["user_signing_keys"][&alice.user].is_object(), "{own}");

    // A signature by a wrong key is a per-key failure, the rest of the request still counts.
    let forged = signed(alice.device_keys(), &alice.user, &bob_keys.self_signing);
    let mut bob_master = CrossSigning::key(&bob.user, "master", &bob_keys.master);
    bob_master = signed(bob_master, &alice.user, &alice_keys.user_signing);
    let bob_master_id = public(&bob_keys.master);
    let body = json!({
        &alice.user: { &alice.id: forged },
        &bob.user: { &bob_master_id: bob_master },
    });
    let (status, result) = http.post("/_matrix/client/v3/keys/signatures/upload", Some(&alice.token), &body).await;
    assert_eq!(status, 200, "{result}");
    assert_eq!(result["failures"][&alice.user][&alice.id]["errcode"], "M_INVALID_SIGNATURE", "{result}");
    assert!(result["failures"].get(&bob.user).is_none(), "{result}");
    // Alice's signature on Bob's master key: Alice sees it, Carol does not.
    let usk_id = format!("ed25519:{}", public(&alice_keys.user_signing));
    let by_alice = query(http, &alice.token, json!({ &bob.user: [] })).await;
    assert!(by_alice["master_keys"][&bob.user]["signatures"][&alice.user][&usk_id].is_string(), "{by_alice}");
    let by_carol = query(http, &carol.token, json!({ &bob.user: [] })).await;
    assert!(by_carol["master_keys"][&bob.user]["signatures"].get(&alice.user).is_none(), "{by_carol}");
    server.stop().await;
}

fn session_key(index: u64, verified: bool) -> Value {
    json!({ "first_message_index": index, "forwarded_count": 0, "is_verified": verified,
            "session_data": { "ephemeral": "e", "ciphertext": format!("c{index}"), "mac": "m" } })
}

#[tokio::test]
async fn key_backup_versions_and_keys() {
    let server = TestServer::start().await;
    let http = &server.http;
    let token = server.register("alice", "pw").await;
    let other = server.register("bob", "pw").await;
    let token = token.as_str();
    let room = "!room:hs1.localhost";
    let session_path = |version: &str| format!("/_matrix/client/v3/room_keys/keys/{room}/s1?version={version}");

    // No backup yet.
    assert_error(&http.get("/_matrix/client/v3/room_keys/version", Some(token)).await, 404, "M_NOT_FOUND");
    assert_error(&http.put(&session_path("1"), Some(token), &session_key(0, false)).await, 404, "M_NOT_FOUND");
    let algorithm =
        json!({ "algorithm": "m.megolm_backup.v1.curve25519-aes-sha2", "auth_data": { "public_key": "pk" } });
    let (status, created) = http.post("/_matrix/client/v3/room_keys/version", Some(token), &algorithm).await;
    assert_eq!(status, 200, "{created}");
    let v1 = created["version"].as_str().unwrap().to_owned();

    // Keys go in; malformed ones are refused whole.
    let (status, put) = http.put(&session_path(&v1), Some(token), &session_key(5, false)).await;
    assert_eq!((status.as_u16(), &put["count"]), (200, &json!(1)), "{put}");
    let etag = put["etag"].clone();
    let malformed =
        json!({ "first_message_index": "zero", "forwarded_count": 0, "is_verified": false, "session_data": {} });
    assert_error(&http.put(&session_path(&v1), Some(token), &malformed).await, 400, "M_BAD_JSON");
    let bad_rooms =
        json!({ "rooms": { room: { "sessions": { "s2": session_key(0, false), "s3": { "session_data": 1 } } } } });
    let path = format!("/_matrix/client/v3/room_keys/keys?version={v1}");
    assert!(http.put(&path, Some(token), &bad_rooms).await.0.is_client_error());
    let (_, info) = http.get("/_matrix/client/v3/room_keys/version", Some(token)).await;
    assert_eq!((&info["count"], &info["etag"], &info["version"]), (&json!(1), &etag, &json!(v1)), "{info}");
    // A worse key does not replace a better one; a better one does.
    let (_, put) = http.put(&session_path(&v1), Some(token), &session_key(9, false)).await;
    assert_eq!(put["etag"], etag, "nothing changed: {put}");
    let (_, put) = http.put(&session_path(&v1), Some(token), &session_key(2, true)).await;
    assert_ne!(put["etag"], etag);
    let (status, key) = http.get(&session_path(&v1), Some(token)).await;
    assert_eq!((status.as_u16(), &key["first_message_index"]), (200, &json!(2)), "{key}");

    // A newer version makes the old one the wrong one to write to.
    let (_, created) = http.post("/_matrix/client/v3/room_keys/version", Some(token), &algorithm).await;
    let v2 = created["version"].as_str().unwrap().to_owned();
    let wrong = http.put(&session_path(&v1), Some(token), &session_key(0, false)).await;
    assert_error(&wrong, 403, "M_WRONG_ROOM_KEYS_VERSION");
    assert_eq!(wrong.1["current_version"], v2);
    // Another user sees none of it.
    assert_error(
        &http.get(&format!("/_matrix/client/v3/room_keys/version/{v1}"), Some(&other)).await,
        404,
        "M_NOT_FOUND",
    );
    assert_error(&http.get(&session_path(&v1), Some(&other)).await, 404, "M_NOT_FOUND");
    // Reads of keys: all, a room, a missing session.
    let (_, all) = http.get(&format!("/_matrix/client/v3/room_keys/keys?version={v1}"), Some(token)).await;
    assert!(all["rooms"][room]["sessions"]["s1"].is_object(), "{all}");
    let (_, empty) = http.get(&format!("/_matrix/client/v3/room_keys/keys/!other:hs?version={v1}"), Some(token)).await;
    assert_eq!(empty, json!({ "sessions": {} }));
    assert_error(
        &http.get(&format!("/_matrix/client/v3/room_keys/keys/{room}/nope?version={v1}"), Some(token)).await,
        404,
        "M_NOT_FOUND",
    );
    // auth_data can change, the algorithm cannot.
    let mut update = algorithm.clone();
    update["auth_data"] = json!({ "public_key": "pk2" });
    assert_eq!(http.put(&format!("/_matrix/client/v3/room_keys/version/{v2}"), Some(token), &update).await.0, 200);
    update["algorithm"] = json!("m.other");
    assert_error(
        &http.put(&format!("/_matrix/client/v3/room_keys/version/{v2}"), Some(token), &update).await,
        400,
        "M_INVALID_PARAM",
    );
    // Deleting keys counts down; deleting a version makes it unknown.
    let (status, deleted) = http.request(Method::DELETE, &session_path(&v1), Some(token), None).await;
    assert_eq!((status.as_u16(), &deleted["count"]), (200, &json!(0)), "{deleted}");
    let (status, _) =
        http.request(Method::DELETE, &format!("/_matrix/client/v3/room_keys/version/{v2}"), Some(token), None).await;
    assert_eq!(status, 200);
    assert_error(
        &http.get(&format!("/_matrix/client/v3/room_keys/version/{v2}"), Some(token)).await,
        404,
        "M_NOT_FOUND",
    );
    let (_, latest) = http.get("/_matrix/client/v3/room_keys/version", Some(token)).await;
    assert_eq!(latest["version"], v1, "{latest}");
    server.stop().await;
}
