//! Invites between real Lattice servers on loopback: an invite of another server's user is
//! countersigned by that server, shows in the invitee's `/sync` with the room's stripped state,
//! and is accepted (a join through the inviting server) or refused (a leave through it); the
//! inviter can take it back. And the invites a server must refuse.

use lattice_core::room_version::RoomVersion;
use reqwest::Method;
use ruma::CanonicalJsonValue;
use ruma::signatures::Ed25519KeyPair;
use serde_json::{Value, json};

use crate::federation_keys::{Network, Server, x_matrix};
use crate::federation_rooms::{signed_request, sync_until, sync_until_from, timeline_bodies};
use crate::support::{assert_error, create_room, say};

fn invite_of<'a>(sync: &'a Value, room: &str) -> &'a Value {
    &sync["rooms"]["invite"][room]["invite_state"]["events"]
}

pub(crate) fn stripped<'a>(events: &'a Value, kind: &str) -> Option<&'a Value> {
    events.as_array()?.iter().find(|e| e["type"] == kind)
}

async fn membership_on(server: &Server, token: &str, room: &str, user: &str) -> Value {
    let path = format!("/_matrix/client/v3/rooms/{room}/state/m.room.member/{user}");
    let (status, content) = server.http.get(&path, Some(token)).await;
    assert_eq!(status, 200, "{path}: {content}");
    content["membership"].clone()
}

#[tokio::test]
async fn a_direct_chat_with_a_user_of_another_server_is_invited_accepted_and_used() {
    let net = Network::new(&["lat1.test", "lat2.test"]);
    let mut lat1 = net.start("lat1.test").await;
    let mut lat2 = net.start("lat2.test").await;
    let alice = lat1.register_user("alice").await;
    let bob = lat2.register_user("bob").await;

    // As Element starts a DM: createRoom with the other user in `invite` and `is_direct`.
    let room = create_room(
        &lat1.http,
        &alice,
        json!({
            "preset": "trusted_private_chat", "is_direct": true, "invite": ["@bob:lat2.test"],
            "name": "Just us", "room_version": "12",
        }),
    )
    .await;
    assert_eq!(membership_on(&lat1, &alice, &room, "@bob:lat2.test").await, "invite");

    // bob's server holds the invite without being in the room, with the room described.
    let sync = sync_until(&lat2, &bob, "the invite", |s| invite_of(s, &room).is_array()).await;
    let state = invite_of(&sync, &room);
    assert_eq!(stripped(state, "m.room.name").map(|e| &e["content"]["name"]), Some(&json!("Just us")), "{state}");
    assert!(stripped(state, "m.room.create").is_some(), "{state}");
    let invite = state
        .as_array()
        .and_then(|events| events.iter().find(|e| e["type"] == "m.room.member" && e["state_key"] == "@bob:lat2.test"))
        .expect("the invite itself");
    assert_eq!(
        (&invite["sender"], &invite["content"]["membership"], &invite["content"]["is_direct"]),
        (&json!("@alice:lat1.test"), &json!("invite"), &json!(true)),
        "{state}"
    );
    // The invite is shown once: the next sync does not repeat it.
    let next = sync["next_batch"].as_str().unwrap();
    let (_, again) = lat2.http.get(&format!("/_matrix/client/v3/sync?timeout=0&since={next}"), Some(&bob)).await;
    assert!(invite_of(&again, &room).is_null(), "{again}");

    // A v12 room ID names no server: the join goes through the inviter's server.
    let (status, joined) = lat2.http.post(&format!("/_matrix/client/v3/join/{room}"), Some(&bob), &json!({})).await;
    assert_eq!(status, 200, "{joined}");
    sync_until(&lat2, &bob, "the joined room", |s| s["rooms"]["join"][&room].is_object()).await;
    assert_eq!(membership_on(&lat1, &alice, &room, "@bob:lat2.test").await, "join");

    say(&lat1.http, &alice, &room, "welcome").await;
    sync_until(&lat2, &bob, "alice's message", |s| timeline_bodies(s, &room).contains(&"welcome".to_owned())).await;

    lat2.stop().await;
    lat1.stop().await;
}

