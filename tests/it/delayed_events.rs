//! Delayed events (MSC4140, issue #12): scheduling through `/send`, `/state` and the dedicated
//! endpoint, the checks made when an event is scheduled (membership, power, delay limits, the
//! per-user cap), who may read and manage a `delay_id`, cancel/restart/send, the checks made
//! again when it falls due (a user who left is not sent for), and the schedule surviving a
//! restart of the server.
//!
//! No test asserts a duration: each one orders events against a control event scheduled to
//! fall due at a known point relative to the one under test, and reads the order in the room.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{Http, TestServer, assert_error, create_room, register, sync, test_config};

const UNSTABLE: &str = "/_matrix/client/unstable/org.matrix.msc4140";
/// A delay no test waits for.
const HOUR_MS: u64 = 3_600_000;

fn delayed_send_path(room: &str, txn: &str, delay: &str) -> String {
    format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/{txn}?org.matrix.msc4140.delay={delay}")
}

/// Schedules a text message `body` (also its transaction ID) after `delay_ms`; its `delay_id`.
async fn schedule(http: &Http, token: &str, room: &str, body: &str, delay_ms: u64) -> String {
    let path = delayed_send_path(room, body, &delay_ms.to_string());
    let (status, response) = http.put(&path, Some(token), &json!({ "msgtype": "m.text", "body": body })).await;
    assert_eq!(status, 200, "{response}");
    assert!(response.get("event_id").is_none(), "nothing is sent yet: {response}");
    response["delay_id"].as_str().expect("delay_id").to_owned()
}

