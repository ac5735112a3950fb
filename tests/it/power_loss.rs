//! Power loss, simulated through the real binary: with `storage.testing_wal_in_process_memory`
//! RocksDB keeps the write-ahead log in the process until a synced write (or shutdown) writes it
//! out, so `kill -9` loses exactly what a power cut would lose from the operating system's cache.
//! With `sync_writes` off that loses acknowledged writes (so the test can fail); with it on, the
//! default, nothing acknowledged is lost — neither a client's write nor a federation
//! transaction's events, which are written without a sync each and made durable together.

use reqwest::Method;
use serde_json::{Value, json};

use crate::federation_keys::Network;
use crate::federation_rooms::{chained_messages, signed_request};
use crate::support::{Http, ProcessServer, register};

/// Messages sent concurrently, so that several share one group commit.
const MESSAGES: usize = 24;

/// What the server acknowledged before it was killed.
struct Acknowledged {
    token: String,
    room: String,
    bodies: Vec<String>,
}

async fn send_all(http: &Http, token: &str, room: &str) -> Vec<String> {
    let mut sends = tokio::task::JoinSet::new();
    for i in 0..MESSAGES {
        let (http, token, room) = (http.clone(), token.to_owned(), room.to_owned());
        sends.spawn(async move {
            let body = format!("acknowledged {i}");
            let path = format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/p{i}");
            let (status, answer) = http.put(&path, Some(&token), &json!({ "msgtype": "m.text", "body": body })).await;
            assert_eq!(status, 200, "{answer}");
            body
        });
    }
    sends.join_all().await
}

/// Registers, creates a room, sends messages and account data, then SIGKILLs the server
/// right after the last acknowledgement.
async fn write_then_cut_power(dir: &std::path::Path, sync_writes: &str) -> Acknowledged {
    let env =
        [("LATTICE_STORAGE__SYNC_WRITES", sync_writes), ("LATTICE_STORAGE__TESTING_WAL_IN_PROCESS_MEMORY", "true")];
    let server = ProcessServer::start_with_env(dir, &env).await;
    let first_token = server.first_registration_token.clone().unwrap();
    let registered = register(&server.http, "alice", "pw", &first_token).await;
    let token = registered["access_token"].as_str().unwrap().to_owned();
    let (status, created) = server.http.post("/_matrix/client/v3/createRoom", Some(&token), &json!({})).await;
    assert_eq!(status, 200, "{created}");
    let room = created["room_id"].as_str().unwrap().to_owned();
    // Each stream claims its first block of positions with a synced write, which makes every
    // earlier write durable too: the account-data stream claims its block before the messages.
    let before = "/_matrix/client/v3/user/@alice:hs1.localhost/account_data/m.test.before";
    assert_eq!(server.http.put(before, Some(&token), &json!({ "first": true })).await.0, 200);
    let mut bodies = send_all(&server.http, &token, &room).await;
    let path = "/_matrix/client/v3/user/@alice:hs1.localhost/account_data/m.test.after";
    assert_eq!(server.http.put(path, Some(&token), &json!({ "last": true })).await.0, 200);
    bodies.sort();
    server.kill_9().await;
    Acknowledged { token, room, bodies }
}

/// The message bodies the restarted server has in the room, or `None` if it lost the room (or
/// the account) altogether.
async fn surviving_bodies(http: &Http, written: &Acknowledged) -> Option<Vec<String>> {
    let path = format!("/_matrix/client/v3/rooms/{}/messages?dir=f&limit=100", written.room);
    let (status, page) = http.get(&path, Some(&written.token)).await;
    if status != 200 {
        return None;
    }
    let mut bodies: Vec<String> = page["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|event| event["type"] == "m.room.message")
        .filter_map(|event| event["content"]["body"].as_str().map(str::to_owned))
        .collect();
    bodies.sort();
    Some(bodies)
}

async fn account_data_survived(http: &Http, token: &str) -> bool {
    let path = "/_matrix/client/v3/user/@alice:hs1.localhost/account_data/m.test.after";
    let (status, content): (_, Value) = http.get(path, Some(token)).await;
    status == 200 && content["last"] == true
}

#[tokio::test]
async fn without_sync_writes_a_power_cut_loses_acknowledged_writes() {
    let dir = tempfile::tempdir().unwrap();
    let written = write_then_cut_power(dir.path(), "false").await;
    let restarted = ProcessServer::start_with_env(dir.path(), &[("LATTICE_STORAGE__SYNC_WRITES", "false")]).await;
    let survived = surviving_bodies(&restarted.http, &written).await;
    let lost_messages = survived.is_none_or(|bodies| bodies.len() < written.bodies.len());
    assert!(lost_messages, "the simulated power cut lost nothing: the test could not tell");
    assert!(!account_data_survived(&restarted.http, &written.token).await);
}

#[tokio::test]
async fn with_sync_writes_a_power_cut_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let written = write_then_cut_power(dir.path(), "true").await;
    // Restarted with the defaults: durable writes are what a fresh configuration gets.
    let restarted = ProcessServer::start(dir.path()).await;
    let survived = surviving_bodies(&restarted.http, &written).await.expect("the room and the account survive");
    assert_eq!(survived, written.bodies);
    assert!(account_data_survived(&restarted.http, &written.token).await);
}

