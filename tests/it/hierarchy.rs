//! `GET /rooms/{roomId}/hierarchy` and federation `/hierarchy` (issue #12): a space tree,
//! walked depth-first, shows each user the rooms they may preview and no others; pages with
//! `from` are bound to their parameters; a child only another server is in, or a whole space
//! this server is not in, comes over federation.

use serde_json::{Value, json};

use reqwest::Method;

use crate::federation_keys::{Network, x_matrix};
use crate::support::{Http, TestServer, assert_error, create_room};

async fn space(http: &Http, token: &str, preset: &str, name: &str) -> String {
    create_room(http, token, json!({ "preset": preset, "name": name, "creation_content": { "type": "m.space" } })).await
}

async fn add_child(http: &Http, token: &str, parent: &str, child: &str, content: Value) {
    let path = format!("/_matrix/client/v3/rooms/{parent}/state/m.space.child/{child}");
    let (status, body) = http.put(&path, Some(token), &content).await;
    assert_eq!(status, 200, "{body}");
}

async fn hierarchy(http: &Http, token: &str, room: &str, query: &str) -> Value {
    let (status, body) = http.get(&format!("/_matrix/client/v1/rooms/{room}/hierarchy?{query}"), Some(token)).await;
    assert_eq!(status, 200, "{body}");
    body
}

fn names(page: &Value) -> Vec<String> {
    page["rooms"].as_array().expect("rooms").iter().map(|r| r["name"].as_str().unwrap_or("?").to_owned()).collect()
}

/// alice's tree: Space → Alpha (public), Private (invite only), Sub (public space, suggested)
/// → Delta (public), Quiet (invite only), and back up to Space (a cycle).
struct Tree {
    space: String,
    private: String,
    sub: String,
}

async fn tree(http: &Http, alice: &str, server: &str) -> Tree {
    let space_id = space(http, alice, "public_chat", "Space").await;
    let alpha = create_room(http, alice, json!({ "preset": "public_chat", "name": "Alpha", "topic": "first" })).await;
    let private = create_room(http, alice, json!({ "preset": "private_chat", "name": "Private" })).await;
    let sub = space(http, alice, "public_chat", "Sub").await;
    let delta = create_room(http, alice, json!({ "preset": "public_chat", "name": "Delta" })).await;
    let quiet = create_room(http, alice, json!({ "preset": "private_chat", "name": "Quiet" })).await;
    // `order` keeps the children's order fixed (events sent in the same millisecond would
    // otherwise be ordered by room ID).
    let ordered = |order: &str| json!({ "via": [server], "order": order });
    add_child(http, alice, &space_id, &alpha, ordered("a")).await;
    add_child(http, alice, &space_id, &private, ordered("b")).await;
    add_child(http, alice, &space_id, &sub, json!({ "via": [server], "suggested": true, "order": "c" })).await;
    add_child(http, alice, &sub, &delta, ordered("a")).await;
    add_child(http, alice, &sub, &quiet, ordered("b")).await;
    add_child(http, alice, &sub, &space_id, ordered("c")).await;
    // A child event without `via` is no child.
    let stray = create_room(http, alice, json!({ "preset": "public_chat", "name": "Stray" })).await;
    add_child(http, alice, &space_id, &stray, json!({ "via": [] })).await;
    Tree { space: space_id, private, sub }
}

