//! A room spanning three Lattice servers on loopback: everything a member does reaches the
//! other two servers; a server stopped through a stretch of traffic catches up when it is back;
//! and a partition that forks the room's graph (both sides changing the same state) converges
//! to the same state and history on all three once it heals.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::federation_keys::{Network, Server};
use crate::federation_rooms::sync_until;
use crate::support::{bodies, create_room, say, urlencode};

const ALL: [&str; 3] = ["lat1.test", "lat2.test", "lat3.test"];
const EVERYONE: [&str; 3] = ["@alice:lat1.test", "@bob:lat2.test", "@carol:lat3.test"];

/// The bodies of the room's history as `token`'s user pages back through it (up to 500 events),
/// oldest first.
async fn history_bodies(server: &Server, token: &str, room: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut from: Option<String> = None;
    for _ in 0..10 {
        let mut path = format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=50");
        if let Some(from) = &from {
            path.push_str(&format!("&from={from}"));
        }
        let (status, page) = server.http.get(&path, Some(token)).await;
        assert_eq!(status, 200, "{page}");
        found.extend(bodies(&page["chunk"]));
        match page["end"].as_str() {
            Some(end) => from = Some(end.to_owned()),
            None => break,
        }
    }
    found.reverse();
    found
}

/// Waits until every one of `expected` is in the room's history on `server`.
async fn until_history_has(server: &Server, token: &str, room: &str, expected: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let history = history_bodies(server, token, room).await;
        let missing: Vec<&String> = expected.iter().filter(|body| !history.contains(body)).collect();
        if missing.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "{} never saw {missing:?}; it has {history:?}", server.name());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn state_content(server: &Server, token: &str, room: &str, kind: &str, key: &str) -> Value {
    let (status, content) =
        server.http.get(&format!("/_matrix/client/v3/rooms/{room}/state/{kind}/{key}"), Some(token)).await;
    if status == 200 { content } else { Value::Null }
}