/// The user's scheduled events once they are `expected`: a sent event's rows are removed just
/// after the send, so a reader who has seen the event may still find it listed for a moment.
async fn scheduled_ids_become(http: &Http, token: &str, expected: &[String]) {
    let mut listed = Vec::new();
    for _ in 0..200 {
        listed = scheduled_ids(http, token).await;
        if listed == expected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("scheduled: {listed:?}, expected {expected:?}");
}

async fn scheduled_ids(http: &Http, token: &str) -> Vec<String> {
    let (status, list) = http.get(&format!("{UNSTABLE}/delayed_events"), Some(token)).await;
    assert_eq!(status, 200, "{list}");
    list["delayed_events"].as_array().unwrap().iter().map(|e| e["delay_id"].as_str().unwrap().to_owned()).collect()
}

/// Reads the room's timeline through `/sync` until a message with body `last` arrives; every
/// message seen, as (sender, body), in timeline order.
async fn messages_until(http: &Http, token: &str, room: &str, last: &str) -> Vec<(String, String)> {
    let mut seen = Vec::new();
    let mut since: Option<String> = None;
    for _ in 0..120 {
        let query = match &since {
            Some(since) => format!("since={since}&timeout=1000"),
            None => "timeout=0".to_owned(),
        };
        let response = sync(http, token, &query).await;
        since = response["next_batch"].as_str().map(str::to_owned);
        let events = response["rooms"]["join"][room]["timeline"]["events"].as_array().cloned().unwrap_or_default();
        for event in events.iter().filter(|e| e["type"] == "m.room.message") {
            let body = event["content"]["body"].as_str().unwrap_or_default().to_owned();
            seen.push((event["sender"].as_str().unwrap_or_default().to_owned(), body));
        }
        if seen.iter().any(|(_, body)| body == last) {
            return seen;
        }
    }
    panic!("{last:?} never arrived; saw {seen:?}");
}

fn bodies(messages: &[(String, String)]) -> Vec<&str> {
    messages.iter().map(|(_, body)| body.as_str()).collect()
}

/// alice's public room, which bob joins.
async fn alice_and_bob(server: &TestServer) -> (String, String, String) {
    let alice = server.register("alice", "pw").await;
    let bob = server.register("bob", "pw").await;
    let room = create_room(&server.http, &alice, json!({ "preset": "public_chat" })).await;
    let (status, body) = server.http.post(&format!("/_matrix/client/v3/join/{room}"), Some(&bob), &json!({})).await;
    assert_eq!(status, 200, "{body}");
    (alice, bob, room)
}

#[tokio::test]
async fn a_scheduled_message_is_sent_as_its_user_when_due_and_not_before() {
    let server = TestServer::start().await;
    let (alice, bob, room) = alice_and_bob(&server).await;
    let http = &server.http;
    let delay_id = schedule(http, &alice, &room, "delayed hello", 1_000).await;
    let (status, one) = http.get(&format!("{UNSTABLE}/delayed_events/{delay_id}"), Some(&alice)).await;
    assert_eq!(status, 200, "{one}");
    assert_eq!((&one["room_id"], &one["type"], &one["delay"]), (&json!(room), &json!("m.room.message"), &json!(1000)));
    assert_eq!(one["content"]["body"], "delayed hello");
    assert!(one["running_since"].as_u64().is_some() && one.get("state_key").is_none(), "{one}");
    // The same transaction again is the same scheduled event.
    let again = schedule(http, &alice, &room, "delayed hello", 1_000).await;
    assert_eq!(again, delay_id);
    assert_eq!(scheduled_ids(http, &alice).await, vec![delay_id.clone()]);
    let initial = sync(http, &bob, "timeout=0").await;
    let timeline = initial["rooms"]["join"][&room]["timeline"]["events"].as_array().unwrap();
    assert!(!timeline.iter().any(|e| e["content"]["body"] == "delayed hello"), "sent too early: {timeline:?}");

    let seen = messages_until(http, &bob, &room, "delayed hello").await;
    assert_eq!(seen, vec![(server.user_id("alice"), "delayed hello".to_owned())], "sent once, by alice");
    scheduled_ids_become(http, &alice, &[]).await;
    // Finalised with the scheduled rows' removal: kept with its outcome and event ID.
    let (status, done) = http.get(&format!("{UNSTABLE}/delayed_events/{delay_id}"), Some(&alice)).await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(
        (&done["outcome"], &done["reason"], &done["content"]["body"]),
        (&json!("send"), &json!("delay"), &json!("delayed hello"))
    );
    assert!(
        done["event_id"].as_str().is_some_and(|id| id.starts_with('$')) && done["origin_server_ts"].is_u64(),
        "{done}"
    );
    server.stop().await;
}

#[tokio::test]
async fn cancel_restart_and_send_change_what_is_sent_and_when() {
    let server = TestServer::start().await;
    let (alice, bob, room) = alice_and_bob(&server).await;
    let http = &server.http;
    // Cancelled: never sent, though a later control event is.
    let cancelled = schedule(http, &alice, &room, "cancelled", 1_000).await;
    let (status, body) = http
        .post(&format!("{UNSTABLE}/delayed_events/{cancelled}"), Some(&alice), &json!({ "action": "cancel" }))
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, done) = http.get(&format!("{UNSTABLE}/delayed_events/{cancelled}"), Some(&alice)).await;
    assert_eq!(status, 200, "a cancelled event is kept, finalised: {done}");
    assert_eq!((&done["outcome"], &done["reason"], done.get("event_id")), (&json!("cancel"), &json!("action"), None));
    assert!(!scheduled_ids(http, &alice).await.contains(&cancelled), "no longer scheduled");
    // The same action again succeeds (a safe retry); a conflicting one is 409.
    let (status, body) = http.post(&format!("{UNSTABLE}/delayed_events/{cancelled}/cancel"), None, &json!({})).await;
    assert_eq!(status, 200, "{body}");
    for action in ["send", "restart"] {
        let (status, body) =
            http.post(&format!("{UNSTABLE}/delayed_events/{cancelled}/{action}"), None, &json!({})).await;
        assert_eq!(status, 409, "{action}: {body}");
    }
    schedule(http, &alice, &room, "control after cancel", 1_500).await;
    let seen = messages_until(http, &bob, &room, "control after cancel").await;
    assert!(!bodies(&seen).contains(&"cancelled"), "{seen:?}");

    // Restarted: it falls due later than a control scheduled to fall due after its first time.
    let restarted = schedule(http, &alice, &room, "restarted", 5_000).await;
    schedule(http, &alice, &room, "control between", 6_000).await;
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    // The per-action endpoint needs no access token: the delay_id is the capability.
    let (status, body) = http.post(&format!("{UNSTABLE}/delayed_events/{restarted}/restart"), None, &json!({})).await;
    assert_eq!(status, 200, "restarted before its first due time: {body}");
    let seen = messages_until(http, &bob, &room, "restarted").await;
    let order: Vec<&str> = bodies(&seen).into_iter().filter(|b| ["control between", "restarted"].contains(b)).collect();
    assert_eq!(order, vec!["control between", "restarted"], "the restart moved it after the control");

    // Sent now by the send action, an hour early.
    let early = schedule(http, &alice, &room, "sent early", HOUR_MS).await;
    let (status, body) = http.post(&format!("{UNSTABLE}/delayed_events/{early}/send"), None, &json!({})).await;
    assert_eq!(status, 200, "{body}");
    let seen = messages_until(http, &bob, &room, "sent early").await;
    assert_eq!(seen.last(), Some(&(server.user_id("alice"), "sent early".to_owned())));
    assert_eq!(bodies(&seen).iter().filter(|b| **b == "sent early").count(), 1);
    assert!(scheduled_ids(http, &alice).await.is_empty());
    for (action, expected) in [("cancel", 409), ("restart", 409), ("send", 200)] {
        let (status, body) = http.post(&format!("{UNSTABLE}/delayed_events/{early}/{action}"), None, &json!({})).await;
        assert_eq!(status, expected, "{action} of a sent event: {body}");
    }
    assert_eq!(
        bodies(&messages_until(http, &bob, &room, "sent early").await).iter().filter(|b| **b == "sent early").count(),
        1,
        "a repeated send sends nothing"
    );
    let (_, done) = http.get(&format!("{UNSTABLE}/delayed_events/{early}"), Some(&alice)).await;
    assert_eq!((&done["outcome"], &done["reason"]), (&json!("send"), &json!("action")), "{done}");
    // Finalised events are their owner's alone.
    let (status, body) = http.get(&format!("{UNSTABLE}/delayed_events/{early}"), Some(&bob)).await;
    assert_error(&(status, body), 404, "M_NOT_FOUND");
    let (status, body) =
        http.post(&format!("{UNSTABLE}/delayed_events/{early}"), Some(&bob), &json!({ "action": "send" })).await;
    assert_error(&(status, body), 404, "M_NOT_FOUND");
    let (status, body) = http.post(&format!("{UNSTABLE}/delayed_events/{early}/refresh"), None, &json!({})).await;
    assert_error(&(status, body), 404, "M_UNRECOGNIZED");
    server.stop().await;
}

