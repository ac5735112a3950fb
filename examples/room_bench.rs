//! Room benchmarks of the real `lattice` binary on loopback (issue #5):
//!
//! 1. messages per second spread over 100 rooms (10 concurrent senders);
//! 2. send → `/sync` latency: 10 clients long-polling one room while messages arrive at 20/s;
//! 3. initial `/sync` of a user in 100 rooms × 1,000 events, lazy-loading members, and the
//!    server's RSS after it;
//! 4. incremental `/sync` of a user in 500 rooms when one of them changed;
//! 5. empty wake-ups of 100 idle long-polls while 10 other users send 20 msg/s in their own
//!    rooms (a `/sync` that returns before its timeout with nothing in it).
//!
//! 6. `/messages` page latency: a reader pages back through the history rooms of 3, 20 events
//!    a page, 10 pages a room (issue #10: history in topological order).
//!
//! 7. push rules (issue #12): messages per second into one room of 3 local members and one of
//!    `--members N` (default 100), 10 concurrent senders; each message is evaluated against the
//!    push rules of every member but its sender.
//!
//! `--push-only` runs only 7; `--sync-only` runs only 4 and 5; `--history-only` only the history rooms and 6.
//! `--durable-only` runs only 1 across the rooms, on two fresh
//! servers: `storage.sync_writes` off, then on (issue #10: durable writes), with 10 and with
//! `--senders N` (default 50) concurrent senders; with `--url`, once against that server.
//! Usage: `cargo run --release --example room_bench -- [path/to/lattice] [--quick]`
//! (default binary: `$CARGO_TARGET_DIR/release/lattice`). Prints a Markdown table.
//! `--rooms N --per-room M --seconds S` shrink the load for slow servers; `--url URL --pid PID` runs the same load against a server that is already running (e.g. a
//! local Synapse with open registration and no rate limits; `scripts/synapse-bench.sh`).

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Mutex;

type Error = Box<dyn std::error::Error + Send + Sync>;

struct Server {
    base: String,
    http: reqwest::Client,
    /// `None`: open registration (a dummy stage) on a server this benchmark did not start.
    registration_token: Option<String>,
    pid: u32,
    _child: Option<Child>,
}

