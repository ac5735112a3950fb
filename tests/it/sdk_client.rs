//! A real client library (`matrix-sdk`) against a real Lattice server.

use matrix_sdk::Client;
use matrix_sdk::ruma::api::client::account::register::v3::Request as RegisterRequest;
use matrix_sdk::ruma::api::client::uiaa;

use crate::support::TestServer;

async fn client(server: &TestServer) -> Client {
    Client::builder().homeserver_url(server.base_url()).build().await.expect("client builds")
}

#[tokio::test]
async fn matrix_sdk_registers_logs_in_twice_sets_a_name_lists_devices_and_logs_out() {
    let server = TestServer::start().await;

    // Register through user-interactive auth with the registration token.
    let phone = client(&server).await;
    let mut request = RegisterRequest::new();
    request.username = Some("alice".to_owned());
    request.password = Some("correct horse battery".to_owned());
    request.initial_device_display_name = Some("Alice's phone".to_owned());
    let error = phone.matrix_auth().register(request.clone()).await.expect_err("first round asks for UIA");
    let info = error.as_uiaa_response().expect("a UIA challenge");
    let mut stage = uiaa::RegistrationToken::new(server.registration_token.clone());
    stage.session = info.session.clone();
    request.auth = Some(uiaa::AuthData::RegistrationToken(stage));
    let registered = phone.matrix_auth().register(request).await.expect("registration succeeds");
    assert_eq!(registered.user_id.as_str(), "@alice:hs1.localhost");

    // Two devices log in with the password.
    let laptop = client(&server).await;
    laptop
        .matrix_auth()
        .login_username("alice", "correct horse battery")
        .initial_device_display_name("Alice's laptop")
        .send()
        .await
        .expect("laptop login");
    let tablet = client(&server).await;
    tablet
        .matrix_auth()
        .login_username("@alice:hs1.localhost", "correct horse battery")
        .initial_device_display_name("Alice's tablet")
        .send()
        .await
        .expect("tablet login");
    assert_eq!(laptop.whoami().await.expect("whoami").user_id.as_str(), "@alice:hs1.localhost");

    laptop.account().set_display_name(Some("Alice Liddell")).await.expect("set display name");
    let seen = tablet.account().get_display_name().await.expect("display name");
    assert_eq!(seen.as_deref(), Some("Alice Liddell"));

    let devices = tablet.devices().await.expect("devices").devices;
    let mut names: Vec<_> = devices.iter().filter_map(|d| d.display_name.clone()).collect();
    names.sort();
    assert_eq!(names, ["Alice's laptop", "Alice's phone", "Alice's tablet"]);

    let laptop_device = laptop.device_id().expect("device id").to_owned();
    laptop.matrix_auth().logout().await.expect("logout");
    let devices = tablet.devices().await.expect("devices").devices;
    assert_eq!(devices.len(), 2);
    assert!(devices.iter().all(|d| d.device_id != laptop_device));
    server.stop().await;
}

#[tokio::test]
async fn matrix_sdk_creates_a_room_talks_and_syncs() {
    use matrix_sdk::config::SyncSettings;
    use matrix_sdk::room::MessagesOptions;
    use matrix_sdk::ruma::api::client::room::create_room::v3::Request as CreateRoomRequest;
    use matrix_sdk::ruma::events::room::message::RoomMessageEventContent;

    let server = TestServer::start().await;
    server.register("alice", "pw-a").await;
    server.register("bob", "pw-b").await;
    let alice = client(&server).await;
    alice.matrix_auth().login_username("alice", "pw-a").send().await.expect("alice logs in");
    let bob = client(&server).await;
    bob.matrix_auth().login_username("bob", "pw-b").send().await.expect("bob logs in");

    let mut request = CreateRoomRequest::new();
    request.name = Some("SDK room".to_owned());
    request.invite = vec![bob.user_id().unwrap().to_owned()];
    let room = alice.create_room(request).await.expect("room created");
    room.send(RoomMessageEventContent::text_plain("hello from matrix-sdk")).await.expect("message sent");

    bob.sync_once(SyncSettings::default()).await.expect("bob syncs");
    let invited = bob.get_room(room.room_id()).expect("bob knows the room");
    invited.join().await.expect("bob joins");
    bob.sync_once(SyncSettings::default()).await.expect("bob syncs again");
    let joined = bob.get_room(room.room_id()).expect("room still known");
    let page = joined.messages(MessagesOptions::backward()).await.expect("history");
    let texts: Vec<String> = page
        .chunk
        .iter()
        .filter_map(|event| event.raw().get_field::<serde_json::Value>("content").ok().flatten())
        .filter_map(|content| content["body"].as_str().map(str::to_owned))
        .collect();
    assert!(texts.contains(&"hello from matrix-sdk".to_owned()), "{texts:?}");
    assert_eq!(joined.name().as_deref(), Some("SDK room"));
    server.stop().await;
}

