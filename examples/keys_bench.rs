//! End-to-end encryption key benchmarks of the real `lattice` binary on loopback (issue #13):
//!
//! 1. `/keys/upload` of device keys and 100 signed one-time keys, once per user (`--users N`,
//!    default 100): latency of each upload;
//! 2. `/keys/claim`: 10 concurrent claimers, each claim one key of one device, until half of the
//!    uploaded keys are gone: claims per second and latency;
//! 3. `/keys/query`: 10 concurrent clients, each query naming 10 users (all their devices), for
//!    2,000 queries: queries per second and latency; and one query naming every user;
//! 4. incremental `/sync` of a user sharing one room with every other user, right after one of
//!    them published new keys (the device-list change it reports);
//! 5. dehydrated devices (MSC3814): `PUT /dehydrated_device` with device keys, 50 signed
//!    one-time keys and a fallback key, each replacing the previous device (latency); and the
//!    owner draining 1,000 to-device messages from it through `/events` with `next_batch`
//!    (pages of 100, each acknowledging the one before), three times.
//!
//! Usage: `cargo run --release --example keys_bench -- [path/to/lattice] [--users N] [--sync-only]`
//! (`--sync-only`: steps 1 with one one-time key each, and 4 — for `--users 1000`)
//! (default binary: `$CARGO_TARGET_DIR/release/lattice`). Prints a Markdown table.

#[path = "bench_support/mod.rs"]
mod bench_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use ruma::signatures::{Ed25519KeyPair, sign_json};
use serde_json::{Value, json};

use bench_support::{BenchServer as Server, Error, summary};

struct User {
    id: String,
    token: String,
    device: String,
    pair: Ed25519KeyPair,
}

fn signed(object: Value, signer: &str, pair: &Ed25519KeyPair) -> Result<Value, Error> {
    let map = object.as_object().cloned().ok_or("not an object")?;
    let mut canonical = ruma::canonical_json::try_from_json_map(map)?;
    sign_json(signer, pair, &mut canonical)?;
    Ok(serde_json::to_value(canonical)?)
}

impl User {
    fn upload_body(&self, otks: usize, round: usize) -> Result<Value, Error> {
        let public =
            ruma::serde::Base64::<ruma::serde::base64::Standard>::new(self.pair.public_key().to_vec()).encode();
        let device_keys = signed(
            json!({ "user_id": self.id, "device_id": self.device,
                    "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
                    "keys": { format!("ed25519:{}", self.device): public, format!("curve25519:{}", self.device): "curve" } }),
            &self.id,
            &self.pair,
        )?;
        let mut one_time_keys = serde_json::Map::new();
        for n in 0..otks {
            let key = signed(json!({ "key": format!("k{round}-{n}") }), &self.id, &self.pair)?;
            one_time_keys.insert(format!("signed_curve25519:{round:04}{n:04}"), key);
        }
        Ok(json!({ "device_keys": device_keys, "one_time_keys": one_time_keys }))
    }
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let users_n: usize = args
        .iter()
        .position(|a| a == "--users")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(100);
    let default_binary = format!("{}/release/lattice", std::env::var("CARGO_TARGET_DIR").unwrap_or("target".into()));
    let binary =
        args.iter().find(|a| !a.starts_with("--") && a.parse::<usize>().is_err()).cloned().unwrap_or(default_binary);
    // `--sync-only`: only the uploads (one one-time key each) and the `/sync` rows, for many users.
    let sync_only = args.iter().any(|a| a == "--sync-only");
    let dir = tempfile::tempdir()?;
    let server = Arc::new(Server::start(&binary, dir.path(), &[]).await?);
    let otks: usize = if sync_only { 1 } else { 100 };