#[tokio::test]
async fn another_user_cannot_see_or_manage_a_delay_id_through_their_session() {
    let server = TestServer::start().await;
    let (alice, bob, room) = alice_and_bob(&server).await;
    let http = &server.http;
    let delay_id = schedule(http, &alice, &room, "alice's", HOUR_MS).await;
    let (status, body) = http.get(&format!("{UNSTABLE}/delayed_events/{delay_id}"), Some(&bob)).await;
    assert_error(&(status, body), 404, "M_NOT_FOUND");
    for action in ["cancel", "restart", "send"] {
        let path = format!("{UNSTABLE}/delayed_events/{delay_id}");
        let (status, body) = http.post(&path, Some(&bob), &json!({ "action": action })).await;
        assert_error(&(status, body), 404, "M_NOT_FOUND");
    }
    assert!(scheduled_ids(http, &bob).await.is_empty(), "bob's list holds only bob's");
    assert_eq!(scheduled_ids(http, &alice).await, vec![delay_id.clone()], "still scheduled, unchanged");
    let (status, _) = http.get(&format!("{UNSTABLE}/delayed_events/{delay_id}"), Some(&alice)).await;
    assert_eq!(status, 200);
    // Unknown delay_ids, with and without a session.
    let (status, body) = http.post(&format!("{UNSTABLE}/delayed_events/nosuchid/send"), None, &json!({})).await;
    assert_error(&(status, body), 404, "M_NOT_FOUND");
    let (status, body) =
        http.post(&format!("{UNSTABLE}/delayed_events/nosuchid"), Some(&alice), &json!({ "action": "cancel" })).await;
    assert_error(&(status, body), 404, "M_NOT_FOUND");
    let (status, body) =
        http.post(&format!("{UNSTABLE}/delayed_events/{delay_id}"), Some(&alice), &json!({ "action": "later" })).await;
    assert_error(&(status, body), 400, "M_INVALID_PARAM");
    let (status, body) = http.get(&format!("{UNSTABLE}/delayed_events"), None).await;
    assert_error(&(status, body), 401, "M_MISSING_TOKEN");
    server.stop().await;
}

