//! Push rules, notification counts and pushers (issue #12), over HTTP and through `matrix-sdk`.

use reqwest::Method;
use serde_json::{Value, json};

use crate::support::{Http, TestServer, assert_error, create_room, sync, urlencode};

const RULES: &str = "/_matrix/client/v3/pushrules/global";

fn rule_ids(rules: &Value, kind: &str) -> Vec<String> {
    rules[kind].as_array().map_or(Vec::new(), |rules| {
        rules.iter().filter_map(|rule| rule["rule_id"].as_str().map(str::to_owned)).collect()
    })
}

fn push_rules_in(sync_body: &Value) -> Option<Value> {
    let events = sync_body["account_data"]["events"].as_array()?;
    events.iter().find(|e| e["type"] == "m.push_rules").map(|e| e["content"].clone())
}

#[tokio::test]
async fn a_new_user_has_the_default_rules_in_the_api_in_account_data_and_in_the_first_sync() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;

    let (status, all) = http.get("/_matrix/client/v3/pushrules/", Some(&alice)).await;
    assert_eq!(status, 200, "{all}");
    let global = &all["global"];
    for id in [".m.rule.master", ".m.rule.suppress_notices", ".m.rule.is_user_mention", ".m.rule.is_room_mention"] {
        assert!(rule_ids(global, "override").contains(&id.to_owned()), "{id} missing: {global}");
    }
    for id in [".m.rule.encrypted", ".m.rule.message", ".m.rule.call"] {
        assert!(rule_ids(global, "underride").contains(&id.to_owned()), "{id} missing: {global}");
    }
    let (status, scope) = http.get(&format!("{RULES}/"), Some(&alice)).await;
    assert_eq!(status, 200);
    assert_eq!(scope, *global, "the global scope is the same ruleset");

    let (status, master) = http.get(&format!("{RULES}/override/.m.rule.master"), Some(&alice)).await;
    assert_eq!(status, 200, "{master}");
    assert_eq!((master["default"].clone(), master["enabled"].clone()), (json!(true), json!(false)));

    let path = format!("/_matrix/client/v3/user/{}/account_data/m.push_rules", server.user_id("alice"));
    let (status, data) = http.get(&path, Some(&alice)).await;
    assert_eq!(status, 200, "{data}");
    assert_eq!(data["global"], *global);

    let first = sync(http, &alice, "").await;
    assert_eq!(push_rules_in(&first).expect("m.push_rules in the first sync")["global"], *global);
    let since = first["next_batch"].as_str().unwrap();
    let again = sync(http, &alice, &format!("since={since}&timeout=0")).await;
    assert_eq!(push_rules_in(&again), None, "an unchanged default is not sent again");
    server.stop().await;
}

#[tokio::test]
async fn a_rule_put_is_listed_in_place_synced_and_can_be_disabled_changed_and_deleted() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let since = sync(http, &alice, "").await["next_batch"].as_str().unwrap().to_owned();

    let cake = json!({ "pattern": "cake", "actions": ["notify", { "set_tweak": "highlight" }] });
    assert_eq!(http.put(&format!("{RULES}/content/cake"), Some(&alice), &cake).await.0, 200);
    let pie = json!({ "pattern": "pie", "actions": ["notify"] });
    let (status, body) = http.put(&format!("{RULES}/content/pie?after=cake"), Some(&alice), &pie).await;
    assert_eq!(status, 200, "{body}");
    let first = json!({ "pattern": "tart", "actions": [] });
    assert_eq!(http.put(&format!("{RULES}/content/tart?before=cake"), Some(&alice), &first).await.0, 200);

    let (_, all) = http.get("/_matrix/client/v3/pushrules/", Some(&alice)).await;
    let content = rule_ids(&all["global"], "content");
    let user_rules: Vec<&str> = content.iter().map(String::as_str).filter(|id| !id.starts_with('.')).collect();
    assert_eq!(user_rules, ["tart", "cake", "pie"], "{all}");

    let news = sync(http, &alice, &format!("since={since}&timeout=0")).await;
    let synced = push_rules_in(&news).expect("the change reaches /sync as m.push_rules");
    assert_eq!(synced["global"], all["global"]);

    let enabled = format!("{RULES}/content/cake/enabled");
    assert_eq!(http.get(&enabled, Some(&alice)).await.1, json!({ "enabled": true }));
    assert_eq!(http.put(&enabled, Some(&alice), &json!({ "enabled": false })).await.0, 200);
    assert_eq!(http.get(&enabled, Some(&alice)).await.1, json!({ "enabled": false }));
    // Replacing a rule keeps it disabled.
    assert_eq!(http.put(&format!("{RULES}/content/cake"), Some(&alice), &cake).await.0, 200);
    assert_eq!(http.get(&enabled, Some(&alice)).await.1, json!({ "enabled": false }));

    let actions = format!("{RULES}/content/pie/actions");
    assert_eq!(http.put(&actions, Some(&alice), &json!({ "actions": [] })).await.0, 200);
    assert_eq!(http.get(&actions, Some(&alice)).await.1, json!({ "actions": [] }));
    // A server-default rule can be switched and changed, not deleted.
    let master = format!("{RULES}/override/.m.rule.master");
    assert_eq!(http.put(&format!("{master}/enabled"), Some(&alice), &json!({ "enabled": true })).await.0, 200);
    assert_eq!(http.get(&format!("{master}/enabled"), Some(&alice)).await.1, json!({ "enabled": true }));
    assert_error(&http.request(Method::DELETE, &master, Some(&alice), None).await, 400, "M_INVALID_PARAM");

    assert_eq!(http.request(Method::DELETE, &format!("{RULES}/content/pie"), Some(&alice), None).await.0, 200);
    assert_error(&http.get(&format!("{RULES}/content/pie"), Some(&alice)).await, 404, "M_NOT_FOUND");
    server.stop().await;
}

