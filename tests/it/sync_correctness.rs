//! `/sync` correctness (issue #9): what wakes a long-poll, rooms new to a user, typing races,
//! transaction retries, redacted events and the routes clients use for state and read markers.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{TestServer, assert_error, create_room, say, sync, urlencode};

fn next_batch(body: &Value) -> String {
    body["next_batch"].as_str().unwrap().to_owned()
}

fn types(events: &Value) -> Vec<String> {
    events
        .as_array()
        .map_or(Vec::new(), |events| events.iter().filter_map(|e| e["type"].as_str().map(str::to_owned)).collect())
}

#[tokio::test]
async fn a_long_poll_sleeps_while_others_chat_in_rooms_it_is_not_in() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let carol = server.register("carol", "pw").await;
    let bob = server.register("bob", "pw").await;
    let chat = create_room(http, &alice, json!({ "preset": "public_chat" })).await;
    assert_eq!(http.post(&format!("/_matrix/client/v3/join/{chat}"), Some(&carol), &json!({})).await.0, 200);
    let own = create_room(http, &bob, json!({ "name": "bob's own" })).await;
    let since = next_batch(&sync(http, &bob, "").await);

    let timeout = Duration::from_millis(1_500);
    let waiting = {
        let (http, bob, since) = (http.clone(), bob.clone(), since.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let body = sync(&http, &bob, &format!("since={since}&timeout={}", timeout.as_millis())).await;
            (body, started.elapsed())
        })
    };
    server.until_sync_waiters(1).await;
    let wakeups = server.sync_wakeups();
    for i in 0..5 {
        say(http, &alice, &chat, &format!("elsewhere-{i}")).await;
    }
    let typing = format!("/_matrix/client/v3/rooms/{chat}/typing/{}", server.user_id("carol"));
    assert_eq!(http.put(&typing, Some(&carol), &json!({ "typing": true, "timeout": 10_000 })).await.0, 200);
    let data = format!("/_matrix/client/v3/user/{}/account_data/org.example.mine", server.user_id("alice"));
    assert_eq!(http.put(&data, Some(&alice), &json!({ "a": 1 })).await.0, 200);
    assert_eq!(server.sync_wakeups(), wakeups, "nothing that concerns bob was written");
    assert_eq!(server.sync_waiters(), 1, "bob's long-poll is still asleep");

    let (body, waited) = waiting.await.unwrap();
    assert_eq!(body["rooms"]["join"], json!({}), "{body}");
    assert!(waited >= timeout, "an empty answer comes only at the timeout, after {waited:?}");

    // What concerns bob does wake him: a message in his own room.
    let since = next_batch(&body);
    let waiting = {
        let (http, bob) = (http.clone(), bob.clone());
        tokio::spawn(async move { sync(&http, &bob, &format!("since={since}&timeout=30000")).await })
    };
    server.until_sync_waiters(1).await;
    let wakeups = server.sync_wakeups();
    say(http, &bob, &own, "mine").await;
    assert!(server.sync_wakeups() > wakeups);
    let body = waiting.await.unwrap();
    assert_eq!(types(&body["rooms"]["join"][&own]["timeline"]["events"]), ["m.room.message"]);
    server.stop().await;
}

#[tokio::test]
async fn a_long_poll_wakes_for_an_invite_to_a_room_it_did_not_know() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let bob = server.register("bob", "pw").await;
    let room = create_room(http, &alice, json!({ "name": "Secret" })).await;
    let since = next_batch(&sync(http, &bob, "").await);
    let waiting = {
        let (http, bob) = (http.clone(), bob.clone());
        tokio::spawn(async move { sync(&http, &bob, &format!("since={since}&timeout=30000")).await })
    };
    server.until_sync_waiters(1).await;
    let wakeups = server.sync_wakeups();
    let invite = json!({ "user_id": server.user_id("bob") });
    assert_eq!(http.post(&format!("/_matrix/client/v3/rooms/{room}/invite"), Some(&alice), &invite).await.0, 200);
    assert!(server.sync_wakeups() > wakeups, "bob's own membership wakes him");
    let body = waiting.await.unwrap();
    assert!(body["rooms"]["invite"][&room].is_object(), "{body}");
    server.stop().await;
}

