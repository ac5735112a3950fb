//! Room aliases and the public room directory over HTTP: creating, resolving and deleting
//! aliases, canonical-alias checks, publishing rooms, searching and paging the directory, and
//! joining by alias.

use std::collections::HashSet;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::{Http, TestServer, assert_error, create_room};

const SERVER: &str = "hs1.localhost";

/// `/directory/room/{alias}` with the alias's `#` escaped.
fn alias_path(alias: &str) -> String {
    format!("/_matrix/client/v3/directory/room/{}", alias.replace('#', "%23"))
}

async fn put_alias(http: &Http, token: &str, alias: &str, room: &str) -> (StatusCode, Value) {
    http.put(&alias_path(alias), Some(token), &json!({ "room_id": room })).await
}

async fn delete_alias(http: &Http, token: &str, alias: &str) -> (StatusCode, Value) {
    http.request(Method::DELETE, &alias_path(alias), Some(token), None).await
}

async fn join(http: &Http, token: &str, room_or_alias: &str) -> (StatusCode, Value) {
    let path = format!("/_matrix/client/v3/join/{}", room_or_alias.replace('#', "%23"));
    http.post(&path, Some(token), &json!({})).await
}

async fn canonical_alias(http: &Http, token: &str, room: &str) -> (StatusCode, Value) {
    http.get(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.canonical_alias"), Some(token)).await
}

async fn set_canonical_alias(http: &Http, token: &str, room: &str, content: Value) -> (StatusCode, Value) {
    http.put(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.canonical_alias"), Some(token), &content).await
}

fn room_ids(page: &Value) -> Vec<String> {
    page["chunk"]
        .as_array()
        .expect("chunk")
        .iter()
        .map(|r| r["room_id"].as_str().expect("room_id").to_owned())
        .collect()
}

#[tokio::test]
async fn aliases_are_created_resolved_and_deleted_by_those_allowed() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let bob = server.register("bob", "pw").await;
    let moderator = server.register("moderator", "pw").await;
    let carol = server.register("carol", "pw").await;
    let levels = json!({ "users": { server.user_id("alice"): 100, server.user_id("moderator"): 50 } });
    let room =
        create_room(http, &alice, json!({ "preset": "public_chat", "power_level_content_override": levels })).await;
    for token in [&bob, &moderator] {
        assert_eq!(join(http, token, &room).await.0, 200);
    }

    // Any member may add an alias; outsiders may not.
    assert_eq!(put_alias(http, &bob, "#bobs:hs1.localhost", &room).await.0, 200);
    assert_eq!(put_alias(http, &alice, "#alices:hs1.localhost", &room).await.0, 200);
    assert_error(&put_alias(http, &carol, "#carols:hs1.localhost", &room).await, 403, "M_FORBIDDEN");
    assert_error(&put_alias(http, &alice, "#bobs:hs1.localhost", &room).await, 409, "M_UNKNOWN");
    assert_error(&put_alias(http, &alice, "#new:hs1.localhost", "!nowhere:hs1.localhost").await, 404, "M_NOT_FOUND");

    // Resolving needs no token; the answer names this server.
    let (status, resolved) = http.get(&alias_path("#bobs:hs1.localhost"), None).await;
    assert_eq!(status, 200, "{resolved}");
    assert_eq!(resolved, json!({ "room_id": room, "servers": [SERVER] }));
    assert_error(&http.get(&alias_path("#nobody:hs1.localhost"), None).await, 404, "M_NOT_FOUND");
    let remote = http.get(&alias_path("#elsewhere:other.example"), None).await;
    assert_error(&remote, 404, "M_NOT_FOUND");
    assert!(remote.1["error"].as_str().unwrap().contains("federation"), "{}", remote.1);

    // Bad aliases: grammar, an empty or spaced local part, another server's alias.
    for bad in ["notanalias", "#no-server", "#:hs1.localhost", "#two words:hs1.localhost", "#x:other.example"] {
        let path = alias_path(bad).replace(' ', "%20");
        assert_error(&http.put(&path, Some(&alice), &json!({ "room_id": room })).await, 400, "M_INVALID_PARAM");
    }

    // Members list the room's local aliases; others may not (history is not world-readable).
    let (status, listed) = http.get(&format!("/_matrix/client/v3/rooms/{room}/aliases"), Some(&bob)).await;
    assert_eq!(status, 200, "{listed}");
    let listed: HashSet<&str> = listed["aliases"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert_eq!(listed, HashSet::from(["#bobs:hs1.localhost", "#alices:hs1.localhost"]));
    assert_error(
        &http.get(&format!("/_matrix/client/v3/rooms/{room}/aliases"), Some(&carol)).await,
        403,
        "M_FORBIDDEN",
    );

    // Deleting: not a stranger, nor a member without power over the canonical alias; the alias's
    // creator and a moderator may.
    assert_error(&delete_alias(http, &carol, "#bobs:hs1.localhost").await, 403, "M_FORBIDDEN");
    assert_eq!(join(http, &carol, &room).await.0, 200);
    assert_error(&delete_alias(http, &carol, "#alices:hs1.localhost").await, 403, "M_FORBIDDEN");
    assert_eq!(delete_alias(http, &bob, "#bobs:hs1.localhost").await.0, 200);
    assert_eq!(delete_alias(http, &moderator, "#alices:hs1.localhost").await.0, 200);
    assert_error(&delete_alias(http, &alice, "#alices:hs1.localhost").await, 404, "M_NOT_FOUND");
    assert_error(&http.get(&alias_path("#bobs:hs1.localhost"), None).await, 404, "M_NOT_FOUND");
    let (_, listed) = http.get(&format!("/_matrix/client/v3/rooms/{room}/aliases"), Some(&bob)).await;
    assert_eq!(listed, json!({ "aliases": [] }));
    // A deleted alias is free again.
    assert_eq!(put_alias(http, &carol, "#bobs:hs1.localhost", &room).await.0, 200);
    server.stop().await;
}

#[tokio::test]
async fn canonical_aliases_must_point_here_and_follow_deletions() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let room = create_room(http, &alice, json!({})).await;
    let other = create_room(http, &alice, json!({})).await;
    assert_eq!(put_alias(http, &alice, "#main:hs1.localhost", &room).await.0, 200);
    assert_eq!(put_alias(http, &alice, "#second:hs1.localhost", &room).await.0, 200);
    assert_eq!(put_alias(http, &alice, "#theirs:hs1.localhost", &other).await.0, 200);

    for content in [
        json!({ "alias": "#theirs:hs1.localhost" }),
        json!({ "alias": "#missing:hs1.localhost" }),
        json!({ "alias": "not an alias" }),
        json!({ "alias": 7 }),
        json!({ "alias": "#main:hs1.localhost", "alt_aliases": ["#theirs:hs1.localhost"] }),
        json!({ "alt_aliases": "#main:hs1.localhost" }),
    ] {
        assert_error(&set_canonical_alias(http, &alice, &room, content.clone()).await, 400, "M_BAD_ALIAS");
    }
    let (status, _) = canonical_alias(http, &alice, &room).await;
    assert_eq!(status, 404, "nothing refused was stored");

    // Aliases of other servers cannot be checked without federation; their grammar is.
    let good = json!({
        "alias": "#main:hs1.localhost",
        "alt_aliases": ["#second:hs1.localhost", "#far:other.example"],
    });
    let (status, body) = set_canonical_alias(http, &alice, &room, good.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(canonical_alias(http, &alice, &room).await.1, good);

    // Deleting an alias the event names sends an updated event without it.
    assert_eq!(delete_alias(http, &alice, "#main:hs1.localhost").await.0, 200);
    let expected = json!({ "alt_aliases": ["#second:hs1.localhost", "#far:other.example"] });
    assert_eq!(canonical_alias(http, &alice, &room).await.1, expected);
    assert_eq!(delete_alias(http, &alice, "#second:hs1.localhost").await.0, 200);
    assert_eq!(canonical_alias(http, &alice, &room).await.1, json!({ "alt_aliases": ["#far:other.example"] }));
    server.stop().await;
}

#[tokio::test]
async fn a_public_room_with_an_alias_is_found_in_the_directory_and_joined_by_alias() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let bob = server.register("bob", "pw").await;
    let body = json!({
        "room_alias_name": "coffee", "visibility": "public", "name": "Coffee Lovers", "topic": "All about beans",
    });
    let room = create_room(http, &alice, body).await;
    assert_eq!(canonical_alias(http, &alice, &room).await.1, json!({ "alias": "#coffee:hs1.localhost" }));
    // The spec's order: the canonical alias right after the power levels, before the preset's events.
    let (_, events) = http.get(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=f&limit=20"), Some(&alice)).await;
    let kinds: Vec<&str> = events["chunk"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        &kinds[..5],
        ["m.room.create", "m.room.member", "m.room.power_levels", "m.room.canonical_alias", "m.room.join_rules"]
    );
    let welcome = json!({ "msgtype": "m.text", "body": "welcome, coffee people" });
    let path = format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/w1");
    assert_eq!(http.put(&path, Some(&alice), &welcome).await.0, 200);

    // Anyone may list the directory, without a token.
    let (status, page) = http.get("/_matrix/client/v3/publicRooms", None).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["total_room_count_estimate"], 1);
    assert_eq!(
        page["chunk"][0],
        json!({
            "room_id": room, "name": "Coffee Lovers", "topic": "All about beans",
            "canonical_alias": "#coffee:hs1.localhost", "num_joined_members": 1, "world_readable": false,
            "guest_can_join": false, "join_rule": "public",
        })
    );
    assert!(page.get("next_batch").is_none() && page.get("prev_batch").is_none(), "{page}");

    // Searching: name, topic or alias, any case; room types with null for plain rooms.
    let search = async |filter: Value| {
        http.post("/_matrix/client/v3/publicRooms", Some(&bob), &json!({ "filter": filter })).await
    };
    for (filter, found) in [
        (json!({ "generic_search_term": "COFFEE" }), true),
        (json!({ "generic_search_term": "beans" }), true),
        (json!({ "generic_search_term": "#coffee:" }), true),
        (json!({ "generic_search_term": "tea" }), false),
        (json!({ "room_types": [null] }), true),
        (json!({ "room_types": ["m.space"] }), false),
        (json!({}), true),
    ] {
        let (status, page) = search(filter.clone()).await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(room_ids(&page), if found { vec![room.clone()] } else { vec![] }, "{filter}");
    }
    assert_error(&http.post("/_matrix/client/v3/publicRooms", None, &json!({})).await, 401, "M_MISSING_TOKEN");
    let remote = http.get("/_matrix/client/v3/publicRooms?server=other.example", None).await;
    assert_error(&remote, 404, "M_NOT_FOUND");
    let remote = http.post("/_matrix/client/v3/publicRooms?server=other.example", Some(&bob), &json!({})).await;
    assert_error(&remote, 404, "M_NOT_FOUND");
    assert_error(&http.get("/_matrix/client/v3/publicRooms?since=garbage", None).await, 400, "M_INVALID_PARAM");

    // bob joins by alias (with a `via`) and sees the room's history.
    let (status, joined) =
        http.post("/_matrix/client/v3/join/%23coffee:hs1.localhost?via=hs1.localhost", Some(&bob), &json!({})).await;
    assert_eq!(status, 200, "{joined}");
    assert_eq!(joined["room_id"], room);
    let (status, messages) = http.get(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b"), Some(&bob)).await;
    assert_eq!(status, 200, "{messages}");
    let bodies: Vec<&str> =
        messages["chunk"].as_array().unwrap().iter().filter_map(|e| e["content"]["body"].as_str()).collect();
    assert!(bodies.contains(&"welcome, coffee people"), "{messages}");
    assert_eq!(http.get("/_matrix/client/v3/publicRooms", None).await.1["chunk"][0]["num_joined_members"], 2);
    assert_error(&join(http, &bob, "#nothing:hs1.localhost").await, 404, "M_NOT_FOUND");
    assert_error(&join(http, &bob, "#far:other.example").await, 404, "M_NOT_FOUND");
    let bad_via =
        http.post("/_matrix/client/v3/join/%23coffee:hs1.localhost?via=bad%20server", Some(&bob), &json!({})).await;
    assert_error(&bad_via, 400, "M_INVALID_PARAM");

    // Visibility: readable by anyone; only those with power over the canonical alias change it.
    let visibility_path = format!("/_matrix/client/v3/directory/list/room/{room}");
    assert_eq!(http.get(&visibility_path, None).await.1, json!({ "visibility": "public" }));
    assert_error(
        &http.put(&visibility_path, Some(&bob), &json!({ "visibility": "private" })).await,
        403,
        "M_FORBIDDEN",
    );
    assert_eq!(http.put(&visibility_path, Some(&alice), &json!({ "visibility": "private" })).await.0, 200);
    assert_eq!(http.get(&visibility_path, None).await.1, json!({ "visibility": "private" }));
    assert_eq!(room_ids(&http.get("/_matrix/client/v3/publicRooms", None).await.1), Vec::<String>::new());
    assert_error(
        &http.put(&visibility_path, Some(&alice), &json!({ "visibility": "hidden" })).await,
        400,
        "M_BAD_JSON",
    );
    // The body's visibility defaults to public.
    assert_eq!(http.put(&visibility_path, Some(&alice), &json!({})).await.0, 200);
    assert_eq!(http.get(&visibility_path, None).await.1, json!({ "visibility": "public" }));
    let unknown = "/_matrix/client/v3/directory/list/room/!nowhere:hs1.localhost";
    assert_error(&http.get(unknown, None).await, 404, "M_NOT_FOUND");
    assert_error(&http.put(unknown, Some(&alice), &json!({ "visibility": "public" })).await, 404, "M_NOT_FOUND");
    server.stop().await;
}

#[tokio::test]
async fn the_directory_pages_forward_and_back_without_repeats_or_gaps() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let bob = server.register("bob", "pw").await;
    let mut rooms = Vec::new();
    for i in 0..7 {
        rooms.push(create_room(http, &alice, json!({ "visibility": "public", "name": format!("Room {i}") })).await);
    }
    // A private room never shows up.
    create_room(http, &alice, json!({ "name": "Room secret" })).await;
    // Two rooms with more members sort first.
    for room in &rooms[5..] {
        assert_eq!(join(http, &bob, room).await.0, 200);
    }

    let mut seen = Vec::new();
    let mut pages = Vec::new();
    let mut since: Option<String> = None;
    loop {
        let mut body = json!({ "limit": 3 });
        if let Some(since) = &since {
            body["since"] = json!(since);
        }
        let (status, page) = http.post("/_matrix/client/v3/publicRooms", Some(&bob), &body).await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(page["total_room_count_estimate"], 7);
        seen.extend(room_ids(&page));
        pages.push(page.clone());
        match page["next_batch"].as_str() {
            Some(next) => since = Some(next.to_owned()),
            None => break,
        }
        assert!(pages.len() < 10, "paging does not end");
    }
    assert_eq!(pages.len(), 3);
    assert_eq!(seen.len(), 7, "{seen:?}");
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 7, "no room twice: {seen:?}");
    assert_eq!(seen.iter().collect::<HashSet<_>>(), rooms.iter().collect::<HashSet<_>>());
    let mut busiest = rooms[5..].to_vec();
    busiest.sort();
    assert_eq!(seen[..2], busiest[..], "most members first, then room ID");
    assert!(pages[0].get("prev_batch").is_none());

    // Going back from the last page gives the middle page again, and from there the first.
    let back = pages[2]["prev_batch"].as_str().expect("prev_batch on the last page");
    let (_, middle) = http.get(&format!("/_matrix/client/v3/publicRooms?limit=3&since={back}"), None).await;
    assert_eq!(room_ids(&middle), room_ids(&pages[1]));
    let back = middle["prev_batch"].as_str().expect("prev_batch on the middle page");
    let (_, first) = http.get(&format!("/_matrix/client/v3/publicRooms?limit=3&since={back}"), None).await;
    assert_eq!(room_ids(&first), room_ids(&pages[0]));

    // Limits are capped, not refused.
    let (status, all) = http.get("/_matrix/client/v3/publicRooms?limit=100000", None).await;
    assert_eq!((status.as_u16(), room_ids(&all).len()), (200, 7));
    server.stop().await;
}

