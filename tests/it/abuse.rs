//! Abuse resistance: rate limits on password guessing through user-interactive auth, on the
//! unauthenticated directory, and on what one user may send; which address a request counts
//! against behind a reverse proxy.

use lattice::config::RateConfig;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{TestServer, assert_error, create_room};

/// Effectively no refill: a test sees the burst and then the limit.
fn burst(burst: u32) -> RateConfig {
    RateConfig { per_second: 0.0001, burst }
}

fn generous() -> RateConfig {
    RateConfig { per_second: 1000.0, burst: 1000 }
}

/// A server with rate limits on, every limit generous unless `adjust` tightens it, and the
/// test's loopback peer trusted to say who the client is with `X-Forwarded-For`.
async fn limited_server(adjust: impl FnOnce(&mut lattice::config::RateLimitsConfig)) -> TestServer {
    TestServer::start_with(|c| {
        c.rate_limits.enabled = true;
        c.listen.trust_x_forwarded_for = true;
        let limits = &mut c.rate_limits;
        for rate in [
            &mut limits.login_per_ip,
            &mut limits.login_per_user,
            &mut limits.registration_per_ip,
            &mut limits.uia_password_per_ip,
            &mut limits.uia_password_per_user,
            &mut limits.public_rooms_per_ip,
            &mut limits.message_per_user,
            &mut limits.room_creation_per_user,
            &mut limits.invite_per_user,
            &mut limits.join_per_user,
            &mut limits.to_device_per_user,
            &mut limits.url_preview_per_user,
            &mut limits.delayed_events_per_key,
        ] {
            *rate = generous();
        }
        adjust(limits);
    })
    .await
}