#[tokio::test]
async fn a_room_joined_by_alias_without_an_invite_comes_with_its_state() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let bob = server.register("bob", "pw").await;
    let room = create_room(
        http,
        &alice,
        json!({ "preset": "public_chat", "name": "Town square", "room_alias_name": "square" }),
    )
    .await;
    say(http, &alice, &room, "before bob").await;
    // A timeline of one event: the state cannot arrive in the timeline by accident.
    let filter = urlencode(r#"{"room":{"timeline":{"limit":1}}}"#);
    let bob_since = next_batch(&sync(http, &bob, &format!("filter={filter}")).await);
    let alice_since = next_batch(&sync(http, &alice, &format!("filter={filter}")).await);

    let alias = urlencode(&format!("#square:{}", server.server_name));
    let (status, joined) = http.post(&format!("/_matrix/client/v3/join/{alias}"), Some(&bob), &json!({})).await;
    assert_eq!(status, 200, "{joined}");

    // Alice, joined all along, gets bob's join and no state she already has.
    let for_alice = sync(http, &alice, &format!("since={alice_since}&filter={filter}")).await;
    let alice_room = &for_alice["rooms"]["join"][&room];
    assert_eq!(types(&alice_room["timeline"]["events"]), ["m.room.member"]);
    assert!(!types(&alice_room["state"]["events"]).contains(&"m.room.create".to_owned()), "{alice_room}");

    let for_bob = sync(http, &bob, &format!("since={bob_since}&filter={filter}")).await;
    let bob_room = &for_bob["rooms"]["join"][&room];
    let mut seen = types(&bob_room["state"]["events"]);
    seen.extend(types(&bob_room["timeline"]["events"]));
    for wanted in ["m.room.create", "m.room.name", "m.room.power_levels", "m.room.join_rules", "m.room.member"] {
        assert!(seen.contains(&wanted.to_owned()), "{wanted} missing from {bob_room}");
    }
    let name = bob_room["state"]["events"].as_array().unwrap().iter().find(|e| e["type"] == "m.room.name").unwrap();
    assert_eq!(name["content"]["name"], "Town square");
    assert_eq!(bob_room["summary"]["m.joined_member_count"], 2, "{bob_room}");
    server.stop().await;
}

#[tokio::test]
async fn a_room_left_since_the_last_sync_comes_with_its_state_at_the_leave() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let bob = server.register("bob", "pw").await;
    let room = create_room(http, &alice, json!({ "preset": "public_chat", "name": "Passing through" })).await;
    assert_eq!(http.post(&format!("/_matrix/client/v3/join/{room}"), Some(&bob), &json!({})).await.0, 200);
    let since = next_batch(&sync(http, &bob, "").await);
    assert_eq!(http.post(&format!("/_matrix/client/v3/rooms/{room}/leave"), Some(&bob), &json!({})).await.0, 200);
    let body = sync(http, &bob, &format!("since={since}")).await;
    let left = &body["rooms"]["leave"][&room];
    assert_eq!(types(&left["timeline"]["events"]), ["m.room.member"], "{left}");
    let state = types(&left["state"]["events"]);
    assert!(state.contains(&"m.room.create".to_owned()) && state.contains(&"m.room.name".to_owned()), "{left}");
    server.stop().await;
}

#[tokio::test]
async fn no_typing_change_is_lost_to_a_concurrent_sync() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let bob = server.register("bob", "pw").await;
    let room = create_room(http, &alice, json!({ "preset": "public_chat" })).await;
    assert_eq!(http.post(&format!("/_matrix/client/v3/join/{room}"), Some(&bob), &json!({})).await.0, 200);
    let since = next_batch(&sync(http, &bob, "").await);
    let typing = format!("/_matrix/client/v3/rooms/{room}/typing/{}", server.user_id("alice"));
    let toggles = 60;
    let writer = {
        let (http, alice, typing) = (http.clone(), alice.clone(), typing.clone());
        tokio::spawn(async move {
            for i in 0..toggles {
                let body = json!({ "typing": i % 2 == 1, "timeout": 60_000 });
                assert_eq!(http.put(&typing, Some(&alice), &body).await.0, 200);
            }
        })
    };
    // Bob syncs as fast as he can while alice toggles; his last view must be her last state.
    let mut since = since;
    let mut view: Option<Value> = None;
    let follow = |body: &Value, view: &mut Option<Value>| {
        let ephemeral = &body["rooms"]["join"][&room]["ephemeral"]["events"];
        for event in ephemeral.as_array().into_iter().flatten().filter(|e| e["type"] == "m.typing") {
            *view = Some(event["content"]["user_ids"].clone());
        }
        next_batch(body)
    };
    while !writer.is_finished() {
        let body = sync(http, &bob, &format!("since={since}&timeout=0")).await;
        since = follow(&body, &mut view);
    }
    writer.await.unwrap();
    let body = sync(http, &bob, &format!("since={since}&timeout=0")).await;
    follow(&body, &mut view);
    assert_eq!(view, Some(json!([server.user_id("alice")])), "the last toggle (typing) reached bob");
    server.stop().await;
}

