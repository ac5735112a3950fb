//! Rooms on one server over HTTP: creating, sending with transaction IDs, state, membership.

use reqwest::Method;
use serde_json::{Value, json};

use crate::support::{Http, TestServer, assert_error, create_room};

async fn send(http: &Http, token: &str, room: &str, txn: &str, body: &str) -> (reqwest::StatusCode, Value) {
    let path = format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/{txn}");
    http.put(&path, Some(token), &json!({ "msgtype": "m.text", "body": body })).await
}

#[tokio::test]
async fn alice_creates_a_private_room_invites_bob_and_they_talk() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let bob = server.register("bob", "pw").await;
    let carol = server.register("carol", "pw").await;

    let room = create_room(http, &alice, json!({ "preset": "private_chat", "name": "Plans", "topic": "Q3" })).await;
    let (_, name) = http.get(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.name"), Some(&alice)).await;
    assert_eq!(name, json!({ "name": "Plans" }));
    // `?format=event` answers the whole event; `content` is the default; other formats are refused.
    let name_path = format!("/_matrix/client/v3/rooms/{room}/state/m.room.name");
    let (_, event) = http.get(&format!("{name_path}/?format=event"), Some(&alice)).await;
    assert_eq!((event["type"].as_str(), event["state_key"].as_str()), (Some("m.room.name"), Some("")), "{event}");
    assert_eq!(event["content"], json!({ "name": "Plans" }));
    assert_eq!(http.get(&format!("{name_path}?format=content"), Some(&alice)).await.1, json!({ "name": "Plans" }));
    assert_error(&http.get(&format!("{name_path}?format=xml"), Some(&alice)).await, 400, "M_INVALID_PARAM");
    let (_, state) = http.get(&format!("/_matrix/client/v3/rooms/{room}/state"), Some(&alice)).await;
    let kinds: Vec<&str> = state.as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    for kind in [
        "m.room.create",
        "m.room.member",
        "m.room.power_levels",
        "m.room.join_rules",
        "m.room.history_visibility",
        "m.room.name",
        "m.room.topic",
    ] {
        assert!(kinds.contains(&kind), "{kind} in {kinds:?}");
    }
    assert!(state[0]["hashes"].is_null() && state[0]["event_id"].is_string(), "client format: {}", state[0]);

    // Sending is idempotent per transaction ID; reusing one for other content is refused.
    let (status, first) = send(http, &alice, &room, "t1", "hello").await;
    assert_eq!(status, 200, "{first}");
    let (_, again) = send(http, &alice, &room, "t1", "hello").await;
    assert_eq!(again["event_id"], first["event_id"]);
    assert_error(&send(http, &alice, &room, "t1", "different").await, 400, "M_INVALID_PARAM");
    // Transaction IDs are scoped to the room they were sent to, like the request path.
    let elsewhere = create_room(http, &alice, json!({})).await;
    let (status, other) = send(http, &alice, &elsewhere, "t1", "hello").await;
    assert_eq!(status, 200, "{other}");
    assert_ne!(other["event_id"], first["event_id"]);

    // Outsiders can neither read nor write; an invite-only room refuses carol's join.
    assert_error(&send(http, &bob, &room, "b1", "let me in").await, 403, "M_FORBIDDEN");
    assert_error(&http.get(&format!("/_matrix/client/v3/rooms/{room}/state"), Some(&bob)).await, 403, "M_FORBIDDEN");
    assert_error(
        &http.post(&format!("/_matrix/client/v3/join/{room}"), Some(&carol), &json!({})).await,
        403,
        "M_FORBIDDEN",
    );

    let invite = json!({ "user_id": server.user_id("bob") });
    assert_eq!(http.post(&format!("/_matrix/client/v3/rooms/{room}/invite"), Some(&alice), &invite).await.0, 200);
    let (status, joined) = http.post(&format!("/_matrix/client/v3/join/{room}"), Some(&bob), &json!({})).await;
    assert_eq!(status, 200, "{joined}");
    assert_eq!(joined["room_id"], room);
    assert_eq!(send(http, &bob, &room, "b1", "hi alice").await.0, 200);
    let (_, rooms) = http.get("/_matrix/client/v3/joined_rooms", Some(&bob)).await;
    assert_eq!(rooms["joined_rooms"], json!([room]));
    let (_, member) = http
        .get(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.member/{}", server.user_id("bob")), Some(&alice))
        .await;
    assert_eq!(member["membership"], "join");

    // bob (power 0) may not kick alice; alice kicks bob, who can then no longer send.
    let kick_alice = json!({ "user_id": server.user_id("alice") });
    assert_error(
        &http.post(&format!("/_matrix/client/v3/rooms/{room}/kick"), Some(&bob), &kick_alice).await,
        403,
        "M_FORBIDDEN",
    );
    let kick_bob = json!({ "user_id": server.user_id("bob"), "reason": "bye" });
    assert_eq!(http.post(&format!("/_matrix/client/v3/rooms/{room}/kick"), Some(&alice), &kick_bob).await.0, 200);
    assert_error(&send(http, &bob, &room, "b2", "still here?").await, 403, "M_FORBIDDEN");
    assert_eq!(http.get("/_matrix/client/v3/joined_rooms", Some(&bob)).await.1["joined_rooms"], json!([]));
    server.stop().await;
}

#[tokio::test]
async fn public_rooms_ban_and_leave() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let dave = server.register("dave", "pw").await;
    let room = create_room(http, &alice, json!({ "preset": "public_chat", "room_version": "12" })).await;
    assert_eq!(http.post(&format!("/_matrix/client/v3/rooms/{room}/join"), Some(&dave), &json!({})).await.0, 200);
    assert_eq!(http.post(&format!("/_matrix/client/v3/rooms/{room}/leave"), Some(&dave), &json!({})).await.0, 200);
    let ban = json!({ "user_id": server.user_id("dave"), "reason": "spam" });
    assert_eq!(http.post(&format!("/_matrix/client/v3/rooms/{room}/ban"), Some(&alice), &ban).await.0, 200);
    assert_error(
        &http.post(&format!("/_matrix/client/v3/rooms/{room}/join"), Some(&dave), &json!({})).await,
        403,
        "M_FORBIDDEN",
    );
    let unban = json!({ "user_id": server.user_id("dave") });
    assert_eq!(http.post(&format!("/_matrix/client/v3/rooms/{room}/unban"), Some(&alice), &unban).await.0, 200);
    assert_eq!(http.post(&format!("/_matrix/client/v3/rooms/{room}/join"), Some(&dave), &json!({})).await.0, 200);

    // State events: dave (0) may not change the topic (state_default 50); alice may.
    let topic = format!("/_matrix/client/v3/rooms/{room}/state/m.room.topic");
    assert_error(&http.put(&topic, Some(&dave), &json!({ "topic": "mine" })).await, 403, "M_FORBIDDEN");
    assert_eq!(http.put(&topic, Some(&alice), &json!({ "topic": "ours" })).await.0, 200);
    assert_eq!(http.get(&topic, Some(&dave)).await.1, json!({ "topic": "ours" }));
    server.stop().await;
}

