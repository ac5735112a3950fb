//! Benchmark of the room model on RocksDB (default options: durable writes), one thread, through the service:
//!
//! 1. Send rate into a room with 10,000 joined members against a room with 3: a message must
//!    cost the same whatever the room's state (issue #10's target: ≥ 80 %).
//! 2. Ingest rate of 10,000 backfilled remote events: a second server holds the room's latest
//!    event (received live with the state the origin gives for it) and receives the 10,000 older
//!    messages as backfill, oldest first, each checked (signatures, hashes, auth) and placed in
//!    the room's history without reaching `/sync`.
//!
//! Run: `cargo run --release -p lattice-service --example room_model_bench` (part of `make bench`).
//! `--quick` uses 1,000 members and 1,000 backfilled events. `--sync-writes false` turns the
//! WAL's fsync off, so the send-rate ratio shows the cost of a message in each room rather than
//! the disk's fsync latency, which varies from one second to the next on a shared machine.

use std::sync::Arc;
use std::time::Instant;

use lattice_core::room_version::RoomVersion;
use lattice_service::rooms::{Arrival, CreateRoom, Outcome, Preset};
use lattice_service::{PasswordHasher, RegistrationMode, Service, ServiceConfig, SystemClock};
use lattice_storage::{RocksOptions, RocksStore};
use ruma::serde::Base64;
use ruma::signatures::{Ed25519KeyPair, PublicKeyMap};
use ruma::{OwnedEventId, OwnedRoomId, RoomId, UserId};
use serde_json::json;

const MESSAGES: usize = 2_000;

fn service(dir: &std::path::Path, name: &str, key: Arc<Ed25519KeyPair>) -> Service {
    let args: Vec<String> = std::env::args().collect();
    let sync_writes = args.windows(2).find(|w| w[0] == "--sync-writes").is_none_or(|w| w[1] != "false");
    let options = RocksOptions { sync_writes, ..RocksOptions::default() };
    let kv = Arc::new(RocksStore::open(dir, &options).expect("rocksdb opens"));
    let config = ServiceConfig {
        server_name: name.try_into().unwrap(),
        registration: RegistrationMode::Disabled,
        refreshable_token_lifetime_ms: 60_000,
        default_room_version: "12".into(),
        public_rooms_cache_ms: 0,
        redaction_retention_ms: lattice_service::DEFAULT_REDACTION_RETENTION_MS,
        push_allow_insecure_gateways: false,
        push_badge_counts_messages: false,
        user_directory_search_all_users: false,
        turn: None,
        media: Default::default(),
        presence: Default::default(),
        delayed_events: Default::default(),
    };
    Service::new(config, kv, Arc::new(SystemClock), PasswordHasher::new(64, 1).unwrap(), key)
}

fn key(version: &str) -> Arc<Ed25519KeyPair> {
    Arc::new(Ed25519KeyPair::from_der(&Ed25519KeyPair::generate(), version.into()).unwrap())
}

async fn public_room(service: &Service, members: usize) -> OwnedRoomId {
    let alice = UserId::parse(format!("@alice:{}", service.server_name())).unwrap();
    let request = CreateRoom { preset: Some(Preset::PublicChat), ..Default::default() };
    let room = service.rooms().create_room(&alice, request).await.unwrap();
    let started = Instant::now();
    for n in 1..members {
        let user = UserId::parse(format!("@member{n}:{}", service.server_name())).unwrap();
        service.rooms().join_room(&user, &room, None).await.unwrap();
    }
    if members > 100 {
        println!("  {members} joins in {:.1} s", started.elapsed().as_secs_f64());
    }
    room
}

/// Messages per second from alice into `room`.
async fn send_rate(service: &Service, room: &RoomId, messages: usize) -> f64 {
    let alice = UserId::parse(format!("@alice:{}", service.server_name())).unwrap();
    let started = Instant::now();
    for n in 0..messages {
        let content = json!({ "msgtype": "m.text", "body": format!("message {n}") });
        service.rooms().send_event(&alice, room, "m.room.message", None, content, None).await.unwrap();
    }
    messages as f64 / started.elapsed().as_secs_f64()
}

