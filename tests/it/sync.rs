//! `/sync` and `/messages` as a client uses them.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{Http, TestServer, assert_error, bodies, create_room, say, sync, urlencode};

#[tokio::test]
async fn initial_sync_is_limited_and_pagination_reaches_the_create_event() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let room = create_room(http, &alice, json!({ "name": "History" })).await;
    for i in 0..30 {
        say(http, &alice, &room, &format!("m{i:02}")).await;
    }
    let filter = urlencode(r#"{"room":{"timeline":{"limit":10}}}"#);
    let initial = sync(http, &alice, &format!("filter={filter}")).await;
    let joined = &initial["rooms"]["join"][&room];
    assert_eq!(bodies(&joined["timeline"]["events"]), (20..30).map(|i| format!("m{i:02}")).collect::<Vec<_>>());
    assert_eq!(joined["timeline"]["limited"], true);
    let state_types: Vec<&str> =
        joined["state"]["events"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert!(state_types.contains(&"m.room.create") && state_types.contains(&"m.room.name"), "{state_types:?}");

    // Page back from prev_batch until the room's first event; nothing is skipped or repeated.
    let mut from = joined["timeline"]["prev_batch"].as_str().unwrap().to_owned();
    let mut older = Vec::new();
    let mut types = Vec::new();
    for _ in 0..20 {
        let (status, page) = http
            .get(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=7&from={from}"), Some(&alice))
            .await;
        assert_eq!(status, 200, "{page}");
        older.extend(bodies(&page["chunk"]));
        types.extend(page["chunk"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap().to_owned()));
        match page["end"].as_str() {
            Some(end) => from = end.to_owned(),
            None => break,
        }
    }
    assert_eq!(older, (0..20).rev().map(|i| format!("m{i:02}")).collect::<Vec<_>>());
    assert_eq!(types.last().map(String::as_str), Some("m.room.create"));

    // Forward pagination from the start sees the same history in order.
    let (_, forward) =
        http.get(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=f&limit=100&from=s0"), Some(&alice)).await;
    assert_eq!(bodies(&forward["chunk"]).len(), 30);
    assert_error(&http.get("/_matrix/client/v3/sync?since=yesterday", Some(&alice)).await, 400, "M_INVALID_PARAM");
    assert_error(
        &http.get(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=x"), Some(&alice)).await,
        400,
        "M_INVALID_PARAM",
    );
    server.stop().await;
}

#[tokio::test]
async fn incremental_sync_waits_for_news_and_never_repeats_it() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let bob = server.register("bob", "pw").await;
    let room = create_room(http, &alice, json!({ "invite": [server.user_id("bob")] })).await;

    // bob sees the invite, joins, and then the room moves to his join section.
    let first = sync(http, &bob, "").await;
    assert!(
        first["rooms"]["invite"][&room]["invite_state"]["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["type"] == "m.room.member")
    );
    assert_eq!(http.post(&format!("/_matrix/client/v3/join/{room}"), Some(&bob), &json!({})).await.0, 200);
    let since = first["next_batch"].as_str().unwrap().to_owned();
    let joined = sync(http, &bob, &format!("since={since}")).await;
    assert!(joined["rooms"]["join"][&room].is_object(), "{joined}");
    let since = joined["next_batch"].as_str().unwrap().to_owned();

    // A long-poll returns as soon as alice speaks.
    let waiting = {
        let (http, bob, since) = (http.clone(), bob.clone(), since.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let body = sync(&http, &bob, &format!("since={since}&timeout=20000")).await;
            (body, started.elapsed())
        })
    };
    // The request is asleep in the server before alice speaks.
    server.until_sync_waiters(1).await;
    say(http, &alice, &room, "wake up").await;
    let (woken, _) = waiting.await.unwrap();
    assert_eq!(bodies(&woken["rooms"]["join"][&room]["timeline"]["events"]), ["wake up"]);

    // From that point, nothing new: an empty answer (and no repeat of "wake up").
    let next = woken["next_batch"].as_str().unwrap();
    let quiet = sync(http, &bob, &format!("since={next}&timeout=0")).await;
    assert_eq!(quiet["rooms"]["join"], json!({}));

    // Once kicked, bob learns it in his leave section and sees nothing after.
    let kick = json!({ "user_id": server.user_id("bob") });
    assert_eq!(http.post(&format!("/_matrix/client/v3/rooms/{room}/kick"), Some(&alice), &kick).await.0, 200);
    say(http, &alice, &room, "after bob left").await;
    let left = sync(http, &bob, &format!("since={next}")).await;
    let left_timeline = &left["rooms"]["leave"][&room]["timeline"]["events"];
    assert!(left_timeline.as_array().unwrap().iter().any(|e| e["content"]["membership"] == "leave"), "{left}");
    assert!(bodies(left_timeline).is_empty(), "nothing said after the kick reaches bob: {left}");
    // He may still read the history up to the kick, and nothing after it.
    let (status, history) = http.get(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b"), Some(&bob)).await;
    assert_eq!(status, 200, "{history}");
    assert!(bodies(&history["chunk"]).contains(&"wake up".to_owned()), "{history}");
    assert!(!bodies(&history["chunk"]).contains(&"after bob left".to_owned()), "{history}");
    server.stop().await;
}

/// Three senders write concurrently while a reader syncs incrementally: every message arrives
/// exactly once, whatever the interleaving.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_sends_are_synced_exactly_once() {
    const SENDERS: usize = 3;
    const EACH: usize = 40;
    let server = TestServer::start().await;
    let http = server.http.clone();
    let reader = server.register("reader", "pw").await;
    let room = create_room(&http, &reader, json!({ "preset": "public_chat" })).await;
    let mut writers = Vec::new();
    for w in 0..SENDERS {
        let token = server.register(&format!("writer{w}"), "pw").await;
        assert_eq!(http.post(&format!("/_matrix/client/v3/join/{room}"), Some(&token), &json!({})).await.0, 200);
        writers.push(token);
    }
    let start = sync(&http, &reader, "").await["next_batch"].as_str().unwrap().to_owned();

    let mut tasks = Vec::new();
    for (w, token) in writers.into_iter().enumerate() {
        let (http, room) = (http.clone(), room.clone());
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..EACH {
                ids.push(say(&http, &token, &room, &format!("w{w}-{i}")).await);
            }
            ids
        }));
    }
    let mut seen: Vec<String> = Vec::new();
    let mut since = start;
    let filter = urlencode(r#"{"room":{"timeline":{"limit":1000}}}"#);
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < SENDERS * EACH && Instant::now() < deadline {
        let body = sync(&http, &reader, &format!("since={since}&timeout=2000&filter={filter}")).await;
        if let Some(events) = body["rooms"]["join"][&room]["timeline"]["events"].as_array() {
            assert_eq!(body["rooms"]["join"][&room]["timeline"]["limited"], false);
            seen.extend(
                events
                    .iter()
                    .filter(|e| e["type"] == "m.room.message")
                    .map(|e| e["event_id"].as_str().unwrap().to_owned()),
            );
        }
        since = body["next_batch"].as_str().unwrap().to_owned();
    }
    assert_each_delivered_once(seen, tasks, "3 senders").await;
    server.stop().await;
}

#[tokio::test]
async fn typing_notices_reach_other_members_through_sync_and_expire() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let bob = server.register("bob", "pw").await;
    let room = create_room(http, &alice, json!({ "preset": "public_chat" })).await;
    assert_eq!(http.post(&format!("/_matrix/client/v3/join/{room}"), Some(&bob), &json!({})).await.0, 200);
    let since = sync(http, &bob, "").await["next_batch"].as_str().unwrap().to_owned();

    let typing = format!("/_matrix/client/v3/rooms/{room}/typing/{}", server.user_id("alice"));
    assert_eq!(http.put(&typing, Some(&alice), &json!({ "typing": true, "timeout": 1500 })).await.0, 200);
    let update = sync(http, &bob, &format!("since={since}&timeout=5000")).await;
    let ephemeral = &update["rooms"]["join"][&room]["ephemeral"]["events"][0];
    assert_eq!(ephemeral["type"], "m.typing");
    assert_eq!(ephemeral["content"]["user_ids"], json!([server.user_id("alice")]));

    // The notice times out by itself; bob's long-poll learns that nobody types any more.
    let since = update["next_batch"].as_str().unwrap().to_owned();
    let expired = sync(http, &bob, &format!("since={since}&timeout=10000")).await;
    assert_eq!(expired["rooms"]["join"][&room]["ephemeral"]["events"][0]["content"]["user_ids"], json!([]));

    // Nobody sets someone else's typing state, and outsiders none at all.
    assert_error(&http.put(&typing, Some(&bob), &json!({ "typing": true })).await, 403, "M_FORBIDDEN");
    let carol = server.register("carol", "pw").await;
    let carol_typing = format!("/_matrix/client/v3/rooms/{room}/typing/{}", server.user_id("carol"));
    assert_error(&http.put(&carol_typing, Some(&carol), &json!({ "typing": true })).await, 403, "M_FORBIDDEN");
    server.stop().await;
}

