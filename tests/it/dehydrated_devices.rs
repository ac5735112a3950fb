//! Dehydrated devices (MSC3814, issue #13) through HTTP with real ed25519 keys: a user's
//! device with no session, to which others encrypt while all the user's devices are offline;
//! its owner's next login reads what was sent to it and then replaces it.

use std::time::{Duration, Instant};

use reqwest::Method;
use ruma::signatures::Ed25519KeyPair;
use serde_json::{Value, json};

use crate::e2ee::{Device, claim, key_pair, listed, login, public, query, signed};
use crate::federation_e2ee::{device_on, sync_from};
use crate::federation_keys::Network;
use crate::federation_rooms::{shared_room, sync_until};
use crate::support::{Http, TestServer, assert_error, create_room, sync};

const DEHYDRATED: &str = "/_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device";

fn events_path(device_id: &str) -> String {
    format!("{DEHYDRATED}/{device_id}/events")
}

/// A dehydrated device as a client makes one: its own signing key, its keys marked
/// `dehydrated: true`, and the encrypted pickle the server keeps for the owner.
struct Dehydrated {
    user: String,
    id: String,
    pair: Ed25519KeyPair,
}

impl Dehydrated {
    fn new(user: &str, id: &str) -> Self {
        Self { user: user.to_owned(), id: id.to_owned(), pair: key_pair(id) }
    }

    fn device_keys(&self) -> Value {
        let unsigned = json!({
            "user_id": self.user,
            "device_id": self.id,
            "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
            "keys": { format!("ed25519:{}", self.id): public(&self.pair), format!("curve25519:{}", self.id): "curve" },
            "dehydrated": true,
        });
        signed(unsigned, &self.user, &self.pair)
    }

    fn one_time_key(&self, n: usize) -> Value {
        signed(json!({ "key": format!("otk-{}-{n}", self.id) }), &self.user, &self.pair)
    }

    fn device_data(&self) -> Value {
        json!({ "algorithm": "org.matrix.msc3814.v2", "device_pickle": format!("pickle-of-{}", self.id), "nonce": "n" })
    }

    /// The `PUT` body with `otks` one-time keys and a fallback key.
    fn body(&self, otks: usize) -> Value {
        let one_time_keys: serde_json::Map<String, Value> =
            (0..otks).map(|n| (format!("signed_curve25519:{n:04}"), self.one_time_key(n))).collect();
        let fallback = signed(json!({ "key": "fallback", "fallback": true }), &self.user, &self.pair);
        json!({
            "device_id": self.id,
            "initial_device_display_name": "Offline device",
            "device_data": self.device_data(),
            "device_keys": self.device_keys(),
            "one_time_keys": one_time_keys,
            "fallback_keys": { "signed_curve25519:fb": fallback },
        })
    }

    async fn put(&self, http: &Http, token: &str, otks: usize) {
        let (status, body) = http.put(DEHYDRATED, Some(token), &self.body(otks)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body, json!({ "device_id": self.id }));
    }
}

async fn events(http: &Http, token: &str, device_id: &str, next_batch: Option<&str>) -> (Vec<Value>, String) {
    let body = match next_batch {
        Some(token) => json!({ "next_batch": token }),
        None => json!({}),
    };
    let (status, body) = http.post(&events_path(device_id), Some(token), &body).await;
    assert_eq!(status, 200, "{body}");
    let next = body["next_batch"].as_str().expect("next_batch always present").to_owned();
    (body["events"].as_array().cloned().expect("events"), next)
}

async fn send_to_device(http: &Http, token: &str, txn: &str, user: &str, device: &str, n: usize) {
    let messages = json!({ "messages": { user: { device: { "n": n } } } });
    let (status, body) =
        http.put(&format!("/_matrix/client/v3/sendToDevice/m.test/{txn}"), Some(token), &messages).await;
    assert_eq!(status, 200, "{body}");
}

