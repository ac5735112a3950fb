//! Edits, reactions, replies in threads and references: `/relations`, `/threads` and the
//! aggregations bundled into events.

use serde_json::{Value, json};

use crate::support::{Http, TestServer, assert_error, create_room};

async fn send(http: &Http, token: &str, room: &str, kind: &str, txn: &str, content: Value) -> String {
    let path = format!("/_matrix/client/v3/rooms/{room}/send/{kind}/{txn}");
    let (status, response) = http.put(&path, Some(token), &content).await;
    assert_eq!(status, 200, "{response}");
    response["event_id"].as_str().unwrap().to_owned()
}

async fn get(http: &Http, token: &str, path: &str) -> Value {
    let (status, body) = http.get(path, Some(token)).await;
    assert_eq!(status, 200, "{path}: {body}");
    body
}

fn ids(chunk: &Value) -> Vec<String> {
    chunk.as_array().unwrap().iter().map(|e| e["event_id"].as_str().unwrap().to_owned()).collect()
}

/// Alice's public room with Bob in it.
async fn room_with_bob(server: &TestServer) -> (String, String, String) {
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let bob = server.register("bob", "pw").await;
    let room = create_room(http, &alice, json!({ "preset": "public_chat" })).await;
    let (status, body) = http.post(&format!("/_matrix/client/v3/join/{room}"), Some(&bob), &json!({})).await;
    assert_eq!(status, 200, "{body}");
    (alice, bob, room)
}

