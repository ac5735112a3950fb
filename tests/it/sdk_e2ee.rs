//! A real Olm/Megolm client (`matrix-sdk` with `e2e-encryption`, in-memory store) against
//! Lattice (issue #13): an encrypted room whose messages both sides decrypt, and a device whose
//! one-time keys ran out reached through its fallback key.

use std::time::Duration;

use matrix_sdk::Client;
use matrix_sdk::config::SyncSettings;
use matrix_sdk::ruma::api::client::room::create_room::v3::Request as CreateRoomRequest;
use matrix_sdk::ruma::events::room::encryption::RoomEncryptionEventContent;
use matrix_sdk::ruma::events::room::message::RoomMessageEventContent;
use matrix_sdk::ruma::events::{AnySyncMessageLikeEvent, AnySyncTimelineEvent, InitialStateEvent};
use matrix_sdk::ruma::{OwnedEventId, OwnedRoomId, RoomId};
use serde_json::json;

use crate::support::TestServer;

pub(crate) async fn logged_in(server: &TestServer, name: &str) -> Client {
    server.register(name, "pw").await;
    let client = Client::builder().homeserver_url(server.base_url()).build().await.expect("client builds");
    client.matrix_auth().login_username(name, "pw").send().await.expect("login");
    client
}

fn quick() -> SyncSettings {
    SyncSettings::default().timeout(Duration::from_millis(0))
}

/// A few syncs: each sends the client's pending key uploads, queries and claims.
pub(crate) async fn settle(clients: &[&Client]) {
    for _ in 0..3 {
        for client in clients {
            client.sync_once(quick()).await.expect("sync");
        }
    }
}

/// The plaintext body of an event as `client` decrypts it.
async fn decrypted_body(client: &Client, room_id: &RoomId, event_id: &OwnedEventId) -> String {
    let room = client.get_room(room_id).expect("room known to the client");
    let event = room.event(event_id, None).await.expect("event fetched");
    assert!(event.encryption_info().is_some(), "the event was encrypted and is now decrypted");
    match event.raw().deserialize().expect("event parses") {
        AnySyncTimelineEvent::MessageLike(AnySyncMessageLikeEvent::RoomMessage(message)) => {
            message.as_original().expect("not redacted").content.body().to_owned()
        }
        other => panic!("expected a decrypted message, got {:?}", other.event_type()),
    }
}

pub(crate) async fn send_text(client: &Client, room_id: &RoomId, body: &str) -> OwnedEventId {
    let room = client.get_room(room_id).expect("room known");
    room.send(RoomMessageEventContent::text_plain(body)).await.expect("message sent").response.event_id
}

#[tokio::test]
async fn matrix_sdk_clients_talk_in_an_encrypted_room_and_fall_back_when_one_time_keys_run_out() {
    let server = TestServer::start().await;
    let alice = logged_in(&server, "alice").await;
    let bob = logged_in(&server, "bob").await;
    settle(&[&alice, &bob]).await;

    let mut request = CreateRoomRequest::new();
    request.invite = vec![bob.user_id().expect("bob").to_owned()];
    request.initial_state = vec![
        InitialStateEvent::with_empty_state_key(RoomEncryptionEventContent::with_recommended_defaults()).to_raw_any(),
    ];
    let room_id: OwnedRoomId = alice.create_room(request).await.expect("room created").room_id().to_owned();
    bob.sync_once(quick()).await.expect("bob sees the invite");
    bob.join_room_by_id(&room_id).await.expect("bob joins");
    settle(&[&alice, &bob]).await;

    // Alice → Bob and Bob → Alice, each decrypted on the other side.
    let hello = send_text(&alice, &room_id, "hello bob, secretly").await;
    settle(&[&bob, &alice]).await;
    assert_eq!(decrypted_body(&bob, &room_id, &hello).await, "hello bob, secretly");
    let reply = send_text(&bob, &room_id, "hello alice").await;
    settle(&[&alice, &bob]).await;
    assert_eq!(decrypted_body(&alice, &room_id, &reply).await, "hello alice");
    // The server only ever held ciphertext.
    let token = bob.access_token().expect("token");
    let (status, raw) =
        server.http.get(&format!("/_matrix/client/v3/rooms/{room_id}/event/{hello}"), Some(&token)).await;
    assert_eq!(status, 200, "{raw}");
    assert_eq!(raw["type"], "m.room.encrypted", "{raw}");

    // Someone takes every one-time key of Bob's device; Carol then reaches it through its fallback
    // key, before Bob's client has uploaded new ones.
    let carol = logged_in(&server, "carol").await;
    carol.sync_once(quick()).await.expect("carol syncs");
    let thief = server.register("thief", "pw").await;
    let (bob_user, bob_device) =
        (bob.user_id().expect("bob").to_string(), bob.device_id().expect("device").to_string());
    let claim = json!({ "one_time_keys": { &bob_user: { &bob_device: "signed_curve25519" } } });
    let mut taken = 0;
    loop {
        let (status, body) = server.http.post("/_matrix/client/v3/keys/claim", Some(&thief), &claim).await;
        assert_eq!(status, 200, "{body}");
        let keys = body["one_time_keys"][&bob_user][&bob_device].as_object().cloned().expect("a key");
        let key = keys.values().next().expect("one key");
        if key["fallback"] == true {
            break;
        }
        taken += 1;
        assert!(taken < 1_000, "the one-time keys never ran out");
    }
    assert!(taken > 0, "Bob's client had uploaded one-time keys");
    let invite = alice.get_room(&room_id).expect("room");
    invite.invite_user_by_id(carol.user_id().expect("carol")).await.expect("carol invited");
    carol.sync_once(quick()).await.expect("carol sees the invite");
    carol.join_room_by_id(&room_id).await.expect("carol joins");
    carol.sync_once(quick()).await.expect("carol syncs the room");
    let from_carol = send_text(&carol, &room_id, "hi both, from carol").await;
    settle(&[&bob, &alice, &carol]).await;
    assert_eq!(decrypted_body(&bob, &room_id, &from_carol).await, "hi both, from carol");
    assert_eq!(decrypted_body(&alice, &room_id, &from_carol).await, "hi both, from carol");
    server.stop().await;
}

