//! End-to-end encryption between users of two Lattice servers on loopback (issues #11, #13):
//! a key query or claim for another server's user is asked of that server, to-device messages
//! cross as `m.direct_to_device` EDUs, and a device-list change reaches the room-mates on the
//! other server. First through HTTP with real ed25519 keys, then with two `matrix-sdk` clients
//! that encrypt and decrypt; and what another server may not do.

use std::time::{Duration, Instant};

use matrix_sdk::Client;
use matrix_sdk::config::SyncSettings;
use matrix_sdk::ruma::api::client::room::create_room::v3::Request as CreateRoomRequest;
use matrix_sdk::ruma::events::room::encryption::RoomEncryptionEventContent;
use matrix_sdk::ruma::events::room::message::RoomMessageEventContent;
use matrix_sdk::ruma::events::{AnySyncMessageLikeEvent, AnySyncTimelineEvent, InitialStateEvent};
use matrix_sdk::ruma::{OwnedEventId, OwnedRoomId, RoomId};
use reqwest::Method;
use serde_json::{Value, json};

use crate::e2ee::{Device, claim, key_pair, listed, query};
use crate::federation_keys::{Network, Server};
use crate::federation_rooms::{shared_room, signed_request, sync_until};
use crate::support::assert_error;

pub(crate) async fn device_on(server: &Server, name: &str) -> Device {
    let (status, body) = server.http.login(name, "password").await;
    assert_eq!(status, 200, "{body}");
    let id = body["device_id"].as_str().expect("device ID").to_owned();
    Device {
        user: format!("@{name}:{}", server_name(server)),
        token: body["access_token"].as_str().expect("token").to_owned(),
        pair: key_pair(&id),
        id,
    }
}

fn server_name(server: &Server) -> String {
    server.name()
}