#[tokio::test]
async fn rules_are_per_user_by_the_token() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let bob = server.register("bob", "pw").await;
    let secret = json!({ "pattern": "alice-secret", "actions": ["notify"] });
    assert_eq!(http.put(&format!("{RULES}/content/secret"), Some(&alice), &secret).await.0, 200);

    assert_error(&http.get(&format!("{RULES}/content/secret"), Some(&bob)).await, 404, "M_NOT_FOUND");
    let (_, bobs) = http.get("/_matrix/client/v3/pushrules/", Some(&bob)).await;
    assert!(!rule_ids(&bobs["global"], "content").contains(&"secret".to_owned()), "{bobs}");
    let delete = http.request(Method::DELETE, &format!("{RULES}/content/secret"), Some(&bob), None).await;
    assert_error(&delete, 404, "M_NOT_FOUND");
    assert_eq!(http.get(&format!("{RULES}/content/secret"), Some(&alice)).await.0, 200, "alice's rule stays");
    // Alice's rules as account data are hers alone, and no client may write them there.
    let path = format!("/_matrix/client/v3/user/{}/account_data/m.push_rules", server.user_id("alice"));
    assert_error(&http.get(&path, Some(&bob)).await, 403, "M_FORBIDDEN");
    assert_error(&http.put(&path, Some(&alice), &json!({ "global": {} })).await, 405, "M_BAD_JSON");
    assert_error(&http.get(&format!("{RULES}/"), None).await, 401, "M_MISSING_TOKEN");
    server.stop().await;
}

#[tokio::test]
async fn bad_push_rule_requests_get_matrix_errors() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let actions = json!({ "actions": ["notify"] });

    assert_error(&http.put(&format!("{RULES}/sideways/x"), Some(&alice), &actions).await, 400, "M_INVALID_PARAM");
    assert_error(&http.get(&format!("{RULES}/sideways/x"), Some(&alice)).await, 400, "M_INVALID_PARAM");
    assert_error(&http.get(&format!("{RULES}/override/nope"), Some(&alice)).await, 404, "M_NOT_FOUND");
    assert_error(&http.get(&format!("{RULES}/override/nope/enabled"), Some(&alice)).await, 404, "M_NOT_FOUND");
    let enable = json!({ "enabled": true });
    assert_error(&http.put(&format!("{RULES}/room/nope/enabled"), Some(&alice), &enable).await, 404, "M_NOT_FOUND");
    assert_error(&http.put(&format!("{RULES}/content/x"), Some(&alice), &actions).await, 400, "M_BAD_JSON");
    let not_json = http.request(Method::PUT, &format!("{RULES}/override/x"), Some(&alice), Some(b"{".to_vec())).await;
    assert_error(&not_json, 400, "M_NOT_JSON");
    let bad_condition = json!({ "actions": ["notify"], "conditions": [{ "kind": "event_match" }] });
    assert_error(&http.put(&format!("{RULES}/override/x"), Some(&alice), &bad_condition).await, 400, "M_BAD_JSON");
    let conditional = json!({ "actions": ["notify"], "conditions": [] });
    let reserved = http.put(&format!("{RULES}/override/.mine"), Some(&alice), &conditional).await;
    assert_error(&reserved, 400, "M_INVALID_PARAM");
    assert_error(&http.put(&format!("{RULES}/room/not-a-room"), Some(&alice), &actions).await, 400, "M_INVALID_PARAM");
    let relative = format!("{RULES}/override/x?before=.m.rule.master");
    assert_error(&http.put(&relative, Some(&alice), &conditional).await, 400, "M_INVALID_PARAM");
    let unknown_anchor = format!("{RULES}/override/x?after=missing");
    assert_error(&http.put(&unknown_anchor, Some(&alice), &conditional).await, 404, "M_NOT_FOUND");
    let bad_enabled = http.put(&format!("{RULES}/override/.m.rule.master/enabled"), Some(&alice), &json!({})).await;
    assert_error(&bad_enabled, 400, "M_BAD_JSON");
    // Nothing above changed the rules.
    let (_, all) = http.get("/_matrix/client/v3/pushrules/", Some(&alice)).await;
    let defaults = rule_ids(&all["global"], "override");
    assert!(defaults.iter().all(|id| id.starts_with('.')), "{all}");
    server.stop().await;
}

/// Sends `content` as an `m.room.message`; returns the event ID.
async fn send(http: &Http, token: &str, room: &str, txn: &str, content: Value) -> String {
    let path = format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/{txn}");
    let (status, body) = http.put(&path, Some(token), &content).await;
    assert_eq!(status, 200, "{body}");
    body["event_id"].as_str().unwrap().to_owned()
}

/// `(notification_count, highlight_count)` of the room in a fresh initial `/sync`.
async fn counts(http: &Http, token: &str, room: &str) -> (u64, u64) {
    let body = sync(http, token, "").await;
    let unread = &body["rooms"]["join"][room]["unread_notifications"];
    (unread["notification_count"].as_u64().expect("counts"), unread["highlight_count"].as_u64().expect("counts"))
}

async fn receipt(http: &Http, token: &str, room: &str, event: &str, body: Value) {
    let path = format!("/_matrix/client/v3/rooms/{room}/receipt/m.read/{event}");
    let (status, response) = http.post(&path, Some(token), &body).await;
    assert_eq!(status, 200, "{response}");
}