impl Server {
    async fn start(binary: &str, data_dir: &std::path::Path, sync_writes: Option<bool>) -> Result<Self, Error> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut command = Command::new(binary);
        // `None`: the binary's default, whatever it is.
        if let Some(sync_writes) = sync_writes {
            command.env("LATTICE_STORAGE__SYNC_WRITES", sync_writes.to_string());
        }
        let mut child = command
            .arg("serve")
            .env("LATTICE_DATA_DIR", data_dir)
            .env("LATTICE_LISTEN__ADDRESS", format!("127.0.0.1:{port}"))
            .env("LATTICE_SERVER_NAME", "bench.localhost")
            .env("LATTICE_RATE_LIMITS__ENABLED", "false")
            .env("LATTICE_AUTH__PASSWORD_HASH_MEMORY_KIB", "1024")
            .env("LATTICE_AUTH__PASSWORD_HASH_ITERATIONS", "1")
            .env("LATTICE_LOGGING__LEVEL", "warn")
            .env_remove("LATTICE_CONFIG")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let mut lines = BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
        let prefix = "First start: registration token (shown only now): ";
        let registration_token = loop {
            match tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await?? {
                Some(line) if line.starts_with(prefix) => break line[prefix.len()..].trim().to_owned(),
                Some(_) => continue,
                None => return Err("the server exited before printing a registration token".into()),
            }
        };
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let http = reqwest::Client::builder().no_proxy().pool_max_idle_per_host(64).build()?;
        let pid = child.id().unwrap_or(0);
        let base = format!("http://127.0.0.1:{port}");
        let server = Self { base, http, registration_token: Some(registration_token), pid, _child: Some(child) };
        server.wait_serving().await?;
        Ok(server)
    }

    /// A server someone else started.
    async fn existing(base: &str, pid: u32) -> Result<Self, Error> {
        let http = reqwest::Client::builder().no_proxy().pool_max_idle_per_host(64).build()?;
        let server =
            Self { base: base.trim_end_matches('/').to_owned(), http, registration_token: None, pid, _child: None };
        server.wait_serving().await?;
        Ok(server)
    }

    async fn wait_serving(&self) -> Result<(), Error> {
        for _ in 0..600 {
            if self.http.get(format!("{}/_matrix/client/versions", self.base)).send().await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err("the server did not start serving".into())
    }

    fn rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap_or_default();
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        kib / 1024.0
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Result<Value, Error> {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await?;
        let status = response.status();
        let value: Value = response.json().await?;
        if !status.is_success() {
            return Err(format!("{path}: {status} {value}").into());
        }
        Ok(value)
    }

    async fn register(&self, name: &str) -> Result<String, Error> {
        let body = json!({ "username": name, "password": "bench-password" });
        let challenge = self.http.post(format!("{}/_matrix/client/v3/register", self.base)).json(&body).send().await?;
        let session = challenge.json::<Value>().await?["session"].as_str().ok_or("no UIA session")?.to_owned();
        let mut body = body;
        body["auth"] = match &self.registration_token {
            Some(token) => json!({ "type": "m.login.registration_token", "token": token, "session": session }),
            None => json!({ "type": "m.login.dummy", "session": session }),
        };
        let done = self.call(reqwest::Method::POST, "/_matrix/client/v3/register", None, Some(body)).await?;
        Ok(done["access_token"].as_str().ok_or("no access token")?.to_owned())
    }

    async fn create_room(&self, token: &str, body: Value) -> Result<String, Error> {
        let created =
            self.call(reqwest::Method::POST, "/_matrix/client/v3/createRoom", Some(token), Some(body)).await?;
        Ok(created["room_id"].as_str().ok_or("no room_id")?.to_owned())
    }

    async fn join(&self, token: &str, room: &str) -> Result<(), Error> {
        self.call(reqwest::Method::POST, &format!("/_matrix/client/v3/join/{room}"), Some(token), Some(json!({})))
            .await?;
        Ok(())
    }

    async fn send(&self, token: &str, room: &str, txn: &str, body: &str) -> Result<(), Error> {
        let path = format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/{txn}");
        self.call(reqwest::Method::PUT, &path, Some(token), Some(json!({ "msgtype": "m.text", "body": body }))).await?;
        Ok(())
    }

    async fn sync(&self, token: &str, query: &str) -> Result<Value, Error> {
        self.call(reqwest::Method::GET, &format!("/_matrix/client/v3/sync?{query}"), Some(token), None).await
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn urlencode(s: &str) -> String {
    s.bytes().map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") }).collect()
}

/// Sends as fast as `senders` concurrent clients can into `rooms`, for `duration`.
async fn send_rate(
    server: &Arc<Server>,
    token: &str,
    rooms: &[String],
    senders: usize,
    duration: Duration,
) -> (f64, u64) {
    let sent = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for worker in 0..senders {
        let (server, token, rooms, sent, failed) =
            (server.clone(), token.to_owned(), rooms.to_vec(), sent.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0usize;
            while Instant::now() < deadline {
                let room = &rooms[(worker + n * senders) % rooms.len()];
                match server.send(&token, room, &format!("rate-{worker}-{n}"), "benchmark message").await {
                    Ok(()) => sent.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
                n += 1;
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    (sent.load(Ordering::Relaxed) as f64 / duration.as_secs_f64(), failed.load(Ordering::Relaxed))
}

/// 10 clients long-poll `/sync` on one room while one client sends at `rate` per second;
/// returns every (client, message) latency in milliseconds, sorted.
async fn sync_latency(
    server: &Arc<Server>,
    readers: &[String],
    sender: &str,
    room: &str,
    rate: u32,
    messages: u32,
) -> Result<Vec<f64>, Error> {
    let sent_at: Arc<Mutex<HashMap<u32, Instant>>> = Arc::default();
    let samples: Arc<Mutex<Vec<f64>>> = Arc::default();
    let filter = urlencode(&json!({ "room": { "timeline": { "limit": 100 } } }).to_string());
    let mut tasks = Vec::new();
    for token in readers {
        let (server, token, sent_at, samples, filter, room) =
            (server.clone(), token.clone(), sent_at.clone(), samples.clone(), filter.clone(), room.to_owned());
        let first = server.sync(&token, &format!("filter={filter}")).await?;
        let mut since = first["next_batch"].as_str().ok_or("no next_batch")?.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut received = 0;
            while received < messages {
                let Ok(batch) = server.sync(&token, &format!("since={since}&timeout=30000&filter={filter}")).await
                else {
                    break;
                };
                let now = Instant::now();
                for event in batch["rooms"]["join"][&room]["timeline"]["events"].as_array().into_iter().flatten() {
                    let Some(n) = event["content"]["body"]
                        .as_str()
                        .and_then(|b| b.strip_prefix("lat:"))
                        .and_then(|n| n.parse().ok())
                    else {
                        continue;
                    };
                    if let Some(at) = sent_at.lock().await.get(&n) {
                        samples.lock().await.push(now.duration_since(*at).as_secs_f64() * 1000.0);
                    }
                    received += 1;
                }
                since = batch["next_batch"].as_str().unwrap_or(&since).to_owned();
            }
        }));
    }
    let interval = Duration::from_secs(1) / rate;
    let mut ticker = tokio::time::interval(interval);
    for n in 0..messages {
        ticker.tick().await;
        sent_at.lock().await.insert(n, Instant::now());
        server.send(sender, room, &format!("lat-{n}"), &format!("lat:{n}")).await?;
    }
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
    }
    let mut samples = samples.lock().await.clone();
    samples.sort_by(f64::total_cmp);
    Ok(samples)
}

/// Fills `rooms` to `per_room` messages each, from `senders` rotating.
async fn fill_rooms(
    server: &Arc<Server>,
    senders: &[String],
    rooms: &[String],
    per_room: usize,
) -> Result<Duration, Error> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (worker, chunk) in rooms.chunks(rooms.len().div_ceil(10)).enumerate() {
        let (server, senders, chunk) = (server.clone(), senders.to_vec(), chunk.to_vec());
        tasks.push(tokio::spawn(async move {
            for room in &chunk {
                for i in 0..per_room {
                    let token = &senders[i % senders.len()];
                    server
                        .send(token, room, &format!("fill-{worker}-{room}-{i}"), &format!("history message {i}"))
                        .await?;
                }
            }
            Ok::<(), Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(start.elapsed())
}

/// Incremental `/sync` latencies (ms, sorted) of a user in `rooms_n` rooms, each sync after
/// one message in one of the rooms.
async fn incremental_sync_latency(server: &Arc<Server>, rooms_n: usize, samples: usize) -> Result<Vec<f64>, Error> {
    let member = server.register("many_rooms").await?;
    let mut rooms = Vec::new();
    for i in 0..rooms_n {
        rooms.push(server.create_room(&member, json!({ "name": format!("busy {i}") })).await?);
    }
    let first = server.sync(&member, "").await?;
    let mut since = first["next_batch"].as_str().ok_or("no next_batch")?.to_owned();
    let mut times = Vec::new();
    for n in 0..samples {
        server.send(&member, &rooms[(n * 7919) % rooms.len()], &format!("inc-{n}"), "one change").await?;
        let start = Instant::now();
        let batch = server.sync(&member, &format!("since={since}&timeout=0")).await?;
        times.push(start.elapsed().as_secs_f64() * 1000.0);
        let changed = batch["rooms"]["join"].as_object().map_or(0, |j| j.len());
        if changed != 1 {
            return Err(format!("expected one changed room, got {changed}").into());
        }
        since = batch["next_batch"].as_str().ok_or("no next_batch")?.to_owned();
    }
    times.sort_by(f64::total_cmp);
    Ok(times)
}

/// What the idle long-polls of [`empty_wakeups`] saw: empty early answers, all answers, and the
/// server's RSS while they all waited.
struct IdlePolls {
    empty: u64,
    answers: u64,
    rss_waiting_mib: f64,
}

/// `idle` long-polls (`timeout_ms`), spread over at most 1,000 users in no room, while `talkers`
/// users send `rate` messages per second in total, each in a room of their own, for `duration`.
async fn empty_wakeups(
    server: &Arc<Server>,
    idle: usize,
    talkers: usize,
    rate: u32,
    duration: Duration,
    timeout_ms: u64,
) -> Result<IdlePolls, Error> {
    let mut talking = Vec::new();
    for i in 0..talkers {
        let token = server.register(&format!("talker_idle{i}")).await?;
        let room = server.create_room(&token, json!({ "name": format!("chatter {i}") })).await?;
        talking.push((token, room));
    }
    let empty = Arc::new(AtomicU64::new(0));
    let answers = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let mut users = Vec::new();
    for i in 0..idle.min(1_000) {
        let token = server.register(&format!("idle{i}")).await?;
        let first = server.sync(&token, "").await?;
        users.push((token, first["next_batch"].as_str().ok_or("no next_batch")?.to_owned()));
    }
    // The clock starts once every user exists: registration is slow on some servers (Synapse
    // hashes each password with bcrypt), and a deadline taken before it could pass before the
    // first long-poll.
    let deadline = Instant::now() + duration;
    for i in 0..idle {
        let (token, mut since) = users[i % users.len()].clone();
        let (server, empty, answers) = (server.clone(), empty.clone(), answers.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let start = Instant::now();
                let Ok(batch) = server.sync(&token, &format!("since={since}&timeout={timeout_ms}")).await else {
                    break;
                };
                answers.fetch_add(1, Ordering::Relaxed);
                let nothing = batch["rooms"]
                    .as_object()
                    .is_none_or(|rooms| rooms.values().all(|section| section.as_object().is_none_or(|s| s.is_empty())));
                if nothing && start.elapsed() < Duration::from_millis(timeout_ms) {
                    empty.fetch_add(1, Ordering::Relaxed);
                }
                since = batch["next_batch"].as_str().unwrap_or(&since).to_owned();
            }
        }));
    }
    let mut ticker = tokio::time::interval(Duration::from_secs(1) / rate);
    let mut n = 0usize;
    let mut rss_waiting_mib = 0.0f64;
    while Instant::now() < deadline {
        rss_waiting_mib = rss_waiting_mib.max(server.rss_mib());
        ticker.tick().await;
        let (token, room) = &talking[n % talking.len()];
        server.send(token, room, &format!("idle-{n}"), "chatter").await?;
        n += 1;
    }
    for task in tasks {
        let _ = task.await;
    }
    Ok(IdlePolls { empty: empty.load(Ordering::Relaxed), answers: answers.load(Ordering::Relaxed), rss_waiting_mib })
}

/// How big the sync sections are: rooms of the incremental-sync user, idle long-polls.
#[derive(Clone, Copy)]
struct SyncScale {
    rooms: usize,
    idle: usize,
}

/// Sections 4 and 5: incremental sync cost and empty long-poll wake-ups.
async fn sync_sections(server: &Arc<Server>, quick: bool, scale: SyncScale) -> Result<(), Error> {
    let SyncScale { rooms: rooms_n, idle } = scale;
    let times = incremental_sync_latency(server, rooms_n, if quick { 20 } else { 100 }).await?;
    let (p50, p99) = (percentile(&times, 0.5), percentile(&times, 0.99));
    eprintln!("incremental sync in {rooms_n} rooms, one changed: p50 {p50:.2} ms, p99 {p99:.2} ms");
    let seconds = if quick { 5 } else { 20 };
    let rss_before = server.rss_mib();
    let polls = empty_wakeups(server, idle, 10, 20, Duration::from_secs(seconds), 5_000).await?;
    let IdlePolls { empty, answers, rss_waiting_mib } = polls;
    eprintln!(
        "idle long-polls: {empty} empty early answers of {answers}; RSS {rss_before:.1} → {rss_waiting_mib:.1} MiB"
    );
    println!(
        "| incremental /sync of a user in {rooms_n} rooms, one room changed ({} samples) | p50 **{p50:.2} ms**, p99 **{p99:.2} ms** |",
        times.len()
    );
    println!(
        "| empty wake-ups of {idle} idle long-polls (timeout 5 s) while 10 others send 20 msg/s for {seconds} s | **{empty}** of {answers} answers |"
    );
    println!(
        "| server RSS before / while {idle} long-polls wait | {rss_before:.1} MiB / **{rss_waiting_mib:.1} MiB** |"
    );
    Ok(())
}

/// Section 1 with `storage.sync_writes` off and on, each on a fresh server and data directory.
async fn durable_section(binary: &str, rooms_n: usize, senders: usize, duration: Duration) -> Result<(), Error> {
    println!("| measure | sync_writes = false | sync_writes = true |");
    println!("|---|---|---|");
    let mut columns = Vec::new();
    for sync_writes in [false, true] {
        let data = tempfile::tempdir()?;
        let server = Arc::new(Server::start(binary, data.path(), Some(sync_writes)).await?);
        columns.push(rates_across_rooms(&server, rooms_n, senders, duration).await?);
    }
    for (row, (label, _)) in columns[0].iter().enumerate() {
        let cells: Vec<&str> = columns.iter().map(|column| column[row].1.as_str()).collect();
        println!("| {label} | {} |", cells.join(" | "));
    }
    Ok(())
}

/// Section 1 on its own, for [`durable_section`] and for a server at `--url`: the send rate
/// across `rooms_n` fresh rooms with 10 and with `senders` concurrent senders, as table rows
/// (label, cell).
async fn rates_across_rooms(
    server: &Arc<Server>,
    rooms_n: usize,
    senders: usize,
    duration: Duration,
) -> Result<Vec<(String, String)>, Error> {
    let owner = server.register("owner").await?;
    let mut rooms = Vec::new();
    for i in 0..rooms_n {
        rooms.push(server.create_room(&owner, json!({ "name": format!("rate {i}") })).await?);
    }
    let mut rows = Vec::new();
    for concurrency in [10, senders] {
        let (rate, failed) = send_rate(server, &owner, &rooms, concurrency, duration).await;
        eprintln!("{rate:.0} msg/s over {rooms_n} rooms, {concurrency} senders ({failed} failed)");
        let label =
            format!("messages/s across {rooms_n} rooms ({concurrency} concurrent senders, {}s)", duration.as_secs());
        rows.push((label, format!("**{rate:.0}** ({failed} failed)")));
    }
    Ok(rows)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let binary = args.first().filter(|a| !a.starts_with("--")).cloned().unwrap_or(format!("{target}/release/lattice"));
    let option = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let number = |name: &str, default: u64| option(name).and_then(|v| v.parse().ok()).unwrap_or(default);
    let rooms_n = number("--rooms", if quick { 10 } else { 100 }) as usize;
    let per_room = number("--per-room", if quick { 50 } else { 1_000 }) as usize;
    let duration = Duration::from_secs(number("--seconds", if quick { 2 } else { 10 }));
    let sync_scale = SyncScale {
        rooms: number("--sync-rooms", if quick { 100 } else { 500 }) as usize,
        idle: number("--idle", 100) as usize,
    };
    let senders = number("--senders", 50) as usize;
    if args.iter().any(|a| a == "--durable-only") && option("--url").is_none() {
        return durable_section(&binary, rooms_n, senders, duration).await;
    }

    let data = tempfile::tempdir()?;
    let server = Arc::new(match option("--url") {
        Some(url) => Server::existing(&url, option("--pid").and_then(|p| p.parse().ok()).unwrap_or(0)).await?,
        None => Server::start(&binary, data.path(), option("--sync-writes").and_then(|v| v.parse().ok())).await?,
    });
    eprintln!("server up at {}, idle RSS {:.1} MiB", server.base, server.rss_mib());
    if args.iter().any(|a| a == "--durable-only") {
        // A server at `--url` keeps its own durability settings: one column.
        println!("| measure | server at --url |");
        println!("|---|---|");
        for (label, cell) in rates_across_rooms(&server, rooms_n, senders, duration).await? {
            println!("| {label} | {cell} |");
        }
        return Ok(());
    }
    if args.iter().any(|a| a == "--sync-only") {
        println!("| measure | {} |", if option("--url").is_some() { "server at --url" } else { "Lattice" });
        println!("|---|---|");
        return sync_sections(&server, quick, sync_scale).await;
    }

    if args.iter().any(|a| a == "--history-only") {
        let (reader, history_rooms, _) = history_rooms(&server, rooms_n, per_room).await?;
        println!("| measure | {} |", if option("--url").is_some() { "server at --url" } else { "Lattice" });
        println!("|---|---|");
        return print_messages_latency(&server, &reader, &history_rooms).await;
    }

    // 1. Send rate across 100 rooms.
    let owner = server.register("owner").await?;
    if args.iter().any(|a| a == "--push-only") {
        let members = number("--members", 100) as usize;
        return push_section(&server, &owner, members, duration).await;
    }
    if args.iter().any(|a| a == "--latency-only") {
        let messages = number("--messages", 1_000) as usize;
        let (latencies, p50, p99) = latency_section(&server, &owner, messages).await?;
        println!("| measure | Lattice |");
        println!("|---|---|");
        println!(
            "| send → /sync latency, 10 long-polling clients, 20 msg/s ({} samples) | p50 **{p50:.2} ms**, p99 **{p99:.2} ms** |",
            latencies.len()
        );
        return Ok(());
    }
    let mut rate_rooms = Vec::new();
    for i in 0..rooms_n {
        rate_rooms.push(server.create_room(&owner, json!({ "name": format!("rate {i}") })).await?);
    }
    let (rate_many, failed_many) = send_rate(&server, &owner, &rate_rooms, 10, duration).await;
    let (rate_one, failed_one) = send_rate(&server, &owner, &rate_rooms[..1], 10, duration).await;
    eprintln!(
        "send rate: {rate_many:.0} msg/s over {rooms_n} rooms ({failed_many} failed), {rate_one:.0} msg/s into one room ({failed_one} failed)"
    );

    // 2. send → sync latency with 10 waiting clients at 20 msg/s.
    let messages = if quick { 40 } else { 200 };
    let (latencies, p50, p99) = latency_section(&server, &owner, messages).await?;

    // 3. Initial sync of a user in 100 rooms × 1,000 events, lazy-loading members.
    let (reader, history_rooms, fill_rate) = history_rooms(&server, rooms_n, per_room).await?;
    let fill_time = Duration::from_secs_f64((rooms_n * per_room) as f64 / fill_rate);
    let filter = urlencode(
        &json!({ "room": { "state": { "lazy_load_members": true }, "timeline": { "limit": 20 } } }).to_string(),
    );
    let mut times = Vec::new();
    let mut joined_rooms = 0;
    for _ in 0..5 {
        let start = Instant::now();
        let initial = server.sync(&reader, &format!("filter={filter}")).await?;
        times.push(start.elapsed().as_secs_f64() * 1000.0);
        joined_rooms = initial["rooms"]["join"].as_object().map_or(0, |j| j.len());
    }
    let first_sync = times[0];
    times.sort_by(f64::total_cmp);
    let rss = server.rss_mib();
    eprintln!(
        "initial sync of {joined_rooms} rooms: first {first_sync:.0} ms, median {:.0} ms; RSS {rss:.1} MiB",
        percentile(&times, 0.5)
    );

    println!("| measure | {} |", if option("--url").is_some() { "server at --url" } else { "Lattice" });
    println!("|---|---|");
    println!(
        "| messages/s across {rooms_n} rooms (10 concurrent senders, {}s) | **{rate_many:.0}** ({failed_many} failed) |",
        duration.as_secs()
    );
    println!(
        "| messages/s into one room (10 concurrent senders, {}s) | **{rate_one:.0}** ({failed_one} failed) |",
        duration.as_secs()
    );
    println!(
        "| send → /sync latency, 10 long-polling clients, 20 msg/s ({} samples) | p50 **{p50:.2} ms**, p99 **{p99:.2} ms** |",
        latencies.len()
    );
    println!(
        "| filling {rooms_n} rooms × {per_room} messages from 5 users (10 concurrent) | {:.1} s ({fill_rate:.0} msg/s) |",
        fill_time.as_secs_f64()
    );
    println!(
        "| initial /sync, {joined_rooms} rooms × {per_room} events, lazy-loaded members, timeline limit 20 | first **{first_sync:.0} ms**, median of 5 **{:.0} ms** |",
        percentile(&times, 0.5)
    );
    println!("| server RSS after that | **{rss:.1} MiB** |");
    print_messages_latency(&server, &reader, &history_rooms).await?;
    sync_sections(&server, quick, sync_scale).await
}

/// Section 2: `messages` sends at 20 msg/s into a room where 10 readers long-poll; the
/// latencies (ms, sorted) from each send's answer to each reader's sync answer, with p50 and p99.
async fn latency_section(server: &Arc<Server>, owner: &str, messages: usize) -> Result<(Vec<f64>, f64, f64), Error> {
    let latency_room = server.create_room(owner, json!({ "preset": "public_chat" })).await?;
    let mut readers = Vec::new();
    for i in 0..10 {
        let token = server.register(&format!("reader{i}")).await?;
        server.join(&token, &latency_room).await?;
        readers.push(token);
    }
    let latencies = sync_latency(server, &readers, owner, &latency_room, 20, messages as u32).await?;
    let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));
    eprintln!("send→sync latency over {} samples: p50 {p50:.2} ms, p99 {p99:.2} ms", latencies.len());
    Ok((latencies, p50, p99))
}