#[tokio::test]
async fn edits_are_bundled_and_reactions_are_listed() {
    let server = TestServer::start().await;
    let http = &server.http;
    let (alice, bob, room) = room_with_bob(&server).await;
    let original =
        send(http, &alice, &room, "m.room.message", "o", json!({ "msgtype": "m.text", "body": "helo" })).await;
    let edit = |body: &str| {
        json!({ "msgtype": "m.text", "body": format!("* {body}"), "m.new_content": { "msgtype": "m.text", "body": body },
                "m.relates_to": { "rel_type": "m.replace", "event_id": original } })
    };
    send(http, &alice, &room, "m.room.message", "e1", edit("hell")).await;
    let latest = send(http, &alice, &room, "m.room.message", "e2", edit("hello")).await;
    // Bob's "edit" of Alice's message is not a valid replacement.
    send(http, &bob, &room, "m.room.message", "e3", edit("hijacked")).await;
    let reactions: Vec<String> = send_reactions(http, &bob, &alice, &room, &original).await;

    let event = get(http, &bob, &format!("/_matrix/client/v3/rooms/{room}/event/{original}")).await;
    assert_eq!(event["unsigned"]["m.relations"]["m.replace"]["event_id"], latest, "{event}");
    assert_eq!(event["unsigned"]["m.relations"]["m.replace"]["content"]["m.new_content"]["body"], "hello");

    let base = format!("/_matrix/client/v1/rooms/{room}/relations/{original}");
    let annotations = get(http, &bob, &format!("{base}/m.annotation/m.reaction")).await;
    assert_eq!(ids(&annotations["chunk"]), reactions.iter().rev().cloned().collect::<Vec<_>>());
    let all = get(http, &bob, &base).await;
    assert_eq!(all["chunk"].as_array().unwrap().len(), 5, "3 edits and 2 reactions: {all}");
    // Paginated one at a time, forwards, the same relations come in send order.
    let mut from: Option<String> = None;
    let mut forward = Vec::new();
    for _ in 0..10 {
        let mut path = format!("{base}?dir=f&limit=1");
        if let Some(from) = &from {
            path.push_str(&format!("&from={from}"));
        }
        let page = get(http, &bob, &path).await;
        forward.extend(ids(&page["chunk"]));
        match page["next_batch"].as_str() {
            Some(next) => from = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(forward.len(), 5);
    assert_eq!(forward.iter().rev().cloned().collect::<Vec<_>>(), ids(&all["chunk"]));

    // A redacted reaction no longer counts.
    let (status, _) =
        http.put(&format!("/_matrix/client/v3/rooms/{room}/redact/{}/r1", reactions[0]), Some(&bob), &json!({})).await;
    assert_eq!(status, 200);
    let annotations = get(http, &bob, &format!("{base}/m.annotation")).await;
    assert_eq!(ids(&annotations["chunk"]), vec![reactions[1].clone()]);

    let outsider = server.register("carol", "pw").await;
    assert_error(&http.get(&base, Some(&outsider)).await, 403, "M_FORBIDDEN");
    let unknown = format!("/_matrix/client/v1/rooms/{room}/relations/$nope");
    assert_error(&http.get(&unknown, Some(&bob)).await, 404, "M_NOT_FOUND");
    server.stop().await;
}

async fn send_reactions(http: &Http, bob: &str, alice: &str, room: &str, target: &str) -> Vec<String> {
    let mut reactions = Vec::new();
    for (token, key, txn) in [(bob, "👍", "k1"), (alice, "🎉", "k2")] {
        let content = json!({ "m.relates_to": { "rel_type": "m.annotation", "event_id": target, "key": key } });
        reactions.push(send(http, token, room, "m.reaction", txn, content).await);
    }
    reactions
}

#[tokio::test]
async fn threads_are_summarised_listed_and_followed() {
    let server = TestServer::start().await;
    let http = &server.http;
    let (alice, bob, room) = room_with_bob(&server).await;
    let root_a = send(http, &alice, &room, "m.room.message", "a", json!({ "msgtype": "m.text", "body": "A" })).await;
    let root_b = send(http, &alice, &room, "m.room.message", "b", json!({ "msgtype": "m.text", "body": "B" })).await;
    let reply = |root: &str, body: &str| json!({ "msgtype": "m.text", "body": body, "m.relates_to": { "rel_type": "m.thread", "event_id": root, "is_falling_back": true, "m.in_reply_to": { "event_id": root } } });
    send(http, &bob, &room, "m.room.message", "r1", reply(&root_a, "a1")).await;
    send(http, &alice, &room, "m.room.message", "r2", reply(&root_b, "b1")).await;
    let last = send(http, &bob, &room, "m.room.message", "r3", reply(&root_a, "a2")).await;

    let event = get(http, &alice, &format!("/_matrix/client/v3/rooms/{room}/event/{root_a}")).await;
    let thread = &event["unsigned"]["m.relations"]["m.thread"];
    assert_eq!(thread["count"], 2, "{event}");
    assert_eq!(thread["latest_event"]["event_id"], last);
    assert_eq!(thread["current_user_participated"], true, "alice wrote the root");

    // Most recently active first: A (replied to last), then B.
    let list = get(http, &alice, &format!("/_matrix/client/v1/rooms/{room}/threads")).await;
    assert_eq!(ids(&list["chunk"]), vec![root_a.clone(), root_b.clone()]);
    let first = get(http, &alice, &format!("/_matrix/client/v1/rooms/{room}/threads?limit=1")).await;
    assert_eq!(ids(&first["chunk"]), vec![root_a.clone()]);
    let next = first["next_batch"].as_str().unwrap();
    let second = get(http, &alice, &format!("/_matrix/client/v1/rooms/{room}/threads?limit=1&from={next}")).await;
    assert_eq!(ids(&second["chunk"]), vec![root_b.clone()]);
    // Bob only wrote in thread A.
    let bobs = get(http, &bob, &format!("/_matrix/client/v1/rooms/{room}/threads?include=participated")).await;
    assert_eq!(ids(&bobs["chunk"]), vec![root_a.clone()]);

    // The thread's replies through /relations, and a timeline with the bundled summary in /sync.
    let replies = get(http, &bob, &format!("/_matrix/client/v1/rooms/{room}/relations/{root_a}/m.thread")).await;
    assert_eq!(replies["chunk"].as_array().unwrap().len(), 2);
    let (_, synced) = http.get("/_matrix/client/v3/sync", Some(&bob)).await;
    let timeline = synced["rooms"]["join"][&room]["timeline"]["events"].as_array().unwrap().clone();
    let root_in_sync = timeline.iter().find(|e| e["event_id"] == root_a.as_str()).expect("root in the timeline");
    assert_eq!(root_in_sync["unsigned"]["m.relations"]["m.thread"]["count"], 2);
    server.stop().await;
}

#[tokio::test]
async fn references_are_bundled() {
    let server = TestServer::start().await;
    let http = &server.http;
    let (alice, bob, room) = room_with_bob(&server).await;
    let poll = send(http, &alice, &room, "m.room.message", "p", json!({ "msgtype": "m.text", "body": "poll" })).await;
    let answer = send(
        http,
        &bob,
        &room,
        "m.room.message",
        "ans",
        json!({ "msgtype": "m.text", "body": "yes", "m.relates_to": { "rel_type": "m.reference", "event_id": poll } }),
    )
    .await;
    let event = get(http, &alice, &format!("/_matrix/client/v3/rooms/{room}/event/{poll}")).await;
    assert_eq!(event["unsigned"]["m.relations"]["m.reference"]["chunk"], json!([{ "event_id": answer }]));
    server.stop().await;
}