/// Alice, bob and carol in one public room (three members, so `.m.rule.room_one_to_one` does
/// not apply).
async fn three_in_a_room(server: &TestServer) -> (String, String, String, String) {
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let bob = server.register("bob", "pw").await;
    let carol = server.register("carol", "pw").await;
    let room = create_room(http, &alice, json!({ "preset": "public_chat" })).await;
    for token in [&bob, &carol] {
        assert_eq!(http.post(&format!("/_matrix/client/v3/join/{room}"), Some(token), &json!({})).await.0, 200);
    }
    (alice, bob, carol, room)
}

#[tokio::test]
async fn a_mention_highlights_for_the_mentioned_only_and_a_receipt_clears_it() {
    let server = TestServer::start().await;
    let http = &server.http;
    let (alice, bob, carol, room) = three_in_a_room(&server).await;
    assert_eq!(counts(http, &bob, &room).await, (0, 0), "joins notify nobody");

    let mention =
        json!({ "msgtype": "m.text", "body": "look at this", "m.mentions": { "user_ids": [server.user_id("bob")] } });
    let mentioned = send(http, &alice, &room, "m1", mention).await;
    assert_eq!(counts(http, &bob, &room).await, (1, 1), "bob is mentioned");
    assert_eq!(counts(http, &carol, &room).await, (1, 0), "carol is notified of a message, not highlighted");
    assert_eq!(counts(http, &alice, &room).await, (0, 0), "alice's own message does not count for her");

    send(http, &bob, &room, "b1", json!({ "msgtype": "m.text", "body": "mine" })).await;
    assert_eq!(counts(http, &bob, &room).await, (1, 1), "bob's own message does not count for bob");
    assert_eq!(counts(http, &carol, &room).await, (2, 0));

    // An incremental sync carries the counts with the room's news.
    let since = sync(http, &bob, "").await["next_batch"].as_str().unwrap().to_owned();
    receipt(http, &bob, &room, &mentioned, json!({})).await;
    let news = sync(http, &bob, &format!("since={since}&timeout=0")).await;
    assert_eq!(
        news["rooms"]["join"][&room]["unread_notifications"],
        json!({ "notification_count": 0, "highlight_count": 0 })
    );
    assert_eq!(counts(http, &carol, &room).await, (2, 0), "bob's receipt is bob's");

    // A private receipt clears too.
    let last = send(http, &alice, &room, "m2", json!({ "msgtype": "m.text", "body": "more" })).await;
    assert_eq!(counts(http, &carol, &room).await, (3, 0));
    let path = format!("/_matrix/client/v3/rooms/{room}/receipt/m.read.private/{last}");
    assert_eq!(http.post(&path, Some(&carol), &json!({})).await.0, 200);
    assert_eq!(counts(http, &carol, &room).await, (0, 0));
    server.stop().await;
}

#[tokio::test]
async fn a_users_rule_takes_effect_and_a_disabled_rule_stops_notifying() {
    let server = TestServer::start().await;
    let http = &server.http;
    let (alice, bob, _carol, room) = three_in_a_room(&server).await;

    let cake = json!({ "pattern": "cake", "actions": ["notify", { "set_tweak": "highlight" }] });
    assert_eq!(http.put(&format!("{RULES}/content/cake"), Some(&bob), &cake).await.0, 200);
    send(http, &alice, &room, "c1", json!({ "msgtype": "m.text", "body": "who wants cake?" })).await;
    assert_eq!(counts(http, &bob, &room).await, (1, 1), "bob's keyword highlights");

    let message = format!("{RULES}/underride/.m.rule.message/enabled");
    assert_eq!(http.put(&message, Some(&bob), &json!({ "enabled": false })).await.0, 200);
    send(http, &alice, &room, "c2", json!({ "msgtype": "m.text", "body": "plain words" })).await;
    assert_eq!(counts(http, &bob, &room).await, (1, 1), "with .m.rule.message off a plain message is quiet");

    // Content rules come before room rules: in a room bob silenced, his keyword still highlights.
    let quiet = json!({ "actions": [] });
    assert_eq!(http.put(&format!("{RULES}/room/{room}"), Some(&bob), &quiet).await.0, 200);
    send(http, &alice, &room, "c3", json!({ "msgtype": "m.text", "body": "cake again" })).await;
    assert_eq!(counts(http, &bob, &room).await, (2, 2));
    server.stop().await;
}