async fn device_ids(http: &Http, token: &str) -> Vec<String> {
    let (status, body) = http.get("/_matrix/client/v3/devices", Some(token)).await;
    assert_eq!(status, 200, "{body}");
    body["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| d["device_id"].as_str().expect("id").to_owned())
        .collect()
}

/// alice (logged in once) and bob, each with a device.
async fn alice_and_bob(server: &TestServer) -> (Device, Device) {
    server.register("alice", "pw").await;
    server.register("bob", "pw").await;
    (login(server, "alice").await, login(server, "bob").await)
}

#[tokio::test]
async fn a_dehydrated_device_is_stored_read_back_and_replaced_entirely() {
    let server = TestServer::start().await;
    let http = &server.http;
    let (alice, bob) = alice_and_bob(&server).await;
    assert_error(&http.get(DEHYDRATED, Some(&alice.token)).await, 404, "M_NOT_FOUND");

    let first = Dehydrated::new(&alice.user, "DEHYDRATED1");
    first.put(http, &alice.token, 3).await;
    let (status, body) = http.get(DEHYDRATED, Some(&alice.token)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({ "device_id": "DEHYDRATED1", "device_data": first.device_data() }));
    // It is one of alice's devices, but no one can log in to it.
    assert!(device_ids(http, &alice.token).await.contains(&"DEHYDRATED1".to_owned()));
    let login_to_it = json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "alice" },
        "password": "pw", "device_id": "DEHYDRATED1" });
    assert_error(&http.post("/_matrix/client/v3/login", None, &login_to_it).await, 403, "M_FORBIDDEN");
    // Nor take an ordinary device's ID.
    let mut taken = Dehydrated::new(&alice.user, &alice.id).body(1);
    taken["device_id"] = json!(alice.id);
    assert_error(&http.put(DEHYDRATED, Some(&alice.token), &taken).await, 400, "M_INVALID_PARAM");

    // bob sends to it while alice is away.
    send_to_device(http, &bob.token, "t1", &alice.user, "DEHYDRATED1", 1).await;
    let keys = query(http, &bob.token, json!({ &alice.user: [] })).await;
    assert_eq!(keys["device_keys"][&alice.user]["DEHYDRATED1"]["dehydrated"], true, "{keys}");

    // A second upload replaces the first: device, keys and inbox.
    let second = Dehydrated::new(&alice.user, "DEHYDRATED2");
    second.put(http, &alice.token, 2).await;
    let (_, body) = http.get(DEHYDRATED, Some(&alice.token)).await;
    assert_eq!(body["device_id"], "DEHYDRATED2");
    let keys = query(http, &bob.token, json!({ &alice.user: [] })).await;
    let devices = keys["device_keys"][&alice.user].as_object().expect("alice's devices").clone();
    assert!(!devices.contains_key("DEHYDRATED1") && devices.contains_key("DEHYDRATED2"), "{keys}");
    let ids = device_ids(http, &alice.token).await;
    assert!(!ids.contains(&"DEHYDRATED1".to_owned()) && ids.contains(&"DEHYDRATED2".to_owned()), "{ids:?}");
    assert!(claim(http, &bob.token, &alice.user, "DEHYDRATED1").await.is_null());
    assert_error(&http.post(&events_path("DEHYDRATED1"), Some(&alice.token), &json!({})).await, 403, "M_FORBIDDEN");

    // A device under the first one's ID again starts with an empty inbox and only its new keys.
    let again = Dehydrated::new(&alice.user, "DEHYDRATED1");
    again.put(http, &alice.token, 1).await;
    let (inbox, _) = events(http, &alice.token, "DEHYDRATED1", None).await;
    assert!(inbox.is_empty(), "the replaced device's message must be gone: {inbox:?}");
    let keys = query(http, &bob.token, json!({ &alice.user: ["DEHYDRATED1"] })).await;
    let mut listed_keys = keys["device_keys"][&alice.user]["DEHYDRATED1"].clone();
    listed_keys.as_object_mut().expect("the device's keys").remove("unsigned");
    assert_eq!(listed_keys, again.device_keys(), "{keys}");
    let claimed = claim(http, &bob.token, &alice.user, "DEHYDRATED1").await;
    assert_eq!(claimed["signed_curve25519:0000"], again.one_time_key(0), "{claimed}");
}

