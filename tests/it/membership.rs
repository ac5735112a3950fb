//! Room upgrades, knocking, restricted joins and forgetting rooms, over HTTP on one server.

use serde_json::{Value, json};

use crate::support::{Http, TestServer, assert_error, create_room};

fn room_path(room: &str, rest: &str) -> String {
    format!("/_matrix/client/v3/rooms/{room}/{rest}")
}

#[track_caller]
fn ok(response: (reqwest::StatusCode, Value)) -> Value {
    assert_eq!(response.0, 200, "{}", response.1);
    response.1
}

async fn state(http: &Http, token: &str, room: &str, kind_and_key: &str) -> Value {
    ok(http.get(&room_path(room, &format!("state/{kind_and_key}")), Some(token)).await)
}

async fn say(http: &Http, token: &str, room: &str, txn: &str) -> (reqwest::StatusCode, Value) {
    let body = json!({ "msgtype": "m.text", "body": txn });
    http.put(&room_path(room, &format!("send/m.room.message/{txn}")), Some(token), &body).await
}

async fn sync(http: &Http, token: &str, since: Option<&str>) -> Value {
    let path = match since {
        Some(since) => format!("/_matrix/client/v3/sync?timeout=0&since={since}"),
        None => "/_matrix/client/v3/sync?timeout=0".to_owned(),
    };
    ok(http.get(&path, Some(token)).await)
}

async fn join(http: &Http, token: &str, room: &str) -> (reqwest::StatusCode, Value) {
    http.post(&format!("/_matrix/client/v3/join/{room}"), Some(token), &json!({})).await
}

async fn knock(http: &Http, token: &str, room: &str) -> (reqwest::StatusCode, Value) {
    http.post(&format!("/_matrix/client/v3/knock/{room}"), Some(token), &json!({ "reason": "let me in" })).await
}

async fn forget(http: &Http, token: &str, room: &str) -> (reqwest::StatusCode, Value) {
    http.post(&room_path(room, "forget"), Some(token), &json!({})).await
}

async fn upgrade(http: &Http, token: &str, room: &str, body: Value) -> (reqwest::StatusCode, Value) {
    http.post(&room_path(room, "upgrade"), Some(token), &body).await
}

async fn membership_action(http: &Http, token: &str, room: &str, action: &str, user: &str) {
    ok(http.post(&room_path(room, action), Some(token), &json!({ "user_id": user })).await);
}

#[tokio::test]
async fn an_upgrade_carries_settings_bans_and_members_over_and_closes_the_old_room() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let bob = server.register("bob", "pw").await;
    let (bob_id, dave_id) = (server.user_id("bob"), server.user_id("dave"));
    let old = create_room(
        http,
        &alice,
        json!({ "room_version": "10", "name": "Plans", "topic": "Q3", "invite": [bob_id],
                "room_alias_name": "plans", "visibility": "public", "preset": "private_chat",
                "power_level_content_override": { "events": { "m.room.tombstone": 100, "m.room.name": 75 } } }),
    )
    .await;
    ok(join(http, &bob, &old).await);
    membership_action(http, &alice, &old, "ban", &dave_id).await;

    assert_error(&upgrade(http, &alice, &old, json!({ "new_version": "99" })).await, 400, "M_UNSUPPORTED_ROOM_VERSION");
    assert_error(&upgrade(http, &alice, &old, json!({})).await, 400, "M_BAD_JSON");
    assert_error(&upgrade(http, &bob, &old, json!({ "new_version": "11" })).await, 403, "M_FORBIDDEN");
    assert_error(
        &upgrade(http, &alice, "!nowhere:hs1.localhost", json!({ "new_version": "11" })).await,
        404,
        "M_NOT_FOUND",
    );

    let upgraded = ok(upgrade(http, &alice, &old, json!({ "new_version": "11" })).await);
    let new = upgraded["replacement_room"].as_str().unwrap().to_owned();
    assert_ne!(new, old);

    let create = state(http, &alice, &new, "m.room.create").await;
    assert_eq!(create["room_version"], "11");
    assert_eq!(create["predecessor"]["room_id"], old);
    assert!(create["predecessor"]["event_id"].as_str().is_some_and(|id| id.starts_with('$')), "{create}");
    assert_eq!(state(http, &alice, &new, "m.room.name").await["name"], "Plans");
    assert_eq!(state(http, &alice, &new, "m.room.topic").await["topic"], "Q3");
    assert_eq!(state(http, &alice, &new, "m.room.join_rules").await["join_rule"], "invite");
    let levels = state(http, &alice, &new, "m.room.power_levels").await;
    assert_eq!(levels["events"]["m.room.name"], 75);
    assert_eq!(levels["users"][server.user_id("alice")], 100);
    assert_eq!(state(http, &alice, &new, &format!("m.room.member/{dave_id}")).await["membership"], "ban");
    assert_eq!(state(http, &alice, &new, &format!("m.room.member/{bob_id}")).await["membership"], "invite");

    // The old room points at the new one, and ordinary members can no longer talk there.
    let tombstone = state(http, &bob, &old, "m.room.tombstone").await;
    assert_eq!(tombstone["replacement_room"], new);
    assert!(tombstone["body"].is_string());
    let old_levels = state(http, &alice, &old, "m.room.power_levels").await;
    assert_eq!((old_levels["events_default"].clone(), old_levels["invite"].clone()), (json!(50), json!(50)));
    assert_error(&say(http, &bob, &old, "still here").await, 403, "M_FORBIDDEN");
    assert_eq!(say(http, &alice, &old, "admins still can").await.0, 200);

    // The alias, the canonical alias and the directory entry moved with the room.
    let (_, resolved) = http.get("/_matrix/client/v3/directory/room/%23plans:hs1.localhost", None).await;
    assert_eq!(resolved["room_id"], new, "{resolved}");
    assert_eq!(state(http, &alice, &new, "m.room.canonical_alias").await["alias"], "#plans:hs1.localhost");
    assert!(state(http, &alice, &old, "m.room.canonical_alias").await.get("alias").is_none());
    let (_, directory) = http.get("/_matrix/client/v3/publicRooms", None).await;
    let listed: Vec<&str> =
        directory["chunk"].as_array().unwrap().iter().filter_map(|r| r["room_id"].as_str()).collect();
    assert_eq!(listed, vec![new.as_str()], "{directory}");

    // bob follows the tombstone.
    ok(join(http, &bob, &new).await);
    assert_eq!(say(http, &bob, &new, "hello new room").await.0, 200);
    server.stop().await;
}

