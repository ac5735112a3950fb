//! Federation benchmark of two real `lattice` processes on loopback (issue #11): each named by
//! IP literal and port, TLS with self-signed certificates that each trusts, no DNS.
//!
//! 1. the time a user of lat2 takes to join a room on lat1 (make_join + send_join + the state);
//! 2. delivery latency: alice on lat1 sends, bob on lat2 is long-polling `/sync`; the time from
//!    the send to bob's `/sync` answering with it (one message in flight at a time);
//! 3. throughput: alice's server sends `--burst N` messages (10 concurrent senders) and the
//!    time until all of them are in bob's `/sync`: PDUs per second through lat1's queue, lat2's
//!    `/send` with signature and hash checks, and ingest.
//!
//! 4. end-to-end encryption across the two servers (`--keys N` users, default 100, each with
//!    device keys and 5 signed one-time keys on lat2): alice on lat1 queries all N users' keys
//!    in one `/keys/query` (20 times), queries 10 users at a time (10 concurrent clients, 200
//!    queries), claims one key of each device (10 concurrent); the N users join a room of
//!    alice's, lat1 caches their device lists, and the query of all N is timed again; then `--to-device N` (default
//!    1,000) to-device messages from alice to bob's device (10 concurrent senders), until all are
//!    in bob's `/sync` on lat2.
//!
//! 5. memberships and recovery: `--knocks N` (default 50) users of lat2 knock on a room of lat1;
//!    a user of lat2 joins a room of lat1 that has `--members N` (default 1,000) members and
//!    `--state N` (default 10,000) other state events;
//!    lat2 is killed while alice sends `--catch-up N` (default 1,000) messages to a room it is
//!    in, then started again, and the time until the last is in its history is measured.
//!
//! 6. `--inbound N` (alone): N messages of a user of lat2, signed beforehand with lat2's key,
//!    pushed straight to lat1's `/send` (50 a transaction, one at a time): PDUs accepted per
//!    second with every check, to set against the raw ed25519 rate (`x_matrix_bench`). With
//!    `--inbound-rooms K` the N messages are spread over K rooms, sent to all K at once (one
//!    transaction at a time in each), as when several servers or rooms are busy together.
//!
//!    Section 5's catch-up alone: `--catch-up-only`; `--catch-up-after D` sets both servers'
//!    `federation.catch_up_after` (e.g. `1s`: lat1 compacts lat2's queue to the newest event of
//!    each room, and lat2 backfills the rest as its user pages back through all of them).
//!
//! Usage: `cargo run --release --example federation_bench -- [path/to/lattice] [--messages N]
//! [--burst N] [--keys N] [--to-device N] [--knocks N] [--state N] [--catch-up N] [--keys-only]
//! [--catch-up-only] [--catch-up-after D]` (default binary:
//! `$CARGO_TARGET_DIR/release/lattice`). Prints a Markdown table.

use std::process::Stdio;
use std::time::{Duration, Instant};

use ruma::signatures::{Ed25519KeyPair, sign_json};
use serde_json::{Value, json};
use tokio::process::{Child, Command};

type Error = Box<dyn std::error::Error + Send + Sync>;

struct Node {
    name: String,
    client: String,
    http: reqwest::Client,
    /// How the process was started, so it can be started again on the same data.
    launch: Launch,
    child: Child,
}

#[derive(Clone)]
struct Launch {
    binary: String,
    dir: std::path::PathBuf,
    ip: String,
    ca: std::path::PathBuf,
    fed_port: u16,
    client_port: u16,
    /// `federation.catch_up_after` of both servers (`--catch-up-after`, default the server's).
    catch_up_after: Option<String>,
}

fn free_port(ip: &str) -> Result<u16, Error> {
    Ok(std::net::TcpListener::bind((ip, 0))?.local_addr()?.port())
}

async fn start(
    binary: &str,
    dir: &std::path::Path,
    ip: &str,
    ca: &std::path::Path,
    catch_up_after: Option<String>,
) -> Result<Node, Error> {
    let launch = Launch {
        binary: binary.to_owned(),
        dir: dir.to_owned(),
        ip: ip.to_owned(),
        ca: ca.to_owned(),
        fed_port: free_port(ip)?,
        client_port: free_port(ip)?,
        catch_up_after,
    };
    spawn(launch).await
}

