//! The `lattice` binary as an operator runs it: first start, kill -9, SIGTERM, CLI commands,
//! configuration errors.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::support::{ProcessServer, binary, process_env, register};

#[tokio::test]
async fn an_acknowledged_registration_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let server = ProcessServer::start(dir.path()).await;
    let token = server.first_registration_token.clone().expect("first start prints a registration token");
    let registered = register(&server.http, "durable", "pw-1", &token).await;
    assert_eq!(registered["user_id"], "@durable:hs1.localhost");
    server.kill_9().await;

    let restarted = ProcessServer::start(dir.path()).await;
    assert_eq!(restarted.first_registration_token, None, "the token is printed only at first start");
    let (status, login) = restarted.http.login("durable", "pw-1").await;
    assert_eq!(status, 200, "{login}");
    // The access token issued before the crash still works too.
    let old = registered["access_token"].as_str().unwrap();
    assert_eq!(restarted.http.get("/_matrix/client/v3/account/whoami", Some(old)).await.0, 200);
    assert!(restarted.terminate().await, "SIGTERM exits cleanly");
}

#[tokio::test]
async fn sigterm_finishes_cleanly_and_keeps_data() {
    let dir = tempfile::tempdir().unwrap();
    let server = ProcessServer::start(dir.path()).await;
    let token = server.first_registration_token.clone().unwrap();
    register(&server.http, "graceful", "pw", &token).await;
    assert!(server.terminate().await);
    let again = ProcessServer::start(dir.path()).await;
    assert_eq!(again.http.login("graceful", "pw").await.0, 200);
    assert!(again.terminate().await);
}

fn run_cli(data_dir: &std::path::Path, args: &[&str], stdin: Option<&str>) -> std::process::Output {
    let address = "127.0.0.1:1".parse().unwrap();
    let mut child = Command::new(binary())
        .args(args)
        .envs(process_env(data_dir, address))
        .env_remove("LATTICE_CONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    }
    drop(child.stdin.take());
    child.wait_with_output().unwrap()
}

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn operator_commands_create_users_and_registration_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let created = run_cli(dir.path(), &["user", "create", "root", "--admin", "--password-stdin"], Some("s3cret\n"));
    assert!(created.status.success(), "{created:?}");
    assert!(stdout(&created).contains("@root:hs1.localhost"));

    let generated = run_cli(dir.path(), &["user", "create", "ops"], None);
    assert!(generated.status.success(), "{generated:?}");
    let ops_password = stdout(&generated).lines().find_map(|l| l.strip_prefix("password: ")).unwrap().to_owned();

    let duplicate = run_cli(dir.path(), &["user", "create", "root", "--password-stdin"], Some("x\n"));
    assert!(!duplicate.status.success());
    assert!(String::from_utf8_lossy(&duplicate.stderr).contains("taken"), "{duplicate:?}");

    let token_output = run_cli(dir.path(), &["registration-token", "create", "--uses", "1", "--expires", "1d"], None);
    assert!(token_output.status.success(), "{token_output:?}");
    let token = stdout(&token_output).trim().to_owned();
    let listed = run_cli(dir.path(), &["registration-token", "list"], None);
    assert!(stdout(&listed).contains(&token));

    let reset = run_cli(dir.path(), &["user", "reset-password", "ops", "--password-stdin"], Some("fresh-pw\n"));
    assert!(reset.status.success(), "{reset:?}");

    let server = ProcessServer::start(dir.path()).await;
    assert_eq!(server.http.login("root", "s3cret").await.0, 200);
    assert_eq!(server.http.login("ops", &ops_password).await.0, 403, "the reset replaced the generated password");
    assert_eq!(server.http.login("ops", "fresh-pw").await.0, 200);
    register(&server.http, "invited", "pw", &token).await;
    // The token allowed one use.
    let body = serde_json::json!({ "username": "second", "password": "pw",
        "auth": { "type": "m.login.registration_token", "token": token } });
    let (status, response) = server.http.post("/_matrix/client/v3/register", None, &body).await;
    assert_eq!(status, 401, "{response}");
    assert!(server.terminate().await);
}

#[test]
fn configuration_errors_stop_start_up_and_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("lattice.toml");
    std::fs::write(&config, "server_name = \"example.org\"\n[listen]\nport = 8448\n").unwrap();
    let output =
        Command::new(binary()).args(["serve", "--config"]).arg(&config).env_remove("LATTICE_CONFIG").output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("listen") && stderr.contains("port"), "{stderr}");

    let output =
        Command::new(binary()).args(["config", "check"]).arg(&config).env_remove("LATTICE_CONFIG").output().unwrap();
    assert!(!output.status.success());

    let example = Command::new(binary()).args(["config", "example"]).output().unwrap();
    assert!(example.status.success());
    std::fs::write(&config, &example.stdout).unwrap();
    let output =
        Command::new(binary()).args(["config", "check"]).arg(&config).env_remove("LATTICE_CONFIG").output().unwrap();
    assert!(output.status.success(), "the example config checks clean: {output:?}");

    let bad_env = Command::new(binary())
        .args(["config", "check"])
        .arg(&config)
        .env("LATTICE_STORAGE__SYNC_WRITES", "perhaps")
        .output()
        .unwrap();
    assert!(!bad_env.status.success());
    assert!(String::from_utf8_lossy(&bad_env.stderr).contains("storage.sync_writes"), "{bad_env:?}");
}