#[tokio::test]
async fn bad_room_requests_get_clear_errors() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    assert_error(
        &http.post("/_matrix/client/v3/createRoom", Some(&alice), &json!({ "room_version": "13" })).await,
        400,
        "M_UNSUPPORTED_ROOM_VERSION",
    );
    assert_error(
        &http.post("/_matrix/client/v3/createRoom", Some(&alice), &json!({ "preset": "party" })).await,
        400,
        "M_BAD_JSON",
    );
    assert_error(
        &http.post("/_matrix/client/v3/createRoom", Some(&alice), &json!({ "visibility": "secret" })).await,
        400,
        "M_BAD_JSON",
    );
    assert_error(&send(http, &alice, "!nowhere:hs1.localhost", "t", "x").await, 404, "M_NOT_FOUND");
    assert_error(&send(http, &alice, "not-a-room", "t", "x").await, 400, "M_INVALID_PARAM");
    assert_error(
        &http.post("/_matrix/client/v3/join/%23alias:hs1.localhost", Some(&alice), &json!({})).await,
        404,
        "M_NOT_FOUND",
    );
    let room = create_room(http, &alice, json!({})).await;
    let path = format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/t2");
    assert_error(&http.request(Method::PUT, &path, Some(&alice), Some(b"[]".to_vec())).await, 400, "M_BAD_JSON");
    // An event over 64 KiB once built is too large; nothing is stored.
    let huge = json!({ "msgtype": "m.text", "body": "x".repeat(65_000) });
    assert_error(&http.put(&path, Some(&alice), &huge).await, 413, "M_TOO_LARGE");
    let long_key = format!("/_matrix/client/v3/rooms/{room}/state/m.custom/{}", "k".repeat(300));
    assert_error(&http.put(&long_key, Some(&alice), &json!({})).await, 400, "M_BAD_JSON");
    let long_type = format!("/_matrix/client/v3/rooms/{room}/send/{}/t3", "t".repeat(300));
    assert_error(&http.put(&long_type, Some(&alice), &json!({})).await, 400, "M_BAD_JSON");
    let (_, history) = http.get(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=1"), Some(&alice)).await;
    assert_ne!(history["chunk"][0]["type"], "m.room.message", "{history}");
    assert_error(
        &http.get(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.nothing"), Some(&alice)).await,
        404,
        "M_NOT_FOUND",
    );
    server.stop().await;
}

#[tokio::test]
async fn members_and_single_events_are_readable_by_members() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let bob = server.register("bob", "pw").await;
    let room = create_room(http, &alice, json!({ "preset": "public_chat" })).await;
    assert_eq!(http.post(&format!("/_matrix/client/v3/join/{room}"), Some(&bob), &json!({})).await.0, 200);
    let (_, sent) = send(http, &alice, &room, "e1", "findable").await;
    let event_id = sent["event_id"].as_str().unwrap();

    let (status, event) = http.get(&format!("/_matrix/client/v3/rooms/{room}/event/{event_id}"), Some(&bob)).await;
    assert_eq!(status, 200, "{event}");
    assert_eq!(event["content"]["body"], "findable");
    assert_eq!(event["sender"], server.user_id("alice"));
    assert_error(
        &http.get(&format!("/_matrix/client/v3/rooms/{room}/event/$nope"), Some(&bob)).await,
        404,
        "M_NOT_FOUND",
    );

    let (_, joined) = http.get(&format!("/_matrix/client/v3/rooms/{room}/joined_members"), Some(&bob)).await;
    let mut users: Vec<&String> = joined["joined"].as_object().unwrap().keys().collect();
    users.sort();
    assert_eq!(users, [&server.user_id("alice"), &server.user_id("bob")]);
    let (_, members) =
        http.get(&format!("/_matrix/client/v3/rooms/{room}/members?not_membership=join"), Some(&alice)).await;
    assert_eq!(members["chunk"], json!([]));
    let (_, members) =
        http.get(&format!("/_matrix/client/v3/rooms/{room}/members?membership=join"), Some(&alice)).await;
    assert_eq!(members["chunk"].as_array().unwrap().len(), 2);

    let carol = server.register("carol", "pw").await;
    assert_error(
        &http.get(&format!("/_matrix/client/v3/rooms/{room}/members"), Some(&carol)).await,
        403,
        "M_FORBIDDEN",
    );
    server.stop().await;
}