async fn spawn(launch: Launch) -> Result<Node, Error> {
    let (ip, dir) = (&launch.ip, &launch.dir);
    let name = format!("{ip}:{}", launch.fed_port);
    let tls = dir.join(format!("tls-{ip}"));
    let mut command = Command::new(&launch.binary);
    if let Some(after) = &launch.catch_up_after {
        command.env("LATTICE_FEDERATION__CATCH_UP_AFTER", after);
    }
    let child = command
        .arg("serve")
        .env("LATTICE_SERVER_NAME", &name)
        .env("LATTICE_DATA_DIR", dir.join(format!("data-{ip}")))
        .env("LATTICE_LISTEN__ADDRESS", format!("{ip}:{}", launch.client_port))
        .env("LATTICE_REGISTRATION__MODE", "open")
        .env("LATTICE_RATE_LIMITS__ENABLED", "false")
        .env("LATTICE_AUTH__PASSWORD_HASH_MEMORY_KIB", "1024")
        .env("LATTICE_AUTH__PASSWORD_HASH_ITERATIONS", "1")
        .env("LATTICE_FEDERATION__LISTEN", &name)
        .env("LATTICE_FEDERATION__TLS_CERT", tls.join("cert.pem"))
        .env("LATTICE_FEDERATION__TLS_KEY", tls.join("key.pem"))
        .env("LATTICE_FEDERATION__TRUSTED_CA", &launch.ca)
        .env("LATTICE_FEDERATION__DNS", "false")
        // Both servers are named by loopback IP literal, which the outbound policy denies by default.
        .env("LATTICE_FEDERATION__IP_RANGE_ALLOW", "[\"127.0.0.0/8\"]")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let client = format!("http://{ip}:{}", launch.client_port);
    let node = Node { name, client, http: reqwest::Client::new(), launch, child };
    for _ in 0..200 {
        if node.http.get(format!("{}/_matrix/client/versions", node.client)).send().await.is_ok() {
            return Ok(node);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!("{} did not start", node.name).into())
}

impl Node {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Result<Value, Error> {
        let mut request = self.http.request(method, format!("{}{path}", self.client));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await?;
        let status = response.status();
        let body: Value = response.json().await?;
        if !status.is_success() {
            return Err(format!("{path}: {status} {body}").into());
        }
        Ok(body)
    }

    async fn register(&self, user: &str) -> Result<String, Error> {
        Ok(self.register_device(user).await?.0)
    }

    /// Registers a user; its access token and device ID.
    async fn register_device(&self, user: &str) -> Result<(String, String), Error> {
        let body = json!({ "username": user, "password": "bench password", "auth": { "type": "m.login.dummy" } });
        let answer = self.call(reqwest::Method::POST, "/_matrix/client/v3/register", None, Some(body)).await?;
        let token = answer["access_token"].as_str().ok_or("no token")?.to_owned();
        Ok((token, answer["device_id"].as_str().ok_or("no device")?.to_owned()))
    }

    /// The server process's resident memory, from `/proc`.
    fn rss_mib(&self) -> f64 {
        let status = self.child.id().and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok());
        let kib = status.as_deref().and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        });
        kib.unwrap_or(0.0) / 1024.0
    }

    async fn say(&self, token: &str, room: &str, txn: &str) -> Result<(), Error> {
        let path = format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/{txn}");
        self.call(reqwest::Method::PUT, &path, Some(token), Some(json!({ "msgtype": "m.text", "body": txn }))).await?;
        Ok(())
    }

    async fn sync(&self, token: &str, since: &str, timeout_ms: u64) -> Result<Value, Error> {
        let path = match since {
            "" => "/_matrix/client/v3/sync?timeout=0".to_owned(),
            since => format!("/_matrix/client/v3/sync?timeout={timeout_ms}&since={since}"),
        };
        self.call(reqwest::Method::GET, &path, Some(token), None).await
    }
}

