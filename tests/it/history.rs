//! A room's past as a client reads it: `/context`, `timestamp_to_event`, members at an earlier
//! token; and reports and room tags.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::support::{Http, TestServer, assert_error, bodies, create_room, register, say, test_config, urlencode};

async fn get_ok(http: &Http, token: &str, path: &str) -> Value {
    let (status, body) = http.get(path, Some(token)).await;
    assert_eq!(status, 200, "{path}: {body}");
    body
}

async fn join(http: &Http, token: &str, room: &str) {
    let (status, body) = http.post(&format!("/_matrix/client/v3/join/{room}"), Some(token), &json!({})).await;
    assert_eq!(status, 200, "{body}");
}

fn types(events: &Value) -> Vec<String> {
    events.as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap().to_owned()).collect()
}

fn names(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("m{i:02}")).collect()
}

/// The state events of one type in a `/context` state.
fn state_of<'a>(state: &'a Value, kind: &str) -> Vec<&'a Value> {
    state.as_array().unwrap().iter().filter(|e| e["type"] == kind).collect()
}

#[tokio::test]
async fn context_splits_the_limit_and_its_tokens_continue_with_messages() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let bob = server.register("bob", "pw").await;
    let carol = server.register("carol", "pw").await;
    let room = create_room(http, &alice, json!({ "name": "Old", "preset": "public_chat" })).await;
    let mut ids = Vec::new();
    for i in 0..30 {
        ids.push(say(http, &alice, &room, &format!("m{i:02}")).await);
    }
    let (status, _) = http
        .put(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.name"), Some(&alice), &json!({ "name": "New" }))
        .await;
    assert_eq!(status, 200);
    join(http, &bob, &room).await;

    // Around m10 with the default limit of 10: five before (newest first), five after.
    let context = get_ok(http, &alice, &format!("/_matrix/client/v3/rooms/{room}/context/{}", ids[10])).await;
    assert_eq!(context["event"]["event_id"], ids[10].as_str());
    assert_eq!(bodies(&context["events_before"]), names(5..10).into_iter().rev().collect::<Vec<_>>());
    assert_eq!(bodies(&context["events_after"]), names(11..16));
    // The state at the last event returned (m15): the old name, and bob not yet there.
    let state = &context["state"];
    assert_eq!(state_of(state, "m.room.name")[0]["content"]["name"], "Old");
    let members: Vec<&str> =
        state_of(state, "m.room.member").iter().map(|e| e["state_key"].as_str().unwrap()).collect();
    assert_eq!(members, [server.user_id("alice")]);

    // Backward from `start` and forward from `end`, /messages continues without gap or repeat.
    let start = context["start"].as_str().unwrap();
    let older =
        get_ok(http, &alice, &format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=100&from={start}")).await;
    assert_eq!(bodies(&older["chunk"]), names(0..5).into_iter().rev().collect::<Vec<_>>());
    assert_eq!(types(&older["chunk"]).last().map(String::as_str), Some("m.room.create"));
    let end = context["end"].as_str().unwrap();
    let newer =
        get_ok(http, &alice, &format!("/_matrix/client/v3/rooms/{room}/messages?dir=f&limit=100&from={end}")).await;
    assert_eq!(bodies(&newer["chunk"]), names(16..30));
    assert_eq!(types(&newer["chunk"])[14..], ["m.room.name", "m.room.member"]);

    // Odd limits give the extra event to `events_after`; 0 still returns the event itself.
    let path = format!("/_matrix/client/v3/rooms/{room}/context/{}?limit=3", ids[10]);
    let three = get_ok(http, &alice, &path).await;
    assert_eq!((bodies(&three["events_before"]), bodies(&three["events_after"])), (names(9..10), names(11..13)));
    let path = format!("/_matrix/client/v3/rooms/{room}/context/{}?limit=0", ids[10]);
    let zero = get_ok(http, &alice, &path).await;
    assert_eq!(zero["event"]["content"]["body"], "m10");
    assert!(
        zero["events_before"].as_array().unwrap().is_empty() && zero["events_after"].as_array().unwrap().is_empty()
    );
    let forward = get_ok(
        http,
        &alice,
        &format!("/_matrix/client/v3/rooms/{room}/messages?dir=f&limit=1&from={}", zero["end"].as_str().unwrap()),
    )
    .await;
    assert_eq!(bodies(&forward["chunk"]), ["m11"]);

    // A filter skips messages: after m29 come the rename and bob's join, and the state is then
    // the state after bob joined.
    let filter = urlencode(r#"{"not_types":["m.room.message"]}"#);
    let path = format!("/_matrix/client/v3/rooms/{room}/context/{}?filter={filter}", ids[29]);
    let filtered = get_ok(http, &alice, &path).await;
    assert_eq!(types(&filtered["events_after"]), ["m.room.name", "m.room.member"]);
    assert!(!types(&filtered["events_before"]).contains(&"m.room.message".to_owned()));
    assert_eq!(state_of(&filtered["state"], "m.room.name")[0]["content"]["name"], "New");
    assert_eq!(state_of(&filtered["state"], "m.room.member").len(), 2);

    // Members only; unknown events and events of other rooms are not found.
    let path = format!("/_matrix/client/v3/rooms/{room}/context/{}", ids[10]);
    assert_error(&http.get(&path, Some(&carol)).await, 403, "M_FORBIDDEN");
    let unknown = format!("/_matrix/client/v3/rooms/{room}/context/$nothing:hs1.localhost");
    assert_error(&http.get(&unknown, Some(&alice)).await, 404, "M_NOT_FOUND");
    let other = create_room(http, &alice, json!({})).await;
    let elsewhere = say(http, &alice, &other, "elsewhere").await;
    let path = format!("/_matrix/client/v3/rooms/{room}/context/{elsewhere}");
    assert_error(&http.get(&path, Some(&alice)).await, 404, "M_NOT_FOUND");
    let path = format!("/_matrix/client/v3/rooms/{room}/context/{}?filter=nope", ids[10]);
    assert_error(&http.get(&path, Some(&alice)).await, 400, "M_BAD_JSON");
    server.stop().await;
}

#[tokio::test]
async fn timestamp_to_event_finds_the_nearest_event_in_either_direction() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let carol = server.register("carol", "pw").await;
    let room = create_room(http, &alice, json!({})).await;
    let mut sent = Vec::new();
    for body in ["first", "second", "third"] {
        // Distinct milliseconds, so "nearest" has one answer.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let id = say(http, &alice, &room, body).await;
        let event = get_ok(http, &alice, &format!("/_matrix/client/v3/rooms/{room}/event/{id}")).await;
        sent.push((id, event["origin_server_ts"].as_u64().unwrap()));
    }
    let find = |ts: u64, dir: &str| {
        let path = format!("/_matrix/client/v1/rooms/{room}/timestamp_to_event?ts={ts}&dir={dir}");
        let (http, alice) = (http.clone(), alice.clone());
        async move { http.get(&path, Some(&alice)).await }
    };
    let found = |response: (reqwest::StatusCode, Value)| {
        assert_eq!(response.0, 200, "{}", response.1);
        (response.1["event_id"].as_str().unwrap().to_owned(), response.1["origin_server_ts"].as_u64().unwrap())
    };
    let (second, second_ts) = sent[1].clone();
    assert_eq!(found(find(second_ts, "f").await), (second.clone(), second_ts));
    assert_eq!(found(find(second_ts, "b").await), (second.clone(), second_ts));
    assert_eq!(found(find(second_ts + 1, "b").await), (second, second_ts));
    assert_eq!(found(find(second_ts + 1, "f").await), sent[2]);
    assert_eq!(found(find(sent[2].1 + 60_000, "b").await), sent[2]);

    // Before the first event and after the last, in the direction away from the room: nothing.
    assert_error(&find(sent[2].1 + 60_000, "f").await, 404, "M_NOT_FOUND");
    assert_error(&find(0, "b").await, 404, "M_NOT_FOUND");
    // From the beginning of time forward: the room's create event.
    let (first_id, _) = found(find(0, "f").await);
    let create = get_ok(http, &alice, &format!("/_matrix/client/v3/rooms/{room}/event/{first_id}")).await;
    assert_eq!(create["type"], "m.room.create");

    assert_error(&find(0, "x").await, 400, "M_INVALID_PARAM");
    let path = format!("/_matrix/client/v1/rooms/{room}/timestamp_to_event?dir=f");
    assert_error(&http.get(&path, Some(&alice)).await, 400, "M_INVALID_PARAM");
    let path = format!("/_matrix/client/v1/rooms/{room}/timestamp_to_event?ts=0&dir=f");
    assert_error(&http.get(&path, Some(&carol)).await, 403, "M_FORBIDDEN");
    server.stop().await;
}

#[tokio::test]
async fn members_at_an_old_token_show_the_membership_of_that_time() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let bob = server.register("bob", "pw").await;
    let room = create_room(http, &alice, json!({ "preset": "public_chat" })).await;
    let before_bob = get_ok(http, &alice, "/_matrix/client/v3/sync").await["next_batch"].as_str().unwrap().to_owned();
    join(http, &bob, &room).await;
    let with_bob = get_ok(http, &alice, "/_matrix/client/v3/sync").await["next_batch"].as_str().unwrap().to_owned();
    let (status, _) = http.post(&format!("/_matrix/client/v3/rooms/{room}/leave"), Some(&bob), &json!({})).await;
    assert_eq!(status, 200);

    let members = |query: String| {
        let path = format!("/_matrix/client/v3/rooms/{room}/members?{query}");
        let (http, alice) = (http.clone(), alice.clone());
        async move {
            let chunk = get_ok(&http, &alice, &path).await["chunk"].clone();
            chunk
                .as_array()
                .unwrap()
                .iter()
                .map(|e| {
                    format!("{} {}", e["state_key"].as_str().unwrap(), e["content"]["membership"].as_str().unwrap())
                })
                .collect::<Vec<_>>()
        }
    };
    let (a, b) = (server.user_id("alice"), server.user_id("bob"));
    assert_eq!(members(format!("at={before_bob}")).await, [format!("{a} join")]);
    assert_eq!(members(format!("at={with_bob}")).await, [format!("{a} join"), format!("{b} join")]);
    assert_eq!(members(String::new()).await, [format!("{a} join"), format!("{b} leave")]);
    assert_eq!(members(format!("at={with_bob}&not_membership=join")).await, Vec::<String>::new());
    assert_eq!(members(format!("at={with_bob}&membership=join")).await.len(), 2);
    assert_eq!(members("at=s0".into()).await, Vec::<String>::new());
    let path = format!("/_matrix/client/v3/rooms/{room}/members?at=yesterday");
    assert_error(&http.get(&path, Some(&alice)).await, 400, "M_INVALID_PARAM");
    server.stop().await;
}

