//! The no-panic sweep: every route the router registers (listed by `lattice_api::route_paths`,
//! so a new route is swept without touching this file), every method, hostile bodies, path
//! parameters and query strings, with and without a valid token. Every answer is a JSON body;
//! every 4xx carries an `errcode` (or is a UIA challenge); nothing is a 5xx; the server keeps
//! serving.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::{TestServer, assert_error, create_room, enable_federation};

const METHODS: [Method; 4] = [Method::GET, Method::PUT, Method::POST, Method::DELETE];

/// Routes that end the session they are called with; each call gets a fresh login of its own
/// user. (Should another route end sessions, the final `whoami` of the sweep fails.)
const SESSION_ENDING: &[&str] = &["/_matrix/client/v3/logout", "/_matrix/client/v3/logout/all"];

/// Path segments that are not what any route expects (already percent-encoded), and a huge one.
fn hostile_segments() -> Vec<String> {
    let mut segments: Vec<String> = HOSTILE_SEGMENTS.iter().map(|s| (*s).to_owned()).collect();
    segments.push("x".repeat(20_000));
    segments
}

const HOSTILE_SEGMENTS: &[&str] = &[
    "%00",
    "%FF%FE",
    "%F0%9F%98%80",
    "%40%3A",
    "!nowhere",
    "%24",
    "%23%3A",
    "%2F",
    "a%0Ab%20c",
    "-1",
    "18446744073709551616",
];

/// Query strings that are malformed, of the wrong type, out of range or huge.
const HOSTILE_QUERIES: &[&str] = &[
    "?limit=-1&from=%FF&to=x&dir=q&timeout=-5&since=%00&filter=%7B&full_state=maybe",
    "?limit=18446744073709551616&timeout=18446744073709551616&ts=18446744073709551616",
    "?limit=18446744073709551615&timeout=18446744073709551615&ts=18446744073709551615&dir=b",
    "?limit=4294967295&dir=b&from=s18446744073709551615&to=s0",
    "?dir=f&limit=0&from=s1_2&since=s0_1",
    "?since=s0&timeout=0&filter=%7B%22room%22%3A5%2C%22event_fields%22%3A%5B1%5D%7D",
    "?filter=99999999999999999999&since=s18446744073709551615",
    "?ts=-1&dir=f&include=everything&at=%00&membership=nope&not_membership=join",
    "?server=%00&limit=1e3&username=%FF&token=%00&kind=%00",
    "?%%%=&&==&dir=b&dir=f&limit=1&limit=2",
    "?access_token=%00&user_id=%40%3A",
];

fn hostile_bodies() -> Vec<Vec<u8>> {
    let nested = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let wide = json!({ "body": "x".repeat(70_000), "msgtype": "m.text" });
    let bodies = [
        "",
        "{",
        "null",
        "[1, 2]",
        "\"a string\"",
        "{}",
        "{\"auth\": {\"type\": 5}}",
        "{\"auth\": {\"type\": \"m.login.password\", \"session\": \"\\u0000\"}}",
        "{\"devices\": [\"\\u0000\"], \"new_password\": 1e400}",
        "{\"username\": \"\\ud800\", \"identifier\": {\"type\": \"m.id.user\"}}",
        "{\"type\": \"m.login.password\", \"user\": \"@:\", \"password\": \"x\", \"device_id\": \"\"}",
        "{\"refresh_token\": {\"a\": []}, \"room\": {\"timeline\": {\"limit\": -1}}}",
        "{\"user_id\": \"@other:hs1.localhost\", \"reason\": 5}",
        "{\"user_id\": \"@:\", \"reason\": \"\\u0000\", \"new_version\": \"\\u0000\", \"room_id\": \"!x\"}",
        "{\"typing\": true, \"timeout\": 18446744073709551616, \"displayname\": [\"x\"]}",
        "{\"typing\": true, \"timeout\": 18446744073709551615, \"score\": -9223372036854775808}",
        "{\"m.fully_read\": \"$nothing\", \"m.read\": 7, \"thread_id\": {}}",
        "{\"invite\": [\"@:\"], \"initial_state\": [{\"type\": 5}], \"room_version\": \"\\u0000\", \
         \"power_level_content_override\": {\"users\": 1}, \"preset\": \"x\", \"visibility\": 3}",
        "{\"messages\": {\"@target:hs1.localhost\": {\"*\": 5}}, \"order\": \"x\", \"score\": -1e400}",
        "{\"limit\": -1, \"since\": \"x\", \"filter\": {\"generic_search_term\": 5}, \"server\": \"\\u0000\"}",
        "{\"room_id\": \"!nowhere:hs1.localhost\", \"visibility\": \"public\", \"avatar_url\": \"mxc://\"}",
        "{\"membership\": \"join\", \"users\": {\"@target:hs1.localhost\": 1e400}, \"events\": []}",
    ];
    let mut bodies: Vec<Vec<u8>> = bodies.iter().map(|b| b.as_bytes().to_vec()).collect();
    bodies.extend([vec![0xff, 0xfe, 0x00, 0x80], nested.into_bytes(), wide.to_string().into_bytes()]);
    bodies
}