#[tokio::test]
async fn notifications_lists_what_notified_with_the_read_flag_and_only_highlights() {
    let server = TestServer::start().await;
    let http = &server.http;
    let (alice, bob, _carol, room) = three_in_a_room(&server).await;
    let plain = send(http, &alice, &room, "n1", json!({ "msgtype": "m.text", "body": "hello all" })).await;
    let mention = json!({ "msgtype": "m.text", "body": "bob!", "m.mentions": { "user_ids": [server.user_id("bob")] } });
    let mentioned = send(http, &alice, &room, "n2", mention).await;

    let (status, listed) = http.get("/_matrix/client/v3/notifications", Some(&bob)).await;
    assert_eq!(status, 200, "{listed}");
    let ids: Vec<&str> =
        listed["notifications"].as_array().unwrap().iter().map(|n| n["event"]["event_id"].as_str().unwrap()).collect();
    assert_eq!(ids, [mentioned.as_str(), plain.as_str()], "newest first: {listed}");
    assert_eq!(listed["notifications"][0]["room_id"], room);
    assert_eq!(listed["notifications"][0]["read"], false);

    let (_, highlights) = http.get("/_matrix/client/v3/notifications?only=highlight", Some(&bob)).await;
    assert_eq!(highlights["notifications"].as_array().unwrap().len(), 1, "{highlights}");
    assert_eq!(highlights["notifications"][0]["event"]["event_id"], mentioned);

    let (_, first) = http.get("/_matrix/client/v3/notifications?limit=1", Some(&bob)).await;
    let next = first["next_token"].as_str().expect("a next page");
    let (_, second) = http.get(&format!("/_matrix/client/v3/notifications?limit=1&from={next}"), Some(&bob)).await;
    assert_eq!(second["notifications"][0]["event"]["event_id"], plain, "{second}");

    receipt(http, &bob, &room, &plain, json!({})).await;
    let (_, listed) = http.get("/_matrix/client/v3/notifications", Some(&bob)).await;
    assert_eq!(
        (listed["notifications"][0]["read"].clone(), listed["notifications"][1]["read"].clone()),
        (json!(false), json!(true))
    );
    let (_, alices) = http.get("/_matrix/client/v3/notifications", Some(&alice)).await;
    assert_eq!(alices["notifications"], json!([]), "alice was notified of nothing");
    assert_error(&http.get("/_matrix/client/v3/notifications?from=nonsense", Some(&bob)).await, 400, "M_INVALID_PARAM");
    server.stop().await;
}

#[tokio::test]
async fn thread_counts_come_apart_when_asked_and_a_threaded_receipt_clears_its_thread() {
    let server = TestServer::start().await;
    let http = &server.http;
    let (alice, bob, _carol, room) = three_in_a_room(&server).await;
    let root = send(http, &alice, &room, "t0", json!({ "msgtype": "m.text", "body": "root" })).await;
    let reply = json!({ "msgtype": "m.text", "body": "in the thread", "m.relates_to": { "rel_type": "m.thread", "event_id": root } });
    let in_thread = send(http, &alice, &room, "t1", reply).await;

    assert_eq!(counts(http, &bob, &room).await, (2, 0), "without the filter option the room counts both");
    let filter = r#"{"room":{"timeline":{"unread_thread_notifications":true}}}"#;
    let query = format!("filter={}", urlencode(filter));
    let body = sync(http, &bob, &query).await;
    let joined = &body["rooms"]["join"][&room];
    assert_eq!(joined["unread_notifications"]["notification_count"], 1, "{joined}");
    assert_eq!(joined["unread_thread_notifications"][&root]["notification_count"], 1, "{joined}");

    receipt(http, &bob, &room, &in_thread, json!({ "thread_id": root })).await;
    let body = sync(http, &bob, &query).await;
    let joined = &body["rooms"]["join"][&room];
    assert_eq!(joined["unread_notifications"]["notification_count"], 1, "the main timeline is still unread");
    assert_eq!(joined["unread_thread_notifications"], json!({}), "{joined}");
    receipt(http, &bob, &room, &root, json!({ "thread_id": "main" })).await;
    assert_eq!(counts(http, &bob, &room).await, (0, 0));
    server.stop().await;
}

#[tokio::test]
async fn matrix_sdk_sees_its_push_rules_and_the_highlight_of_a_mention() {
    use matrix_sdk::Client;
    use matrix_sdk::config::SyncSettings;
    use matrix_sdk::ruma::events::push_rules::PushRulesEventContent;

    let server = TestServer::start().await;
    let http = &server.http;
    let (alice, _bob, _carol, room) = three_in_a_room(&server).await;
    let client = Client::builder().homeserver_url(server.base_url()).build().await.expect("client builds");
    client.matrix_auth().login_username("bob", "pw").send().await.expect("bob logs in");
    client.sync_once(SyncSettings::default()).await.expect("first sync");
    let synced = client.account().account_data::<PushRulesEventContent>().await.expect("the client's store");
    let rules = synced.expect("m.push_rules arrived in the first sync").deserialize().expect("a ruleset").global;
    assert!(rules.override_.iter().any(|rule| rule.rule_id == ".m.rule.is_user_mention"));

    let mention = json!({ "msgtype": "m.text", "body": "hi", "m.mentions": { "user_ids": [server.user_id("bob")] } });
    send(http, &alice, &room, "s1", mention).await;
    client.sync_once(SyncSettings::default()).await.expect("second sync");
    let room_id = matrix_sdk::ruma::RoomId::parse(&room).unwrap();
    let joined = client.get_room(&room_id).expect("bob's room");
    let unread = joined.unread_notification_counts();
    assert_eq!((unread.notification_count, unread.highlight_count), (1, 1));
    server.stop().await;
}