#[tokio::test]
async fn others_see_the_dehydrated_device_claim_its_keys_and_learn_of_changes() {
    let server = TestServer::start().await;
    let http = &server.http;
    let (alice, bob) = alice_and_bob(&server).await;
    let room = create_room(http, &alice.token, json!({ "preset": "public_chat" })).await;
    let (status, body) = http.post(&format!("/_matrix/client/v3/join/{room}"), Some(&bob.token), &json!({})).await;
    assert_eq!(status, 200, "{body}");
    let since = sync(http, &bob.token, "timeout=0").await["next_batch"].as_str().expect("token").to_owned();

    let device = Dehydrated::new(&alice.user, "OFFLINE");
    device.put(http, &alice.token, 2).await;

    let changed = sync(http, &bob.token, &format!("timeout=0&since={since}")).await;
    assert!(listed(&changed["device_lists"]["changed"], &alice.user), "{changed}");
    let keys = query(http, &bob.token, json!({ &alice.user: [] })).await;
    let listed_keys = &keys["device_keys"][&alice.user]["OFFLINE"];
    assert_eq!(listed_keys["dehydrated"], true, "{keys}");
    assert_eq!(listed_keys["unsigned"]["device_display_name"], "Offline device", "{keys}");
    // Each one-time key once, then the fallback key.
    let first = claim(http, &bob.token, &alice.user, "OFFLINE").await;
    let second = claim(http, &bob.token, &alice.user, "OFFLINE").await;
    assert_ne!(first, second);
    for claimed in [&first, &second] {
        let (key_id, key) = claimed.as_object().and_then(|keys| keys.iter().next()).expect("a key");
        assert!(key_id.starts_with("signed_curve25519:0"), "{claimed}");
        assert!(key["key"].as_str().is_some_and(|k| k.starts_with("otk-OFFLINE-")), "{claimed}");
    }
    let fallback = claim(http, &bob.token, &alice.user, "OFFLINE").await;
    assert_eq!(fallback["signed_curve25519:fb"]["key"], "fallback", "{fallback}");

    // Deleting it is a device-list change too, and the device is gone from every list.
    let since = changed["next_batch"].as_str().expect("token").to_owned();
    let (status, body) = http.request(Method::DELETE, DEHYDRATED, Some(&alice.token), None).await;
    assert_eq!((status.as_u16(), body), (200, json!({ "device_id": "OFFLINE" })));
    let changed = sync(http, &bob.token, &format!("timeout=0&since={since}")).await;
    assert!(listed(&changed["device_lists"]["changed"], &alice.user), "{changed}");
    let keys = query(http, &bob.token, json!({ &alice.user: [] })).await;
    assert!(keys["device_keys"][&alice.user].get("OFFLINE").is_none(), "{keys}");
    assert!(!device_ids(http, &alice.token).await.contains(&"OFFLINE".to_owned()));
    assert_error(&http.get(DEHYDRATED, Some(&alice.token)).await, 404, "M_NOT_FOUND");
    assert_error(&http.request(Method::DELETE, DEHYDRATED, Some(&alice.token), None).await, 404, "M_NOT_FOUND");
    assert_error(&http.post(&events_path("OFFLINE"), Some(&alice.token), &json!({})).await, 403, "M_FORBIDDEN");
}

#[tokio::test]
async fn to_device_messages_wait_until_the_owner_acknowledges_them() {
    let server = TestServer::start().await;
    let http = &server.http;
    let (alice, bob) = alice_and_bob(&server).await;
    let device = Dehydrated::new(&alice.user, "INBOX");
    device.put(http, &alice.token, 1).await;
    // 119 messages to the device, and one to all of alice's devices: 120, more than one page.
    for n in 0..119 {
        send_to_device(http, &bob.token, &format!("t{n}"), &alice.user, "INBOX", n).await;
    }
    send_to_device(http, &bob.token, "all", &alice.user, "*", 119).await;

    let (page, first_token) = events(http, &alice.token, "INBOX", None).await;
    assert_eq!(page.len(), 100);
    assert_eq!(page[0], json!({ "sender": bob.user, "type": "m.test", "content": { "n": 0 } }));
    // Without the token nothing is acknowledged: the same page again.
    let (again, _) = events(http, &alice.token, "INBOX", None).await;
    assert_eq!(again, page);
    // With it, the first page is deleted and the rest follows.
    let (rest, second_token) = events(http, &alice.token, "INBOX", Some(&first_token)).await;
    let numbers: Vec<u64> = rest.iter().map(|e| e["content"]["n"].as_u64().expect("n")).collect();
    assert_eq!(numbers, (100..120).collect::<Vec<_>>());
    let (end, last_token) = events(http, &alice.token, "INBOX", Some(&second_token)).await;
    assert!(end.is_empty(), "{end:?}");
    // The acknowledged messages are gone: the first token no longer brings them back.
    let (replay, _) = events(http, &alice.token, "INBOX", Some(&first_token)).await;
    assert!(replay.is_empty(), "{replay:?}");
    let (end, _) = events(http, &alice.token, "INBOX", Some(&last_token)).await;
    assert!(end.is_empty());
    // alice's ordinary device got only the message to all her devices.
    let inbox = sync(http, &alice.token, "timeout=0").await["to_device"]["events"].clone();
    assert_eq!(inbox.as_array().map(Vec::len), Some(1), "{inbox}");
    let bad = http.post(&events_path("INBOX"), Some(&alice.token), &json!({ "next_batch": "not-a-token" })).await;
    assert_error(&bad, 400, "M_INVALID_PARAM");
}