fn bodies_in(sync: &Value, room: &str) -> Vec<String> {
    sync["rooms"]["join"][room]["timeline"]["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
        .collect()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let binary = args
        .iter()
        .find(|a| !a.starts_with("--") && a.contains('/'))
        .cloned()
        .unwrap_or(format!("{target}/release/lattice"));
    let number = |flag: &str, default: usize| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (messages, burst) = (number("--messages", 300), number("--burst", 2000));
    let (key_users, to_device) = (number("--keys", 100), number("--to-device", 1000));
    let keys_only = args.iter().any(|a| a == "--keys-only");
    let catch_up_only = args.iter().any(|a| a == "--catch-up-only");
    let catch_up_after = args.iter().position(|a| a == "--catch-up-after").and_then(|i| args.get(i + 1)).cloned();
    let room_sizes =
        (number("--knocks", 50), number("--state", 10_000), number("--members", 1_000), number("--catch-up", 1_000));
    let dir = tempfile::tempdir()?;
    let ips = ["127.0.0.41", "127.0.0.42"];
    let mut bundle = String::new();
    for ip in ips {
        let out = dir.path().join(format!("tls-{ip}"));
        let status = std::process::Command::new(&binary)
            .args(["tls", "self-signed", "--name", ip, "--out"])
            .arg(&out)
            .stdout(Stdio::null())
            .status()?;
        if !status.success() {
            return Err("lattice tls self-signed failed".into());
        }
        bundle.push_str(&std::fs::read_to_string(out.join("cert.pem"))?);
    }
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, bundle)?;
    let lat1 = start(&binary, dir.path(), ips[0], &ca, catch_up_after.clone()).await?;
    let mut lat2 = start(&binary, dir.path(), ips[1], &ca, catch_up_after.clone()).await?;
    let (alice, bob) = (lat1.register("alice").await?, lat2.register("bob").await?);
    if let Some(pdus) = args.iter().position(|a| a == "--inbound").and_then(|i| args.get(i + 1)) {
        let pdus: usize = pdus.parse()?;
        let rooms = args.iter().position(|a| a == "--inbound-rooms").and_then(|i| args.get(i + 1));
        let rooms: usize = rooms.map_or(Ok(1), |r| r.parse())?.max(1);
        println!("| federation benchmark ({} → {}), inbound | value |", lat2.name, lat1.name);
        println!("|---|---|");
        println!("{}", inbound_row(&lat1, &lat2, &alice, &ca, (pdus, rooms)).await?);
        return Ok(());
    }
    if catch_up_only {
        let after = catch_up_after.as_deref().unwrap_or("the default");
        println!("| federation benchmark ({} → {}), catch_up_after {after} | value |", lat1.name, lat2.name);
        println!("|---|---|");
        println!("{}", catch_up_row(&lat1, lat2, &alice, room_sizes.3).await?.1);
        return Ok(());
    }
    if keys_only {
        for row in keys_rows(&lat1, &lat2, &alice, key_users, to_device).await? {
            println!("{row}");
        }
        return Ok(());
    }
    let room = lat1
        .call(
            reqwest::Method::POST,
            "/_matrix/client/v3/createRoom",
            Some(&alice),
            Some(json!({ "preset": "public_chat" })),
        )
        .await?;
    let room = room["room_id"].as_str().ok_or("no room")?.to_owned();

    let started = Instant::now();
    let path = format!("/_matrix/client/v3/join/{room}?via={}", lat1.name);
    lat2.call(reqwest::Method::POST, &path, Some(&bob), Some(json!({}))).await?;
    let join_ms = started.elapsed().as_secs_f64() * 1000.0;

    let mut since = lat2.sync(&bob, "", 0).await?["next_batch"].as_str().ok_or("no token")?.to_owned();
    let mut latencies = Vec::with_capacity(messages);
    for n in 0..messages {
        let txn = format!("lat-{n}");
        let sent = Instant::now();
        lat1.say(&alice, &room, &txn).await?;
        loop {
            let answer = lat2.sync(&bob, &since, 10_000).await?;
            since = answer["next_batch"].as_str().ok_or("no token")?.to_owned();
            if bodies_in(&answer, &room).contains(&txn) {
                latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
                break;
            }
            if sent.elapsed() > Duration::from_secs(30) {
                return Err(format!("{txn} did not arrive").into());
            }
        }
    }
    latencies.sort_by(f64::total_cmp);

    let started = Instant::now();
    let senders = 10;
    let mut tasks = Vec::new();
    for s in 0..senders {
        let (client, token, room) = (lat1.client.clone(), alice.clone(), room.clone());
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            for n in (s..burst).step_by(senders) {
                let path = format!("{client}/_matrix/client/v3/rooms/{room}/send/m.room.message/burst-{n}");
                http.put(path)
                    .bearer_auth(&token)
                    .json(&json!({ "msgtype": "m.text", "body": format!("burst-{n}") }))
                    .send()
                    .await?;
            }
            Ok::<(), reqwest::Error>(())
        }));
    }
    let mut seen = 0;
    while seen < burst {
        let answer = lat2.sync(&bob, &since, 10_000).await?;
        since = answer["next_batch"].as_str().ok_or("no token")?.to_owned();
        seen += bodies_in(&answer, &room).iter().filter(|b| b.starts_with("burst-")).count();
        if started.elapsed() > Duration::from_secs(300) {
            return Err(format!("only {seen} of {burst} arrived").into());
        }
    }
    let sent_in = started.elapsed().as_secs_f64();
    for task in tasks {
        task.await??;
    }

    println!("| federation benchmark ({} → {}) | value |", lat1.name, lat2.name);
    println!("|---|---|");
    println!("| join a new public room on the other server | {join_ms:.1} ms |");
    println!(
        "| delivery latency send → other server's /sync, p50 ({messages} messages) | {:.2} ms |",
        percentile(&latencies, 0.5)
    );
    println!("| delivery latency p99 | {:.2} ms |", percentile(&latencies, 0.99));
    println!(
        "| {burst} messages (10 senders) until all in the other server's /sync | {sent_in:.2} s = {:.0} PDU/s |",
        burst as f64 / sent_in
    );
    let (restarted, rows) = room_rows(&lat1, lat2, &alice, room_sizes).await?;
    lat2 = restarted;
    for row in rows {
        println!("{row}");
    }
    for row in keys_rows(&lat1, &lat2, &alice, key_users, to_device).await? {
        println!("{row}");
    }
    Ok(())
}

fn signed(object: Value, signer: &str, pair: &Ed25519KeyPair) -> Result<Value, Error> {
    let map = object.as_object().cloned().ok_or("not an object")?;
    let mut canonical = ruma::canonical_json::try_from_json_map(map)?;
    sign_json(signer, pair, &mut canonical)?;
    Ok(serde_json::to_value(canonical)?)
}