/// A push gateway on loopback: every `POST /_matrix/push/v1/notify` body arrives on the channel;
/// the first `failures` requests are answered 500, as a gateway that is down.
async fn test_gateway(failures: usize) -> (String, tokio::sync::mpsc::UnboundedReceiver<Value>) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::http::StatusCode;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let seen = Arc::new(AtomicUsize::new(0));
    let app = axum::Router::new().route(
        "/_matrix/push/v1/notify",
        axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
            let (tx, seen) = (tx.clone(), seen.clone());
            async move {
                if seen.fetch_add(1, Ordering::SeqCst) < failures {
                    return (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(json!({})));
                }
                let _ = tx.send(body);
                (StatusCode::OK, axum::Json(json!({ "rejected": [] })))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the gateway");
    let url = format!("http://{}/_matrix/push/v1/notify", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, rx)
}

async fn next_push(pushes: &mut tokio::sync::mpsc::UnboundedReceiver<Value>) -> Value {
    tokio::time::timeout(std::time::Duration::from_secs(60), pushes.recv())
        .await
        .expect("a push arrives")
        .expect("open")
}

fn http_pusher(url: &str, pushkey: &str, format: Option<&str>) -> Value {
    let mut data = json!({ "url": url });
    if let Some(format) = format {
        data["format"] = json!(format);
    }
    json!({
        "kind": "http", "app_id": "org.example.app", "pushkey": pushkey, "app_display_name": "Example",
        "device_display_name": "phone", "lang": "en", "data": data,
    })
}

async fn push_server() -> TestServer {
    TestServer::start_with(|config| config.push.allow_insecure_gateways = true).await
}

#[tokio::test]
async fn a_pusher_gets_the_notification_at_its_gateway_in_its_format() {
    let server = push_server().await;
    let http = &server.http;
    let (alice, bob, carol, room) = three_in_a_room(&server).await;
    let (url, mut pushes) = test_gateway(0).await;
    // Evaluated for bob and carol while they have no pusher: the server's memory of their
    // pushers must not outlive the pushers set below.
    send(http, &alice, &room, "p0", json!({ "msgtype": "m.text", "body": "before any pusher" })).await;
    let set = "/_matrix/client/v3/pushers/set";
    assert_eq!(http.post(set, Some(&bob), &http_pusher(&url, "bob-key", None)).await.0, 200);
    assert_eq!(http.post(set, Some(&carol), &http_pusher(&url, "carol-key", Some("event_id_only"))).await.0, 200);
    let (_, listed) = http.get("/_matrix/client/v3/pushers", Some(&bob)).await;
    assert_eq!(listed["pushers"].as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed["pushers"][0]["pushkey"], "bob-key");
    assert_eq!(listed["pushers"][0]["data"]["url"], url);

    let mention = json!({ "msgtype": "m.text", "body": "ping", "m.mentions": { "user_ids": [server.user_id("bob")] } });
    let event = send(http, &alice, &room, "p1", mention).await;
    let mut by_key = std::collections::HashMap::new();
    for _ in 0..2 {
        let push = next_push(&mut pushes).await;
        let key = push["notification"]["devices"][0]["pushkey"].as_str().unwrap().to_owned();
        by_key.insert(key, push["notification"].clone());
    }
    let to_bob = &by_key["bob-key"];
    assert_eq!((to_bob["event_id"].as_str(), to_bob["room_id"].as_str()), (Some(event.as_str()), Some(room.as_str())));
    assert_eq!((to_bob["type"].clone(), to_bob["content"]["body"].clone()), (json!("m.room.message"), json!("ping")));
    assert_eq!(to_bob["sender"], server.user_id("alice"));
    assert_eq!(to_bob["devices"][0]["tweaks"]["highlight"], true, "{to_bob}");
    assert_eq!(to_bob["devices"][0]["data"].get("url"), None, "the gateway URL is not sent to the gateway");
    let to_carol = &by_key["carol-key"];
    assert_eq!(to_carol["event_id"], event);
    assert_eq!((to_carol.get("content"), to_carol.get("sender")), (None, None), "event_id_only: {to_carol}");

    // Deleted with `kind: null`: no more pushes for bob.
    let delete = json!({ "kind": null, "app_id": "org.example.app", "pushkey": "bob-key" });
    assert_eq!(http.post(set, Some(&bob), &delete).await.0, 200);
    assert_eq!(http.get("/_matrix/client/v3/pushers", Some(&bob)).await.1["pushers"], json!([]));
    send(http, &alice, &room, "p2", json!({ "msgtype": "m.text", "body": "again" })).await;
    let push = next_push(&mut pushes).await;
    assert_eq!(push["notification"]["devices"][0]["pushkey"], "carol-key", "only carol's pusher is left: {push}");
    server.stop().await;
}

#[tokio::test]
async fn a_push_is_retried_after_the_gateway_was_down() {
    let server = push_server().await;
    let http = &server.http;
    let (alice, bob, _carol, room) = three_in_a_room(&server).await;
    let (url, mut pushes) = test_gateway(2).await;
    assert_eq!(http.post("/_matrix/client/v3/pushers/set", Some(&bob), &http_pusher(&url, "k", None)).await.0, 200);
    let event = send(http, &alice, &room, "r1", json!({ "msgtype": "m.text", "body": "are you there" })).await;
    let push = next_push(&mut pushes).await;
    assert_eq!(push["notification"]["event_id"], event, "delivered on the third attempt");
    server.stop().await;
}

#[tokio::test]
async fn pushers_are_the_callers_and_bad_ones_are_refused() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let bob = server.register("bob", "pw").await;
    let set = "/_matrix/client/v3/pushers/set";
    let insecure = http_pusher("http://127.0.0.1:9/_matrix/push/v1/notify", "k", None);
    assert_error(&http.post(set, Some(&alice), &insecure).await, 400, "M_INVALID_PARAM");
    let wrong_path = http_pusher("https://push.example.org/notify", "k", None);
    assert_error(&http.post(set, Some(&alice), &wrong_path).await, 400, "M_INVALID_PARAM");
    let mut email = http_pusher("https://push.example.org/_matrix/push/v1/notify", "k", None);
    email["kind"] = json!("email");
    assert_error(&http.post(set, Some(&alice), &email).await, 400, "M_INVALID_PARAM");
    let no_data = json!({ "kind": "http", "app_id": "a", "pushkey": "k", "app_display_name": "A", "device_display_name": "d", "lang": "en" });
    assert_error(&http.post(set, Some(&alice), &no_data).await, 400, "M_BAD_JSON");
    let long_key = http_pusher("https://push.example.org/_matrix/push/v1/notify", &"k".repeat(513), None);
    assert_error(&http.post(set, Some(&alice), &long_key).await, 400, "M_INVALID_PARAM");

    let good = http_pusher("https://push.example.org/_matrix/push/v1/notify", "shared", None);
    assert_eq!(http.post(set, Some(&alice), &good).await.0, 200);
    assert_eq!(
        http.get("/_matrix/client/v3/pushers", Some(&bob)).await.1["pushers"],
        json!([]),
        "alice's pusher is hers"
    );
    // Bob registers the same app_id + pushkey without `append`: the key moves to bob.
    assert_eq!(http.post(set, Some(&bob), &good).await.0, 200);
    assert_eq!(http.get("/_matrix/client/v3/pushers", Some(&alice)).await.1["pushers"], json!([]));
    let mut appended = good.clone();
    appended["append"] = json!(true);
    assert_eq!(http.post(set, Some(&alice), &appended).await.0, 200);
    assert_eq!(http.get("/_matrix/client/v3/pushers", Some(&bob)).await.1["pushers"].as_array().unwrap().len(), 1);
    assert_eq!(http.get("/_matrix/client/v3/pushers", Some(&alice)).await.1["pushers"].as_array().unwrap().len(), 1);
    server.stop().await;
}