#[tokio::test]
async fn an_invite_from_another_server_is_refused_or_taken_back() {
    let net = Network::new(&["lat1.test", "lat2.test"]);
    let mut lat1 = net.start("lat1.test").await;
    let mut lat2 = net.start("lat2.test").await;
    let alice = lat1.register_user("alice").await;
    let bob = lat2.register_user("bob").await;
    let room = create_room(&lat1.http, &alice, json!({ "preset": "private_chat", "room_version": "12" })).await;
    let invite_bob = |reason: &'static str| {
        let path = format!("/_matrix/client/v3/rooms/{room}/invite");
        let (http, alice) = (lat1.http.clone(), alice.clone());
        async move { http.post(&path, Some(&alice), &json!({ "user_id": "@bob:lat2.test", "reason": reason })).await }
    };

    // Refused: bob's leave goes to lat1 through make_leave / send_leave.
    let (status, body) = invite_bob("first").await;
    assert_eq!(status, 200, "{body}");
    let sync = sync_until(&lat2, &bob, "the invite", |s| invite_of(s, &room).is_array()).await;
    let since = sync["next_batch"].as_str().unwrap().to_owned();
    let (status, body) =
        lat2.http.post(&format!("/_matrix/client/v3/rooms/{room}/leave"), Some(&bob), &json!({})).await;
    assert_eq!(status, 200, "{body}");
    let (_, after) = lat2.http.get(&format!("/_matrix/client/v3/sync?timeout=0&since={since}"), Some(&bob)).await;
    let left = &after["rooms"]["leave"][&room]["timeline"]["events"];
    assert_eq!(left[0]["content"]["membership"], "leave", "{after}");
    assert_eq!(membership_on(&lat1, &alice, &room, "@bob:lat2.test").await, "leave");

    // Taken back: alice's kick of the invitee reaches bob's server, which is not in the room.
    let (status, body) = invite_bob("second").await;
    assert_eq!(status, 200, "{body}");
    let sync = sync_until(&lat2, &bob, "the second invite", |s| invite_of(s, &room).is_array()).await;
    let since = sync["next_batch"].as_str().unwrap().to_owned();
    let kick = format!("/_matrix/client/v3/rooms/{room}/kick");
    let (status, body) = lat1.http.post(&kick, Some(&alice), &json!({ "user_id": "@bob:lat2.test" })).await;
    assert_eq!(status, 200, "{body}");
    let left = |s: &Value| s["rooms"]["leave"][&room].is_object();
    let answer = sync_until_from(&lat2, &bob, Some(&since), "the withdrawn invite", left).await;
    assert_eq!(answer["rooms"]["leave"][&room]["timeline"]["events"][0]["sender"], "@alice:lat1.test");
    // Joining after the invite was taken back is refused by the room.
    let (status, _) = lat2.http.post(&format!("/_matrix/client/v3/join/{room}"), Some(&bob), &json!({})).await;
    assert!(status.is_client_error() || status.is_server_error(), "{status}");

    lat2.stop().await;
    lat1.stop().await;
}

/// A v12 create event and an invite built and signed as `lat3.test` would, with `room_state`
/// deciding which events describe the room.
fn forged_invite(key: &Ed25519KeyPair, invitee: &str) -> (String, Value, Value) {
    let version = RoomVersion::parse("12").unwrap();
    let sign = |value: Value| {
        let CanonicalJsonValue::Object(mut object) = CanonicalJsonValue::try_from(value).unwrap() else { panic!() };
        lattice_core::pdu::hash_and_sign(&mut object, "lat3.test", key, &version).unwrap();
        let id = lattice_core::pdu::event_id(&object, &version).unwrap();
        (id, serde_json::to_value(&object).unwrap())
    };
    let (create_id, create) = sign(json!({
        "type": "m.room.create", "state_key": "", "sender": "@mallory:lat3.test", "origin_server_ts": 1,
        "content": { "room_version": "12" }, "depth": 1, "prev_events": [], "auth_events": [],
    }));
    let room = format!("!{}", &create_id.as_str()[1..]);
    let (_, invite) = sign(json!({
        "type": "m.room.member", "state_key": invitee, "sender": "@mallory:lat3.test", "room_id": room,
        "origin_server_ts": 2, "content": { "membership": "invite" }, "depth": 2,
        "prev_events": [create_id], "auth_events": [],
    }));
    (room, create, invite)
}

