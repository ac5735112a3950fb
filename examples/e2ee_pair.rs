//! Two `matrix-sdk` clients with end-to-end encryption on two homeservers (any two: the Synapse
//! interop run uses it for a Lattice user and a Synapse user): the first creates an encrypted
//! room and invites the second, who joins; each sends a message the other must decrypt.
//! Prints one line per check and exits non-zero when one fails.
//!
//! Usage: `e2ee_pair FIRST_URL FIRST_USER SECOND_URL SECOND_USER PASSWORD`
//! (certificates are not checked: it is for test networks on loopback).

use std::time::{Duration, Instant};

use matrix_sdk::Client;
use matrix_sdk::config::SyncSettings;
use matrix_sdk::ruma::api::client::room::create_room::v3::Request as CreateRoomRequest;
use matrix_sdk::ruma::events::room::encryption::RoomEncryptionEventContent;
use matrix_sdk::ruma::events::room::message::RoomMessageEventContent;
use matrix_sdk::ruma::events::{AnySyncMessageLikeEvent, AnySyncTimelineEvent, InitialStateEvent};
use matrix_sdk::ruma::{OwnedEventId, OwnedRoomId, RoomId};

type Error = Box<dyn std::error::Error + Send + Sync>;

const PATIENCE: Duration = Duration::from_secs(60);

async fn logged_in(url: &str, user: &str, password: &str) -> Result<Client, Error> {
    let client = Client::builder().homeserver_url(url).disable_ssl_verification().build().await?;
    client.matrix_auth().login_username(user, password).initial_device_display_name("e2ee_pair").send().await?;
    client.sync_once(SyncSettings::default().timeout(Duration::ZERO)).await?;
    Ok(client)
}

async fn sync(client: &Client) -> Result<(), Error> {
    client.sync_once(SyncSettings::default().timeout(Duration::from_millis(300))).await?;
    Ok(())
}

/// Syncs both until `event` decrypts for `reader`; its body.
async fn decrypted(reader: &Client, other: &Client, room_id: &RoomId, event: &OwnedEventId) -> Result<String, Error> {
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline {
        sync(reader).await?;
        sync(other).await?;
        if let Some(room) = reader.get_room(room_id)
            && let Ok(timeline_event) = room.event(event, None).await
            && timeline_event.encryption_info().is_some()
            && let Ok(AnySyncTimelineEvent::MessageLike(AnySyncMessageLikeEvent::RoomMessage(message))) =
                timeline_event.raw().deserialize()
            && let Some(original) = message.as_original()
        {
            return Ok(original.content.body().to_owned());
        }
    }
    Err(format!("{event} never decrypted").into())
}

async fn run(args: &[String]) -> Result<(), Error> {
    let [first_url, first_user, second_url, second_user, password] = args else {
        return Err("usage: e2ee_pair FIRST_URL FIRST_USER SECOND_URL SECOND_USER PASSWORD".into());
    };
    let first = logged_in(first_url, first_user, password).await?;
    let second = logged_in(second_url, second_user, password).await?;
    let mut request = CreateRoomRequest::new();
    request.invite = vec![second.user_id().ok_or("no user")?.to_owned()];
    request.initial_state = vec![
        InitialStateEvent::with_empty_state_key(RoomEncryptionEventContent::with_recommended_defaults()).to_raw_any(),
    ];
    let room_id: OwnedRoomId = first.create_room(request).await?.room_id().to_owned();
    let deadline = Instant::now() + PATIENCE;
    while second.get_room(&room_id).is_none() {
        sync(&second).await?;
        if Instant::now() > deadline {
            return Err("the invite never arrived".into());
        }
    }
    second.join_room_by_id(&room_id).await?;
    let deadline = Instant::now() + PATIENCE;
    while first.get_room(&room_id).is_none_or(|room| room.joined_members_count() < 2) {
        sync(&first).await?;
        if Instant::now() > deadline {
            return Err("the join never arrived".into());
        }
    }
    println!("ok   {second_user} joined {first_user}'s encrypted room");

    let room = first.get_room(&room_id).ok_or("no room")?;
    let sent = room.send(RoomMessageEventContent::text_plain("first to second, encrypted")).await?;
    let body = decrypted(&second, &first, &room_id, &sent.response.event_id).await?;
    if body != "first to second, encrypted" {
        return Err(format!("decrypted the wrong body: {body}").into());
    }
    println!("ok   {second_user} decrypted {first_user}'s message");
    let room = second.get_room(&room_id).ok_or("no room")?;
    let sent = room.send(RoomMessageEventContent::text_plain("second to first, encrypted")).await?;
    let body = decrypted(&first, &second, &room_id, &sent.response.event_id).await?;
    if body != "second to first, encrypted" {
        return Err(format!("decrypted the wrong body: {body}").into());
    }
    println!("ok   {first_user} decrypted {second_user}'s reply");
    Ok(())
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(error) = run(&args).await {
        println!("FAIL e2ee_pair: {error}");
        std::process::exit(1);
    }
}
