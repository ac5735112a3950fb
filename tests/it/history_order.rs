//! History tokens over HTTP (issue #10): `/messages`, `/context`, `/relations` and
//! `/members?at` hand out and take topological tokens (`t{depth}_{order}`), still take `/sync`
//! tokens, and refuse anything else with `400 M_INVALID_PARAM`. The fork cases (late events with
//! a lower depth) are in `lattice-service`'s `rooms/history_order_tests.rs`.

use serde_json::{Value, json};

use crate::support::{Http, TestServer, assert_error, bodies, create_room, say};

async fn get(http: &Http, token: &str, path: &str) -> Value {
    let (status, body) = http.get(path, Some(token)).await;
    assert_eq!(status, 200, "{path}: {body}");
    body
}

fn numbered(range: impl Iterator<Item = usize>) -> Vec<String> {
    range.map(|i| format!("m{i:02}")).collect()
}

#[tokio::test]
async fn history_tokens_old_and_new_page_the_same_history() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let room = create_room(http, &alice, json!({ "name": "Tokens" })).await;
    for i in 0..6 {
        say(http, &alice, &room, &format!("m{i:02}")).await;
    }
    let (status, synced) = http.get("/_matrix/client/v3/sync", Some(&alice)).await;
    assert_eq!(status, 200);
    let old_token = synced["next_batch"].as_str().unwrap().to_owned();
    for i in 6..12 {
        say(http, &alice, &room, &format!("m{i:02}")).await;
    }
    let messages = format!("/_matrix/client/v3/rooms/{room}/messages");

    // A /sync token from before m06 still pages: back from it the first six, on from it the rest.
    let back = get(http, &alice, &format!("{messages}?dir=b&limit=6&from={old_token}")).await;
    assert_eq!(bodies(&back["chunk"]), numbered((0..6).rev()));
    let on = get(http, &alice, &format!("{messages}?dir=f&limit=50&from={old_token}")).await;
    assert_eq!(bodies(&on["chunk"]), numbered(6..12));
    // The tokens handed out are topological and continue the same pages.
    let end = back["end"].as_str().unwrap();
    assert!(end.starts_with('t') && back["start"].as_str().unwrap().starts_with('t'), "{back}");
    let further = get(http, &alice, &format!("{messages}?dir=b&limit=50&from={end}")).await;
    assert_eq!(further["chunk"].as_array().unwrap().last().unwrap()["type"], "m.room.create");
    // `to` takes either kind too: the newest page down to the old /sync token.
    let newest = get(http, &alice, &format!("{messages}?dir=b&limit=50&to={old_token}")).await;
    assert_eq!(bodies(&newest["chunk"]), numbered((6..12).rev()));

    // prev_batch of a limited sync continues into /messages without a gap or a repeat.
    let filter = "%7B%22room%22%3A%7B%22timeline%22%3A%7B%22limit%22%3A3%7D%7D%7D";
    let limited = get(http, &alice, &format!("/_matrix/client/v3/sync?filter={filter}")).await;
    let timeline = &limited["rooms"]["join"][&room]["timeline"];
    assert_eq!(bodies(&timeline["events"]), numbered(9..12));
    let prev_batch = timeline["prev_batch"].as_str().unwrap();
    let below = get(http, &alice, &format!("{messages}?dir=b&limit=4&from={prev_batch}")).await;
    assert_eq!(bodies(&below["chunk"]), numbered((5..9).rev()));

    // /context tokens are topological and line up with /messages.
    let m05 = back["chunk"][0]["event_id"].as_str().unwrap();
    let context = get(http, &alice, &format!("/_matrix/client/v3/rooms/{room}/context/{m05}?limit=2")).await;
    assert_eq!(bodies(&context["events_before"]), ["m04"]);
    assert_eq!(bodies(&context["events_after"]), ["m06"]);
    let after = get(http, &alice, &format!("{messages}?dir=f&limit=1&from={}", context["end"].as_str().unwrap())).await;
    assert_eq!(bodies(&after["chunk"]), ["m07"]);
    let before =
        get(http, &alice, &format!("{messages}?dir=b&limit=1&from={}", context["start"].as_str().unwrap())).await;
    assert_eq!(bodies(&before["chunk"]), ["m03"]);

    // /members?at= takes prev_batch (a topological token) and /sync tokens alike.
    for at in [prev_batch, old_token.as_str()] {
        let members = get(http, &alice, &format!("/_matrix/client/v3/rooms/{room}/members?at={at}")).await;
        assert_eq!(members["chunk"].as_array().unwrap().len(), 1, "{at}: {members}");
    }
    server.stop().await;
}

#[tokio::test]
async fn malformed_history_tokens_are_refused() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let room = create_room(http, &alice, json!({})).await;
    let target = say(http, &alice, &room, "target").await;
    for bad in ["t1", "t_1", "t1_", "t-1_2", "tx_y", "t1_2_3", "s-1", "s", "yesterday", "t99999999999999999999_1"] {
        for path in [
            format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&from={bad}"),
            format!("/_matrix/client/v3/rooms/{room}/messages?dir=f&to={bad}"),
            format!("/_matrix/client/v1/rooms/{room}/relations/{target}?from={bad}"),
            format!("/_matrix/client/v3/rooms/{room}/members?at={bad}"),
        ] {
            assert_error(&http.get(&path, Some(&alice)).await, 400, "M_INVALID_PARAM");
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn relations_page_with_topological_tokens() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let room = create_room(http, &alice, json!({})).await;
    let parent = say(http, &alice, &room, "parent").await;
    let mut reactions = Vec::new();
    for key in ["a", "b", "c"] {
        let path = format!("/_matrix/client/v3/rooms/{room}/send/m.reaction/{key}");
        let content = json!({ "m.relates_to": { "rel_type": "m.annotation", "event_id": parent, "key": key } });
        let (status, sent) = http.put(&path, Some(&alice), &content).await;
        assert_eq!(status, 200, "{sent}");
        reactions.push(sent["event_id"].as_str().unwrap().to_owned());
    }
    let base = format!("/_matrix/client/v1/rooms/{room}/relations/{parent}?limit=2");
    let first = get(http, &alice, &base).await;
    let next = first["next_batch"].as_str().unwrap();
    assert!(next.starts_with('t'), "{first}");
    let second = get(http, &alice, &format!("{base}&from={next}")).await;
    let ids = |page: &Value| -> Vec<String> {
        page["chunk"].as_array().unwrap().iter().map(|e| e["event_id"].as_str().unwrap().to_owned()).collect()
    };
    let all: Vec<String> = ids(&first).into_iter().chain(ids(&second)).collect();
    assert_eq!(all, reactions.iter().rev().cloned().collect::<Vec<_>>());
    assert!(second.get("next_batch").is_none(), "{second}");
    server.stop().await;
}
