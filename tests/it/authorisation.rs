//! Who may do what (issue #9, "Authorisation"): redactions by power level, the originals kept
//! for server admins, relations that stay inside their room, unbans, deactivation, login
//! answers, and event types validated on every path. Each test starts with the user who must
//! not see or do the thing.

use reqwest::StatusCode;
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::support::{Http, TestServer, assert_error, create_room, test_config};

async fn send(http: &Http, token: &str, room: &str, txn: &str, content: Value) -> String {
    let path = format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/{txn}");
    let (status, response) = http.put(&path, Some(token), &content).await;
    assert_eq!(status, 200, "{response}");
    response["event_id"].as_str().unwrap().to_owned()
}

async fn say(http: &Http, token: &str, room: &str, body: &str) -> String {
    send(http, token, room, body, json!({ "msgtype": "m.text", "body": body })).await
}

async fn redact(http: &Http, token: &str, room: &str, event: &str, txn: &str) -> (StatusCode, Value) {
    let path = format!("/_matrix/client/v3/rooms/{room}/redact/{event}/{txn}");
    http.put(&path, Some(token), &json!({ "reason": "test" })).await
}

async fn event(http: &Http, token: &str, room: &str, event: &str) -> Value {
    let (status, body) = http.get(&format!("/_matrix/client/v3/rooms/{room}/event/{event}"), Some(token)).await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn join(http: &Http, token: &str, room: &str) {
    let (status, body) = http.post(&format!("/_matrix/client/v3/join/{room}"), Some(token), &json!({})).await;
    assert_eq!(status, 200, "{body}");
}

async fn membership_of(http: &Http, token: &str, room: &str, user: &str) -> Value {
    let (status, body) = http.get(&format!("/_matrix/client/v3/rooms/{room}/members"), Some(token)).await;
    assert_eq!(status, 200, "{body}");
    body["chunk"].as_array().unwrap().iter().find(|e| e["state_key"] == user).cloned().unwrap_or(Value::Null)
}

#[tokio::test]
async fn a_power_zero_member_cannot_redact_anothers_event_and_the_original_stays() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let bob = server.register("bob", "pw").await;
    let room = create_room(http, &alice, json!({ "preset": "public_chat" })).await;
    join(http, &bob, &room).await;
    let original = say(http, &alice, &room, "keep me").await;

    // Bob (power 0) through both client paths: the redact route and a plain send.
    assert_error(&redact(http, &bob, &room, &original, "r1").await, 403, "M_FORBIDDEN");
    let path = format!("/_matrix/client/v3/rooms/{room}/send/m.room.redaction/r2");
    assert_error(&http.put(&path, Some(&bob), &json!({ "redacts": original })).await, 403, "M_FORBIDDEN");
    assert_eq!(event(http, &alice, &room, &original).await["content"]["body"], "keep me");

    // Targets that are not events of this room are not found, whoever asks.
    let other_room = create_room(http, &alice, json!({})).await;
    let elsewhere = say(http, &alice, &other_room, "elsewhere").await;
    assert_error(&redact(http, &alice, &room, &elsewhere, "r3").await, 404, "M_NOT_FOUND");
    assert_error(&redact(http, &alice, &room, "$nothing:hs1.localhost", "r4").await, 404, "M_NOT_FOUND");
    assert_eq!(event(http, &alice, &other_room, &elsewhere).await["content"]["body"], "elsewhere");

    // Bob may redact his own.
    let own = say(http, &bob, &room, "oops").await;
    assert_eq!(redact(http, &bob, &room, &own, "r5").await.0, 200);
    assert_eq!(event(http, &alice, &room, &own).await["content"], json!({}));
    server.stop().await;
}

#[tokio::test]
async fn moderators_and_v12_creators_redact_others_events() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let bob = server.register("bob", "pw").await;
    let carol = server.register("carol", "pw").await;
    let override_levels = json!({ "users": { server.user_id("alice"): 100, server.user_id("bob"): 50 } });
    let room =
        create_room(http, &alice, json!({ "preset": "public_chat", "power_level_content_override": override_levels }))
            .await;
    join(http, &bob, &room).await;
    join(http, &carol, &room).await;
    let carols = say(http, &carol, &room, "spam").await;
    // Carol cannot redact Bob's; Bob, a moderator at the default `redact` level 50, can redact hers.
    let bobs = say(http, &bob, &room, "moderating").await;
    assert_error(&redact(http, &carol, &room, &bobs, "c1").await, 403, "M_FORBIDDEN");
    assert_eq!(redact(http, &bob, &room, &carols, "b1").await.0, 200);
    assert_eq!(event(http, &alice, &room, &carols).await["content"], json!({}));

    // In a v12 room the creator is in no `users` map, yet outranks every level.
    let v12 = create_room(http, &alice, json!({ "preset": "public_chat", "room_version": "12" })).await;
    join(http, &carol, &v12).await;
    let carols = say(http, &carol, &v12, "more spam").await;
    let (_, levels) =
        http.get(&format!("/_matrix/client/v3/rooms/{v12}/state/m.room.power_levels"), Some(&alice)).await;
    assert!(levels["users"].get(server.user_id("alice")).is_none(), "{levels}");
    assert_eq!(redact(http, &alice, &v12, &carols, "a1").await.0, 200);
    assert_eq!(event(http, &alice, &v12, &carols).await["content"], json!({}));
    server.stop().await;
}