    let mut users = Vec::with_capacity(users_n);
    for i in 0..users_n {
        let (token, device) = server.register(&format!("u{i}")).await?;
        let document = Ed25519KeyPair::generate();
        let pair = Ed25519KeyPair::from_der(&document, device.clone())?;
        users.push(User { id: format!("@u{i}:bench.localhost"), token, device, pair });
    }
    let mut rows = Vec::new();

    // 1. Uploads: device keys and 100 one-time keys each.
    let mut latencies = Vec::new();
    for user in &users {
        let body = user.upload_body(otks, 0)?;
        let started = Instant::now();
        server.call(reqwest::Method::POST, "/_matrix/client/v3/keys/upload", Some(&user.token), Some(&body)).await?;
        latencies.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let (p50, p99) = summary(latencies);
    rows.push(format!("| `/keys/upload`, device keys + {otks} signed one-time keys | {users_n} uploads | p50 {p50:.1} ms, p99 {p99:.1} ms |"));
    if !sync_only {
        rows.extend(claims_and_queries(&server, &users, otks).await?);
    }

    // 4. One room with everyone; one member's new keys; the incremental /sync of another.
    let room = server
        .call(
            reqwest::Method::POST,
            "/_matrix/client/v3/createRoom",
            Some(&users[0].token),
            Some(&json!({ "preset": "public_chat" })),
        )
        .await?["room_id"]
        .as_str()
        .ok_or("no room")?
        .to_owned();
    for user in &users[1..] {
        server
            .call(
                reqwest::Method::POST,
                &format!("/_matrix/client/v3/join/{room}"),
                Some(&user.token),
                Some(&json!({})),
            )
            .await?;
    }
    let mut latencies = Vec::new();
    for round in 1..=20 {
        let since =
            server.call(reqwest::Method::GET, "/_matrix/client/v3/sync?timeout=0", Some(&users[0].token), None).await?;
        let since = since["next_batch"].as_str().ok_or("no token")?.to_owned();
        // A fresh device of another member publishes keys: a device-list change.
        let (token, device) = {
            let body = json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "u1" }, "password": "bench-password" });
            let login = server.call(reqwest::Method::POST, "/_matrix/client/v3/login", None, Some(&body)).await?;
            (
                login["access_token"].as_str().ok_or("token")?.to_owned(),
                login["device_id"].as_str().ok_or("device")?.to_owned(),
            )
        };
        let pair = Ed25519KeyPair::from_der(&Ed25519KeyPair::generate(), device.clone())?;
        let fresh = User { id: users[1].id.clone(), token, device, pair };
        server
            .call(
                reqwest::Method::POST,
                "/_matrix/client/v3/keys/upload",
                Some(&fresh.token),
                Some(&fresh.upload_body(1, round)?),
            )
            .await?;
        let one = Instant::now();
        let response = server
            .call(
                reqwest::Method::GET,
                &format!("/_matrix/client/v3/sync?timeout=0&since={since}"),
                Some(&users[0].token),
                None,
            )
            .await?;
        latencies.push(one.elapsed().as_secs_f64() * 1000.0);
        if !response["device_lists"]["changed"].as_array().is_some_and(|c| c.iter().any(|u| u == &users[1].id)) {
            return Err(format!("the change was not reported: {response}").into());
        }
    }
    let (p50, p99) = summary(latencies);
    rows.push(format!(
        "| incremental `/sync` reporting one device-list change, one room of {users_n} members | 20 syncs | p50 {p50:.1} ms, p99 {p99:.1} ms |"
    ));

    // 5. Dehydrated devices.
    if !sync_only {
        rows.extend(dehydrated_devices(&server, &users[0], &users[1 % users_n]).await?);
    }

    println!("| what | load | result |\n|---|---|---|");
    for row in rows {
        println!("{row}");
    }
    Ok(())
}

