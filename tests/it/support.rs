//! The test harness: real Lattice servers on loopback with temporary data directories, in this
//! process or as a subprocess of the built binary, and a small raw-HTTP client.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use lattice::Config;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A config for tests: loopback port 0 (the OS picks a free port), cheap password hashing, no rate
/// limits.
pub fn test_config(data_dir: &Path, server_name: &str) -> Config {
    let mut config = Config {
        server_name: server_name.try_into().expect("valid server name"),
        data_dir: data_dir.to_path_buf(),
        ..Config::default()
    };
    config.listen.address = SocketAddr::from(([127, 0, 0, 1], 0));
    config.rate_limits.enabled = false;
    // Tests look at the directory right after changing it.
    config.rooms.public_rooms_cache_secs = 0;
    config.auth.password_hash_memory_kib = 1024;
    config.auth.password_hash_iterations = 1;
    config
}

/// Turns federation on for a test server: a self-signed certificate for its name written into
/// `tls_dir`, a TLS listener on a free loopback port, and no DNS (tests never query DNS).
pub fn enable_federation(config: &mut Config, tls_dir: &Path) {
    let (cert, key) =
        lattice::tls::write_self_signed(config.server_name.as_str(), tls_dir).expect("self-signed certificate");
    config.federation.listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    config.federation.tls_cert = Some(cert);
    config.federation.tls_key = Some(key);
    config.federation.dns = false;
}

/// A server running inside the test process.
pub struct TestServer {
    pub http: Http,
    pub registration_token: String,
    pub server_name: String,
    running: Option<lattice::Running>,
    _dir: TempDir,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = test_config(dir.path(), "hs1.localhost");
        adjust(&mut config);
        let server_name = config.server_name.to_string();
        let running = lattice::start(config).await.expect("server starts");
        let registration_token = running.first_registration_token.clone().unwrap_or_default();
        let http = Http::new(format!("http://{}", running.address));
        Self { http, registration_token, server_name, running: Some(running), _dir: dir }
    }

    pub fn base_url(&self) -> &str {
        &self.http.base
    }

    pub fn user_id(&self, localpart: &str) -> String {
        format!("@{localpart}:{}", self.server_name)
    }

    /// Registers `name` through the token flow and returns its access token.
    pub async fn register(&self, name: &str, password: &str) -> String {
        let session = register(&self.http, name, password, &self.registration_token).await;
        session["access_token"].as_str().expect("access token").to_owned()
    }

    /// How many `/sync` long-polls are waiting in the server right now.
    pub fn sync_waiters(&self) -> usize {
        self.running.as_ref().map_or(0, |running| running.sync_waiters.count())
    }

    /// Wake-ups the server has sent to waiting `/sync` requests so far.
    pub fn sync_wakeups(&self) -> u64 {
        self.running.as_ref().map_or(0, |running| running.sync_waiters.wakeups())
    }

    /// Waits until `count` long-polls are asleep in the server: proof that a request is waiting
    /// before the test writes.
    pub async fn until_sync_waiters(&self, count: usize) {
        while self.sync_waiters() < count {
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.stop().await.expect("clean stop");
        }
    }
}

/// Runs the full user-interactive registration with a registration token; returns the response.
pub async fn register(http: &Http, name: &str, password: &str, token: &str) -> Value {
    let body = json!({ "username": name, "password": password, "initial_device_display_name": "test" });
    let (status, challenge) = http.post("/_matrix/client/v3/register", None, &body).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{challenge}");
    let session = challenge["session"].as_str().expect("UIA session");
    let mut body = body;
    body["auth"] = json!({ "type": "m.login.registration_token", "token": token, "session": session });
    let (status, response) = http.post("/_matrix/client/v3/register", None, &body).await;
    assert_eq!(status, StatusCode::OK, "{response}");
    response
}

/// Creates a room through the client API; returns its ID.
pub async fn create_room(http: &Http, token: &str, body: Value) -> String {
    let (status, response) = http.post("/_matrix/client/v3/createRoom", Some(token), &body).await;
    assert_eq!(status, StatusCode::OK, "{response}");
    response["room_id"].as_str().expect("room_id").to_owned()
}

/// Raw HTTP against one server.
#[derive(Clone)]
pub struct Http {
    pub base: String,
    client: reqwest::Client,
}

impl Http {
    pub fn new(base: String) -> Self {
        let client = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(30)).build().expect("client");
        Self { base, client }
    }

    pub async fn request(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> (StatusCode, Value) {
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.header("content-type", "application/json").body(body);
        }
        let response = request.send().await.expect("request sent");
        let status = response.status();
        let bytes = response.bytes().await.expect("body");
        let value =
            serde_json::from_slice(&bytes).unwrap_or_else(|_| json!({ "raw": String::from_utf8_lossy(&bytes) }));
        (status, value)
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> (StatusCode, Value) {
        self.request(Method::GET, path, token, None).await
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: &Value) -> (StatusCode, Value) {
        self.request(Method::POST, path, token, Some(body.to_string().into_bytes())).await
    }

    pub async fn put(&self, path: &str, token: Option<&str>, body: &Value) -> (StatusCode, Value) {
        self.request(Method::PUT, path, token, Some(body.to_string().into_bytes())).await
    }

    pub async fn login(&self, user: &str, password: &str) -> (StatusCode, Value) {
        let body = json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": user }, "password": password });
        self.post("/_matrix/client/v3/login", None, &body).await
    }
}