#[tokio::test]
async fn scheduling_checks_membership_power_and_the_delay() {
    let server = TestServer::start().await;
    let (alice, bob, room) = alice_and_bob(&server).await;
    let carol = server.register("carol", "pw").await;
    let http = &server.http;
    let message = json!({ "msgtype": "m.text", "body": "x" });
    // carol is not in the room.
    let (status, body) = http.put(&delayed_send_path(&room, "t1", "1000"), Some(&carol), &message).await;
    assert_error(&(status, body), 403, "M_FORBIDDEN");
    // bob may not change the room's name (state_default 50); alice may.
    let name_path =
        |delay: &str| format!("/_matrix/client/v3/rooms/{room}/state/m.room.name/?org.matrix.msc4140.delay={delay}");
    let (status, body) = http.put(&name_path("1000"), Some(&bob), &json!({ "name": "bob's" })).await;
    assert_error(&(status, body), 403, "M_FORBIDDEN");
    let (status, body) = http.put(&name_path(&HOUR_MS.to_string()), Some(&alice), &json!({ "name": "later" })).await;
    assert_eq!(status, 200, "{body}");
    let (status, one) =
        http.get(&format!("{UNSTABLE}/delayed_events/{}", body["delay_id"].as_str().unwrap()), Some(&alice)).await;
    assert_eq!((status.as_u16(), &one["state_key"], &one["type"]), (200, &json!(""), &json!("m.room.name")));
    // Delays: above the maximum, zero, negative, not a number.
    let (status, body) = http.put(&delayed_send_path(&room, "t2", "86400001"), Some(&alice), &message).await;
    assert_eq!(body["max_delay"], 86_400_000, "{body}");
    assert_error(&(status, body), 400, "M_MAX_DELAY_EXCEEDED");
    for (txn, bad) in [("t3", "0"), ("t4", "-5"), ("t5", "soon"), ("t6", "1.5")] {
        let (status, body) = http.put(&delayed_send_path(&room, txn, bad), Some(&alice), &message).await;
        assert_error(&(status, body), 400, "M_INVALID_PARAM");
    }
    let dedicated = format!("{UNSTABLE}/rooms/{room}/delayed_event/m.room.message/t7");
    let (status, body) = http.put(&dedicated, Some(&alice), &json!({ "delay": "1000", "content": message })).await;
    assert_error(&(status, body), 400, "M_INVALID_PARAM");
    let (status, body) = http.put(&dedicated, Some(&alice), &json!({ "delay": 1000 })).await;
    assert_error(&(status, body), 400, "M_BAD_JSON");
    // The dedicated endpoint schedules too.
    let (status, body) = http.put(&dedicated, Some(&alice), &json!({ "delay": HOUR_MS, "content": message })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(scheduled_ids(http, &alice).await.len(), 2, "only the two accepted ones are scheduled");
    assert!(scheduled_ids(http, &bob).await.is_empty() && scheduled_ids(http, &carol).await.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn a_user_may_have_only_so_many_scheduled() {
    let server = TestServer::start_with(|config| config.delayed_events.max_scheduled_per_user = 2).await;
    let (alice, bob, room) = alice_and_bob(&server).await;
    let http = &server.http;
    schedule(http, &alice, &room, "one", HOUR_MS).await;
    let two = schedule(http, &alice, &room, "two", HOUR_MS).await;
    let message = json!({ "msgtype": "m.text", "body": "three" });
    let (status, body) = http.put(&delayed_send_path(&room, "three", "1000"), Some(&alice), &message).await;
    assert_error(&(status, body), 429, "M_LIMIT_EXCEEDED");
    // Others have their own allowance; a cancel frees one.
    schedule(http, &bob, &room, "bob's", HOUR_MS).await;
    let (status, _) = http.post(&format!("{UNSTABLE}/delayed_events/{two}/cancel"), None, &json!({})).await;
    assert_eq!(status, 200);
    schedule(http, &alice, &room, "three", HOUR_MS).await;
    server.stop().await;
}

#[tokio::test]
async fn an_event_whose_user_left_before_it_fell_due_is_not_sent() {
    let server = TestServer::start().await;
    let (alice, bob, room) = alice_and_bob(&server).await;
    let http = &server.http;
    let leaving = schedule(http, &bob, &room, "from a leaver", 1_000).await;
    let (status, body) = http.post(&format!("/_matrix/client/v3/rooms/{room}/leave"), Some(&bob), &json!({})).await;
    assert_eq!(status, 200, "{body}");
    schedule(http, &alice, &room, "control after leave", 2_000).await;
    let seen = messages_until(http, &alice, &room, "control after leave").await;
    assert_eq!(bodies(&seen), vec!["control after leave"], "bob's event was dropped");
    let (status, done) = http.get(&format!("{UNSTABLE}/delayed_events/{leaving}"), Some(&bob)).await;
    assert_eq!(status, 200, "{done}");
    assert_eq!((&done["outcome"], &done["reason"]), (&json!("cancel"), &json!("error")), "dropped: {done}");
    assert_eq!(done["error"]["errcode"], "M_FORBIDDEN", "{done}");
    assert!(scheduled_ids(http, &bob).await.is_empty(), "not kept for later");
    server.stop().await;
}

#[tokio::test]
async fn the_send_action_fails_like_a_send_and_keeps_the_event() {
    let server = TestServer::start().await;
    let (_alice, bob, room) = alice_and_bob(&server).await;
    let http = &server.http;
    let delay_id = schedule(http, &bob, &room, "bob's", HOUR_MS).await;
    let (status, _) = http.post(&format!("/_matrix/client/v3/rooms/{room}/leave"), Some(&bob), &json!({})).await;
    assert_eq!(status, 200);
    let (status, body) = http.post(&format!("{UNSTABLE}/delayed_events/{delay_id}/send"), None, &json!({})).await;
    assert_error(&(status, body), 403, "M_FORBIDDEN");
    assert_eq!(scheduled_ids(http, &bob).await, vec![delay_id], "still scheduled, as the MSC asks");
    server.stop().await;
}

#[tokio::test]
async fn versions_advertise_the_feature_only_when_it_is_on() {
    let server = TestServer::start().await;
    let (status, versions) = server.http.get("/_matrix/client/versions", None).await;
    assert_eq!(status, 200);
    assert_eq!(versions["unstable_features"]["org.matrix.msc4140"], true, "{versions}");
    server.stop().await;

    let server = TestServer::start_with(|config| config.delayed_events.enabled = false).await;
    let (alice, _bob, room) = alice_and_bob(&server).await;
    let (_, versions) = server.http.get("/_matrix/client/versions", None).await;
    assert!(versions["unstable_features"].get("org.matrix.msc4140").is_none(), "{versions}");
    let message = json!({ "msgtype": "m.text", "body": "x" });
    // Refused, not sent at once: a client asking for a delay must not get an immediate send.
    let (status, body) = server.http.put(&delayed_send_path(&room, "t", "1000"), Some(&alice), &message).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = server.http.get(&format!("{UNSTABLE}/delayed_events"), Some(&alice)).await;
    assert_error(&(status, body), 404, "M_UNRECOGNIZED");
    server.stop().await;
}

// Several worker threads, as in the binary, so the stopped server's tasks end on other threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_events_survive_a_restart_and_fire_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = test_config(dir.path(), "hs1.localhost");
    let running = lattice::start(config.clone()).await.unwrap();
    let http = Http::new(format!("http://{}", running.address));
    let token = running.first_registration_token.clone().unwrap();
    let alice = register(&http, "alice", "pw", &token).await["access_token"].as_str().unwrap().to_owned();
    let room = create_room(&http, &alice, json!({ "preset": "public_chat" })).await;
    let later = schedule(&http, &alice, &room, "after the restart", HOUR_MS).await;
    let soon = schedule(&http, &alice, &room, "due across the restart", 3_000).await;
    let before = scheduled_ids(&http, &alice).await;
    assert!(before.contains(&soon), "not fired before the stop: {before:?}");
    running.stop().await.unwrap();

    let restarted = lattice::start(config).await.unwrap();
    let http = Http::new(format!("http://{}", restarted.address));
    let seen = messages_until(&http, &alice, &room, "due across the restart").await;
    assert_eq!(bodies(&seen), vec!["due across the restart"]);
    // The sent one leaves the list; the other one is still scheduled.
    scheduled_ids_become(&http, &alice, &[later]).await;
    restarted.stop().await.unwrap();
}

#[tokio::test]
async fn listing_filters_and_orders_and_refuses_what_it_does_not_support() {
    let server = TestServer::start().await;
    let (alice, _bob, room) = alice_and_bob(&server).await;
    let other_room = create_room(&server.http, &alice, json!({ "preset": "public_chat" })).await;
    let http = &server.http;
    let late = schedule(http, &alice, &room, "late", 2 * HOUR_MS).await;
    let early = schedule(http, &alice, &room, "early", HOUR_MS).await;
    let elsewhere = schedule(http, &alice, &other_room, "elsewhere", 3 * HOUR_MS).await;
    let ids = |list: &Value| -> Vec<String> {
        list["delayed_events"].as_array().unwrap().iter().map(|e| e["delay_id"].as_str().unwrap().to_owned()).collect()
    };
    let list = |query: String| {
        let (http, alice) = (http.clone(), alice.clone());
        async move { http.get(&format!("{UNSTABLE}/delayed_events?{query}"), Some(&alice)).await }
    };
    let (_, all) = list(String::new()).await;
    assert_eq!(ids(&all), vec![early.clone(), late.clone(), elsewhere.clone()], "by send time");
    let (_, backward) = list("dir=b".into()).await;
    assert_eq!(ids(&backward), vec![elsewhere.clone(), late.clone(), early.clone()]);
    let (_, in_room) = list(format!("room_id={room}")).await;
    assert_eq!(ids(&in_room), vec![early, late]);
    let (_, finalised) = list("status=finalised".into()).await;
    assert!(ids(&finalised).is_empty(), "nothing is finalised yet");
    for bad in ["status=done", "dir=x", "order_by=size", "outcome=maybe", "from=abc"] {
        let (status, body) = list(bad.into()).await;
        assert_error(&(status, body), 400, "M_INVALID_PARAM");
    }
    server.stop().await;
}

#[tokio::test]
async fn finalised_events_are_listed_with_their_outcome_and_filtered() {
    let server = TestServer::start().await;
    let (alice, bob, room) = alice_and_bob(&server).await;
    let http = &server.http;
    let sent = schedule(http, &alice, &room, "sent by action", HOUR_MS).await;
    let cancelled = schedule(http, &alice, &room, "cancelled by action", HOUR_MS).await;
    let scheduled = schedule(http, &alice, &room, "still scheduled", HOUR_MS).await;
    let bobs = schedule(http, &bob, &room, "bob's", HOUR_MS).await;
    assert_eq!(http.post(&format!("{UNSTABLE}/delayed_events/{sent}/send"), None, &json!({})).await.0, 200);
    assert_eq!(http.post(&format!("{UNSTABLE}/delayed_events/{cancelled}/cancel"), None, &json!({})).await.0, 200);
    assert_eq!(http.post(&format!("{UNSTABLE}/delayed_events/{bobs}/cancel"), None, &json!({})).await.0, 200);
    let list = |query: &str| {
        let path = format!("{UNSTABLE}/delayed_events?{query}");
        let (http, alice) = (http.clone(), alice.clone());
        async move {
            let (status, body) = http.get(&path, Some(&alice)).await;
            assert_eq!(status, 200, "{body}");
            body["delayed_events"].as_array().unwrap().clone()
        }
    };
    let finalised = list("status=finalised").await;
    let mut listed: Vec<(&str, &str, bool)> = finalised
        .iter()
        .map(|e| (e["delay_id"].as_str().unwrap(), e["outcome"].as_str().unwrap(), e["event_id"].is_string()))
        .collect();
    listed.sort();
    let mut expected = [(sent.as_str(), "send", true), (cancelled.as_str(), "cancel", false)];
    expected.sort();
    assert_eq!(listed, expected, "alice's alone, with their outcomes: {finalised:?}");
    let ids = |events: &[Value]| events.iter().map(|e| e["delay_id"].as_str().unwrap().to_owned()).collect::<Vec<_>>();
    let mut backward = ids(&list("status=finalised&dir=b").await);
    backward.reverse();
    assert_eq!(backward, ids(&finalised), "dir=b is the other way round");
    assert_eq!(ids(&list("status=finalised&outcome=cancel").await), std::slice::from_ref(&cancelled));
    assert_eq!(ids(&list("outcome=send").await), std::slice::from_ref(&sent), "an outcome asks for finalised events");
    assert_eq!(ids(&list("status=finalised&reason=delay").await), Vec::<String>::new());
    assert_eq!(ids(&list("").await), [scheduled], "scheduled ones apart");
    server.stop().await;

    // With no retention, nothing finalised is kept.
    let server = TestServer::start_with(|config| config.delayed_events.finalised_retention = "0".into()).await;
    let (alice, _bob, room) = alice_and_bob(&server).await;
    let http = &server.http;
    let gone = schedule(http, &alice, &room, "forgotten", HOUR_MS).await;
    assert_eq!(http.post(&format!("{UNSTABLE}/delayed_events/{gone}/cancel"), None, &json!({})).await.0, 200);
    let (status, body) = http.get(&format!("{UNSTABLE}/delayed_events/{gone}"), Some(&alice)).await;
    assert_error(&(status, body), 404, "M_NOT_FOUND");
    let (status, body) = http.post(&format!("{UNSTABLE}/delayed_events/{gone}/cancel"), None, &json!({})).await;
    assert_error(&(status, body), 404, "M_NOT_FOUND");
    server.stop().await;
}
