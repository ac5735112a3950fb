//! Benchmark: `POST /user_directory/search` latency (the service call, no HTTP) over 10,000
//! users on RocksDB: 100 public rooms of 100 members each, plus one private room of the
//! searcher's. Searches for one user, for a term many users match, and for a term nobody matches.
//!
//! Run: `cargo build --release --workspace --all-targets` then
//! `$CARGO_TARGET_DIR/release/examples/user_directory_bench`

use std::sync::Arc;
use std::time::{Duration, Instant};

use lattice_service::rooms::{CreateRoom, Preset};
use lattice_service::{PasswordHasher, RegistrationMode, Service, ServiceConfig, SystemClock};
use lattice_storage::{RocksOptions, RocksStore};
use ruma::UserId;
use ruma::signatures::Ed25519KeyPair;

const ROOMS: usize = 100;
const PER_ROOM: usize = 100;
const SAMPLES: usize = 50;

fn service(dir: &std::path::Path) -> Service {
    let kv = Arc::new(RocksStore::open(dir, &RocksOptions::default()).expect("rocksdb opens"));
    let key = Arc::new(Ed25519KeyPair::from_der(&Ed25519KeyPair::generate(), "1".into()).unwrap());
    let config = ServiceConfig {
        server_name: "hs.test".try_into().unwrap(),
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

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index].as_secs_f64() * 1000.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let server = service(dir.path());
    let searcher = UserId::parse("@searcher:hs.test").unwrap();
    let started = Instant::now();
    let private = CreateRoom { preset: Some(Preset::PrivateChat), ..Default::default() };
    server.rooms().create_room(&searcher, private).await.unwrap();
    for room in 0..ROOMS {
        let owner = UserId::parse(format!("@owner{room:03}:hs.test")).unwrap();
        let public = CreateRoom { preset: Some(Preset::PublicChat), ..Default::default() };
        let room_id = server.rooms().create_room(&owner, public).await.unwrap();
        for member in 1..PER_ROOM {
            let user = UserId::parse(format!("@user{:05}:hs.test", room * PER_ROOM + member)).unwrap();
            server.rooms().join_room(&user, &room_id, None).await.unwrap();
        }
    }
    println!("{} users in {ROOMS} public rooms joined in {:.1} s", ROOMS * PER_ROOM, started.elapsed().as_secs_f64());

    println!("| search term | results | p50 | p99 |");
    println!("|---|---|---|---|");
    for term in ["user04242", "user0", "nobody"] {
        let mut times = Vec::with_capacity(SAMPLES);
        let mut found = 0;
        for _ in 0..SAMPLES {
            let start = Instant::now();
            let page = server.search_user_directory(&searcher, term, Some(10)).await.unwrap();
            times.push(start.elapsed());
            found = page.results.len();
        }
        times.sort();
        println!("| `{term}` | {found} | {:.1} ms | {:.1} ms |", percentile(&times, 0.5), percentile(&times, 0.99));
    }
}
