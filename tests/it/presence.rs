//! Presence (issue #12): who may read and set it, `/sync`'s `presence` section and its
//! filter, long-poll wake-ups, persistence across a restart, the off switch, and `m.presence`
//! EDUs between two Lattice servers (forged ones dropped).

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::federation_keys::Network;
use crate::federation_rooms::{shared_room, signed_request};
use crate::support::{Http, TestServer, assert_error, create_room, register, sync, test_config, urlencode};

/// The `m.presence` events of a sync response for `user`.
fn presence_of<'a>(sync: &'a Value, user: &str) -> Vec<&'a Value> {
    let events = sync["presence"]["events"].as_array().map(Vec::as_slice).unwrap_or_default();
    events.iter().filter(|event| event["sender"] == user && event["type"] == "m.presence").collect()
}

/// An offline timeout no test reaches, so users who set their presence and do not sync stay as
/// they set it however slowly the test runs (the timeouts themselves are unit-tested).
const LONG: &str = "1h";

fn status_path(user: &str) -> String {
    format!("/_matrix/client/v3/presence/{user}/status")
}

/// alice's public room, which bob joins; carol shares no room with either.
async fn alice_bob_and_carol(server: &TestServer) -> (String, String, String, String) {
    let alice = server.register("alice", "pw").await;
    let bob = server.register("bob", "pw").await;
    let carol = server.register("carol", "pw").await;
    let room = create_room(&server.http, &alice, json!({ "preset": "public_chat" })).await;
    let (status, body) = server.http.post(&format!("/_matrix/client/v3/join/{room}"), Some(&bob), &json!({})).await;
    assert_eq!(status, 200, "{body}");
    (alice, bob, carol, room)
}

#[tokio::test]
async fn presence_is_shared_with_room_mates_only_and_set_only_by_its_user() {
    let server = TestServer::start_with(|config| config.presence.offline_timeout = LONG.into()).await;
    let (alice, bob, carol, _room) = alice_bob_and_carol(&server).await;
    let (alice_id, bob_id) = (server.user_id("alice"), server.user_id("bob"));
    let http = &server.http;

    // bob's first sync brings him online; he sees himself.
    let first = sync(http, &bob, "timeout=0").await;
    let own = presence_of(&first, &bob_id);
    assert_eq!(own.len(), 1, "{first}");
    assert_eq!(
        (&own[0]["content"]["presence"], &own[0]["content"]["currently_active"]),
        (&json!("online"), &json!(true))
    );
    let since = first["next_batch"].as_str().unwrap().to_owned();

    let (status, body) = http
        .put(&status_path(&alice_id), Some(&alice), &json!({ "presence": "unavailable", "status_msg": "in a meeting" }))
        .await;
    assert_eq!(status, 200, "{body}");

    // bob, sharing a room, sees the change once, in /sync and through GET.
    let next = sync(http, &bob, &format!("since={since}&timeout=0")).await;
    let seen = presence_of(&next, &alice_id);
    assert_eq!(seen.len(), 1, "{next}");
    assert_eq!(seen[0]["content"]["presence"], "unavailable");
    assert_eq!(seen[0]["content"]["status_msg"], "in a meeting");
    assert_eq!(seen[0]["content"]["currently_active"], false);
    assert!(presence_of(&next, &bob_id).is_empty(), "bob's own state did not change: {next}");
    let again = sync(http, &bob, &format!("since={}&timeout=0", next["next_batch"].as_str().unwrap())).await;
    assert!(presence_of(&again, &alice_id).is_empty(), "delivered once: {again}");
    let (status, got) = http.get(&status_path(&alice_id), Some(&bob)).await;
    assert_eq!(status, 200, "{got}");
    assert_eq!((&got["presence"], &got["status_msg"]), (&json!("unavailable"), &json!("in a meeting")));
    let (status, own) = http.get(&status_path(&alice_id), Some(&alice)).await;
    assert_eq!((status.as_u16(), &own["presence"]), (200, &json!("unavailable")));

    // carol shares no room: 403, and nothing in her sync.
    assert_error(&http.get(&status_path(&alice_id), Some(&carol)).await, 403, "M_FORBIDDEN");
    let carols = sync(http, &carol, "timeout=0").await;
    assert!(presence_of(&carols, &alice_id).is_empty() && presence_of(&carols, &bob_id).is_empty(), "{carols}");
    assert_eq!(presence_of(&carols, &server.user_id("carol")).len(), 1, "carol sees herself: {carols}");

    // Only one's own presence can be set, and only to the spec's values.
    let bobs_path = status_path(&bob_id);
    assert_error(&http.put(&bobs_path, Some(&alice), &json!({ "presence": "offline" })).await, 403, "M_FORBIDDEN");
    let alices_path = status_path(&alice_id);
    for (body, errcode) in [
        (json!({ "presence": "busy" }), "M_INVALID_PARAM"),
        (json!({ "presence": 5 }), "M_BAD_JSON"),
        (json!({ "status_msg": "no state" }), "M_BAD_JSON"),
        (json!({ "presence": "online", "status_msg": "x".repeat(1025) }), "M_INVALID_PARAM"),
    ] {
        assert_error(&http.put(&alices_path, Some(&alice), &body).await, 400, errcode);
    }
    assert_error(&http.get(&status_path("@nobody:hs1.localhost"), Some(&bob)).await, 404, "M_NOT_FOUND");
    assert_error(&http.get("/_matrix/client/v3/sync?set_presence=busy", Some(&bob)).await, 400, "M_INVALID_PARAM");
    let (_, unchanged) = http.get(&status_path(&alice_id), Some(&bob)).await;
    assert_eq!(unchanged["status_msg"], "in a meeting", "refused requests changed nothing: {unchanged}");

    // The presence filter: types, senders and limit.
    let (status, _) = http.put(&status_path(&alice_id), Some(&alice), &json!({ "presence": "online" })).await;
    assert_eq!(status, 200);
    let filtered = |filter: Value| format!("since={since}&timeout=0&filter={}", urlencode(&filter.to_string()));
    let all = sync(http, &bob, &filtered(json!({}))).await;
    assert_eq!(presence_of(&all, &alice_id).len(), 1, "{all}");
    assert_eq!(all["presence"]["events"].as_array().unwrap().len(), 1, "{all}");
    for filter in [
        json!({ "presence": { "not_types": ["m.presence"] } }),
        json!({ "presence": { "types": ["m.room.*"] } }),
        json!({ "presence": { "not_senders": [alice_id] } }),
        json!({ "presence": { "senders": [bob_id] } }),
        json!({ "presence": { "limit": 0 } }),
    ] {
        let response = sync(http, &bob, &filtered(filter.clone())).await;
        assert!(presence_of(&response, &alice_id).is_empty(), "{filter}: {response}");
    }
    let narrowed_filter = json!({ "presence": { "types": ["m.*"], "senders": [alice_id], "limit": 1 } });
    let narrowed = sync(http, &bob, &filtered(narrowed_filter)).await;
    assert_eq!(presence_of(&narrowed, &alice_id)[0]["content"]["presence"], "online", "{narrowed}");

    server.stop().await;
}

