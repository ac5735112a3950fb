//! History visibility: each `m.room.history_visibility` setting decides what a member who joined
//! late, a member who left, and a stranger may read, on every path that serves events or state.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{Http, TestServer, assert_error, bodies, create_room, say};

async fn post_ok(http: &Http, token: &str, path: &str, body: Value) -> Value {
    let (status, response) = http.post(path, Some(token), &body).await;
    assert_eq!(status, 200, "{path}: {response}");
    response
}

async fn get_ok(http: &Http, token: &str, path: &str) -> Value {
    let (status, body) = http.get(path, Some(token)).await;
    assert_eq!(status, 200, "{path}: {body}");
    body
}

/// The message bodies `token`'s user reads going back through the whole room.
async fn readable_bodies(http: &Http, token: &str, room: &str) -> Vec<String> {
    let page = get_ok(http, token, &format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=100")).await;
    let mut found = bodies(&page["chunk"]);
    found.reverse();
    found
}

/// A private room of alice's with `visibility`, where bob is invited, joins and leaves between
/// messages. Returns the room and the message IDs by body.
struct Story {
    room: String,
    ids: Vec<(String, String)>,
}

impl Story {
    fn id(&self, body: &str) -> &str {
        &self.ids.iter().find(|(b, _)| b == body).expect("told").1
    }
}

async fn tell(http: &Http, alice: &str, bob: &str, bob_id: &str, visibility: &str, leave: bool) -> Story {
    let room = create_room(http, alice, json!({ "preset": "private_chat" })).await;
    let path = format!("/_matrix/client/v3/rooms/{room}/state/m.room.history_visibility");
    let (status, body) = http.put(&path, Some(alice), &json!({ "history_visibility": visibility })).await;
    assert_eq!(status, 200, "{body}");
    let mut ids = Vec::new();
    ids.push(("before-invite".to_owned(), say(http, alice, &room, "before-invite").await));
    post_ok(http, alice, &format!("/_matrix/client/v3/rooms/{room}/invite"), json!({ "user_id": bob_id })).await;
    ids.push(("after-invite".to_owned(), say(http, alice, &room, "after-invite").await));
    post_ok(http, bob, &format!("/_matrix/client/v3/join/{room}"), json!({})).await;
    ids.push(("after-join".to_owned(), say(http, alice, &room, "after-join").await));
    if leave {
        post_ok(http, bob, &format!("/_matrix/client/v3/rooms/{room}/leave"), json!({})).await;
        ids.push(("after-leave".to_owned(), say(http, alice, &room, "after-leave").await));
    }
    Story { room, ids }
}

const ALL: [&str; 3] = ["before-invite", "after-invite", "after-join"];

/// What a member who was invited, then joined, may read under each setting.
fn expected_for_member(visibility: &str) -> Vec<&'static str> {
    match visibility {
        "joined" => vec!["after-join"],
        "invited" => vec!["after-invite", "after-join"],
        _ => ALL.to_vec(),
    }
}

#[tokio::test]
async fn each_setting_decides_what_a_late_member_reads_on_every_path() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let bob = server.register("bob", "pw").await;
    for visibility in ["world_readable", "shared", "invited", "joined"] {
        let story = tell(http, &alice, &bob, &server.user_id("bob"), visibility, false).await;
        let room = &story.room;
        let expected = expected_for_member(visibility);
        assert_eq!(readable_bodies(http, &bob, room).await, expected, "{visibility}: /messages");

        for body in ALL {
            let path = format!("/_matrix/client/v3/rooms/{room}/event/{}", story.id(body));
            let (status, response) = http.get(&path, Some(&bob)).await;
            let visible = expected.contains(&body);
            assert_eq!(status.is_success(), visible, "{visibility}: /event of {body}: {response}");
            if !visible {
                assert_error(&(status, response), 404, "M_NOT_FOUND");
                let path = format!("/_matrix/client/v3/rooms/{room}/context/{}", story.id(body));
                assert_error(&http.get(&path, Some(&bob)).await, 404, "M_NOT_FOUND");
            }
        }
        // The context of the newest message holds only what bob may read.
        let path = format!("/_matrix/client/v3/rooms/{room}/context/{}?limit=20", story.id("after-join"));
        let context = get_ok(http, &bob, &path).await;
        let mut before = bodies(&context["events_before"]);
        before.reverse();
        assert_eq!(before, expected[..expected.len() - 1], "{visibility}: /context");

        // An initial sync's timeline of the room, too.
        let sync = get_ok(http, &bob, "/_matrix/client/v3/sync").await;
        let timeline = &sync["rooms"]["join"][room]["timeline"]["events"];
        assert_eq!(bodies(timeline), expected, "{visibility}: /sync");
    }
}