/// `/sync` since `since` until `found` holds (30 s at most); the last answer.
pub(crate) async fn sync_from(
    server: &Server,
    token: &str,
    since: &str,
    what: &str,
    found: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut since = since.to_owned();
    loop {
        let query = format!("/_matrix/client/v3/sync?timeout=1000&since={since}");
        let (status, body) = server.http.get(&query, Some(token)).await;
        assert_eq!(status, 200, "{body}");
        if found(&body) {
            return body;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        since = body["next_batch"].as_str().expect("next_batch").to_owned();
    }
}

fn to_device_events(sync: &Value) -> Vec<Value> {
    sync["to_device"]["events"].as_array().cloned().unwrap_or_default()
}

#[tokio::test]
async fn keys_to_device_messages_and_device_lists_cross_between_servers() {
    let net = Network::new(&["lat1.test", "lat2.test"]);
    let mut lat1 = net.start("lat1.test").await;
    let mut lat2 = net.start("lat2.test").await;
    let (_, _, room) = shared_room(&net, &lat1, &lat2).await;
    let alice = device_on(&lat1, "alice").await;
    let bob = device_on(&lat2, "bob").await;
    sync_until(&lat2, &bob.token, "the joined room", |s| s["rooms"]["join"][&room].is_object()).await;
    alice.publish(&lat1.http, 3).await;
    bob.publish(&lat2.http, 3).await;

    // alice asks her server for bob's keys: lat1 asks lat2. No display names leave bob's server.
    let keys = query(&lat1.http, &alice.token, json!({ &bob.user: [] })).await;
    let bobs = &keys["device_keys"][&bob.user][&bob.id];
    assert_eq!(bobs["keys"][format!("ed25519:{}", bob.id)], bob.device_keys()["keys"][format!("ed25519:{}", bob.id)]);
    assert_eq!(bobs["signatures"], bob.device_keys()["signatures"], "{keys}");
    assert!(bobs["unsigned"]["device_display_name"].is_null(), "{keys}");
    assert!(keys["failures"].as_object().is_none_or(|failures| failures.is_empty()), "{keys}");
    // And the other way, with one query naming users of both servers.
    let keys = query(&lat2.http, &bob.token, json!({ &alice.user: [], &bob.user: [] })).await;
    assert!(keys["device_keys"][&alice.user][&alice.id].is_object(), "{keys}");
    assert!(keys["device_keys"][&bob.user][&bob.id].is_object(), "{keys}");

    // Claims go to the device's server: each one-time key once, then the fallback key.
    let mut claimed = Vec::new();
    for _ in 0..4 {
        let key = claim(&lat1.http, &alice.token, &bob.user, &bob.id).await;
        let (id, key) = key.as_object().and_then(|k| k.iter().next()).expect("a key");
        claimed.push((id.clone(), key["fallback"] == true));
    }
    let ids: std::collections::BTreeSet<&String> = claimed.iter().map(|(id, _)| id).collect();
    assert_eq!(ids.len(), 4, "{claimed:?}");
    assert_eq!(claimed.iter().filter(|(_, fallback)| *fallback).count(), 1, "{claimed:?}");
    let (status, counts) = bob.upload(&lat2.http, json!({})).await;
    assert_eq!((status.as_u16(), &counts["one_time_key_counts"]["signed_curve25519"]), (200, &json!(0)));

    // A to-device message from alice reaches bob's device once, even when alice's client
    // retries the request.
    let bob_since = sync_until(&lat2, &bob.token, "a first sync", |_| true).await["next_batch"]
        .as_str()
        .expect("next_batch")
        .to_owned();
    let path = "/_matrix/client/v3/sendToDevice/m.room_key_request/txn-1";
    let message = json!({ "messages": { &bob.user: { &bob.id: { "secret": "for bob's eyes" } } } });
    for _ in 0..2 {
        let (status, body) = lat1.http.put(path, Some(&alice.token), &message).await;
        assert_eq!(status, 200, "{body}");
    }
    let sync =
        sync_from(&lat2, &bob.token, &bob_since, "alice's to-device message", |s| !to_device_events(s).is_empty())
            .await;
    let events = to_device_events(&sync);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        (&events[0]["sender"], &events[0]["type"], &events[0]["content"]["secret"]),
        (&json!(alice.user), &json!("m.room_key_request"), &json!("for bob's eyes"))
    );
    let next = sync["next_batch"].as_str().expect("next_batch").to_owned();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, later) = lat2.http.get(&format!("/_matrix/client/v3/sync?timeout=0&since={next}"), Some(&bob.token)).await;
    assert!(to_device_events(&later).is_empty(), "delivered twice: {later}");

    // bob logs in on a second device: alice's /sync on the other server tells her bob's list
    // changed, and a new query shows the device. Deleting it does the same.
    let alice_since = sync_until(&lat1, &alice.token, "a first sync", |_| true).await["next_batch"]
        .as_str()
        .expect("next_batch")
        .to_owned();
    let laptop = device_on(&lat2, "bob").await;
    laptop.publish(&lat2.http, 1).await;
    let sync = sync_from(&lat1, &alice.token, &alice_since, "bob's new device", |s| {
        listed(&s["device_lists"]["changed"], &bob.user)
    })
    .await;
    let keys = query(&lat1.http, &alice.token, json!({ &bob.user: [] })).await;
    assert!(keys["device_keys"][&bob.user][&laptop.id].is_object(), "{keys}");
    let alice_since = sync["next_batch"].as_str().expect("next_batch").to_owned();
    let auth = json!({ "auth": { "type": "m.login.password", "password": "password",
        "identifier": { "type": "m.id.user", "user": "bob" } } });
    let path = format!("/_matrix/client/v3/devices/{}", laptop.id);
    let (status, body) =
        lat2.http.request(Method::DELETE, &path, Some(&bob.token), Some(auth.to_string().into_bytes())).await;
    assert_eq!(status, 200, "{body}");
    sync_from(&lat1, &alice.token, &alice_since, "bob's deleted device", |s| {
        listed(&s["device_lists"]["changed"], &bob.user)
    })
    .await;
    let keys = query(&lat1.http, &alice.token, json!({ &bob.user: [] })).await;
    assert!(keys["device_keys"][&bob.user][&laptop.id].is_null(), "{keys}");

    // With bob's server down, his list (cached: he shares a room with alice) still answers.
    // A user of that server who shares no room is not cached: the server that does not answer
    // is reported in `failures`, and the local part still answers.
    lat2.stop().await;
    let keys = query(&lat1.http, &alice.token, json!({ &bob.user: [], &alice.user: [] })).await;
    assert!(keys["device_keys"][&bob.user][&bob.id].is_object(), "from the cache: {keys}");
    assert!(keys["failures"].as_object().is_none_or(|f| f.is_empty()), "{keys}");
    let stranger = "@stranger:lat2.test";
    let keys = query(&lat1.http, &alice.token, json!({ stranger: [], &alice.user: [] })).await;
    assert!(keys["failures"]["lat2.test"].is_object(), "{keys}");
    assert!(keys["device_keys"][&alice.user][&alice.id].is_object(), "{keys}");
    lat1.stop().await;
}

