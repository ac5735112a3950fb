//! Presence benchmarks of the real `lattice` binary on loopback (issue #12):
//!
//! 1. fan-out: one user in a room with `--users N` others (default 1,000), every one of them
//!    long-polling `/sync`; the user changes their status message; measured: the `PUT`, and the
//!    time until every long-poll has returned with the change (p50 and the last one);
//! 2. `/sync` overhead: an incremental `/sync` (`timeout=0`, nothing new) of a member of a
//!    100-member room, on a server with presence on and on one with presence off.
//!
//! Usage: `cargo run --release --example presence_bench -- [path/to/lattice] [--users N]`
//! (default binary: `$CARGO_TARGET_DIR/release/lattice`). Prints a Markdown table.

#[path = "bench_support/mod.rs"]
mod bench_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use bench_support::{BenchServer as Server, Error, percentile, summary};

/// Presence on or off; the offline timeout long enough that u0, who sets its status without
/// syncing, does not time out mid-benchmark.
fn presence_settings(on: bool) -> [(&'static str, String); 2] {
    [("LATTICE_PRESENCE__ENABLED", on.to_string()), ("LATTICE_PRESENCE__OFFLINE_TIMEOUT", "1h".into())]
}

/// A sync filter that leaves every room out: the long-polls wait for presence alone, and the
/// first syncs stay cheap.
const NO_ROOMS: &str = "%7B%22room%22%3A%7B%22rooms%22%3A%5B%5D%7D%7D";

/// Registers `count` users (`u0` first) and puts them all in one public room of `u0`'s;
/// returns their access tokens.
async fn room_of(server: &Server, count: usize) -> Result<Vec<String>, Error> {
    let mut tokens = Vec::with_capacity(count);
    for i in 0..count {
        tokens.push(server.register(&format!("u{i}")).await?.0);
    }
    let created = server
        .call(
            reqwest::Method::POST,
            "/_matrix/client/v3/createRoom",
            Some(&tokens[0]),
            Some(&json!({ "preset": "public_chat" })),
        )
        .await?;
    let room = created["room_id"].as_str().ok_or("no room")?.to_owned();
    for token in &tokens[1..] {
        let path = format!("/_matrix/client/v3/join/{room}");
        server.call(reqwest::Method::POST, &path, Some(token), Some(&json!({}))).await?;
    }
    Ok(tokens)
}

async fn next_batch(server: &Server, token: &str, query: &str) -> Result<String, Error> {
    let body =
        server.call(reqwest::Method::GET, &format!("/_matrix/client/v3/sync?{query}"), Some(token), None).await?;
    Ok(body["next_batch"].as_str().ok_or("no next_batch")?.to_owned())
}

/// Round after round: every member but `u0` long-polls; `u0` sets a new status message; how
/// long the `PUT` took, and when each long-poll came back with it.
async fn fan_out(server: Arc<Server>, tokens: &[String], rounds: usize) -> Result<Vec<String>, Error> {
    let mut puts = Vec::new();
    let (mut medians, mut lasts) = (Vec::new(), Vec::new());
    let mut since = Vec::with_capacity(tokens.len());
    for token in tokens {
        since.push(next_batch(&server, token, &format!("timeout=0&filter={NO_ROOMS}")).await?);
    }
    // Each first sync brought its user online, news for everyone synced before: catch up once,
    // so the long-polls below wait for the measured change alone.
    for (token, since) in tokens.iter().zip(since.iter_mut()) {
        *since = next_batch(&server, token, &format!("timeout=0&since={since}&filter={NO_ROOMS}")).await?;
    }
    for round in 0..rounds {
        let started = Arc::new(tokio::sync::OnceCell::<Instant>::new());
        let mut polls = Vec::new();
        for (token, since) in tokens.iter().zip(&since).skip(1) {
            let (server, token, since, started) = (server.clone(), token.clone(), since.clone(), started.clone());
            polls.push(tokio::spawn(async move {
                let query = format!("/_matrix/client/v3/sync?timeout=30000&since={since}&filter={NO_ROOMS}");
                let body = server.call(reqwest::Method::GET, &query, Some(&token), None).await?;
                let at = started.get().map(|t| t.elapsed().as_secs_f64() * 1000.0).unwrap_or(f64::NAN);
                let seen = body["presence"]["events"].as_array().is_some_and(|events| {
                    events.iter().any(|e| e["content"]["status_msg"] == format!("round {round}"))
                });
                if !seen {
                    return Err::<(f64, String), Error>(
                        format!("a long-poll returned without the change: {:.300}", body["presence"].to_string())
                            .into(),
                    );
                }
                Ok((at, body["next_batch"].as_str().unwrap_or_default().to_owned()))
            }));
        }
        // Let every long-poll reach its wait (the server cannot be asked from outside).
        tokio::time::sleep(Duration::from_secs(3)).await;
        let path = "/_matrix/client/v3/presence/@u0:bench.localhost/status";
        let body = json!({ "presence": "online", "status_msg": format!("round {round}") });
        let put = Instant::now();
        let _ = started.set(put);
        server.call(reqwest::Method::PUT, path, Some(&tokens[0]), Some(&body)).await?;
        puts.push(put.elapsed().as_secs_f64() * 1000.0);
        let mut arrivals = Vec::with_capacity(polls.len());
        for (i, poll) in polls.into_iter().enumerate() {
            let (at, next) = poll.await??;
            arrivals.push(at);
            since[i + 1] = next;
        }
        arrivals.sort_by(|a, b| a.total_cmp(b));
        medians.push(percentile(&arrivals, 0.5));
        lasts.push(*arrivals.last().unwrap_or(&f64::NAN));
    }
    let n = tokens.len() - 1;
    let (put50, put99) = summary(puts);
    let (median50, _) = summary(medians);
    let (last50, last_max) = summary(lasts.clone());
    let last_max = lasts.iter().cloned().fold(last_max, f64::max);
    Ok(vec![
        format!(
            "| `PUT /presence` of a user sharing a room with {n} long-polling users | {rounds} rounds | p50 {put50:.1} ms, p99 {put99:.1} ms |"
        ),
        format!("| half of the {n} long-polls back with the change | {rounds} rounds | median {median50:.1} ms |"),
        format!(
            "| all {n} long-polls back with the change | {rounds} rounds | median {last50:.1} ms, worst {last_max:.1} ms |"
        ),
    ])
}

/// Incremental `/sync` with nothing new, of a member of a 100-member room.
async fn quiet_sync(binary: &str, presence: bool) -> Result<(f64, f64), Error> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(binary, dir.path(), &presence_settings(presence)).await?;
    let tokens = room_of(&server, 100).await?;
    let since = next_batch(&server, &tokens[1], "timeout=0").await?;
    let mut latencies = Vec::new();
    for _ in 0..300 {
        let one = Instant::now();
        let path = format!("/_matrix/client/v3/sync?timeout=0&since={since}");
        server.call(reqwest::Method::GET, &path, Some(&tokens[1]), None).await?;
        latencies.push(one.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(summary(latencies))
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let users_n: usize = args
        .iter()
        .position(|a| a == "--users")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000);
    let default_binary = format!("{}/release/lattice", std::env::var("CARGO_TARGET_DIR").unwrap_or("target".into()));
    let binary =
        args.iter().find(|a| !a.starts_with("--") && a.parse::<usize>().is_err()).cloned().unwrap_or(default_binary);

    let mut rows = Vec::new();
    let dir = tempfile::tempdir()?;
    let server = Arc::new(Server::start(&binary, dir.path(), &presence_settings(true)).await?);
    let tokens = room_of(&server, users_n + 1).await?;
    rows.extend(fan_out(server, &tokens, 5).await?);

    for presence in [true, false] {
        let (p50, p99) = quiet_sync(&binary, presence).await?;
        let state = if presence { "on" } else { "off" };
        rows.push(format!("| incremental `/sync`, nothing new, 100-member room, presence {state} | 300 syncs | p50 {p50:.2} ms, p99 {p99:.2} ms |"));
    }

    println!("| what | load | result |\n|---|---|---|");
    for row in rows {
        println!("{row}");
    }
    Ok(())
}