#[tokio::test]
async fn a_moderator_may_upgrade_when_the_tombstone_level_allows_and_keeps_their_level() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let carol = server.register("carol", "pw").await;
    let (alice_id, carol_id) = (server.user_id("alice"), server.user_id("carol"));
    let old = create_room(
        http,
        &alice,
        json!({ "room_version": "9", "preset": "public_chat", "name": "Mods",
                "power_level_content_override": {
                    "users": { alice_id.clone(): 100, carol_id.clone(): 50 },
                    "events": { "m.room.tombstone": 50, "m.room.power_levels": 100, "m.room.name": 100 } } }),
    )
    .await;
    ok(join(http, &carol, &old).await);
    let new = ok(upgrade(http, &carol, &old, json!({ "new_version": "10" })).await)["replacement_room"]
        .as_str()
        .unwrap()
        .to_owned();
    // carol could send the name (level 100) only while raised; afterwards her level is hers again.
    assert_eq!(state(http, &carol, &new, "m.room.name").await["name"], "Mods");
    let levels = state(http, &carol, &new, "m.room.power_levels").await;
    assert_eq!(levels["users"], json!({ alice_id.clone(): 100, carol_id: 50 }));
    assert_eq!(state(http, &carol, &new, "m.room.join_rules").await["join_rule"], "public");
    // carol may not change the old room's power levels (100), so they are left as they were.
    assert_eq!(state(http, &alice, &old, "m.room.power_levels").await["events_default"], 0);
    // alice was joined to the old room on this server, so she is invited.
    assert_eq!(state(http, &carol, &new, &format!("m.room.member/{alice_id}")).await["membership"], "invite");
    server.stop().await;
}

#[tokio::test]
async fn upgrading_to_v12_names_creators_in_the_create_event_not_the_power_levels() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let bob = server.register("bob", "pw").await;
    let bob_id = server.user_id("bob");
    let old = create_room(http, &alice, json!({ "room_version": "11", "preset": "public_chat" })).await;
    ok(join(http, &bob, &old).await);
    let body = json!({ "new_version": "12", "additional_creators": [bob_id] });
    let new = ok(upgrade(http, &alice, &old, body).await)["replacement_room"].as_str().unwrap().to_owned();
    let create = state(http, &alice, &new, "m.room.create").await;
    assert_eq!(create["room_version"], "12");
    assert_eq!(create["predecessor"], json!({ "room_id": old }));
    assert_eq!(create["additional_creators"], json!([bob_id]));
    let levels = state(http, &alice, &new, "m.room.power_levels").await;
    assert!(levels["users"].get(server.user_id("alice")).is_none(), "{levels}");
    assert!(levels["users"].get(&bob_id).is_none(), "{levels}");
    // bob, a creator, joins through his invite and can do what creators do.
    ok(join(http, &bob, &new).await);
    let topic = http.put(&room_path(&new, "state/m.room.topic"), Some(&bob), &json!({ "topic": "mine" })).await;
    assert_eq!(topic.0, 200, "{}", topic.1);
    assert_error(
        &upgrade(http, &alice, &old, json!({ "new_version": "12", "additional_creators": ["not a user"] })).await,
        400,
        "M_BAD_JSON",
    );
    server.stop().await;
}