/// One request as if from `client` behind the (trusted, loopback) reverse proxy.
async fn from(
    server: &TestServer,
    client: &str,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> (StatusCode, Value) {
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut request = http.request(method, format!("{}{path}", server.base_url())).header("x-forwarded-for", client);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(body);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[track_caller]
fn assert_limited(response: &(StatusCode, Value)) {
    assert_error(response, 429, "M_LIMIT_EXCEEDED");
    assert!(response.1["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0), "{}", response.1);
}

fn password_auth(server: &TestServer, user: &str, password: &str) -> Value {
    json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": server.user_id(user) },
            "password": password })
}

/// One guess at `user`'s password through the UIA route `attempt` (0: change password,
/// 1: delete devices, 2: deactivate), from `client`.
async fn guess(
    server: &TestServer,
    client: &str,
    token: &str,
    user: &str,
    password: &str,
    attempt: usize,
) -> (StatusCode, Value) {
    let auth = password_auth(server, user, password);
    let (path, body) = match attempt % 3 {
        0 => ("/_matrix/client/v3/account/password", json!({ "new_password": "stolen", "auth": auth })),
        1 => ("/_matrix/client/v3/delete_devices", json!({ "devices": ["NOPE"], "auth": auth })),
        _ => ("/_matrix/client/v3/account/deactivate", json!({ "auth": auth })),
    };
    from(server, client, reqwest::Method::POST, path, Some(token), Some(&body)).await
}

#[tokio::test]
async fn guessing_a_password_through_uia_is_limited_per_user() {
    let server = limited_server(|l| l.uia_password_per_user = burst(3)).await;
    let alice = server.register("alice", "right").await;
    // A thief holding alice's token guesses over every UIA route, from several addresses.
    for attempt in 0..3 {
        let client = format!("198.51.100.{attempt}");
        let (status, body) = guess(&server, &client, &alice, "alice", "wrong", attempt).await;
        assert_eq!((status.as_u16(), body["errcode"].as_str()), (401, Some("M_FORBIDDEN")), "{body}");
    }
    for attempt in 3..6 {
        let client = format!("203.0.113.{attempt}");
        assert_limited(&guess(&server, &client, &alice, "alice", "wrong", attempt).await);
    }
    // The limit counts attempts, so even the right password waits: it gives nothing away.
    assert_limited(&guess(&server, "192.0.2.1", &alice, "alice", "right", 0).await);
    // Asking for the flows is no guess.
    let (status, _) =
        from(&server, "192.0.2.1", reqwest::Method::POST, "/_matrix/client/v3/account/deactivate", Some(&alice), None)
            .await;
    assert_eq!(status, 401);
    // Another user is not held back by alice's limit.
    let bob = server.register("bob", "bobs").await;
    assert_eq!(guess(&server, "192.0.2.1", &bob, "bob", "bobs", 0).await.0, 200);
    server.stop().await;
}

#[tokio::test]
async fn guessing_passwords_through_uia_is_limited_per_address() {
    let server = limited_server(|l| l.uia_password_per_ip = burst(4)).await;
    let mut tokens = Vec::new();
    for name in ["u1", "u2", "u3"] {
        tokens.push(server.register(name, "right").await);
    }
    let attacker = "198.51.100.7";
    for attempt in 0..4 {
        let user = ["u1", "u2"][attempt % 2];
        let token = &tokens[attempt % 2];
        assert_eq!(guess(&server, attacker, token, user, "wrong", attempt).await.0, 401);
    }
    // u3 has never been guessed at, but this address has used up its guesses.
    assert_limited(&guess(&server, attacker, &tokens[2], "u3", "wrong", 0).await);
    assert_eq!(guess(&server, "198.51.100.8", &tokens[2], "u3", "wrong", 0).await.0, 401);
    server.stop().await;
}

#[tokio::test]
async fn a_forged_first_forwarded_for_hop_is_not_the_client() {
    let server = limited_server(|_| {}).await;
    server.register("alice", "pw").await;
    let login = json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "alice" },
                        "password": "pw" });
    // The client wrote "6.6.6.6" itself; the trusted proxy appended the address it saw.
    let (status, session) =
        from(&server, "6.6.6.6, 203.0.113.7", reqwest::Method::POST, "/_matrix/client/v3/login", None, Some(&login))
            .await;
    assert_eq!(status, 200, "{session}");
    let token = session["access_token"].as_str().unwrap();
    let device = format!("/_matrix/client/v3/devices/{}", session["device_id"].as_str().unwrap());
    let (_, seen) = server.http.get(&device, Some(token)).await;
    assert_eq!(seen["last_seen_ip"], "203.0.113.7", "{seen}");
    server.stop().await;

    // When the peer is not a trusted proxy, the header is the client's own word: ignored.
    let server = TestServer::start_with(|c| {
        c.listen.trust_x_forwarded_for = true;
        c.listen.trusted_proxies = vec!["10.0.0.0/8".into()];
    })
    .await;
    server.register("alice", "pw").await;
    let (_, session) =
        from(&server, "203.0.113.7", reqwest::Method::POST, "/_matrix/client/v3/login", None, Some(&login)).await;
    let token = session["access_token"].as_str().unwrap();
    let device = format!("/_matrix/client/v3/devices/{}", session["device_id"].as_str().unwrap());
    assert_eq!(server.http.get(&device, Some(token)).await.1["last_seen_ip"], "127.0.0.1");
    server.stop().await;
}

#[tokio::test]
async fn ipv6_clients_in_one_64_share_a_bucket_and_ipv4_clients_do_not() {
    let server = limited_server(|l| l.login_per_ip = burst(1)).await;
    let login = json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "nobody" },
                        "password": "x" });
    let attempt = |client: &'static str| {
        let server = &server;
        let login = &login;
        async move { from(server, client, reqwest::Method::POST, "/_matrix/client/v3/login", None, Some(login)).await }
    };
    assert_error(&attempt("2001:db8:1:2::1").await, 403, "M_FORBIDDEN");
    assert_limited(&attempt("2001:db8:1:2:ffff:ffff:ffff:fffe").await);
    assert_error(&attempt("2001:db8:1:3::1").await, 403, "M_FORBIDDEN");
    assert_error(&attempt("192.0.2.1").await, 403, "M_FORBIDDEN");
    assert_error(&attempt("192.0.2.2").await, 403, "M_FORBIDDEN");
    assert_limited(&attempt("192.0.2.1").await);
    server.stop().await;
}

