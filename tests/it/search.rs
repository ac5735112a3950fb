//! `POST /search` (issue #12): what a user finds, in which order, page by page — and what they
//! must not find (rooms they are not in, history from before their join, redacted messages).

use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Value, json};

use crate::support::{Http, TestServer, assert_error, create_room};

const SEARCH: &str = "/_matrix/client/v3/search";

static TXN: AtomicU64 = AtomicU64::new(0);

/// Sends a text message; returns its event ID.
async fn send(http: &Http, token: &str, room: &str, body: &str) -> String {
    let txn = TXN.fetch_add(1, Ordering::Relaxed);
    let path = format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/search{txn}");
    let (status, response) = http.put(&path, Some(token), &json!({ "msgtype": "m.text", "body": body })).await;
    assert_eq!(status, 200, "{response}");
    response["event_id"].as_str().unwrap().to_owned()
}

async fn state(http: &Http, token: &str, room: &str, kind: &str, content: Value) {
    let path = format!("/_matrix/client/v3/rooms/{room}/state/{kind}/");
    let (status, response) = http.put(&path, Some(token), &content).await;
    assert_eq!(status, 200, "{response}");
}

async fn join(http: &Http, token: &str, room: &str) {
    let (status, body) = http.post(&format!("/_matrix/client/v3/join/{room}"), Some(token), &json!({})).await;
    assert_eq!(status, 200, "{body}");
}

async fn leave(http: &Http, token: &str, room: &str) {
    let (status, body) = http.post(&format!("/_matrix/client/v3/rooms/{room}/leave"), Some(token), &json!({})).await;
    assert_eq!(status, 200, "{body}");
}

/// `room_events` of a search that must answer 200.
async fn search(http: &Http, token: &str, criteria: Value) -> Value {
    search_from(http, token, criteria, None).await
}

async fn search_from(http: &Http, token: &str, criteria: Value, next_batch: Option<&str>) -> Value {
    let path = match next_batch {
        Some(token) => format!("{SEARCH}?next_batch={token}"),
        None => SEARCH.to_owned(),
    };
    let (status, body) =
        http.post(&path, Some(token), &json!({ "search_categories": { "room_events": criteria } })).await;
    assert_eq!(status, 200, "{body}");
    body["search_categories"]["room_events"].clone()
}