#[tokio::test]
async fn a_change_wakes_the_long_poll_of_a_room_mate_but_not_of_a_stranger() {
    let server = TestServer::start_with(|config| config.presence.offline_timeout = LONG.into()).await;
    let (alice, bob, carol, _room) = alice_bob_and_carol(&server).await;
    let alice_id = server.user_id("alice");
    let next_batch = |sync: &Value| sync["next_batch"].as_str().unwrap().to_owned();
    let bob_since = next_batch(&sync(&server.http, &bob, "timeout=0").await);
    let carol_since = next_batch(&sync(&server.http, &carol, "timeout=0").await);

    let bob_waits = {
        let http = server.http.clone();
        tokio::spawn(async move { sync(&http, &bob, &format!("since={bob_since}&timeout=30000")).await })
    };
    let carol_waits = {
        let http = server.http.clone();
        tokio::spawn(async move { sync(&http, &carol, &format!("since={carol_since}&timeout=2000")).await })
    };
    server.until_sync_waiters(2).await;
    let (status, body) = server
        .http
        .put(&status_path(&alice_id), Some(&alice), &json!({ "presence": "online", "status_msg": "back" }))
        .await;
    assert_eq!(status, 200, "{body}");

    let bobs = bob_waits.await.unwrap();
    let seen = presence_of(&bobs, &alice_id);
    assert_eq!(seen.len(), 1, "bob's long-poll returned with alice's change: {bobs}");
    assert_eq!(seen[0]["content"]["status_msg"], "back");
    // carol's long-poll ran to its timeout and came back empty.
    let carols = carol_waits.await.unwrap();
    assert_eq!(carols["presence"]["events"], json!([]), "{carols}");
    assert_eq!(carols["rooms"]["join"], json!({}), "{carols}");

    server.stop().await;
}