#[tokio::test]
async fn the_public_room_directory_is_limited_per_address() {
    let server = limited_server(|l| l.public_rooms_per_ip = burst(2)).await;
    let list = |client: &'static str| {
        let server = &server;
        async move { from(server, client, reqwest::Method::GET, "/_matrix/client/v3/publicRooms", None, None).await }
    };
    assert_eq!(list("198.51.100.1").await.0, 200);
    assert_eq!(list("198.51.100.1").await.0, 200);
    assert_limited(&list("198.51.100.1").await);
    assert_eq!(list("198.51.100.2").await.0, 200);
    server.stop().await;
}

#[tokio::test]
async fn sends_are_limited_per_user_when_enabled() {
    let server = limited_server(|l| l.message_per_user = burst(3)).await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let bob = server.register("bob", "pw").await;
    let room = create_room(http, &alice, json!({ "preset": "public_chat" })).await;
    assert_eq!(http.post(&format!("/_matrix/client/v3/join/{room}"), Some(&bob), &json!({})).await.0, 200);
    let send = |token: &str, txn: usize| {
        let path = format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/t{txn}");
        let token = token.to_owned();
        async move { http.put(&path, Some(&token), &json!({ "msgtype": "m.text", "body": "hi" })).await }
    };
    for txn in 0..3 {
        assert_eq!(send(&alice, txn).await.0, 200);
    }
    assert_limited(&send(&alice, 3).await);
    // State events and redactions are sends too.
    let topic =
        http.put(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.topic"), Some(&alice), &json!({})).await;
    assert_limited(&topic);
    // Bob has his own allowance.
    assert_eq!(send(&bob, 0).await.0, 200);
    server.stop().await;
}

#[tokio::test]
async fn room_creation_invites_joins_and_to_device_are_limited_per_user() {
    let server = limited_server(|l| {
        l.room_creation_per_user = burst(1);
        l.invite_per_user = burst(1);
        l.join_per_user = burst(1);
        l.to_device_per_user = burst(1);
    })
    .await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let bob = server.register("bob", "pw").await;
    let room = create_room(http, &alice, json!({ "preset": "public_chat" })).await;
    assert_limited(&http.post("/_matrix/client/v3/createRoom", Some(&alice), &json!({})).await);

    let invite = |user: &str| json!({ "user_id": server.user_id(user) });
    let invite_path = format!("/_matrix/client/v3/rooms/{room}/invite");
    assert_eq!(http.post(&invite_path, Some(&alice), &invite("bob")).await.0, 200);
    assert_limited(&http.post(&invite_path, Some(&alice), &invite("carol")).await);

    assert_eq!(http.post(&format!("/_matrix/client/v3/rooms/{room}/join"), Some(&bob), &json!({})).await.0, 200);
    let second = create_room(http, &bob, json!({ "preset": "public_chat" })).await;
    assert_eq!(http.post(&format!("/_matrix/client/v3/rooms/{second}/leave"), Some(&bob), &json!({})).await.0, 200);
    assert_limited(&http.post(&format!("/_matrix/client/v3/join/{second}"), Some(&bob), &json!({})).await);

    let messages = json!({ "messages": { server.user_id("bob"): { "*": { "hello": 1 } } } });
    assert_eq!(http.put("/_matrix/client/v3/sendToDevice/m.test/1", Some(&alice), &messages).await.0, 200);
    assert_limited(&http.put("/_matrix/client/v3/sendToDevice/m.test/2", Some(&alice), &messages).await);
    server.stop().await;
}
