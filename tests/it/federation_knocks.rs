//! Knocks between real Lattice servers on loopback: a user of one server knocks on a room of
//! another (by alias, or by room ID with `via`), sees the room described in `/sync` while
//! waiting, and is let in (an invite, then a join), refused (a kick) or withdraws (a leave).
//! And the knocks a server must refuse.

use reqwest::Method;
use serde_json::{Value, json};

use crate::federation_invites::stripped;
use crate::federation_keys::{Network, Server};
use crate::federation_rooms::{signed_request, sync_until, sync_until_from, timeline_bodies};
use crate::support::{assert_error, create_room, say};

fn knock_state<'a>(sync: &'a Value, room: &str) -> &'a Value {
    &sync["rooms"]["knock"][room]["knock_state"]["events"]
}

async fn membership_on(server: &Server, token: &str, room: &str, user: &str) -> Value {
    let path = format!("/_matrix/client/v3/rooms/{room}/state/m.room.member/{user}");
    let (status, content) = server.http.get(&path, Some(token)).await;
    assert_eq!(status, 200, "{path}: {content}");
    content
}

/// alice's room on lat1 that takes knocks, with a name and an alias.
async fn knock_room(lat1: &Server, alice: &str, version: &str) -> String {
    let room = create_room(
        &lat1.http,
        alice,
        json!({
            "preset": "private_chat", "name": "Knock knock", "room_alias_name": "club", "room_version": version,
            "initial_state": [{ "type": "m.room.join_rules", "state_key": "", "content": { "join_rule": "knock" } }],
        }),
    )
    .await;
    let (_, rules) =
        lat1.http.get(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.join_rules/"), Some(alice)).await;
    assert_eq!(rules["join_rule"], "knock", "{rules}");
    room
}

async fn knock(server: &Server, token: &str, target: &str, body: Value) -> (reqwest::StatusCode, Value) {
    server.http.post(&format!("/_matrix/client/v3/knock/{}", target.replace('#', "%23")), Some(token), &body).await
}

#[tokio::test]
async fn a_knock_from_another_server_is_described_and_let_in() {
    let net = Network::new(&["lat1.test", "lat2.test"]);
    let mut lat1 = net.start("lat1.test").await;
    let mut lat2 = net.start("lat2.test").await;
    let alice = lat1.register_user("alice").await;
    let bob = lat2.register_user("bob").await;
    let room = knock_room(&lat1, &alice, "12").await;

    // bob knocks by alias: lat2 resolves it at lat1, then make_knock / send_knock there.
    let (status, body) = knock(&lat2, &bob, "#club:lat1.test", json!({ "reason": "let me in" })).await;
    assert_eq!((status.as_u16(), &body["room_id"]), (200, &json!(room)), "{body}");
    let knocked = membership_on(&lat1, &alice, &room, "@bob:lat2.test").await;
    assert_eq!((&knocked["membership"], &knocked["reason"]), (&json!("knock"), &json!("let me in")), "{knocked}");
    sync_until(&lat1, &alice, "bob's knock", |s| {
        s["rooms"]["join"][&room]["timeline"]["events"]
            .as_array()
            .is_some_and(|events| events.iter().any(|e| e["content"]["membership"] == "knock"))
    })
    .await;

    // While waiting, bob's server describes the room from what lat1 answered.
    let sync = sync_until(&lat2, &bob, "the knock", |s| knock_state(s, &room).is_array()).await;
    let state = knock_state(&sync, &room);
    assert_eq!(stripped(state, "m.room.name").map(|e| &e["content"]["name"]), Some(&json!("Knock knock")), "{state}");
    assert!(stripped(state, "m.room.create").is_some(), "{state}");
    assert_eq!(stripped(state, "m.room.join_rules").map(|e| &e["content"]["join_rule"]), Some(&json!("knock")));
    let own = state
        .as_array()
        .and_then(|events| events.iter().find(|e| e["type"] == "m.room.member" && e["state_key"] == "@bob:lat2.test"))
        .expect("the knock itself");
    assert_eq!(own["content"]["membership"], "knock", "{state}");
    // Shown once.
    let next = sync["next_batch"].as_str().unwrap();
    let (_, again) = lat2.http.get(&format!("/_matrix/client/v3/sync?timeout=0&since={next}"), Some(&bob)).await;
    assert!(knock_state(&again, &room).is_null(), "{again}");

    // alice lets bob in: an invite, which replaces the knock on lat2, then bob joins.
    let invite = format!("/_matrix/client/v3/rooms/{room}/invite");
    let (status, body) = lat1.http.post(&invite, Some(&alice), &json!({ "user_id": "@bob:lat2.test" })).await;
    assert_eq!(status, 200, "{body}");
    sync_until(&lat2, &bob, "the invite", |s| s["rooms"]["invite"][&room].is_object()).await;
    let (status, joined) = lat2.http.post(&format!("/_matrix/client/v3/join/{room}"), Some(&bob), &json!({})).await;
    assert_eq!(status, 200, "{joined}");
    assert_eq!(membership_on(&lat1, &alice, &room, "@bob:lat2.test").await["membership"], "join");
    say(&lat1.http, &alice, &room, "come in").await;
    sync_until(&lat2, &bob, "alice's message", |s| timeline_bodies(s, &room).contains(&"come in".to_owned())).await;

    lat2.stop().await;
    lat1.stop().await;
}

#[tokio::test]
async fn a_knock_from_another_server_is_withdrawn_or_refused() {
    let net = Network::new(&["lat1.test", "lat2.test"]);
    let mut lat1 = net.start("lat1.test").await;
    let mut lat2 = net.start("lat2.test").await;
    let alice = lat1.register_user("alice").await;
    let bob = lat2.register_user("bob").await;
    let room = knock_room(&lat1, &alice, "12").await;

    // A v12 room ID names no server: without `via` there is nobody to ask.
    let (status, body) = knock(&lat2, &bob, &room, json!({})).await;
    assert_eq!(status, 404, "{body}");
    let with_via = format!("{room}?via=lat1.test");

    // Withdrawn: bob's leave goes to lat1 through make_leave / send_leave.
    let (status, body) = knock(&lat2, &bob, &with_via, json!({})).await;
    assert_eq!(status, 200, "{body}");
    let sync = sync_until(&lat2, &bob, "the knock", |s| knock_state(s, &room).is_array()).await;
    let since = sync["next_batch"].as_str().unwrap().to_owned();
    let (status, body) =
        lat2.http.post(&format!("/_matrix/client/v3/rooms/{room}/leave"), Some(&bob), &json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(membership_on(&lat1, &alice, &room, "@bob:lat2.test").await["membership"], "leave");
    let (_, after) = lat2.http.get(&format!("/_matrix/client/v3/sync?timeout=0&since={since}"), Some(&bob)).await;
    assert_eq!(after["rooms"]["leave"][&room]["timeline"]["events"][0]["content"]["membership"], "leave", "{after}");

    // Refused: alice's kick of the knocker reaches bob's server, which is not in the room.
    let (status, body) = knock(&lat2, &bob, &with_via, json!({ "reason": "again" })).await;
    assert_eq!(status, 200, "{body}");
    let sync = sync_until(&lat2, &bob, "the second knock", |s| knock_state(s, &room).is_array()).await;
    let since = sync["next_batch"].as_str().unwrap().to_owned();
    let kick = format!("/_matrix/client/v3/rooms/{room}/kick");
    let (status, body) = lat1.http.post(&kick, Some(&alice), &json!({ "user_id": "@bob:lat2.test" })).await;
    assert_eq!(status, 200, "{body}");
    let left = |s: &Value| s["rooms"]["leave"][&room].is_object();
    let answer = sync_until_from(&lat2, &bob, Some(&since), "the refusal", left).await;
    assert_eq!(answer["rooms"]["leave"][&room]["timeline"]["events"][0]["sender"], "@alice:lat1.test");

    // Banned: the room's answer is passed on, and nothing is recorded on lat2.
    let ban = format!("/_matrix/client/v3/rooms/{room}/ban");
    let (status, body) = lat1.http.post(&ban, Some(&alice), &json!({ "user_id": "@bob:lat2.test" })).await;
    assert_eq!(status, 200, "{body}");
    assert_error(&knock(&lat2, &bob, &with_via, json!({})).await, 403, "M_FORBIDDEN");
    assert_eq!(membership_on(&lat1, &alice, &room, "@bob:lat2.test").await["membership"], "ban");

    lat2.stop().await;
    lat1.stop().await;
}

#[tokio::test]
async fn knocks_a_server_must_refuse() {
    let net = Network::new(&["lat1.test", "lat2.test", "lat3.test"]);
    let mut lat1 = net.start("lat1.test").await;
    let mut lat2 = net.start("lat2.test").await;
    let mut lat3 = net.start("lat3.test").await;
    let alice = lat1.register_user("alice").await;
    let bob = lat2.register_user("bob").await;
    let room = knock_room(&lat1, &alice, "12").await;

    // A room that does not take knocks: lat1's refusal reaches bob's client.
    let closed = create_room(&lat1.http, &alice, json!({ "preset": "private_chat", "room_version": "12" })).await;
    assert_error(&knock(&lat2, &bob, &format!("{closed}?via=lat1.test"), json!({})).await, 403, "M_FORBIDDEN");
    // A room version without knocking (they came with v7), though its join rule says knock.
    let old = knock_room_without_alias(&lat1, &alice, "6").await;
    assert_error(&knock(&lat2, &bob, &format!("{old}?via=lat1.test"), json!({})).await, 403, "M_FORBIDDEN");
    let (_, sync) = lat2.http.get("/_matrix/client/v3/sync?timeout=0", Some(&bob)).await;
    assert!(sync["rooms"]["knock"].as_object().is_none_or(|rooms| rooms.is_empty()), "{sync}");

    // Straight at lat1: lat3 asking a template for lat2's user; a template for a server that
    // supports no version the room has; a send_knock carrying a join.
    let encoded = room.replace('!', "%21");
    let key3 = lat3.signing_key();
    let path = format!("/_matrix/federation/v1/make_knock/{encoded}/%40bob%3Alat2.test?ver=12");
    assert_error(&signed_request(&net, ("lat3.test", &key3), Method::GET, &path, None).await, 403, "M_FORBIDDEN");
    let path = format!("/_matrix/federation/v1/make_knock/{encoded}/%40carol%3Alat3.test?ver=1&ver=2");
    let answer = signed_request(&net, ("lat3.test", &key3), Method::GET, &path, None).await;
    assert_error(&answer, 400, "M_INCOMPATIBLE_ROOM_VERSION");
    assert_eq!(answer.1["room_version"], "12", "{:?}", answer.1);
    let path = format!("/_matrix/federation/v1/make_knock/{encoded}/%40carol%3Alat3.test?ver=12");
    let (status, template) = signed_request(&net, ("lat3.test", &key3), Method::GET, &path, None).await;
    assert_eq!((status.as_u16(), &template["event"]["content"]["membership"]), (200, &json!("knock")), "{template}");
    let mut event = template["event"].clone();
    event["content"] = json!({ "membership": "join" });
    event["origin_server_ts"] = json!(1);
    let version = lattice_core::room_version::RoomVersion::parse("12").unwrap();
    let ruma::CanonicalJsonValue::Object(mut object) = ruma::CanonicalJsonValue::try_from(event).unwrap() else {
        panic!("an object")
    };
    lattice_core::pdu::hash_and_sign(&mut object, "lat3.test", &key3, &version).unwrap();
    let event_id = lattice_core::pdu::event_id(&object, &version).unwrap();
    let path = format!("/_matrix/federation/v1/send_knock/{encoded}/{}", event_id.as_str().replace('$', "%24"));
    let body = serde_json::to_value(&object).unwrap();
    let answer = signed_request(&net, ("lat3.test", &key3), Method::PUT, &path, Some(body)).await;
    assert_eq!(answer.0, 400, "{:?}", answer.1);
    assert_eq!(membership_on_absent(&lat1, &alice, &room, "@carol:lat3.test").await, 404);
    // lat3 signing a knock, or a v1 join, for lat2's user: a server speaks for its own users only.
    for (endpoint, membership) in [("send_knock", "knock"), ("send_join", "join")] {
        let mut forged = template["event"].clone();
        forged["sender"] = json!("@bob:lat2.test");
        forged["state_key"] = json!("@bob:lat2.test");
        forged["content"] = json!({ "membership": membership });
        forged["origin_server_ts"] = json!(2);
        let ruma::CanonicalJsonValue::Object(mut object) = ruma::CanonicalJsonValue::try_from(forged).unwrap() else {
            panic!("an object")
        };
        lattice_core::pdu::hash_and_sign(&mut object, "lat3.test", &key3, &version).unwrap();
        let event_id = lattice_core::pdu::event_id(&object, &version).unwrap();
        let path = format!("/_matrix/federation/v1/{endpoint}/{encoded}/{}", event_id.as_str().replace('$', "%24"));
        let body = serde_json::to_value(&object).unwrap();
        let answer = signed_request(&net, ("lat3.test", &key3), Method::PUT, &path, Some(body)).await;
        assert_error(&answer, 403, "M_FORBIDDEN");
    }
    assert_eq!(membership_on_absent(&lat1, &alice, &room, "@bob:lat2.test").await, 404);

    lat3.stop().await;
    lat2.stop().await;
    lat1.stop().await;
}

async fn knock_room_without_alias(lat1: &Server, alice: &str, version: &str) -> String {
    create_room(
        &lat1.http,
        alice,
        json!({
            "preset": "private_chat", "room_version": version,
            "initial_state": [{ "type": "m.room.join_rules", "state_key": "", "content": { "join_rule": "knock" } }],
        }),
    )
    .await
}

async fn membership_on_absent(server: &Server, token: &str, room: &str, user: &str) -> u16 {
    let path = format!("/_matrix/client/v3/rooms/{room}/state/m.room.member/{user}");
    server.http.get(&path, Some(token)).await.0.as_u16()
}
