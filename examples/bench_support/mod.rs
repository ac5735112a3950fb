//! What the single-server benchmarks in `examples/` share: starting the real `lattice` binary on
//! loopback with benchmark settings, calling its client API, registering users, reading its
//! memory. Included by each benchmark with `#[path = "bench_support/mod.rs"] mod bench_support;`
//! (a directory without `main.rs`, so Cargo does not take it for an example of its own).

// Each benchmark uses only part of this module.
#![allow(dead_code)]

use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// A `lattice serve` process this benchmark started, killed when dropped.
pub struct BenchServer {
    pub base: String,
    pub http: reqwest::Client,
    pub registration_token: String,
    pub child: Child,
}

impl BenchServer {
    /// Starts `binary` on a free loopback port with a fresh `data_dir`, rate limits off, cheap
    /// password hashing (registration is not what the benchmarks measure) and `extra_env` on
    /// top; waits until it answers.
    pub async fn start(binary: &str, data_dir: &std::path::Path, extra_env: &[(&str, String)]) -> Result<Self, Error> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut command = Command::new(binary);
        command
            .arg("serve")
            .env("LATTICE_DATA_DIR", data_dir)
            .env("LATTICE_LISTEN__ADDRESS", format!("127.0.0.1:{port}"))
            .env("LATTICE_SERVER_NAME", "bench.localhost")
            .env("LATTICE_RATE_LIMITS__ENABLED", "false")
            .env("LATTICE_AUTH__PASSWORD_HASH_MEMORY_KIB", "1024")
            .env("LATTICE_AUTH__PASSWORD_HASH_ITERATIONS", "1")
            .env("LATTICE_LOGGING__LEVEL", "warn")
            .env_remove("LATTICE_CONFIG");
        for (name, value) in extra_env {
            command.env(name, value);
        }
        let mut child = command.stdout(Stdio::piped()).stderr(Stdio::null()).kill_on_drop(true).spawn()?;
        let mut lines = BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
        let prefix = "First start: registration token (shown only now): ";
        let registration_token = loop {
            match tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await?? {
                Some(line) if line.starts_with(prefix) => break line[prefix.len()..].trim().to_owned(),
                Some(_) => continue,
                None => return Err("the server exited before printing a registration token".into()),
            }
        };
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let http = reqwest::Client::builder().no_proxy().pool_max_idle_per_host(64).build()?;
        let server = Self { base: format!("http://127.0.0.1:{port}"), http, registration_token, child };
        for _ in 0..600 {
            if server.http.get(format!("{}/_matrix/client/versions", server.base)).send().await.is_ok() {
                return Ok(server);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err("the server did not start serving".into())
    }

    /// A client-API request whose answer must be a 2xx JSON body.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Result<Value, Error> {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await?;
        let status = response.status();
        let value: Value = response.json().await?;
        if !status.is_success() {
            return Err(format!("{path}: {status} {value}").into());
        }
        Ok(value)
    }

    /// Registers a user with the server's registration token; its access token and device ID.
    pub async fn register(&self, name: &str) -> Result<(String, String), Error> {
        let body = json!({ "username": name, "password": "bench-password" });
        let challenge = self.http.post(format!("{}/_matrix/client/v3/register", self.base)).json(&body).send().await?;
        let session = challenge.json::<Value>().await?["session"].as_str().ok_or("no UIA session")?.to_owned();
        let mut body = body;
        body["auth"] =
            json!({ "type": "m.login.registration_token", "token": self.registration_token, "session": session });
        let done = self.call(reqwest::Method::POST, "/_matrix/client/v3/register", None, Some(&body)).await?;
        let token = done["access_token"].as_str().ok_or("no access token")?.to_owned();
        let device = done["device_id"].as_str().ok_or("no device ID")?.to_owned();
        Ok((token, device))
    }

    /// The server process's resident memory in MiB, from `/proc` (0 when it cannot be read).
    pub fn rss_mib(&self) -> f64 {
        let Some(pid) = self.child.id() else { return 0.0 };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let kib: f64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| value.split_whitespace().next())
            .and_then(|value| value.parse().ok())
            .unwrap_or(0.0);
        kib / 1024.0
    }
}

/// The `p` quantile (0–1) of sorted samples; NaN when there are none.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// p50 and p99 of unsorted samples.
pub fn summary(mut samples: Vec<f64>) -> (f64, f64) {
    samples.sort_by(f64::total_cmp);
    (percentile(&samples, 0.5), percentile(&samples, 0.99))
}
