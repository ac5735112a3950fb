//! Bad input gets a clear Matrix error, changes nothing, and never panics the server.

use reqwest::Method;
use serde_json::json;

use crate::support::{TestServer, assert_error};

/// (method, path, authenticated, body, status, errcode)
const CASES: &[(&str, &str, bool, &str, u16, &str)] = &[
    ("GET", "/_matrix/client/v3/no/such/endpoint", false, "", 404, "M_UNRECOGNIZED"),
    (
        "PUT",
        "/_matrix/client/v3/presence/@taken:hs1.localhost/status",
        true,
        "{\"presence\": \"busy\"}",
        400,
        "M_INVALID_PARAM",
    ),
    ("DELETE", "/_matrix/client/v3/login", false, "", 405, "M_UNRECOGNIZED"),
    ("PUT", "/_matrix/client/v3/account/whoami", true, "{}", 405, "M_UNRECOGNIZED"),
    ("POST", "/_matrix/client/v3/login", false, "this is not json", 400, "M_NOT_JSON"),
    ("POST", "/_matrix/client/v3/login", false, "{\"type\": 5}", 400, "M_BAD_JSON"),
    ("POST", "/_matrix/client/v3/login", false, "[1, 2]", 400, "M_BAD_JSON"),
    ("POST", "/_matrix/client/v3/register", false, "{\"username\": 7}", 400, "M_BAD_JSON"),
    ("POST", "/_matrix/client/v3/register?kind=guest", false, "{}", 403, "M_GUEST_ACCESS_FORBIDDEN"),
    (
        "POST",
        "/_matrix/client/v3/register",
        false,
        "{\"username\": \"bad name\", \"password\": \"x\"}",
        400,
        "M_INVALID_USERNAME",
    ),
    (
        "POST",
        "/_matrix/client/v3/register",
        false,
        "{\"username\": \"taken\", \"password\": \"x\"}",
        400,
        "M_USER_IN_USE",
    ),
    ("GET", "/_matrix/client/v3/account/whoami", false, "", 401, "M_MISSING_TOKEN"),
    ("GET", "/_matrix/client/v3/register/available", false, "", 400, "M_INVALID_PARAM"),
    ("PUT", "/_matrix/client/v3/user/@taken:hs1.localhost/account_data/x", true, "\"a string\"", 400, "M_BAD_JSON"),
    (
        "PUT",
        "/_matrix/client/v3/profile/@taken:hs1.localhost/displayname",
        true,
        "{\"displayname\": 1}",
        400,
        "M_BAD_JSON",
    ),
    (
        "PUT",
        "/_matrix/client/v3/profile/not-a-user-id/displayname",
        true,
        "{\"displayname\": \"x\"}",
        400,
        "M_INVALID_PARAM",
    ),
    // Routes whose requests are parsed by ruma's types (`lattice-api/src/typed.rs`).
    ("PUT", "/_matrix/client/v3/devices/D1", true, "not json", 400, "M_NOT_JSON"),
    ("PUT", "/_matrix/client/v3/devices/D1", true, "{\"display_name\": 5}", 400, "M_BAD_JSON"),
    ("GET", "/_matrix/client/v3/devices/NOPE", true, "", 404, "M_NOT_FOUND"),
    ("GET", "/_matrix/client/v3/user/not-a-user/rooms/!r:hs1.localhost/tags", true, "", 400, "M_INVALID_PARAM"),
    ("GET", "/_matrix/client/v3/user/@taken:hs1.localhost/rooms/not-a-room/tags", true, "", 400, "M_INVALID_PARAM"),
    (
        "PUT",
        "/_matrix/client/v3/user/@taken:hs1.localhost/rooms/!r:hs1.localhost/tags/u.x",
        true,
        "{\"order\": \"high\"}",
        400,
        "M_BAD_JSON",
    ),
    ("GET", "/_matrix/client/v3/devices", false, "", 401, "M_MISSING_TOKEN"),
    ("PUT", "/_matrix/client/v3/user/@taken:hs1.localhost/account_data/m.x", true, "{oops", 400, "M_NOT_JSON"),
    (
        "PUT",
        "/_matrix/client/v3/user/@taken:hs1.localhost/rooms/not-a-room/account_data/m.x",
        true,
        "{}",
        400,
        "M_INVALID_PARAM",
    ),
    ("GET", "/_matrix/client/v3/user/@taken:hs1.localhost/account_data/m.never.set", true, "", 404, "M_NOT_FOUND"),
    // Shapes ruma's types now check before the service looks: identifiers in paths, queries and
    // bodies, contents that must be objects, required fields, closed enumerations.
    ("GET", "/_matrix/client/v3/rooms/!r:hs1.localhost/event/not-an-event", true, "", 400, "M_INVALID_PARAM"),
    (
        "POST",
        "/_matrix/client/v3/rooms/!r:hs1.localhost/receipt/m.read/not-an-event",
        true,
        "{}",
        400,
        "M_INVALID_PARAM",
    ),
    (
        "POST",
        "/_matrix/client/v3/rooms/!r:hs1.localhost/read_markers",
        true,
        "{\"m.fully_read\": \"not-an-event\"}",
        400,
        "M_BAD_JSON",
    ),
    (
        "PUT",
        "/_matrix/client/v3/rooms/!r:hs1.localhost/send/m.room.message/t1",
        true,
        "\"a string\"",
        400,
        "M_BAD_JSON",
    ),
    ("PUT", "/_matrix/client/v3/rooms/not-a-room/send/m.room.message/t2", true, "{}", 400, "M_INVALID_PARAM"),
    ("POST", "/_matrix/client/v3/rooms/!r:hs1.localhost/kick", true, "{\"reason\": \"no target\"}", 400, "M_BAD_JSON"),
    ("POST", "/_matrix/client/v3/rooms/!r:hs1.localhost/ban", true, "{\"user_id\": \"nobody\"}", 400, "M_BAD_JSON"),
    ("POST", "/_matrix/client/v3/join/!r:hs1.localhost?via=not%20a%20server", true, "{}", 400, "M_INVALID_PARAM"),
    ("POST", "/_matrix/client/v3/knock/not-a-room", true, "{}", 400, "M_INVALID_PARAM"),
    ("GET", "/_matrix/client/v1/rooms/!r:hs1.localhost/threads?include=some", true, "", 400, "M_INVALID_PARAM"),
    (
        "GET",
        "/_matrix/client/v1/rooms/!r:hs1.localhost/timestamp_to_event?ts=1&dir=x",
        true,
        "",
        400,
        "M_INVALID_PARAM",
    ),
    ("POST", "/_matrix/client/v3/createRoom", true, "{\"preset\": \"secret_chat\"}", 400, "M_BAD_JSON"),
    ("POST", "/_matrix/client/v3/createRoom", true, "{\"initial_state\": [{\"type\": 1}]}", 400, "M_BAD_JSON"),
    (
        "PUT",
        "/_matrix/client/v3/sendToDevice/m.test/t3",
        true,
        "{\"messages\": {\"@taken:hs1.localhost\": {\"D\": 5}}}",
        400,
        "M_BAD_JSON",
    ),
    ("POST", "/_matrix/client/v3/rooms/!r:hs1.localhost/upgrade", true, "{}", 400, "M_BAD_JSON"),
];