/// A server started with accounts made by the operator (the only way to make an admin).
struct ServerWithAccounts {
    http: Http,
    running: Option<lattice::Running>,
    _dir: TempDir,
}

impl ServerWithAccounts {
    async fn start(accounts: &[(&str, bool)], redaction_retention: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = test_config(dir.path(), "hs1.localhost");
        config.rooms.redaction_retention = redaction_retention.to_owned();
        {
            let opened = lattice::open(&config).await.expect("open");
            for (name, admin) in accounts {
                let account =
                    lattice_service::NewAccount { username: (*name).into(), password: "pw".into(), admin: *admin };
                opened.service.accounts().create_user(account).await.expect("create user");
            }
            opened.service.flush().await.expect("flush");
        }
        let running = lattice::start(config).await.expect("server starts");
        let http = Http::new(format!("http://{}", running.address));
        Self { http, running: Some(running), _dir: dir }
    }

    async fn token(&self, name: &str) -> String {
        let (status, body) = self.http.login(name, "pw").await;
        assert_eq!(status, 200, "{body}");
        body["access_token"].as_str().unwrap().to_owned()
    }

    async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.stop().await.expect("clean stop");
        }
    }
}

fn unredacted(room: &str, event: &str) -> String {
    format!("/_matrix/client/v3/rooms/{room}/event/{event}?fi.mau.msc2815.include_unredacted_content=true")
}

#[tokio::test]
async fn server_admins_read_redacted_originals_and_nobody_else_does() {
    let server = ServerWithAccounts::start(&[("root", true), ("bob", false)], "7d").await;
    let http = &server.http;
    let (root, bob) = (server.token("root").await, server.token("bob").await);
    let room = create_room(http, &root, json!({ "preset": "public_chat" })).await;
    join(http, &bob, &room).await;
    let abusive = say(http, &bob, &room, "something abusive").await;
    let kept = say(http, &bob, &room, "never redacted").await;
    assert_eq!(redact(http, &root, &room, &abusive, "r1").await.0, 200);

    // Bob, though he sent it and is in the room, may not ask for redacted content at all.
    assert_error(&http.get(&unredacted(&room, &abusive), Some(&bob)).await, 403, "M_FORBIDDEN");
    assert_error(&http.get(&unredacted(&room, &kept), Some(&bob)).await, 403, "M_FORBIDDEN");
    assert_eq!(event(http, &bob, &room, &abusive).await["content"], json!({}));

    let (status, original) = http.get(&unredacted(&room, &abusive), Some(&root)).await;
    assert_eq!(status, 200, "{original}");
    assert_eq!(original["content"]["body"], "something abusive");
    assert_eq!(original["event_id"], abusive.as_str());
    // Without the parameter, the admin gets the redacted event like everyone.
    assert_eq!(event(http, &root, &room, &abusive).await["content"], json!({}));
    let (status, plain) = http.get(&unredacted(&room, &kept), Some(&root)).await;
    assert_eq!((status.as_u16(), &plain["content"]["body"]), (200, &json!("never redacted")));
    server.stop().await;
}

#[tokio::test]
async fn with_no_retention_no_original_is_kept() {
    let server = ServerWithAccounts::start(&[("root", true)], "0").await;
    let http = &server.http;
    let root = server.token("root").await;
    let room = create_room(http, &root, json!({})).await;
    let message = say(http, &root, &room, "gone for good").await;
    assert_eq!(redact(http, &root, &room, &message, "r1").await.0, 200);
    let (status, body) = http.get(&unredacted(&room, &message), Some(&root)).await;
    assert_eq!((status.as_u16(), &body["content"]), (200, &json!({})), "{body}");
    server.stop().await;
}