/// Steps 2 and 3: claims and queries.
async fn claims_and_queries(server: &Arc<Server>, users: &[User], otks: usize) -> Result<Vec<String>, Error> {
    let users_n = users.len();
    let mut rows = Vec::new();
    // 2. Claims, 10 concurrent, until half the keys are gone.
    let targets: Arc<Vec<(String, String)>> =
        Arc::new(users.iter().map(|u| (u.id.clone(), u.device.clone())).collect());
    let claims_total = users_n * otks / 2;
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..10 {
        let (server, targets, next, token) =
            (server.clone(), targets.clone(), next.clone(), users[c % users_n].token.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= claims_total {
                    return Ok::<_, Error>(latencies);
                }
                let (user, device) = &targets[i % targets.len()];
                let body = json!({ "one_time_keys": { user: { device: "signed_curve25519" } } });
                let one = Instant::now();
                let claimed = server
                    .call(reqwest::Method::POST, "/_matrix/client/v3/keys/claim", Some(&token), Some(&body))
                    .await?;
                latencies.push(one.elapsed().as_secs_f64() * 1000.0);
                if claimed["one_time_keys"][user][device].as_object().is_none_or(|k| k.is_empty()) {
                    return Err("a claim found no key".into());
                }
            }
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (p50, p99) = summary(latencies);
    rows.push(format!(
        "| `/keys/claim`, 10 concurrent, one key each | {claims_total} claims in {elapsed:.1} s: **{:.0}/s** | p50 {p50:.1} ms, p99 {p99:.1} ms |",
        claims_total as f64 / elapsed
    ));

    // 3. Queries, 10 concurrent, 10 users each.
    let queries_total = 2_000;
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..10 {
        let (server, targets, next, token) =
            (server.clone(), targets.clone(), next.clone(), users[c % users_n].token.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= queries_total {
                    return Ok::<_, Error>(latencies);
                }
                let named: serde_json::Map<String, Value> =
                    (0..10).map(|k| (targets[(i * 10 + k) % targets.len()].0.clone(), json!([]))).collect();
                let body = json!({ "device_keys": named });
                let one = Instant::now();
                let found = server
                    .call(reqwest::Method::POST, "/_matrix/client/v3/keys/query", Some(&token), Some(&body))
                    .await?;
                latencies.push(one.elapsed().as_secs_f64() * 1000.0);
                if found["device_keys"].as_object().is_none_or(|d| d.is_empty()) {
                    return Err("a query found no keys".into());
                }
            }
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (p50, p99) = summary(latencies);
    rows.push(format!(
        "| `/keys/query`, 10 concurrent, 10 users each | {queries_total} queries in {elapsed:.1} s: **{:.0}/s** | p50 {p50:.1} ms, p99 {p99:.1} ms |",
        queries_total as f64 / elapsed
    ));
    let everyone: serde_json::Map<String, Value> = users.iter().map(|u| (u.id.clone(), json!([]))).collect();
    let mut latencies = Vec::new();
    for _ in 0..20 {
        let one = Instant::now();
        server
            .call(
                reqwest::Method::POST,
                "/_matrix/client/v3/keys/query",
                Some(&users[0].token),
                Some(&json!({ "device_keys": everyone })),
            )
            .await?;
        latencies.push(one.elapsed().as_secs_f64() * 1000.0);
    }
    let (p50, p99) = summary(latencies);
    rows.push(format!("| `/keys/query` naming all {users_n} users | 20 queries | p50 {p50:.1} ms, p99 {p99:.1} ms |"));

    Ok(rows)
}

const DEHYDRATED: &str = "/_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device";

/// The `PUT /dehydrated_device` body of a fresh device `device_id` of `owner` with `otks`
/// signed one-time keys and a fallback key, all signed by the device's own key.
fn dehydrated_body(owner: &str, device_id: &str, otks: usize) -> Result<Value, Error> {
    let pair = Ed25519KeyPair::from_der(&Ed25519KeyPair::generate(), device_id.to_owned())?;
    let public = ruma::serde::Base64::<ruma::serde::base64::Standard>::new(pair.public_key().to_vec()).encode();
    let device_keys = signed(
        json!({ "user_id": owner, "device_id": device_id, "dehydrated": true,
                "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
                "keys": { format!("ed25519:{device_id}"): public, format!("curve25519:{device_id}"): "curve" } }),
        owner,
        &pair,
    )?;
    let mut one_time_keys = serde_json::Map::new();
    for n in 0..otks {
        one_time_keys
            .insert(format!("signed_curve25519:{n:04}"), signed(json!({ "key": format!("k{n}") }), owner, &pair)?);
    }
    let fallback = signed(json!({ "key": "fallback", "fallback": true }), owner, &pair)?;
    Ok(json!({
        "device_id": device_id,
        "initial_device_display_name": "dehydrated",
        "device_data": { "algorithm": "org.matrix.msc3814.v2", "device_pickle": "x".repeat(2_000), "nonce": "n" },
        "device_keys": device_keys,
        "one_time_keys": one_time_keys,
        "fallback_keys": { "signed_curve25519:fb": fallback },
    }))
}

async fn dehydrated_devices(server: &Server, owner: &User, sender: &User) -> Result<Vec<String>, Error> {
    const OTKS: usize = 50;
    const PUTS: usize = 50;
    const MESSAGES: usize = 1_000;
    let mut rows = Vec::new();
    let mut latencies = Vec::new();
    for round in 0..PUTS {
        let body = dehydrated_body(&owner.id, &format!("DEHYDRATED{round}"), OTKS)?;
        let one = Instant::now();
        server.call(reqwest::Method::PUT, DEHYDRATED, Some(&owner.token), Some(&body)).await?;
        latencies.push(one.elapsed().as_secs_f64() * 1000.0);
    }
    let (p50, p99) = summary(latencies);
    rows.push(format!(
        "| `PUT /dehydrated_device`, device keys + {OTKS} signed one-time keys + fallback, replacing the previous device | {PUTS} uploads | p50 {p50:.1} ms, p99 {p99:.1} ms |"
    ));
    let device_id = format!("DEHYDRATED{}", PUTS - 1);
    let events_path = format!("{DEHYDRATED}/{device_id}/events");
    let mut drains = Vec::new();
    let mut pages = Vec::new();
    for round in 0..3 {
        for n in 0..MESSAGES {
            let messages =
                json!({ "messages": { &owner.id: { &device_id: { "n": n, "ciphertext": "c".repeat(200) } } } });
            let path = format!("/_matrix/client/v3/sendToDevice/m.room.encrypted/r{round}-{n}");
            server.call(reqwest::Method::PUT, &path, Some(&sender.token), Some(&messages)).await?;
        }
        let started = Instant::now();
        let mut next_batch: Option<String> = None;
        let mut received = 0;
        loop {
            let body = match &next_batch {
                Some(token) => json!({ "next_batch": token }),
                None => json!({}),
            };
            let one = Instant::now();
            let page = server.call(reqwest::Method::POST, &events_path, Some(&owner.token), Some(&body)).await?;
            pages.push(one.elapsed().as_secs_f64() * 1000.0);
            let count = page["events"].as_array().map_or(0, Vec::len);
            next_batch = Some(page["next_batch"].as_str().ok_or("no next_batch")?.to_owned());
            if count == 0 {
                break;
            }
            received += count;
        }
        if received != MESSAGES {
            return Err(format!("drained {received} of {MESSAGES} messages").into());
        }
        drains.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let (p50, p99) = summary(pages);
    let drain = drains.iter().map(|ms| format!("{ms:.0}")).collect::<Vec<_>>().join(", ");
    rows.push(format!(
        "| dehydrated device `/events` drain of {MESSAGES} to-device messages (pages of 100 + the empty last page) | 3 drains: {drain} ms | per page p50 {p50:.1} ms, p99 {p99:.1} ms |"
    ));
    Ok(rows)
}
