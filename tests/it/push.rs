//! Push rules, notification counts and pushers (issue #12), over HTTP and through `matrix-sdk`.

use reqwest::Method;
use serde_json::{Value, json};

use crate::support::{TestServer, assert_error, sync};

const RULES: &str = "/_matrix/client/v3/pushrules/global";

fn rule_ids(rules: &Value, kind: &str) -> Vec<String> {
    rules[kind].as_array().map_or(Vec::new(), |rules| {
        rules.iter().filter_map(|rule| rule["rule_id"].as_str().map(str::to_owned)).collect()
    })
}

fn push_rules_in(sync_body: &Value) -> Option<Value> {
    let events = sync_body["account_data"]["events"].as_array()?;
    events.iter().find(|e| e["type"] == "m.push_rules").map(|e| e["content"].clone())
}

#[tokio::test]
async fn a_new_user_has_the_default_rules_in_the_api_in_account_data_and_in_the_first_sync() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;

    let (status, all) = http.get("/_matrix/client/v3/pushrules/", Some(&alice)).await;
    assert_eq!(status, 200, "{all}");
    let global = &all["global"];
    for id in [".m.rule.master", ".m.rule.suppress_notices", ".m.rule.is_user_mention", ".m.rule.is_room_mention"] {
        assert!(rule_ids(global, "override").contains(&id.to_owned()), "{id} missing: {global}");
    }
    for id in [".m.rule.encrypted", ".m.rule.message", ".m.rule.call"] {
        assert!(rule_ids(global, "underride").contains(&id.to_owned()), "{id} missing: {global}");
    }
    let (status, scope) = http.get(&format!("{RULES}/"), Some(&alice)).await;
    assert_eq!(status, 200);
    assert_eq!(scope, *global, "the global scope is the same ruleset");

    let (status, master) = http.get(&format!("{RULES}/override/.m.rule.master"), Some(&alice)).await;
    assert_eq!(status, 200, "{master}");
    assert_eq!((master["default"].clone(), master["enabled"].clone()), (json!(true), json!(false)));

    let path = format!("/_matrix/client/v3/user/{}/account_data/m.push_rules", server.user_id("alice"));
    let (status, data) = http.get(&path, Some(&alice)).await;
    assert_eq!(status, 200, "{data}");
    assert_eq!(data["global"], *global);

    let first = sync(http, &alice, "").await;
    assert_eq!(push_rules_in(&first).expect("m.push_rules in the first sync")["global"], *global);
    let since = first["next_batch"].as_str().unwrap();
    let again = sync(http, &alice, &format!("since={since}&timeout=0")).await;
    assert_eq!(push_rules_in(&again), None, "an unchanged default is not sent again");
    server.stop().await;
}

#[tokio::test]
async fn a_rule_put_is_listed_in_place_synced_and_can_be_disabled_changed_and_deleted() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let since = sync(http, &alice, "").await["next_batch"].as_str().unwrap().to_owned();

    let cake = json!({ "pattern": "cake", "actions": ["notify", { "set_tweak": "highlight" }] });
    assert_eq!(http.put(&format!("{RULES}/content/cake"), Some(&alice), &cake).await.0, 200);
    let pie = json!({ "pattern": "pie", "actions": ["notify"] });
    let (status, body) = http.put(&format!("{RULES}/content/pie?after=cake"), Some(&alice), &pie).await;
    assert_eq!(status, 200, "{body}");
    let first = json!({ "pattern": "tart", "actions": [] });
    assert_eq!(http.put(&format!("{RULES}/content/tart?before=cake"), Some(&alice), &first).await.0, 200);

    let (_, all) = http.get("/_matrix/client/v3/pushrules/", Some(&alice)).await;
    let content = rule_ids(&all["global"], "content");
    let user_rules: Vec<&str> = content.iter().map(String::as_str).filter(|id| !id.starts_with('.')).collect();
    assert_eq!(user_rules, ["tart", "cake", "pie"], "{all}");

    let news = sync(http, &alice, &format!("since={since}&timeout=0")).await;
    let synced = push_rules_in(&news).expect("the change reaches /sync as m.push_rules");
    assert_eq!(synced["global"], all["global"]);

    let enabled = format!("{RULES}/content/cake/enabled");
    assert_eq!(http.get(&enabled, Some(&alice)).await.1, json!({ "enabled": true }));
    assert_eq!(http.put(&enabled, Some(&alice), &json!({ "enabled": false })).await.0, 200);
    assert_eq!(http.get(&enabled, Some(&alice)).await.1, json!({ "enabled": false }));
    // Replacing a rule keeps it disabled.
    assert_eq!(http.put(&format!("{RULES}/content/cake"), Some(&alice), &cake).await.0, 200);
    assert_eq!(http.get(&enabled, Some(&alice)).await.1, json!({ "enabled": false }));

    let actions = format!("{RULES}/content/pie/actions");
    assert_eq!(http.put(&actions, Some(&alice), &json!({ "actions": [] })).await.0, 200);
    assert_eq!(http.get(&actions, Some(&alice)).await.1, json!({ "actions": [] }));
    // A server-default rule can be switched and changed, not deleted.
    let master = format!("{RULES}/override/.m.rule.master");
    assert_eq!(http.put(&format!("{master}/enabled"), Some(&alice), &json!({ "enabled": true })).await.0, 200);
    assert_eq!(http.get(&format!("{master}/enabled"), Some(&alice)).await.1, json!({ "enabled": true }));
    assert_error(&http.request(Method::DELETE, &master, Some(&alice), None).await, 400, "M_INVALID_PARAM");

    assert_eq!(http.request(Method::DELETE, &format!("{RULES}/content/pie"), Some(&alice), None).await.0, 200);
    assert_error(&http.get(&format!("{RULES}/content/pie"), Some(&alice)).await, 404, "M_NOT_FOUND");
    server.stop().await;
}

