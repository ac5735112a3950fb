//! The outbound server-server HTTP client: discovery, TLS (rustls; peers verified unless
//! `verify_peer_tls` is off, extra roots from `trusted_ca`), connection pooling, timeouts,
//! `X-Matrix` signing, bounded response bodies, and per-destination back-off.
//!
//! reqwest connects to the addresses discovery found through a resolver that answers only
//! pinned names ([`PinnedNames`]): the URL carries the certificate name (so TLS verifies it and
//! sends it as SNI), the `Host` header is set from discovery, and the port comes from the URL.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use http::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, HOST};
use http::{HeaderValue, Method};
use ruma::ServerName;

use crate::address_policy::AddressPolicy;
use crate::backoff::Backoff;
use crate::bounded::BoundedMap;
use crate::clock::Clock;
use crate::discovery::{Discovery, NameResolver, WELL_KNOWN_MAX_BYTES, WellKnownFetcher, WellKnownResponse};
use crate::error::{FederationError, Result};
use crate::own_keys::OwnKeys;
use crate::web_fetch::{WebFetcher, WebLimits};

/// How peers' certificates are checked.
#[derive(Clone, Debug, Default)]
pub struct TlsSettings {
    /// `false` only on test networks: any certificate is accepted.
    pub verify_peer_tls: bool,
    /// PEM certificates trusted as roots in addition to the system's.
    pub trusted_ca_pem: Option<Vec<u8>>,
}

/// Timeouts and limits of the outbound client.
#[derive(Clone, Debug)]
pub struct ClientLimits {
    pub connect_timeout: Duration,
    /// Whole request, response body included.
    pub request_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
}

impl Default for ClientLimits {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            pool_idle_timeout: Duration::from_secs(90),
            pool_max_idle_per_host: 8,
        }
    }
}

/// Whether a request carries this server's `X-Matrix` signature.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Auth {
    Signed,
    /// The key endpoints (`/_matrix/key/*`) need no signature.
    Unsigned,
}

/// How many names discovery may have pinned at once.
const MAX_PINNED_NAMES: usize = 10_000;

/// The addresses discovery chose per certificate name, for reqwest's resolver hook.
#[derive(Clone)]
struct PinnedNames {
    pins: Arc<Mutex<BoundedMap<String, Vec<SocketAddr>>>>,
}

impl PinnedNames {
    fn pin(&self, name: &str, addrs: Vec<SocketAddr>, now_ms: u64) {
        self.pins.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_owned(), addrs, now_ms);
    }
}

impl reqwest::dns::Resolve for PinnedNames {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let found = self.pins.lock().unwrap_or_else(|e| e.into_inner()).get(name.as_str()).cloned();
        let name = name.as_str().to_owned();
        Box::pin(async move {
            match found {
                Some(addrs) => Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs),
                None => Err(format!("{name} was not resolved by server discovery").into()),
            }
        })
    }
}

fn tls_builder(mut builder: reqwest::ClientBuilder, tls: &TlsSettings) -> Result<reqwest::ClientBuilder> {
    builder = builder.tls_backend_rustls().https_only(true);
    if !tls.verify_peer_tls {
        builder = builder.tls_danger_accept_invalid_certs(true);
    }
    if let Some(pem) = &tls.trusted_ca_pem {
        let certs = reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|e| FederationError::Invalid(format!("trusted_ca is not a PEM certificate bundle: {e}")))?;
        if certs.is_empty() {
            return Err(FederationError::Invalid("trusted_ca holds no certificate".into()));
        }
        builder = builder.tls_certs_merge(certs);
    }
    Ok(builder)
}

/// Fetches `.well-known/matrix/server` over HTTPS with ordinary DNS under the address policy,
/// following up to five redirects (each checked), reading at most [`WELL_KNOWN_MAX_BYTES`].
pub struct HttpWellKnown {
    web: WebFetcher,
}