#[tokio::test]
async fn another_server_gets_keys_only_and_cannot_speak_for_others() {
    let net = Network::new(&["lat1.test", "lat2.test", "lat3.test"]);
    let mut lat1 = net.start("lat1.test").await;
    let mut lat2 = net.start("lat2.test").await;
    let (_, _, room) = shared_room(&net, &lat1, &lat2).await;
    let alice = device_on(&lat1, "alice").await;
    alice.publish(&lat1.http, 2).await;
    let key2 = lat2.signing_key();
    let as_lat2 = |method: Method, path: &str, body: Option<Value>| {
        let net = &net;
        let key2 = &key2;
        let path = path.to_owned();
        async move { signed_request(net, ("lat2.test", key2), method, &path, body).await }
    };

    // Unsigned requests are refused; signed ones get alice's keys, without display names.
    let (status, _) = net
        .request(
            "lat1.test",
            Method::POST,
            "/_matrix/federation/v1/user/keys/query",
            None,
            Some(&json!({ "device_keys": { &alice.user: [] } })),
        )
        .await;
    assert_eq!(status, 401);
    let (status, keys) = as_lat2(
        Method::POST,
        "/_matrix/federation/v1/user/keys/query",
        Some(json!({ "device_keys": { &alice.user: [], "@someone:lat2.test": [] } })),
    )
    .await;
    assert_eq!(status, 200, "{keys}");
    assert!(keys["device_keys"][&alice.user][&alice.id].is_object(), "{keys}");
    assert!(keys["device_keys"]["@someone:lat2.test"].is_null(), "{keys}");
    let (status, bad) =
        as_lat2(Method::POST, "/_matrix/federation/v1/user/keys/query", Some(json!({ "device_keys": 3 }))).await;
    assert_error(&(status, bad), 400, "M_BAD_JSON");

    // The device list for a resync: the device and its keys, a stream ID, no display name.
    let path = format!("/_matrix/federation/v1/user/devices/{}", alice.user);
    let (status, devices) = as_lat2(Method::GET, &path, None).await;
    assert_eq!(status, 200, "{devices}");
    assert_eq!(devices["user_id"], alice.user.as_str());
    assert!(devices["stream_id"].as_u64().is_some_and(|id| id > 0), "{devices}");
    let listed_device = devices["devices"]
        .as_array()
        .and_then(|list| list.iter().find(|d| d["device_id"] == alice.id.as_str()))
        .expect("alice's device listed");
    assert!(listed_device["keys"].is_object() && listed_device["device_display_name"].is_null(), "{devices}");
    let (status, body) = as_lat2(Method::GET, "/_matrix/federation/v1/user/devices/@bob:lat2.test", None).await;
    assert_error(&(status, body), 400, "M_INVALID_PARAM");

    // lat2 may not send to-device messages in the name of lat3's users, nor report device
    // changes of lat1's own users: the EDUs are dropped.
    let since = sync_until(&lat1, &alice.token, "a first sync", |_| true).await["next_batch"]
        .as_str()
        .expect("next_batch")
        .to_owned();
    let forged = json!({
        "origin": "lat2.test", "origin_server_ts": 1, "pdus": [],
        "edus": [
            { "edu_type": "m.direct_to_device", "content": {
                "sender": "@mallory:lat3.test", "type": "m.room.encrypted", "message_id": "m1",
                "messages": { &alice.user: { "*": { "forged": true } } } } },
            { "edu_type": "m.device_list_update", "content": {
                "user_id": &alice.user, "device_id": "EVIL", "stream_id": 9, "prev_id": [], "deleted": false } },
            { "edu_type": "m.direct_to_device", "content": {
                "sender": "@bob:lat2.test", "type": "m.room.encrypted", "message_id": "m2",
                "messages": { &alice.user: { &alice.id: { "genuine": true } } } } },
        ],
    });
    let (status, body) = as_lat2(Method::PUT, "/_matrix/federation/v1/send/forged-1", Some(forged.clone())).await;
    assert_eq!(status, 200, "{body}");
    // The same transaction again changes nothing.
    let (status, _) = as_lat2(Method::PUT, "/_matrix/federation/v1/send/forged-1", Some(forged)).await;
    assert_eq!(status, 200);
    let sync = sync_from(&lat1, &alice.token, &since, "the genuine message", |s| !to_device_events(s).is_empty()).await;
    let events = to_device_events(&sync);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!((&events[0]["sender"], &events[0]["content"]["genuine"]), (&json!("@bob:lat2.test"), &json!(true)));
    assert!(!listed(&sync["device_lists"]["changed"], &alice.user), "{sync}");
    let _ = room;
    lat2.stop().await;
    lat1.stop().await;
}