#[tokio::test]
async fn no_one_reads_another_users_dehydrated_device_or_an_ordinary_one() {
    let server = TestServer::start().await;
    let http = &server.http;
    let (alice, bob) = alice_and_bob(&server).await;
    Dehydrated::new(&alice.user, "ALICEDEV").put(http, &alice.token, 1).await;
    send_to_device(http, &bob.token, "t1", &alice.user, "ALICEDEV", 1).await;

    // bob has no dehydrated device; with one, alice's is still not his.
    assert_error(&http.post(&events_path("ALICEDEV"), Some(&bob.token), &json!({})).await, 403, "M_FORBIDDEN");
    Dehydrated::new(&bob.user, "BOBDEV").put(http, &bob.token, 1).await;
    assert_error(&http.post(&events_path("ALICEDEV"), Some(&bob.token), &json!({})).await, 403, "M_FORBIDDEN");
    // An ordinary device's inbox is read by `/sync`, never here.
    assert_error(&http.post(&events_path(&alice.id), Some(&alice.token), &json!({})).await, 403, "M_FORBIDDEN");
    assert_error(&http.post(&events_path("ALICEDEV"), None, &json!({})).await, 401, "M_MISSING_TOKEN");
    assert_error(&http.get(DEHYDRATED, None).await, 401, "M_MISSING_TOKEN");
    // bob's view of his own device is his; alice's message is still waiting for her.
    assert_eq!(http.get(DEHYDRATED, Some(&bob.token)).await.1["device_id"], "BOBDEV");
    let (inbox, _) = events(http, &alice.token, "ALICEDEV", None).await;
    assert_eq!(inbox.len(), 1);
}

#[tokio::test]
async fn bad_uploads_are_refused_with_nothing_stored() {
    let server = TestServer::start().await;
    let http = &server.http;
    let (alice, bob) = alice_and_bob(&server).await;
    let device = Dehydrated::new(&alice.user, "DEHYD");
    let good = device.body(2);
    let devices_before = device_ids(http, &alice.token).await;
    let mut cases: Vec<(&str, Value, &str)> = Vec::new();

    let mut other_user = good.clone();
    other_user["device_keys"] = Dehydrated::new(&bob.user, "DEHYD").device_keys();
    cases.push(("keys for another user", other_user, "M_INVALID_PARAM"));
    let mut other_device = good.clone();
    other_device["device_keys"] = Dehydrated::new(&alice.user, "ELSEWHERE").device_keys();
    cases.push(("keys for another device", other_device, "M_INVALID_PARAM"));
    let mut forged = good.clone();
    let mut unsigned = device.device_keys();
    unsigned.as_object_mut().expect("object").remove("signatures");
    forged["device_keys"] = signed(unsigned.clone(), &alice.user, &key_pair("DEHYD"));
    cases.push(("a signature by another key", forged, "M_INVALID_PARAM"));
    let mut not_signed = good.clone();
    not_signed["device_keys"] = unsigned;
    cases.push(("unsigned keys", not_signed, "M_INVALID_PARAM"));
    let mut not_dehydrated = good.clone();
    let mut plain = device.device_keys();
    plain.as_object_mut().expect("object").remove("dehydrated");
    plain.as_object_mut().expect("object").remove("signatures");
    not_dehydrated["device_keys"] = signed(plain, &alice.user, &device.pair);
    cases.push(("keys not marked dehydrated", not_dehydrated, "M_INVALID_PARAM"));
    let mut bad_otk = good.clone();
    bad_otk["one_time_keys"]["signed_curve25519:0000"] =
        signed(json!({ "key": "otk" }), &alice.user, &key_pair("DEHYD"));
    cases.push(("a badly signed one-time key", bad_otk, "M_INVALID_PARAM"));
    let mut no_data = good.clone();
    no_data.as_object_mut().expect("object").remove("device_data");
    cases.push(("no device_data", no_data, "M_BAD_JSON"));
    let mut data_not_object = good.clone();
    data_not_object["device_data"] = json!("pickle");
    cases.push(("device_data not an object", data_not_object, "M_BAD_JSON"));
    let mut no_keys = good.clone();
    no_keys.as_object_mut().expect("object").remove("device_keys");
    cases.push(("no device_keys", no_keys, "M_BAD_JSON"));

    for (what, body, errcode) in cases {
        let response = http.put(DEHYDRATED, Some(&alice.token), &body).await;
        assert_eq!(response.0.as_u16(), 400, "{what}: {}", response.1);
        assert_eq!(response.1["errcode"], errcode, "{what}: {}", response.1);
        assert_error(&http.get(DEHYDRATED, Some(&alice.token)).await, 404, "M_NOT_FOUND");
    }
    // Nothing of any refused upload was stored.
    assert_eq!(device_ids(http, &alice.token).await, devices_before);
    let keys = query(http, &bob.token, json!({ &alice.user: [] })).await;
    assert!(keys["device_keys"][&alice.user].as_object().is_none_or(|d| d.is_empty()), "{keys}");
    assert!(claim(http, &bob.token, &alice.user, "DEHYD").await.is_null());
    // The good one is accepted.
    device.put(http, &alice.token, 2).await;
}

