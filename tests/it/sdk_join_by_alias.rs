//! `matrix-sdk` joining a public room by its alias, with no invite to learn the room from.

use matrix_sdk::Client;

use crate::support::TestServer;

async fn logged_in(server: &TestServer, name: &str) -> Client {
    server.register(name, "pw").await;
    let client = Client::builder().homeserver_url(server.base_url()).build().await.expect("client builds");
    client.matrix_auth().login_username(name, "pw").send().await.expect("logs in");
    client
}

#[tokio::test]
async fn matrix_sdk_sees_the_name_of_a_room_joined_by_alias() {
    use matrix_sdk::config::SyncSettings;
    use matrix_sdk::ruma::api::client::filter::FilterDefinition;
    use matrix_sdk::ruma::api::client::room::create_room::v3::{Request as CreateRoomRequest, RoomPreset};
    use matrix_sdk::ruma::api::client::sync::sync_events::v3::Filter;
    use matrix_sdk::ruma::{OwnedRoomAliasId, RoomOrAliasId, uint};

    let server = TestServer::start().await;
    let alice = logged_in(&server, "alice").await;
    let bob = logged_in(&server, "bob").await;
    let mut request = CreateRoomRequest::new();
    request.name = Some("Public square".to_owned());
    request.room_alias_name = Some("plaza".to_owned());
    request.preset = Some(RoomPreset::PublicChat);
    let room = alice.create_room(request).await.expect("room created");

    // A one-event timeline: the name can only come from the state section.
    let mut filter = FilterDefinition::default();
    filter.room.timeline.limit = Some(uint!(1));
    let settings = SyncSettings::default().filter(Filter::FilterDefinition(filter));
    bob.sync_once(settings.clone()).await.expect("bob's first sync");
    assert!(bob.get_room(room.room_id()).is_none(), "bob has not heard of the room yet");

    let alias = OwnedRoomAliasId::try_from(format!("#plaza:{}", server.server_name)).expect("valid alias");
    bob.join_room_by_id_or_alias(<&RoomOrAliasId>::from(&*alias), &[]).await.expect("bob joins by alias");
    bob.sync_once(settings).await.expect("bob syncs after joining");
    let joined = bob.get_room(room.room_id()).expect("bob knows the room");
    assert_eq!(joined.name().as_deref(), Some("Public square"));
    server.stop().await;
}
