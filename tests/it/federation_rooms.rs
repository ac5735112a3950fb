//! Rooms shared between real Lattice servers on loopback (the network of `federation_keys`):
//! joining a room on another server by alias, messages both ways through `/send`
//! transactions, and what a server outside the room may not read or do.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::federation_invites::signed_event;
use crate::federation_keys::{Network, Server, x_matrix};
use crate::support::{Http, assert_error, bodies, create_room, say};

/// Syncs (incrementally, from the previous answer) until `found` holds for the answer's
/// rooms, or fails after 30 seconds.
pub(crate) async fn sync_until(server: &Server, token: &str, what: &str, found: impl Fn(&Value) -> bool) -> Value {
    sync_until_from(server, token, None, what, found).await
}

/// [`sync_until`] starting from the token `since` (`None`: an initial sync).
pub(crate) async fn sync_until_from(
    server: &Server,
    token: &str,
    since: Option<&str>,
    what: &str,
    found: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut since: Option<String> = since.map(str::to_owned);
    let mut seen = Vec::new();
    loop {
        let query = match &since {
            Some(since) => format!("/_matrix/client/v3/sync?timeout=1000&since={since}"),
            None => "/_matrix/client/v3/sync?timeout=0".to_owned(),
        };
        let (status, body) = server.http.get(&query, Some(token)).await;
        assert_eq!(status, 200, "{body}");
        if found(&body) {
            return body;
        }
        seen.push(body["rooms"].clone());
        assert!(Instant::now() < deadline, "timed out waiting for {what}; syncs saw {seen:?}");
        since = body["next_batch"].as_str().map(str::to_owned);
    }
}

pub(crate) fn timeline_bodies(sync: &Value, room: &str) -> Vec<String> {
    let events = &sync["rooms"]["join"][room]["timeline"]["events"];
    if events.is_array() { bodies(events) } else { Vec::new() }
}

/// alice on lat1 has a public room with an alias; bob on lat2 joins it by the alias.
pub(crate) async fn shared_room(net: &Network, lat1: &Server, lat2: &Server) -> (String, String, String) {
    let alice = lat1.register_user("alice").await;
    let bob = lat2.register_user("bob").await;
    let room = create_room(
        &lat1.http,
        &alice,
        json!({ "preset": "public_chat", "room_alias_name": "chat", "name": "Across servers", "room_version": "12" }),
    )
    .await;
    say(&lat1.http, &alice, &room, "before-bob").await;
    let (status, joined) = lat2.http.post("/_matrix/client/v3/join/%23chat:lat1.test", Some(&bob), &json!({})).await;
    assert_eq!(status, 200, "{joined}");
    assert_eq!(joined["room_id"], room.as_str());
    let _ = net;
    (alice, bob, room)
}