/// Registers `users` users on `node`, each publishing device keys and 5 one-time keys; their
/// user IDs and device IDs.
/// Registers `users` users on `node`, each with device keys and 5 signed one-time keys: user ID,
/// device ID and access token of each.
async fn users_with_keys(node: &Node, users: usize) -> Result<Vec<(String, String, String)>, Error> {
    let mut published = Vec::with_capacity(users);
    for n in 0..users {
        let name = format!("keyed{n:04}");
        let (token, device) = node.register_device(&name).await?;
        let user = format!("@{name}:{}", node.name);
        let pair = Ed25519KeyPair::from_der(&Ed25519KeyPair::generate(), device.clone())?;
        let public = ruma::serde::Base64::<ruma::serde::base64::Standard>::new(pair.public_key().to_vec()).encode();
        let device_keys = signed(
            json!({ "user_id": user, "device_id": device,
                    "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
                    "keys": { format!("ed25519:{device}"): public, format!("curve25519:{device}"): "curve" } }),
            &user,
            &pair,
        )?;
        let mut one_time_keys = serde_json::Map::new();
        for k in 0..5 {
            one_time_keys
                .insert(format!("signed_curve25519:{k:04}"), signed(json!({ "key": format!("k{k}") }), &user, &pair)?);
        }
        let body = json!({ "device_keys": device_keys, "one_time_keys": one_time_keys });
        node.call(reqwest::Method::POST, "/_matrix/client/v3/keys/upload", Some(&token), Some(body)).await?;
        published.push((user, device, token));
    }
    Ok(published)
}

/// Runs `jobs` requests with 10 concurrent clients; each request's latency in ms, and the
/// wall time in s.
async fn concurrently(
    node: &Node,
    token: &str,
    path: &'static str,
    bodies: Vec<Value>,
) -> Result<(Vec<f64>, f64), Error> {
    let started = Instant::now();
    let queue = std::sync::Arc::new(std::sync::Mutex::new(bodies));
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let (queue, url, token, http) =
            (queue.clone(), format!("{}{path}", node.client), token.to_owned(), node.http.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let Some(body) = queue.lock().map_err(|_| "poisoned")?.pop() else { break };
                let sent = Instant::now();
                let response = http
                    .request(
                        if path.contains("sendToDevice") { reqwest::Method::PUT } else { reqwest::Method::POST },
                        url.replace("{txn}", &format!("t{}", body["txn"])),
                    )
                    .bearer_auth(&token)
                    .json(&body["body"])
                    .send()
                    .await?;
                if !response.status().is_success() {
                    return Err(format!("{path}: {}", response.status()).into());
                }
                latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
            }
            Ok::<Vec<f64>, Error>(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await??);
    }
    latencies.sort_by(f64::total_cmp);
    Ok((latencies, started.elapsed().as_secs_f64()))
}

/// The end-to-end encryption rows: key queries and claims of lat2's users from lat1, and
/// to-device throughput from lat1 to lat2.
async fn keys_rows(lat1: &Node, lat2: &Node, alice: &str, users: usize, messages: usize) -> Result<Vec<String>, Error> {
    let keyed = users_with_keys(lat2, users).await?;
    let everyone: serde_json::Map<String, Value> = keyed.iter().map(|(user, _, _)| (user.clone(), json!([]))).collect();
    // No room shared yet: every query asks lat2.
    let whole = query_everyone(lat1, alice, &everyone, users).await?;
    let tens: Vec<Value> = (0..200)
        .map(|q| {
            let ten: serde_json::Map<String, Value> =
                (0..10).map(|i| (keyed[(q * 10 + i) % users].0.clone(), json!([]))).collect();
            json!({ "txn": q, "body": { "device_keys": ten } })
        })
        .collect();
    let (queries, query_secs) = concurrently(lat1, alice, "/_matrix/client/v3/keys/query", tens).await?;
    let claims: Vec<Value> = keyed
        .iter()
        .enumerate()
        .map(|(n, (user, device, _))| json!({ "txn": n, "body": { "one_time_keys": { user: { device: "signed_curve25519" } } } }))
        .collect();
    let (claimed, claim_secs) = concurrently(lat1, alice, "/_matrix/client/v3/keys/claim", claims).await?;
    let cached = cached_query(lat1, lat2, alice, &keyed, &everyone).await?;

    let (bob_token, bob_device) = lat2.register_device("tdbob").await?;
    let bob = format!("@tdbob:{}", lat2.name);
    let mut since = lat2.sync(&bob_token, "", 0).await?["next_batch"].as_str().ok_or("no token")?.to_owned();
    let sends: Vec<Value> = (0..messages)
        .map(|n| json!({ "txn": n, "body": { "messages": { &bob: { &bob_device: { "n": n } } } } }))
        .collect();
    let started = Instant::now();
    let (sent, _) = concurrently(lat1, alice, "/_matrix/client/v3/sendToDevice/m.bench/{txn}", sends).await?;
    let mut received = 0;
    while received < messages {
        let answer = lat2.sync(&bob_token, &since, 10_000).await?;
        since = answer["next_batch"].as_str().ok_or("no token")?.to_owned();
        received += answer["to_device"]["events"].as_array().map_or(0, Vec::len);
        if started.elapsed() > Duration::from_secs(300) {
            return Err(format!("only {received} of {messages} to-device messages arrived").into());
        }
    }
    let delivered_in = started.elapsed().as_secs_f64();
    Ok(vec![
        format!(
            "| `/keys/query` on lat1 naming all {users} users of lat2, p50 / p99 (20 queries) | {:.1} / {:.1} ms |",
            percentile(&whole, 0.5),
            percentile(&whole, 0.99)
        ),
        format!(
            "| the same once they share a room with alice (lists cached on lat1), p50 / p99 (20 queries) | {:.1} / {:.1} ms |",
            percentile(&cached, 0.5),
            percentile(&cached, 0.99)
        ),
        format!(
            "| `/keys/query` of 10 lat2 users, 10 concurrent clients: 200 queries | {:.0}/s, p50 {:.1} ms, p99 {:.1} ms |",
            200.0 / query_secs,
            percentile(&queries, 0.5),
            percentile(&queries, 0.99)
        ),
        format!(
            "| `/keys/claim` of one lat2 device's key, 10 concurrent: {users} claims | {:.0}/s, p50 {:.1} ms, p99 {:.1} ms |",
            users as f64 / claim_secs,
            percentile(&claimed, 0.5),
            percentile(&claimed, 0.99)
        ),
        format!(
            "| {messages} to-device messages lat1 → lat2 (10 concurrent senders, send p50 {:.1} ms) until all in `/sync` | {delivered_in:.2} s = {:.0} msg/s |",
            percentile(&sent, 0.5),
            messages as f64 / delivered_in
        ),
    ])
}