impl HttpWellKnown {
    pub fn new(tls: &TlsSettings, limits: &ClientLimits, policy: Arc<AddressPolicy>) -> Result<Self> {
        let web_limits = WebLimits {
            connect_timeout: limits.connect_timeout,
            request_timeout: limits.request_timeout,
            max_redirects: 5,
            https_only: true,
        };
        Ok(Self { web: WebFetcher::new(policy, web_limits, tls)? })
    }
}

#[async_trait]
impl WellKnownFetcher for HttpWellKnown {
    async fn fetch(&self, hostname: &str) -> WellKnownResponse {
        let failed = |error: String| WellKnownResponse { status: Err(error), body: Vec::new(), cache_control: None };
        let url = format!("https://{hostname}/.well-known/matrix/server");
        let response = match self.web.get(&url, "application/json").await {
            Ok(found) => found.response,
            Err(FederationError::Status { status, .. }) => {
                return WellKnownResponse { status: Ok(status), body: Vec::new(), cache_control: None };
            }
            Err(error) => return failed(error.to_string()),
        };
        let status = response.status().as_u16();
        let cache_control = response.headers().get(CACHE_CONTROL).and_then(|v| v.to_str().ok()).map(str::to_owned);
        match read_limited(response, WELL_KNOWN_MAX_BYTES).await {
            Ok(body) => WellKnownResponse { status: Ok(status), body, cache_control },
            Err(error) => failed(error),
        }
    }
}