#[tokio::test]
async fn each_user_sees_the_rooms_they_may_preview_depth_first() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let bob = server.register("bob", "pw").await;
    let tree = tree(http, &alice, &server.server_name).await;

    // alice is in every room: the whole tree, depth-first, the cycle back to Space ignored.
    let all = hierarchy(http, &alice, &tree.space, "").await;
    assert_eq!(names(&all), ["Space", "Alpha", "Private", "Sub", "Delta", "Quiet"], "{all}");
    assert!(all.get("next_batch").is_none());
    let root = &all["rooms"][0];
    assert_eq!(root["room_type"], "m.space");
    assert_eq!(root["join_rule"], "public");
    assert_eq!(root["num_joined_members"], 1);
    assert_eq!(root["world_readable"], false);
    let children_state = root["children_state"].as_array().unwrap();
    assert_eq!(children_state.len(), 4, "the via-less child event is there, as state");
    assert!(children_state.iter().all(|e| e["type"] == "m.space.child" && e["origin_server_ts"].is_u64()));
    assert_eq!(all["rooms"][1]["topic"], "first");

    // bob is in none: the public rooms only, the private ones skipped (their children too).
    assert_eq!(names(&hierarchy(http, &bob, &tree.space, "").await), ["Space", "Alpha", "Sub", "Delta"]);
    assert_eq!(names(&hierarchy(http, &bob, &tree.space, "max_depth=1").await), ["Space", "Alpha", "Sub"]);
    assert_eq!(names(&hierarchy(http, &bob, &tree.space, "max_depth=0").await), ["Space"]);
    assert_eq!(names(&hierarchy(http, &bob, &tree.space, "suggested_only=true").await), ["Space", "Sub"]);
    // A sub-space is a root of its own.
    assert_eq!(names(&hierarchy(http, &bob, &tree.sub, "").await), ["Sub", "Delta", "Space", "Alpha"]);

    // Invited: the private room shows (its join rule says invite, and bob has one).
    let invite = format!("/_matrix/client/v3/rooms/{}/invite", tree.private);
    let (status, body) = http.post(&invite, Some(&alice), &json!({ "user_id": server.user_id("bob") })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(names(&hierarchy(http, &bob, &tree.space, "max_depth=1").await), ["Space", "Alpha", "Private", "Sub"]);

    // A private root is forbidden to outsiders; so is a room the server does not know.
    let carol = server.register("carol", "pw").await;
    let path = format!("/_matrix/client/v1/rooms/{}/hierarchy", tree.private);
    assert_error(&http.get(&path, Some(&carol)).await, 403, "M_FORBIDDEN");
    let unknown = format!("/_matrix/client/v1/rooms/!nowhere:{}/hierarchy", server.server_name);
    assert_error(&http.get(&unknown, Some(&carol)).await, 403, "M_FORBIDDEN");
    server.stop().await;
}

#[tokio::test]
async fn pages_follow_from_tokens_bound_to_their_parameters() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let tree = tree(http, &alice, &server.server_name).await;

    let mut seen = Vec::new();
    let mut from: Option<String> = None;
    for _ in 0..5 {
        let query = match &from {
            Some(token) => format!("limit=2&from={token}"),
            None => "limit=2".to_owned(),
        };
        let page = hierarchy(http, &alice, &tree.space, &query).await;
        assert!(names(&page).len() <= 2);
        seen.extend(names(&page));
        from = page["next_batch"].as_str().map(str::to_owned);
        if from.is_none() {
            break;
        }
    }
    assert_eq!(seen, ["Space", "Alpha", "Private", "Sub", "Delta", "Quiet"]);

    let first = hierarchy(http, &alice, &tree.space, "limit=2").await;
    let token = first["next_batch"].as_str().unwrap();
    let base = format!("/_matrix/client/v1/rooms/{}/hierarchy", tree.space);
    for changed in [format!("limit=2&max_depth=1&from={token}"), format!("suggested_only=true&from={token}")] {
        assert_error(&http.get(&format!("{base}?{changed}"), Some(&alice)).await, 400, "M_INVALID_PARAM");
    }
    let other_root = format!("/_matrix/client/v1/rooms/{}/hierarchy?from={token}", tree.sub);
    assert_error(&http.get(&other_root, Some(&alice)).await, 400, "M_INVALID_PARAM");
    for bad in ["from=bogus", "from=", "limit=0", "limit=-1", "max_depth=x", "suggested_only=maybe"] {
        assert_error(&http.get(&format!("{base}?{bad}"), Some(&alice)).await, 400, "M_INVALID_PARAM");
    }
    let (status, _) = http.get(&base, None).await;
    assert_eq!(status, 401);
    server.stop().await;
}