/// 20 `/keys/query` naming every user of `everyone` (each must be answered): latencies in ms,
/// sorted.
async fn query_everyone(
    node: &Node,
    token: &str,
    everyone: &serde_json::Map<String, Value>,
    users: usize,
) -> Result<Vec<f64>, Error> {
    let mut latencies = Vec::new();
    for _ in 0..20 {
        let sent = Instant::now();
        let body = json!({ "device_keys": everyone });
        let answer = node.call(reqwest::Method::POST, "/_matrix/client/v3/keys/query", Some(token), Some(body)).await?;
        latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
        let found = answer["device_keys"].as_object().map_or(0, serde_json::Map::len);
        if found != users {
            return Err(format!("the query found {found} of {users} users: {answer}").into());
        }
    }
    latencies.sort_by(f64::total_cmp);
    Ok(latencies)
}

/// The keyed users of lat2 join a room of alice's on lat1; a first query starts lat1 caching
/// their lists (one resync each), announced in alice's `/sync` once stored; then the query
/// naming them all is timed again, answered from the cache.
async fn cached_query(
    lat1: &Node,
    lat2: &Node,
    alice: &str,
    keyed: &[(String, String, String)],
    everyone: &serde_json::Map<String, Value>,
) -> Result<Vec<f64>, Error> {
    let room = create_room(lat1, alice, json!({ "preset": "public_chat" })).await?;
    for (_, _, token) in keyed {
        let path = format!("/_matrix/client/v3/join/{room}?via={}", lat1.name);
        lat2.call(reqwest::Method::POST, &path, Some(token), Some(json!({}))).await?;
    }
    let mut since = lat1.sync(alice, "", 0).await?["next_batch"].as_str().ok_or("no token")?.to_owned();
    let body = json!({ "device_keys": everyone });
    lat1.call(reqwest::Method::POST, "/_matrix/client/v3/keys/query", Some(alice), Some(body)).await?;
    let mut cached = std::collections::BTreeSet::new();
    let started = Instant::now();
    while cached.len() < keyed.len() {
        let answer = lat1.sync(alice, &since, 10_000).await?;
        since = answer["next_batch"].as_str().ok_or("no token")?.to_owned();
        for user in answer["device_lists"]["changed"].as_array().into_iter().flatten() {
            if let Some(user) = user.as_str().filter(|user| everyone.contains_key(*user)) {
                cached.insert(user.to_owned());
            }
        }
        if started.elapsed() > Duration::from_secs(120) {
            return Err(format!("only {} of {} lists were cached", cached.len(), keyed.len()).into());
        }
    }
    query_everyone(lat1, alice, everyone, keyed.len()).await
}

/// Creates a room on `node` as `token`'s user; its ID.
async fn create_room(node: &Node, token: &str, body: Value) -> Result<String, Error> {
    let room = node.call(reqwest::Method::POST, "/_matrix/client/v3/createRoom", Some(token), Some(body)).await?;
    Ok(room["room_id"].as_str().ok_or("no room")?.to_owned())
}

/// The body of the room's newest event as `token`'s user sees it on `node`.
async fn newest_body(node: &Node, token: &str, room: &str) -> Result<Option<String>, Error> {
    let path = format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=1");
    let page = node.call(reqwest::Method::GET, &path, Some(token), None).await?;
    Ok(page["chunk"][0]["content"]["body"].as_str().map(str::to_owned))
}