// Several worker threads, as in the binary, so the stopped server's tasks end on other threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_message_and_state_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), "hs1.localhost");
    config.presence.offline_timeout = LONG.into();
    let running = lattice::start(config.clone()).await.unwrap();
    let http = Http::new(format!("http://{}", running.address));
    let token = running.first_registration_token.clone().unwrap();
    let login = |name: &'static str| {
        let (http, token) = (http.clone(), token.clone());
        async move { register(&http, name, "pw", &token).await["access_token"].as_str().unwrap().to_owned() }
    };
    let (alice, bob) = (login("alice").await, login("bob").await);
    let room = create_room(&http, &alice, json!({ "preset": "public_chat" })).await;
    let (status, _) = http.post(&format!("/_matrix/client/v3/join/{room}"), Some(&bob), &json!({})).await;
    assert_eq!(status, 200);
    let body = json!({ "presence": "unavailable", "status_msg": "on holiday" });
    let (status, _) = http.put(&status_path("@alice:hs1.localhost"), Some(&alice), &body).await;
    assert_eq!(status, 200);
    running.stop().await.unwrap();

    let restarted = lattice::start(config).await.unwrap();
    let http = Http::new(format!("http://{}", restarted.address));
    let (status, got) = http.get(&status_path("@alice:hs1.localhost"), Some(&bob)).await;
    assert_eq!(status, 200, "{got}");
    assert_eq!((&got["presence"], &got["status_msg"]), (&json!("unavailable"), &json!("on holiday")));
    let first = sync(&http, &bob, "timeout=0&set_presence=offline").await;
    let seen = presence_of(&first, "@alice:hs1.localhost");
    assert_eq!(seen.len(), 1, "an initial sync after the restart shows it: {first}");
    assert_eq!(seen[0]["content"]["status_msg"], "on holiday");
    restarted.stop().await.unwrap();
}

#[tokio::test]
async fn with_presence_off_nothing_is_tracked_or_shown() {
    let server = TestServer::start_with(|config| config.presence.enabled = false).await;
    let (alice, bob, _carol, _room) = alice_bob_and_carol(&server).await;
    let alice_id = server.user_id("alice");
    let first = sync(&server.http, &bob, "timeout=0").await;
    assert_eq!(first["presence"]["events"], json!([]), "{first}");
    let refused = server.http.put(&status_path(&alice_id), Some(&alice), &json!({ "presence": "online" })).await;
    assert_error(&refused, 403, "M_FORBIDDEN");
    sync(&server.http, &alice, "timeout=0").await;
    let (status, got) = server.http.get(&status_path(&alice_id), Some(&bob)).await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["presence"], "offline", "alice's sync did not bring her online: {got}");
    let since = first["next_batch"].as_str().unwrap();
    let next = sync(&server.http, &bob, &format!("since={since}&timeout=0")).await;
    assert_eq!(next["presence"]["events"], json!([]), "{next}");
    server.stop().await;
}