async fn event_bytes(service: &Service, id: &OwnedEventId) -> Vec<u8> {
    service.rooms().stored_pdu_json(id).await.unwrap().expect("stored").into_bytes()
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let quick = std::env::args().any(|arg| arg == "--quick");
    let (members, backfilled) = if quick { (1_000, 1_000) } else { (10_000, 10_000) };
    let dirs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();

    let durable = !std::env::args().collect::<Vec<_>>().windows(2).any(|w| w[0] == "--sync-writes" && w[1] == "false");
    println!(
        "room version 12, RocksDB (sync_writes = {durable}), one thread, {MESSAGES} messages per room in 4 alternating rounds"
    );
    // Both rooms live in one store, so the comparison is of the rooms, not of two databases of
    // different sizes and cache warmth.
    let big = service(dirs[1].path(), "big.test", key("1"));
    let big_room = public_room(&big, members).await;
    let small = &big;
    let small_room = public_room(small, 3).await;
    // Rounds alternate between the rooms, so a slow spell of the disk or the other core falls
    // on both; the best round of each is kept.
    let (mut small_rate, mut big_rate) = (0.0f64, 0.0f64);
    for _ in 0..4 {
        small_rate = small_rate.max(send_rate(small, &small_room, MESSAGES / 4).await);
        big_rate = big_rate.max(send_rate(&big, &big_room, MESSAGES / 4).await);
    }
    println!("send rate, 3 members: {small_rate:.0} msg/s");
    println!(
        "send rate, {members} members: {big_rate:.0} msg/s ({:.0} % of the small room)",
        100.0 * big_rate / small_rate
    );

    // The origin writes the history; the receiver learns the newest event first.
    let origin_key = key("1");
    let origin = service(dirs[2].path(), "origin.test", origin_key.clone());
    let room = public_room(&origin, 2).await;
    let version = RoomVersion::parse("12").unwrap();
    let alice = UserId::parse("@alice:origin.test").unwrap();
    let mut history = Vec::with_capacity(backfilled);
    for n in 0..backfilled {
        let content = json!({ "msgtype": "m.text", "body": format!("history {n}") });
        history.push(origin.rooms().send_event(&alice, &room, "m.room.message", None, content, None).await.unwrap());
    }
    let newest = origin
        .rooms()
        .send_event(&alice, &room, "m.room.message", None, json!({ "body": "newest" }), None)
        .await
        .unwrap();
    let mut keys = PublicKeyMap::new();
    keys.insert("origin.test".into(), [("ed25519:1".to_owned(), Base64::new(origin_key.public_key().to_vec()))].into());
    let receiver = service(dirs[3].path(), "receiver.test", key("1"));
    let origin_name = origin.server_name().to_owned();

    // The room's state events arrive as outliers (as in a join's answer), then the newest
    // message live with its state.
    let state = origin.rooms().room_state_ids(&room).await.unwrap();
    let mut state_events: Vec<(u64, OwnedEventId)> = Vec::new();
    for id in state.values() {
        let bytes = event_bytes(&origin, id).await;
        let pdu = receiver.rooms().check_remote_pdu(&origin_name, &version, &bytes, &keys).unwrap();
        state_events.push((u64::from(pdu.depth()), id.clone()));
    }
    state_events.sort();
    for (_, id) in &state_events {
        let bytes = event_bytes(&origin, id).await;
        let pdu = receiver.rooms().check_remote_pdu(&origin_name, &version, &bytes, &keys).unwrap();
        receiver.rooms().ingest_outlier(&version, pdu).await.unwrap();
    }
    let bytes = event_bytes(&origin, &newest).await;
    let pdu = receiver.rooms().check_remote_pdu(&origin_name, &version, &bytes, &keys).unwrap();
    let ingested = receiver.rooms().ingest_placed(&version, pdu, Arrival::Live, Some(&state)).await.unwrap();
    assert_eq!(ingested.outcome, Outcome::Accepted);

    // Backfill: the prev event of the oldest message is a state event stored as an outlier, so
    // the oldest one comes with its state too; each later one builds on the one before.
    let mut wire = Vec::with_capacity(backfilled);
    for id in &history {
        wire.push(event_bytes(&origin, id).await);
    }
    let started = Instant::now();
    for (n, bytes) in wire.iter().enumerate() {
        let pdu = receiver.rooms().check_remote_pdu(&origin_name, &version, bytes, &keys).unwrap();
        let supplied = (n == 0).then_some(&state);
        let ingested = receiver.rooms().ingest_placed(&version, pdu, Arrival::Backfill, supplied).await.unwrap();
        assert_eq!(ingested.outcome, Outcome::Accepted);
    }
    let rate = backfilled as f64 / started.elapsed().as_secs_f64();
    println!("backfill of {backfilled} remote events (parse + signatures + hashes + auth + place): {rate:.0} events/s");
}