/// What the sweep needs to reach the inside of every handler: a user, a room of theirs with
/// one message, a stored filter.
struct Fixture {
    server: TestServer,
    /// The federation listener's certificate (federation is on, so its routes are swept too).
    _tls: tempfile::TempDir,
    token: String,
    device_id: String,
    filter_id: String,
}

impl Fixture {
    async fn new() -> Self {
        let tls = tempfile::tempdir().expect("temp dir");
        let server = TestServer::start_with(|config| {
            enable_federation(config, tls.path());
            // Previews on too (off, their routes answer as unknown ones); nothing here names a
            // URL the policy would let through.
            config.media.url_preview.enabled = true;
        })
        .await;
        let token = server.register("target", "pw").await;
        server.register("other", "pw").await;
        server.register("leaver", "pw").await;
        let (_, whoami) = server.http.get("/_matrix/client/v3/account/whoami", Some(&token)).await;
        let device_id = whoami["device_id"].as_str().expect("device_id").to_owned();
        let path = format!("/_matrix/client/v3/user/{}/filter", server.user_id("target"));
        let (_, filter) =
            server.http.post(&path, Some(&token), &json!({ "room": { "timeline": { "limit": 5 } } })).await;
        let filter_id = filter["filter_id"].as_str().expect("filter_id").to_owned();
        Self { server, _tls: tls, token, device_id, filter_id }
    }

    /// A room of the target's, fresh for each route so one route's effects (a leave, a ban,
    /// an upgrade) do not stop the next one from reaching its handler; and an event in it.
    async fn room_with_event(&self) -> (String, String) {
        let http = &self.server.http;
        let body = json!({ "invite": [self.server.user_id("other")] });
        let room = create_room(http, &self.token, body).await;
        let path = format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/sweep-setup");
        let (status, sent) = http.put(&path, Some(&self.token), &json!({ "msgtype": "m.text", "body": "hi" })).await;
        assert_eq!(status, 200, "{sent}");
        (room, sent["event_id"].as_str().expect("event_id").to_owned())
    }

    /// Valid values for each path parameter, so a request gets past the parameter checks.
    fn valid_value(&self, parameter: &str, room: &str, event: &str) -> String {
        let value = match parameter {
            "room_id" | "room_id_or_alias" => room.to_owned(),
            "event_id" => event.to_owned(),
            "event_type" => "m.room.message".to_owned(),
            "state_key" | "user_id" => self.server.user_id("target"),
            "txn_id" => "sweep-txn".to_owned(),
            "receipt_type" => "m.read".to_owned(),
            "device_id" => self.device_id.clone(),
            "field" => "displayname".to_owned(),
            "filter_id" => self.filter_id.clone(),
            "rel_type" => "m.thread".to_owned(),
            "tag" => "u.work".to_owned(),
            "room_alias" => "#sweep:hs1.localhost".to_owned(),
            "server_name" => "hs1.localhost".to_owned(),
            "kind" => "override".to_owned(),
            "rule_id" => ".m.rule.master".to_owned(),
            "version" => "1".to_owned(),
            "session_id" => "sweep-session".to_owned(),
            "media_id" => "sweepmedia0000000000000000000000".to_owned(),
            "file_name" => "sweep.txt".to_owned(),
            "protocol" => "irc".to_owned(),
            "delay_id" => "sweepdelayid".to_owned(),
            "action" => "restart".to_owned(),
            other => panic!("the sweep has no valid value for the path parameter {{{other}}}: add one here"),
        };
        encode_segment(&value)
    }