/// Syncs `token` on `http` (incrementally) until `user`'s presence shows `found`, or fails
/// after 30 seconds.
async fn presence_until(http: &Http, token: &str, user: &str, found: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut since: Option<String> = None;
    loop {
        let query = match &since {
            Some(since) => format!("since={since}&timeout=1000"),
            None => "timeout=0".to_owned(),
        };
        let body = sync(http, token, &query).await;
        if let Some(event) = presence_of(&body, user).into_iter().find(|event| found(&event["content"])) {
            return event.clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {user}'s presence");
        since = body["next_batch"].as_str().map(str::to_owned);
    }
}

#[tokio::test]
async fn presence_crosses_to_room_mates_on_another_server_and_forged_updates_are_dropped() {
    let net = Network::new(&["lat1.test", "lat2.test", "lat3.test"]);
    let mut lat1 = net.start_with("lat1.test", |config| config.presence.offline_timeout = LONG.into()).await;
    let mut lat2 = net.start_with("lat2.test", |config| config.presence.offline_timeout = LONG.into()).await;
    let mut lat3 = net.start("lat3.test").await;
    let (alice, bob, _room) = shared_room(&net, &lat1, &lat2).await;
    let (alice_id, bob_id) = ("@alice:lat1.test", "@bob:lat2.test");

    // alice's change on lat1 reaches bob's sync on lat2 through an m.presence EDU.
    let body = json!({ "presence": "unavailable", "status_msg": "from lat1" });
    let (status, _) = lat1.http.put(&status_path(alice_id), Some(&alice), &body).await;
    assert_eq!(status, 200);
    let seen = presence_until(&lat2.http, &bob, alice_id, |content| content["status_msg"] == "from lat1").await;
    assert_eq!(seen["content"]["presence"], "unavailable", "{seen}");
    let (status, got) = lat2.http.get(&status_path(alice_id), Some(&bob)).await;
    assert_eq!((status.as_u16(), &got["status_msg"]), (200, &json!("from lat1")), "{got}");

    // bob synced on lat2, so lat2 told lat1 he is online; wait for that, so no later update of
    // lat2's own overtakes the ones below.
    presence_until(&lat1.http, &alice, bob_id, |content| content["presence"] == "online").await;
    // An update signed by lat2 for its own user who shares the room is taken (the control)...
    let edu = |txn: &str, origin: &str, user: &str, status_msg: &str| {
        let push = json!({ "user_id": user, "presence": "online", "last_active_ago": 10, "status_msg": status_msg });
        let body = json!({ "origin": origin, "origin_server_ts": 1, "pdus": [], "edus": [
            { "edu_type": "m.presence", "content": { "push": [push] } }
        ] });
        (format!("/_matrix/federation/v1/send/{txn}"), body)
    };
    let key2 = lat2.signing_key();
    let (path, body) = edu("presence-control", "lat2.test", bob_id, "direct from lat2");
    let answer = signed_request(&net, ("lat2.test", &key2), Method::PUT, &path, Some(body)).await;
    assert_eq!(answer.0, 200, "{answer:?}");
    presence_until(&lat1.http, &alice, bob_id, |content| content["status_msg"] == "direct from lat2").await;

    // ...one signed by lat3 for lat2's user is not, nor one of lat2's for a user sharing no
    // room with anyone on lat1 (who joins only afterwards).
    let key3 = lat3.signing_key();
    let (path, body) = edu("presence-forged", "lat3.test", bob_id, "forged by lat3");
    let answer = signed_request(&net, ("lat3.test", &key3), Method::PUT, &path, Some(body)).await;
    assert_eq!(answer.0, 200, "{answer:?}");
    let stranger = lat2.register_user("stranger").await;
    let (path, body) = edu("presence-stranger", "lat2.test", "@stranger:lat2.test", "before joining");
    let answer = signed_request(&net, ("lat2.test", &key2), Method::PUT, &path, Some(body)).await;
    assert_eq!(answer.0, 200, "{answer:?}");
    let (status, joined) =
        lat2.http.post("/_matrix/client/v3/join/%23chat:lat1.test", Some(&stranger), &json!({})).await;
    assert_eq!(status, 200, "{joined}");
    let (status, bobs) = lat1.http.get(&status_path(bob_id), Some(&alice)).await;
    assert_eq!(status, 200, "{bobs}");
    assert_ne!(bobs["status_msg"], "forged by lat3", "{bobs}");
    let everything = sync(&lat1.http, &alice, "timeout=0&set_presence=offline").await;
    assert!(!everything["presence"].to_string().contains("forged by lat3"), "{everything}");
    assert!(!everything["presence"].to_string().contains("before joining"), "{everything}");
    // lat2 is in the room, so the join is made there and reaches lat1 in a transaction.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let strangers = loop {
        let (status, strangers) = lat1.http.get(&status_path("@stranger:lat2.test"), Some(&alice)).await;
        if status == 200 {
            break strangers;
        }
        assert!(tokio::time::Instant::now() < deadline, "the stranger shares the room now: {strangers}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_ne!(strangers["status_msg"], "before joining", "{strangers}");

    lat3.stop().await;
    lat2.stop().await;
    lat1.stop().await;
}

#[tokio::test]
async fn matrix_sdk_sets_presence_and_a_room_mate_reads_it() {
    use matrix_sdk::Client;
    use matrix_sdk::ruma::api::client::presence::{get_presence, set_presence};
    use matrix_sdk::ruma::presence::PresenceState;

    let server = TestServer::start_with(|config| config.presence.offline_timeout = LONG.into()).await;
    let (_alice, _bob, _carol, _room) = alice_bob_and_carol(&server).await;
    let login = |name: &'static str| {
        let base = server.base_url().to_owned();
        async move {
            let client = Client::builder().homeserver_url(base).build().await.expect("client builds");
            client.matrix_auth().login_username(name, "pw").send().await.expect("login");
            client
        }
    };
    let (alice, bob) = (login("alice").await, login("bob").await);
    let alice_id = alice.user_id().expect("logged in").to_owned();
    let mut request = set_presence::v3::Request::new(alice_id.clone(), PresenceState::Unavailable);
    request.status_msg = Some("via the SDK".to_owned());
    alice.send(request).await.expect("presence set");
    let got = bob.send(get_presence::v3::Request::new(alice_id)).await.expect("presence read");
    assert_eq!(got.presence, PresenceState::Unavailable);
    assert_eq!(got.status_msg.as_deref(), Some("via the SDK"));
    assert_eq!(got.currently_active, Some(false));
    server.stop().await;
}