#[tokio::test]
async fn reports_are_checked_and_kept_for_the_operator() {
    let dir = tempfile::tempdir().unwrap();
    let config = test_config(dir.path(), "hs1.localhost");
    let running = lattice::start(config.clone()).await.unwrap();
    let http = Http::new(format!("http://{}", running.address));
    let token = running.first_registration_token.clone().unwrap();
    let alice = register(&http, "alice", "pw", &token).await["access_token"].as_str().unwrap().to_owned();
    let carol = register(&http, "carol", "pw", &token).await["access_token"].as_str().unwrap().to_owned();
    let room = create_room(&http, &alice, json!({})).await;
    let event = say(&http, &alice, &room, "offensive").await;

    let report = format!("/_matrix/client/v3/rooms/{room}/report/{event}");
    let (status, body) = http.post(&report, Some(&alice), &json!({ "reason": "spam", "score": -50 })).await;
    assert_eq!(status, 200, "{body}");
    assert_error(&http.post(&report, Some(&alice), &json!({ "score": 5 })).await, 400, "M_INVALID_PARAM");
    assert_error(&http.post(&report, Some(&alice), &json!({ "score": -101 })).await, 400, "M_INVALID_PARAM");
    let long = "x".repeat(5_000);
    assert_error(&http.post(&report, Some(&alice), &json!({ "reason": long })).await, 400, "M_INVALID_PARAM");
    // Not joined, or no such event: the same 404.
    assert_error(&http.post(&report, Some(&carol), &json!({ "reason": "?" })).await, 404, "M_NOT_FOUND");
    let unknown = format!("/_matrix/client/v3/rooms/{room}/report/$nothing:hs1.localhost");
    assert_error(&http.post(&unknown, Some(&alice), &json!({})).await, 404, "M_NOT_FOUND");

    // Rooms can be reported by anyone; users that exist too.
    let (status, _) = http
        .post(&format!("/_matrix/client/v3/rooms/{room}/report"), Some(&carol), &json!({ "reason": "bad room" }))
        .await;
    assert_eq!(status, 200);
    let missing_room = "/_matrix/client/v3/rooms/!nowhere:hs1.localhost/report";
    assert_error(&http.post(missing_room, Some(&carol), &json!({})).await, 404, "M_NOT_FOUND");
    let (status, _) = http
        .post("/_matrix/client/v3/users/@alice:hs1.localhost/report", Some(&carol), &json!({ "reason": "rude" }))
        .await;
    assert_eq!(status, 200);
    let nobody = "/_matrix/client/v3/users/@nobody:hs1.localhost/report";
    assert_error(&http.post(nobody, Some(&carol), &json!({})).await, 404, "M_NOT_FOUND");
    drop(http);
    running.stop().await.unwrap();

    // What `lattice report list` reads, with the server stopped: newest first.
    // `stop` returned, so the database is closed and opens at once.
    let opened = lattice::open(&config).await.expect("the stopped server released its database");
    let reports = opened.service.reports().list(10).await.unwrap();
    let summary: Vec<String> = reports
        .iter()
        .map(|r| format!("{} {} {:?} {:?} {:?}", r.id, r.reporter, r.event_id, r.user_id, r.score))
        .collect();
    assert_eq!(
        summary,
        [
            "3 @carol:hs1.localhost None Some(\"@alice:hs1.localhost\") None".to_owned(),
            "2 @carol:hs1.localhost None None None".to_owned(),
            format!("1 @alice:hs1.localhost Some({event:?}) None Some(-50)"),
        ]
    );
    assert_eq!(reports[1].room_id.as_deref(), Some(room.as_str()));
    assert_eq!(reports[2].reason.as_deref(), Some("spam"));
    assert_eq!(opened.service.reports().list(1).await.unwrap().len(), 1);
}