async fn sdk_client(server: &Server, name: &str) -> Client {
    server.register_user(name).await;
    let client = Client::builder().homeserver_url(&server.http.base).build().await.expect("client builds");
    client.matrix_auth().login_username(name, "password").send().await.expect("login");
    client
}

/// Syncs both clients until `event` decrypts for `reader` (federation is asynchronous).
async fn decrypted_in_time(reader: &Client, other: &Client, room_id: &RoomId, event: &OwnedEventId) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for client in [reader, other] {
            client.sync_once(SyncSettings::default().timeout(Duration::from_millis(200))).await.expect("sync");
        }
        if let Some(room) = reader.get_room(room_id)
            && let Ok(timeline_event) = room.event(event, None).await
            && timeline_event.encryption_info().is_some()
            && let Ok(AnySyncTimelineEvent::MessageLike(AnySyncMessageLikeEvent::RoomMessage(message))) =
                timeline_event.raw().deserialize()
            && let Some(original) = message.as_original()
        {
            return original.content.body().to_owned();
        }
        assert!(Instant::now() < deadline, "the message never decrypted");
    }
}

#[tokio::test]
async fn matrix_sdk_clients_on_two_servers_talk_in_an_encrypted_room() {
    let net = Network::new(&["lat1.test", "lat2.test"]);
    let mut lat1 = net.start("lat1.test").await;
    let mut lat2 = net.start("lat2.test").await;
    let alice = sdk_client(&lat1, "alice").await;
    let bob = sdk_client(&lat2, "bob").await;
    for client in [&alice, &bob] {
        client.sync_once(SyncSettings::default().timeout(Duration::from_millis(0))).await.expect("sync");
    }

    let mut request = CreateRoomRequest::new();
    request.invite = vec![bob.user_id().expect("bob").to_owned()];
    request.initial_state = vec![
        InitialStateEvent::with_empty_state_key(RoomEncryptionEventContent::with_recommended_defaults()).to_raw_any(),
    ];
    let room_id: OwnedRoomId = alice.create_room(request).await.expect("room created").room_id().to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    while bob.get_room(&room_id).is_none() {
        bob.sync_once(SyncSettings::default().timeout(Duration::from_millis(500))).await.expect("bob syncs");
        assert!(Instant::now() < deadline, "bob never saw the invite");
    }
    bob.join_room_by_id(&room_id).await.expect("bob joins through lat1");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        alice.sync_once(SyncSettings::default().timeout(Duration::from_millis(500))).await.expect("alice syncs");
        let room = alice.get_room(&room_id).expect("room");
        if room.joined_members_count() == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "alice never saw bob join");
    }

    let room = alice.get_room(&room_id).expect("room");
    let hello = room.send(RoomMessageEventContent::text_plain("hello bob, across servers")).await.expect("sent");
    assert_eq!(decrypted_in_time(&bob, &alice, &room_id, &hello.response.event_id).await, "hello bob, across servers");
    let room = bob.get_room(&room_id).expect("room");
    let reply = room.send(RoomMessageEventContent::text_plain("hello alice")).await.expect("sent");
    assert_eq!(decrypted_in_time(&alice, &bob, &room_id, &reply.response.event_id).await, "hello alice");

    // Neither server saw plaintext.
    let token = bob.access_token().expect("token");
    let path = format!("/_matrix/client/v3/rooms/{room_id}/event/{}", hello.response.event_id);
    let (status, raw) = lat2.http.get(&path, Some(&token)).await;
    assert_eq!((status.as_u16(), &raw["type"]), (200, &json!("m.room.encrypted")), "{raw}");
    lat2.stop().await;
    lat1.stop().await;
}

