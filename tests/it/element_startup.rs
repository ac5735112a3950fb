//! What Element Web's SDK (matrix-js-sdk, run against a server by tests/interop/js_sdk.sh)
//! tripped on, pinned at the HTTP level: the third-party protocol list it reads at start-up, and
//! redactions it could not apply because it reads their target only at the top level.

use serde_json::{Value, json};

use crate::support::{TestServer, assert_error, create_room, say, sync};

#[tokio::test]
async fn thirdparty_protocols_are_an_empty_list_and_lookups_find_nothing() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let v3 = "/_matrix/client/v3/thirdparty";

    assert_error(&http.get(&format!("{v3}/protocols"), None).await, 401, "M_MISSING_TOKEN");
    assert_error(&http.get(&format!("{v3}/protocol/irc"), None).await, 401, "M_MISSING_TOKEN");
    // No application services, so no bridged network: an empty list, as clients expect.
    let (status, protocols) = http.get(&format!("{v3}/protocols"), Some(&alice)).await;
    assert_eq!((status.as_u16(), protocols), (200, json!({})));
    let (status, legacy) = http.get("/_matrix/client/r0/thirdparty/protocols", Some(&alice)).await;
    assert_eq!((status.as_u16(), legacy), (200, json!({})), "the r0 path that older clients call");

    for lookup in ["protocol/irc", "location/irc?channel=%23matrix", "user/irc?nick=bob"] {
        assert_error(&http.get(&format!("{v3}/{lookup}"), Some(&alice)).await, 404, "M_NOT_FOUND");
    }
    let alias = format!("{v3}/location?alias=%23room:{}", server.server_name);
    assert_error(&http.get(&alias, Some(&alice)).await, 404, "M_NOT_FOUND");
    let user = format!("{v3}/user?userid=@bob:{}", server.server_name);
    assert_error(&http.get(&user, Some(&alice)).await, 404, "M_NOT_FOUND");
    assert_error(&http.get(&format!("{v3}/location?alias=not-an-alias"), Some(&alice)).await, 400, "M_INVALID_PARAM");
    assert_error(&http.get(&format!("{v3}/user"), Some(&alice)).await, 400, "M_INVALID_PARAM");
    server.stop().await;
}

/// Room version 11 moved `redacts` into the content; clients still read the top level (the
/// js-sdk reads nothing else), so the client API shows both in every room version.
#[tokio::test]
async fn redactions_name_their_target_at_the_top_level_and_in_the_content() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    for version in ["11", "10"] {
        let room = create_room(http, &alice, json!({ "room_version": version })).await;
        let since = sync(http, &alice, "timeout=0").await["next_batch"].as_str().unwrap().to_owned();
        let target = say(http, &alice, &room, &format!("mistake-{version}")).await;
        let (status, sent) = http
            .put(&format!("/_matrix/client/v3/rooms/{room}/redact/{target}/r{version}"), Some(&alice), &json!({}))
            .await;
        assert_eq!(status, 200, "{sent}");
        let redaction_id = sent["event_id"].as_str().unwrap();

        let synced = sync(http, &alice, &format!("timeout=0&since={since}")).await;
        let timeline = &synced["rooms"]["join"][&room]["timeline"]["events"];
        let redaction = find(timeline, redaction_id);
        assert_names_target(&redaction, &target, &format!("/sync, room v{version}"));

        let (_, messages) = http.get(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b"), Some(&alice)).await;
        assert_names_target(&find(&messages["chunk"], redaction_id), &target, &format!("/messages, v{version}"));

        let (status, fetched) =
            http.get(&format!("/_matrix/client/v3/rooms/{room}/event/{redaction_id}"), Some(&alice)).await;
        assert_eq!(status, 200, "{fetched}");
        assert_names_target(&fetched, &target, &format!("/event, v{version}"));

        let (_, redacted) = http.get(&format!("/_matrix/client/v3/rooms/{room}/event/{target}"), Some(&alice)).await;
        assert_eq!(redacted["content"], json!({}), "v{version}: the target is redacted");
        assert_names_target(
            &redacted["unsigned"]["redacted_because"],
            &target,
            &format!("redacted_because, v{version}"),
        );
    }
    server.stop().await;
}

fn find(events: &Value, event_id: &str) -> Value {
    events
        .as_array()
        .and_then(|events| events.iter().find(|event| event["event_id"] == event_id))
        .cloned()
        .unwrap_or_else(|| panic!("{event_id} not among {events}"))
}

#[track_caller]
fn assert_names_target(redaction: &Value, target: &str, place: &str) {
    assert_eq!(redaction["type"], "m.room.redaction", "{place}: {redaction}");
    assert_eq!(redaction["redacts"], target, "{place}: top-level redacts in {redaction}");
    assert_eq!(redaction["content"]["redacts"], target, "{place}: content.redacts in {redaction}");
}
