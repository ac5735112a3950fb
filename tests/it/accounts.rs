//! Accounts, sessions, devices, profiles and per-user data, as a client uses them.

use serde_json::json;

use crate::support::{TestServer, assert_error, register};

#[tokio::test]
async fn discovery_endpoints_describe_the_server() {
    let server = TestServer::start_with(|c| {
        c.discovery.client_base_url = Some("https://matrix.example.org".into());
    })
    .await;
    let (status, versions) = server.http.get("/_matrix/client/versions", None).await;
    assert_eq!(status, 200);
    assert!(versions["versions"].as_array().unwrap().contains(&json!("v1.16")));
    assert_eq!(
        versions["unstable_features"],
        json!({ "fi.mau.msc2815": true, "org.matrix.msc3814": true, "org.matrix.msc4140": true })
    );

    let (status, client) = server.http.get("/.well-known/matrix/client", None).await;
    assert_eq!(status, 200);
    assert_eq!(client["m.homeserver"]["base_url"], "https://matrix.example.org");
    assert_error(&server.http.get("/.well-known/matrix/server", None).await, 404, "M_NOT_FOUND");

    let token = server.register("alice", "secret-1").await;
    let (status, caps) = server.http.get("/_matrix/client/v3/capabilities", Some(&token)).await;
    assert_eq!(status, 200);
    assert_eq!(caps["capabilities"]["m.change_password"]["enabled"], true);
    server.stop().await;
}

#[tokio::test]
async fn registration_needs_a_valid_token_and_spends_it() {
    let server = TestServer::start().await;
    let http = &server.http;

    // The first request only learns the flows.
    let (status, challenge) =
        http.post("/_matrix/client/v3/register", None, &json!({ "username": "alice", "password": "pw" })).await;
    assert_eq!(status, 401);
    assert_eq!(challenge["flows"], json!([{ "stages": ["m.login.registration_token"] }]));

    // A wrong token fails the stage and creates nothing.
    let session = challenge["session"].as_str().unwrap();
    let body = json!({ "username": "alice", "password": "pw",
        "auth": { "type": "m.login.registration_token", "token": "wrong", "session": session } });
    let (status, retry) = http.post("/_matrix/client/v3/register", None, &body).await;
    assert_eq!(status, 401);
    assert_eq!(retry["errcode"], "M_FORBIDDEN");
    let (status, available) = http.get("/_matrix/client/v3/register/available?username=alice", None).await;
    assert_eq!((status.as_u16(), available["available"].clone()), (200, json!(true)));

    let validity =
        format!("/_matrix/client/v1/register/m.login.registration_token/validity?token={}", server.registration_token);
    assert_eq!(http.get(&validity, None).await.1["valid"], true);
    assert_eq!(
        http.get("/_matrix/client/v1/register/m.login.registration_token/validity?token=nope", None).await.1["valid"],
        false
    );

    let registered = register(http, "Alice", "pw", &server.registration_token).await;
    assert_eq!(registered["user_id"], server.user_id("alice"));
    let token = registered["access_token"].as_str().unwrap();
    assert!(token.len() >= 43, "tokens carry at least 256 bits");
    let (status, whoami) = http.get("/_matrix/client/v3/account/whoami", Some(token)).await;
    assert_eq!(status, 200);
    assert_eq!(whoami["user_id"], server.user_id("alice"));
    assert_eq!(whoami["device_id"], registered["device_id"]);

    assert_error(&http.get("/_matrix/client/v3/register/available?username=alice", None).await, 400, "M_USER_IN_USE");
    assert_error(
        &http.get("/_matrix/client/v3/register/available?username=a%20b", None).await,
        400,
        "M_INVALID_USERNAME",
    );
    server.stop().await;
}

#[tokio::test]
async fn open_registration_offers_the_dummy_stage() {
    let server = TestServer::start_with(|c| c.registration.mode = lattice::config::RegistrationModeConfig::Open).await;
    let body = json!({ "username": "dora", "password": "pw", "auth": { "type": "m.login.dummy" } });
    let (status, response) = server.http.post("/_matrix/client/v3/register", None, &body).await;
    assert_eq!(status, 200, "{response}");
    assert_eq!(response["user_id"], server.user_id("dora"));
    server.stop().await;
}