/// Memberships and recovery: `knocks` users of lat2 knocking on a room of lat1 (make_knock +
/// send_knock); a user of lat2 joining a room of lat1 with `state_events` state events; and lat2
/// killed (SIGKILL) while alice sends `missed` messages to a room it is in, then started again:
/// the time until the last of them is in its history (the durable queue on lat1 delivers them
/// after its back-off). Returns the restarted lat2 and the rows.
async fn room_rows(
    lat1: &Node,
    lat2: Node,
    alice: &str,
    (knocks, state_events, members, missed): (usize, usize, usize, usize),
) -> Result<(Node, Vec<String>), Error> {
    let mut rows = Vec::new();
    let knock_rule = json!([{ "type": "m.room.join_rules", "state_key": "", "content": { "join_rule": "knock" } }]);
    let knock_room = create_room(lat1, alice, json!({ "preset": "private_chat", "initial_state": knock_rule })).await?;
    let mut knock_ms = Vec::with_capacity(knocks);
    for n in 0..knocks {
        let token = lat2.register(&format!("knocker{n}")).await?;
        let path = format!("/_matrix/client/v3/knock/{knock_room}?via={}", lat1.name);
        let sent = Instant::now();
        lat2.call(reqwest::Method::POST, &path, Some(&token), Some(json!({}))).await?;
        knock_ms.push(sent.elapsed().as_secs_f64() * 1000.0);
    }
    knock_ms.sort_by(f64::total_cmp);
    rows.push(format!(
        "| knock on a room of the other server (make_knock + send_knock), p50 / p99 ({knocks} users) | {:.1} / {:.1} ms |",
        percentile(&knock_ms, 0.5),
        percentile(&knock_ms, 0.99)
    ));

    let big = create_room(lat1, alice, json!({ "preset": "public_chat" })).await?;
    let started = Instant::now();
    let bodies: Vec<Value> = (0..state_events).map(|n| json!({ "txn": n, "body": { "n": n } })).collect();
    let path = format!("/_matrix/client/v3/rooms/{big}/state/m.bench.state/{{txn}}");
    concurrently_put(lat1, alice, &path, bodies).await?;
    join_local_members(lat1, &big, members).await?;
    let filled_in = started.elapsed().as_secs_f64();
    let joiner = lat2.register("bigjoiner").await?;
    let sent = Instant::now();
    let path = format!("/_matrix/client/v3/join/{big}?via={}", lat1.name);
    lat2.call(reqwest::Method::POST, &path, Some(&joiner), Some(json!({}))).await?;
    rows.push(format!(
        "| join a room of the other server with {members} members and {state_events} other state events (made on lat1 in {filled_in:.1} s) | {:.0} ms |",
        sent.elapsed().as_secs_f64() * 1000.0
    ));

    let (lat2, row) = catch_up_row(lat1, lat2, alice, missed).await?;
    rows.push(row);
    Ok((lat2, rows))
}