#[tokio::test]
async fn knocks_are_seen_by_admins_and_answered_with_an_invite_or_a_kick() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let bob = server.register("bob", "pw").await;
    let carol = server.register("carol", "pw").await;
    let (bob_id, carol_id) = (server.user_id("bob"), server.user_id("carol"));
    let knock_rules = json!([{ "type": "m.room.join_rules", "content": { "join_rule": "knock" } }]);
    let room =
        create_room(http, &alice, json!({ "room_version": "7", "name": "Club", "initial_state": knock_rules })).await;
    let alice_since = sync(http, &alice, None).await["next_batch"].as_str().unwrap().to_owned();

    assert_eq!(ok(knock(http, &bob, &room).await)["room_id"], room);
    let bob_sync = sync(http, &bob, None).await;
    let knock_state = &bob_sync["rooms"]["knock"][&room]["knock_state"]["events"];
    let kinds: Vec<&str> = knock_state.as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert!(kinds.contains(&"m.room.join_rules") && kinds.contains(&"m.room.name"), "{kinds:?}");
    let own = knock_state.as_array().unwrap().iter().find(|e| e["type"] == "m.room.member").unwrap();
    assert_eq!(
        (own["state_key"].as_str(), own["content"]["membership"].as_str()),
        (Some(bob_id.as_str()), Some("knock"))
    );
    assert!(bob_sync["rooms"]["join"].get(&room).is_none());

    // alice sees the knock in her timeline, and accepts it with an invite.
    let alice_sync = sync(http, &alice, Some(&alice_since)).await;
    let timeline = &alice_sync["rooms"]["join"][&room]["timeline"]["events"];
    assert!(
        timeline
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["state_key"] == bob_id.as_str() && e["content"]["membership"] == "knock"),
        "{timeline}"
    );
    assert_error(&say(http, &bob, &room, "knocking").await, 403, "M_FORBIDDEN");
    membership_action(http, &alice, &room, "invite", &bob_id).await;
    ok(join(http, &bob, &room).await);
    assert_eq!(say(http, &bob, &room, "in").await.0, 200);

    // carol's knock is denied with a kick.
    let (_, before_knock) = http.get("/_matrix/client/v3/sync", Some(&carol)).await;
    ok(knock(http, &carol, &room).await);
    membership_action(http, &alice, &room, "kick", &carol_id).await;
    assert_eq!(state(http, &alice, &room, &format!("m.room.member/{carol_id}")).await["membership"], "leave");
    // She was never a member: her sync shows the refusal, not the room's conversation.
    let since = before_knock["next_batch"].as_str().unwrap();
    let (_, after) = http.get(&format!("/_matrix/client/v3/sync?since={since}"), Some(&carol)).await;
    let left = after["rooms"]["leave"][&room]["timeline"]["events"].as_array().expect("a leave entry").clone();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0]["state_key"], carol_id.as_str());
    assert_eq!(left[0]["content"]["membership"], "leave");
    assert_error(&join(http, &carol, &room).await, 403, "M_FORBIDDEN");
    server.stop().await;
}

#[tokio::test]
async fn knocking_needs_a_knock_join_rule_and_a_version_that_has_it() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let bob = server.register("bob", "pw").await;
    let knock_rules = json!([{ "type": "m.room.join_rules", "content": { "join_rule": "knock" } }]);
    let invite_only = create_room(http, &alice, json!({ "room_version": "10" })).await;
    let v6 = create_room(http, &alice, json!({ "room_version": "6", "initial_state": knock_rules })).await;
    let restricted_v9 = create_room(
        http,
        &alice,
        json!({ "room_version": "9", "initial_state": [{ "type": "m.room.join_rules", "content": { "join_rule": "knock_restricted", "allow": [] } }] }),
    )
    .await;
    for room in [&invite_only, &v6, &restricted_v9] {
        let refused = knock(http, &bob, room).await;
        assert_error(&refused, 403, "M_FORBIDDEN");
        assert!(refused.1["error"].as_str().unwrap().contains("knock"), "{}", refused.1);
    }
    let alias = knock(http, &bob, "%23club:hs1.localhost").await;
    assert_error(&alias, 404, "M_NOT_FOUND");
    assert!(alias.1["error"].as_str().unwrap().contains("alias"), "{}", alias.1);
    assert_error(&knock(http, &bob, "!unknown:hs1.localhost").await, 404, "M_NOT_FOUND");
    assert_error(&knock(http, &bob, "not-a-room").await, 400, "M_INVALID_PARAM");
    server.stop().await;
}