/// The event IDs of the results, in order.
fn found(events: &Value) -> Vec<String> {
    events["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| r["result"]["event_id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn finds_messages_by_words_in_any_case_and_orders_by_recent_or_rank() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let room = create_room(http, &alice, json!({ "name": "Zoo Planning" })).await;
    let one = send(http, &alice, &room, "The quick brown fox jumps").await;
    let two = send(http, &alice, &room, "fox FOX fox, and a quick one").await;
    send(http, &alice, &room, "nothing to see here").await;
    let three = send(http, &alice, &room, "Quick thinking").await;

    let recent = search(http, &alice, json!({ "search_term": "QUICK", "order_by": "recent" })).await;
    assert_eq!(found(&recent), [three.clone(), two.clone(), one.clone()]);
    assert_eq!(recent["count"], 3);
    assert_eq!(recent["highlights"], json!(["quick"]));
    assert!(recent.get("next_batch").is_none(), "{recent}");
    assert_eq!(recent["results"][0]["result"]["content"]["body"], "Quick thinking");

    // Rank: occurrences of the words; "fox" three times beats once.
    let ranked = search(http, &alice, json!({ "search_term": "quick fox", "order_by": "rank" })).await;
    assert_eq!(found(&ranked), [two.clone(), one.clone()]);
    assert!(ranked["results"][0]["rank"].as_f64().unwrap() > ranked["results"][1]["rank"].as_f64().unwrap());

    // Every word must be there; the last one may be a prefix.
    assert_eq!(found(&search(http, &alice, json!({ "search_term": "brown quick" })).await), std::slice::from_ref(&one));
    assert_eq!(found(&search(http, &alice, json!({ "search_term": "brown qui" })).await), std::slice::from_ref(&one));
    assert_eq!(found(&search(http, &alice, json!({ "search_term": "thin" })).await), std::slice::from_ref(&three));
    assert!(found(&search(http, &alice, json!({ "search_term": "brown zebra" })).await).is_empty());

    // Room names and topics are searchable keys; a body-only search skips them.
    let names = search(http, &alice, json!({ "search_term": "planning" })).await;
    assert_eq!(names["results"][0]["result"]["type"], "m.room.name", "{names}");
    let bodies_only = search(http, &alice, json!({ "search_term": "planning", "keys": ["content.body"] })).await;
    assert!(found(&bodies_only).is_empty());
    server.stop().await;
}

#[tokio::test]
async fn next_batch_pages_return_each_result_once_in_both_orders() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let room = create_room(http, &alice, json!({})).await;
    let mut sent = Vec::new();
    for i in 0..25 {
        let extra = " walrus".repeat(i % 4);
        sent.push(send(http, &alice, &room, &format!("walrus number {i}{extra}")).await);
    }
    for order in ["recent", "rank"] {
        let criteria = json!({ "search_term": "walrus", "order_by": order, "filter": { "limit": 10 } });
        let mut seen = Vec::new();
        let mut next: Option<String> = None;
        for _ in 0..5 {
            let page = search_from(http, &alice, criteria.clone(), next.as_deref()).await;
            assert!(found(&page).len() <= 10);
            seen.extend(found(&page));
            next = page["next_batch"].as_str().map(str::to_owned);
            if next.is_none() {
                break;
            }
        }
        assert!(next.is_none(), "{order}: more than 5 pages");
        let mut unique = seen.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), seen.len(), "{order}: a result came twice");
        assert_eq!(seen.len(), 25, "{order}");
        if order == "recent" {
            let newest_first: Vec<String> = sent.iter().rev().cloned().collect();
            assert_eq!(seen, newest_first);
        }
    }
    // A token of the other order, or none of ours, is refused.
    let page = search(http, &alice, json!({ "search_term": "walrus", "order_by": "recent" })).await;
    let token = page["next_batch"].as_str().unwrap();
    let body = json!({ "search_categories": { "room_events": { "search_term": "walrus", "order_by": "rank" } } });
    assert_error(
        &http.post(&format!("{SEARCH}?next_batch={token}"), Some(&alice), &body).await,
        400,
        "M_INVALID_PARAM",
    );
    assert_error(&http.post(&format!("{SEARCH}?next_batch=bogus"), Some(&alice), &body).await, 400, "M_INVALID_PARAM");
    server.stop().await;
}

#[tokio::test]
async fn filters_by_room_and_sender_groups_and_adds_context_and_state() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let bob = server.register("bob", "pw").await;
    let first = create_room(http, &alice, json!({ "preset": "public_chat" })).await;
    let second = create_room(http, &alice, json!({ "preset": "public_chat" })).await;
    join(http, &bob, &first).await;
    join(http, &bob, &second).await;
    let before = send(http, &alice, &first, "just before").await;
    let a1 = send(http, &alice, &first, "penguin from alice").await;
    let after = send(http, &bob, &first, "just after").await;
    let b1 = send(http, &bob, &first, "penguin from bob").await;
    let a2 = send(http, &alice, &second, "penguin in the second room").await;

    let recent = |filter: Value| json!({ "search_term": "penguin", "order_by": "recent", "filter": filter });
    assert_eq!(found(&search(http, &bob, recent(json!({}))).await), [a2.clone(), b1.clone(), a1.clone()]);
    assert_eq!(found(&search(http, &bob, recent(json!({ "rooms": [first] }))).await), [b1.clone(), a1.clone()]);
    assert_eq!(found(&search(http, &bob, recent(json!({ "not_rooms": [first] }))).await), std::slice::from_ref(&a2));
    let alice_id = server.user_id("alice");
    assert_eq!(found(&search(http, &bob, recent(json!({ "senders": [alice_id] }))).await), [a2.clone(), a1.clone()]);
    assert_eq!(
        found(&search(http, &bob, recent(json!({ "not_senders": [alice_id] }))).await),
        std::slice::from_ref(&b1)
    );

    let criteria = json!({
        "search_term": "penguin",
        "order_by": "recent",
        "filter": { "rooms": [first] },
        "groupings": { "group_by": [{ "key": "room_id" }, { "key": "sender" }] },
        "event_context": { "before_limit": 1, "after_limit": 1, "include_profile": true },
        "include_state": true,
    });
    let full = search(http, &bob, criteria).await;
    assert_eq!(full["groups"]["room_id"][&first]["results"], json!([b1, a1]), "{full}");
    assert_eq!(full["groups"]["sender"][&alice_id]["results"], json!([a1]));
    let context = &full["results"][1]["context"];
    assert_eq!(context["events_before"][0]["event_id"], before, "{context}");
    assert_eq!(context["events_after"][0]["event_id"], after);
    assert!(context["start"].is_string() && context["end"].is_string());
    assert!(context["profile_info"][&alice_id].is_object(), "{context}");
    let state = full["state"][&first].as_array().expect("state of the room");
    assert!(state.iter().any(|e| e["type"] == "m.room.create"));
    server.stop().await;
}