/// Asserts a Matrix error response.
#[track_caller]
/// `text` percent-encoded for a URL path segment or query value (every byte but ASCII letters
/// and digits).
pub fn urlencode(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC).to_string()
}

pub fn assert_error(response: &(StatusCode, Value), status: u16, errcode: &str) {
    assert_eq!(response.0.as_u16(), status, "body: {}", response.1);
    assert_eq!(response.1["errcode"], errcode, "body: {}", response.1);
}

/// The `lattice` binary of this build, run as a child process.
pub struct ProcessServer {
    pub http: Http,
    pub first_registration_token: Option<String>,
    child: Child,
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_lattice")
}

/// Environment that points the binary at `data_dir` with test-friendly settings.
pub fn process_env(data_dir: &Path, address: SocketAddr) -> Vec<(String, String)> {
    vec![
        ("LATTICE_DATA_DIR".into(), data_dir.display().to_string()),
        ("LATTICE_LISTEN__ADDRESS".into(), address.to_string()),
        ("LATTICE_SERVER_NAME".into(), "hs1.localhost".into()),
        ("LATTICE_RATE_LIMITS__ENABLED".into(), "false".into()),
        ("LATTICE_AUTH__PASSWORD_HASH_MEMORY_KIB".into(), "1024".into()),
        ("LATTICE_AUTH__PASSWORD_HASH_ITERATIONS".into(), "1".into()),
    ]
}

impl ProcessServer {
    /// Starts the binary on port 0 and reads the address it bound (and, on a first start, the
    /// registration token printed before it) from its standard output.
    pub async fn start(data_dir: &Path) -> Self {
        Self::start_with_env(data_dir, &[]).await
    }

    /// [`ProcessServer::start`] with more `LATTICE_*` variables.
    pub async fn start_with_env(data_dir: &Path, extra_env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(binary())
            .arg("serve")
            .envs(process_env(data_dir, SocketAddr::from(([127, 0, 0, 1], 0))))
            .envs(extra_env.iter().copied())
            .env_remove("LATTICE_CONFIG")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn lattice");
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(read_start_up(child.stdout.take().expect("stdout"), started_tx));
        let started = tokio::time::timeout(Duration::from_secs(60), started_rx).await.expect("lattice starts");
        let Ok((address, first_registration_token)) = started else {
            panic!("lattice exited during start-up: {:?}", child.wait().await);
        };
        let http = Http::new(format!("http://{address}"));
        Self { http, first_registration_token, child }
    }

    /// SIGKILL: no shutdown code runs.
    pub async fn kill_9(mut self) {
        self.child.kill().await.expect("kill");
    }

    /// SIGTERM, then waits; returns whether the process exited successfully.
    pub async fn terminate(mut self) -> bool {
        let pid = self.child.id().expect("running");
        let status = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().expect("kill -TERM");
        assert!(status.success());
        let exit =
            tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await.expect("exits").expect("wait");
        exit.success()
    }
}

/// Reads the binary's standard output: the registration token of a first start, then the line
/// with the bound address, sent once that line arrives (the listener is bound by then). Keeps
/// reading so the child never blocks on a full pipe.
async fn read_start_up(
    stdout: tokio::process::ChildStdout,
    started: tokio::sync::oneshot::Sender<(SocketAddr, Option<String>)>,
) {
    let mut lines = BufReader::new(stdout).lines();
    let mut started = Some(started);
    let mut token = None;
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(first) = line.strip_prefix("First start: registration token (shown only now): ") {
            token = Some(first.trim().to_owned());
        } else if let Some(address) = line.strip_prefix("Serving the client API on http://")
            && let Some(started) = started.take()
        {
            let _ = started.send((address.trim().parse().expect("bound address"), token.take()));
        }
    }
}

/// Sends a text message whose body is also its transaction ID; returns the event ID.
pub async fn say(http: &Http, token: &str, room: &str, body: &str) -> String {
    let path = format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/{body}");
    let (status, response) = http.put(&path, Some(token), &json!({ "msgtype": "m.text", "body": body })).await;
    assert_eq!(status, 200, "{response}");
    response["event_id"].as_str().unwrap().to_owned()
}

/// `GET /sync?{query}`, which must answer 200.
pub async fn sync(http: &Http, token: &str, query: &str) -> Value {
    let (status, body) = http.get(&format!("/_matrix/client/v3/sync?{query}"), Some(token)).await;
    assert_eq!(status, 200, "{body}");
    body
}

/// The bodies of the messages among `events` (a JSON array), in order.
pub fn bodies(events: &Value) -> Vec<String> {
    events.as_array().unwrap().iter().filter_map(|e| e["content"]["body"].as_str().map(str::to_owned)).collect()
}