#[tokio::test]
async fn members_of_an_allowed_room_join_a_restricted_room_and_outsiders_do_not() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let bob = server.register("bob", "pw").await;
    let carol = server.register("carol", "pw").await;
    let (alice_id, bob_id) = (server.user_id("alice"), server.user_id("bob"));
    let space = create_room(http, &alice, json!({ "room_version": "10", "preset": "public_chat" })).await;
    ok(join(http, &bob, &space).await);
    let allow = json!([{ "type": "m.room_membership", "room_id": space }]);
    let rules = |rule: &str| json!([{ "type": "m.room.join_rules", "content": { "join_rule": rule, "allow": allow } }]);

    let restricted =
        create_room(http, &alice, json!({ "room_version": "8", "initial_state": rules("restricted") })).await;
    ok(join(http, &bob, &restricted).await);
    let member = state(http, &alice, &restricted, &format!("m.room.member/{bob_id}")).await;
    assert_eq!(member["membership"], "join");
    assert_eq!(member["join_authorised_via_users_server"], alice_id.as_str());
    let refused = join(http, &carol, &restricted).await;
    assert_error(&refused, 403, "M_FORBIDDEN");
    assert!(refused.1["error"].as_str().unwrap().contains("restricted"), "{}", refused.1);

    // knock_restricted (v10): members of the allowed room join, others may knock.
    let knock_restricted =
        create_room(http, &alice, json!({ "room_version": "10", "initial_state": rules("knock_restricted") })).await;
    ok(join(http, &bob, &knock_restricted).await);
    assert_eq!(
        state(http, &alice, &knock_restricted, &format!("m.room.member/{bob_id}")).await["join_authorised_via_users_server"],
        alice_id.as_str()
    );
    assert_error(&join(http, &carol, &knock_restricted).await, 403, "M_FORBIDDEN");
    ok(knock(http, &carol, &knock_restricted).await);

    // Nobody left in the room who may invite: the join cannot be vouched for.
    let empty = create_room(http, &alice, json!({ "room_version": "10", "initial_state": rules("restricted") })).await;
    ok(http.post(&room_path(&empty, "leave"), Some(&alice), &json!({})).await);
    let refused = join(http, &bob, &empty).await;
    assert_error(&refused, 403, "M_FORBIDDEN");
    assert!(refused.1["error"].as_str().unwrap().contains("may invite"), "{}", refused.1);
    server.stop().await;
}

#[tokio::test]
async fn a_forgotten_room_leaves_sync_until_the_user_comes_back() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let bob = server.register("bob", "pw").await;
    let room = create_room(http, &alice, json!({ "preset": "public_chat" })).await;
    ok(join(http, &bob, &room).await);
    let refused = forget(http, &bob, &room).await;
    assert_error(&refused, 400, "M_UNKNOWN");
    assert_error(&forget(http, &bob, "!unknown:hs1.localhost").await, 404, "M_NOT_FOUND");

    let before_leave = sync(http, &bob, None).await["next_batch"].as_str().unwrap().to_owned();
    ok(http.post(&room_path(&room, "leave"), Some(&bob), &json!({})).await);
    assert!(sync(http, &bob, Some(&before_leave)).await["rooms"]["leave"].get(&room).is_some());

    ok(forget(http, &bob, &room).await);
    let after = sync(http, &bob, Some(&before_leave)).await;
    assert!(after["rooms"]["leave"].get(&room).is_none(), "{after}");
    let initial = sync(http, &bob, None).await;
    for section in ["join", "invite", "leave", "knock"] {
        assert!(initial["rooms"][section].get(&room).is_none(), "{section}: {initial}");
    }
    assert_error(&http.get(&room_path(&room, "messages?dir=b"), Some(&bob)).await, 403, "M_FORBIDDEN");

    // Coming back ends the forgetting: the room is in sync again, and a new leave shows.
    ok(join(http, &bob, &room).await);
    assert!(sync(http, &bob, None).await["rooms"]["join"].get(&room).is_some());
    ok(http.post(&room_path(&room, "leave"), Some(&bob), &json!({})).await);
    assert!(sync(http, &bob, Some(&before_leave)).await["rooms"]["leave"].get(&room).is_some());
    server.stop().await;
}