#[tokio::test]
async fn a_taken_or_invalid_room_alias_name_creates_no_room() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let bob = server.register("bob", "pw").await;
    create_room(http, &alice, json!({ "room_alias_name": "taken" })).await;

    let create = async |body: Value| http.post("/_matrix/client/v3/createRoom", Some(&bob), &body).await;
    assert_error(&create(json!({ "room_alias_name": "taken", "name": "Mine" })).await, 400, "M_ROOM_IN_USE");
    let too_long = "x".repeat(300);
    for bad in ["", "a:b", "two words", too_long.as_str()] {
        assert_error(&create(json!({ "room_alias_name": bad })).await, 400, "M_INVALID_PARAM");
    }
    assert_eq!(http.get("/_matrix/client/v3/joined_rooms", Some(&bob)).await.1, json!({ "joined_rooms": [] }));
    assert_eq!(
        room_ids(&http.post("/_matrix/client/v3/publicRooms", Some(&bob), &json!({})).await.1),
        Vec::<String>::new()
    );
    server.stop().await;
}

/// The directory's routes with hostile paths, queries and bodies: always a Matrix error or a
/// success, never a 5xx.
#[tokio::test]
async fn hostile_directory_requests_get_matrix_errors() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let room = create_room(http, &alice, json!({ "room_alias_name": "target" })).await;
    let routes = [
        "/_matrix/client/v3/directory/room/%23target:hs1.localhost".to_owned(),
        "/_matrix/client/v3/directory/room/%23%00:hs1.localhost".to_owned(),
        "/_matrix/client/v3/directory/room/%FF%FE".to_owned(),
        format!("/_matrix/client/v3/directory/room/%23{}:hs1.localhost", "x".repeat(400)),
        format!("/_matrix/client/v3/rooms/{room}/aliases"),
        "/_matrix/client/v3/rooms/%23target:hs1.localhost/aliases".to_owned(),
        "/_matrix/client/v3/publicRooms?limit=-1&since=n18446744073709551616_!x".to_owned(),
        "/_matrix/client/v3/publicRooms?since=p0_".to_owned(),
        format!("/_matrix/client/v3/directory/list/room/{room}"),
        "/_matrix/client/v3/directory/list/room/%00".to_owned(),
        "/_matrix/client/v3/join/%23%FF:hs1.localhost?via=%00".to_owned(),
    ];
    let bodies: Vec<&[u8]> = vec![
        b"",
        b"{",
        b"[]",
        b"{\"room_id\": 5, \"visibility\": null}",
        b"{\"room_id\": \"#target:hs1.localhost\"}",
        b"{\"filter\": {\"room_types\": [1]}, \"limit\": -5}",
        b"{\"filter\": {\"generic_search_term\": \"\\u0000\"}, \"since\": \"n1_\"}",
    ];
    for route in &routes {
        for method in [Method::GET, Method::POST, Method::PUT, Method::DELETE] {
            for body in &bodies {
                let (status, value) = http.request(method.clone(), route, Some(&alice), Some(body.to_vec())).await;
                assert!(status.as_u16() < 500, "{method} {route} → {status} {value}");
                assert!(value["errcode"].is_string() || status.is_success(), "{method} {route} → {status} {value}");
            }
        }
    }
    // The alias survived the sweep (DELETE with alice's token was allowed to remove it, so
    // only check the server still answers).
    assert!(http.get("/_matrix/client/v3/publicRooms", None).await.0.is_success());
    server.stop().await;
}