#[tokio::test]
async fn a_user_joins_a_room_on_another_server_and_both_sides_chat() {
    let net = Network::new(&["lat1.test", "lat2.test"]);
    let mut lat1 = net.start("lat1.test").await;
    let mut lat2 = net.start("lat2.test").await;
    let (alice, bob, room) = shared_room(&net, &lat1, &lat2).await;

    // bob's server now has the room, with its state as lat1 gave it.
    let sync = sync_until(&lat2, &bob, "the joined room", |s| s["rooms"]["join"][&room].is_object()).await;
    let (status, name) =
        lat2.http.get(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.name/"), Some(&bob)).await;
    assert_eq!((status, &name["name"]), (reqwest::StatusCode::OK, &json!("Across servers")), "{sync}");
    let (status, members) = lat2.http.get(&format!("/_matrix/client/v3/rooms/{room}/joined_members"), Some(&bob)).await;
    assert_eq!(status, 200, "{members}");
    let joined: Vec<&String> = members["joined"].as_object().unwrap().keys().collect();
    assert_eq!(joined, ["@alice:lat1.test", "@bob:lat2.test"], "{members}");

    // lat1 learnt of bob's join through send_join; alice sees him arrive.
    sync_until(&lat1, &alice, "bob's join on lat1", |s| {
        s["rooms"]["join"][&room]["timeline"]["events"].as_array().is_some_and(|events| {
            events.iter().any(|e| e["type"] == "m.room.member" && e["state_key"] == "@bob:lat2.test")
        })
    })
    .await;

    // Messages flow both ways, through each server's queue to the other's `/send`.
    say(&lat1.http, &alice, &room, "hello-bob").await;
    sync_until(&lat2, &bob, "alice's message on lat2", |s| timeline_bodies(s, &room).contains(&"hello-bob".to_owned()))
        .await;
    let from_bob = say(&lat2.http, &bob, &room, "hello-alice").await;
    sync_until(&lat1, &alice, "bob's message on lat1", |s| {
        timeline_bodies(s, &room).contains(&"hello-alice".to_owned())
    })
    .await;

    // Typing notices and read receipts cross too, as EDUs in the same queues.
    let typing = format!("/_matrix/client/v3/rooms/{room}/typing/@bob:lat2.test");
    let (status, body) = lat2.http.put(&typing, Some(&bob), &json!({ "typing": true, "timeout": 20000 })).await;
    assert_eq!(status, 200, "{body}");
    sync_until(&lat1, &alice, "bob typing, on lat1", |s| {
        s["rooms"]["join"][&room]["ephemeral"]["events"].as_array().is_some_and(|events| {
            events.iter().any(|e| e["type"] == "m.typing" && e["content"]["user_ids"] == json!(["@bob:lat2.test"]))
        })
    })
    .await;
    let receipt = format!("/_matrix/client/v3/rooms/{room}/receipt/m.read/{from_bob}");
    let (status, body) = lat1.http.post(&receipt, Some(&alice), &json!({})).await;
    assert_eq!(status, 200, "{body}");
    sync_until(&lat2, &bob, "alice's receipt, on lat2", |s| {
        s["rooms"]["join"][&room]["ephemeral"]["events"].as_array().is_some_and(|events| {
            events
                .iter()
                .any(|e| e["type"] == "m.receipt" && e["content"][&from_bob]["m.read"]["@alice:lat1.test"].is_object())
        })
    })
    .await;

    // History from before bob's server joined is backfilled from lat1 when bob pages back.
    let path = format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=30");
    let (status, history) = lat2.http.get(&path, Some(&bob)).await;
    assert_eq!(status, 200, "{history}");
    let seen = bodies(&history["chunk"]);
    assert!(seen.contains(&"before-bob".to_owned()), "backfilled history: {seen:?}");
    assert_eq!(seen.iter().filter(|b| *b == "hello-bob").count(), 1, "no event twice: {seen:?}");

    // While lat2 is down, lat1 keeps alice's message queued and delivers it once lat2 is back.
    lat2.stop().await;
    say(&lat1.http, &alice, &room, "while-lat2-was-down").await;
    lat2.restart().await;
    sync_until(&lat2, &bob, "the message sent while lat2 was down", |s| {
        timeline_bodies(s, &room).contains(&"while-lat2-was-down".to_owned())
    })
    .await;

    // Both servers hold the same room state afterwards.
    let path = format!("/_matrix/client/v3/rooms/{room}/joined_members");
    let (_, on_lat1) = lat1.http.get(&path, Some(&alice)).await;
    let (_, on_lat2) = lat2.http.get(&path, Some(&bob)).await;
    assert_eq!(on_lat1["joined"].as_object().map(|m| m.len()), Some(2), "{on_lat1}");
    assert_eq!(
        on_lat1["joined"].as_object().map(|m| m.keys().collect::<Vec<_>>()),
        on_lat2["joined"].as_object().map(|m| m.keys().collect::<Vec<_>>())
    );

    lat2.stop().await;
    lat1.stop().await;
}

#[tokio::test]
async fn a_server_outside_the_room_reads_nothing_and_cannot_act_for_others() {
    let net = Network::new(&["lat1.test", "lat2.test", "lat3.test"]);
    let mut lat1 = net.start("lat1.test").await;
    let mut lat2 = net.start("lat2.test").await;
    let mut lat3 = net.start("lat3.test").await;
    let (alice, _bob, room) = shared_room(&net, &lat1, &lat2).await;
    let secret = say(&lat1.http, &alice, &room, "not-for-lat3").await;
    let key3 = lat3.signing_key();

    let signed = |method: Method, path: String, body: Option<Value>| {
        let bytes = body.as_ref().map(|b| b.to_string()).unwrap_or_default();
        let auth = x_matrix(&key3, "lat3.test", "lat1.test", &method, &path, bytes.as_bytes());
        (method, path, auth, body)
    };
    let room_enc = room.replace('!', "%21");
    let event_enc = secret.replace('$', "%24");
    for (method, path, auth, body) in [
        signed(Method::GET, format!("/_matrix/federation/v1/event/{event_enc}"), None),
        signed(Method::GET, format!("/_matrix/federation/v1/state_ids/{room_enc}?event_id={event_enc}"), None),
        signed(Method::GET, format!("/_matrix/federation/v1/state/{room_enc}?event_id={event_enc}"), None),
        signed(Method::GET, format!("/_matrix/federation/v1/backfill/{room_enc}?v={event_enc}&limit=10"), None),
        signed(
            Method::POST,
            format!("/_matrix/federation/v1/get_missing_events/{room_enc}"),
            Some(json!({ "earliest_events": [], "latest_events": [secret], "limit": 10 })),
        ),
        signed(Method::GET, format!("/_matrix/federation/v1/event_auth/{room_enc}/{event_enc}"), None),
    ] {
        let answer = net.request("lat1.test", method, &path, Some(&auth), body.as_ref()).await;
        assert!(
            [403, 404].contains(&answer.0.as_u16()) && !answer.1.to_string().contains("not-for-lat3"),
            "{path}: {answer:?}"
        );
    }

    // lat3 may not ask for a join template for a user of another server.
    let (method, path, auth, _) =
        signed(Method::GET, format!("/_matrix/federation/v1/make_join/{room_enc}/@bob:lat2.test?ver=11"), None);
    let answer = net.request("lat1.test", method, &path, Some(&auth), None).await;
    assert_error(&answer, 403, "M_FORBIDDEN");
    // A join template names only room versions the asking server supports.
    let (method, path, auth, _) =
        signed(Method::GET, format!("/_matrix/federation/v1/make_join/{room_enc}/@mallory:lat3.test?ver=1"), None);
    let answer = net.request("lat1.test", method, &path, Some(&auth), None).await;
    assert_error(&answer, 400, "M_INCOMPATIBLE_ROOM_VERSION");
    // A transaction claiming an event of another server's user gets a per-PDU error.
    let forged = json!({
        "type": "m.room.message", "room_id": room, "sender": "@bob:lat2.test", "content": { "body": "forged" },
        "origin_server_ts": 1, "depth": 10, "prev_events": [secret], "auth_events": [],
        "hashes": { "sha256": "x" }, "signatures": {}
    });
    let txn = json!({ "origin": "lat3.test", "origin_server_ts": 1, "pdus": [forged] });
    let (method, path, auth, body) = signed(Method::PUT, "/_matrix/federation/v1/send/t1".to_owned(), Some(txn));
    let answer = net.request("lat1.test", method, &path, Some(&auth), body.as_ref()).await;
    assert_eq!(answer.0, 200, "{answer:?}");
    let results = answer.1["pdus"].as_object().expect("per-PDU results");
    assert!(results.values().all(|r| r["error"].is_string()), "{answer:?}");
    let (_, messages) =
        lat1.http.get(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=20"), Some(&alice)).await;
    assert!(!messages.to_string().contains("forged"), "{messages}");

    lat3.stop().await;
    lat2.stop().await;
    lat1.stop().await;
}

/// A request from `origin` to lat1's federation listener, signed with `origin`'s key.
pub(crate) async fn signed_request(
    net: &Network,
    (origin, key): (&str, &ruma::signatures::Ed25519KeyPair),
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (reqwest::StatusCode, Value) {
    let bytes = body.as_ref().map(|b| b.to_string()).unwrap_or_default();
    let auth = x_matrix(key, origin, "lat1.test", &method, path, bytes.as_bytes());
    net.request("lat1.test", method, path, Some(&auth), body.as_ref()).await
}

/// Messages of `sender` (a user of lat2, whose key signs them as lat2 would) in `room` on lat1,
/// each citing the one before, the first citing the sender's join as lat1 has it (read by
/// `reader`, a member on lat1): PDUs for lat1's `/send`.
pub(crate) async fn chained_messages(
    net: &Network,
    lat1: &Http,
    (reader, room): (&str, &str),
    (sender, key): (&str, &ruma::signatures::Ed25519KeyPair),
    bodies: impl Iterator<Item = String>,
) -> Vec<Value> {
    let (_, state) = lat1.get(&format!("/_matrix/client/v3/rooms/{room}/state"), Some(reader)).await;
    let state_event = |kind: &str, key: &str| {
        state.as_array().unwrap().iter().find(|e| e["type"] == kind && e["state_key"] == key).unwrap().clone()
    };
    let create = state_event("m.room.create", "");
    let version = create["content"]["room_version"].as_str().unwrap_or("1").to_owned();
    let join = state_event("m.room.member", sender);
    let mut auth_events = vec![state_event("m.room.power_levels", "")["event_id"].clone(), join["event_id"].clone()];
    if version != "12" {
        auth_events.push(create["event_id"].clone());
    }
    let (_, join_pdu) = signed_request(
        net,
        ("lat2.test", key),
        Method::GET,
        &format!("/_matrix/federation/v1/event/{}", join["event_id"].as_str().unwrap().replace('$', "%24")),
        None,
    )
    .await;
    let mut depth = join_pdu["pdus"][0]["depth"].as_u64().unwrap();
    let mut prev = join["event_id"].clone();
    let mut pdus = Vec::new();
    for (n, body) in bodies.enumerate() {
        depth += 1;
        let event = json!({
            "room_id": room, "sender": sender, "type": "m.room.message", "origin_server_ts": 1_000 + n,
            "content": { "msgtype": "m.text", "body": body },
            "prev_events": [prev], "auth_events": auth_events, "depth": depth,
        });
        let (id, pdu) = signed_event(key, "lat2.test", &version, event);
        prev = json!(id);
        pdus.push(pdu);
    }
    pdus
}

/// A transaction of many PDUs (their signatures checked in several chunks while the first ones
/// are ingested) answers each PDU for itself and keeps their order: two whose signature does not
/// verify, among them, are refused and never shown, and the ones after them are not held back.
#[tokio::test]
async fn a_transaction_of_many_pdus_answers_each_and_keeps_their_order() {
    let net = Network::new(&["lat1.test", "lat2.test"]);
    let lat1 = net.start("lat1.test").await;
    let lat2 = net.start("lat2.test").await;
    let (alice, _bob, room) = shared_room(&net, &lat1, &lat2).await;
    let bob_id = "@bob:lat2.test";
    let key = lat2.signing_key();
    let texts = (0..23).map(|n| format!("in order {n}"));
    let mut pdus = chained_messages(&net, &lat1.http, (&alice, &room), (bob_id, &key), texts).await;
    // Two more messages beside the chain, each with another event's signature.
    let forged = ["forged".to_owned()].into_iter();
    let mut forged = chained_messages(&net, &lat1.http, (&alice, &room), (bob_id, &key), forged).await.remove(0);
    forged["signatures"] = pdus[0]["signatures"].clone();
    let mut other = forged.clone();
    other["origin_server_ts"] = json!(5);
    pdus.insert(7, forged);
    pdus.insert(16, other);

    let txn = json!({ "origin": "lat2.test", "origin_server_ts": 1, "pdus": pdus });
    let path = "/_matrix/federation/v1/send/many-in-order";
    let (status, answer) = signed_request(&net, ("lat2.test", &key), Method::PUT, path, Some(txn)).await;
    assert_eq!(status, 200, "{answer}");
    let results = answer["pdus"].as_object().unwrap();
    let refused: Vec<&Value> = results.values().filter(|r| r.get("error").is_some()).collect();
    assert_eq!((results.len(), refused.len()), (25, 2), "{answer}");

    let (status, page) =
        lat1.http.get(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=50"), Some(&alice)).await;
    assert_eq!(status, 200, "{page}");
    let mut shown = bodies(&page["chunk"]);
    shown.reverse();
    let expected: Vec<String> = (0..23).map(|n| format!("in order {n}")).collect();
    assert_eq!(shown.iter().filter(|b| b.starts_with("in order")).cloned().collect::<Vec<_>>(), expected);
    assert!(!shown.iter().any(|b| b == "forged"), "{shown:?}");
}

#[tokio::test]
async fn banned_users_and_servers_denied_by_the_acl_stay_out() {
    let net = Network::new(&["lat1.test", "lat2.test", "lat3.test"]);
    let mut lat1 = net.start("lat1.test").await;
    let mut lat2 = net.start("lat2.test").await;
    let mut lat3 = net.start("lat3.test").await;
    let (alice, _bob, room) = shared_room(&net, &lat1, &lat2).await;
    let room_enc = room.replace('!', "%21");
    let key3 = lat3.signing_key();

    // A banned user of another server gets no join template, and a join built without one is
    // refused by the room's rules.
    let ban = format!("/_matrix/client/v3/rooms/{room}/ban");
    let (status, body) = lat1.http.post(&ban, Some(&alice), &json!({ "user_id": "@mallory:lat3.test" })).await;
    assert_eq!(status, 200, "{body}");
    let path = format!("/_matrix/federation/v1/make_join/{room_enc}/@mallory:lat3.test?ver=12");
    assert_error(&signed_request(&net, ("lat3.test", &key3), Method::GET, &path, None).await, 403, "M_FORBIDDEN");
    let path = format!("/_matrix/federation/v1/make_join/{room_enc}/@eve:lat3.test?ver=12");
    let (status, template) = signed_request(&net, ("lat3.test", &key3), Method::GET, &path, None).await;
    assert_eq!(status, 200, "{template}");
    let mut join = template["event"].clone();
    join["sender"] = json!("@mallory:lat3.test");
    join["state_key"] = json!("@mallory:lat3.test");
    join["origin_server_ts"] = json!(1);
    let ruma::CanonicalJsonValue::Object(mut join) = ruma::CanonicalJsonValue::try_from(join).unwrap() else {
        panic!("a template is an object")
    };
    let version = lattice_core::room_version::RoomVersion::parse("12").unwrap();
    lattice_core::pdu::hash_and_sign(&mut join, "lat3.test", &key3, &version).unwrap();
    let join_id = lattice_core::pdu::event_id(&join, &version).unwrap();
    let path = format!("/_matrix/federation/v2/send_join/{room_enc}/{}", join_id.as_str().replace('$', "%24"));
    let body = serde_json::to_value(&join).unwrap();
    assert_error(&signed_request(&net, ("lat3.test", &key3), Method::PUT, &path, Some(body)).await, 403, "M_FORBIDDEN");
    let state = format!("/_matrix/client/v3/rooms/{room}/state/m.room.member/@mallory:lat3.test");
    let (_, member) = lat1.http.get(&state, Some(&alice)).await;
    assert_eq!(member["membership"], "ban", "{member}");

    // The room's server ACL denies lat2: its room requests are 403 and its PDUs ignored.
    let acl = format!("/_matrix/client/v3/rooms/{room}/state/m.room.server_acl/");
    let content = json!({ "allow": ["*"], "deny": ["lat2.test"], "allow_ip_literals": false });
    let (status, body) = lat1.http.put(&acl, Some(&alice), &content).await;
    assert_eq!(status, 200, "{body}");
    let key2 = lat2.signing_key();
    let latest = say(&lat1.http, &alice, &room, "after-the-acl").await;
    let event_enc = latest.replace('$', "%24");
    for path in [
        format!("/_matrix/federation/v1/make_join/{room_enc}/@eve:lat2.test?ver=12"),
        format!("/_matrix/federation/v1/state_ids/{room_enc}?event_id={event_enc}"),
        format!("/_matrix/federation/v1/backfill/{room_enc}?v={event_enc}&limit=10"),
        format!("/_matrix/federation/v1/event_auth/{room_enc}/{event_enc}"),
    ] {
        let answer = signed_request(&net, ("lat2.test", &key2), Method::GET, &path, None).await;
        assert_error(&answer, 403, "M_FORBIDDEN");
    }
    let pdu = json!({
        "type": "m.room.message", "room_id": room, "sender": "@bob:lat2.test", "content": { "body": "denied" },
        "origin_server_ts": 1, "depth": 10, "prev_events": [latest], "auth_events": [],
        "hashes": { "sha256": "x" }, "signatures": {}
    });
    let txn = json!({ "origin": "lat2.test", "origin_server_ts": 1, "pdus": [pdu] });
    let answer =
        signed_request(&net, ("lat2.test", &key2), Method::PUT, "/_matrix/federation/v1/send/acl1", Some(txn)).await;
    assert_eq!(answer.0, 200, "{answer:?}");
    let results = answer.1["pdus"].as_object().expect("per-PDU results");
    assert!(results.values().all(|r| r["error"].as_str().is_some_and(|e| e.contains("ACL"))), "{answer:?}");
    // lat3 is still allowed.
    let path = format!("/_matrix/federation/v1/make_join/{room_enc}/@eve:lat3.test?ver=12");
    assert_eq!(signed_request(&net, ("lat3.test", &key3), Method::GET, &path, None).await.0, 200);

    lat3.stop().await;
    lat2.stop().await;
    lat1.stop().await;
}

#[tokio::test]
async fn a_user_lists_and_searches_the_public_rooms_of_another_server() {
    let net = Network::new(&["lat1.test", "lat2.test", "lat3.test"]);
    let mut lat1 = net.start("lat1.test").await;
    let mut lat2 = net.start("lat2.test").await;
    let alice = lat1.register_user("alice").await;
    let bob = lat2.register_user("bob").await;
    let listed = create_room(
        &lat1.http,
        &alice,
        json!({ "preset": "public_chat", "visibility": "public", "name": "Gardening", "room_alias_name": "garden" }),
    )
    .await;
    let unlisted =
        create_room(&lat1.http, &alice, json!({ "preset": "public_chat", "name": "Gardening secrets" })).await;
    let ids = |page: &Value| -> Vec<String> {
        page["chunk"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["room_id"].as_str().map(str::to_owned))
            .collect()
    };

    // bob browses lat1's directory from his own server, as Element's "explore rooms" does.
    let (status, page) = lat2.http.get("/_matrix/client/v3/publicRooms?server=lat1.test", Some(&bob)).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(ids(&page), vec![listed.clone()], "{page}");
    assert_eq!(page["chunk"][0]["name"], "Gardening");
    assert_eq!(page["chunk"][0]["canonical_alias"], "#garden:lat1.test");
    // A search goes to lat1 with the filter (POST).
    let search = |term: &str| json!({ "filter": { "generic_search_term": term }, "limit": 5 });
    let (status, page) =
        lat2.http.post("/_matrix/client/v3/publicRooms?server=lat1.test", Some(&bob), &search("garden")).await;
    assert_eq!((status.as_u16(), ids(&page)), (200, vec![listed.clone()]), "{page}");
    let (status, page) =
        lat2.http.post("/_matrix/client/v3/publicRooms?server=lat1.test", Some(&bob), &search("cooking")).await;
    assert_eq!((status.as_u16(), ids(&page).len()), (200, 0), "{page}");
    assert!(!ids(&page).contains(&unlisted));

    // The federation endpoint wants a signed request; a server that is down is an error, not
    // an empty list.
    let (status, _) = net.request("lat1.test", Method::GET, "/_matrix/federation/v1/publicRooms", None, None).await;
    assert_eq!(status, 401);
    let (status, body) = lat2.http.get("/_matrix/client/v3/publicRooms?server=lat3.test", Some(&bob)).await;
    assert!(status.is_server_error(), "{status} {body}");
    let (status, body) = lat2.http.get("/_matrix/client/v3/publicRooms?server=not%20a%20server", Some(&bob)).await;
    assert_error(&(status, body), 400, "M_INVALID_PARAM");
    lat2.stop().await;
    lat1.stop().await;
}

#[tokio::test]
async fn a_server_on_the_deny_list_is_neither_answered_nor_contacted() {
    let net = Network::new(&["lat1.test", "lat2.test", "lat3.test"]);
    let mut lat1 = net.start_with("lat1.test", |config| config.federation.deny_servers = vec!["lat3.*".into()]).await;
    let mut lat2 = net.start("lat2.test").await;
    let mut lat3 = net.start("lat3.test").await;
    let (alice, _bob, room) = shared_room(&net, &lat1, &lat2).await;
    let room_enc = room.replace('!', "%21");

    // lat3's correctly signed requests are refused before anything else.
    let key3 = lat3.signing_key();
    let path = format!("/_matrix/federation/v1/make_join/{room_enc}/@eve:lat3.test?ver=12");
    let response = crate::federation_rooms::signed_request(&net, ("lat3.test", &key3), Method::GET, &path, None).await;
    assert_error(&response, 403, "M_FORBIDDEN");
    // lat2, not on the list, is still answered.
    let key2 = lat2.signing_key();
    let path = format!("/_matrix/federation/v1/make_join/{room_enc}/@carol:lat2.test?ver=12");
    let (status, body) = signed_request(&net, ("lat2.test", &key2), Method::GET, &path, None).await;
    assert_eq!(status, 200, "{body}");
    // lat1's users cannot reach into lat3: a room there is not joined.
    let carol = lat3.register_user("carol").await;
    create_room(&lat3.http, &carol, json!({ "preset": "public_chat", "room_alias_name": "elsewhere" })).await;
    let (status, body) =
        lat1.http.post("/_matrix/client/v3/join/%23elsewhere:lat3.test", Some(&alice), &json!({})).await;
    assert!(!status.is_success(), "{status} {body}");
    lat3.stop().await;
    lat2.stop().await;
    lat1.stop().await;
}

#[tokio::test]
async fn jumping_to_a_date_before_this_server_joined_asks_the_other_server() {
    let net = Network::new(&["lat1.test", "lat2.test", "lat3.test"]);
    let mut lat1 = net.start("lat1.test").await;
    let mut lat2 = net.start("lat2.test").await;
    let mut lat3 = net.start("lat3.test").await;
    let alice = lat1.register_user("alice").await;
    let bob = lat2.register_user("bob").await;
    let room = create_room(&lat1.http, &alice, json!({ "preset": "public_chat", "room_alias_name": "dates" })).await;
    let mut sent = Vec::new();
    for body in ["first", "second", "third"] {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let event_id = say(&lat1.http, &alice, &room, body).await;
        let (status, event) =
            lat1.http.get(&format!("/_matrix/client/v3/rooms/{room}/event/{event_id}"), Some(&alice)).await;
        assert_eq!(status, 200, "{event}");
        sent.push((event_id, event["origin_server_ts"].as_u64().expect("ts")));
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (status, joined) = lat2.http.post("/_matrix/client/v3/join/%23dates:lat1.test", Some(&bob), &json!({})).await;
    assert_eq!(status, 200, "{joined}");

    // lat2 never received "second": it comes from lat1, is stored, and Bob may read it.
    let (second, second_ts) = &sent[1];
    let path = format!("/_matrix/client/v1/rooms/{room}/timestamp_to_event?ts={second_ts}&dir=f");
    let (status, found) = lat2.http.get(&path, Some(&bob)).await;
    assert_eq!(status, 200, "{found}");
    assert_eq!(found["event_id"], second.as_str(), "{found}");
    assert_eq!(found["origin_server_ts"], *second_ts);
    let (status, event) = lat2.http.get(&format!("/_matrix/client/v3/rooms/{room}/event/{second}"), Some(&bob)).await;
    assert_eq!(status, 200, "{event}");
    assert_eq!(event["content"]["body"], "second");

    // The server-server endpoint itself, and who may ask it.
    let room_enc = room.replace('!', "%21");
    let (first, first_ts) = &sent[0];
    let key2 = lat2.signing_key();
    let path = format!("/_matrix/federation/v1/timestamp_to_event/{room_enc}?ts={first_ts}&dir=f");
    let (status, found) = signed_request(&net, ("lat2.test", &key2), Method::GET, &path, None).await;
    assert_eq!(status, 200, "{found}");
    assert_eq!(found["event_id"], first.as_str(), "{found}");
    let path = format!("/_matrix/federation/v1/timestamp_to_event/{room_enc}?ts={first_ts}&dir=sideways");
    assert_error(&signed_request(&net, ("lat2.test", &key2), Method::GET, &path, None).await, 400, "M_INVALID_PARAM");
    let key3 = lat3.signing_key();
    let path = format!("/_matrix/federation/v1/timestamp_to_event/{room_enc}?ts={first_ts}&dir=f");
    assert_error(&signed_request(&net, ("lat3.test", &key3), Method::GET, &path, None).await, 403, "M_FORBIDDEN");
    lat3.stop().await;
    lat2.stop().await;
    lat1.stop().await;
}

#[tokio::test]
async fn a_user_of_another_server_joins_a_restricted_room_through_its_authorising_server() {
    let net = Network::new(&["lat1.test", "lat2.test"]);
    let mut lat1 = net.start("lat1.test").await;
    let mut lat2 = net.start("lat2.test").await;
    let alice = lat1.register_user("alice").await;
    let bob = lat2.register_user("bob").await;
    let carol = lat2.register_user("carol").await;
    let space = create_room(&lat1.http, &alice, json!({ "room_version": "10", "preset": "public_chat" })).await;
    let allow = json!([{ "type": "m.room_membership", "room_id": space }]);
    let rules = json!([{ "type": "m.room.join_rules", "content": { "join_rule": "restricted", "allow": allow } }]);
    let restricted = create_room(&lat1.http, &alice, json!({ "room_version": "10", "initial_state": rules })).await;
    let join = |token: String, room: String| {
        let http = lat2.http.clone();
        async move { http.post(&format!("/_matrix/client/v3/join/{room}"), Some(&token), &json!({})).await }
    };

    // carol is in no allowed room: lat1 refuses the template, and her client hears why.
    assert_error(&join(carol.clone(), restricted.clone()).await, 403, "M_FORBIDDEN");
    // bob joins the space first; then lat1 names alice as the authoriser in make_join, signs
    // the join in send_join, and bob's server stores the countersigned event.
    let (status, body) = join(bob.clone(), space.clone()).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = join(bob.clone(), restricted.clone()).await;
    assert_eq!(status, 200, "{body}");
    for (server, token) in [(&lat1, &alice), (&lat2, &bob)] {
        let path = format!("/_matrix/client/v3/rooms/{restricted}/state/m.room.member/@bob:lat2.test");
        let (status, member) = server.http.get(&path, Some(token)).await;
        assert_eq!(status, 200, "{member}");
        assert_eq!(member["membership"], "join", "{member}");
        assert_eq!(member["join_authorised_via_users_server"], "@alice:lat1.test", "{member}");
    }
    say(&lat1.http, &alice, &restricted, "welcome, member of the space").await;
    sync_until(&lat2, &bob, "a message in the restricted room", |s| {
        timeline_bodies(s, &restricted).contains(&"welcome, member of the space".to_owned())
    })
    .await;

    lat2.stop().await;
    lat1.stop().await;
}