#[tokio::test]
async fn disabled_registration_refuses_everyone() {
    let server =
        TestServer::start_with(|c| c.registration.mode = lattice::config::RegistrationModeConfig::Disabled).await;
    let body = json!({ "username": "eve", "password": "pw" });
    assert_error(&server.http.post("/_matrix/client/v3/register", None, &body).await, 403, "M_FORBIDDEN");
    server.stop().await;
}

#[tokio::test]
async fn login_with_identifier_or_legacy_user_reuses_device_ids() {
    let server = TestServer::start().await;
    server.register("bob", "hunter2").await;
    let http = &server.http;

    let (status, first) = http.login("bob", "hunter2").await;
    assert_eq!(status, 200, "{first}");
    let legacy = json!({ "type": "m.login.password", "user": "@bob:hs1.localhost", "password": "hunter2",
        "device_id": "LAPTOP", "initial_device_display_name": "Bob's laptop" });
    let (status, second) = http.post("/_matrix/client/v3/login", None, &legacy).await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(second["device_id"], "LAPTOP");
    let old_token = second["access_token"].as_str().unwrap().to_owned();

    // Logging in again on the same device replaces its token.
    let (_, again) = http.post("/_matrix/client/v3/login", None, &legacy).await;
    assert_eq!(again["device_id"], "LAPTOP");
    assert_error(&http.get("/_matrix/client/v3/account/whoami", Some(&old_token)).await, 401, "M_UNKNOWN_TOKEN");
    let token = again["access_token"].as_str().unwrap();
    let (_, device) = http.get("/_matrix/client/v3/devices/LAPTOP", Some(token)).await;
    assert_eq!(device["display_name"], "Bob's laptop");
    let (_, devices) = http.get("/_matrix/client/v3/devices", Some(token)).await;
    assert_eq!(devices["devices"].as_array().unwrap().len(), 3, "registration, first login, laptop");

    assert_error(&http.login("bob", "wrong").await, 403, "M_FORBIDDEN");
    assert_error(&http.login("nobody", "wrong").await, 403, "M_FORBIDDEN");
    let (status, flows) = http.get("/_matrix/client/v3/login", None).await;
    assert_eq!((status.as_u16(), flows["flows"][0]["type"].clone()), (200, json!("m.login.password")));
    server.stop().await;
}

#[tokio::test]
async fn refresh_tokens_rotate_and_expired_tokens_soft_logout() {
    let server = TestServer::start().await;
    server.register("carol", "pw").await;
    let http = &server.http;
    let body = json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "carol" },
        "password": "pw", "refresh_token": true });
    let (status, login) = http.post("/_matrix/client/v3/login", None, &body).await;
    assert_eq!(status, 200);
    assert_eq!(login["expires_in_ms"], 3_600_000);
    let refresh_token = login["refresh_token"].as_str().unwrap();

    let (status, refreshed) =
        http.post("/_matrix/client/v3/refresh", None, &json!({ "refresh_token": refresh_token })).await;
    assert_eq!(status, 200, "{refreshed}");
    let new_access = refreshed["access_token"].as_str().unwrap();
    assert_eq!(http.get("/_matrix/client/v3/account/whoami", Some(new_access)).await.0, 200);
    // The old pair is spent.
    let old_access = login["access_token"].as_str().unwrap();
    assert_error(&http.get("/_matrix/client/v3/account/whoami", Some(old_access)).await, 401, "M_UNKNOWN_TOKEN");
    assert_error(
        &http.post("/_matrix/client/v3/refresh", None, &json!({ "refresh_token": refresh_token })).await,
        401,
        "M_UNKNOWN_TOKEN",
    );
    server.stop().await;
}

#[tokio::test]
async fn logout_removes_the_device_and_logout_all_every_device() {
    let server = TestServer::start().await;
    let first = server.register("dave", "pw").await;
    let http = &server.http;
    let second = http.login("dave", "pw").await.1["access_token"].as_str().unwrap().to_owned();
    let third = http.login("dave", "pw").await.1["access_token"].as_str().unwrap().to_owned();

    assert_eq!(http.post("/_matrix/client/v3/logout", Some(&second), &json!({})).await.0, 200);
    assert_error(&http.get("/_matrix/client/v3/account/whoami", Some(&second)).await, 401, "M_UNKNOWN_TOKEN");
    let (_, devices) = http.get("/_matrix/client/v3/devices", Some(&first)).await;
    assert_eq!(devices["devices"].as_array().unwrap().len(), 2);

    // The legacy query-parameter token works too.
    let path = format!("/_matrix/client/v3/logout/all?access_token={third}");
    assert_eq!(http.post(&path, None, &json!({})).await.0, 200);
    for token in [&first, &third] {
        assert_error(&http.get("/_matrix/client/v3/account/whoami", Some(token)).await, 401, "M_UNKNOWN_TOKEN");
    }
    server.stop().await;
}

