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
