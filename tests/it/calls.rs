//! Calls (issue #12): TURN credentials and the MatrixRTC focus in `.well-known`.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::json;

use crate::support::{TestServer, assert_error};

const TURN: &str = "/_matrix/client/v3/voip/turnServer";

#[tokio::test]
async fn shared_secret_turn_credentials_are_for_the_caller_and_expire_after_the_ttl() {
    let server = TestServer::start_with(|config| {
        config.calls.turn_uris = vec!["turn:turn.hs1.localhost:3478?transport=udp".into()];
        config.calls.turn_shared_secret = Some("north-wind".into());
        config.calls.turn_ttl = "1h".into();
    })
    .await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    assert_error(&http.get(TURN, None).await, 401, "M_MISSING_TOKEN");

    let before = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let (status, turn) = http.get(TURN, Some(&alice)).await;
    let after = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    assert_eq!(status, 200, "{turn}");
    assert_eq!(turn["uris"], json!(["turn:turn.hs1.localhost:3478?transport=udp"]));
    assert_eq!(turn["ttl"], 3600);
    let username = turn["username"].as_str().unwrap();
    let (expiry, user) = username.split_once(':').unwrap();
    assert_eq!(user, server.user_id("alice"), "the credentials name the caller");
    let expiry: u64 = expiry.parse().unwrap();
    assert!((before + 3600..=after + 3600).contains(&expiry), "expires a ttl from now: {expiry}");
    // base64 of a 20-byte HMAC-SHA1 (its value is checked against Python's in the unit test).
    assert_eq!(turn["password"].as_str().unwrap().len(), 28);

    let (_, legacy) = http.get("/_matrix/client/r0/voip/turnServer", Some(&alice)).await;
    assert_eq!(legacy["uris"], turn["uris"]);
    server.stop().await;
}

#[tokio::test]
async fn static_turn_credentials_and_none_configured() {
    let server = TestServer::start_with(|config| {
        config.calls.turn_uris = vec!["turns:turn.hs1.localhost:443?transport=tcp".into()];
        config.calls.turn_username = Some("calls".into());
        config.calls.turn_password = Some("sesame".into());
    })
    .await;
    let alice = server.register("alice", "pw").await;
    let (status, turn) = server.http.get(TURN, Some(&alice)).await;
    assert_eq!(status, 200);
    assert_eq!((turn["username"].as_str(), turn["password"].as_str()), (Some("calls"), Some("sesame")));
    server.stop().await;

    let server = TestServer::start().await;
    let alice = server.register("alice", "pw").await;
    assert_eq!(server.http.get(TURN, Some(&alice)).await, (reqwest::StatusCode::OK, json!({})), "no TURN server");
    server.stop().await;
}

#[tokio::test]
async fn the_livekit_focus_is_announced_in_well_known() {
    let server = TestServer::start_with(|config| {
        config.discovery.client_base_url = Some("https://matrix.hs1.localhost".into());
        config.calls.livekit_service_url = Some("https://livekit-jwt.hs1.localhost".into());
    })
    .await;
    let (status, body) = server.http.get("/.well-known/matrix/client", None).await;
    assert_eq!(status, 200);
    assert_eq!(body["m.homeserver"]["base_url"], "https://matrix.hs1.localhost");
    assert_eq!(
        body["org.matrix.msc4143.rtc_foci"],
        json!([{ "type": "livekit", "livekit_service_url": "https://livekit-jwt.hs1.localhost" }])
    );
    server.stop().await;
}