/// `GET` on lat2's federation listener as lat1 (signed with lat1's key).
async fn lat1_asks_lat2(net: &Network, lat1: &Server, path: &str) -> Value {
    let auth = crate::federation_keys::x_matrix(&lat1.signing_key(), "lat1.test", "lat2.test", &Method::GET, path, b"");
    let (status, body) = net.request("lat2.test", Method::GET, path, Some(&auth), None).await;
    assert_eq!(status, 200, "{body}");
    body
}

/// A `/send` transaction of one EDU to lat1, from `origin` signed with its key.
async fn send_edu(net: &Network, (origin, key): (&str, &ruma::signatures::Ed25519KeyPair), txn: &str, edu: Value) {
    let body = json!({ "origin": origin, "origin_server_ts": 1, "pdus": [], "edus": [edu] });
    let path = format!("/_matrix/federation/v1/send/{txn}");
    let (status, answer) = signed_request(net, (origin, key), Method::PUT, &path, Some(body)).await;
    assert_eq!(status, 200, "{answer}");
}

/// An `m.device_list_update` about `device` (a new device with its keys).
fn device_update(device: &Device, stream_id: u64, prev_id: &[u64]) -> Value {
    json!({ "edu_type": "m.device_list_update", "content": {
        "user_id": device.user, "device_id": device.id, "stream_id": stream_id, "prev_id": prev_id,
        "deleted": false, "keys": device.device_keys() } })
}

/// A made-up device of `user` with its own valid keys (another server's word is all there is).
fn made_up_device(user: &str, id: &str) -> Device {
    Device { user: user.to_owned(), id: id.to_owned(), token: String::new(), pair: key_pair(id) }
}

/// The next `/sync` token of `token`'s user once `user`'s device list is reported changed
/// after `since`.
async fn changed_after(server: &Server, token: &str, since: &str, user: &str, what: &str) -> String {
    let sync = sync_from(server, token, since, what, |s| listed(&s["device_lists"]["changed"], user)).await;
    sync["next_batch"].as_str().expect("next_batch").to_owned()
}

fn device_ids(keys: &Value, user: &str) -> Vec<String> {
    keys["device_keys"][user].as_object().map(|devices| devices.keys().cloned().collect()).unwrap_or_default()
}