#[tokio::test]
async fn redactions_strip_the_content_in_old_and_new_room_versions() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    for version in ["10", "11", "12"] {
        let room = create_room(http, &alice, json!({ "room_version": version })).await;
        let (_, sent) = send(http, &alice, &room, &format!("r{version}"), "oops").await;
        let target = sent["event_id"].as_str().unwrap();
        let path = format!("/_matrix/client/v3/rooms/{room}/redact/{target}/x{version}");
        let (status, redacted) = http.put(&path, Some(&alice), &json!({ "reason": "typo" })).await;
        assert_eq!(status, 200, "v{version}: {redacted}");
        let (_, event) = http.get(&format!("/_matrix/client/v3/rooms/{room}/event/{target}"), Some(&alice)).await;
        assert_eq!(event["content"], json!({}), "v{version}: {event}");
    }
    server.stop().await;
}

#[tokio::test]
async fn the_default_room_version_is_configurable_and_announced() {
    let server = TestServer::start_with(|config| config.rooms.default_room_version = "10".into()).await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let (_, capabilities) = http.get("/_matrix/client/v3/capabilities", Some(&alice)).await;
    let versions = &capabilities["capabilities"]["m.room_versions"];
    assert_eq!(versions["default"], "10", "{capabilities}");
    assert_eq!(versions["available"].as_object().unwrap().len(), 12);
    let room = create_room(http, &alice, json!({})).await;
    let (_, create) = http.get(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.create"), Some(&alice)).await;
    assert_eq!(create["room_version"], "10");
    server.stop().await;
}