#[tokio::test]
async fn read_receipts_are_synced_and_private_ones_stay_private() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let bob = server.register("bob", "pw").await;
    let room = create_room(http, &alice, json!({ "preset": "public_chat" })).await;
    assert_eq!(http.post(&format!("/_matrix/client/v3/join/{room}"), Some(&bob), &json!({})).await.0, 200);
    let message = say(http, &alice, &room, "read me").await;
    let since = sync(http, &alice, "").await["next_batch"].as_str().unwrap().to_owned();

    let public = format!("/_matrix/client/v3/rooms/{room}/receipt/m.read/{message}");
    assert_eq!(http.post(&public, Some(&bob), &json!({})).await.0, 200);
    let private = format!("/_matrix/client/v3/rooms/{room}/receipt/m.read.private/{message}");
    assert_eq!(http.post(&private, Some(&bob), &json!({})).await.0, 200);

    let for_alice = sync(http, &alice, &format!("since={since}&timeout=5000")).await;
    let receipt = for_alice["rooms"]["join"][&room]["ephemeral"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "m.receipt")
        .cloned()
        .unwrap();
    assert!(receipt["content"][&message]["m.read"][server.user_id("bob")]["ts"].is_u64(), "{receipt}");
    assert!(receipt["content"][&message]["m.read.private"].is_null(), "bob's private receipt is his alone: {receipt}");
    let for_bob = sync(http, &bob, "").await;
    let events = for_bob["rooms"]["join"][&room]["ephemeral"]["events"].as_array().unwrap().clone();
    assert!(
        events.iter().any(|e| e["content"][&message]["m.read.private"][server.user_id("bob")].is_object()),
        "{events:?}"
    );

    assert_error(
        &http.post(&format!("/_matrix/client/v3/rooms/{room}/receipt/m.bogus/{message}"), Some(&bob), &json!({})).await,
        400,
        "M_INVALID_PARAM",
    );
    assert_error(
        &http.post(&format!("/_matrix/client/v3/rooms/{room}/receipt/m.read/$nope"), Some(&bob), &json!({})).await,
        404,
        "M_NOT_FOUND",
    );
    server.stop().await;
}