#[tokio::test]
async fn a_thread_reply_to_another_rooms_event_reveals_nothing_of_it() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let mallory = server.register("mallory", "pw").await;
    let secret_room = create_room(http, &alice, json!({})).await;
    let secret = say(http, &alice, &secret_room, "the secret").await;
    let edit = json!({ "msgtype": "m.text", "body": "* leaked", "m.new_content": { "msgtype": "m.text", "body": "leaked" },
                       "m.relates_to": { "rel_type": "m.replace", "event_id": secret } });
    send(http, &alice, &secret_room, "edit", edit).await;

    // Mallory, not in the secret room, relates to its event from her own room.
    let own_room = create_room(http, &mallory, json!({})).await;
    let reply = |body: &str| json!({ "msgtype": "m.text", "body": body, "m.relates_to": { "rel_type": "m.thread", "event_id": secret } });
    send(http, &mallory, &own_room, "t1", reply("tell me")).await;
    let reaction = json!({ "m.relates_to": { "rel_type": "m.annotation", "event_id": secret, "key": "👀" } });
    let path = format!("/_matrix/client/v3/rooms/{own_room}/send/m.reaction/x1");
    assert_eq!(http.put(&path, Some(&mallory), &reaction).await.0, 200);

    let (status, threads) = http.get(&format!("/_matrix/client/v1/rooms/{own_room}/threads"), Some(&mallory)).await;
    assert_eq!(status, 200, "{threads}");
    assert_eq!(threads["chunk"], json!([]), "the other room's event is no thread root here: {threads}");
    let relations = format!("/_matrix/client/v1/rooms/{own_room}/relations/{secret}");
    assert_error(&http.get(&relations, Some(&mallory)).await, 404, "M_NOT_FOUND");
    let (_, timeline) =
        http.get(&format!("/_matrix/client/v3/rooms/{own_room}/messages?dir=b&limit=50"), Some(&mallory)).await;
    assert!(!timeline.to_string().contains("the secret") && !timeline.to_string().contains("leaked"), "{timeline}");

    // Nor does her reply show up in the secret room.
    let secret_event = event(http, &alice, &secret_room, &secret).await;
    assert!(secret_event["unsigned"]["m.relations"].get("m.thread").is_none(), "{secret_event}");
    let (_, threads) = http.get(&format!("/_matrix/client/v1/rooms/{secret_room}/threads"), Some(&alice)).await;
    assert_eq!(threads["chunk"], json!([]), "{threads}");
    let (_, related) =
        http.get(&format!("/_matrix/client/v1/rooms/{secret_room}/relations/{secret}"), Some(&alice)).await;
    assert_eq!(related["chunk"].as_array().unwrap().len(), 1, "only Alice's own edit: {related}");
    server.stop().await;
}

#[tokio::test]
async fn unban_of_a_user_who_is_not_banned_is_refused_and_sends_nothing() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let bob = server.register("bob", "pw").await;
    let room = create_room(http, &alice, json!({ "preset": "public_chat" })).await;
    join(http, &bob, &room).await;
    let unban = format!("/_matrix/client/v3/rooms/{room}/unban");
    let target = json!({ "user_id": server.user_id("bob") });
    let before = membership_of(http, &alice, &room, &server.user_id("bob")).await;

    assert_error(&http.post(&unban, Some(&alice), &target).await, 403, "M_FORBIDDEN");
    let after = membership_of(http, &alice, &room, &server.user_id("bob")).await;
    assert_eq!(after["event_id"], before["event_id"], "no member event was sent");
    assert_eq!(after["content"]["membership"], "join");
    // Nobody with no membership at all can be unbanned either.
    let nobody = json!({ "user_id": server.user_id("nobody") });
    assert_error(&http.post(&unban, Some(&alice), &nobody).await, 403, "M_FORBIDDEN");

    // A real ban is lifted.
    assert_eq!(http.post(&format!("/_matrix/client/v3/rooms/{room}/ban"), Some(&alice), &target).await.0, 200);
    assert_eq!(http.post(&unban, Some(&alice), &target).await.0, 200);
    assert_eq!(membership_of(http, &alice, &room, &server.user_id("bob")).await["content"]["membership"], "leave");
    server.stop().await;
}