#[tokio::test]
async fn a_redacted_message_is_no_longer_found() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let room = create_room(http, &alice, json!({})).await;
    let secret = send(http, &alice, &room, "my password is hunter2").await;
    let kept = send(http, &alice, &room, "hunter2 is a meme").await;
    assert_eq!(found(&search(http, &alice, json!({ "search_term": "hunter2" })).await).len(), 2);
    let path = format!("/_matrix/client/v3/rooms/{room}/redact/{secret}/r1");
    let (status, body) = http.put(&path, Some(&alice), &json!({ "reason": "oops" })).await;
    assert_eq!(status, 200, "{body}");
    let after = search(http, &alice, json!({ "search_term": "hunter2" })).await;
    assert_eq!(found(&after), [kept]);
    assert!(found(&search(http, &alice, json!({ "search_term": "password" })).await).is_empty());
    server.stop().await;
}

#[tokio::test]
async fn outsiders_leavers_and_late_joiners_do_not_find_what_they_may_not_see() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let late = server.register("late", "pw").await;
    let leaver = server.register("leaver", "pw").await;
    let outsider = server.register("outsider", "pw").await;
    let room = create_room(http, &alice, json!({ "preset": "public_chat" })).await;
    state(http, &alice, &room, "m.room.history_visibility", json!({ "history_visibility": "joined" })).await;
    join(http, &leaver, &room).await;
    let early = send(http, &alice, &room, "aardvark before the late joiner").await;

    // Not in the room: nothing, though the room is public.
    assert!(found(&search(http, &outsider, json!({ "search_term": "aardvark" })).await).is_empty());
    // Even naming the room in the filter finds nothing.
    let named = json!({ "search_term": "aardvark", "filter": { "rooms": [room] } });
    assert!(found(&search(http, &outsider, named).await).is_empty());

    // Joined after the message under `joined` visibility: not found; later messages are.
    join(http, &late, &room).await;
    assert!(found(&search(http, &late, json!({ "search_term": "aardvark" })).await).is_empty());
    let later = send(http, &alice, &room, "aardvark after the join").await;
    assert_eq!(found(&search(http, &late, json!({ "search_term": "aardvark" })).await), std::slice::from_ref(&later));
    let ranked = json!({ "search_term": "aardvark", "order_by": "rank" });
    assert_eq!(found(&search(http, &late, ranked).await), std::slice::from_ref(&later));

    // Was a member and saw it, but left: the room is no longer searched.
    let seen = search(http, &leaver, json!({ "search_term": "aardvark", "order_by": "recent" })).await;
    assert_eq!(found(&seen), [later.clone(), early.clone()]);
    leave(http, &leaver, &room).await;
    assert!(found(&search(http, &leaver, json!({ "search_term": "aardvark" })).await).is_empty());
    server.stop().await;
}