/// Creates `rooms_n` public rooms that 5 talkers fill with `per_room` messages each and a
/// reader joins: the reader's token, the rooms, and the fill rate.
async fn history_rooms(
    server: &Arc<Server>,
    rooms_n: usize,
    per_room: usize,
) -> Result<(String, Vec<String>, f64), Error> {
    let mut senders = Vec::new();
    for i in 0..5 {
        senders.push(server.register(&format!("talker{i}")).await?);
    }
    let reader = server.register("historian").await?;
    let mut history_rooms = Vec::new();
    for i in 0..rooms_n {
        let room =
            server.create_room(&senders[0], json!({ "preset": "public_chat", "name": format!("history {i}") })).await?;
        for token in senders.iter().skip(1).chain([&reader]) {
            server.join(token, &room).await?;
        }
        history_rooms.push(room);
    }
    let fill_time = fill_rooms(server, &senders, &history_rooms, per_room).await?;
    let fill_rate = (rooms_n * per_room) as f64 / fill_time.as_secs_f64();
    eprintln!("filled {rooms_n} rooms × {per_room} events in {:.1} s ({fill_rate:.0} msg/s)", fill_time.as_secs_f64());
    Ok((reader, history_rooms, fill_rate))
}

/// Measure 6: the reader pages back through the rooms' history, 20 events a page, 10 pages a
/// room, one request at a time; prints the page latency.
async fn print_messages_latency(server: &Server, reader: &str, rooms: &[String]) -> Result<(), Error> {
    let mut times = Vec::new();
    let mut events = 0;
    for room in rooms {
        let mut from: Option<String> = None;
        for _ in 0..10 {
            let mut path = format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=20");
            if let Some(from) = &from {
                path.push_str(&format!("&from={from}"));
            }
            let start = Instant::now();
            let page = server.call(reqwest::Method::GET, &path, Some(reader), None).await?;
            times.push(start.elapsed().as_secs_f64() * 1000.0);
            events += page["chunk"].as_array().map_or(0, Vec::len);
            match page["end"].as_str() {
                Some(end) => from = Some(end.to_owned()),
                None => break,
            }
        }
    }
    times.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(&times, 0.5), percentile(&times, 0.99));
    eprintln!("/messages: {} pages, {events} events, p50 {p50:.2} ms, p99 {p99:.2} ms", times.len());
    println!(
        "| /messages backward, 20 events a page, {} pages over {} rooms | p50 **{p50:.2} ms**, p99 **{p99:.2} ms** |",
        times.len(),
        rooms.len()
    );
    Ok(())
}