#[tokio::test]
async fn deleting_the_device_through_delete_devices_removes_the_dehydrated_device() {
    let server = TestServer::start().await;
    let http = &server.http;
    let (alice, _bob) = alice_and_bob(&server).await;
    let devices_before = device_ids(http, &alice.token).await;
    Dehydrated::new(&alice.user, "GONE").put(http, &alice.token, 1).await;
    let auth =
        json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "alice" }, "password": "pw" });
    let body = json!({ "devices": ["GONE"], "auth": auth });
    let (status, body) = http.post("/_matrix/client/v3/delete_devices", Some(&alice.token), &body).await;
    assert_eq!(status, 200, "{body}");
    assert_error(&http.get(DEHYDRATED, Some(&alice.token)).await, 404, "M_NOT_FOUND");
    assert_eq!(device_ids(http, &alice.token).await, devices_before);
    // A new one can be made afterwards.
    Dehydrated::new(&alice.user, "NEW").put(http, &alice.token, 1).await;
}

#[tokio::test]
async fn versions_advertise_dehydrated_devices() {
    let server = TestServer::start().await;
    let (status, body) = server.http.get("/_matrix/client/versions", None).await;
    assert_eq!(status, 200);
    assert_eq!(body["unstable_features"]["org.matrix.msc3814"], true, "{body}");
}

#[tokio::test]
async fn over_federation_the_dehydrated_device_is_a_device_like_any_other() {
    let net = Network::new(&["lat1.test", "lat2.test"]);
    let lat1 = net.start("lat1.test").await;
    let lat2 = net.start("lat2.test").await;
    let (_, _, room) = shared_room(&net, &lat1, &lat2).await;
    let alice = device_on(&lat1, "alice").await;
    let bob = device_on(&lat2, "bob").await;
    let first = sync_until(&lat2, &bob.token, "the joined room", |s| s["rooms"]["join"][&room].is_object()).await;
    let since = first["next_batch"].as_str().expect("next_batch").to_owned();

    // alice leaves a dehydrated device on lat1; bob on lat2 learns of it and encrypts to it.
    Dehydrated::new(&alice.user, "ABROAD").put(&lat1.http, &alice.token, 2).await;
    sync_from(&lat2, &bob.token, &since, "alice's new dehydrated device", |s| {
        listed(&s["device_lists"]["changed"], &alice.user)
    })
    .await;
    let keys = query(&lat2.http, &bob.token, json!({ &alice.user: [] })).await;
    assert_eq!(keys["device_keys"][&alice.user]["ABROAD"]["dehydrated"], true, "{keys}");
    let claimed = claim(&lat2.http, &bob.token, &alice.user, "ABROAD").await;
    assert!(claimed.as_object().is_some_and(|keys| keys.keys().any(|id| id.starts_with("signed_curve25519:0"))));
    send_to_device(&lat2.http, &bob.token, "t1", &alice.user, "ABROAD", 7).await;

    // The message crosses as an `m.direct_to_device` EDU and waits in the device's inbox.
    let deadline = Instant::now() + Duration::from_secs(30);
    let inbox = loop {
        let (inbox, _) = events(&lat1.http, &alice.token, "ABROAD", None).await;
        if !inbox.is_empty() || Instant::now() > deadline {
            break inbox;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(inbox, vec![json!({ "sender": bob.user, "type": "m.test", "content": { "n": 7 } })]);
}
