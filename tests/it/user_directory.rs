//! `POST /user_directory/search` (issue #12): whom a searcher finds, and whom not.

use serde_json::{Value, json};

use crate::support::{Http, TestServer, assert_error, create_room};

const SEARCH: &str = "/_matrix/client/v3/user_directory/search";

async fn search(http: &Http, token: &str, body: Value) -> Value {
    let (status, found) = http.post(SEARCH, Some(token), &body).await;
    assert_eq!(status, 200, "{found}");
    found
}

fn ids(found: &Value) -> Vec<String> {
    found["results"].as_array().expect("results").iter().map(|u| u["user_id"].as_str().unwrap().to_owned()).collect()
}

async fn join(http: &Http, token: &str, room: &str) {
    let (status, body) = http.post(&format!("/_matrix/client/v3/join/{room}"), Some(token), &json!({})).await;
    assert_eq!(status, 200, "{body}");
}

async fn invite(http: &Http, token: &str, room: &str, user: &str) {
    let path = format!("/_matrix/client/v3/rooms/{room}/invite");
    let (status, body) = http.post(&path, Some(token), &json!({ "user_id": user })).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn members_of_a_private_room_are_found_only_by_those_sharing_it() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let bob = server.register("bob", "pw").await;
    let carol = server.register("carol", "pw").await;
    let private = create_room(http, &alice, json!({ "preset": "private_chat" })).await;
    invite(http, &alice, &private, &server.user_id("bob")).await;
    join(http, &bob, &private).await;

    assert!(ids(&search(http, &carol, json!({ "search_term": "bob" })).await).is_empty(), "carol shares no room");
    assert!(ids(&search(http, &carol, json!({ "search_term": "alice" })).await).is_empty());
    assert_eq!(ids(&search(http, &alice, json!({ "search_term": "bob" })).await), [server.user_id("bob")]);

    // A profile change is what the next search sees.
    let profile = format!("/_matrix/client/v3/profile/{}/displayname", server.user_id("bob"));
    assert_eq!(http.put(&profile, Some(&bob), &json!({ "displayname": "Zebedee Quux" })).await.0, 200);
    let found = search(http, &alice, json!({ "search_term": "zeb" })).await;
    assert_eq!(found["results"], json!([{ "user_id": server.user_id("bob"), "display_name": "Zebedee Quux" }]));
    assert_eq!(found["limited"], false);

    // Once bob left, alice shares no room with him.
    let leave = format!("/_matrix/client/v3/rooms/{private}/leave");
    assert_eq!(http.post(&leave, Some(&bob), &json!({})).await.0, 200);
    assert!(ids(&search(http, &alice, json!({ "search_term": "zebedee" })).await).is_empty(), "bob left");
    server.stop().await;
}

#[tokio::test]
async fn members_of_public_rooms_are_found_by_anyone_with_limit_and_limited() {
    let server = TestServer::start().await;
    let http = &server.http;
    let owner = server.register("owner", "pw").await;
    let stranger = server.register("stranger", "pw").await;
    let public = create_room(http, &owner, json!({ "preset": "public_chat" })).await;
    for name in ["walrus1", "walrus2", "walrus3"] {
        let token = server.register(name, "pw").await;
        join(http, &token, &public).await;
    }
    let found = search(http, &stranger, json!({ "search_term": "WALRUS" })).await;
    assert_eq!(ids(&found), ["walrus1", "walrus2", "walrus3"].map(|n| server.user_id(n)));
    assert_eq!(found["limited"], false);

    let page = search(http, &stranger, json!({ "search_term": "walrus", "limit": 2 })).await;
    assert_eq!(ids(&page).len(), 2);
    assert_eq!(page["limited"], true);

    // A user in no room is nobody's to find (without search_all_users).
    server.register("hermit", "pw").await;
    assert!(ids(&search(http, &stranger, json!({ "search_term": "hermit" })).await).is_empty());
    server.stop().await;
}

#[tokio::test]
async fn with_search_all_users_every_local_user_is_found() {
    let server = TestServer::start_with(|config| config.user_directory.search_all_users = true).await;
    let http = &server.http;
    let searcher = server.register("searcher", "pw").await;
    server.register("hermit", "pw").await;
    assert_eq!(ids(&search(http, &searcher, json!({ "search_term": "herm" })).await), [server.user_id("hermit")]);
    server.stop().await;
}

#[tokio::test]
async fn bad_directory_searches_get_matrix_errors() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    assert_error(&http.post(SEARCH, None, &json!({ "search_term": "a" })).await, 401, "M_MISSING_TOKEN");
    assert_error(&http.post(SEARCH, Some(&alice), &json!({})).await, 400, "M_BAD_JSON");
    let long = "x".repeat(300);
    assert_error(&http.post(SEARCH, Some(&alice), &json!({ "search_term": long })).await, 400, "M_INVALID_PARAM");
    // The r0 path is the same endpoint.
    let (status, _) =
        http.post("/_matrix/client/r0/user_directory/search", Some(&alice), &json!({ "search_term": "a" })).await;
    assert_eq!(status, 200);
    server.stop().await;
}