/// Send rate into a room of 3 local members and into one of `members`: what evaluating every
/// message against each member's push rules costs.
async fn push_section(server: &Arc<Server>, owner: &str, members: usize, duration: Duration) -> Result<(), Error> {
    let small = server.create_room(owner, json!({ "preset": "public_chat" })).await?;
    let large = server.create_room(owner, json!({ "preset": "public_chat" })).await?;
    // Members register and join 16 at a time: one at a time, 10,000 of them would take most of
    // an hour on a server that hashes passwords slowly.
    let next = Arc::new(AtomicU64::new(1));
    let mut joiners = Vec::new();
    for _ in 0..16 {
        let (server, next, small, large) = (server.clone(), next.clone(), small.clone(), large.clone());
        joiners.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= members {
                    return Ok::<(), Error>(());
                }
                let member = server.register(&format!("member{i}")).await?;
                if i < 3 {
                    server.join(&member, &small).await?;
                }
                server.join(&member, &large).await?;
                if i.is_multiple_of(1_000) {
                    eprintln!("{i} members joined");
                }
            }
        }));
    }
    for joiner in joiners {
        joiner.await??;
    }
    let (rate_small, failed_small) = send_rate(server, owner, std::slice::from_ref(&small), 10, duration).await;
    let (rate_large, failed_large) = send_rate(server, owner, std::slice::from_ref(&large), 10, duration).await;
    println!("| measure | messages/s |");
    println!("|---|---|");
    println!("| into one room of 3 local members, 10 senders ({failed_small} failed) | **{rate_small:.0}** |");
    println!("| into one room of {members} local members, 10 senders ({failed_large} failed) | **{rate_large:.0}** |");
    Ok(())
}