/// PDUs pushed in one federation transaction.
const PUSHED: usize = 40;

/// lat1 runs as its own process (so it can be killed) beside lat2 in this process; bob of lat2
/// joins alice's room on lat1, then lat2's key signs `PUSHED` messages of bob's that go to lat1 in
/// one `PUT /send`, and lat1 is SIGKILLed right after it answers. Returns alice's token and the
/// room.
async fn push_a_transaction_then_cut_power(
    net: &Network,
    dir: &std::path::Path,
    sync_writes: &str,
) -> (String, String) {
    let mut lat2 = net.start("lat2.test").await;
    let mut env = net.process_env("lat1.test");
    env.push(("LATTICE_STORAGE__SYNC_WRITES", sync_writes.to_owned()));
    env.push(("LATTICE_STORAGE__TESTING_WAL_IN_PROCESS_MEMORY", "true".to_owned()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let lat1 = ProcessServer::start_with_env(dir, &env).await;
    let first_token = lat1.first_registration_token.clone().unwrap();
    let alice = register(&lat1.http, "alice", "pw", &first_token).await["access_token"].as_str().unwrap().to_owned();
    let (status, created) =
        lat1.http.post("/_matrix/client/v3/createRoom", Some(&alice), &json!({ "preset": "public_chat" })).await;
    assert_eq!(status, 200, "{created}");
    let room = created["room_id"].as_str().unwrap().to_owned();
    let bob = lat2.register_user("bob").await;
    let (status, joined) =
        lat2.http.post(&format!("/_matrix/client/v3/join/{room}?via=lat1.test"), Some(&bob), &json!({})).await;
    assert_eq!(status, 200, "{joined}");

    let bodies = (0..PUSHED).map(|n| format!("pushed {n}"));
    let pdus =
        chained_messages(net, &lat1.http, (&alice, &room), ("@bob:lat2.test", &lat2.signing_key()), bodies).await;
    let txn = json!({ "origin": "lat2.test", "origin_server_ts": 1, "pdus": pdus });
    let path = "/_matrix/federation/v1/send/power-cut";
    let (status, answer) = signed_request(net, ("lat2.test", &lat2.signing_key()), Method::PUT, path, Some(txn)).await;
    assert_eq!(status, 200, "{answer}");
    let results = answer["pdus"].as_object().unwrap();
    assert!(results.len() == PUSHED && results.values().all(|r| r == &json!({})), "{answer}");
    lat1.kill_9().await;
    lat2.stop().await;
    (alice, room)
}

/// The pushed messages the restarted lat1 has, or `None` if it lost the room altogether.
async fn pushed_bodies(net: &Network, dir: &std::path::Path, (alice, room): &(String, String)) -> Option<usize> {
    let env = net.process_env("lat1.test");
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let restarted = ProcessServer::start_with_env(dir, &env).await;
    let path = format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=100");
    let (status, page) = restarted.http.get(&path, Some(alice)).await;
    if status != 200 {
        return None;
    }
    let bodies = page["chunk"].as_array().unwrap().iter();
    Some(bodies.filter(|e| e["content"]["body"].as_str().is_some_and(|b| b.starts_with("pushed "))).count())
}

#[tokio::test]
async fn an_answered_federation_transaction_survives_a_power_cut() {
    let net = Network::new(&["lat1.test", "lat2.test"]);
    let dir = tempfile::tempdir().unwrap();
    let written = push_a_transaction_then_cut_power(&net, dir.path(), "true").await;
    assert_eq!(pushed_bodies(&net, dir.path(), &written).await, Some(PUSHED));

    // The same with `sync_writes` off loses them: the simulated cut can tell.
    let net = Network::new(&["lat1.test", "lat2.test"]);
    let dir = tempfile::tempdir().unwrap();
    let written = push_a_transaction_then_cut_power(&net, dir.path(), "false").await;
    let survived = pushed_bodies(&net, dir.path(), &written).await;
    assert!(survived.is_none_or(|count| count < PUSHED), "nothing was lost without sync_writes: {survived:?}");
}