#[tokio::test]
async fn a_child_only_another_server_is_in_comes_over_federation() {
    let net = Network::new(&["lat1.test", "lat2.test"]);
    let mut lat1 = net.start("lat1.test").await;
    let mut lat2 = net.start("lat2.test").await;
    let alice = lat1.register_user("alice").await;
    let bob = lat2.register_user("bob").await;
    let http1 = &lat1.http;
    let space_id = create_room(
        http1,
        &alice,
        json!({
            "preset": "public_chat", "name": "Remote space", "room_alias_name": "space",
            "creation_content": { "type": "m.space" },
        }),
    )
    .await;
    let public = create_room(http1, &alice, json!({ "preset": "public_chat", "name": "Lat1 only" })).await;
    let private = create_room(http1, &alice, json!({ "preset": "private_chat", "name": "Lat1 private" })).await;
    let nested = create_room(
        http1,
        &alice,
        json!({ "preset": "public_chat", "name": "Nested", "creation_content": { "type": "m.space" } }),
    )
    .await;
    let deep = create_room(http1, &alice, json!({ "preset": "public_chat", "name": "Deep" })).await;
    let ordered = |order: &str| json!({ "via": ["lat1.test"], "order": order });
    add_child(http1, &alice, &space_id, &public, ordered("a")).await;
    add_child(http1, &alice, &space_id, &private, ordered("b")).await;
    add_child(http1, &alice, &space_id, &nested, ordered("c")).await;
    add_child(http1, &alice, &nested, &deep, ordered("a")).await;

    // bob on lat2 joins the space only.
    let (status, joined) = lat2.http.post("/_matrix/client/v3/join/%23space:lat1.test", Some(&bob), &json!({})).await;
    assert_eq!(status, 200, "{joined}");
    let page = hierarchy(&lat2.http, &bob, &space_id, "").await;
    assert_eq!(names(&page), ["Remote space", "Lat1 only", "Nested", "Deep"], "{page}");
    assert_eq!(page["rooms"][1]["room_id"], public.as_str());
    assert_eq!(page["rooms"][1]["num_joined_members"], 1);

    // What lat1 tells lat2 directly: the private child is inaccessible, not described.
    let key2 = lat2.signing_key();
    let path = format!("/_matrix/federation/v1/hierarchy/{space_id}");
    let auth = x_matrix(&key2, "lat2.test", "lat1.test", &Method::GET, &path, b"");
    let (status, answer) = net.request("lat1.test", Method::GET, &path, Some(&auth), None).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["room"]["room_id"], space_id.as_str());
    let children: Vec<&str> =
        answer["children"].as_array().unwrap().iter().filter_map(|c| c["room_id"].as_str()).collect();
    assert_eq!(children, [public.as_str(), nested.as_str()]);
    assert_eq!(answer["inaccessible_children"], json!([private]));
    // A private room is not previewable by a server with no member in it.
    let path = format!("/_matrix/federation/v1/hierarchy/{private}");
    let auth = x_matrix(&key2, "lat2.test", "lat1.test", &Method::GET, &path, b"");
    let (status, answer) = net.request("lat1.test", Method::GET, &path, Some(&auth), None).await;
    assert_eq!(status, 404, "{answer}");
    lat2.stop().await;
    lat1.stop().await;
}

#[tokio::test]
async fn a_space_this_server_is_not_in_is_described_by_the_server_its_id_names() {
    let net = Network::new(&["lat1.test", "lat2.test"]);
    let mut lat1 = net.start("lat1.test").await;
    let mut lat2 = net.start("lat2.test").await;
    let alice = lat1.register_user("alice").await;
    let bob = lat2.register_user("bob").await;
    let http1 = &lat1.http;
    // Version 10: the room ID names lat1.
    let space_of = |preset: &str, name: &str| json!({ "preset": preset, "name": name, "room_version": "10", "creation_content": { "type": "m.space" } });
    let public_space = create_room(http1, &alice, space_of("public_chat", "Public space")).await;
    let child = create_room(http1, &alice, json!({ "preset": "public_chat", "name": "Child" })).await;
    add_child(http1, &alice, &public_space, &child, json!({ "via": ["lat1.test"] })).await;
    let private_space = create_room(http1, &alice, space_of("private_chat", "Private space")).await;

    // bob, in neither, browses the public space from lat2.
    let page = hierarchy(&lat2.http, &bob, &public_space, "").await;
    assert_eq!(names(&page), ["Public space", "Child"], "{page}");
    // The private one is not described to him, nor to anyone on lat2.
    let path = format!("/_matrix/client/v1/rooms/{private_space}/hierarchy");
    assert_error(&lat2.http.get(&path, Some(&bob)).await, 403, "M_FORBIDDEN");
    // A version-12 ID names no server, and lat2 knows nobody to ask.
    let v12 = create_room(
        http1,
        &alice,
        json!({ "preset": "public_chat", "room_version": "12", "creation_content": { "type": "m.space" } }),
    )
    .await;
    let path = format!("/_matrix/client/v1/rooms/{v12}/hierarchy");
    assert_error(&lat2.http.get(&path, Some(&bob)).await, 403, "M_FORBIDDEN");
    lat2.stop().await;
    lat1.stop().await;
}