/// lat2 killed (SIGKILL) while alice sends `missed` messages to a room it is in, then started
/// again: lat1's RSS before and after queueing them, the time from lat2's restart until the last
/// is its room's newest event, and then until a user of lat2 has paged back through all of them
/// (with catch-up compaction, `--catch-up-after`, most arrive by backfill). Returns the
/// restarted lat2 and the row.
async fn catch_up_row(lat1: &Node, lat2: Node, alice: &str, missed: usize) -> Result<(Node, String), Error> {
    let room = create_room(lat1, alice, json!({ "preset": "public_chat" })).await?;
    let catcher = lat2.register("catcher").await?;
    let path = format!("/_matrix/client/v3/join/{room}?via={}", lat1.name);
    lat2.call(reqwest::Method::POST, &path, Some(&catcher), Some(json!({}))).await?;
    let mut lat2 = lat2;
    // SIGKILL: what lat2 acknowledged is on disk; lat1 queues what it cannot deliver.
    lat2.child.kill().await?;
    let rss_before = lat1.rss_mib();
    let sending = Instant::now();
    // One at a time: the messages form one chain, as a conversation does.
    for n in 0..missed {
        lat1.say(alice, &room, &format!("missed-{n}")).await?;
    }
    let sent_in = sending.elapsed().as_secs_f64();
    // Give lat1's worker time to fail again (and compact, when configured) before lat2 is back.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_down = lat1.rss_mib();
    let lat2 = spawn(lat2.launch.clone()).await?;
    let back = Instant::now();
    let last = format!("missed-{}", missed.saturating_sub(1));
    while newest_body(&lat2, &catcher, &room).await?.as_deref() != Some(last.as_str()) {
        if back.elapsed() > Duration::from_secs(1200) {
            return Err("the missed messages never arrived".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let newest_in = back.elapsed().as_secs_f64();
    let paged = page_back_all(&lat2, &catcher, &room, "missed-", missed).await?;
    let all_in = back.elapsed().as_secs_f64();
    let row = format!(
        "| lat2 killed while alice sent {missed} messages (in {sent_in:.1} s; lat1 RSS {rss_before:.0} → {rss_down:.0} MiB); \
         from its restart until the last is its newest event / until a user paged back through all {paged} | {newest_in:.2} s / {all_in:.2} s |"
    );
    Ok((lat2, row))
}

/// Pages back through `room` on `node` (100 events a page) until `count` bodies starting with
/// `prefix` were seen; how many were.
async fn page_back_all(node: &Node, token: &str, room: &str, prefix: &str, count: usize) -> Result<usize, Error> {
    let mut seen = std::collections::HashSet::new();
    let mut from: Option<String> = None;
    while seen.len() < count {
        let mut path = format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=100");
        if let Some(from) = &from {
            path.push_str(&format!("&from={from}"));
        }
        let page = node.call(reqwest::Method::GET, &path, Some(token), None).await?;
        for event in page["chunk"].as_array().into_iter().flatten() {
            if let Some(body) = event["content"]["body"].as_str().filter(|b| b.starts_with(prefix)) {
                seen.insert(body.to_owned());
            }
        }
        match page["end"].as_str() {
            Some(end) => from = Some(end.to_owned()),
            None => break,
        }
    }
    Ok(seen.len())
}

/// Registers `members` users on `node` and joins them to `room` (10 at a time).
async fn join_local_members(node: &Node, room: &str, members: usize) -> Result<(), Error> {
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let (next, client, room) = (next.clone(), node.client.clone(), room.to_owned());
        let http = node.http.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= members {
                    return Ok::<(), Error>(());
                }
                let body = json!({ "username": format!("member{n}"), "password": "bench-password",
                                   "auth": { "type": "m.login.dummy" } });
                let registered: Value =
                    http.post(format!("{client}/_matrix/client/v3/register")).json(&body).send().await?.json().await?;
                let token = registered["access_token"].as_str().ok_or("no access token")?.to_owned();
                let joined = http
                    .post(format!("{client}/_matrix/client/v3/rooms/{room}/join"))
                    .bearer_auth(&token)
                    .json(&json!({}))
                    .send()
                    .await?;
                if !joined.status().is_success() {
                    return Err(format!("join: {}", joined.status()).into());
                }
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// PUTs each body to `path` (its `{txn}` replaced by the body's `txn`) with 10 concurrent clients.
async fn concurrently_put(node: &Node, token: &str, path: &str, bodies: Vec<Value>) -> Result<(), Error> {
    let queue = std::sync::Arc::new(std::sync::Mutex::new(bodies));
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let (queue, url, token, http) =
            (queue.clone(), format!("{}{path}", node.client), token.to_owned(), node.http.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let Some(body) = queue.lock().map_err(|_| "poisoned")?.pop() else { break };
                let response = http
                    .put(url.replace("{txn}", &body["txn"].to_string()))
                    .bearer_auth(&token)
                    .json(&body["body"])
                    .send()
                    .await?;
                if !response.status().is_success() {
                    return Err(format!("{url}: {}", response.status()).into());
                }
            }
            Ok::<(), Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// Inbound PDUs in isolation (`--inbound N`, `--inbound-rooms K`): `N` messages of a user of
/// lat2, built and signed beforehand with lat2's own signing key (read from its data directory)
/// as lat2 would send them, one chain in each of `K` rooms of lat1's, pushed straight to lat1's
/// `PUT /send` in transactions of 50 (every request signed beforehand too), one transaction at
/// a time per room and the `K` rooms at once; PDUs accepted per second (each checked: format,
/// event ID, signature, content hash, auth against the state before and the current state,
/// stored, durable before the answer).
async fn inbound_row(
    lat1: &Node,
    lat2: &Node,
    alice: &str,
    ca: &std::path::Path,
    (pdus, rooms): (usize, usize),
) -> Result<String, Error> {
    let pusher = lat2.register("pusher").await?;
    let key = signing_key_of(lat2)?;
    let federation = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(ca)?)?)
        .no_proxy()
        .build()?;
    let (origin, destination) =
        (<&ruma::ServerName>::try_from(lat2.name.as_str())?, <&ruma::ServerName>::try_from(lat1.name.as_str())?);
    let sign = |method: &reqwest::Method, path: &str, bytes: &[u8]| -> Result<String, Error> {
        let auth = lattice_federation::x_matrix::sign_request(origin, destination, &key, method, path, bytes)?;
        Ok(auth.to_str()?.to_owned())
    };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as u64;
    let mut per_room = Vec::with_capacity(rooms);
    for r in 0..rooms {
        let room = create_room(lat1, alice, json!({ "preset": "public_chat" })).await?;
        let path = format!("/_matrix/client/v3/join/{room}?via={}", lat1.name);
        lat2.call(reqwest::Method::POST, &path, Some(&pusher), Some(json!({}))).await?;
        let chain =
            inbound_chain(lat1, alice, &room, (&lat2.name, &key), &sign, &federation, pdus / rooms, now).await?;
        let mut requests = Vec::new();
        for (txn, chunk) in chain.chunks(50).enumerate() {
            let body = json!({ "origin": lat2.name, "origin_server_ts": now, "pdus": chunk }).to_string().into_bytes();
            let path = format!("/_matrix/federation/v1/send/inbound-{r}-{txn}");
            let auth = sign(&reqwest::Method::PUT, &path, &body)?;
            requests.push((format!("https://{}{path}", lat1.name), auth, body));
        }
        per_room.push(requests);
    }

    let started = Instant::now();
    let mut senders = tokio::task::JoinSet::new();
    for requests in per_room {
        let federation = federation.clone();
        senders.spawn(async move {
            let mut accepted = 0usize;
            for (url, auth, body) in requests {
                let request = federation.put(&url).header("authorization", auth);
                let response = request.header("content-type", "application/json").body(body).send().await?;
                let status = response.status();
                let answer: Value = response.json().await?;
                if !status.is_success() {
                    return Err::<usize, Error>(format!("{url}: {status} {answer}").into());
                }
                accepted += answer["pdus"]
                    .as_object()
                    .map_or(0, |results| results.values().filter(|r| r.get("error").is_none()).count());
            }
            Ok(accepted)
        });
    }
    let mut accepted = 0usize;
    while let Some(sent) = senders.join_next().await {
        accepted += sent??;
    }
    let seconds = started.elapsed().as_secs_f64();
    let pushed = pdus / rooms * rooms;
    if accepted != pushed {
        return Err(format!("only {accepted} of {pushed} PDUs were accepted").into());
    }
    let spread = match rooms {
        1 => "one room, one transaction at a time".to_owned(),
        _ => format!("{rooms} rooms at once, one transaction at a time in each"),
    };
    Ok(format!(
        "| {pushed} PDUs pushed to lat1's `/send` (50 a transaction, {spread}, signed as lat2), all accepted | {seconds:.2} s = **{:.0} PDU/s** |",
        pushed as f64 / seconds
    ))
}

/// `count` messages of lat2's pusher in `room`, each citing the one before, the first citing
/// the pusher's join as lat1 has it; signed with lat2's `key`.
#[allow(clippy::too_many_arguments)]
async fn inbound_chain(
    lat1: &Node,
    alice: &str,
    room: &str,
    (origin, key): (&str, &Ed25519KeyPair),
    sign: &impl Fn(&reqwest::Method, &str, &[u8]) -> Result<String, Error>,
    federation: &reqwest::Client,
    count: usize,
    now: u64,
) -> Result<Vec<Value>, Error> {
    use lattice_core::room_version::RoomVersion;

    let state =
        lat1.call(reqwest::Method::GET, &format!("/_matrix/client/v3/rooms/{room}/state"), Some(alice), None).await?;
    let state_id = |kind: &str, key: &str| {
        state.as_array().and_then(|events| {
            events.iter().find(|e| e["type"] == kind && e["state_key"] == key).and_then(|e| e["event_id"].as_str())
        })
    };
    let pusher_id = format!("@pusher:{origin}");
    let create = state_id("m.room.create", "").ok_or("no create event")?.to_owned();
    let power = state_id("m.room.power_levels", "").ok_or("no power levels")?.to_owned();
    let member = state_id("m.room.member", &pusher_id).ok_or("the pusher is not a member")?.to_owned();
    let create_event = lat1
        .call(reqwest::Method::GET, &format!("/_matrix/client/v3/rooms/{room}/state/m.room.create/"), Some(alice), None)
        .await?;
    let version = RoomVersion::parse(create_event["room_version"].as_str().unwrap_or("1"))?;
    let path = format!("/_matrix/federation/v1/event/{}", urlencode_path(&member));
    let auth = sign(&reqwest::Method::GET, &path, b"")?;
    let join_pdu: Value = federation
        .get(format!("https://{}{path}", lat1.name))
        .header("authorization", auth)
        .send()
        .await?
        .json()
        .await?;
    let mut depth = join_pdu["pdus"][0]["depth"].as_u64().ok_or("no depth")?;
    // Room version 12 leaves the create event out of auth events (the room ID is its hash).
    let mut auth_events = vec![power, member.clone()];
    if !version.id().as_str().starts_with("12") {
        auth_events.push(create);
    }
    let mut prev = member;
    let mut built = Vec::with_capacity(count);
    for n in 0..count {
        depth += 1;
        let event = json!({
            "room_id": room, "sender": pusher_id, "type": "m.room.message", "origin_server_ts": now + n as u64,
            "content": { "msgtype": "m.text", "body": format!("inbound-{n}") },
            "prev_events": [prev], "auth_events": auth_events, "depth": depth,
        });
        let mut object: ruma::CanonicalJsonObject = serde_json::from_value(event)?;
        lattice_core::pdu::hash_and_sign(&mut object, origin, key, &version)?;
        prev = lattice_core::pdu::event_id(&object, &version)?.to_string();
        built.push(serde_json::to_value(&object)?);
    }
    Ok(built)
}

/// The signing key of a server this benchmark started, read from its data directory as the
/// server reads it (`ed25519 VERSION BASE64-DER`).
fn signing_key_of(node: &Node) -> Result<ruma::signatures::Ed25519KeyPair, Error> {
    use base64::Engine;
    let path = node.launch.dir.join(format!("data-{}", node.launch.ip)).join("signing.key");
    let text = std::fs::read_to_string(path)?;
    let parts: Vec<&str> = text.split_whitespace().collect();
    let (version, document) = (parts.get(1).ok_or("no key version")?, parts.get(2).ok_or("no key")?);
    let document = base64::engine::general_purpose::STANDARD_NO_PAD.decode(document)?;
    Ok(ruma::signatures::Ed25519KeyPair::from_der(&document, (*version).to_owned())?)
}

/// Percent-encodes an event ID for a path segment (`$` and the base64 of newer IDs).
fn urlencode_path(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