#[tokio::test]
async fn rules_are_per_user_by_the_token() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let bob = server.register("bob", "pw").await;
    let secret = json!({ "pattern": "alice-secret", "actions": ["notify"] });
    assert_eq!(http.put(&format!("{RULES}/content/secret"), Some(&alice), &secret).await.0, 200);

    assert_error(&http.get(&format!("{RULES}/content/secret"), Some(&bob)).await, 404, "M_NOT_FOUND");
    let (_, bobs) = http.get("/_matrix/client/v3/pushrules/", Some(&bob)).await;
    assert!(!rule_ids(&bobs["global"], "content").contains(&"secret".to_owned()), "{bobs}");
    let delete = http.request(Method::DELETE, &format!("{RULES}/content/secret"), Some(&bob), None).await;
    assert_error(&delete, 404, "M_NOT_FOUND");
    assert_eq!(http.get(&format!("{RULES}/content/secret"), Some(&alice)).await.0, 200, "alice's rule stays");
    // Alice's rules as account data are hers alone, and no client may write them there.
    let path = format!("/_matrix/client/v3/user/{}/account_data/m.push_rules", server.user_id("alice"));
    assert_error(&http.get(&path, Some(&bob)).await, 403, "M_FORBIDDEN");
    assert_error(&http.put(&path, Some(&alice), &json!({ "global": {} })).await, 405, "M_BAD_JSON");
    assert_error(&http.get(&format!("{RULES}/"), None).await, 401, "M_MISSING_TOKEN");
    server.stop().await;
}

#[tokio::test]
async fn bad_push_rule_requests_get_matrix_errors() {
    let server = TestServer::start().await;
    let http = &server.http;
    let alice = server.register("alice", "pw").await;
    let actions = json!({ "actions": ["notify"] });

    assert_error(&http.put(&format!("{RULES}/sideways/x"), Some(&alice), &actions).await, 400, "M_INVALID_PARAM");
    assert_error(&http.get(&format!("{RULES}/sideways/x"), Some(&alice)).await, 400, "M_INVALID_PARAM");
    assert_error(&http.get(&format!("{RULES}/override/nope"), Some(&alice)).await, 404, "M_NOT_FOUND");
    assert_error(&http.get(&format!("{RULES}/override/nope/enabled"), Some(&alice)).await, 404, "M_NOT_FOUND");
    let enable = json!({ "enabled": true });
    assert_error(&http.put(&format!("{RULES}/room/nope/enabled"), Some(&alice), &enable).await, 404, "M_NOT_FOUND");
    assert_error(&http.put(&format!("{RULES}/content/x"), Some(&alice), &actions).await, 400, "M_BAD_JSON");
    let not_json = http.request(Method::PUT, &format!("{RULES}/override/x"), Some(&alice), Some(b"{".to_vec())).await;
    assert_error(&not_json, 400, "M_NOT_JSON");
    let bad_condition = json!({ "actions": ["notify"], "conditions": [{ "kind": "event_match" }] });
    assert_error(&http.put(&format!("{RULES}/override/x"), Some(&alice), &bad_condition).await, 400, "M_BAD_JSON");
    let conditional = json!({ "actions": ["notify"], "conditions": [] });
    let reserved = http.put(&format!("{RULES}/override/.mine"), Some(&alice), &conditional).await;
    assert_error(&reserved, 400, "M_INVALID_PARAM");
    assert_error(&http.put(&format!("{RULES}/room/not-a-room"), Some(&alice), &actions).await, 400, "M_INVALID_PARAM");
    let relative = format!("{RULES}/override/x?before=.m.rule.master");
    assert_error(&http.put(&relative, Some(&alice), &conditional).await, 400, "M_INVALID_PARAM");
    let unknown_anchor = format!("{RULES}/override/x?after=missing");
    assert_error(&http.put(&unknown_anchor, Some(&alice), &conditional).await, 404, "M_NOT_FOUND");
    let bad_enabled = http.put(&format!("{RULES}/override/.m.rule.master/enabled"), Some(&alice), &json!({})).await;
    assert_error(&bad_enabled, 400, "M_BAD_JSON");
    // Nothing above changed the rules.
    let (_, all) = http.get("/_matrix/client/v3/pushrules/", Some(&alice)).await;
    let defaults = rule_ids(&all["global"], "override");
    assert!(defaults.iter().all(|id| id.starts_with('.')), "{all}");
    server.stop().await;
}