#[tokio::test]
async fn room_tags_are_room_account_data_delivered_by_sync() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let bob = server.register("bob", "pw").await;
    let room = create_room(http, &alice, json!({})).await;
    let tags = format!("/_matrix/client/v3/user/{}/rooms/{room}/tags", server.user_id("alice"));

    assert_eq!(get_ok(http, &alice, &tags).await, json!({ "tags": {} }));
    let since = get_ok(http, &alice, "/_matrix/client/v3/sync").await["next_batch"].as_str().unwrap().to_owned();
    assert_eq!(http.put(&format!("{tags}/u.work"), Some(&alice), &json!({ "order": 0.5 })).await.0, 200);
    assert_eq!(http.put(&format!("{tags}/m.favourite"), Some(&alice), &json!({})).await.0, 200);
    let expected = json!({ "tags": { "u.work": { "order": 0.5 }, "m.favourite": {} } });
    assert_eq!(get_ok(http, &alice, &tags).await, expected);

    let synced = get_ok(http, &alice, &format!("/_matrix/client/v3/sync?since={since}")).await;
    let data = &synced["rooms"]["join"][&room]["account_data"]["events"];
    assert_eq!(data, &json!([{ "type": "m.tag", "content": expected }]), "{synced}");

    let since = synced["next_batch"].as_str().unwrap().to_owned();
    let (status, _) = http.request(Method::DELETE, &format!("{tags}/u.work"), Some(&alice), None).await;
    assert_eq!(status, 200);
    // Deleting a tag the room does not have is fine and changes nothing.
    let (status, _) = http.request(Method::DELETE, &format!("{tags}/u.gone"), Some(&alice), None).await;
    assert_eq!(status, 200);
    let remaining = json!({ "tags": { "m.favourite": {} } });
    assert_eq!(get_ok(http, &alice, &tags).await, remaining);
    let synced = get_ok(http, &alice, &format!("/_matrix/client/v3/sync?since={since}")).await;
    let data = &synced["rooms"]["join"][&room]["account_data"]["events"];
    assert_eq!(data, &json!([{ "type": "m.tag", "content": remaining }]), "{synced}");

    // Only the user themself; orders in [0, 1]; names up to 255 bytes; rooms they are in.
    assert_error(&http.get(&tags, Some(&bob)).await, 403, "M_FORBIDDEN");
    assert_error(&http.put(&format!("{tags}/u.x"), Some(&bob), &json!({})).await, 403, "M_FORBIDDEN");
    assert_error(&http.put(&format!("{tags}/u.x"), Some(&alice), &json!({ "order": 2 })).await, 400, "M_INVALID_PARAM");
    let long = format!("{tags}/{}", "t".repeat(256));
    assert_error(&http.put(&long, Some(&alice), &json!({})).await, 400, "M_INVALID_PARAM");
    let elsewhere =
        format!("/_matrix/client/v3/user/{}/rooms/!nowhere:hs1.localhost/tags/u.x", server.user_id("alice"));
    assert_error(&http.put(&elsewhere, Some(&alice), &json!({})).await, 403, "M_FORBIDDEN");
    server.stop().await;
}