#[tokio::test]
async fn each_bad_request_gets_its_matrix_error() {
    let server = TestServer::start().await;
    let token = server.register("taken", "pw").await;
    for (method, path, authenticated, body, status, errcode) in CASES {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let body = (!body.is_empty()).then(|| body.as_bytes().to_vec());
        let response = server.http.request(method, path, authenticated.then_some(token.as_str()), body).await;
        assert_eq!(response.0.as_u16(), *status, "{path}: {}", response.1);
        assert_eq!(response.1["errcode"], *errcode, "{path}: {}", response.1);
    }
    assert_error(
        &server.http.get("/_matrix/client/v3/account/whoami", Some("lat_forged")).await,
        401,
        "M_UNKNOWN_TOKEN",
    );
    server.stop().await;
}

#[tokio::test]
async fn oversized_bodies_are_refused_and_write_nothing() {
    let server = TestServer::start_with(|c| c.limits.max_request_bytes = 4096).await;
    let padding = "x".repeat(8192);
    let body = json!({ "username": "big", "password": "pw", "padding": padding });
    assert_error(&server.http.post("/_matrix/client/v3/register", None, &body).await, 413, "M_TOO_LARGE");
    let (status, available) = server.http.get("/_matrix/client/v3/register/available?username=big", None).await;
    assert_eq!((status.as_u16(), available["available"].clone()), (200, json!(true)));
    server.stop().await;
}

#[tokio::test]
async fn rate_limits_answer_429_with_a_retry_time() {
    let server = TestServer::start_with(|c| {
        c.rate_limits.enabled = true;
        c.rate_limits.login_per_ip = lattice::config::RateConfig { per_second: 0.01, burst: 2 };
    })
    .await;
    assert_error(&server.http.login("someone", "pw").await, 403, "M_FORBIDDEN");
    assert_error(&server.http.login("someone", "pw").await, 403, "M_FORBIDDEN");
    let limited = server.http.login("someone", "pw").await;
    assert_error(&limited, 429, "M_LIMIT_EXCEEDED");
    assert!(limited.1["retry_after_ms"].as_u64().unwrap() > 1000, "{}", limited.1);
    server.stop().await;
}

#[tokio::test]
async fn cors_preflight_is_answered_for_any_endpoint() {
    let server = TestServer::start().await;
    let response = reqwest::Client::new()
        .request(Method::OPTIONS, format!("{}/_matrix/client/v3/login", server.base_url()))
        .header("origin", "https://app.example.org")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "authorization, content-type")
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success());
    let headers = response.headers();
    assert_eq!(headers["access-control-allow-origin"], "*");
    let methods = headers["access-control-allow-methods"].to_str().unwrap();
    assert!(methods.contains("POST") && methods.contains("DELETE"), "{methods}");
    let allowed = headers["access-control-allow-headers"].to_str().unwrap().to_lowercase();
    assert!(allowed.contains("authorization"), "{allowed}");
    // Ordinary responses carry the header too.
    let plain = reqwest::get(format!("{}/_matrix/client/versions", server.base_url())).await.unwrap();
    assert_eq!(plain.headers()["access-control-allow-origin"], "*");
    server.stop().await;
}