#[tokio::test]
async fn concurrent_retries_of_one_transaction_get_one_event() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let room = create_room(http, &alice, json!({})).await;
    let path = format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/retried-txn");
    let body = json!({ "msgtype": "m.text", "body": "once" });
    let mut sends = Vec::new();
    for _ in 0..8 {
        let (http, alice, path, body) = (http.clone(), alice.clone(), path.clone(), body.clone());
        sends.push(tokio::spawn(async move { http.put(&path, Some(&alice), &body).await }));
    }
    let mut ids = Vec::new();
    for send in sends {
        let (status, response) = send.await.unwrap();
        assert_eq!(status, StatusCode::OK, "{response}");
        ids.push(response["event_id"].as_str().unwrap().to_owned());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "every retry answers with the first event: {ids:?}");
    let (_, page) = http.get(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=50"), Some(&alice)).await;
    let messages = page["chunk"].as_array().unwrap().iter().filter(|e| e["type"] == "m.room.message").count();
    assert_eq!(messages, 1);
    // The same transaction ID with another body is refused.
    let other = http.put(&path, Some(&alice), &json!({ "msgtype": "m.text", "body": "twice" })).await;
    assert_error(&other, 400, "M_INVALID_PARAM");
    server.stop().await;
}

#[tokio::test]
async fn state_paths_with_a_trailing_slash_use_the_empty_state_key() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let mallory = server.register("mallory", "pw").await;
    let room = create_room(http, &alice, json!({ "name": "Old name" })).await;
    let slash = format!("/_matrix/client/v3/rooms/{room}/state/m.room.name/");
    assert_error(&http.get(&slash, Some(&mallory)).await, 403, "M_FORBIDDEN");
    assert_error(&http.put(&slash, Some(&mallory), &json!({ "name": "Mine" })).await, 403, "M_FORBIDDEN");

    let (status, put) = http.put(&slash, Some(&alice), &json!({ "name": "New name" })).await;
    assert_eq!(status, 200, "{put}");
    assert!(put["event_id"].is_string());
    let (status, got) = http.get(&slash, Some(&alice)).await;
    assert_eq!((status, got), (StatusCode::OK, json!({ "name": "New name" })));
    let (_, without) = http.get(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.name"), Some(&alice)).await;
    assert_eq!(without, json!({ "name": "New name" }));
    server.stop().await;
}

#[tokio::test]
async fn the_fully_read_marker_can_be_set_through_the_receipt_route() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let mallory = server.register("mallory", "pw").await;
    let room = create_room(http, &alice, json!({})).await;
    let event = say(http, &alice, &room, "read me").await;
    let receipt = format!("/_matrix/client/v3/rooms/{room}/receipt/m.fully_read/{event}");
    assert_error(&http.post(&receipt, Some(&mallory), &json!({})).await, 403, "M_FORBIDDEN");
    assert_error(&http.post(&receipt, Some(&alice), &json!({ "thread_id": "main" })).await, 400, "M_INVALID_PARAM");
    let unknown = format!("/_matrix/client/v3/rooms/{room}/receipt/m.unknown/{event}");
    assert_error(&http.post(&unknown, Some(&alice), &json!({})).await, 400, "M_INVALID_PARAM");

    let since = next_batch(&sync(http, &alice, "").await);
    let (status, body) = http.post(&receipt, Some(&alice), &json!({})).await;
    assert_eq!(status, 200, "{body}");
    let marker = format!("/_matrix/client/v3/user/{}/rooms/{room}/account_data/m.fully_read", server.user_id("alice"));
    assert_eq!(http.get(&marker, Some(&alice)).await.1, json!({ "event_id": event }));
    let body = sync(http, &alice, &format!("since={since}")).await;
    let joined = &body["rooms"]["join"][&room];
    assert_eq!(types(&joined["account_data"]["events"]), ["m.fully_read"], "{joined}");
    assert!(!types(&joined["ephemeral"]["events"]).contains(&"m.receipt".to_owned()), "not a receipt: {joined}");
    server.stop().await;
}