/// `matrix-sdk` creates a published room with an alias; another client resolves the alias,
/// finds the room in the directory and joins by alias.
#[tokio::test]
async fn matrix_sdk_finds_a_published_room_and_joins_it_by_alias() {
    use matrix_sdk::Client;
    use matrix_sdk::ruma::api::client::room::Visibility;
    use matrix_sdk::ruma::api::client::room::create_room::v3::Request as CreateRoomRequest;
    use matrix_sdk::ruma::{RoomAliasId, RoomOrAliasId};

    let server = TestServer::start().await;
    server.register("alice", "pw-a").await;
    server.register("bob", "pw-b").await;
    let login = async |name: &str, password: &str| {
        let client = Client::builder().homeserver_url(server.base_url()).build().await.expect("client builds");
        client.matrix_auth().login_username(name, password).send().await.expect("login");
        client
    };
    let alice = login("alice", "pw-a").await;
    let bob = login("bob", "pw-b").await;

    let mut request = CreateRoomRequest::new();
    request.name = Some("SDK lounge".to_owned());
    request.room_alias_name = Some("lounge".to_owned());
    request.visibility = Visibility::Public;
    let room = alice.create_room(request).await.expect("room created");

    let alias = <&RoomAliasId>::try_from("#lounge:hs1.localhost").unwrap();
    let resolved = bob.resolve_room_alias(alias).await.expect("alias resolves");
    assert_eq!(resolved.room_id, room.room_id());
    let listed = bob.public_rooms(Some(10), None, None).await.expect("directory");
    assert_eq!(listed.chunk.len(), 1);
    assert_eq!(listed.chunk[0].room_id, room.room_id());
    assert_eq!(listed.chunk[0].canonical_alias.as_deref(), Some(alias));
    let joined = bob.join_room_by_id_or_alias(<&RoomOrAliasId>::from(alias), &[]).await.expect("joins by alias");
    assert_eq!(joined.room_id(), room.room_id());
    server.stop().await;
}
