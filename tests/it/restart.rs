//! An in-process server's `stop` closes the database before it returns, so the same data
//! directory can be served or opened again at once (as the CLI does with a stopped server).

use serde_json::json;

use crate::support::{Http, create_room, register, test_config};

// Several worker threads, as in the binary, so the server's tasks end on other threads than the test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_server_can_be_restarted_and_reopened_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = test_config(dir.path(), "hs1.localhost");
    let running = lattice::start(config.clone()).await.unwrap();
    let http = Http::new(format!("http://{}", running.address));
    let token = running.first_registration_token.clone().unwrap();
    let alice = register(&http, "alice", "pw", &token).await["access_token"].as_str().unwrap().to_owned();
    create_room(&http, &alice, json!({ "name": "kept" })).await;
    // The client keeps its connection open across the stop.
    running.stop().await.unwrap();

    let restarted = lattice::start(config.clone()).await.expect("the stopped server released its database");
    let http = Http::new(format!("http://{}", restarted.address));
    let (status, rooms) = http.get("/_matrix/client/v3/joined_rooms", Some(&alice)).await;
    assert_eq!(status, 200, "{rooms}");
    assert_eq!(rooms["joined_rooms"].as_array().unwrap().len(), 1, "{rooms}");
    restarted.stop().await.unwrap();

    let opened = lattice::open(&config).await.expect("the stopped server released its database");
    assert!(!opened.fresh);
}