/// Evaluation keeps each room's members and each user's rules between events: a member who
/// joins later is notified, a new display name is the one matched, and a changed rule applies
/// at once.
#[tokio::test]
async fn members_names_and_rules_that_change_between_messages_are_the_ones_evaluated() {
    let server = TestServer::start().await;
    let http = &server.http;
    let (alice, bob, _carol, room) = three_in_a_room(&server).await;
    let by_name = json!({
        "conditions": [{ "kind": "contains_display_name" }],
        "actions": ["notify", { "set_tweak": "highlight" }],
    });
    assert_eq!(http.put(&format!("{RULES}/override/by_name"), Some(&bob), &by_name).await.0, 200);
    send(http, &alice, &room, "n1", json!({ "msgtype": "m.text", "body": "warming up" })).await;
    assert_eq!(counts(http, &bob, &room).await, (1, 0));

    let dave = server.register("dave", "pw").await;
    assert_eq!(http.post(&format!("/_matrix/client/v3/join/{room}"), Some(&dave), &json!({})).await.0, 200);
    send(http, &alice, &room, "n2", json!({ "msgtype": "m.text", "body": "hello all" })).await;
    assert_eq!(counts(http, &dave, &room).await, (1, 0), "a member who joined after the first message");

    let profile = format!("/_matrix/client/v3/profile/{}/displayname", server.user_id("bob"));
    assert_eq!(http.put(&profile, Some(&bob), &json!({ "displayname": "Bartholomew" })).await.0, 200);
    send(http, &alice, &room, "n3", json!({ "msgtype": "m.text", "body": "thanks Bartholomew" })).await;
    assert_eq!(counts(http, &bob, &room).await, (3, 1), "the new display name highlights");

    let delete = http.request(Method::DELETE, &format!("{RULES}/override/by_name"), Some(&bob), None).await;
    assert_eq!(delete.0, 200);
    send(http, &alice, &room, "n4", json!({ "msgtype": "m.text", "body": "Bartholomew again" })).await;
    assert_eq!(counts(http, &bob, &room).await, (4, 1), "the deleted rule no longer highlights");
    server.stop().await;
}

/// A message to members with the default rules is one shared notification (issue #10); it must
/// still leave out everyone it must not count for: its sender, a member who silenced the room,
/// a member who joined after it (in counts and in `/notifications`), and a member's display-name
/// change must not read what they had unread. A member it mentions is highlighted alone.
#[tokio::test]
async fn a_shared_notification_counts_for_exactly_the_members_it_notified() {
    let server = TestServer::start().await;
    let http = &server.http;
    let (alice, bob, carol, room) = three_in_a_room(&server).await;
    let dave = server.register("dave", "pw").await;
    assert_eq!(http.post(&format!("/_matrix/client/v3/join/{room}"), Some(&dave), &json!({})).await.0, 200);
    let quiet = json!({ "actions": [] });
    assert_eq!(http.put(&format!("{RULES}/room/{room}"), Some(&carol), &quiet).await.0, 200);

    let hello = send(http, &alice, &room, "s1", json!({ "msgtype": "m.text", "body": "hello all" })).await;
    assert_eq!(counts(http, &bob, &room).await, (1, 0));
    assert_eq!(counts(http, &dave, &room).await, (1, 0));
    assert_eq!(counts(http, &carol, &room).await, (0, 0), "carol silenced the room");
    assert_eq!(counts(http, &alice, &room).await, (0, 0), "alice's own message");

    let mention =
        json!({ "msgtype": "m.text", "body": "over to you", "m.mentions": { "user_ids": [server.user_id("dave")] } });
    let named = send(http, &alice, &room, "s2", mention).await;
    assert_eq!(counts(http, &dave, &room).await, (2, 1), "the mention highlights for dave");
    assert_eq!(counts(http, &bob, &room).await, (2, 0), "and for nobody else");

    let profile = format!("/_matrix/client/v3/profile/{}/displayname", server.user_id("bob"));
    assert_eq!(http.put(&profile, Some(&bob), &json!({ "displayname": "Robert" })).await.0, 200);
    assert_eq!(counts(http, &bob, &room).await, (2, 0), "a display-name change reads nothing");

    let erin = server.register("erin", "pw").await;
    assert_eq!(http.post(&format!("/_matrix/client/v3/join/{room}"), Some(&erin), &json!({})).await.0, 200);
    assert_eq!(counts(http, &erin, &room).await, (0, 0), "nothing from before erin joined");
    assert_eq!(notified_event_ids(http, &erin).await, Vec::<String>::new());
    let after = send(http, &alice, &room, "s3", json!({ "msgtype": "m.text", "body": "welcome" })).await;
    assert_eq!(counts(http, &erin, &room).await, (1, 0));
    assert_eq!(notified_event_ids(http, &erin).await, std::slice::from_ref(&after));

    assert_eq!(notified_event_ids(http, &bob).await, [after.clone(), named.clone(), hello.clone()]);
    assert_eq!(notified_event_ids(http, &carol).await, Vec::<String>::new(), "carol was notified of nothing");
    assert_eq!(notified_event_ids(http, &alice).await, Vec::<String>::new(), "alice of nothing");
    let (_, highlights) = http.get("/_matrix/client/v3/notifications?only=highlight", Some(&dave)).await;
    let highlighted: Vec<&Value> = highlights["notifications"].as_array().unwrap().iter().collect();
    assert_eq!(highlighted.len(), 1, "{highlights}");
    assert_eq!(highlighted[0]["event"]["event_id"], named);

    // A receipt reads the shared rows for its reader only.
    receipt(http, &bob, &room, &after, json!({})).await;
    assert_eq!(counts(http, &bob, &room).await, (0, 0));
    assert_eq!(counts(http, &dave, &room).await, (3, 1));
    server.stop().await;
}