#[tokio::test]
async fn bad_search_requests_are_matrix_errors() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let post = |body: Value| {
        let alice = alice.clone();
        async move { http.post(SEARCH, Some(&alice), &body).await }
    };
    let criteria = |c: Value| json!({ "search_categories": { "room_events": c } });
    assert_error(&post(json!({})).await, 400, "M_BAD_JSON");
    assert_error(&post(criteria(json!({}))).await, 400, "M_BAD_JSON");
    assert_error(&post(criteria(json!({ "search_term": 5 }))).await, 400, "M_BAD_JSON");
    let bad_order = criteria(json!({ "search_term": "x", "order_by": "loudest" }));
    assert_error(&post(bad_order).await, 400, "M_INVALID_PARAM");
    assert_error(
        &post(criteria(json!({ "search_term": "x", "keys": ["content.nope"] }))).await,
        400,
        "M_INVALID_PARAM",
    );
    let grouping = criteria(json!({ "search_term": "x", "groupings": { "group_by": [{ "key": "colour" }] } }));
    assert_error(&post(grouping).await, 400, "M_INVALID_PARAM");
    let many: String = (0..40).map(|i| format!("w{i} ")).collect();
    assert_error(&post(criteria(json!({ "search_term": many }))).await, 400, "M_INVALID_PARAM");
    assert_error(&post(criteria(json!({ "search_term": "x", "filter": { "limit": "ten" } }))).await, 400, "M_BAD_JSON");
    let (status, _) = http.post(SEARCH, None, &criteria(json!({ "search_term": "x" }))).await;
    assert_eq!(status, 401);
    // No category asked: nothing found, no error.
    let (status, body) = http.post(SEARCH, Some(&alice), &json!({ "search_categories": {} })).await;
    assert_eq!(status, 200, "{body}");
    // Only punctuation: no words, no results.
    let empty = search(http, &alice, json!({ "search_term": "?!" })).await;
    assert_eq!(empty["count"], 0);
    server.stop().await;
}

#[tokio::test]
async fn matrix_sdk_searches_with_recent_order_pages_and_a_room_filter() {
    use matrix_sdk::Client;
    use matrix_sdk::ruma::api::client::filter::RoomEventFilter;
    use matrix_sdk::ruma::api::client::search::search_events::v3::{Categories, Criteria, OrderBy, Request};
    use matrix_sdk::ruma::{OwnedRoomId, UInt};

    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let bob = server.register("bob", "pw").await;
    let shared = create_room(http, &alice, json!({ "preset": "public_chat" })).await;
    let other = create_room(http, &alice, json!({ "preset": "public_chat" })).await;
    let private = create_room(http, &alice, json!({ "preset": "private_chat" })).await;
    join(http, &bob, &shared).await;
    join(http, &bob, &other).await;
    let mut expected = Vec::new();
    for i in 0..5 {
        expected.push(send(http, &alice, &shared, &format!("the lighthouse keeper {i}")).await);
    }
    let in_other = send(http, &alice, &other, "a lighthouse elsewhere").await;
    send(http, &alice, &private, "the lighthouse bob may not see").await;
    send(http, &alice, &shared, "nothing to find here").await;

    let client = Client::builder().homeserver_url(server.base_url()).build().await.expect("client builds");
    client.matrix_auth().login_username("bob", "pw").send().await.expect("bob logs in");
    let ask = |rooms: Option<Vec<OwnedRoomId>>, next_batch: Option<String>| {
        let mut criteria = Criteria::new("Lighthouse".to_owned());
        criteria.order_by = Some(OrderBy::Recent);
        let mut filter = RoomEventFilter::default();
        filter.limit = Some(UInt::from(4u32));
        filter.rooms = rooms;
        criteria.filter = filter;
        let mut categories = Categories::new();
        categories.room_events = Some(criteria);
        let mut request = Request::new(categories);
        request.next_batch = next_batch;
        request
    };
    let ids = |response: &matrix_sdk::ruma::api::client::search::search_events::v3::Response| -> Vec<String> {
        let results = &response.search_categories.room_events.results;
        results
            .iter()
            .map(|r| r.result.as_ref().expect("an event").get_field::<String>("event_id").unwrap().expect("id"))
            .collect()
    };

    // Everything bob may see, newest first, over two pages; nothing from the private room.
    let first = client.send(ask(None, None)).await.expect("search");
    assert_eq!(first.search_categories.room_events.count, Some(UInt::from(6u32)));
    let next = first.search_categories.room_events.next_batch.clone().expect("a second page");
    let second = client.send(ask(None, Some(next))).await.expect("second page");
    assert!(second.search_categories.room_events.next_batch.is_none());
    let mut all = ids(&first);
    all.extend(ids(&second));
    let mut newest_first = vec![in_other.clone()];
    newest_first.extend(expected.iter().rev().cloned());
    assert_eq!(all, newest_first);

    // Only the room asked for.
    let other_id = OwnedRoomId::try_from(other.as_str()).unwrap();
    let filtered = client.send(ask(Some(vec![other_id]), None)).await.expect("filtered search");
    assert_eq!(ids(&filtered), [in_other]);
    server.stop().await;
}