#[tokio::test]
async fn deleting_devices_needs_the_password_and_revokes_their_tokens() {
    let server = TestServer::start().await;
    let token = server.register("erin", "pw").await;
    let http = &server.http;
    let (_, other) = http.login("erin", "pw").await;
    let other_device = other["device_id"].as_str().unwrap();
    let other_token = other["access_token"].as_str().unwrap();

    let path = format!("/_matrix/client/v3/devices/{other_device}");
    let (status, challenge) = http.request(reqwest::Method::DELETE, &path, Some(&token), None).await;
    assert_eq!(status, 401);
    assert_eq!(challenge["flows"], json!([{ "stages": ["m.login.password"] }]));
    let session = challenge["session"].as_str().unwrap();

    let bad = json!({ "auth": { "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "erin" },
        "password": "wrong", "session": session } });
    let (status, retry) =
        http.request(reqwest::Method::DELETE, &path, Some(&token), Some(bad.to_string().into_bytes())).await;
    assert_eq!((status.as_u16(), retry["errcode"].clone()), (401, json!("M_FORBIDDEN")));
    assert_eq!(http.get("/_matrix/client/v3/account/whoami", Some(other_token)).await.0, 200);

    let good = json!({ "auth": { "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "erin" },
        "password": "pw", "session": session } });
    let (status, _) =
        http.request(reqwest::Method::DELETE, &path, Some(&token), Some(good.to_string().into_bytes())).await;
    assert_eq!(status, 200);
    assert_error(&http.get("/_matrix/client/v3/account/whoami", Some(other_token)).await, 401, "M_UNKNOWN_TOKEN");
    assert_error(&http.get(&path, Some(&token)).await, 404, "M_NOT_FOUND");

    // Renaming works on the remaining device; unknown ones are 404.
    let (_, me) = http.get("/_matrix/client/v3/account/whoami", Some(&token)).await;
    let mine = format!("/_matrix/client/v3/devices/{}", me["device_id"].as_str().unwrap());
    assert_eq!(http.put(&mine, Some(&token), &json!({ "display_name": "Erin's phone" })).await.0, 200);
    assert_eq!(http.get(&mine, Some(&token)).await.1["display_name"], "Erin's phone");
    assert_error(
        &http.put("/_matrix/client/v3/devices/NOPE", Some(&token), &json!({ "display_name": "x" })).await,
        404,
        "M_NOT_FOUND",
    );
    server.stop().await;
}

#[tokio::test]
async fn changing_the_password_logs_out_other_devices() {
    let server = TestServer::start().await;
    let token = server.register("frank", "old-pw").await;
    let http = &server.http;
    let other = http.login("frank", "old-pw").await.1["access_token"].as_str().unwrap().to_owned();
    let auth = json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "frank" }, "password": "old-pw" });
    let (status, response) = http
        .post("/_matrix/client/v3/account/password", Some(&token), &json!({ "new_password": "new-pw", "auth": auth }))
        .await;
    assert_eq!(status, 200, "{response}");
    assert_eq!(http.get("/_matrix/client/v3/account/whoami", Some(&token)).await.0, 200);
    assert_error(&http.get("/_matrix/client/v3/account/whoami", Some(&other)).await, 401, "M_UNKNOWN_TOKEN");
    assert_error(&http.login("frank", "old-pw").await, 403, "M_FORBIDDEN");
    assert_eq!(http.login("frank", "new-pw").await.0, 200);
    server.stop().await;
}