/// The chat scenario end to end, driven by `matrix-sdk`: a room, 200 messages, history
/// paged back to the creation event, an edit, a redaction, a reaction, a thread reply, a read
/// receipt, typing, a to-device message, and a ban that ends the banned user's reading.
#[tokio::test]
async fn matrix_sdk_chat_scenario() {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use matrix_sdk::config::SyncSettings;
    use matrix_sdk::room::MessagesOptions;
    use matrix_sdk::ruma::api::client::receipt::create_receipt::v3::ReceiptType;
    use matrix_sdk::ruma::api::client::room::create_room::v3::Request as CreateRoomRequest;
    use matrix_sdk::ruma::api::client::to_device::send_event_to_device::v3::Request as ToDeviceRequest;
    use matrix_sdk::ruma::events::receipt::ReceiptThread;
    use matrix_sdk::ruma::events::room::message::RoomMessageEventContent;
    use matrix_sdk::ruma::serde::Raw;
    use matrix_sdk::ruma::to_device::DeviceIdOrAllDevices;
    use matrix_sdk::ruma::{OwnedEventId, TransactionId};
    use serde_json::{Value, json};

    let server = TestServer::start().await;
    let mut clients = Vec::new();
    for name in ["alice", "bob", "carol"] {
        server.register(name, "pw").await;
        let client = client(&server).await;
        client.matrix_auth().login_username(name, "pw").send().await.expect("login");
        clients.push(client);
    }
    let [alice, bob, carol] = [clients[0].clone(), clients[1].clone(), clients[2].clone()];
    let quick = || SyncSettings::default().timeout(Duration::from_millis(0));

    let mut request = CreateRoomRequest::new();
    request.name = Some("Scenario".to_owned());
    request.invite = vec![bob.user_id().unwrap().to_owned(), carol.user_id().unwrap().to_owned()];
    let alice_room = alice.create_room(request).await.expect("room created");
    let room_id = alice_room.room_id().to_owned();
    for client in [&bob, &carol] {
        client.sync_once(quick()).await.expect("sync");
        client.get_room(&room_id).expect("invited").join().await.expect("join");
    }
    bob.sync_once(quick()).await.expect("sync");
    let bob_room = bob.get_room(&room_id).expect("bob's room");

    // 200 messages, alternating senders.
    let mut sent: Vec<OwnedEventId> = Vec::new();
    for i in 0..200 {
        let room = if i % 2 == 0 { &alice_room } else { &bob_room };
        let result = room.send(RoomMessageEventContent::text_plain(format!("message {i}"))).await.expect("send");
        sent.push(result.response.event_id);
    }

    // Bob pages back from his sync's prev_batch to the creation event: all 200, newest first.
    let response = bob.sync_once(quick()).await.expect("sync");
    let mut from = response.rooms.joined[&room_id].timeline.prev_batch.clone();
    let mut seen: Vec<String> = response.rooms.joined[&room_id]
        .timeline
        .events
        .iter()
        .rev()
        .filter_map(|e| e.raw().get_field::<Value>("content").ok().flatten())
        .filter_map(|c| c["body"].as_str().map(str::to_owned))
        .collect();
    let mut last_type = String::new();
    for _ in 0..100 {
        let page = bob_room.messages(MessagesOptions::backward().from(from.as_deref())).await.expect("page");
        for event in &page.chunk {
            last_type = event.raw().get_field::<String>("type").ok().flatten().unwrap_or_default();
            if let Some(body) = event
                .raw()
                .get_field::<Value>("content")
                .ok()
                .flatten()
                .and_then(|c| c["body"].as_str().map(str::to_owned))
            {
                seen.push(body);
            }
        }
        match page.end {
            Some(end) => from = Some(end),
            None => break,
        }
    }
    assert_eq!(seen, (0..200).rev().map(|i| format!("message {i}")).collect::<Vec<_>>());
    assert_eq!(last_type, "m.room.create");

    // Alice edits message 0 and redacts message 2; Bob reacts to message 4 and replies in a
    // thread on message 6.
    let edit = json!({ "msgtype": "m.text", "body": "* edited", "m.new_content": { "msgtype": "m.text", "body": "edited" },
                       "m.relates_to": { "rel_type": "m.replace", "event_id": sent[0] } });
    alice_room.send_raw("m.room.message", edit).await.expect("edit");
    alice_room.redact(&sent[2], Some("oops"), None).await.expect("redact");
    let reaction = json!({ "m.relates_to": { "rel_type": "m.annotation", "event_id": sent[4], "key": "👍" } });
    bob_room.send_raw("m.reaction", reaction).await.expect("react");
    let reply = json!({ "msgtype": "m.text", "body": "in a thread",
                        "m.relates_to": { "rel_type": "m.thread", "event_id": sent[6], "is_falling_back": true, "m.in_reply_to": { "event_id": sent[6] } } });
    bob_room.send_raw("m.room.message", reply).await.expect("thread reply");

    let http = &server.http;
    let bob_token = bob.access_token().expect("token");
    let event = |id: &OwnedEventId| format!("/_matrix/client/v3/rooms/{room_id}/event/{id}");
    let (_, edited) = http.get(&event(&sent[0]), Some(&bob_token)).await;
    assert_eq!(edited["unsigned"]["m.relations"]["m.replace"]["content"]["m.new_content"]["body"], "edited");
    let (_, redacted) = http.get(&event(&sent[2]), Some(&bob_token)).await;
    assert_eq!(redacted["content"], json!({}), "{redacted}");
    let (_, reactions) = http
        .get(&format!("/_matrix/client/v1/rooms/{room_id}/relations/{}/m.annotation", sent[4]), Some(&bob_token))
        .await;
    assert_eq!(reactions["chunk"][0]["content"]["m.relates_to"]["key"], "👍");
    let (_, root) = http.get(&event(&sent[6]), Some(&bob_token)).await;
    assert_eq!(root["unsigned"]["m.relations"]["m.thread"]["count"], 1);

    // Read receipt and typing from Bob reach Alice's sync; so does a to-device message.
    let before = alice.sync_once(quick()).await.expect("sync").next_batch;
    bob_room
        .send_single_receipt(ReceiptType::Read, ReceiptThread::Unthreaded, sent[199].clone())
        .await
        .expect("receipt");
    bob_room.typing_notice(true).await.expect("typing");
    let mut messages = BTreeMap::new();
    let content = Raw::new(&json!({ "note": "hello alice's device" })).expect("raw").cast_unchecked();
    messages.insert(
        alice.user_id().unwrap().to_owned(),
        BTreeMap::from([(DeviceIdOrAllDevices::DeviceId(alice.device_id().unwrap().to_owned()), content)]),
    );
    bob.send(ToDeviceRequest::new_raw("m.scenario".into(), TransactionId::new(), messages)).await.expect("to-device");
    let news = alice.sync_once(quick().token(before)).await.expect("sync");
    let ephemeral: Vec<String> = news.rooms.joined[&room_id]
        .ephemeral
        .iter()
        .filter_map(|e| e.get_field::<String>("type").ok().flatten())
        .collect();
    assert!(ephemeral.contains(&"m.receipt".to_owned()) && ephemeral.contains(&"m.typing".to_owned()), "{ephemeral:?}");
    let to_device: Vec<String> =
        news.to_device.iter().filter_map(|e| e.as_raw().get_field::<String>("type").ok().flatten()).collect();
    assert_eq!(to_device, ["m.scenario"]);

    // Carol is banned: she may read the history up to her ban, and nothing said after it.
    alice_room.ban_user(carol.user_id().unwrap(), Some("spam")).await.expect("ban");
    alice_room.send(RoomMessageEventContent::text_plain("said after the ban")).await.expect("send");
    carol.sync_once(quick()).await.expect("sync");
    let carol_room = carol.get_room(&room_id).expect("carol knows the room");
    let history = carol_room.messages(MessagesOptions::backward()).await.expect("history up to the ban");
    let bodies: Vec<String> = history
        .chunk
        .iter()
        .filter_map(|e| e.raw().get_field::<Value>("content").ok().flatten())
        .filter_map(|content| content["body"].as_str().map(str::to_owned))
        .collect();
    assert!(!bodies.is_empty(), "the history before the ban");
    assert!(!bodies.iter().any(|b| b == "said after the ban"), "{bodies:?}");
    server.stop().await;
}