async fn deactivate(http: &Http, token: &str, user: &str) {
    let auth =
        json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": user }, "password": "pw" });
    let (status, body) =
        http.post("/_matrix/client/v3/account/deactivate", Some(token), &json!({ "auth": auth })).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn deactivation_leaves_every_room_and_the_user_drops_out_of_lists_and_counts() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let dave = server.register("dave", "pw").await;
    let dave_id = server.user_id("dave");
    let put_name = format!("/_matrix/client/v3/profile/{dave_id}/displayname");
    assert_eq!(http.put(&put_name, Some(&dave), &json!({ "displayname": "Dave D." })).await.0, 200);
    let joined = create_room(http, &alice, json!({ "preset": "public_chat" })).await;
    join(http, &dave, &joined).await;
    let invited = create_room(http, &alice, json!({ "invite": [dave_id] })).await;
    let knock_rules = json!([{ "type": "m.room.join_rules", "content": { "join_rule": "knock" } }]);
    let knocked = create_room(http, &alice, json!({ "initial_state": knock_rules })).await;
    let (status, body) = http.post(&format!("/_matrix/client/v3/knock/{knocked}"), Some(&dave), &json!({})).await;
    assert_eq!(status, 200, "{body}");

    deactivate(http, &dave, &dave_id).await;

    for room in [&joined, &invited, &knocked] {
        let member = membership_of(http, &alice, room, &dave_id).await;
        assert_eq!(member["content"]["membership"], "leave", "{room}: {member}");
        assert_eq!(member["sender"], dave_id.as_str(), "Dave left himself: {member}");
        assert!(member["content"].get("displayname").is_none() && member["content"].get("avatar_url").is_none());
    }
    let (_, members) = http.get(&format!("/_matrix/client/v3/rooms/{joined}/joined_members"), Some(&alice)).await;
    assert!(members["joined"].get(&dave_id).is_none(), "{members}");
    let (_, synced) = http.get("/_matrix/client/v3/sync", Some(&alice)).await;
    for room in [&joined, &invited] {
        let summary = &synced["rooms"]["join"][room]["summary"];
        assert_eq!(summary["m.joined_member_count"], 1, "{room}: {summary}");
        assert_eq!(summary["m.invited_member_count"], 0, "{room}: {summary}");
        assert!(!summary["m.heroes"].to_string().contains(&dave_id), "{room}: {summary}");
    }
    assert_error(&http.get(&format!("/_matrix/client/v3/profile/{dave_id}"), None).await, 404, "M_NOT_FOUND");
    server.stop().await;
}

#[tokio::test]
async fn a_wrong_password_gets_one_answer_whether_the_account_exists_or_is_deactivated() {
    let server = TestServer::start().await;
    let http = &server.http;
    server.register("erin", "pw").await;
    let frank = server.register("frank", "pw").await;
    deactivate(http, &frank, &server.user_id("frank")).await;

    let existing = http.login("erin", "wrong").await;
    let missing = http.login("nobody", "wrong").await;
    let deactivated = http.login("frank", "wrong").await;
    assert_error(&existing, 403, "M_FORBIDDEN");
    assert_eq!(missing, existing);
    assert_eq!(deactivated, existing);
    // Deactivation dropped Frank's password, so his old one is just as wrong.
    assert_eq!(http.login("frank", "pw").await, existing);
    server.stop().await;
}

#[tokio::test]
async fn bad_event_types_and_state_keys_are_refused_on_every_path_and_create_nothing() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let long_type = "t".repeat(256);
    let bad_initial_states = [
        json!({ "type": "m.room\u{0}.member", "state_key": "", "content": {} }),
        json!({ "type": "m.room.topic\u{1}", "state_key": "", "content": {} }),
        json!({ "type": long_type, "state_key": "", "content": {} }),
        json!({ "type": "org.example", "state_key": "a\u{0}b", "content": {} }),
        json!({ "type": "org.example", "state_key": "k".repeat(256), "content": {} }),
    ];
    for bad in bad_initial_states {
        let body = json!({ "name": "half made?", "initial_state": [bad] });
        let response = http.post("/_matrix/client/v3/createRoom", Some(&alice), &body).await;
        assert_error(&response, 400, "M_BAD_JSON");
    }
    // Power levels the auth rules would refuse are refused before the room exists, too.
    let body = json!({ "power_level_content_override": { "ban": "lots" } });
    assert_error(&http.post("/_matrix/client/v3/createRoom", Some(&alice), &body).await, 400, "M_BAD_JSON");
    let (_, rooms) = http.get("/_matrix/client/v3/joined_rooms", Some(&alice)).await;
    assert_eq!(rooms["joined_rooms"], json!([]), "no room was started: {rooms}");

    let room = create_room(http, &alice, json!({})).await;
    let send = format!("/_matrix/client/v3/rooms/{room}/send/m.room%00.member/t1");
    assert_error(&http.put(&send, Some(&alice), &json!({})).await, 400, "M_BAD_JSON");
    let state = format!("/_matrix/client/v3/rooms/{room}/state/org.example%01/key");
    assert_error(&http.put(&state, Some(&alice), &json!({})).await, 400, "M_BAD_JSON");
    let state = format!("/_matrix/client/v3/rooms/{room}/state/org.example/a%00b");
    assert_error(&http.put(&state, Some(&alice), &json!({})).await, 400, "M_BAD_JSON");
    server.stop().await;
}