/// Waits until the state `kind`/`key` is the same on all three servers and not null; returns it.
async fn until_state_agrees(servers: [(&Server, &str); 3], room: &str, kind: &str, key: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let mut seen = Vec::new();
        for (server, token) in servers {
            seen.push(state_content(server, token, room, kind, key).await);
        }
        if !seen[0].is_null() && seen.iter().all(|content| *content == seen[0]) {
            return seen[0].clone();
        }
        assert!(Instant::now() < deadline, "{kind} never agreed: {seen:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// alice (lat1) creates a public room with an alias; bob (lat2) and carol (lat3) join it, and
/// every server sees all three members.
async fn room_across_three(lat1: &Server, lat2: &Server, lat3: &Server) -> (String, [String; 3]) {
    let alice = lat1.register_user("alice").await;
    let bob = lat2.register_user("bob").await;
    let carol = lat3.register_user("carol").await;
    let room = create_room(
        &lat1.http,
        &alice,
        json!({ "preset": "public_chat", "room_alias_name": "three", "name": "Three servers", "room_version": "12" }),
    )
    .await;
    for (server, token) in [(lat2, &bob), (lat3, &carol)] {
        let (status, joined) =
            server.http.post("/_matrix/client/v3/join/%23three:lat1.test", Some(token), &json!({})).await;
        assert_eq!(status, 200, "{joined}");
    }
    for (server, token) in [(lat1, &alice), (lat2, &bob), (lat3, &carol)] {
        sync_until(server, token, "the room", |s| s["rooms"]["join"][&room].is_object()).await;
        until_joined_members(server, token, &room, &EVERYONE).await;
    }
    (room, [alice, bob, carol])
}

async fn joined_members(server: &Server, token: &str, room: &str) -> Vec<String> {
    let (_, members) = server.http.get(&format!("/_matrix/client/v3/rooms/{room}/joined_members"), Some(token)).await;
    members["joined"].as_object().map(|joined| joined.keys().cloned().collect()).unwrap_or_default()
}

async fn until_joined_members(server: &Server, token: &str, room: &str, expected: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let members = joined_members(server, token, room).await;
        if members == expected {
            return;
        }
        assert!(Instant::now() < deadline, "{}: members {members:?}, not {expected:?}", server.name());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_room_across_three_servers_carries_everything_and_a_stopped_server_catches_up() {
    let net = Network::new(&ALL);
    let (mut lat1, mut lat2, mut lat3) = (net.start(ALL[0]).await, net.start(ALL[1]).await, net.start(ALL[2]).await);
    let (room, [alice, bob, carol]) = room_across_three(&lat1, &lat2, &lat3).await;

    // A message from each server reaches the other two.
    let mut said = Vec::new();
    for (server, token, body) in
        [(&lat1, &alice, "hello from 1"), (&lat2, &bob, "hello from 2"), (&lat3, &carol, "hello from 3")]
    {
        say(&server.http, token, &room, body).await;
        said.push(body.to_owned());
    }
    for (server, token) in [(&lat1, &alice), (&lat2, &bob), (&lat3, &carol)] {
        until_history_has(server, token, &room, &said).await;
    }

    // bob's edit and carol's redaction of her own message reach everyone.
    let original = say(&lat2.http, &bob, &room, "tpyo").await;
    let edit = json!({
        "msgtype": "m.text", "body": "* typo",
        "m.new_content": { "msgtype": "m.text", "body": "typo" },
        "m.relates_to": { "rel_type": "m.replace", "event_id": original },
    });
    let (status, body) =
        lat2.http.put(&format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/edit1"), Some(&bob), &edit).await;
    assert_eq!(status, 200, "{body}");
    let doomed = say(&lat3.http, &carol, &room, "regrettable").await;
    let (status, body) = lat3
        .http
        .put(&format!("/_matrix/client/v3/rooms/{room}/redact/{doomed}/r1"), Some(&carol), &json!({ "reason": "oops" }))
        .await;
    assert_eq!(status, 200, "{body}");
    for (server, token) in [(&lat1, &alice), (&lat2, &bob), (&lat3, &carol)] {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (_, edited) =
                server.http.get(&format!("/_matrix/client/v3/rooms/{room}/event/{original}"), Some(token)).await;
            let (_, redacted) =
                server.http.get(&format!("/_matrix/client/v3/rooms/{room}/event/{doomed}"), Some(token)).await;
            let replaced = edited["unsigned"]["m.relations"]["m.replace"].is_object();
            if replaced && redacted["content"] == json!({}) && redacted["unsigned"]["redacted_because"].is_object() {
                break;
            }
            assert!(Instant::now() < deadline, "{}: edit {edited}, redaction {redacted}", server.name());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // carol's typing notice and read receipt reach lat1 and lat2.
    let typing = format!("/_matrix/client/v3/rooms/{room}/typing/@carol:lat3.test");
    let (status, body) = lat3.http.put(&typing, Some(&carol), &json!({ "typing": true, "timeout": 30000 })).await;
    assert_eq!(status, 200, "{body}");
    let receipt = format!("/_matrix/client/v3/rooms/{room}/receipt/m.read/{original}");
    let (status, body) = lat3.http.post(&receipt, Some(&carol), &json!({})).await;
    assert_eq!(status, 200, "{body}");
    for (server, token) in [(&lat1, &alice), (&lat2, &bob)] {
        sync_until(server, token, "carol typing", |s| {
            s["rooms"]["join"][&room]["ephemeral"]["events"].as_array().is_some_and(|events| {
                events
                    .iter()
                    .any(|e| e["type"] == "m.typing" && e["content"]["user_ids"] == json!(["@carol:lat3.test"]))
            })
        })
        .await;
        sync_until(server, token, "carol's receipt", |s| {
            s["rooms"]["join"][&room]["ephemeral"]["events"].as_array().is_some_and(|events| {
                events.iter().any(|e| {
                    e["type"] == "m.receipt" && e["content"][&original]["m.read"]["@carol:lat3.test"].is_object()
                })
            })
        })
        .await;
    }

    // lat3 is stopped while lat1 and lat2 go on talking; back, it has every message.
    lat3.stop().await;
    // alice's 30 form a chain (each cites the one before); bob's are concurrent with them.
    let mut missed = Vec::new();
    for n in 0..30 {
        let body = format!("while lat3 was down {n}");
        say(&lat1.http, &alice, &room, &body).await;
        missed.push(body);
    }
    let from_bob: Vec<String> = (0..5).map(|n| format!("bob while lat3 was down {n}")).collect();
    for body in &from_bob {
        say(&lat2.http, &bob, &room, body).await;
    }
    lat3.restart().await;
    until_history_has(&lat3, &carol, &room, &missed).await;
    until_history_has(&lat3, &carol, &room, &from_bob).await;
    let history = history_bodies(&lat3, &carol, &room).await;
    let order: Vec<&String> = history.iter().filter(|body| missed.contains(body)).collect();
    assert_eq!(order, missed.iter().collect::<Vec<_>>(), "lat3's history after catching up");
    // And lat3 still takes part: its next message reaches both others.
    say(&lat3.http, &carol, &room, "back again").await;
    for (server, token) in [(&lat1, &alice), (&lat2, &bob)] {
        until_history_has(server, token, &room, &["back again".to_owned()]).await;
    }

    // Membership: bob leaves, and all three servers see it.
    let (status, body) =
        lat2.http.post(&format!("/_matrix/client/v3/rooms/{room}/leave"), Some(&bob), &json!({})).await;
    assert_eq!(status, 200, "{body}");
    for (server, token) in [(&lat1, &alice), (&lat3, &carol)] {
        until_joined_members(server, token, &room, &["@alice:lat1.test", "@carol:lat3.test"]).await;
    }

    lat3.stop().await;
    lat2.stop().await;
    lat1.stop().await;
}

#[tokio::test]
async fn a_partition_forks_the_room_and_all_three_servers_converge_when_it_heals() {
    let net = Network::new(&ALL);
    let (mut lat1, mut lat2, mut lat3) = (net.start(ALL[0]).await, net.start(ALL[1]).await, net.start(ALL[2]).await);
    let (room, [alice, bob, carol]) = room_across_three(&lat1, &lat2, &lat3).await;
    // carol may change the room's name too, so both sides of the partition can.
    let levels = state_content(&lat1, &alice, &room, "m.room.power_levels", "").await;
    let mut levels = levels.clone();
    levels["users"]["@carol:lat3.test"] = json!(50);
    levels["events"]["m.room.name"] = json!(50);
    let path = format!("/_matrix/client/v3/rooms/{room}/state/m.room.power_levels/");
    let (status, body) = lat1.http.put(&path, Some(&alice), &levels).await;
    assert_eq!(status, 200, "{body}");
    until_state_agrees([(&lat1, &alice), (&lat2, &bob), (&lat3, &carol)], &room, "m.room.power_levels", "").await;
    let power = state_content(&lat3, &carol, &room, "m.room.power_levels", "").await;
    assert_eq!(power["users"]["@carol:lat3.test"], 50, "{power}");

    // The partition: lat3 on one side, lat1 and lat2 on the other, each refusing the other side.
    lat3.restart_with(|config| config.federation.deny_servers = vec!["lat1.test".into(), "lat2.test".into()]).await;
    lat1.restart_with(|config| config.federation.deny_servers = vec!["lat3.test".into()]).await;
    lat2.restart_with(|config| config.federation.deny_servers = vec!["lat3.test".into()]).await;
    let name = |value: &str| json!({ "name": value });
    let path = format!("/_matrix/client/v3/rooms/{room}/state/m.room.name/");
    let (status, body) = lat1.http.put(&path, Some(&alice), &name("Named on lat1")).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = lat3.http.put(&path, Some(&carol), &name("Named on lat3")).await;
    assert_eq!(status, 200, "{body}");
    let mut majority = Vec::new();
    let mut minority = Vec::new();
    for n in 0..5 {
        let (server, token) = if n % 2 == 0 { (&lat1, &alice) } else { (&lat2, &bob) };
        let body = format!("majority side {n}");
        say(&server.http, token, &room, &body).await;
        majority.push(body);
        let body = format!("minority side {n}");
        say(&lat3.http, &carol, &room, &body).await;
        minority.push(body);
    }
    until_history_has(&lat2, &bob, &room, &majority).await;
    assert_eq!(state_content(&lat3, &carol, &room, "m.room.name", "").await, name("Named on lat3"));
    assert_eq!(state_content(&lat2, &bob, &room, "m.room.name", "").await, name("Named on lat1"));

    // Healed: the next events of each side cite what the other missed, which is fetched
    // (get_missing_events), and state resolution decides the name the same way everywhere.
    for server in [&mut lat1, &mut lat2, &mut lat3] {
        server.restart_with(|config| config.federation.deny_servers = Vec::new()).await;
    }
    say(&lat1.http, &alice, &room, "healed 1").await;
    until_history_has(&lat3, &carol, &room, &["healed 1".to_owned()]).await;
    say(&lat3.http, &carol, &room, "healed 3").await;
    let mut everything: Vec<String> = majority.iter().chain(&minority).cloned().collect();
    everything.extend(["healed 1".to_owned(), "healed 3".to_owned()]);
    for (server, token) in [(&lat1, &alice), (&lat2, &bob), (&lat3, &carol)] {
        until_history_has(server, token, &room, &everything).await;
    }
    let servers = [(&lat1, alice.as_str()), (&lat2, bob.as_str()), (&lat3, carol.as_str())];
    let agreed = until_state_agrees(servers, &room, "m.room.name", "").await;
    assert!(agreed == name("Named on lat1") || agreed == name("Named on lat3"), "{agreed}");
    let levels = until_state_agrees(servers, &room, "m.room.power_levels", "").await;
    assert_eq!(levels["users"]["@carol:lat3.test"], 50, "{levels}");
    for (server, token) in servers {
        until_joined_members(server, token, &room, &EVERYONE).await;
    }

    lat3.stop().await;
    lat2.stop().await;
    lat1.stop().await;
}

/// What a user's incremental syncs delivered: timeline bodies per room and to-device events.
#[derive(Default)]
struct Delivered {
    bodies: std::collections::HashMap<String, Vec<String>>,
    to_device: Vec<Value>,
    since: String,
}

impl Delivered {
    fn has(&self, room: &str, body: &str) -> bool {
        self.bodies.get(room).is_some_and(|bodies| bodies.iter().any(|b| b == body))
    }

    /// Syncs (filter: up to 200 timeline events a room) until `done` holds.
    async fn sync_until(&mut self, server: &Server, token: &str, done: impl Fn(&Self) -> bool) {
        let filter = urlencode(&json!({ "room": { "timeline": { "limit": 200 } } }).to_string());
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let path = format!("/_matrix/client/v3/sync?timeout=1000&since={}&filter={filter}", self.since);
            let (status, batch) = server.http.get(&path, Some(token)).await;
            assert_eq!(status, 200, "{batch}");
            for (room, joined) in batch["rooms"]["join"].as_object().into_iter().flatten() {
                let bodies = bodies(&joined["timeline"]["events"]);
                self.bodies.entry(room.clone()).or_default().extend(bodies);
            }
            self.to_device.extend(batch["to_device"]["events"].as_array().into_iter().flatten().cloned());
            self.since = batch["next_batch"].as_str().expect("next_batch").to_owned();
            if done(self) {
                return;
            }
            assert!(Instant::now() < deadline, "{} never delivered it; it delivered {:?}", server.name(), self.bodies);
        }
    }
}

#[tokio::test]
async fn a_server_back_after_a_long_absence_gets_the_newest_events_and_backfills_the_rest() {
    let net = Network::new(&ALL[..2]);
    // lat1 compacts a destination's queue once it has been unreachable for a second.
    let mut lat1 = net.start_with(ALL[0], |config| config.federation.catch_up_after = "1s".into()).await;
    let mut lat2 = net.start(ALL[1]).await;
    let alice = lat1.register_user("alice").await;
    let bob = lat2.register_user("bob").await;
    let mut rooms = Vec::new();
    for alias in ["long", "named"] {
        let body = json!({ "preset": "public_chat", "room_alias_name": alias });
        let room = create_room(&lat1.http, &alice, body).await;
        let (status, joined) =
            lat2.http.post(&format!("/_matrix/client/v3/join/%23{alias}:lat1.test"), Some(&bob), &json!({})).await;
        assert_eq!(status, 200, "{joined}");
        rooms.push(room);
    }
    let (long, named) = (rooms[0].clone(), rooms[1].clone());
    let before = sync_until(&lat2, &bob, "both rooms", |s| {
        s["rooms"]["join"][&long].is_object() && s["rooms"]["join"][&named].is_object()
    })
    .await;
    let since = before["next_batch"].as_str().expect("next_batch").to_owned();
    let bob_device = {
        let (_, whoami) = lat2.http.get("/_matrix/client/v3/account/whoami", Some(&bob)).await;
        whoami["device_id"].as_str().expect("device").to_owned()
    };

    // lat2 is away while alice writes 120 messages in one room, renames the other between
    // messages, and sends bob a to-device message.
    lat2.stop().await;
    let long_history: Vec<String> = (0..120).map(|n| format!("long-{n}")).collect();
    for body in &long_history {
        say(&lat1.http, &alice, &long, body).await;
    }
    for n in 0..10 {
        say(&lat1.http, &alice, &named, &format!("named-{n}")).await;
        if n == 4 {
            let path = format!("/_matrix/client/v3/rooms/{named}/state/m.room.name/");
            let (status, body) = lat1.http.put(&path, Some(&alice), &json!({ "name": "Renamed while away" })).await;
            assert_eq!(status, 200, "{body}");
        }
    }
    let to_device = json!({ "messages": { "@bob:lat2.test": { bob_device.clone(): { "note": "while away" } } } });
    let (status, body) =
        lat1.http.put("/_matrix/client/v3/sendToDevice/org.example.note/away-1", Some(&alice), &to_device).await;
    assert_eq!(status, 200, "{body}");
    // Long enough for lat1 to have tried, failed and compacted lat2's queue.
    tokio::time::sleep(Duration::from_secs(3)).await;

    lat2.restart().await;
    // The newest event of each room arrives, with the state at it, and the to-device message
    // (kept through the compaction). The first messages of the long room never come through
    // /sync: lat2 fetched the newest events and left a gap.
    let mut delivered = Delivered { since, ..Default::default() };
    let note = |d: &Delivered| d.to_device.iter().filter(|e| e["type"] == "org.example.note").count();
    delivered.sync_until(&lat2, &bob, |d| d.has(&long, "long-119") && d.has(&named, "named-9") && note(d) > 0).await;
    let synced = &delivered.bodies[&long];
    assert!(!synced.contains(&"long-0".to_owned()), "the whole queue was replayed: {synced:?}");
    assert!(synced.len() < 60, "most of the missed messages came through /sync: {synced:?}");
    let name = state_content(&lat2, &bob, &named, "m.room.name", "").await;
    assert_eq!(name["name"], "Renamed while away");
    // The rest is backfilled, in order, as bob pages back.
    until_history_has(&lat2, &bob, &long, &long_history).await;
    let history = history_bodies(&lat2, &bob, &long).await;
    let order: Vec<&String> = history.iter().filter(|body| long_history.contains(body)).collect();
    assert_eq!(order, long_history.iter().collect::<Vec<_>>());
    // Once: one more sync brings no second copy.
    let (status, more) =
        lat2.http.get(&format!("/_matrix/client/v3/sync?timeout=2000&since={}", delivered.since), Some(&bob)).await;
    assert_eq!(status, 200, "{more}");
    delivered.to_device.extend(more["to_device"]["events"].as_array().into_iter().flatten().cloned());
    assert_eq!(note(&delivered), 1, "{:?}", delivered.to_device);

    lat2.stop().await;
    lat1.stop().await;
}
