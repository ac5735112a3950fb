//! Legacy `/_matrix/client/r0/...` paths (issue #12): what existed in r0 answers there by the same
//! handler, with CORS, so older web clients (Hydrogen) can show the login form and log in.

use reqwest::Method;
use serde_json::json;

use crate::support::{TestServer, assert_error, create_room};

#[tokio::test]
async fn a_web_client_on_r0_reads_the_login_flows_logs_in_and_syncs() {
    let server = TestServer::start().await;
    server.register("alice", "pw").await;
    let client = reqwest::Client::new();
    let login = client
        .get(format!("{}/_matrix/client/r0/login", server.base_url()))
        .header("origin", "https://hydrogen.example.org")
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 200);
    assert_eq!(login.headers()["access-control-allow-origin"], "*");
    let flows: serde_json::Value = login.json().await.unwrap();
    assert!(flows["flows"].as_array().unwrap().iter().any(|f| f["type"] == "m.login.password"), "{flows}");

    let preflight = client
        .request(Method::OPTIONS, format!("{}/_matrix/client/r0/sync", server.base_url()))
        .header("origin", "https://hydrogen.example.org")
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "authorization")
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success());
    assert_eq!(preflight.headers()["access-control-allow-origin"], "*");

    let http = &server.http;
    let body =
        json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "alice" }, "password": "pw" });
    let (status, session) = http.post("/_matrix/client/r0/login", None, &body).await;
    assert_eq!(status, 200, "{session}");
    let token = session["access_token"].as_str().unwrap();
    let room = create_room(http, token, json!({ "name": "old client" })).await;
    let (status, synced) = http.get("/_matrix/client/r0/sync", Some(token)).await;
    assert_eq!(status, 200, "{synced}");
    assert!(synced["rooms"]["join"][&room].is_object(), "{synced}");
    let (status, rules) = http.get("/_matrix/client/r0/pushrules/", Some(token)).await;
    assert_eq!(status, 200, "{rules}");
    let (status, whoami) = http.get("/_matrix/client/r0/account/whoami", Some(token)).await;
    assert_eq!((status.as_u16(), whoami["user_id"].as_str()), (200, Some("@alice:hs1.localhost")));
    server.stop().await;
}

#[tokio::test]
async fn endpoints_newer_than_r0_are_not_under_r0() {
    let server = TestServer::start().await;
    let http = &server.http;
    assert_error(
        &http.post("/_matrix/client/r0/refresh", None, &json!({ "refresh_token": "x" })).await,
        404,
        "M_UNRECOGNIZED",
    );
    assert_error(
        &http.post("/_matrix/client/r0/knock/!r:hs1.localhost", None, &json!({})).await,
        404,
        "M_UNRECOGNIZED",
    );
    assert_error(&http.get("/_matrix/client/r0/rooms/!r:hs1.localhost/threads", None).await, 404, "M_UNRECOGNIZED");
    server.stop().await;
}
