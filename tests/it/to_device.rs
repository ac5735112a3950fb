//! To-device messages: queued per device, delivered by `/sync` once, deleted once acknowledged.

use serde_json::{Value, json};

use crate::support::{Http, TestServer, assert_error};

async fn sync(http: &Http, token: &str, since: Option<&str>, timeout_ms: u64) -> Value {
    let mut path = format!("/_matrix/client/v3/sync?timeout={timeout_ms}");
    if let Some(since) = since {
        path.push_str(&format!("&since={since}"));
    }
    let (status, body) = http.get(&path, Some(token)).await;
    assert_eq!(status, 200, "{body}");
    body
}

fn to_device(sync: &Value) -> Vec<Value> {
    sync["to_device"]["events"].as_array().cloned().unwrap_or_default()
}

async fn send(http: &Http, token: &str, txn: &str, messages: Value) -> (reqwest::StatusCode, Value) {
    http.put(&format!("/_matrix/client/v3/sendToDevice/m.test/{txn}"), Some(token), &json!({ "messages": messages }))
        .await
}

struct Device {
    token: String,
    id: String,
}

async fn login(http: &Http, user: &str) -> Device {
    let (status, body) = http.login(user, "pw").await;
    assert_eq!(status, 200, "{body}");
    Device { token: body["access_token"].as_str().unwrap().into(), id: body["device_id"].as_str().unwrap().into() }
}

#[tokio::test]
async fn messages_reach_the_named_device_once_and_are_deleted_when_acknowledged() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    server.register("bob", "pw").await;
    let bob_phone = login(http, "bob").await;
    let bob_laptop = login(http, "bob").await;
    let bob = server.user_id("bob");
    let phone_start = sync(http, &bob_phone.token, None, 0).await;
    let laptop_start = sync(http, &bob_laptop.token, None, 0).await;

    let messages = json!({ bob.clone(): { bob_phone.id.clone(): { "n": 1 } } });
    assert_eq!(send(http, &alice, "t1", messages.clone()).await.0, 200);
    // The same transaction again changes nothing.
    assert_eq!(send(http, &alice, "t1", messages).await.0, 200);

    let phone = sync(http, &bob_phone.token, phone_start["next_batch"].as_str(), 0).await;
    let events = to_device(&phone);
    assert_eq!(events.len(), 1, "{phone}");
    assert_eq!(events[0]["sender"], server.user_id("alice"));
    assert_eq!(events[0]["type"], "m.test");
    assert_eq!(events[0]["content"], json!({ "n": 1 }));
    let laptop = sync(http, &bob_laptop.token, laptop_start["next_batch"].as_str(), 0).await;
    assert!(to_device(&laptop).is_empty(), "{laptop}");

    // Retrying the same sync (the response was lost) delivers the message again…
    let retried = sync(http, &bob_phone.token, phone_start["next_batch"].as_str(), 0).await;
    assert_eq!(to_device(&retried).len(), 1);
    // …syncing past it acknowledges it, and it is gone for good.
    let after = sync(http, &bob_phone.token, phone["next_batch"].as_str(), 0).await;
    assert!(to_device(&after).is_empty(), "{after}");
    let again = sync(http, &bob_phone.token, phone_start["next_batch"].as_str(), 0).await;
    assert!(to_device(&again).is_empty(), "acknowledged messages are deleted: {again}");
    server.stop().await;
}

#[tokio::test]
async fn star_reaches_every_device_and_wakes_a_waiting_sync() {
    let server = TestServer::start().await;
    let http = server.http.clone();
    let alice = server.register("alice", "pw").await;
    server.register("bob", "pw").await;
    let devices = [login(&http, "bob").await, login(&http, "bob").await];
    let bob = server.user_id("bob");
    let start = sync(&http, &devices[0].token, None, 0).await;
    let since = start["next_batch"].as_str().unwrap().to_owned();

    let waiting = {
        let (http, token, since) = (http.clone(), devices[0].token.clone(), since.clone());
        tokio::spawn(async move { sync(&http, &token, Some(&since), 20_000).await })
    };
    // The request is asleep in the server before the message is sent.
    server.until_sync_waiters(1).await;
    assert_eq!(send(&http, &alice, "t2", json!({ bob.clone(): { "*": { "hello": true } } })).await.0, 200);
    let woken = waiting.await.unwrap();
    assert_eq!(to_device(&woken).len(), 1, "{woken}");
    // Bob's first registration device and both logins each got one.
    let other = sync(&http, &devices[1].token, Some(&since), 0).await;
    assert_eq!(to_device(&other).len(), 1, "{other}");
    server.stop().await;
}

#[tokio::test]
async fn a_full_inbox_is_delivered_across_syncs_without_loss_or_repeats() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    server.register("bob", "pw").await;
    let phone = login(http, "bob").await;
    let bob = server.user_id("bob");
    for i in 0..250 {
        let (status, body) =
            send(http, &alice, &format!("n{i}"), json!({ bob.clone(): { phone.id.clone(): { "i": i } } })).await;
        assert_eq!(status, 200, "{body}");
    }
    let mut seen = Vec::new();
    let mut since: Option<String> = None;
    for _ in 0..10 {
        let page = sync(http, &phone.token, since.as_deref(), 0).await;
        let events = to_device(&page);
        assert!(events.len() <= 100);
        seen.extend(events.iter().map(|e| e["content"]["i"].as_u64().unwrap()));
        since = page["next_batch"].as_str().map(str::to_owned);
        if events.is_empty() {
            break;
        }
    }
    assert_eq!(seen, (0..250).collect::<Vec<u64>>());
    server.stop().await;
}

#[tokio::test]
async fn bad_to_device_requests_are_refused() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    assert_error(&send(http, &alice, "x", json!("not an object")).await, 400, "M_BAD_JSON");
    assert_error(&send(http, &alice, "y", json!({ "not-a-user": {} })).await, 400, "M_BAD_JSON");
    let (status, _) = http.put("/_matrix/client/v3/sendToDevice/m.test/z", None, &json!({ "messages": {} })).await;
    assert_eq!(status, 401);
    server.stop().await;
}