#[tokio::test]
async fn invites_a_server_must_refuse() {
    let net = Network::new(&["lat1.test", "lat2.test", "lat3.test"]);
    let mut lat1 = net.start("lat1.test").await;
    let mut lat2 = net.start("lat2.test").await;
    let mut lat3 = net.start("lat3.test").await;
    let alice = lat1.register_user("alice").await;
    let bob = lat2.register_user("bob").await;
    let carol = lat1.register_user("carol").await;
    let room = create_room(&lat1.http, &alice, json!({ "preset": "private_chat", "room_version": "12" })).await;

    // A user of another server who does not exist: that server refuses, nothing is stored.
    let path = format!("/_matrix/client/v3/rooms/{room}/invite");
    let answer = lat1.http.post(&path, Some(&alice), &json!({ "user_id": "@nobody:lat2.test" })).await;
    assert_error(&answer, 403, "M_FORBIDDEN");
    let state = format!("/_matrix/client/v3/rooms/{room}/state/m.room.member/@nobody:lat2.test");
    assert_eq!(lat1.http.get(&state, Some(&alice)).await.0, 404);
    // A user outside the room may not invite anyone, here or elsewhere.
    let answer = lat1.http.post(&path, Some(&carol), &json!({ "user_id": "@bob:lat2.test" })).await;
    assert_error(&answer, 403, "M_FORBIDDEN");

    // Forged or malformed invites pushed straight at lat2.
    let key3 = lat3.signing_key();
    let (forged_room, create, invite) = forged_invite(&key3, "@bob:lat2.test");
    let invite_id = lattice_core::pdu::event_id(
        &serde_json::from_value(invite.clone()).unwrap(),
        &RoomVersion::parse("12").unwrap(),
    )
    .unwrap();
    let send = |body: Value, origin: &'static str, room: String| {
        let key = if origin == "lat3.test" { lat3.signing_key() } else { lat1.signing_key() };
        let path = format!(
            "/_matrix/federation/v2/invite/{}/{}",
            room.replace('!', "%21"),
            invite_id.as_str().replace('$', "%24")
        );
        let auth = x_matrix(&key, origin, "lat2.test", &Method::PUT, &path, body.to_string().as_bytes());
        let net = &net;
        async move { net.request("lat2.test", Method::PUT, &path, Some(&auth), Some(&body)).await }
    };
    // No create event among the room's state (v12 requires it).
    let body = json!({ "room_version": "12", "event": invite, "invite_room_state": [] });
    assert_error(&send(body, "lat3.test", forged_room.clone()).await, 400, "M_MISSING_PARAM");
    // A room version lat2 does not support.
    let body = json!({ "room_version": "99", "event": invite, "invite_room_state": [create] });
    assert_error(&send(body, "lat3.test", forged_room.clone()).await, 400, "M_INCOMPATIBLE_ROOM_VERSION");
    // lat1 relaying lat3's user's invite: a server speaks for its own users only.
    let body = json!({ "room_version": "12", "event": invite, "invite_room_state": [create] });
    let answer = send(body, "lat1.test", forged_room.clone()).await;
    assert_error(&answer, 403, "M_FORBIDDEN");
    // An invite whose content was changed after signing.
    let mut altered = invite.clone();
    altered["content"]["displayname"] = json!("someone else");
    let body = json!({ "room_version": "12", "event": altered, "invite_room_state": [create] });
    assert_eq!(send(body, "lat3.test", forged_room.clone()).await.0, 400);
    // None of those reached bob.
    let (_, sync) = lat2.http.get("/_matrix/client/v3/sync?timeout=0", Some(&bob)).await;
    assert!(sync["rooms"]["invite"].as_object().is_none_or(|rooms| rooms.is_empty()), "{sync}");

    // The same invite, whole, is countersigned and shown; refusing it when lat3 does not answer
    // for the room still rids bob of it.
    let body = json!({ "room_version": "12", "event": invite, "invite_room_state": [create] });
    let (status, signed) = send(body, "lat3.test", forged_room.clone()).await;
    assert_eq!(status, 200, "{signed}");
    assert!(signed["event"]["signatures"]["lat2.test"].is_object(), "{signed}");
    let sync = sync_until(&lat2, &bob, "the invite", |s| invite_of(s, &forged_room).is_array()).await;
    let since = sync["next_batch"].as_str().unwrap().to_owned();
    let leave = format!("/_matrix/client/v3/rooms/{forged_room}/leave");
    let (status, body) = lat2.http.post(&leave, Some(&bob), &json!({})).await;
    assert_eq!(status, 200, "{body}");
    let (_, after) = lat2.http.get(&format!("/_matrix/client/v3/sync?timeout=0&since={since}"), Some(&bob)).await;
    assert!(after["rooms"]["leave"][&forged_room].is_object(), "{after}");
    let (_, fresh) = lat2.http.get("/_matrix/client/v3/sync?timeout=0", Some(&bob)).await;
    assert!(fresh["rooms"]["invite"][&forged_room].is_null(), "{fresh}");

    lat3.stop().await;
    lat2.stop().await;
    lat1.stop().await;
}