#[tokio::test]
async fn account_data_and_read_markers_are_synced() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let room = create_room(http, &alice, json!({})).await;
    let message = say(http, &alice, &room, "mark me").await;
    let since = sync(http, &alice, "").await["next_batch"].as_str().unwrap().to_owned();
    let me = server.user_id("alice");

    let global = format!("/_matrix/client/v3/user/{me}/account_data/org.example.theme");
    assert_eq!(http.put(&global, Some(&alice), &json!({ "dark": true })).await.0, 200);
    let per_room = format!("/_matrix/client/v3/user/{me}/rooms/{room}/account_data/org.example.note");
    assert_eq!(http.put(&per_room, Some(&alice), &json!({ "text": "remember" })).await.0, 200);
    assert_eq!(http.get(&per_room, Some(&alice)).await.1, json!({ "text": "remember" }));
    let markers = json!({ "m.fully_read": message, "m.read": message });
    assert_eq!(
        http.post(&format!("/_matrix/client/v3/rooms/{room}/read_markers"), Some(&alice), &markers).await.0,
        200
    );
    let fully_read = format!("/_matrix/client/v3/user/{me}/rooms/{room}/account_data/m.fully_read");
    assert_error(&http.put(&fully_read, Some(&alice), &json!({ "event_id": message })).await, 405, "M_BAD_JSON");

    let update = sync(http, &alice, &format!("since={since}")).await;
    assert_eq!(update["account_data"]["events"], json!([{ "type": "org.example.theme", "content": { "dark": true } }]));
    let mut room_data: Vec<String> = update["rooms"]["join"][&room]["account_data"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_owned())
        .collect();
    room_data.sort();
    assert_eq!(room_data, ["m.fully_read", "org.example.note"]);
    assert!(update["rooms"]["join"][&room]["ephemeral"]["events"][0]["content"][&message]["m.read"][&me].is_object());

    // Delivered once: the next sync from there carries none of it.
    let next = update["next_batch"].as_str().unwrap();
    let quiet = sync(http, &alice, &format!("since={next}")).await;
    assert_eq!(quiet["account_data"]["events"], json!([]));
    assert_eq!(quiet["rooms"]["join"], json!({}));
    server.stop().await;
}