#[tokio::test]
async fn rooms_history_and_sync_positions_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let server = ProcessServer::start(dir.path()).await;
    let token = server.first_registration_token.clone().unwrap();
    let alice = register(&server.http, "alice", "pw", &token).await["access_token"].as_str().unwrap().to_owned();
    let (_, created) = server
        .http
        .post("/_matrix/client/v3/createRoom", Some(&alice), &serde_json::json!({ "name": "Durable" }))
        .await;
    let room = created["room_id"].as_str().unwrap().to_owned();
    for i in 0..5 {
        let path = format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/t{i}");
        assert_eq!(
            server
                .http
                .put(&path, Some(&alice), &serde_json::json!({ "msgtype": "m.text", "body": format!("kept {i}") }))
                .await
                .0,
            200
        );
    }
    // A reaction, an alias and a to-device message waiting for alice's device.
    let (_, first) =
        server.http.get(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=f&limit=50"), Some(&alice)).await;
    let kept_0 =
        first["chunk"].as_array().unwrap().iter().find(|e| e["content"]["body"] == "kept 0").unwrap()["event_id"]
            .as_str()
            .unwrap()
            .to_owned();
    let reaction =
        serde_json::json!({ "m.relates_to": { "rel_type": "m.annotation", "event_id": kept_0, "key": "👍" } });
    let path = format!("/_matrix/client/v3/rooms/{room}/send/m.reaction/r1");
    assert_eq!(server.http.put(&path, Some(&alice), &reaction).await.0, 200);
    let alias = serde_json::json!({ "room_id": room });
    assert_eq!(
        server.http.put("/_matrix/client/v3/directory/room/%23durable:hs1.localhost", Some(&alice), &alias).await.0,
        200
    );
    let to_device = serde_json::json!({ "messages": { "@alice:hs1.localhost": { "*": { "note": "survives" } } } });
    assert_eq!(server.http.put("/_matrix/client/v3/sendToDevice/m.test/d1", Some(&alice), &to_device).await.0, 200);
    let (_, before) = server.http.get("/_matrix/client/v3/sync", Some(&alice)).await;
    let since = before["next_batch"].as_str().unwrap().to_owned();
    server.kill_9().await;

    let restarted = ProcessServer::start(dir.path()).await;
    let http = &restarted.http;
    let (_, after) = http.get("/_matrix/client/v3/sync", Some(&alice)).await;
    // Positions continue from the durable reservation, past anything handed out before.
    let position = |sync: &serde_json::Value| {
        let token = sync["next_batch"].as_str().unwrap();
        token.trim_start_matches(['s', 'm']).split('_').next().unwrap().parse::<u64>().unwrap()
    };
    assert!(position(&after) >= position(&before), "the stream position never goes back: {after} {before}");
    let timeline = after["rooms"]["join"][&room]["timeline"]["events"].as_array().unwrap().clone();
    let bodies: Vec<&str> = timeline.iter().filter_map(|e| e["content"]["body"].as_str()).collect();
    assert_eq!(bodies, ["kept 0", "kept 1", "kept 2", "kept 3", "kept 4"]);
    // Not acknowledged before the crash, so still waiting.
    assert_eq!(after["to_device"]["events"][0]["content"]["note"], "survives", "{after}");
    let (_, reactions) =
        http.get(&format!("/_matrix/client/v1/rooms/{room}/relations/{kept_0}/m.annotation"), Some(&alice)).await;
    assert_eq!(reactions["chunk"].as_array().unwrap().len(), 1, "{reactions}");
    let (_, resolved) = http.get("/_matrix/client/v3/directory/room/%23durable:hs1.localhost", None).await;
    assert_eq!(resolved["room_id"], room);
    // The same transaction ID still names the same event after the crash.
    let path = format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/t4");
    let (_, again) = http.put(&path, Some(&alice), &serde_json::json!({ "msgtype": "m.text", "body": "kept 4" })).await;
    let last_message = timeline.iter().rev().find(|e| e["type"] == "m.room.message").unwrap();
    assert_eq!(again["event_id"], last_message["event_id"]);
    // An incremental sync from before the crash continues without repeats.
    let path = format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/t5");
    assert_eq!(http.put(&path, Some(&alice), &serde_json::json!({ "msgtype": "m.text", "body": "new" })).await.0, 200);
    let (_, next) = http.get(&format!("/_matrix/client/v3/sync?since={since}"), Some(&alice)).await;
    let new_bodies: Vec<&str> = next["rooms"]["join"][&room]["timeline"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["content"]["body"].as_str())
        .collect();
    assert_eq!(new_bodies, ["new"]);
    assert!(restarted.terminate().await);
}