/// Signs `value` as `origin` for `version`; returns the event ID and the signed event.
pub(crate) fn signed_event(key: &Ed25519KeyPair, origin: &str, version: &str, value: Value) -> (String, Value) {
    let version = RoomVersion::parse(version).unwrap();
    let CanonicalJsonValue::Object(mut object) = CanonicalJsonValue::try_from(value).unwrap() else { panic!() };
    lattice_core::pdu::hash_and_sign(&mut object, origin, key, &version).unwrap();
    let id = lattice_core::pdu::event_id(&object, &version).unwrap();
    (id.to_string(), serde_json::to_value(&object).unwrap())
}

fn escaped(id: &str) -> String {
    id.replace('!', "%21").replace('$', "%24").replace('@', "%40").replace(':', "%3A")
}

#[tokio::test]
async fn the_deprecated_v1_invite_send_join_and_send_leave_are_answered() {
    let net = Network::new(&["lat1.test", "lat2.test", "lat3.test"]);
    let mut lat1 = net.start("lat1.test").await;
    let mut lat2 = net.start("lat2.test").await;
    let mut lat3 = net.start("lat3.test").await;
    let alice = lat1.register_user("alice").await;
    let bob = lat2.register_user("bob").await;
    let key3 = lat3.signing_key();

    // v1 invite: the event itself, with the room described in `unsigned`, of a version-1 room.
    let room = "!old:lat3.test";
    let (invite_id, mut invite) = signed_event(
        &key3,
        "lat3.test",
        "1",
        json!({
            "event_id": "$invite1:lat3.test", "type": "m.room.member", "state_key": "@bob:lat2.test",
            "sender": "@mallory:lat3.test", "room_id": room, "origin": "lat3.test", "origin_server_ts": 5,
            "content": { "membership": "invite" }, "depth": 3, "prev_events": [], "auth_events": [],
        }),
    );
    invite["unsigned"] = json!({ "invite_room_state": [
        { "type": "m.room.name", "state_key": "", "sender": "@mallory:lat3.test", "content": { "name": "From 2018" } },
    ] });
    let path = format!("/_matrix/federation/v1/invite/{}/{}", escaped(room), escaped(&invite_id));
    let auth = x_matrix(&key3, "lat3.test", "lat2.test", &Method::PUT, &path, invite.to_string().as_bytes());
    let (status, answer) = net.request("lat2.test", Method::PUT, &path, Some(&auth), Some(&invite)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer[0], 200, "{answer}");
    assert!(answer[1]["event"]["signatures"]["lat2.test"].is_object(), "{answer}");
    let sync = sync_until(&lat2, &bob, "the v1 invite", |s| invite_of(s, room).is_array()).await;
    let name = stripped(invite_of(&sync, room), "m.room.name").map(|e| e["content"]["name"].clone());
    assert_eq!(name, Some(json!("From 2018")), "{sync}");

    // v1 send_join and send_leave of lat3's user into alice's room on lat1.
    let public = create_room(&lat1.http, &alice, json!({ "preset": "public_chat", "room_version": "12" })).await;
    let carol = "@carol:lat3.test";
    for (membership, send) in [("join", "send_join"), ("leave", "send_leave")] {
        let path = format!("/_matrix/federation/v1/make_{membership}/{}/{}?ver=12", escaped(&public), escaped(carol));
        let (status, template) = signed_request(&net, ("lat3.test", &key3), Method::GET, &path, None).await;
        assert_eq!(status, 200, "{template}");
        let mut event = template["event"].clone();
        event["origin_server_ts"] = json!(10);
        let (event_id, event) = signed_event(&key3, "lat3.test", "12", event);
        let path = format!("/_matrix/federation/v1/{send}/{}/{}", escaped(&public), escaped(&event_id));
        let (status, answer) = signed_request(&net, ("lat3.test", &key3), Method::PUT, &path, Some(event)).await;
        assert_eq!((status.as_u16(), &answer[0]), (200, &json!(200)), "{send}: {answer}");
        let state = format!("/_matrix/client/v3/rooms/{public}/state/m.room.member/{carol}");
        let (_, content) = lat1.http.get(&state, Some(&alice)).await;
        assert_eq!(content["membership"], membership, "{content}");
        if membership == "join" {
            assert!(answer[1]["state"].as_array().is_some_and(|s| !s.is_empty()), "{answer}");
            assert!(answer[1]["auth_chain"].is_array(), "{answer}");
        }
    }

    lat3.stop().await;
    lat2.stop().await;
    lat1.stop().await;
}