#[tokio::test]
async fn a_second_device_reads_history_through_the_key_backup() {
    let server = TestServer::start().await;
    let alice = logged_in(&server, "alice").await;
    let bob = logged_in(&server, "bob").await;
    settle(&[&alice, &bob]).await;
    // Recovery: cross-signing, a server-side key backup and secret storage, all through Lattice.
    let recovery_key = tokio::time::timeout(Duration::from_secs(60), alice.encryption().recovery().enable())
        .await
        .expect("recovery is enabled in time")
        .expect("recovery enabled");

    let mut request = CreateRoomRequest::new();
    request.invite = vec![bob.user_id().expect("bob").to_owned()];
    request.initial_state = vec![
        InitialStateEvent::with_empty_state_key(RoomEncryptionEventContent::with_recommended_defaults()).to_raw_any(),
    ];
    let room_id: OwnedRoomId = alice.create_room(request).await.expect("room created").room_id().to_owned();
    bob.sync_once(quick()).await.expect("bob sees the invite");
    bob.join_room_by_id(&room_id).await.expect("bob joins");
    settle(&[&alice, &bob]).await;
    let secret = send_text(&alice, &room_id, "for my other devices too").await;
    settle(&[&alice, &bob]).await;
    tokio::time::timeout(Duration::from_secs(60), alice.encryption().backups().wait_for_steady_state())
        .await
        .expect("the backup settles in time")
        .expect("room keys backed up");
    let token = alice.access_token().expect("token");
    let (status, info) = server.http.get("/_matrix/client/v3/room_keys/version", Some(&token)).await;
    assert_eq!(status, 200, "{info}");
    assert!(info["count"].as_u64().is_some_and(|count| count > 0), "{info}");

    // A new device of Alice's: no Olm session ever gave it the room key; the backup does.
    let laptop = Client::builder().homeserver_url(server.base_url()).build().await.expect("client builds");
    laptop.matrix_auth().login_username("alice", "pw").send().await.expect("login");
    settle(&[&laptop]).await;
    laptop.encryption().recovery().recover(&recovery_key).await.expect("recovered with the key");
    laptop.encryption().backups().download_room_keys_for_room(&room_id).await.expect("keys downloaded");
    assert_eq!(decrypted_body(&laptop, &room_id, &secret).await, "for my other devices too");
    server.stop().await;
}

/// The master key of `target` as `asker` gets it from `/keys/query`.
async fn master_key_seen_by(server: &TestServer, asker: &Client, target: &str) -> serde_json::Value {
    let token = asker.access_token().expect("token");
    let (status, keys) = server
        .http
        .post("/_matrix/client/v3/keys/query", Some(&token), &json!({ "device_keys": { target: [] } }))
        .await;
    assert_eq!(status, 200, "{keys}");
    keys["master_keys"][target].clone()
}

