//! Delayed-event benchmarks (MSC4140, issue #12) of the real `lattice` binary on loopback:
//!
//! 1. scheduling: `--events N` (default 10,000) delayed messages scheduled by 100 users in 10
//!    rooms, 32 requests at a time; measured: requests per second and their latency;
//! 2. delivery: all of them fall due at the same moment; measured: from that moment until an
//!    observer in every room has seen every message through `/sync`, as events per second;
//! 3. heartbeats: `restart` of 100 scheduled events, 10,000 times, 32 at a time, through the
//!    unauthenticated per-action endpoint, as Element Call's clients restart theirs.
//!
//! Usage: `cargo run --release --example delayed_events_bench -- [path/to/lattice] [--events N]`
//! (default binary: `$CARGO_TARGET_DIR/release/lattice`). Prints a Markdown table.

#[path = "bench_support/mod.rs"]
mod bench_support;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;
use tokio::task::JoinSet;

use bench_support::{BenchServer as Server, Error, summary};

const USERS: usize = 100;
const ROOMS: usize = 10;
const CONCURRENCY: usize = 32;
const UNSTABLE: &str = "/_matrix/client/unstable/org.matrix.msc4140";

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Runs `jobs` with at most [`CONCURRENCY`] at once; the latency of each, in milliseconds.
async fn run_all<F, Fut>(count: usize, job: F) -> Result<Vec<f64>, Error>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<(), Error>> + Send + 'static,
{
    let mut running = JoinSet::new();
    let mut latencies = Vec::with_capacity(count);
    for i in 0..count {
        while running.len() >= CONCURRENCY {
            latencies.push(running.join_next().await.ok_or("no task")???);
        }
        let one = job(i);
        running.spawn(async move {
            let started = Instant::now();
            one.await?;
            Ok::<f64, Error>(started.elapsed().as_secs_f64() * 1000.0)
        });
    }
    while let Some(done) = running.join_next().await {
        latencies.push(done??);
    }
    Ok(latencies)
}