    async fn fresh_token(&self, user: &str) -> String {
        let (status, login) = self.server.http.login(user, "pw").await;
        assert_eq!(status, 200, "{login}");
        login["access_token"].as_str().expect("access_token").to_owned()
    }
}

/// Percent-encodes one path segment (IDs carry `#`, `!`, `$`, `@`, `:`).
fn encode_segment(value: &str) -> String {
    let mut encoded = String::new();
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@".contains(&byte) {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// The names of a template's `{parameters}`, in order.
fn parameters(template: &str) -> Vec<&str> {
    template.split('/').filter_map(|segment| segment.strip_prefix('{')?.strip_suffix('}')).collect()
}

/// The template with each parameter replaced by `fill(index, name)`.
fn fill(template: &str, mut fill: impl FnMut(usize, &str) -> String) -> String {
    let mut index = 0;
    let segments: Vec<String> = template
        .split('/')
        .map(|segment| match segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            Some(name) => {
                index += 1;
                fill(index - 1, name)
            }
            None => segment.to_owned(),
        })
        .collect();
    segments.join("/")
}

/// The paths to send for one template: all parameters valid, then each parameter in turn
/// replaced by each hostile segment.
fn paths_for(template: &str, valid: &[String]) -> Vec<String> {
    let mut paths = vec![fill(template, |i, _| valid[i].clone())];
    for target in 0..valid.len() {
        for hostile in hostile_segments() {
            paths.push(fill(template, |i, _| if i == target { hostile.clone() } else { valid[i].clone() }));
        }
    }
    paths
}

/// The answer must be JSON, never a 5xx, and a 4xx must be a Matrix error (or a UIA challenge).
#[track_caller]
fn assert_well_formed(request: &str, status: StatusCode, value: &Value) {
    assert!(status.as_u16() < 500, "{request} → {status} {value}");
    assert!(value.get("raw").is_none(), "{request} → {status}: not JSON: {value}");
    if status.is_client_error() {
        let uia_challenge = status == StatusCode::UNAUTHORIZED && value["flows"].is_array();
        assert!(value["errcode"].is_string() || uia_challenge, "{request} → {status} {value}");
    }
}

struct Sweep {
    fixture: Fixture,
    bodies: Vec<Vec<u8>>,
    requests: usize,
}

impl Sweep {
    async fn send(&mut self, method: &Method, path: &str, auth: Option<&str>, body: &[u8]) -> (StatusCode, Value) {
        self.requests += 1;
        let http = &self.fixture.server.http;
        let response = http.request(method.clone(), path, auth, Some(body.to_vec())).await;
        // Paths are percent-encoded ASCII, so any byte index is a char boundary.
        let shown_path = &path[..path.len().min(300)];
        let shown_body = String::from_utf8_lossy(&body[..body.len().min(200)]);
        let request = format!("{method} {shown_path} (token: {}) body {shown_body:?}", auth.is_some());
        assert_well_formed(&request, response.0, &response.1);
        response
    }

    /// The token for one authenticated request to `template`.
    async fn token_for(&self, template: &str) -> String {
        if SESSION_ENDING.contains(&template) {
            self.fixture.fresh_token("leaver").await
        } else {
            self.fixture.token.clone()
        }
    }