#[tokio::test]
async fn hostile_input_to_the_new_routes_gets_matrix_errors() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let room = create_room(http, &alice, json!({})).await;
    let paths = [
        room_path(&room, "upgrade"),
        room_path(&room, "forget"),
        room_path("%00", "upgrade"),
        room_path("!a:b", "forget"),
        format!("/_matrix/client/v3/knock/{room}"),
        "/_matrix/client/v3/knock/%23".to_owned(),
        "/_matrix/client/v3/knock/%FF%FE".to_owned(),
    ];
    let bodies = [
        "",
        "null",
        r#"{"new_version": 12}"#,
        r#"{"new_version": "\u0000"}"#,
        r#"{"new_version": "12", "additional_creators": "@a:b"}"#,
        r#"{"new_version": "12", "additional_creators": ["@alice:hs1.localhost", "@alice:hs1.localhost"]}"#,
        r#"{"reason": ["no"]}"#,
    ];
    for path in &paths {
        for body in bodies {
            for token in [None, Some(alice.as_str())] {
                let (status, value) =
                    http.request(reqwest::Method::POST, path, token, Some(body.as_bytes().to_vec())).await;
                assert!(status.as_u16() < 500, "{path} {body} → {status} {value}");
                assert!(status.is_success() || value["errcode"].is_string(), "{path} {body} → {status} {value}");
            }
        }
    }
    assert_eq!(http.get("/_matrix/client/v3/account/whoami", Some(&alice)).await.0, 200);
    server.stop().await;
}

#[tokio::test]
async fn member_events_carry_profiles_and_a_profile_change_reaches_every_joined_room() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let bob = server.register("bob", "pw").await;
    let carol = server.register("carol", "pw").await;
    let (alice_id, bob_id, carol_id) = (server.user_id("alice"), server.user_id("bob"), server.user_id("carol"));
    let name = |user: &str| format!("/_matrix/client/v3/profile/{user}/displayname");
    ok(http.put(&name(&bob_id), Some(&bob), &json!({ "displayname": "Bob B." })).await);

    let room = create_room(http, &alice, json!({ "preset": "private_chat" })).await;
    let other = create_room(http, &alice, json!({ "preset": "public_chat" })).await;
    assert_eq!(state(http, &alice, &room, &format!("m.room.member/{alice_id}")).await["displayname"], "alice");
    membership_action(http, &alice, &room, "invite", &bob_id).await;
    let invite = state(http, &alice, &room, &format!("m.room.member/{bob_id}")).await;
    assert_eq!((invite["membership"].as_str(), invite["displayname"].as_str()), (Some("invite"), Some("Bob B.")));
    ok(join(http, &bob, &room).await);
    ok(join(http, &bob, &other).await);
    assert_eq!(state(http, &alice, &room, &format!("m.room.member/{bob_id}")).await["displayname"], "Bob B.");

    let since = sync(http, &alice, None).await["next_batch"].as_str().unwrap().to_owned();
    ok(http.put(&name(&bob_id), Some(&bob), &json!({ "displayname": "Robert" })).await);
    let avatar = format!("/_matrix/client/v3/profile/{bob_id}/avatar_url");
    ok(http.put(&avatar, Some(&bob), &json!({ "avatar_url": "mxc://hs1.localhost/bob" })).await);
    for room in [&room, &other] {
        let member = state(http, &alice, room, &format!("m.room.member/{bob_id}")).await;
        assert_eq!(member["membership"], "join");
        assert_eq!(member["displayname"], "Robert", "the new name in {room}");
        assert_eq!(member["avatar_url"], "mxc://hs1.localhost/bob");
    }
    let news = sync(http, &alice, Some(&since)).await;
    let timeline = news["rooms"]["join"][&room]["timeline"]["events"].as_array().cloned().unwrap_or_default();
    let names: Vec<&str> = timeline
        .iter()
        .filter(|e| e["type"] == "m.room.member" && e["state_key"] == bob_id.as_str())
        .filter_map(|e| e["content"]["displayname"].as_str())
        .collect();
    assert_eq!(names, ["Robert", "Robert"], "the rename, then the new avatar, as member events");

    // A room carol was never in hears nothing of her rename.
    ok(http.put(&name(&carol_id), Some(&carol), &json!({ "displayname": "Caz" })).await);
    let member = http.get(&room_path(&room, &format!("state/m.room.member/{carol_id}")), Some(&alice)).await;
    assert_error(&member, 404, "M_NOT_FOUND");
}