/// `/keys/query` for `user` until exactly `expected` devices are listed (30 s at most).
async fn devices_until(server: &Server, token: &str, user: &str, expected: &[&String]) {
    let mut expected: Vec<String> = expected.iter().map(|id| id.to_string()).collect();
    expected.sort();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let keys = query(&server.http, token, json!({ user: [] })).await;
        if device_ids(&keys, user) == expected {
            return;
        }
        assert!(Instant::now() < deadline, "{user}'s devices never became {expected:?}: {keys}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn remote_device_lists_are_cached_kept_by_updates_and_resynced_after_a_gap() {
    let net = Network::new(&["lat1.test", "lat2.test", "lat3.test"]);
    let mut lat1 = net.start("lat1.test").await;
    let mut lat2 = net.start("lat2.test").await;
    let mut lat3 = net.start("lat3.test").await;
    let (_, _, room) = shared_room(&net, &lat1, &lat2).await;
    let alice = device_on(&lat1, "alice").await;
    let bob = device_on(&lat2, "bob").await;
    sync_until(&lat2, &bob.token, "the joined room", |s| s["rooms"]["join"][&room].is_object()).await;
    let since = sync_until(&lat1, &alice.token, "a first sync", |_| true).await["next_batch"]
        .as_str()
        .expect("next_batch")
        .to_owned();

    // bob publishes keys: lat1, which does not keep his list yet, asks lat2 for all of it
    // (a resync), and tells alice his list changed once it is stored.
    bob.publish(&lat2.http, 1).await;
    changed_after(&lat1, &alice.token, &since, &bob.user, "bob's list cached").await;
    devices_until(&lat1, &alice.token, &bob.user, &[&bob.id]).await;

    // bob adds a laptop, then a tablet, and deletes the laptop: lat2's updates follow each
    // other, and lat1 applies each.
    let laptop = device_on(&lat2, "bob").await;
    laptop.publish(&lat2.http, 1).await;
    devices_until(&lat1, &alice.token, &bob.user, &[&bob.id, &laptop.id]).await;
    let tablet = device_on(&lat2, "bob").await;
    tablet.publish(&lat2.http, 1).await;
    let auth = json!({ "auth": { "type": "m.login.password", "password": "password",
        "identifier": { "type": "m.id.user", "user": "bob" } } });
    let path = format!("/_matrix/client/v3/devices/{}", laptop.id);
    let (status, body) =
        lat2.http.request(Method::DELETE, &path, Some(&bob.token), Some(auth.to_string().into_bytes())).await;
    assert_eq!(status, 200, "{body}");
    devices_until(&lat1, &alice.token, &bob.user, &[&bob.id, &tablet.id]).await;

    // lat3 cannot speak for bob: its update is dropped. lat2 can, and one that follows the
    // last update it sent is applied.
    let stream_id =
        lat1_asks_lat2(&net, &lat1, &format!("/_matrix/federation/v1/user/devices/{}", bob.user)).await["stream_id"]
            .as_u64()
            .expect("stream_id");
    let forged = made_up_device(&bob.user, "MALLORY");
    send_edu(&net, ("lat3.test", &lat3.signing_key()), "forged-1", device_update(&forged, stream_id + 1, &[stream_id]))
        .await;
    let extra = made_up_device(&bob.user, "EXTRA");
    let key2 = lat2.signing_key();
    send_edu(&net, ("lat2.test", &key2), "extra-1", device_update(&extra, stream_id + 1_000, &[stream_id])).await;

    // With lat2 gone, alice's query is answered from lat1's copy: the phone, the tablet and
    // the extra device; not the deleted laptop, not lat3's forgery.
    lat2.stop().await;
    let keys = query(&lat1.http, &alice.token, json!({ &bob.user: [] })).await;
    assert!(keys["failures"].as_object().is_none_or(|f| f.is_empty()), "lat2 was not asked: {keys}");
    let mut expected = vec![bob.id.clone(), tablet.id.clone(), "EXTRA".to_owned()];
    expected.sort();
    assert_eq!(device_ids(&keys, &bob.user), expected, "{keys}");
    assert_eq!(keys["device_keys"][&bob.user][&tablet.id]["keys"], tablet.device_keys()["keys"], "{keys}");

    // An update whose prev_id lat1 never saw is a gap: lat1 asks lat2 for the whole list, which
    // has neither the update's device nor the extra one.
    lat2.restart().await;
    let since = sync_until(&lat1, &alice.token, "a sync", |_| true).await["next_batch"]
        .as_str()
        .expect("next_batch")
        .to_owned();
    let ghost = made_up_device(&bob.user, "GHOST");
    send_edu(&net, ("lat2.test", &key2), "gap-1", device_update(&ghost, stream_id + 3_000, &[stream_id + 2_000])).await;
    changed_after(&lat1, &alice.token, &since, &bob.user, "bob's list resynced").await;
    lat2.stop().await;
    let keys = query(&lat1.http, &alice.token, json!({ &bob.user: [] })).await;
    assert!(keys["failures"].as_object().is_none_or(|f| f.is_empty()), "answered from the copy: {keys}");
    let mut expected = vec![bob.id.clone(), tablet.id.clone()];
    expected.sort();
    assert_eq!(device_ids(&keys, &bob.user), expected, "{keys}");

    // bob leaves the room (lat2 back): no local user shares a room with him, so his list is no
    // longer kept, and alice's /keys/changes tells her he left.
    lat2.restart().await;
    let before_leave = sync_until(&lat1, &alice.token, "a sync", |_| true).await["next_batch"]
        .as_str()
        .expect("next_batch")
        .to_owned();
    let (status, body) =
        lat2.http.post(&format!("/_matrix/client/v3/rooms/{room}/leave"), Some(&bob.token), &json!({})).await;
    assert_eq!(status, 200, "{body}");
    let after =
        sync_from(&lat1, &alice.token, &before_leave, "bob's leave", |s| listed(&s["device_lists"]["left"], &bob.user))
            .await;
    let changes_path = format!(
        "/_matrix/client/v3/keys/changes?from={before_leave}&to={}",
        after["next_batch"].as_str().expect("next_batch")
    );
    let (status, changes) = lat1.http.get(&changes_path, Some(&alice.token)).await;
    assert_eq!(status, 200, "{changes}");
    assert!(listed(&changes["left"], &bob.user), "{changes}");
    lat2.stop().await;
    let keys = query(&lat1.http, &alice.token, json!({ &bob.user: [] })).await;
    assert!(keys["failures"]["lat2.test"].is_object(), "no copy is served once no room is shared: {keys}");
    lat3.stop().await;
    lat1.stop().await;
}