    /// Sends everything to one route; returns the methods it answers (anything but 405).
    async fn route(&mut self, template: &str) -> Vec<Method> {
        let (room, event) = self.fixture.room_with_event().await;
        let valid: Vec<String> =
            parameters(template).iter().map(|name| self.fixture.valid_value(name, &room, &event)).collect();
        let paths = paths_for(template, &valid);
        let mut registered = Vec::new();
        for method in &METHODS {
            let token = self.token_for(template).await;
            let (status, value) = self.send(method, &paths[0], Some(&token), b"{}").await;
            if status == StatusCode::METHOD_NOT_ALLOWED && value["errcode"] == "M_UNRECOGNIZED" {
                continue;
            }
            assert!(
                !(status == StatusCode::NOT_FOUND && value["errcode"] == "M_UNRECOGNIZED"),
                "{method} {} did not reach the route {template}: {value}",
                paths[0]
            );
            registered.push(method.clone());
            self.bodies_and_queries(template, method, &paths[0]).await;
            for path in &paths[1..] {
                let token = self.token_for(template).await;
                self.send(method, path, Some(&token), b"{}").await;
                self.send(method, path, None, b"{}").await;
            }
        }
        registered
    }

    async fn bodies_and_queries(&mut self, template: &str, method: &Method, path: &str) {
        for index in 0..self.bodies.len() {
            let body = self.bodies[index].clone();
            let token = self.token_for(template).await;
            self.send(method, path, Some(&token), &body).await;
            self.send(method, path, None, &body).await;
        }
        for query in HOSTILE_QUERIES {
            let token = self.token_for(template).await;
            self.send(method, &format!("{path}{query}"), Some(&token), b"{}").await;
            self.send(method, &format!("{path}{query}"), None, b"").await;
        }
    }
}

/// The route list is the router's: no route is registered in `lattice-api` outside it.
#[test]
fn every_route_in_the_source_is_in_the_route_list() {
    let source_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/lattice-api/src");
    let mut in_source = Vec::new();
    let mut directories = vec![source_dir];
    while let Some(directory) = directories.pop() {
        for entry in std::fs::read_dir(&directory).expect("source directory") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                directories.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                in_source.extend(route_literals(&std::fs::read_to_string(&path).expect("source file")));
            }
        }
    }
    let mut listed: Vec<String> = lattice_api::route_paths().iter().map(|p| (*p).to_owned()).collect();
    in_source.sort();
    listed.sort();
    assert_eq!(in_source, listed);
}

/// The path literals of `.route("…", …)` calls in one source file.
fn route_literals(source: &str) -> Vec<String> {
    source
        .split(".route(")
        .skip(1)
        .filter_map(|after| after.trim_start().strip_prefix('"')?.split('"').next().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn no_request_to_any_route_can_panic_the_server() {
    let templates = lattice_api::route_paths();
    for known in ["/_matrix/client/v3/register", "/_matrix/client/v3/rooms/{room_id}/send/{event_type}/{txn_id}"] {
        assert!(templates.contains(&known), "the route list lacks {known}: {templates:?}");
    }
    let mut sweep = Sweep { fixture: Fixture::new().await, bodies: hostile_bodies(), requests: 0 };
    let mut table = Vec::new();
    for template in &templates {
        let methods = sweep.route(template).await;
        // Every registered route answers at least one method: the sweep reached it.
        assert!(!methods.is_empty(), "{template} answered 405 to every method");
        table.push((template, methods));
        let (status, _) = sweep.fixture.server.http.get("/_matrix/client/versions", None).await;
        assert_eq!(status, 200, "the server stopped answering after {template}");
    }
    let http = &sweep.fixture.server.http;
    assert_eq!(http.get("/_matrix/client/v3/account/whoami", Some(&sweep.fixture.token)).await.0, 200);
    eprintln!("swept {} routes with {} requests: {table:?}", templates.len(), sweep.requests);
    sweep.fixture.server.stop().await;
}

/// Found by the sweep: an event too big to sign was an internal error (500), not the client's.
#[tokio::test]
async fn an_event_too_big_to_sign_is_refused_as_too_large() {
    let server = TestServer::start().await;
    let token = server.register("alice", "pw").await;
    let room = create_room(&server.http, &token, json!({})).await;
    let big = json!({ "topic": "x".repeat(70_000) });
    for path in [
        format!("/_matrix/client/v3/rooms/{room}/state/m.room.topic"),
        format!("/_matrix/client/v3/rooms/{room}/state/m.room.topic/@alice:hs1.localhost"),
        format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/big"),
    ] {
        assert_error(&server.http.put(&path, Some(&token), &big).await, 413, "M_TOO_LARGE");
    }
    server.stop().await;
}