/// Sets the user's `m.ignored_user_list` to `ignored`.
async fn ignore(server: &TestServer, token: &str, user: &str, ignored: &[&str]) {
    let users: serde_json::Map<String, Value> = ignored.iter().map(|u| (server.user_id(u), json!({}))).collect();
    let path = format!("/_matrix/client/v3/user/{}/account_data/m.ignored_user_list", server.user_id(user));
    let (status, body) = server.http.put(&path, Some(token), &json!({ "ignored_users": users })).await;
    assert_eq!(status, 200, "{body}");
}

async fn notified_event_ids(http: &Http, token: &str) -> Vec<String> {
    let (status, listed) = http.get("/_matrix/client/v3/notifications", Some(token)).await;
    assert_eq!(status, 200, "{listed}");
    listed["notifications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["event"]["event_id"].as_str().unwrap().to_owned())
        .collect()
}

/// What bob sends while alice ignores him neither counts for her, nor is listed, nor pushed;
/// once she no longer ignores him, his later events notify her again.
#[tokio::test]
async fn an_ignored_sender_never_notifies_and_notifies_again_once_unignored() {
    let server = push_server().await;
    let http = &server.http;
    let (alice, bob, carol, room) = three_in_a_room(&server).await;
    let (url, mut pushes) = test_gateway(0).await;
    assert_eq!(http.post("/_matrix/client/v3/pushers/set", Some(&alice), &http_pusher(&url, "a", None)).await.0, 200);
    let mention = |body: &str| json!({ "msgtype": "m.text", "body": body, "m.mentions": { "user_ids": [server.user_id("alice")] } });

    // Before: bob's mention notifies (and alice's evaluation state is warm).
    let before = send(http, &bob, &room, "b0", mention("before")).await;
    assert_eq!(next_push(&mut pushes).await["notification"]["event_id"], before);
    assert_eq!(counts(http, &alice, &room).await, (1, 1));

    ignore(&server, &alice, "alice", &["bob"]).await;
    let ignored = send(http, &bob, &room, "b1", mention("ignored")).await;
    let reply = json!({ "msgtype": "m.text", "body": "ignored too", "m.relates_to": { "rel_type": "m.thread", "event_id": before } });
    send(http, &bob, &room, "b2", reply).await;
    let from_carol = send(http, &carol, &room, "c1", json!({ "msgtype": "m.text", "body": "hello" })).await;
    // Pushes go out in event order: the first after bob's is carol's, so his were never queued.
    assert_eq!(next_push(&mut pushes).await["notification"]["event_id"], from_carol, "bob's events are not pushed");
    assert_eq!(counts(http, &alice, &room).await, (2, 1), "bob's mention and thread reply do not count");
    let filter = r#"{"room":{"timeline":{"unread_thread_notifications":true}}}"#;
    let threaded = sync(http, &alice, &format!("filter={}", urlencode(filter))).await;
    assert_eq!(threaded["rooms"]["join"][&room]["unread_thread_notifications"], json!({}), "{threaded}");
    let listed = notified_event_ids(http, &alice).await;
    assert_eq!(listed, [from_carol.clone(), before.clone()]);
    assert!(!listed.contains(&ignored));
    assert_eq!(counts(http, &carol, &room).await, (3, 0), "carol ignores nobody: bob's message counts for her");

    ignore(&server, &alice, "alice", &[]).await;
    let after = send(http, &bob, &room, "b3", mention("after")).await;
    let push = next_push(&mut pushes).await;
    assert_eq!(push["notification"]["event_id"], after, "bob notifies alice again");
    assert_eq!(counts(http, &alice, &room).await, (3, 2));
    assert_eq!(notified_event_ids(http, &alice).await, [after, from_carol, before]);
    server.stop().await;
}

/// The pushes of two rooms, to bob's pushers in both formats: `(full, event_id_only)`.
async fn pushes_to_both(pushes: &mut tokio::sync::mpsc::UnboundedReceiver<Value>) -> (Value, Value) {
    let mut by_key = std::collections::HashMap::new();
    for _ in 0..2 {
        let push = next_push(pushes).await;
        let key = push["notification"]["devices"][0]["pushkey"].as_str().unwrap().to_owned();
        assert!(by_key.insert(key, push["notification"].clone()).is_none(), "one push per pusher: {push}");
    }
    (by_key.remove("full").unwrap(), by_key.remove("ids").unwrap())
}

/// `counts.unread` of both pushes of an event, which must be the same.
fn unread_of(full: &Value, ids: &Value) -> Option<u64> {
    assert_eq!(full["counts"], ids["counts"], "event_id_only keeps the counts");
    full["counts"].get("unread").map(|unread| unread.as_u64().expect("a number"))
}

#[tokio::test]
async fn pushes_carry_the_number_of_unread_rooms_and_receipts_send_the_lower_count() {
    let server = push_server().await;
    let http = &server.http;
    let (alice, bob, _carol, first) = three_in_a_room(&server).await;
    let second = create_room(http, &alice, json!({ "preset": "public_chat" })).await;
    assert_eq!(http.post(&format!("/_matrix/client/v3/join/{second}"), Some(&bob), &json!({})).await.0, 200);
    let (url, mut pushes) = test_gateway(0).await;
    let set = "/_matrix/client/v3/pushers/set";
    assert_eq!(http.post(set, Some(&bob), &http_pusher(&url, "full", None)).await.0, 200);
    assert_eq!(http.post(set, Some(&bob), &http_pusher(&url, "ids", Some("event_id_only"))).await.0, 200);
    let text = |body: &str| json!({ "msgtype": "m.text", "body": body });

    let m1 = send(http, &alice, &first, "m1", text("one")).await;
    let (full, ids) = pushes_to_both(&mut pushes).await;
    assert_eq!((full["event_id"].as_str(), ids["event_id"].as_str()), (Some(m1.as_str()), Some(m1.as_str())));
    assert_eq!(ids["room_id"], first);
    assert_eq!((ids.get("sender"), ids.get("content")), (None, None), "{ids}");
    assert_eq!(unread_of(&full, &ids), Some(1));
    let m2 = send(http, &alice, &first, "m2", text("two")).await;
    let (full, ids) = pushes_to_both(&mut pushes).await;
    assert_eq!((full["event_id"].as_str(), unread_of(&full, &ids)), (Some(m2.as_str()), Some(1)), "still one room");
    let m3 = send(http, &alice, &second, "m3", text("three")).await;
    let (full, ids) = pushes_to_both(&mut pushes).await;
    assert_eq!(full["event_id"], m3);
    assert_eq!(unread_of(&full, &ids), Some(2), "two rooms have unread notifications");

    // Reading the first room sends the lower count alone, naming no event.
    receipt(http, &bob, &first, &m2, json!({})).await;
    let (full, ids) = pushes_to_both(&mut pushes).await;
    assert_eq!((full.get("event_id"), full.get("room_id"), full.get("content")), (None, None, None), "{full}");
    assert_eq!(unread_of(&full, &ids), Some(1));
    receipt(http, &bob, &second, &m3, json!({})).await;
    let (full, ids) = pushes_to_both(&mut pushes).await;
    assert_eq!(unread_of(&full, &ids), Some(0), "a counts-only push carries the zero that clears a badge");
    // A receipt that reads nothing new sends nothing: the next push is the next event's.
    receipt(http, &bob, &first, &m1, json!({})).await;
    let m4 = send(http, &alice, &first, "m4", text("four")).await;
    let (full, ids) = pushes_to_both(&mut pushes).await;
    assert_eq!(full["event_id"], m4, "{full}");
    assert_eq!(unread_of(&full, &ids), Some(1));

    // A room bob leaves no longer counts.
    let m5 = send(http, &alice, &second, "m5", text("five")).await;
    let (full, ids) = pushes_to_both(&mut pushes).await;
    assert_eq!((full["event_id"].as_str(), unread_of(&full, &ids)), (Some(m5.as_str()), Some(2)));
    assert_eq!(http.post(&format!("/_matrix/client/v3/rooms/{second}/leave"), Some(&bob), &json!({})).await.0, 200);
    send(http, &alice, &first, "m6", text("six")).await;
    let (full, ids) = pushes_to_both(&mut pushes).await;
    assert_eq!(unread_of(&full, &ids), Some(1), "only the first room: {full}");
    server.stop().await;
}

#[tokio::test]
async fn with_badge_counts_messages_pushes_count_unread_messages() {
    let server = TestServer::start_with(|config| {
        config.push.allow_insecure_gateways = true;
        config.push.badge_counts_messages = true;
    })
    .await;
    let http = &server.http;
    let (alice, bob, _carol, room) = three_in_a_room(&server).await;
    let (url, mut pushes) = test_gateway(0).await;
    assert_eq!(http.post("/_matrix/client/v3/pushers/set", Some(&bob), &http_pusher(&url, "k", None)).await.0, 200);
    for (txn, expected) in [("w1", 1), ("w2", 2), ("w3", 3)] {
        send(http, &alice, &room, txn, json!({ "msgtype": "m.text", "body": txn })).await;
        assert_eq!(next_push(&mut pushes).await["notification"]["counts"]["unread"], expected);
    }
    server.stop().await;
}