/// An observer syncs until it has seen `expected` messages in its rooms; when it saw the last.
async fn observe(server: Arc<Server>, token: String, since: String, expected: usize) -> Result<Instant, Error> {
    let mut since = since;
    let mut seen = 0;
    while seen < expected {
        let path = format!("/_matrix/client/v3/sync?timeout=10000&since={since}");
        let body = server.call(reqwest::Method::GET, &path, Some(&token), None).await?;
        since = body["next_batch"].as_str().ok_or("no next_batch")?.to_owned();
        if let Some(rooms) = body["rooms"]["join"].as_object() {
            for room in rooms.values() {
                let events = room["timeline"]["events"].as_array().map(Vec::as_slice).unwrap_or_default();
                seen += events.iter().filter(|e| e["type"] == "m.room.message").count();
            }
        }
    }
    Ok(Instant::now())
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let events: usize = args
        .iter()
        .position(|a| a == "--events")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(10_000);
    let default_binary = format!("{}/release/lattice", std::env::var("CARGO_TARGET_DIR").unwrap_or("target".into()));
    let binary =
        args.iter().find(|a| !a.starts_with("--") && a.parse::<usize>().is_err()).cloned().unwrap_or(default_binary);
    let dir = tempfile::tempdir()?;
    let server = Arc::new(Server::start(&binary, dir.path(), &[("LATTICE_PRESENCE__ENABLED", "false".into())]).await?);

    // 100 users in 10 rooms (10 each), and an observer in every room.
    let observer = server.register("observer").await?.0;
    let mut rooms = Vec::with_capacity(ROOMS);
    for _ in 0..ROOMS {
        let body = json!({ "preset": "public_chat" });
        let created =
            server.call(reqwest::Method::POST, "/_matrix/client/v3/createRoom", Some(&observer), Some(&body)).await?;
        rooms.push(created["room_id"].as_str().ok_or("no room")?.to_owned());
    }
    let mut users = Vec::with_capacity(USERS);
    for i in 0..USERS {
        let token = server.register(&format!("u{i}")).await?.0;
        let path = format!("/_matrix/client/v3/join/{}", rooms[i % ROOMS]);
        server.call(reqwest::Method::POST, &path, Some(&token), Some(&json!({}))).await?;
        users.push(token);
    }
    let since = server.call(reqwest::Method::GET, "/_matrix/client/v3/sync?timeout=0", Some(&observer), None).await?;
    let since = since["next_batch"].as_str().ok_or("no next_batch")?.to_owned();
    let (users, rooms) = (Arc::new(users), Arc::new(rooms));

    // 1. Scheduling, every event due at one moment well after the last is scheduled.
    let due_at = now_ms() + 120_000;
    let scheduling = Instant::now();
    let latencies = run_all(events, |i| {
        let (server, users, rooms) = (server.clone(), users.clone(), rooms.clone());
        async move {
            let delay = due_at.saturating_sub(now_ms()).max(1);
            let path = format!(
                "/_matrix/client/v3/rooms/{}/send/m.room.message/t{i}?org.matrix.msc4140.delay={delay}",
                rooms[(i % USERS) % ROOMS]
            );
            let body = json!({ "msgtype": "m.text", "body": format!("m{i}") });
            server.call(reqwest::Method::PUT, &path, Some(&users[i % USERS]), Some(&body)).await?;
            Ok(())
        }
    })
    .await?;
    let scheduled_in = scheduling.elapsed().as_secs_f64();
    if now_ms() >= due_at {
        return Err("scheduling took longer than the delay; use fewer --events".into());
    }
    let (p50, p99) = summary(latencies);
    let mut rows = vec![format!(
        "| schedule a delayed message (`/send?org.matrix.msc4140.delay`), {USERS} users, {ROOMS} rooms, {CONCURRENCY} at a time | {events} events | {:.0} /s; p50 {p50:.1} ms, p99 {p99:.1} ms |",
        events as f64 / scheduled_in
    )];

    // 2. Delivery: from the due moment until the observer has seen every message.
    let watcher = tokio::spawn(observe(server.clone(), observer.clone(), since, events));
    tokio::time::sleep(Duration::from_millis(due_at.saturating_sub(now_ms()))).await;
    let due = Instant::now();
    let last_seen = watcher.await??;
    let delivered_in = last_seen.saturating_duration_since(due).as_secs_f64();
    rows.push(format!(
        "| delivery: all fall due at once; until an observer's `/sync` has every one | {events} events | {delivered_in:.1} s, {:.0} events/s |",
        events as f64 / delivered_in
    ));

    // 3. Heartbeats: restarts of 100 scheduled events.
    let mut delay_ids = Vec::with_capacity(USERS);
    for (i, token) in users.iter().enumerate() {
        let path = format!(
            "/_matrix/client/v3/rooms/{}/send/m.room.message/hb{i}?org.matrix.msc4140.delay=3600000",
            rooms[i % ROOMS]
        );
        let body = json!({ "msgtype": "m.text", "body": "left" });
        let answer = server.call(reqwest::Method::PUT, &path, Some(token), Some(&body)).await?;
        delay_ids.push(answer["delay_id"].as_str().ok_or("no delay_id")?.to_owned());
    }
    let delay_ids = Arc::new(delay_ids);
    let restarts = 10_000;
    let heartbeats = Instant::now();
    let latencies = run_all(restarts, |i| {
        let (server, delay_ids) = (server.clone(), delay_ids.clone());
        async move {
            let path = format!("{UNSTABLE}/delayed_events/{}/restart", delay_ids[i % delay_ids.len()]);
            server.call(reqwest::Method::POST, &path, None, Some(&json!({}))).await?;
            Ok(())
        }
    })
    .await?;
    let rate = restarts as f64 / heartbeats.elapsed().as_secs_f64();
    let (p50, p99) = summary(latencies);
    rows.push(format!(
        "| heartbeat: `POST …/delayed_events/{{id}}/restart`, 100 events, {CONCURRENCY} at a time | {restarts} restarts | {rate:.0} /s; p50 {p50:.1} ms, p99 {p99:.1} ms |"
    ));

    println!("| what | load | result |\n|---|---|---|");
    for row in rows {
        println!("{row}");
    }
    Ok(())
}