fn types(events: &Value) -> Vec<String> {
    events.as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap().to_owned()).collect()
}

fn state_keys_of(events: &Value, kind: &str) -> Vec<String> {
    let mut keys: Vec<String> = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == kind)
        .map(|e| e["state_key"].as_str().unwrap().to_owned())
        .collect();
    keys.sort();
    keys
}

#[tokio::test]
async fn filters_choose_rooms_and_event_types_and_lazy_load_members() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let bob = server.register("bob", "pw").await;
    let carol = server.register("carol", "pw").await;
    let room = create_room(http, &alice, json!({ "preset": "public_chat", "name": "Filtered" })).await;
    let other = create_room(http, &alice, json!({ "name": "Other" })).await;
    for token in [&bob, &carol] {
        let (status, body) = http.post(&format!("/_matrix/client/v3/join/{room}"), Some(token), &json!({})).await;
        assert_eq!(status, 200, "{body}");
    }
    say(http, &bob, &room, "from bob").await;
    let (status, _) =
        http.put(&format!("/_matrix/client/v3/rooms/{room}/send/m.reaction/r"), Some(&alice), &json!({ "k": 1 })).await;
    assert_eq!(status, 200);

    // Only one room, only messages.
    let filter = json!({ "room": { "rooms": [room], "timeline": { "types": ["m.room.message"] } } });
    let synced = sync(http, &alice, &format!("filter={}", urlencode(&filter.to_string()))).await;
    assert!(synced["rooms"]["join"].get(&other).is_none(), "{synced}");
    assert_eq!(types(&synced["rooms"]["join"][&room]["timeline"]["events"]), vec!["m.room.message"]);

    // not_types and a wildcard.
    let filter = json!({ "room": { "timeline": { "not_types": ["m.room.*"] } } });
    let synced = sync(http, &alice, &format!("filter={}", urlencode(&filter.to_string()))).await;
    assert_eq!(types(&synced["rooms"]["join"][&room]["timeline"]["events"]), vec!["m.reaction"]);

    // Lazy loading: with a one-event timeline (Alice's reaction), only the member events that
    // timeline needs (Alice's own) come along — not Bob's or Carol's.
    let filter = json!({ "room": { "timeline": { "limit": 1 }, "state": { "lazy_load_members": true } } });
    let synced = sync(http, &alice, &format!("filter={}", urlencode(&filter.to_string()))).await;
    let joined = &synced["rooms"]["join"][&room];
    assert_eq!(state_keys_of(&joined["state"]["events"], "m.room.member"), vec![server.user_id("alice")]);
    assert!(types(&joined["state"]["events"]).contains(&"m.room.name".to_owned()));
    assert_eq!(joined["summary"]["m.joined_member_count"], 3, "{joined}");
    assert_eq!(joined["summary"]["m.heroes"].as_array().unwrap().len(), 2);
    // Incremental, lazily: Carol speaks, and her member event comes with her message.
    let since = synced["next_batch"].as_str().unwrap().to_owned();
    say(http, &carol, &room, "from carol").await;
    let filter = json!({ "room": { "state": { "lazy_load_members": true } } });
    let incremental = sync(http, &alice, &format!("since={since}&filter={}", urlencode(&filter.to_string()))).await;
    let state = &incremental["rooms"]["join"][&room]["state"]["events"];
    assert_eq!(state_keys_of(state, "m.room.member"), vec![server.user_id("carol")]);
    // /messages lazily: the senders of the page.
    let filter = urlencode(&json!({ "lazy_load_members": true }).to_string());
    let (_, page) = http
        .get(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=2&filter={filter}"), Some(&alice))
        .await;
    assert_eq!(state_keys_of(&page["state"], "m.room.member"), vec![server.user_id("alice"), server.user_id("carol")]);

    // full_state on an incremental sync repeats the whole state.
    let since = incremental["next_batch"].as_str().unwrap();
    let full = sync(http, &alice, &format!("since={since}&full_state=true")).await;
    assert!(types(&full["rooms"]["join"][&room]["state"]["events"]).contains(&"m.room.create".to_owned()));

    let bad = urlencode(r#"{"room":{"timeline":{"types":"m.room.message"}}}"#);
    assert_error(&http.get(&format!("/_matrix/client/v3/sync?filter={bad}"), Some(&alice)).await, 400, "M_BAD_JSON");
    assert_error(&http.get("/_matrix/client/v3/sync?filter=12345", Some(&alice)).await, 404, "M_NOT_FOUND");
    server.stop().await;
}

#[tokio::test]
async fn include_leave_and_ignored_users() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let bob = server.register("bob", "pw").await;
    let room = create_room(http, &alice, json!({ "preset": "public_chat" })).await;
    let (status, _) = http.post(&format!("/_matrix/client/v3/join/{room}"), Some(&bob), &json!({})).await;
    assert_eq!(status, 200);
    say(http, &bob, &room, "before ignoring").await;
    say(http, &alice, &room, "alice speaks").await;

    // Alice ignores Bob: his messages (not his membership) disappear from her views.
    let ignore = json!({ "ignored_users": { server.user_id("bob"): {} } });
    let path = format!("/_matrix/client/v3/user/{}/account_data/m.ignored_user_list", server.user_id("alice"));
    assert_eq!(http.put(&path, Some(&alice), &ignore).await.0, 200);
    let synced = sync(http, &alice, "").await;
    let timeline = &synced["rooms"]["join"][&room]["timeline"]["events"];
    assert_eq!(bodies(timeline), vec!["alice speaks"]);
    assert!(state_keys_of(timeline, "m.room.member").contains(&server.user_id("bob")));
    let (_, page) = http.get(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=50"), Some(&alice)).await;
    assert_eq!(bodies(&page["chunk"]), vec!["alice speaks"]);

    // Bob leaves; an initial sync shows the room only with include_leave.
    let (status, _) = http.post(&format!("/_matrix/client/v3/rooms/{room}/leave"), Some(&bob), &json!({})).await;
    assert_eq!(status, 200);
    let plain = sync(http, &bob, "").await;
    assert!(plain["rooms"]["leave"].get(&room).is_none(), "{plain}");
    let filter = urlencode(r#"{"room":{"include_leave":true}}"#);
    let with_leave = sync(http, &bob, &format!("filter={filter}")).await;
    let left = &with_leave["rooms"]["leave"][&room];
    assert_eq!(types(&left["timeline"]["events"]).last().map(String::as_str), Some("m.room.member"), "{left}");

    // What happens after bob left is not his to see: the state is as of his leave.
    let rename = format!("/_matrix/client/v3/rooms/{room}/state/m.room.name");
    assert_eq!(http.put(&rename, Some(&alice), &json!({ "name": "After bob" })).await.0, 200);
    let later = sync(http, &bob, &format!("filter={filter}")).await;
    let state = &later["rooms"]["leave"][&room]["state"]["events"];
    assert!(
        !state.as_array().unwrap().iter().any(|e| e["type"] == "m.room.name"),
        "a name set after the leave leaked: {state}"
    );
    assert!(later["rooms"]["leave"][&room].get("summary").is_none());
    server.stop().await;
}

/// A small deterministic generator, so a failing case names its seed.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// Property: for any mix of rooms, senders, timeline limits and interleavings, a client that
/// syncs incrementally — and fills each limited timeline's gap with `/messages` from its
/// `prev_batch` back to the previous token — sees every message exactly once. Receipts and
/// to-device traffic from other writers share the stream meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn incremental_sync_with_gap_filling_sees_every_message_once_for_random_loads() {
    for seed in [1u64, 7, 42] {
        let mut rng = Lcg(seed);
        let server = TestServer::start().await;
        let http = server.http.clone();
        let reader = server.register("reader", "pw").await;
        let rooms_n = 1 + rng.below(3) as usize;
        let senders_n = 2 + rng.below(3) as usize;
        let each = 10 + rng.below(20) as usize;
        let mut rooms = Vec::new();
        for _ in 0..rooms_n {
            rooms.push(create_room(&http, &reader, json!({ "preset": "public_chat" })).await);
        }
        let mut writers = Vec::new();
        for w in 0..senders_n {
            let token = server.register(&format!("writer{w}"), "pw").await;
            for room in &rooms {
                assert_eq!(
                    http.post(&format!("/_matrix/client/v3/join/{room}"), Some(&token), &json!({})).await.0,
                    200
                );
            }
            writers.push(token);
        }
        let mut since = sync(&http, &reader, "").await["next_batch"].as_str().unwrap().to_owned();

        let mut tasks = Vec::new();
        for (w, token) in writers.into_iter().enumerate() {
            let (http, rooms, reader_id) = (http.clone(), rooms.clone(), server.user_id("reader"));
            let picks: Vec<usize> = (0..each).map(|_| rng.below(rooms_n as u64) as usize).collect();
            tasks.push(tokio::spawn(async move {
                let mut ids = Vec::new();
                for (i, room) in picks.into_iter().map(|r| &rooms[r]).enumerate() {
                    let id = say(&http, &token, room, &format!("w{w}-{i}")).await;
                    // Other stream writers between messages: a receipt and a to-device message.
                    let receipt = format!("/_matrix/client/v3/rooms/{room}/receipt/m.read/{id}");
                    assert_eq!(http.post(&receipt, Some(&token), &json!({})).await.0, 200);
                    let to_device = json!({ "messages": { reader_id.clone(): { "*": { "i": i } } } });
                    let path = format!("/_matrix/client/v3/sendToDevice/m.test/{w}-{i}");
                    assert_eq!(http.put(&path, Some(&token), &to_device).await.0, 200);
                    ids.push(id);
                }
                ids
            }));
        }
        let total = senders_n * each;
        let mut seen: Vec<String> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while seen.len() < total && Instant::now() < deadline {
            let limit = 1 + rng.below(5);
            let filter = urlencode(&format!(r#"{{"room":{{"timeline":{{"limit":{limit}}}}}}}"#));
            let body = sync(&http, &reader, &format!("since={since}&timeout=500&filter={filter}")).await;
            for room in &rooms {
                let timeline = &body["rooms"]["join"][room]["timeline"];
                let Some(events) = timeline["events"].as_array() else { continue };
                if timeline["limited"] == true {
                    seen.extend(fill_gap(&http, &reader, room, timeline["prev_batch"].as_str().unwrap(), &since).await);
                }
                seen.extend(message_ids(events));
            }
            since = body["next_batch"].as_str().unwrap().to_owned();
        }
        let case = format!("seed {seed}: {rooms_n} rooms, {senders_n} senders × {each}");
        assert_each_delivered_once(seen, tasks, &case).await;
        server.stop().await;
    }
}

fn message_ids(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .map(|e| e["event_id"].as_str().unwrap().to_owned())
        .collect()
}

/// The messages between `to` and `from` (a limited timeline's gap), oldest first.
async fn fill_gap(http: &Http, token: &str, room: &str, from: &str, to: &str) -> Vec<String> {
    let mut from = from.to_owned();
    let mut gap = Vec::new();
    for _ in 0..1_000 {
        let path = format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=3&from={from}&to={to}");
        let (status, page) = http.get(&path, Some(token)).await;
        assert_eq!(status, 200, "{page}");
        gap.extend(message_ids(page["chunk"].as_array().unwrap()));
        match page["end"].as_str() {
            Some(end) => from = end.to_owned(),
            None => break,
        }
    }
    gap.reverse();
    gap
}

/// What the senders' tasks sent is exactly what was seen: nothing twice, nothing missing.
async fn assert_each_delivered_once(seen: Vec<String>, senders: Vec<tokio::task::JoinHandle<Vec<String>>>, case: &str) {
    let mut sent: Vec<String> = Vec::new();
    for task in senders {
        sent.extend(task.await.unwrap());
    }
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), seen.len(), "{case}: no message delivered twice");
    sent.sort();
    assert_eq!(unique, sent, "{case}: every sent message delivered");
}

/// The summary's counts follow joins, invites, leaves, bans and kicks.
#[tokio::test]
async fn room_summaries_count_joined_and_invited_members() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let mut tokens = Vec::new();
    for name in ["bob", "carol", "dave", "erin"] {
        tokens.push(server.register(name, "pw").await);
    }
    let room = create_room(http, &alice, json!({ "preset": "public_chat" })).await;
    for token in &tokens[..3] {
        assert_eq!(http.post(&format!("/_matrix/client/v3/join/{room}"), Some(token), &json!({})).await.0, 200);
    }
    let action = |what: &str, user: &str| {
        (format!("/_matrix/client/v3/rooms/{room}/{what}"), json!({ "user_id": server.user_id(user) }))
    };
    for (what, user) in [("invite", "erin"), ("kick", "bob"), ("ban", "carol")] {
        let (path, body) = action(what, user);
        assert_eq!(http.post(&path, Some(&alice), &body).await.0, 200, "{what} {user}");
    }
    assert_eq!(http.post(&format!("/_matrix/client/v3/rooms/{room}/leave"), Some(&tokens[2]), &json!({})).await.0, 200);
    let summary = &sync(http, &alice, "").await["rooms"]["join"][&room]["summary"];
    // alice joined; erin invited; bob kicked, carol banned, dave left.
    assert_eq!(summary["m.joined_member_count"], 1, "{summary}");
    assert_eq!(summary["m.invited_member_count"], 1, "{summary}");
    assert_eq!(summary["m.heroes"], json!([server.user_id("erin")]));
    server.stop().await;
}