/// Reads a response body, refusing one longer than `max_bytes`.
async fn read_limited(mut response: reqwest::Response, max_bytes: usize) -> Result<Vec<u8>, String> {
    if response.content_length().is_some_and(|length| length > max_bytes as u64) {
        return Err(format!("response body larger than {max_bytes} bytes"));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
        if body.len() + chunk.len() > max_bytes {
            return Err(format!("response body larger than {max_bytes} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Everything the client needs that the binary decides.
pub struct ClientSettings {
    pub tls: TlsSettings,
    pub limits: ClientLimits,
    /// `server name -> address` pins (the `[federation] resolve` option).
    pub resolve_overrides: HashMap<String, SocketAddr>,
    /// `false`: no DNS and no `.well-known` (which needs DNS); only IP literals and pinned
    /// names are reachable. For closed test networks.
    pub dns: bool,
    /// Servers never talked to (`[federation] deny_servers`).
    pub deny: crate::DenyList,
    /// The addresses other servers' names may lead to (`[federation] ip_range_deny` and
    /// `ip_range_allow`); `resolve_overrides` are not checked against it.
    pub address_policy: Arc<AddressPolicy>,
}

/// The `.well-known` step without DNS: always "no delegation".
struct NoWellKnown;

#[async_trait]
impl WellKnownFetcher for NoWellKnown {
    async fn fetch(&self, _hostname: &str) -> WellKnownResponse {
        WellKnownResponse { status: Err("DNS is off".to_owned()), body: Vec::new(), cache_control: None }
    }
}

pub struct FederationClient {
    keys: Arc<OwnKeys>,
    discovery: Discovery,
    pins: PinnedNames,
    http: reqwest::Client,
    backoff: Backoff,
    clock: Arc<dyn Clock>,
    deny: crate::DenyList,
    /// Plain HTTP(S) fetches under the same address policy (remote media `Location`s).
    web: WebFetcher,
    /// Set only in simulations: signed requests go to this instead of over HTTPS.
    in_process: Option<Arc<dyn Transport>>,
}

/// Where a built, signed request goes instead of the network: another server's router in the
/// same process, for seeded simulations (`tests/it/simulation.rs`) where a test decides what
/// the "network" drops, delays, duplicates and reorders. Discovery and TLS are skipped; the
/// request and its `X-Matrix` signature are exactly what would go over HTTPS.
#[async_trait]
pub trait Transport: Send + Sync {
    /// Delivers `request` to `destination` and returns the answer's status and body, or
    /// [`FederationError::Transport`] when it never arrived or its answer was lost.
    async fn exchange(&self, destination: &ServerName, request: http::Request<Vec<u8>>) -> Result<(u16, Vec<u8>)>;
}

impl FederationClient {
    /// A client that resolves names with `resolver` (DNS) and fetches `.well-known` over HTTPS.
    pub fn new(
        keys: Arc<OwnKeys>,
        settings: ClientSettings,
        resolver: Arc<dyn NameResolver>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self> {
        let policy = settings.address_policy.clone();
        let well_known: Arc<dyn WellKnownFetcher> = if settings.dns {
            Arc::new(HttpWellKnown::new(&settings.tls, &settings.limits, policy.clone())?)
        } else {
            Arc::new(NoWellKnown)
        };
        let discovery = Discovery::new(settings.resolve_overrides, policy.clone(), resolver, well_known, clock.clone());
        let web = WebFetcher::new(policy, WebLimits::default(), &settings.tls)?;
        let pins = PinnedNames { pins: Arc::new(Mutex::new(BoundedMap::new(MAX_PINNED_NAMES))) };
        let builder = reqwest::Client::builder()
            .dns_resolver(Arc::new(pins.clone()))
            .connect_timeout(settings.limits.connect_timeout)
            .timeout(settings.limits.request_timeout)
            .pool_idle_timeout(settings.limits.pool_idle_timeout)
            .pool_max_idle_per_host(settings.limits.pool_max_idle_per_host)
            // Federation requests are never redirected: the signature names the target.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("Lattice/", env!("CARGO_PKG_VERSION")));
        let http = tls_builder(builder, &settings.tls)?
            .build()
            .map_err(|e| FederationError::Invalid(format!("building the HTTP client: {e}")))?;
        Ok(Self {
            keys,
            discovery,
            pins,
            http,
            backoff: Backoff::default(),
            clock,
            deny: settings.deny,
            web,
            in_process: None,
        })
    }

    /// A client whose requests go through `transport` (simulations): no DNS, no TLS, the same
    /// signing, limits and back-off.
    pub fn in_process(keys: Arc<OwnKeys>, transport: Arc<dyn Transport>, clock: Arc<dyn Clock>) -> Result<Self> {
        let settings = ClientSettings {
            tls: TlsSettings::default(),
            limits: ClientLimits::default(),
            resolve_overrides: HashMap::new(),
            dns: false,
            deny: crate::DenyList::new(Vec::new()),
            address_policy: Arc::new(AddressPolicy::default()),
        };
        let mut client = Self::new(keys, settings, Arc::new(crate::NoDns), clock)?;
        client.in_process = Some(transport);
        Ok(client)
    }

    /// Fetches of URLs another server named (a media `Location`), under the federation's
    /// address policy.
    pub fn web_fetcher(&self) -> &WebFetcher {
        &self.web
    }

    /// `server` was heard from (a request of its verified): it is up, so its back-off ends.
    /// Returns whether it was backing off.
    pub fn heard_from(&self, server: &ServerName) -> bool {
        self.backoff.succeeded(server.as_str())
    }

    /// Whether the operator denied `server` (no request to it, none from it is answered).
    pub fn denies(&self, server: &ServerName) -> bool {
        self.deny.denies(server)
    }

    pub fn own_keys(&self) -> &Arc<OwnKeys> {
        &self.keys
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Sends one request to `destination` and returns the body of a 2xx answer. Transport
    /// failures and 5xx answers put the destination into back-off; while it lasts, requests to
    /// it fail at once with [`FederationError::BackingOff`].
    pub async fn request(
        &self,
        destination: &ServerName,
        method: Method,
        path_and_query: &str,
        body: Option<&serde_json::Value>,
        auth: Auth,
        max_response_bytes: usize,
    ) -> Result<Vec<u8>> {
        let server = destination.as_str();
        if self.denies(destination) {
            return Err(FederationError::Denied(server.to_owned()));
        }
        if let Err(retry_in_ms) = self.backoff.check(server, self.clock.now_ms()) {
            return Err(FederationError::BackingOff { server: server.to_owned(), retry_in_ms });
        }
        let outcome = self.send(destination, method, path_and_query, body, auth, max_response_bytes).await;
        match &outcome {
            Ok(_) | Err(FederationError::Status { status: 400..=499, .. }) => {
                self.backoff.succeeded(server);
            }
            Err(
                FederationError::InvalidServerName(_) | FederationError::Invalid(_) | FederationError::AddressDenied(_),
            ) => {}
            Err(error) => {
                tracing::debug!(destination = server, %error, "federation request failed; backing off");
                self.backoff.failed(server, self.clock.now_ms());
            }
        }
        outcome
    }

    /// A signed `GET` whose answer is streamed rather than read whole (media): the response of a
    /// 2xx answer, its body unread. Other answers are [`FederationError::Status`] with the start
    /// of their body. Back-off as [`FederationClient::request`].
    pub async fn get_streaming(
        &self,
        destination: &ServerName,
        path_and_query: &str,
        auth: Auth,
    ) -> Result<reqwest::Response> {
        let server = destination.as_str();
        if self.denies(destination) {
            return Err(FederationError::Denied(server.to_owned()));
        }
        if let Err(retry_in_ms) = self.backoff.check(server, self.clock.now_ms()) {
            return Err(FederationError::BackingOff { server: server.to_owned(), retry_in_ms });
        }
        let outcome = self.send_streaming(destination, path_and_query, auth).await;
        match &outcome {
            Ok(_) | Err(FederationError::Status { status: 400..=499, .. } | FederationError::Redirect { .. }) => {
                self.backoff.succeeded(server);
            }
            Err(
                FederationError::InvalidServerName(_) | FederationError::Invalid(_) | FederationError::AddressDenied(_),
            ) => {}
            Err(error) => {
                tracing::debug!(destination = server, %error, "federation request failed; backing off");
                self.backoff.failed(server, self.clock.now_ms());
            }
        }
        outcome
    }

    async fn send_streaming(
        &self,
        destination: &ServerName,
        path_and_query: &str,
        auth: Auth,
    ) -> Result<reqwest::Response> {
        let server = destination.as_str();
        let resolved = self.discovery.resolve(server).await?;
        let endpoint = &resolved.endpoint;
        self.pins.pin(&endpoint.tls_name, resolved.addrs.clone(), self.clock.now_ms());
        let url_host = if endpoint.tls_name.contains(':') {
            format!("[{}]", endpoint.tls_name)
        } else {
            endpoint.tls_name.clone()
        };
        let url = format!("https://{url_host}:{}{path_and_query}", endpoint.port);
        let host = HeaderValue::from_str(&endpoint.host_header)
            .map_err(|_| FederationError::InvalidServerName(endpoint.host_header.clone()))?;
        let mut request = self.http.request(Method::GET, url).header(HOST, host);
        if let Some(authorization) = self.authorization(auth, destination, &Method::GET, path_and_query, &[])? {
            request = request.header(AUTHORIZATION, authorization);
        }
        let transport = |detail: String| FederationError::Transport { server: server.to_owned(), detail };
        let response = request.send().await.map_err(|e| transport(error_chain(&e)))?;
        let status = response.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(response);
        }
        if matches!(status, 307 | 308)
            && let Some(location) = response.headers().get(http::header::LOCATION).and_then(|v| v.to_str().ok())
        {
            return Err(FederationError::Redirect { server: server.to_owned(), location: location.to_owned() });
        }
        let bytes = read_limited(response, 4096).await.unwrap_or_default();
        let mut text = String::from_utf8_lossy(&bytes).into_owned();
        let mut end = text.len().min(500);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        Err(FederationError::Status { server: server.to_owned(), status, body: text })
    }

    async fn send(
        &self,
        destination: &ServerName,
        method: Method,
        path_and_query: &str,
        body: Option<&serde_json::Value>,
        auth: Auth,
        max_response_bytes: usize,
    ) -> Result<Vec<u8>> {
        let server = destination.as_str();
        let body_bytes = match body {
            Some(value) => serde_json::to_vec(value).map_err(|e| FederationError::Invalid(e.to_string()))?,
            None => Vec::new(),
        };
        if let Some(transport) = &self.in_process {
            let request = self.in_process_request(destination, method, path_and_query, body_bytes, auth)?;
            let (status, bytes) = transport.exchange(destination, request).await?;
            return answer(server, status, bytes, max_response_bytes);
        }
        let resolved = self.discovery.resolve(server).await?;
        let endpoint = &resolved.endpoint;
        self.pins.pin(&endpoint.tls_name, resolved.addrs.clone(), self.clock.now_ms());
        let url_host = if endpoint.tls_name.contains(':') {
            format!("[{}]", endpoint.tls_name)
        } else {
            endpoint.tls_name.clone()
        };
        let url = format!("https://{url_host}:{}{path_and_query}", endpoint.port);
        let host = HeaderValue::from_str(&endpoint.host_header)
            .map_err(|_| FederationError::InvalidServerName(endpoint.host_header.clone()))?;
        let mut request = self.http.request(method.clone(), url).header(HOST, host);
        if let Some(authorization) = self.authorization(auth, destination, &method, path_and_query, &body_bytes)? {
            request = request.header(AUTHORIZATION, authorization);
        }
        if body.is_some() {
            request = request.header(CONTENT_TYPE, "application/json").body(body_bytes);
        }
        let transport = |detail: String| FederationError::Transport { server: server.to_owned(), detail };
        let response = request.send().await.map_err(|e| transport(error_chain(&e)))?;
        let status = response.status().as_u16();
        let bytes = read_limited(response, max_response_bytes).await.map_err(transport)?;
        answer(server, status, bytes, max_response_bytes)
    }

    /// This server's `X-Matrix` signature of a request, unless it goes unsigned.
    fn authorization(
        &self,
        auth: Auth,
        destination: &ServerName,
        method: &Method,
        path_and_query: &str,
        body: &[u8],
    ) -> Result<Option<HeaderValue>> {
        if auth == Auth::Unsigned {
            return Ok(None);
        }
        let (origin, key_pair) = (self.keys.server_name(), self.keys.key_pair());
        crate::x_matrix::sign_request(origin, destination, key_pair, method, path_and_query, body).map(Some)
    }

    /// The request [`FederationClient::send`] would put on the wire, for an in-process transport.
    fn in_process_request(
        &self,
        destination: &ServerName,
        method: Method,
        path_and_query: &str,
        body: Vec<u8>,
        auth: Auth,
    ) -> Result<http::Request<Vec<u8>>> {
        let mut request =
            http::Request::builder().method(method.clone()).uri(path_and_query).header(HOST, destination.as_str());
        if let Some(authorization) = self.authorization(auth, destination, &method, path_and_query, &body)? {
            request = request.header(AUTHORIZATION, authorization);
        }
        if !body.is_empty() {
            request = request.header(CONTENT_TYPE, "application/json");
        }
        request.body(body).map_err(|e| FederationError::Invalid(format!("building a request: {e}")))
    }
}

/// A response body within `max_response_bytes` if the status is 2xx; otherwise
/// [`FederationError::Status`] with the start of the body.
fn answer(server: &str, status: u16, bytes: Vec<u8>, max_response_bytes: usize) -> Result<Vec<u8>> {
    if !(200..300).contains(&status) {
        let mut text = String::from_utf8_lossy(&bytes).into_owned();
        let mut end = text.len().min(500);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        return Err(FederationError::Status { server: server.to_owned(), status, body: text });
    }
    if bytes.len() > max_response_bytes {
        return Err(FederationError::Transport {
            server: server.to_owned(),
            detail: format!("response larger than {max_response_bytes} bytes"),
        });
    }
    Ok(bytes)
}

/// An error with its causes, so a TLS failure says why (reqwest's top line only says
/// "error sending request").
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