#[tokio::test]
async fn a_deactivated_account_cannot_log_in_and_its_name_is_never_reused() {
    let server = TestServer::start().await;
    let token = server.register("gina", "pw").await;
    let http = &server.http;
    let auth = json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "@gina:hs1.localhost" }, "password": "pw" });
    let (status, response) =
        http.post("/_matrix/client/v3/account/deactivate", Some(&token), &json!({ "auth": auth })).await;
    assert_eq!(status, 200, "{response}");
    assert_eq!(response["id_server_unbind_result"], "no-support");
    assert_error(&http.get("/_matrix/client/v3/account/whoami", Some(&token)).await, 401, "M_UNKNOWN_TOKEN");
    // Deactivation drops the password hash, so even the old password is just a wrong one.
    assert_error(&http.login("gina", "pw").await, 403, "M_FORBIDDEN");
    assert_error(&http.get("/_matrix/client/v3/register/available?username=gina", None).await, 400, "M_USER_IN_USE");
    assert_error(&http.get("/_matrix/client/v3/profile/@gina:hs1.localhost", None).await, 404, "M_NOT_FOUND");
    server.stop().await;
}

#[tokio::test]
async fn profiles_account_data_and_filters_belong_to_their_owner() {
    let server = TestServer::start().await;
    let alice = server.register("alice", "pw").await;
    let bob = server.register("bob", "pw").await;
    let http = &server.http;

    let (_, profile) = http.get("/_matrix/client/v3/profile/@alice:hs1.localhost", None).await;
    assert_eq!(profile["displayname"], "alice", "the localpart is the first display name");
    let path = "/_matrix/client/v3/profile/@alice:hs1.localhost/displayname";
    assert_eq!(http.put(path, Some(&alice), &json!({ "displayname": "Alice A." })).await.0, 200);
    assert_eq!(http.get(path, None).await.1["displayname"], "Alice A.");
    assert_error(&http.put(path, Some(&bob), &json!({ "displayname": "mallory" })).await, 403, "M_FORBIDDEN");
    let avatar = "/_matrix/client/v3/profile/@alice:hs1.localhost/avatar_url";
    assert_error(&http.put(avatar, Some(&alice), &json!({ "avatar_url": "http://x" })).await, 400, "M_INVALID_PARAM");
    assert_eq!(http.put(avatar, Some(&alice), &json!({ "avatar_url": "mxc://hs1.localhost/abc" })).await.0, 200);
    assert_error(&http.get("/_matrix/client/v3/profile/@nobody:hs1.localhost", None).await, 404, "M_NOT_FOUND");

    let data = "/_matrix/client/v3/user/@alice:hs1.localhost/account_data/org.example.settings";
    assert_error(&http.get(data, Some(&alice)).await, 404, "M_NOT_FOUND");
    assert_eq!(http.put(data, Some(&alice), &json!({ "theme": "dark" })).await.0, 200);
    assert_eq!(http.get(data, Some(&alice)).await.1, json!({ "theme": "dark" }));
    assert_error(&http.get(data, Some(&bob)).await, 403, "M_FORBIDDEN");
    let managed = "/_matrix/client/v3/user/@alice:hs1.localhost/account_data/m.fully_read";
    assert_error(&http.put(managed, Some(&alice), &json!({ "event_id": "$x" })).await, 405, "M_BAD_JSON");

    let filters = "/_matrix/client/v3/user/@alice:hs1.localhost/filter";
    let filter = json!({ "room": { "timeline": { "limit": 10 } } });
    let (status, created) = http.post(filters, Some(&alice), &filter).await;
    assert_eq!(status, 200);
    let id = created["filter_id"].as_str().unwrap();
    assert_eq!(http.get(&format!("{filters}/{id}"), Some(&alice)).await.1, filter);
    assert_error(&http.get(&format!("{filters}/999"), Some(&alice)).await, 404, "M_NOT_FOUND");
    assert_error(
        &http.post(filters, Some(&alice), &json!({ "room": { "timeline": { "limit": "ten" } } })).await,
        400,
        "M_BAD_JSON",
    );
    server.stop().await;
}

#[tokio::test]
async fn third_party_identifiers_are_answered_honestly() {
    let server = TestServer::start().await;
    let token = server.register("hank", "pw").await;
    let http = &server.http;
    assert_eq!(http.get("/_matrix/client/v3/account/3pid", Some(&token)).await.1, json!({ "threepids": [] }));
    let request = json!({ "client_secret": "s", "email": "h@example.org", "send_attempt": 1 });
    assert_error(
        &http.post("/_matrix/client/v3/register/email/requestToken", None, &request).await,
        403,
        "M_THREEPID_DENIED",
    );
    assert_error(
        &http.post("/_matrix/client/v3/account/password/email/requestToken", None, &request).await,
        400,
        "M_THREEPID_NOT_FOUND",
    );
    server.stop().await;
}
