//! A dehydrated device made and rehydrated by `matrix-sdk-crypto` (the Olm machine of the
//! Rust SDK and of Element's crypto) against Lattice (MSC3814): alice's client leaves a
//! dehydrated device, signed by her cross-signing keys, and goes away; bob's `matrix-sdk`
//! client sends a message in an encrypted room, sharing its room key with her devices; alice's
//! next login rehydrates the device, reads its to-device messages through `/events`, and
//! decrypts bob's message.

use matrix_sdk::ruma::api::client::room::create_room::v3::Request as CreateRoomRequest;
use matrix_sdk::ruma::events::room::encryption::RoomEncryptionEventContent;
use matrix_sdk::ruma::events::{AnyToDeviceEvent, InitialStateEvent};
use matrix_sdk::ruma::serde::Raw;
use matrix_sdk::ruma::{OwnedDeviceId, OwnedRoomId, OwnedUserId, device_id};
use matrix_sdk_crypto::store::types::DehydratedDeviceKey;
use matrix_sdk_crypto::{DecryptionSettings, OlmMachine, TrustRequirement};
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::{Value, json};

use crate::sdk_e2ee::{logged_in, send_text, settle};
use crate::support::TestServer;

const DEHYDRATED: &str = "/_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device";

#[tokio::test]
async fn a_message_sent_while_alice_was_offline_is_decrypted_through_her_rehydrated_device() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice_token = server.register("alice", "pw").await;
    let alice_id = OwnedUserId::try_from(server.user_id("alice")).expect("user ID");

    // alice's client: cross-signing keys, then a dehydrated device they sign.
    let old = OlmMachine::new(&alice_id, device_id!("ALICEOLD")).await;
    let bootstrap = old.bootstrap_cross_signing(false).await.expect("cross-signing keys made");
    let signing = &bootstrap.upload_signing_keys_req;
    let body = json!({ "master_key": signing.master_key, "self_signing_key": signing.self_signing_key,
        "user_signing_key": signing.user_signing_key });
    let (status, body) = http.post("/_matrix/client/v3/keys/device_signing/upload", Some(&alice_token), &body).await;
    assert_eq!(status, 200, "{body}");
    let pickle_key = DehydratedDeviceKey::new();
    let dehydrated = old.dehydrated_devices().create().await.expect("dehydrated device made");
    let upload = dehydrated.keys_for_upload("Dehydrated device".to_owned(), &pickle_key).await.expect("keys");
    let body = json!({
        "device_id": upload.device_id,
        "device_data": upload.device_data,
        "initial_device_display_name": upload.initial_device_display_name,
        "device_keys": upload.device_keys,
        "one_time_keys": upload.one_time_keys,
        "fallback_keys": upload.fallback_keys,
    });
    let (status, body) = http.put(DEHYDRATED, Some(&alice_token), &body).await;
    assert_eq!(status, 200, "{body}");

    // bob invites alice to an encrypted room; she joins and goes offline; bob writes.
    let bob = logged_in(&server, "bob").await;
    settle(&[&bob]).await;
    let mut request = CreateRoomRequest::new();
    request.invite = vec![alice_id.clone()];
    request.initial_state = vec![
        InitialStateEvent::with_empty_state_key(RoomEncryptionEventContent::with_recommended_defaults()).to_raw_any(),
    ];
    let room_id: OwnedRoomId = bob.create_room(request).await.expect("room created").room_id().to_owned();
    let (status, body) = http.post(&format!("/_matrix/client/v3/join/{room_id}"), Some(&alice_token), &json!({})).await;
    assert_eq!(status, 200, "{body}");
    settle(&[&bob]).await;
    let event_id = send_text(&bob, &room_id, "sent while alice was away").await;

    // alice logs in anew: her new device rehydrates the dehydrated one and reads its messages.
    let new = OlmMachine::new(&alice_id, device_id!("ALICENEW")).await;
    let (status, stored) = http.get(DEHYDRATED, Some(&alice_token)).await;
    assert_eq!(status, 200, "{stored}");
    let device_id = OwnedDeviceId::from(stored["device_id"].as_str().expect("device ID"));
    assert_eq!(device_id, upload.device_id);
    let device_data = serde_json::from_value(stored["device_data"].clone()).expect("device data");
    let rehydrated =
        new.dehydrated_devices().rehydrate(&pickle_key, &device_id, device_data).await.expect("rehydrated");
    let mut events: Vec<Raw<AnyToDeviceEvent>> = Vec::new();
    let mut next_batch: Option<String> = None;
    loop {
        let body = next_batch.as_ref().map_or_else(|| json!({}), |token| json!({ "next_batch": token }));
        // The SDK's dehydrated device IDs are base64 and may hold `/` or `+`: encoded, as clients do.
        let encoded = utf8_percent_encode(device_id.as_str(), NON_ALPHANUMERIC);
        let (status, page) = http.post(&format!("{DEHYDRATED}/{encoded}/events"), Some(&alice_token), &body).await;
        assert_eq!(status, 200, "{page}");
        let page_events = page["events"].as_array().cloned().expect("events");
        next_batch = page["next_batch"].as_str().map(str::to_owned);
        if page_events.is_empty() {
            break;
        }
        events.extend(page_events.into_iter().map(|event| serde_json::from_value(event).expect("a to-device event")));
    }
    assert!(!events.is_empty(), "bob's client sent the room key to the dehydrated device");
    let settings = DecryptionSettings { sender_device_trust_requirement: TrustRequirement::Untrusted };
    let room_keys = rehydrated.receive_events(events, &settings).await.expect("to-device events decrypted");
    assert!(room_keys.iter().any(|key| key.room_id == room_id), "the room's key arrived: {room_keys:?}");

    // With the room key, alice's new device decrypts bob's message; the server held ciphertext.
    let (status, raw) =
        http.get(&format!("/_matrix/client/v3/rooms/{room_id}/event/{event_id}"), Some(&alice_token)).await;
    assert_eq!(status, 200, "{raw}");
    assert_eq!(raw["type"], "m.room.encrypted", "{raw}");
    let encrypted = serde_json::from_value(raw).expect("an encrypted event");
    let decrypted = new.decrypt_room_event(&encrypted, &room_id, &settings).await.expect("decrypted");
    let plain: Value = decrypted.event.deserialize_as().expect("JSON");
    assert_eq!(plain["content"]["body"], "sent while alice was away", "{plain}");
}