#[tokio::test]
async fn a_member_who_left_reads_up_to_the_leave_and_never_after() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let bob = server.register("bob", "pw").await;
    for visibility in ["shared", "invited", "joined"] {
        let story = tell(http, &alice, &bob, &server.user_id("bob"), visibility, true).await;
        let room = &story.room;
        let expected = expected_for_member(visibility);
        assert_eq!(readable_bodies(http, &bob, room).await, expected, "{visibility}: /messages");
        let path = format!("/_matrix/client/v3/rooms/{room}/event/{}", story.id("after-leave"));
        assert_error(&http.get(&path, Some(&bob)).await, 404, "M_NOT_FOUND");

        // State as bob left it: a rename after he left is not his to see.
        let rename = format!("/_matrix/client/v3/rooms/{room}/state/m.room.name");
        let (status, body) = http.put(&rename, Some(&alice), &json!({ "name": "Secret plans" })).await;
        assert_eq!(status, 200, "{body}");
        assert_error(&http.get(&rename, Some(&bob)).await, 404, "M_NOT_FOUND");
        let state = get_ok(http, &bob, &format!("/_matrix/client/v3/rooms/{room}/state")).await;
        assert!(!state.to_string().contains("Secret plans"), "{visibility}: {state}");
        let members = get_ok(http, &bob, &format!("/_matrix/client/v3/rooms/{room}/members")).await;
        let bob_member = members["chunk"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["state_key"] == server.user_id("bob"))
            .expect("bob's own leave");
        assert_eq!(bob_member["content"]["membership"], "leave");
    }
    // World-readable history is everyone's, including what came after the leave.
    let story = tell(http, &alice, &bob, &server.user_id("bob"), "world_readable", true).await;
    let mut everything = ALL.to_vec();
    everything.push("after-leave");
    assert_eq!(readable_bodies(http, &bob, &story.room).await, everything);
}

#[tokio::test]
async fn strangers_read_world_readable_rooms_only() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let bob = server.register("bob", "pw").await;
    let carol = server.register("carol", "pw").await;
    for visibility in ["world_readable", "shared", "invited", "joined"] {
        let story = tell(http, &alice, &bob, &server.user_id("bob"), visibility, false).await;
        let room = &story.room;
        let paths = [
            format!("/_matrix/client/v3/rooms/{room}/messages?dir=b"),
            format!("/_matrix/client/v3/rooms/{room}/event/{}", story.id("after-join")),
            format!("/_matrix/client/v3/rooms/{room}/context/{}", story.id("after-join")),
            format!("/_matrix/client/v3/rooms/{room}/state"),
            format!("/_matrix/client/v3/rooms/{room}/members"),
            format!("/_matrix/client/v1/rooms/{room}/relations/{}", story.id("after-join")),
            format!("/_matrix/client/v1/rooms/{room}/threads"),
            format!("/_matrix/client/v1/rooms/{room}/timestamp_to_event?ts=0&dir=f"),
        ];
        for path in &paths {
            let (status, body) = http.get(path, Some(&carol)).await;
            if visibility == "world_readable" {
                assert_eq!(status, StatusCode::OK, "{path}: {body}");
            } else {
                assert_error(&(status, body), 403, "M_FORBIDDEN");
            }
        }
    }
}

#[tokio::test]
async fn threads_relations_and_timestamps_hide_what_came_before_a_joined_member() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let bob = server.register("bob", "pw").await;
    let room = create_room(http, &alice, json!({ "preset": "public_chat" })).await;
    let path = format!("/_matrix/client/v3/rooms/{room}/state/m.room.history_visibility");
    http.put(&path, Some(&alice), &json!({ "history_visibility": "joined" })).await;
    let root = say(http, &alice, &room, "old-root").await;
    let reply = |body: &str| json!({ "msgtype": "m.text", "body": body, "m.relates_to": { "rel_type": "m.thread", "event_id": root } });
    let path = format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/t1");
    let (status, body) = http.put(&path, Some(&alice), &reply("old-reply")).await;
    assert_eq!(status, 200, "{body}");
    // Members as they were before bob joined are history bob may not read either.
    let page = get_ok(http, &alice, &format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=1")).await;
    let before_bob = page["start"].as_str().unwrap().to_owned();
    post_ok(http, &bob, &format!("/_matrix/client/v3/join/{room}"), json!({})).await;

    let threads = get_ok(http, &bob, &format!("/_matrix/client/v1/rooms/{room}/threads")).await;
    assert_eq!(threads["chunk"], json!([]), "a thread bob may not read");
    let path = format!("/_matrix/client/v1/rooms/{room}/relations/{root}");
    assert_error(&http.get(&path, Some(&bob)).await, 404, "M_NOT_FOUND");
    // The first event bob may read from the root's time on is his own join, not the thread.
    let root_event = get_ok(http, &alice, &format!("/_matrix/client/v3/rooms/{room}/event/{root}")).await;
    let ts = root_event["origin_server_ts"].as_u64().unwrap();
    let path = format!("/_matrix/client/v1/rooms/{room}/timestamp_to_event?ts={}&dir=f", ts + 1);
    let found = get_ok(http, &bob, &path).await;
    let path = format!("/_matrix/client/v3/rooms/{room}/event/{}", found["event_id"].as_str().unwrap());
    let event = get_ok(http, &bob, &path).await;
    let bob_id = server.user_id("bob");
    assert_eq!((event["type"].as_str(), event["state_key"].as_str()), (Some("m.room.member"), Some(bob_id.as_str())));

    // A reply after bob joined: he sees it, but the root stays hidden, and the thread with it.
    let path = format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/t2");
    let (status, body) = http.put(&path, Some(&alice), &reply("new-reply")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(readable_bodies(http, &bob, &room).await, ["new-reply"]);
    let threads = get_ok(http, &bob, &format!("/_matrix/client/v1/rooms/{room}/threads")).await;
    assert_eq!(threads["chunk"], json!([]));
    let path = format!("/_matrix/client/v3/rooms/{room}/members?at={before_bob}");
    assert_error(&http.get(&path, Some(&bob)).await, 403, "M_FORBIDDEN");
}
