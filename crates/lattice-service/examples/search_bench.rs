//! Benchmark: message search (`POST /search`, the service call, no HTTP) over 100,000 messages
//! in 100 rooms on RocksDB, the searcher joined to all of them; and what indexing costs a send
//! (messages of ten words, against the same content under a type that is not indexed).
//!
//! Run: `cargo build --release --workspace --all-targets` then
//! `$CARGO_TARGET_DIR/release/examples/search_bench` (`SEARCH_BENCH_MESSAGES` to change the
//! total, default 100,000).

use std::sync::Arc;
use std::time::{Duration, Instant};

use lattice_service::rooms::{CreateRoom, Preset, SearchCriteria};
use lattice_service::{PasswordHasher, RegistrationMode, Service, ServiceConfig, SystemClock};
use lattice_storage::{RocksOptions, RocksStore};
use ruma::signatures::Ed25519KeyPair;
use ruma::{OwnedRoomId, UserId};
use serde_json::json;

const ROOMS: usize = 100;
const VOCABULARY: u64 = 5_000;
const WORDS_PER_MESSAGE: usize = 10;
/// One message in this many has the rare word.
const RARE_EVERY: usize = 10_000;
const SAMPLES: usize = 100;
/// Messages per room sent with and without indexing, to time the index's cost.
const COST_SAMPLE: usize = 2_000;

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

/// A deterministic pseudo-random word stream (xorshift).
struct Words(u64);

impl Words {
    fn next(&mut self) -> String {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        format!("w{}", self.0 % VOCABULARY)
    }

    fn message(&mut self, n: usize) -> String {
        let mut words: Vec<String> = (0..WORDS_PER_MESSAGE).map(|_| self.next()).collect();
        words.push("everyone".into());
        if n.is_multiple_of(RARE_EVERY) {
            words.push("needle".into());
        }
        words.join(" ")
    }
}

/// Sends `per_room` messages of `kind` to every room, the rooms concurrently; messages per second.
async fn send_all(server: &Arc<Service>, rooms: &[OwnedRoomId], per_room: usize, kind: &'static str, seed: u64) -> f64 {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (r, room_id) in rooms.iter().enumerate() {
        let (server, room_id) = (server.clone(), room_id.clone());
        tasks.push(tokio::spawn(async move {
            let sender = UserId::parse(format!("@owner{r:03}:hs.test")).unwrap();
            let mut words = Words(seed + r as u64 * 7919 + 1);
            for i in 0..per_room {
                let body = words.message(r + i * ROOMS);
                let content = json!({ "msgtype": "m.text", "body": body });
                server.rooms().send_event(&sender, &room_id, kind, None, content, None).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    (rooms.len() * per_room) as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let total: usize = std::env::var("SEARCH_BENCH_MESSAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let per_room = total / ROOMS;
    let dir = tempfile::tempdir().unwrap();
    let server = Arc::new(service(dir.path()));
    let searcher = UserId::parse("@searcher:hs.test").unwrap();
    let mut rooms = Vec::new();
    for room in 0..ROOMS {
        let owner = UserId::parse(format!("@owner{room:03}:hs.test")).unwrap();
        let public = CreateRoom { preset: Some(Preset::PublicChat), ..Default::default() };
        let room_id = server.rooms().create_room(&owner, public).await.unwrap();
        server.rooms().join_room(&searcher, &room_id, None).await.unwrap();
        rooms.push(room_id);
    }

    // The cost of indexing: the same bodies under a type the index skips, then indexed.
    let cost_rooms = &rooms[..10];
    let unindexed = send_all(&server, cost_rooms, COST_SAMPLE / 10, "org.example.unindexed", 99).await;
    let indexed = send_all(&server, cost_rooms, COST_SAMPLE / 10, "m.room.message", 99).await;
    println!("send rate, {COST_SAMPLE} messages of {WORDS_PER_MESSAGE} words in 10 rooms:");
    println!("| event type | messages/s |\n|---|---|");
    println!("| not indexed (`org.example.unindexed`) | {unindexed:.0} |");
    println!("| indexed (`m.room.message`) | {indexed:.0} |");

    let started = Instant::now();
    let rate = send_all(&server, &rooms, per_room, "m.room.message", 1).await;
    println!(
        "\n{} messages in {ROOMS} rooms sent in {:.1} s ({rate:.0}/s)\n",
        per_room * ROOMS,
        started.elapsed().as_secs_f64()
    );

    println!("| query | order | results (count) | p50 | p99 |");
    println!("|---|---|---|---|---|");
    let queries = [
        ("needle", "recent"),
        ("needle", "rank"),
        ("w42", "recent"),
        ("w42", "rank"),
        ("everyone", "recent"),
        ("everyone", "rank"),
        ("w42 w43", "recent"),
        ("everyone w1", "recent"),
        ("w12", "recent"),
        ("nothing", "recent"),
    ];
    for (term, order) in queries {
        let mut times = Vec::with_capacity(SAMPLES);
        let mut summary = String::new();
        for _ in 0..SAMPLES {
            let criteria: SearchCriteria =
                serde_json::from_value(json!({ "search_term": term, "order_by": order })).unwrap();
            let start = Instant::now();
            let page = server.rooms().search_room_events(&searcher, criteria, None).await.unwrap();
            times.push(start.elapsed());
            summary = format!("{} ({})", page["results"].as_array().map_or(0, Vec::len), page["count"]);
        }
        times.sort();
        println!(
            "| `{term}` | {order} | {summary} | {:.2} ms | {:.2} ms |",
            percentile(&times, 0.5),
            percentile(&times, 0.99)
        );
    }
}
