//! Benchmark: events through the ingest path on RocksDB, on one core.
//!
//! 1. Local sends: build (prev/auth selection, hash, sign) + ingest, one room.
//! 2. Remote receipt of those same events on a second server: parse, canonical JSON, format,
//!    signature and content-hash checks, auth against auth events, state and current state,
//!    and the atomic write.
//!
//! Run: `cargo run --release -p lattice-service --example ingest_rate`

use std::sync::Arc;
use std::time::Instant;

use lattice_core::event::Pdu;
use lattice_core::pdu::{self, Checked};
use lattice_core::room_version::RoomVersion;
use lattice_service::rooms::{LocalEvent, Outcome};
use lattice_service::{PasswordHasher, RegistrationMode, Service, ServiceConfig, SystemClock};
use lattice_storage::{RocksOptions, RocksStore};
use ruma::serde::Base64;
use ruma::signatures::{Ed25519KeyPair, PublicKeyMap};
use ruma::{OwnedRoomId, UserId};
use serde_json::json;

const MESSAGES: usize = 5_000;

fn service(dir: &std::path::Path, key: Arc<Ed25519KeyPair>) -> Service {
    let kv = Arc::new(RocksStore::open(dir, &RocksOptions::default()).expect("rocksdb opens"));
    let config = ServiceConfig {
        server_name: "origin.test".try_into().unwrap(),
        registration: RegistrationMode::Disabled,
        refreshable_token_lifetime_ms: 60_000,
        default_room_version: "11".into(),
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

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let version = RoomVersion::parse("12").unwrap();
    let key = Arc::new(Ed25519KeyPair::from_der(&Ed25519KeyPair::generate(), "1".into()).unwrap());
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let origin = service(dir_a.path(), key.clone());
    let alice = UserId::parse("@alice:origin.test").unwrap();

    let create = origin
        .rooms()
        .build_local_event(
            &version,
            LocalEvent {
                room_id: None,
                sender: &alice,
                kind: "m.room.create",
                state_key: Some(""),
                content: json!({ "room_version": "12" }),
            },
        )
        .await
        .unwrap();
    let room_id: OwnedRoomId = format!("!{}", &create.id().as_str()[1..]).try_into().unwrap();
    let mut sent: Vec<Pdu> = vec![create.clone()];
    origin.rooms().ingest(&version, create).await.unwrap();
    for (kind, key, content) in [
        ("m.room.member", Some("@alice:origin.test"), json!({ "membership": "join" })),
        ("m.room.power_levels", Some(""), json!({})),
        ("m.room.join_rules", Some(""), json!({ "join_rule": "invite" })),
    ] {
        let event = origin
            .rooms()
            .build_local_event(
                &version,
                LocalEvent { room_id: Some(&room_id), sender: &alice, kind, state_key: key, content },
            )
            .await
            .unwrap();
        sent.push(event.clone());
        assert_eq!(origin.rooms().ingest(&version, event).await.unwrap().outcome, Outcome::Accepted);
    }

    let start = Instant::now();
    for i in 0..MESSAGES {
        let content = json!({ "msgtype": "m.text", "body": format!("message number {i} with a little text in it") });
        let event = origin
            .rooms()
            .build_local_event(
                &version,
                LocalEvent {
                    room_id: Some(&room_id),
                    sender: &alice,
                    kind: "m.room.message",
                    state_key: None,
                    content,
                },
            )
            .await
            .unwrap();
        sent.push(event.clone());
        assert_eq!(origin.rooms().ingest(&version, event).await.unwrap().outcome, Outcome::Accepted);
    }
    let local = MESSAGES as f64 / start.elapsed().as_secs_f64();

    let receiver = service(dir_b.path(), key.clone());
    let mut keys = PublicKeyMap::new();
    keys.insert("origin.test".into(), [("ed25519:1".to_owned(), Base64::new(key.public_key().to_vec()))].into());
    let wire: Vec<Vec<u8>> = sent.iter().map(|e| serde_json::to_vec(e.object()).unwrap()).collect();
    let start = Instant::now();
    for bytes in &wire {
        let object = pdu::parse(bytes, &version).unwrap();
        let Checked::Intact(object) = pdu::check_signatures_and_hashes(object, &version, &keys).unwrap() else {
            panic!("hash mismatch")
        };
        let event = Pdu::new(object, &version).unwrap();
        assert_eq!(receiver.rooms().ingest(&version, event).await.unwrap().outcome, Outcome::Accepted);
    }
    let remote = wire.len() as f64 / start.elapsed().as_secs_f64();

    println!("room version 12, RocksDB (WAL, no fsync), one thread, {MESSAGES} messages into one room");
    println!("local send (build + sign + auth + atomic write): {local:.0} events/s");
    println!("remote receipt (parse + signature + hash + auth + atomic write): {remote:.0} events/s");
}