#[tokio::test]
async fn cross_signing_verification_shows_trust_on_both_sides() {
    let server = TestServer::start().await;
    let alice = logged_in(&server, "alice").await;
    let bob = logged_in(&server, "bob").await;
    settle(&[&alice, &bob]).await;
    for client in [&alice, &bob] {
        client.encryption().bootstrap_cross_signing(None).await.expect("first cross-signing upload needs no UIA");
    }
    let (alice_id, bob_id) = (alice.user_id().expect("alice").to_owned(), bob.user_id().expect("bob").to_owned());

    // Each verifies the other with their user-signing key (what a completed emoji verification
    // ends with): a signature on the other's master key, uploaded to the server.
    let bobs = alice.encryption().request_user_identity(&bob_id).await.expect("query").expect("bob's identity");
    assert!(!bobs.is_verified(), "not verified before");
    bobs.verify().await.expect("alice signs bob's master key");
    let alices = bob.encryption().request_user_identity(&alice_id).await.expect("query").expect("alice's identity");
    alices.verify().await.expect("bob signs alice's master key");

    // The signatures are on the server, each seen by its signer only (the spec's rule for
    // user-signing signatures).
    let signed_by =
        |key: &serde_json::Value, user: &str| key["signatures"][user].as_object().is_some_and(|s| !s.is_empty());
    assert!(signed_by(&master_key_seen_by(&server, &alice, bob_id.as_str()).await, alice_id.as_str()));
    assert!(signed_by(&master_key_seen_by(&server, &bob, alice_id.as_str()).await, bob_id.as_str()));
    assert!(
        !signed_by(&master_key_seen_by(&server, &bob, bob_id.as_str()).await, alice_id.as_str()),
        "alice's signature is hers"
    );

    // Both clients, reading the identities back from the server, trust the other.
    settle(&[&alice, &bob]).await;
    let bobs = alice.encryption().request_user_identity(&bob_id).await.expect("query").expect("bob's identity");
    let alices = bob.encryption().request_user_identity(&alice_id).await.expect("query").expect("alice's identity");
    assert!(bobs.is_verified(), "alice trusts bob");
    assert!(alices.is_verified(), "bob trusts alice");
    server.stop().await;
}

#[tokio::test]
async fn a_deleted_device_leaves_the_other_users_device_list() {
    use matrix_sdk::ruma::api::client::uiaa;

    let server = TestServer::start().await;
    let alice = logged_in(&server, "alice").await;
    let bob = logged_in(&server, "bob").await;
    let bob_id = bob.user_id().expect("bob").to_owned();
    // An encrypted room: the SDK tracks the device lists of the members of those.
    let mut request = CreateRoomRequest::new();
    request.invite = vec![bob_id.clone()];
    request.initial_state = vec![
        InitialStateEvent::with_empty_state_key(RoomEncryptionEventContent::with_recommended_defaults()).to_raw_any(),
    ];
    let room_id: OwnedRoomId = alice.create_room(request).await.expect("room").room_id().to_owned();
    settle(&[&alice, &bob]).await;
    bob.join_room_by_id(&room_id).await.expect("bob joins");
    let laptop = Client::builder().homeserver_url(server.base_url()).build().await.expect("client builds");
    laptop.matrix_auth().login_username("bob", "pw").send().await.expect("bob's laptop logs in");
    let laptop_id = laptop.device_id().expect("device").to_owned();
    settle(&[&alice, &bob, &laptop]).await;
    settle(&[&alice, &bob, &laptop]).await;
    let devices = alice.encryption().get_user_devices(&bob_id).await.expect("bob's devices");
    assert!(devices.get(&laptop_id).is_some(), "alice sees bob's laptop");

    // bob removes the laptop from his phone (user-interactive auth with his password).
    let error = bob.delete_devices(std::slice::from_ref(&laptop_id), None).await.expect_err("asks for UIA");
    let session = error.as_uiaa_response().expect("a UIA challenge").session.clone();
    let mut password = uiaa::Password::new(uiaa::UserIdentifier::from(&bob_id), "pw".into());
    password.session = session;
    bob.delete_devices(std::slice::from_ref(&laptop_id), Some(uiaa::AuthData::Password(password)))
        .await
        .expect("deleted");
    settle(&[&alice, &bob]).await;
    settle(&[&alice, &bob]).await;
    let devices = alice.encryption().get_user_devices(&bob_id).await.expect("bob's devices");
    assert!(devices.get(&laptop_id).is_none(), "the laptop left alice's view of bob's devices");
    assert!(devices.get(bob.device_id().expect("phone")).is_some(), "the phone stays");
    server.stop().await;
}