#[tokio::test]
async fn redacted_events_say_which_redaction_removed_them() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let room = create_room(http, &alice, json!({})).await;
    let kept = say(http, &alice, &room, "kept").await;
    let gone = say(http, &alice, &room, "gone").await;
    let since = next_batch(&sync(http, &alice, "").await);
    let (status, redaction) = http
        .put(&format!("/_matrix/client/v3/rooms/{room}/redact/{gone}/r1"), Some(&alice), &json!({ "reason": "typo" }))
        .await;
    assert_eq!(status, 200, "{redaction}");
    let redaction_id = redaction["event_id"].as_str().unwrap();

    let (_, untouched) = http.get(&format!("/_matrix/client/v3/rooms/{room}/event/{kept}"), Some(&alice)).await;
    assert!(untouched["unsigned"].get("redacted_because").is_none(), "{untouched}");

    let (_, event) = http.get(&format!("/_matrix/client/v3/rooms/{room}/event/{gone}"), Some(&alice)).await;
    let because = &event["unsigned"]["redacted_because"];
    assert_eq!(because["event_id"], redaction_id, "{event}");
    assert_eq!(because["type"], "m.room.redaction");
    assert_eq!(because["content"]["reason"], "typo");
    assert_eq!(event["content"], json!({}));

    let (_, page) = http.get(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=10"), Some(&alice)).await;
    let listed = page["chunk"].as_array().unwrap().iter().find(|e| e["event_id"] == gone.as_str()).unwrap();
    assert_eq!(listed["unsigned"]["redacted_because"]["event_id"], redaction_id);

    let initial = sync(http, &alice, "").await;
    let timeline = &initial["rooms"]["join"][&room]["timeline"]["events"];
    let synced = timeline.as_array().unwrap().iter().find(|e| e["event_id"] == gone.as_str()).unwrap();
    assert_eq!(synced["unsigned"]["redacted_because"]["event_id"], redaction_id);
    let incremental = sync(http, &alice, &format!("since={since}")).await;
    assert_eq!(types(&incremental["rooms"]["join"][&room]["timeline"]["events"]), ["m.room.redaction"]);
    server.stop().await;
}

#[tokio::test]
async fn tokens_carry_a_position_per_stream_and_single_stream_tokens_still_work() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let room = create_room(http, &alice, json!({})).await;
    let first = sync(http, &alice, "timeout=0").await;
    let token = first["next_batch"].as_str().unwrap().to_owned();
    let parts: Vec<u64> = token.strip_prefix('m').unwrap().split('_').map(|p| p.parse().unwrap()).collect();
    assert_eq!(parts.len(), 7, "events, receipts, typing, account data, to-device, device lists, presence: {token}");
    // A six-part token, from before the presence stream, is still read.
    let six: Vec<String> = parts[..6].iter().map(u64::to_string).collect();
    sync(http, &alice, &format!("timeout=0&since=m{}", six.join("_"))).await;

    // A receipt moves only its own stream; the events part stays where it was.
    let event = say(http, &alice, &room, "hello").await;
    let since_message = sync(http, &alice, &format!("timeout=0&since={token}")).await;
    let after_message = since_message["next_batch"].as_str().unwrap().to_owned();
    let receipt = format!("/_matrix/client/v3/rooms/{room}/receipt/m.read/{event}");
    assert_eq!(http.post(&receipt, Some(&alice), &json!({})).await.0, 200);
    let since_receipt = sync(http, &alice, &format!("timeout=0&since={after_message}")).await;
    let after_receipt = since_receipt["next_batch"].as_str().unwrap();
    let events_part = |token: &str| token.strip_prefix('m').unwrap().split('_').next().unwrap().to_owned();
    assert_eq!(events_part(after_receipt), events_part(&after_message), "{after_message} → {after_receipt}");
    assert_ne!(after_receipt, after_message);
    let ephemeral = &since_receipt["rooms"]["join"][&room]["ephemeral"]["events"];
    assert_eq!(ephemeral[0]["type"], "m.receipt", "{since_receipt}");

    // A token of the single shared stream (before the split) means every stream at it.
    let everything = sync(http, &alice, "timeout=0&since=s0").await;
    let timeline = &everything["rooms"]["join"][&room]["timeline"]["events"];
    assert!(timeline.as_array().unwrap().iter().any(|e| e["content"]["body"] == "hello"), "{everything}");
    let future = http.get("/_matrix/client/v3/sync?timeout=0&since=s18446744073709551615", Some(&alice)).await;
    assert_error(&future, 400, "M_INVALID_PARAM");
    let future = format!("/_matrix/client/v3/sync?timeout=0&since=m0_0_0_0_{}", u64::MAX);
    assert_error(&http.get(&future, Some(&alice)).await, 400, "M_INVALID_PARAM");
}
