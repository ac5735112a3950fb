//! What operators rely on: stream positions that never repeat across restarts, and start-up
//! that tolerates a wrapper's own `LATTICE_*` variables while a wrong config file still fails.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{Http, binary, create_room, process_env, register, test_config};

/// The stream position in a sync token (its first run of digits).
fn position(token: &str) -> u64 {
    let digits: String = token.chars().skip_while(|c| !c.is_ascii_digit()).take_while(char::is_ascii_digit).collect();
    digits.parse().unwrap_or_else(|_| panic!("no position in sync token {token:?}"))
}

async fn sync(http: &Http, token: &str, since: Option<&str>) -> Value {
    let path = match since {
        Some(since) => format!("/_matrix/client/v3/sync?timeout=0&since={since}"),
        None => "/_matrix/client/v3/sync?timeout=0".to_owned(),
    };
    let (status, body) = http.get(&path, Some(token)).await;
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test]
async fn stream_positions_keep_increasing_across_restarts_and_skip_the_reserved_block() {
    let dir = tempfile::tempdir().unwrap();
    let config = test_config(dir.path(), "hs1.localhost");
    let running = lattice::start(config.clone()).await.unwrap();
    let http = Http::new(format!("http://{}", running.address));
    let first_token = running.first_registration_token.clone().unwrap();
    let alice = register(&http, "alice", "pw", &first_token).await["access_token"].as_str().unwrap().to_owned();
    let room = create_room(&http, &alice, json!({})).await;
    let before = sync(&http, &alice, None).await["next_batch"].as_str().unwrap().to_owned();
    running.stop().await.unwrap();

    let mut since = before.clone();
    for restart in 0..2 {
        let running = lattice::start(config.clone()).await.unwrap();
        let http = Http::new(format!("http://{}", running.address));
        let path = format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/after{restart}");
        let (status, sent) = http.put(&path, Some(&alice), &json!({ "msgtype": "m.text", "body": "after" })).await;
        assert_eq!(status, 200, "{sent}");
        let page = sync(&http, &alice, Some(&since)).await;
        let timeline = page["rooms"]["join"][&room]["timeline"]["events"].as_array().cloned().unwrap_or_default();
        assert!(timeline.iter().any(|e| e["event_id"] == sent["event_id"]), "the new message reaches the old token");
        let next = page["next_batch"].as_str().unwrap().to_owned();
        // Whatever an unsynced write may have handed out before the restart is skipped.
        assert!(
            position(&next) > position(&since) + lattice_storage::COUNTER_RESERVATION_BLOCK / 2,
            "{next} after {since}"
        );
        since = next;
        running.stop().await.unwrap();
    }
}

/// Starts the binary with `extra` environment; returns whether it came up and served (it says
/// so on standard output once it listens, on a port of its own choosing).
async fn serves_with(extra: &[(&str, &str)]) -> bool {
    use tokio::io::AsyncBufReadExt;
    let dir = tempfile::tempdir().unwrap();
    let address = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut child = tokio::process::Command::new(binary())
        .arg("serve")
        .envs(process_env(dir.path(), address))
        .envs(extra.iter().copied())
        .env_remove("LATTICE_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let reading = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(serving) = line.strip_prefix("Serving the client API on ") {
                let client = reqwest::Client::builder().no_proxy().build().unwrap();
                let response = client.get(format!("{serving}/_matrix/client/versions")).send().await.unwrap();
                return response.status() == 200;
            }
        }
        false // the binary exited without serving
    };
    let served =
        tokio::time::timeout(Duration::from_secs(60), reading).await.expect("lattice neither served nor exited");
    child.kill().await.ok();
    served
}

#[tokio::test]
async fn a_stray_lattice_variable_does_not_stop_start_up() {
    assert!(serves_with(&[("LATTICE_BIN", "/opt/lattice/bin/lattice"), ("LATTICE_LOG_DIR", "/tmp")]).await);
}

#[test]
fn an_unknown_key_in_the_config_file_still_stops_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("lattice.toml");
    std::fs::write(&config, "server_name = \"example.org\"\nlattice_bin = \"/opt/lattice\"\n").unwrap();
    let output = std::process::Command::new(binary())
        .args(["serve", "--config"])
        .arg(&config)
        .env_remove("LATTICE_CONFIG")
        .env("LATTICE_BIN", "x")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("lattice_bin"), "{stderr}");
}
